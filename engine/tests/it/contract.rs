//! The store contract: every test body runs against the memory store and against Redis and
//! MariaDB (`<test>::memory`, `<test>::redis_mariadb`), and must see the same answers.

use std::collections::BTreeMap;
use std::sync::Arc;

use tcore_engine::domain::{
    AdmissionPolicy, Concert, FenceToken, IdempotencyDecision, LedgerReason, OutboxKind, QueueOrder, ReservationStatus,
    Schedule, SeatStatus, Section, StoredResponse, TokenStatus, TransitionError, WriteGuard,
};
use tcore_engine::store::{AuditEntry, HoldRequest, RecordStore, SeatFilter, StoreError};

use crate::contract;

const T0: u64 = 1_800_000_000_000;
const TTL_MS: u64 = 60_000;

/// Schedule 1: section A of `a` seats at 100 points, section B of `b` seats at 50.
fn schedule(a: u32, b: u32) -> Schedule {
    Schedule {
        id: 1,
        concert: Concert { id: 1, name: "Contract".into() },
        opens_at_ms: T0,
        sections: vec![
            Section { name: "A".into(), price_points: 100, seats_count: a },
            Section { name: "B".into(), price_points: 50, seats_count: b },
        ],
    }
}

/// The seat limit of holds whose test is not about it: the engine's highest.
const SEATS_PER_USER_MAX: u32 = 100;
/// How long idempotency records are kept, unless a test says otherwise.
const IDEMPOTENCY_TTL_MS: u64 = 86_400_000;

fn hold(seat_id: u64, user_id: u64) -> HoldRequest {
    HoldRequest {
        schedule_id: 1,
        seat_id,
        user_id,
        hold_ttl_ms: TTL_MS,
        node: "engine-1".into(),
        seats_per_user_max: SEATS_PER_USER_MAX,
    }
}

async fn seat_ids(record: &dyn RecordStore) -> Vec<u64> {
    let seats = record.seat_map(1, SeatFilter::default(), T0).await.expect("seat map");
    seats.iter().map(|seat| seat.id).collect()
}

async fn user(record: &dyn RecordStore, name: &str, points: u64) -> u64 {
    record.create_user(name.into(), points, T0).await.expect("user").user_id
}

fn rejected(error: TransitionError) -> StoreError {
    StoreError::Rejected(error)
}

/// Ledger sums per user equal balances, and no balance is negative (it cannot be: unsigned).
pub async fn assert_books_balance(record: &dyn RecordStore) {
    let dump = record.dump().await.expect("dump");
    let mut sums: BTreeMap<u64, i64> = BTreeMap::new();
    for entry in &dump.ledger {
        *sums.entry(entry.user_id).or_default() += entry.delta;
    }
    for account in &dump.accounts {
        let sum = sums.get(&account.user_id).copied().unwrap_or(0);
        assert_eq!(sum, i64::try_from(account.balance).expect("fits"), "ledger of user {}", account.user_id);
    }
}

contract!(
    async fn a_seat_is_held_once_until_its_hold_expires_and_fences_grow(stores) {
        let record = stores.record.as_ref();
        record.put_schedule(schedule(2, 1)).await.expect("schedule");
        let seats = seat_ids(record).await;
        assert_eq!(seats.len(), 3);
        let (ada, bob) = (user(record, "ada", 0).await, user(record, "bob", 0).await);
        let first = record.try_hold(hold(seats[0], ada), T0).await.expect("first hold");
        assert_eq!((first.status, first.fence, first.expires_at_ms), (ReservationStatus::Held, FenceToken(1), T0 + TTL_MS));
        assert_eq!(first.price_points, 100);
        assert_eq!(
            record.try_hold(hold(seats[0], bob), T0 + TTL_MS - 1).await,
            Err(rejected(TransitionError::SeatUnavailable))
        );
        let second = record.try_hold(hold(seats[0], bob), T0 + TTL_MS).await.expect("hold after expiry");
        assert_eq!(second.fence, FenceToken(2));
        assert_ne!(second.id, first.id);
        let first_now = record.reservation(first.id).await.expect("first");
        assert_eq!((first_now.status, first_now.ended_at_ms), (ReservationStatus::Expired, Some(T0 + TTL_MS)));
        let dump = record.dump().await.expect("dump");
        let fences: Vec<(u64, FenceToken, u64)> =
            dump.fences.iter().map(|fence| (fence.seat_id, fence.fence, fence.reservation_id)).collect();
        assert_eq!(fences, vec![(seats[0], FenceToken(1), first.id), (seats[0], FenceToken(2), second.id)]);
        let kinds: Vec<OutboxKind> = dump.outbox.iter().map(|event| event.kind).collect();
        assert_eq!(
            kinds,
            vec![OutboxKind::ReservationHeld, OutboxKind::ReservationExpired, OutboxKind::ReservationHeld]
        );
        let summary = &record.schedules(T0 + TTL_MS).await.expect("schedules")[0];
        assert_eq!((summary.seats_total, summary.seats_available, summary.seats_sold), (3, 2, 0));
        let held = SeatFilter { status: Some(SeatStatus::Held), ..SeatFilter::default() };
        let page = record.seat_map(1, held, T0 + TTL_MS).await.expect("seat map");
        assert_eq!(page.iter().map(|seat| seat.id).collect::<Vec<_>>(), vec![seats[0]]);
    }
);

contract!(
    async fn unknown_things_are_not_found(stores) {
        let record = stores.record.as_ref();
        record.put_schedule(schedule(1, 0)).await.expect("schedule");
        assert!(matches!(record.put_schedule(schedule(1, 0)).await, Err(StoreError::Invalid { .. })));
        let seat = seat_ids(record).await[0];
        let ada = user(record, "ada", 0).await;
        assert_eq!(record.try_hold(hold(seat, 999), T0).await, Err(StoreError::NotFound { entity: "user", id: 999 }));
        assert_eq!(record.try_hold(hold(999, ada), T0).await, Err(StoreError::NotFound { entity: "seat", id: 999 }));
        assert_eq!(record.reservation(999).await, Err(StoreError::NotFound { entity: "reservation", id: 999 }));
        assert_eq!(record.account(999).await, Err(StoreError::NotFound { entity: "user", id: 999 }));
        assert_eq!(record.schedule(9).await, Err(StoreError::NotFound { entity: "schedule", id: 9 }));
        assert_eq!(
            record.seat_map(9, SeatFilter::default(), T0).await,
            Err(StoreError::NotFound { entity: "schedule", id: 9 })
        );
        // A seat that was never held is still free after those refusals.
        record.try_hold(hold(seat, ada), T0).await.expect("hold");
        let cache = stores.cache.as_ref();
        assert_eq!(cache.join(9, ada, T0).await, Err(StoreError::NotFound { entity: "schedule", id: 9 }));
        assert_eq!(cache.admit(9, T0).await, Err(StoreError::NotFound { entity: "schedule", id: 9 }));
    }
);

contract!(
    async fn existing_users_lists_the_accounts_of_a_range_in_order(stores) {
        let record = stores.record.as_ref();
        let ids = [user(record, "ada", 0).await, user(record, "bob", 0).await, user(record, "cyd", 0).await];
        assert_eq!(record.existing_users(ids[0], 3).await.expect("all three"), ids.to_vec());
        assert_eq!(record.existing_users(ids[1], 1).await.expect("bob alone"), vec![ids[1]]);
        assert_eq!(record.existing_users(ids[2] + 1, 100).await.expect("past the last"), Vec::<u64>::new());
        assert_eq!(record.existing_users(0, 1).await.expect("id 0"), Vec::<u64>::new());
        let max = tcore_engine::store::USER_IDS_PER_READ_MAX;
        assert_eq!(record.existing_users(0, max).await.expect("the most at once"), ids.to_vec());
        assert!(matches!(record.existing_users(0, max + 1).await, Err(StoreError::Invalid { .. })));
    }
);

contract!(
    async fn confirm_charges_once_writes_the_outbox_and_a_second_confirm_changes_nothing(stores) {
        let record = stores.record.as_ref();
        record.put_schedule(schedule(1, 0)).await.expect("schedule");
        let seat = seat_ids(record).await[0];
        let ada = user(record, "ada", 250).await;
        let held = record.try_hold(hold(seat, ada), T0).await.expect("hold");
        let confirmed = record.confirm(held.id, ada, Some("pay-1".into()), T0 + 10).await.expect("confirm");
        assert_eq!(
            (confirmed.status, confirmed.paid_points, confirmed.confirmed_at_ms),
            (ReservationStatus::Confirmed, 100, Some(T0 + 10))
        );
        let again = record.confirm(held.id, ada, Some("pay-2".into()), T0 + 20).await.expect("confirm again");
        assert_eq!(again, confirmed);
        assert_eq!(record.account(ada).await.expect("account").balance, 150);
        let dump = record.dump().await.expect("dump");
        let charges: Vec<_> = dump.ledger.iter().filter(|entry| entry.reason == LedgerReason::Charge).collect();
        assert_eq!(charges.len(), 1);
        assert_eq!((charges[0].delta, charges[0].idempotency_key.as_deref()), (-100, Some("pay-1")));
        let kinds: Vec<OutboxKind> =
            dump.outbox.iter().filter(|e| e.reservation_id == Some(held.id)).map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            vec![OutboxKind::ReservationHeld, OutboxKind::PointsCharged, OutboxKind::ReservationConfirmed]
        );
        // Sold: nobody else can hold it, even long after the hold's time.
        let bob = user(record, "bob", 0).await;
        assert_eq!(
            record.try_hold(hold(seat, bob), T0 + 10 * TTL_MS).await,
            Err(rejected(TransitionError::SeatUnavailable))
        );
        let summary = &record.schedules(T0 + 10 * TTL_MS).await.expect("schedules")[0];
        assert_eq!((summary.seats_available, summary.seats_sold), (0, 1));
        assert_books_balance(record).await;
    }
);

contract!(
    async fn confirm_after_the_hold_expired_is_refused_and_expires_it(stores) {
        let record = stores.record.as_ref();
        record.put_schedule(schedule(1, 0)).await.expect("schedule");
        let seat = seat_ids(record).await[0];
        let ada = user(record, "ada", 500).await;
        let held = record.try_hold(hold(seat, ada), T0).await.expect("hold");
        assert_eq!(
            record.confirm(held.id, ada, None, T0 + TTL_MS).await,
            Err(rejected(TransitionError::HoldExpired { expires_at_ms: T0 + TTL_MS, now_ms: T0 + TTL_MS }))
        );
        assert_eq!(record.reservation(held.id).await.expect("read").status, ReservationStatus::Expired);
        assert_eq!(
            record.confirm(held.id, ada, None, T0 + TTL_MS + 1).await,
            Err(rejected(TransitionError::NotHeld { status: ReservationStatus::Expired }))
        );
        assert_eq!(record.account(ada).await.expect("account").balance, 500);
        let bob = user(record, "bob", 0).await;
        assert_eq!(record.try_hold(hold(seat, bob), T0 + TTL_MS + 1).await.expect("free again").fence, FenceToken(2));
    }
);

contract!(
    async fn insufficient_points_and_strangers_change_nothing(stores) {
        let record = stores.record.as_ref();
        record.put_schedule(schedule(1, 0)).await.expect("schedule");
        let seat = seat_ids(record).await[0];
        let (ada, bob) = (user(record, "ada", 99).await, user(record, "bob", 1_000).await);
        let held = record.try_hold(hold(seat, ada), T0).await.expect("hold");
        assert_eq!(
            record.confirm(held.id, ada, None, T0 + 1).await,
            Err(rejected(TransitionError::InsufficientPoints { balance: 99, needed: 100 }))
        );
        assert_eq!(record.confirm(held.id, bob, None, T0 + 1).await, Err(StoreError::NotOwner));
        assert_eq!(record.cancel(held.id, bob, T0 + 1).await, Err(StoreError::NotOwner));
        let still = record.reservation(held.id).await.expect("read");
        assert_eq!((still.status, still.paid_points), (ReservationStatus::Held, 0));
        assert_eq!(record.account(ada).await.expect("account").balance, 99);
        assert_books_balance(record).await;
    }
);

contract!(
    async fn cancel_refunds_a_confirmed_seat_and_frees_it_for_the_next_holder(stores) {
        let record = stores.record.as_ref();
        record.put_schedule(schedule(1, 0)).await.expect("schedule");
        let seat = seat_ids(record).await[0];
        let (ada, bob) = (user(record, "ada", 300).await, user(record, "bob", 0).await);
        let held = record.try_hold(hold(seat, ada), T0).await.expect("hold");
        record.confirm(held.id, ada, None, T0 + 1).await.expect("confirm");
        let cancelled = record.cancel(held.id, ada, T0 + 2).await.expect("cancel");
        assert_eq!((cancelled.status, cancelled.ended_at_ms), (ReservationStatus::Cancelled, Some(T0 + 2)));
        assert_eq!(record.account(ada).await.expect("account").balance, 300);
        assert_eq!(
            record.cancel(held.id, ada, T0 + 3).await,
            Err(rejected(TransitionError::AlreadyFinal { status: ReservationStatus::Cancelled }))
        );
        let next = record.try_hold(hold(seat, bob), T0 + 3).await.expect("the seat is free");
        assert_eq!(next.fence, FenceToken(2));
        // Cancelling a hold that was never paid refunds nothing.
        record.cancel(next.id, bob, T0 + 4).await.expect("cancel the hold");
        let dump = record.dump().await.expect("dump");
        let reasons: Vec<(u64, LedgerReason, i64)> =
            dump.ledger.iter().map(|entry| (entry.user_id, entry.reason, entry.delta)).collect();
        assert_eq!(
            reasons,
            vec![(ada, LedgerReason::TopUp, 300), (ada, LedgerReason::Charge, -100), (ada, LedgerReason::Refund, 100)]
        );
        let kinds: Vec<OutboxKind> = dump.outbox.iter().map(|event| event.kind).collect();
        assert_eq!(
            kinds,
            vec![
                OutboxKind::ReservationHeld,
                OutboxKind::PointsCharged,
                OutboxKind::ReservationConfirmed,
                OutboxKind::PointsRefunded,
                OutboxKind::ReservationCancelled,
                OutboxKind::ReservationHeld,
                OutboxKind::ReservationCancelled,
            ]
        );
        assert_books_balance(record).await;
    }
);

contract!(
    async fn a_fenced_write_older_than_the_newest_fence_seen_is_refused(stores) {
        let record = stores.record.as_ref();
        record.put_schedule(schedule(1, 0)).await.expect("schedule");
        let seat = seat_ids(record).await[0];
        let ada = user(record, "ada", 0).await;
        let read = record.seat(1, seat, Some(FenceToken(5))).await.expect("fenced read");
        assert_eq!((read.fence_last, read.holder, read.sold), (FenceToken(5), None, false));
        assert_eq!(record.seat(1, seat, Some(FenceToken(3))).await.expect("older read").fence_last, FenceToken(5));
        assert_eq!(
            record.write_hold(hold(seat, ada), WriteGuard::Fenced(FenceToken(4)), T0).await,
            Err(rejected(TransitionError::StaleFence { presented: 4, current: 5 }))
        );
        let written = record.write_hold(hold(seat, ada), WriteGuard::Fenced(FenceToken(5)), T0).await.expect("write");
        assert_eq!(written.fence, FenceToken(5));
        let slot = record.seat(1, seat, None).await.expect("read");
        assert_eq!((slot.holder, slot.fence_last, slot.hold_expires_at_ms), (Some((written.id, FenceToken(5))), FenceToken(5), T0 + TTL_MS));
        assert_eq!(record.seat(1, 999, None).await, Err(StoreError::NotFound { entity: "seat", id: 999 }));
        // An atomic hold after the lock's write goes on from the seat's fence.
        let bob = user(record, "bob", 0).await;
        assert_eq!(record.try_hold(hold(seat, bob), T0 + TTL_MS).await.expect("after expiry").fence, FenceToken(6));
    }
);

contract!(
    async fn expire_holds_frees_only_holds_past_their_time_within_the_limit(stores) {
        let record = stores.record.as_ref();
        record.put_schedule(schedule(4, 0)).await.expect("schedule");
        let seats = seat_ids(record).await;
        let ada = user(record, "ada", 1_000).await;
        let mut held = Vec::new();
        for (index, &seat) in seats.iter().enumerate() {
            held.push(record.try_hold(hold(seat, ada), T0 + index as u64).await.expect("hold"));
        }
        record.confirm(held[0].id, ada, None, T0 + 10).await.expect("confirm");
        assert_eq!(record.expire_holds(T0 + TTL_MS, 10).await.expect("sweep"), 0, "seat 0 is sold, the rest live");
        assert_eq!(record.expire_holds(T0 + TTL_MS + 2, 1).await.expect("sweep"), 1, "the limit holds");
        assert_eq!(record.expire_holds(T0 + TTL_MS + 2, 10).await.expect("sweep"), 1);
        assert_eq!(record.expire_holds(T0 + TTL_MS + 2, 10).await.expect("sweep"), 0);
        let statuses: Vec<ReservationStatus> = {
            let dump = record.dump().await.expect("dump");
            dump.reservations.iter().map(|reservation| reservation.status).collect()
        };
        use ReservationStatus::{Confirmed, Expired, Held};
        assert_eq!(statuses, vec![Confirmed, Expired, Expired, Held]);
        let summary = &record.schedules(T0 + TTL_MS + 2).await.expect("schedules")[0];
        assert_eq!((summary.seats_available, summary.seats_sold), (2, 1));
    }
);

contract!(
    async fn top_ups_count_once_per_key(stores) {
        let record = stores.record.as_ref();
        let (ada, bob) = (user(record, "ada", 10).await, user(record, "bob", 0).await);
        assert_eq!(record.top_up(ada, 5, "k".into(), T0).await.expect("top up").balance, 15);
        assert_eq!(record.top_up(ada, 5, "k".into(), T0 + 1).await.expect("replay").balance, 15);
        assert_eq!(record.top_up(bob, 5, "k".into(), T0).await, Err(rejected(TransitionError::TopUpKeyReused)));
        assert_eq!(
            record.top_up(ada, 0, "zero".into(), T0).await,
            Err(rejected(TransitionError::InvalidAmount { max: 10_000_000 }))
        );
        assert_eq!(record.top_up(999, 5, "ghost".into(), T0).await, Err(StoreError::NotFound { entity: "user", id: 999 }));
        // A refused top-up does not burn its key.
        assert_eq!(record.top_up(ada, 1, "zero".into(), T0).await.expect("top up").balance, 16);
        assert_eq!(record.account(bob).await.expect("bob").balance, 0);
        assert_books_balance(record).await;
    }
);

contract!(
    async fn idempotency_keys_lease_replay_and_refuse_another_request(stores) {
        let record = stores.record.as_ref();
        let response = StoredResponse { status: 201, content_type: "application/json".into(), body: b"{\"a\":1}\n".to_vec() };
        let begin = |key: &str, fingerprint: u8, now_ms: u64| {
            record.idempotency_begin(key.into(), [fingerprint; 32], 1_000, IDEMPOTENCY_TTL_MS, now_ms)
        };
        assert_eq!(begin("k", 1, T0).await, Ok(IdempotencyDecision::Proceed));
        assert_eq!(begin("k", 1, T0 + 999).await, Ok(IdempotencyDecision::InProgress));
        assert_eq!(begin("k", 2, T0 + 10).await, Ok(IdempotencyDecision::Mismatch));
        assert_eq!(begin("k", 1, T0 + 1_000).await, Ok(IdempotencyDecision::Proceed), "the lease lapsed");
        record.idempotency_complete("k".into(), [2; 32], response.clone(), IDEMPOTENCY_TTL_MS, T0).await.expect("not the holder");
        assert_eq!(begin("k", 1, T0 + 1_500).await, Ok(IdempotencyDecision::InProgress));
        record.idempotency_complete("k".into(), [1; 32], response.clone(), IDEMPOTENCY_TTL_MS, T0 + 1_600).await.expect("complete");
        assert_eq!(begin("k", 1, T0 + 99_000).await, Ok(IdempotencyDecision::Replay(response.clone())));
        assert_eq!(begin("k", 3, T0 + 99_000).await, Ok(IdempotencyDecision::Mismatch));
        record.idempotency_release("k".into(), [1; 32]).await.expect("release of a completed key");
        assert_eq!(begin("k", 1, T0 + 99_000).await, Ok(IdempotencyDecision::Replay(response)));
        assert_eq!(begin("r", 1, T0).await, Ok(IdempotencyDecision::Proceed));
        record.idempotency_release("r".into(), [1; 32]).await.expect("release");
        assert_eq!(begin("r", 4, T0 + 1).await, Ok(IdempotencyDecision::Proceed), "a released key is free");
    }
);

contract!(
    async fn a_renewed_idempotency_claim_outlives_its_first_lease_and_an_unrenewed_one_lapses(stores) {
        let record = stores.record.as_ref();
        const LEASE: u64 = 1_000;
        let begin = |key: &str, fingerprint: u8, now_ms: u64| {
            record.idempotency_begin(key.into(), [fingerprint; 32], LEASE, IDEMPOTENCY_TTL_MS, now_ms)
        };
        let renew = |key: &str, fingerprint: u8, now_ms: u64| {
            record.idempotency_renew(key.into(), [fingerprint; 32], LEASE, now_ms)
        };
        // Renewed every third of the lease, a claim stays in progress long past its first lease.
        assert_eq!(begin("kept", 1, T0).await, Ok(IdempotencyDecision::Proceed));
        for at_ms in [T0 + 333, T0 + 666, T0 + 999, T0 + 1_332] {
            assert_eq!(renew("kept", 1, at_ms).await, Ok(true), "renewed at {at_ms}");
        }
        assert_eq!(renew("kept", 1, T0 + 1_332).await, Ok(true), "a renewal that moves nothing still holds");
        let long_after = begin("kept", 1, T0 + 2_000).await;
        assert_eq!(long_after, Ok(IdempotencyDecision::InProgress), "the first lease is long gone");
        assert_eq!(begin("kept", 1, T0 + 2_331).await, Ok(IdempotencyDecision::InProgress));
        // A shorter renewal does not shorten it.
        assert_eq!(record.idempotency_renew("kept".into(), [1; 32], 10, T0 + 2_000).await, Ok(true));
        assert_eq!(begin("kept", 1, T0 + 2_331).await, Ok(IdempotencyDecision::InProgress));
        // Once its holder stops renewing, it lapses a lease after the last renewal, and the
        // next request with the key takes it over.
        assert_eq!(begin("kept", 1, T0 + 2_332).await, Ok(IdempotencyDecision::Proceed), "taken over");
        assert_eq!(begin("kept", 1, T0 + 2_333).await, Ok(IdempotencyDecision::InProgress), "by the new holder");

        // Never renewed: lapsed after one lease, and not revived by a late renewal.
        assert_eq!(begin("lapsed", 1, T0).await, Ok(IdempotencyDecision::Proceed));
        assert_eq!(begin("lapsed", 1, T0 + LEASE - 1).await, Ok(IdempotencyDecision::InProgress));
        assert_eq!(renew("lapsed", 1, T0 + LEASE).await, Ok(false), "a lapsed lease is not revived");
        assert_eq!(begin("lapsed", 1, T0 + LEASE).await, Ok(IdempotencyDecision::Proceed), "the next request proceeds");

        // Another fingerprint's renewal changes nothing.
        assert_eq!(begin("other", 1, T0).await, Ok(IdempotencyDecision::Proceed));
        assert_eq!(renew("other", 2, T0 + 500).await, Ok(false));
        assert_eq!(begin("other", 2, T0 + 600).await, Ok(IdempotencyDecision::Mismatch));
        assert_eq!(begin("other", 1, T0 + LEASE).await, Ok(IdempotencyDecision::Proceed), "lapsed as if never renewed");

        // A completed key stays completed, its response replayed; a released or unknown key
        // stays free.
        let response = StoredResponse { status: 200, content_type: "application/json".into(), body: b"{}".to_vec() };
        assert_eq!(begin("done", 1, T0).await, Ok(IdempotencyDecision::Proceed));
        let ttl_ms = IDEMPOTENCY_TTL_MS;
        record.idempotency_complete("done".into(), [1; 32], response.clone(), ttl_ms, T0 + 10).await.expect("complete");
        assert_eq!(renew("done", 1, T0 + 20).await, Ok(false));
        assert_eq!(begin("done", 1, T0 + 30).await, Ok(IdempotencyDecision::Replay(response.clone())));
        assert_eq!(begin("done", 2, T0 + 30).await, Ok(IdempotencyDecision::Mismatch));
        assert_eq!(begin("freed", 1, T0).await, Ok(IdempotencyDecision::Proceed));
        record.idempotency_release("freed".into(), [1; 32]).await.expect("release");
        assert_eq!(renew("freed", 1, T0 + 10).await, Ok(false));
        assert_eq!(renew("never", 1, T0 + 10).await, Ok(false));
        assert_eq!(begin("freed", 2, T0 + 20).await, Ok(IdempotencyDecision::Proceed), "still free");
        assert_eq!(begin("never", 2, T0 + 20).await, Ok(IdempotencyDecision::Proceed), "still unknown");

        // An expired claim is not renewed, whatever its lease.
        let record_ttl = 5_000;
        let claimed = record.idempotency_begin("old".into(), [1; 32], LEASE, record_ttl, T0).await;
        assert_eq!(claimed, Ok(IdempotencyDecision::Proceed));
        assert_eq!(record.idempotency_renew("old".into(), [1; 32], 10_000, T0 + 900).await, Ok(true));
        assert_eq!(record.idempotency_renew("old".into(), [1; 32], LEASE, T0 + record_ttl).await, Ok(false), "expired");
        assert_eq!(
            record.idempotency_begin("old".into(), [2; 32], LEASE, record_ttl, T0 + record_ttl).await,
            Ok(IdempotencyDecision::Proceed),
            "an expired record counts as never seen"
        );
    }
);

contract!(
    async fn outbox_events_stay_pending_until_marked_sent(stores) {
        let record = stores.record.as_ref();
        let ada = user(record, "ada", 0).await;
        for key in ["k1", "k2", "k3"] {
            record.top_up(ada, 5, key.into(), T0).await.expect("top up");
        }
        let pending = record.outbox_pending(10).await.expect("pending");
        assert_eq!(pending.len(), 3);
        assert!(pending.iter().all(|event| event.kind == OutboxKind::PointsCharged && !event.sent));
        assert_eq!(record.outbox_pending(2).await.expect("pending").len(), 2);
        record.outbox_mark_sent(vec![pending[0].id, pending[2].id]).await.expect("mark");
        let left: Vec<u64> = record.outbox_pending(10).await.expect("pending").iter().map(|e| e.id).collect();
        assert_eq!(left, vec![pending[1].id]);
        record.outbox_mark_sent(vec![]).await.expect("nothing to mark");
        let sent: Vec<bool> = record.dump().await.expect("dump").outbox.iter().map(|e| e.sent).collect();
        assert_eq!(sent, vec![true, false, true]);
    }
);

contract!(
    async fn the_audit_log_returns_the_newest_entries_oldest_first(stores) {
        let record = stores.record.as_ref();
        for index in 0..5_u64 {
            let entry = AuditEntry {
                at_ms: T0 + index,
                node: "engine-1".into(),
                actor: "admin".into(),
                action: "set_hold_ttl".into(),
                target: "hold-ttl".into(),
                before: serde_json::json!({ "ttl_s": index }),
                after: serde_json::json!({ "ttl_s": index + 1, "nested": [1, "two"] }),
                outcome: "applied".into(),
            };
            record.append_audit(entry).await.expect("audit");
        }
        let newest = record.audit(2).await.expect("audit");
        assert_eq!(newest.iter().map(|entry| entry.at_ms).collect::<Vec<_>>(), vec![T0 + 3, T0 + 4]);
        assert_eq!(newest[1].after, serde_json::json!({ "ttl_s": 5, "nested": [1, "two"] }));
    }
);

fn policy(rate_per_s: f64, active_max: u32) -> AdmissionPolicy {
    AdmissionPolicy { rate_per_s, active_max, paused: false, admitted_ttl_ms: 10_000, waiting_idle_timeout_ms: 60_000 }
}

contract!(
    async fn a_line_admits_by_rate_in_fifo_order_within_its_active_max(stores) {
        let cache = stores.cache.as_ref();
        cache.create_line(1, T0, QueueOrder::Fifo, policy(4.0, 5)).await.expect("line");
        cache.create_line(1, T0 + 5, QueueOrder::RandomAtOpen, policy(1.0, 1)).await.expect("again: no change");
        let mut seqs = Vec::new();
        for user_id in 1..=10 {
            seqs.push(cache.join(1, user_id, T0 - 1_000 + user_id).await.expect("join").seq);
        }
        let again = cache.join(1, 2, T0 - 500).await.expect("join again");
        assert_eq!((again.seq, again.position, again.status), (seqs[1], 2, TokenStatus::Waiting));
        let tenth = cache.queue_status(1, seqs[9], T0 - 10).await.expect("status");
        assert_eq!((tenth.position, tenth.eta_s, tenth.order_index), (10, 1 + 3, 9));
        assert_eq!(cache.admit(1, T0).await.expect("admit").admitted_now, 0);
        let report = cache.admit(1, T0 + 1_000).await.expect("admit");
        assert_eq!(
            (report.admitted_now, report.waiting, report.active, report.admitted_total, report.head_order_index),
            (4, 6, 4, 4, 4)
        );
        let first = cache.queue_status(1, seqs[0], T0 + 1_000).await.expect("status");
        assert_eq!((first.status, first.position, first.expires_at_ms), (TokenStatus::Admitted, 0, Some(T0 + 11_000)));
        let fifth = cache.queue_status(1, seqs[4], T0 + 1_000).await.expect("status");
        assert_eq!((fifth.status, fifth.position, fifth.eta_s), (TokenStatus::Waiting, 1, 1));
        let report = cache.admit(1, T0 + 2_000).await.expect("admit");
        assert_eq!((report.admitted_now, report.active), (1, 5), "active max caps admission");
        cache.mark_used(1, seqs[0], T0 + 2_000).await.expect("used");
        assert_eq!(
            cache.mark_used(1, seqs[0], T0 + 2_000).await,
            Err(StoreError::Rejected(TransitionError::TokenNotAdmitted { status: TokenStatus::Used }))
        );
        assert_eq!(
            cache.mark_used(1, seqs[9], T0 + 2_000).await,
            Err(StoreError::Rejected(TransitionError::TokenNotAdmitted { status: TokenStatus::Waiting }))
        );
        assert_eq!(cache.admit(1, T0 + 3_000).await.expect("admit").admitted_now, 1, "a used token frees its slot");
        let admitted: Vec<u64> = cache.admissions().await.expect("admissions").iter().map(|a| a.user_id).collect();
        assert_eq!(admitted, vec![1, 2, 3, 4, 5, 6]);
        let admission = cache.admissions().await.expect("admissions")[0];
        assert_eq!((admission.seq, admission.joined_at_ms, admission.admitted_at_ms), (seqs[0], T0 - 999, T0 + 1_000));
        assert_eq!(cache.queue_status(1, 0, T0).await, Err(StoreError::NotFound { entity: "queue token", id: 0 }));
        assert_eq!(cache.queue_status(1, 99, T0).await, Err(StoreError::NotFound { entity: "queue token", id: 99 }));
    }
);

contract!(
    async fn an_admission_tick_from_the_past_earns_no_credit_twice(stores) {
        let cache = stores.cache.as_ref();
        cache.create_line(1, T0, QueueOrder::Fifo, policy(10.0, 1_000)).await.expect("line");
        for user_id in 1..=50 {
            cache.join(1, user_id, T0 - 1_000 + user_id).await.expect("join");
        }
        assert_eq!(cache.admit(1, T0 + 1_000).await.expect("admit").admitted_now, 10, "a second's credit");
        // Another node's tick, read from its clock a little earlier, arrives after.
        assert_eq!(cache.admit(1, T0 + 500).await.expect("admit").admitted_now, 0);
        // Half a second after the newest tick: half a second's credit, not the 1 s since the older one.
        assert_eq!(cache.admit(1, T0 + 1_500).await.expect("admit").admitted_now, 5);
    }
);

contract!(
    async fn admitted_tokens_expire_and_waiters_who_stop_polling_are_skipped(stores) {
        let cache = stores.cache.as_ref();
        cache.create_line(1, T0, QueueOrder::Fifo, policy(100.0, 1)).await.expect("line");
        let seqs: Vec<u64> =
            futures_join(cache, &[1, 2, 3], T0 - 100).await;
        cache.admit(1, T0).await.expect("admit");
        assert_eq!(cache.admit(1, T0 + 1_000).await.expect("admit").admitted_now, 1);
        // User 2 stops polling; user 3 keeps polling.
        cache.queue_status(1, seqs[2], T0 + 65_000).await.expect("poll");
        let first = cache.queue_status(1, seqs[0], T0 + 11_000).await.expect("status");
        assert_eq!(first.status, TokenStatus::Expired);
        let report = cache.admit(1, T0 + 65_000).await.expect("admit");
        assert_eq!((report.admitted_now, report.active, report.waiting), (1, 1, 0));
        assert_eq!(cache.queue_status(1, seqs[1], T0 + 65_000).await.expect("status").status, TokenStatus::Expired);
        assert_eq!(cache.queue_status(1, seqs[2], T0 + 65_000).await.expect("status").status, TokenStatus::Admitted);
        // An expired user who joins again gets a new place at the back.
        let rejoined = cache.join(1, 1, T0 + 66_000).await.expect("join");
        assert_ne!(rejoined.seq, seqs[0]);
        assert_eq!((rejoined.status, rejoined.position), (TokenStatus::Waiting, 1));
    }
);

async fn futures_join(cache: &dyn tcore_engine::store::CacheStore, users: &[u64], now_ms: u64) -> Vec<u64> {
    let mut seqs = Vec::new();
    for &user_id in users {
        seqs.push(cache.join(1, user_id, now_ms).await.expect("join").seq);
    }
    seqs
}

contract!(
    async fn a_paused_line_admits_nobody_and_its_policy_can_be_replaced(stores) {
        let cache = stores.cache.as_ref();
        cache.create_line(1, T0, QueueOrder::Fifo, policy(5.0, 100)).await.expect("line");
        futures_join(cache, &(1..=10).collect::<Vec<_>>(), T0 - 1).await;
        let paused = AdmissionPolicy { paused: true, rate_per_s: 2.5, ..policy(5.0, 100) };
        assert_eq!(cache.set_admission_policy(1, paused).await.expect("set"), policy(5.0, 100));
        assert_eq!(cache.admission_policy(1).await.expect("read"), paused);
        cache.admit(1, T0).await.expect("admit");
        assert_eq!(cache.admit(1, T0 + 4_000).await.expect("admit").admitted_now, 0);
        cache.set_admission_policy(1, policy(2.5, 100)).await.expect("resume");
        assert_eq!(cache.admit(1, T0 + 5_000).await.expect("admit").admitted_now, 2, "no credit banked while paused");
        assert_eq!(cache.admit(1, T0 + 5_400).await.expect("admit").admitted_now, 1, "fractional credit carries over");
        assert_eq!(cache.admission_policy(9).await, Err(StoreError::NotFound { entity: "schedule", id: 9 }));
        assert_eq!(
            cache.set_admission_policy(9, paused).await,
            Err(StoreError::NotFound { entity: "schedule", id: 9 })
        );
    }
);

contract!(
    async fn random_at_open_shuffles_only_those_who_queued_before_the_opening(stores) {
        let cache = stores.cache.as_ref();
        cache.create_line(1, T0, QueueOrder::RandomAtOpen, policy(1_000.0, 1_000)).await.expect("line");
        futures_join(cache, &(1..=50).collect::<Vec<_>>(), T0 - 1).await;
        cache.join(1, 51, T0 + 500).await.expect("late join");
        cache.admit(1, T0).await.expect("admit");
        let report = cache.admit(1, T0 + 1_000).await.expect("admit");
        assert_eq!(report.admitted_now, 51);
        let admitted: Vec<u64> = cache.admissions().await.expect("admissions").iter().map(|a| a.user_id).collect();
        let mut early = admitted[..50].to_vec();
        assert_ne!(early, (1..=50).collect::<Vec<_>>(), "early arrivals are shuffled");
        early.sort_unstable();
        assert_eq!(early, (1..=50).collect::<Vec<_>>(), "everyone early is admitted once");
        assert_eq!(admitted[50], 51, "the late arrival comes after the shuffled block");
    }
);

contract!(
    async fn a_lock_is_exclusive_until_its_ttl_and_its_fence_grows(stores) {
        let cache = stores.cache.as_ref();
        let first = cache.acquire_lock("seat:1:1".into(), 100, T0).await.expect("store").expect("free");
        assert_eq!((first.fence, first.expires_at_ms), (FenceToken(1), T0 + 100));
        assert_eq!(cache.acquire_lock("seat:1:1".into(), 100, T0 + 99).await.expect("store"), None);
        assert!(cache.acquire_lock("seat:1:2".into(), 100, T0 + 99).await.expect("store").is_some(), "other key");
        let second = cache.acquire_lock("seat:1:1".into(), 100, T0 + 100).await.expect("store").expect("expired");
        assert_eq!(second.fence, FenceToken(2));
        cache.release_lock("seat:1:1".into(), first.fence).await.expect("stale release");
        assert_eq!(cache.acquire_lock("seat:1:1".into(), 100, T0 + 150).await.expect("store"), None);
        cache.release_lock("seat:1:1".into(), second.fence).await.expect("release");
        let third = cache.acquire_lock("seat:1:1".into(), 100, T0 + 150).await.expect("store").expect("released");
        assert_eq!(third.fence, FenceToken(3));
    }
);

contract!(
    async fn a_lock_is_renewed_only_by_its_live_holder(stores) {
        let cache = stores.cache.as_ref();
        let key = || "seat:1:2".to_owned();
        let first = cache.acquire_lock(key(), 100, T0).await.expect("store").expect("free");
        let renewed = cache.renew_lock(key(), first.fence, 100, T0 + 80).await.expect("store").expect("live holder");
        assert_eq!((renewed.fence, renewed.expires_at_ms), (first.fence, T0 + 180));
        assert_eq!(cache.acquire_lock(key(), 100, T0 + 150).await.expect("store"), None, "renewed past its first TTL");
        assert_eq!(cache.renew_lock(key(), FenceToken(first.fence.0 + 1), 100, T0 + 150).await.expect("store"), None);
        assert_eq!(cache.renew_lock(key(), first.fence, 100, T0 + 180).await.expect("store"), None, "ran out");
        let second = cache.acquire_lock(key(), 100, T0 + 180).await.expect("store").expect("ran out");
        assert!(second.fence > first.fence);
        assert_eq!(cache.renew_lock(key(), first.fence, 100, T0 + 190).await.expect("store"), None, "taken over");
        cache.release_lock(key(), second.fence).await.expect("release");
        assert_eq!(cache.renew_lock(key(), second.fence, 100, T0 + 200).await.expect("store"), None, "released");
        assert_eq!(cache.renew_lock("seat:never".into(), second.fence, 100, T0).await.expect("store"), None);
    }
);

contract!(
    async fn two_thousand_concurrent_holds_from_a_hundred_tasks_grant_one_per_seat(stores) {
        const SEATS: u64 = 50;
        let record = Arc::clone(&stores.record);
        record.put_schedule(schedule(SEATS as u32, 0)).await.expect("schedule");
        let seats = seat_ids(record.as_ref()).await;
        let mut users = Vec::new();
        for index in 0..100 {
            users.push(user(record.as_ref(), &format!("user-{index}"), 0).await);
        }
        let tasks: Vec<_> = users
            .iter()
            .enumerate()
            .map(|(index, &user_id)| {
                let (record, seats) = (Arc::clone(&record), seats.clone());
                tokio::spawn(async move {
                    let mut granted = 0;
                    for attempt in 0..20 {
                        let seat = seats[(index * 7 + attempt * 3) % seats.len()];
                        match record.try_hold(hold(seat, user_id), T0 + 1).await {
                            Ok(_) => granted += 1,
                            Err(StoreError::Rejected(TransitionError::SeatUnavailable)) => {}
                            Err(other) => panic!("unexpected refusal: {other}"),
                        }
                    }
                    granted
                })
            })
            .collect();
        let mut granted = 0;
        for task in tasks {
            granted += task.await.expect("task");
        }
        assert_eq!(granted, SEATS, "one hold per seat");
        let dump = record.dump().await.expect("dump");
        let mut held: Vec<u64> = dump.reservations.iter().map(|reservation| reservation.seat_id).collect();
        held.sort_unstable();
        assert_eq!(held, seats, "every seat held once, no reservation beside");
        assert!(dump.fences.iter().all(|fence| fence.fence == FenceToken(1)));
    }
);

contract!(
    async fn holds_sent_together_are_answered_each_as_if_alone(stores) {
        let record = Arc::clone(&stores.record);
        record.put_schedule(schedule(4, 0)).await.expect("schedule");
        let seats = seat_ids(record.as_ref()).await;
        let (ada, bob) = (user(record.as_ref(), "ada", 0).await, user(record.as_ref(), "bob", 0).await);
        let lapsed = record.try_hold(HoldRequest { hold_ttl_ms: 10, ..hold(seats[0], ada) }, T0).await.expect("hold");
        let (record_ref, at_ms) = (record.as_ref(), T0 + 100);
        let answers = tokio::join!(
            record_ref.try_hold(hold(seats[0], bob), at_ms),
            record_ref.try_hold(hold(seats[1], ada), at_ms),
            record_ref.try_hold(hold(seats[1], bob), at_ms),
            record_ref.try_hold(hold(seats[2], 999_999), at_ms),
            record_ref.try_hold(hold(999_999, ada), at_ms),
            record_ref.try_hold(hold(seats[3], bob), at_ms),
        );
        let over_lapsed = answers.0.expect("a lapsed hold's seat is free");
        assert_eq!((over_lapsed.seat_id, over_lapsed.user_id, over_lapsed.fence), (seats[0], bob, FenceToken(2)));
        let first = answers.1.expect("free seat");
        assert_eq!((first.seat_id, first.user_id), (seats[1], ada));
        assert_eq!(answers.2.expect_err("same seat"), rejected(TransitionError::SeatUnavailable));
        assert!(matches!(answers.3, Err(StoreError::NotFound { entity: "user", id: 999_999 })), "{:?}", answers.3);
        assert!(matches!(answers.4, Err(StoreError::NotFound { entity: "seat", id: 999_999 })), "{:?}", answers.4);
        let last = answers.5.expect("free seat");
        assert_eq!((last.seat_id, last.user_id, last.fence), (seats[3], bob, FenceToken(1)));
        let ids = [over_lapsed.id, first.id, last.id];
        assert!(ids.iter().all(|&id| id != lapsed.id) && ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2]);

        let dump = record.dump().await.expect("dump");
        let status = |id: u64| dump.reservations.iter().find(|reservation| reservation.id == id).map(|r| r.status);
        assert_eq!(status(lapsed.id), Some(ReservationStatus::Expired));
        for reservation in [&over_lapsed, &first, &last] {
            let stored = dump.reservations.iter().find(|stored| stored.id == reservation.id).expect("stored");
            assert_eq!(stored, reservation, "the answer is what the store keeps");
        }
        assert_eq!(dump.reservations.len(), 4, "nothing written for the refused holds");
        let held_events = dump.outbox.iter().filter(|event| event.kind == OutboxKind::ReservationHeld).count();
        assert_eq!(held_events, 4);
        let fences: Vec<(u64, FenceToken, u64)> =
            dump.fences.iter().map(|fence| (fence.seat_id, fence.fence, fence.reservation_id)).collect();
        assert!(fences.contains(&(seats[0], FenceToken(2), over_lapsed.id)));
        assert!(fences.contains(&(seats[3], FenceToken(1), last.id)));
        assert_eq!(fences.len(), 4);
        let map = record.seat_map(1, SeatFilter::default(), at_ms).await.expect("seat map");
        let held: Vec<bool> = map.iter().map(|seat| seat.status == SeatStatus::Held).collect();
        assert_eq!(held, [true, true, false, true]);
        if let Some(mariadb) = &stores.mariadb {
            let stats = mariadb.hold_batch_stats();
            assert_eq!(stats.rolled_back, 0, "every batch committed as written: {stats:?}");
            assert!(stats.holds >= 5, "the first hold and those the seat gate let through: {stats:?}");
        }
    }
);

contract!(
    async fn concurrent_confirms_of_one_hold_charge_once(stores) {
        let record = Arc::clone(&stores.record);
        record.put_schedule(schedule(1, 0)).await.expect("schedule");
        let seat = seat_ids(record.as_ref()).await[0];
        let ada = user(record.as_ref(), "ada", 1_000).await;
        let held = record.try_hold(hold(seat, ada), T0).await.expect("hold");
        let confirms: Vec<_> = (0..20)
            .map(|index| {
                let record = Arc::clone(&record);
                tokio::spawn(async move { record.confirm(held.id, ada, Some(format!("pay-{index}")), T0 + 1).await })
            })
            .collect();
        for confirm in confirms {
            assert_eq!(confirm.await.expect("task").expect("confirmed").status, ReservationStatus::Confirmed);
        }
        assert_eq!(record.account(ada).await.expect("account").balance, 900);
        let dump = record.dump().await.expect("dump");
        assert_eq!(dump.ledger.iter().filter(|entry| entry.reason == LedgerReason::Charge).count(), 1);
        assert_books_balance(record.as_ref()).await;
    }
);

contract!(
    async fn sweepers_of_several_nodes_expire_each_hold_once(stores) {
        let record = Arc::clone(&stores.record);
        record.put_schedule(schedule(40, 0)).await.expect("schedule");
        let ada = user(record.as_ref(), "ada", 0).await;
        for seat in seat_ids(record.as_ref()).await {
            record.try_hold(hold(seat, ada), T0).await.expect("hold");
        }
        let sweepers: Vec<_> = (0..4)
            .map(|_| {
                let record = Arc::clone(&record);
                tokio::spawn(async move {
                    let mut expired = 0;
                    for _ in 0..10 {
                        expired += record.expire_holds(T0 + TTL_MS, 7).await.expect("sweep");
                    }
                    expired
                })
            })
            .collect();
        let mut expired = 0;
        for sweeper in sweepers {
            expired += sweeper.await.expect("task");
        }
        assert_eq!(expired, 40, "each hold counted by exactly one sweeper");
        let dump = record.dump().await.expect("dump");
        assert!(dump.reservations.iter().all(|reservation| reservation.status == ReservationStatus::Expired));
        let events = dump.outbox.iter().filter(|event| event.kind == OutboxKind::ReservationExpired).count();
        assert_eq!(events, 40, "one expiry event per hold");
    }
);

/// A hold with a seat limit of `max`.
fn limited(seat_id: u64, user_id: u64, max: u32) -> HoldRequest {
    HoldRequest { seats_per_user_max: max, ..hold(seat_id, user_id) }
}

contract!(
    async fn ten_holds_by_one_user_at_once_grant_exactly_the_seat_limit(stores) {
        let record = Arc::clone(&stores.record);
        record.put_schedule(schedule(10, 0)).await.expect("schedule");
        let seats = seat_ids(record.as_ref()).await;
        let ada = user(record.as_ref(), "ada", 0).await;
        let attempts: Vec<_> = seats
            .iter()
            .map(|&seat| {
                let record = Arc::clone(&record);
                tokio::spawn(async move { record.try_hold(limited(seat, ada, 4), T0).await })
            })
            .collect();
        let (mut granted, mut refused) = (Vec::new(), 0);
        for attempt in attempts {
            match attempt.await.expect("task") {
                Ok(reservation) => granted.push(reservation.seat_id),
                Err(error) => {
                    assert_eq!(error, rejected(TransitionError::SeatLimitReached { max: 4 }));
                    refused += 1;
                }
            }
        }
        assert_eq!((granted.len(), refused), (4, 6), "exactly the limit ({})", stores.backend);
        let dump = record.dump().await.expect("dump");
        assert_eq!(dump.reservations.len(), 4, "nothing written for the refused holds");
        // A seat refused for the limit is free for someone else at once: no gate stays closed.
        let bob = user(record.as_ref(), "bob", 0).await;
        for seat in seats.iter().filter(|seat| !granted.contains(seat)) {
            record.try_hold(limited(*seat, bob, 10), T0 + 1).await.expect("free for bob");
        }
    }
);

contract!(
    async fn cancelled_and_expired_reservations_free_a_place_under_the_seat_limit_and_bought_ones_do_not(stores) {
        let record = stores.record.as_ref();
        record.put_schedule(schedule(8, 0)).await.expect("schedule");
        let seats = seat_ids(record).await;
        let ada = user(record, "ada", 1_000).await;
        let at_limit = || rejected(TransitionError::SeatLimitReached { max: 2 });
        let first = record.try_hold(limited(seats[0], ada, 2), T0).await.expect("first");
        let second = record.try_hold(limited(seats[1], ada, 2), T0 + 1).await.expect("second");
        assert_eq!(record.try_hold(limited(seats[2], ada, 2), T0 + 2).await, Err(at_limit()));
        // The limit travels with each hold: a higher one lets this hold through.
        let third = record.try_hold(limited(seats[2], ada, 3), T0 + 3).await.expect("under a limit of 3");
        record.cancel(third.id, ada, T0 + 4).await.expect("cancel");
        assert_eq!(record.try_hold(limited(seats[3], ada, 2), T0 + 5).await, Err(at_limit()));
        record.cancel(first.id, ada, T0 + 6).await.expect("cancel");
        let fourth = record.try_hold(limited(seats[3], ada, 2), T0 + 7).await.expect("a cancelled hold frees a place");
        // The lock modes' write is held to the same limit.
        let guard = WriteGuard::Fenced(FenceToken(9));
        assert_eq!(record.write_hold(limited(seats[4], ada, 2), guard, T0 + 8).await, Err(at_limit()));
        // `second` runs out at T0 + 1 + TTL: a place is free then, swept or not.
        assert_eq!(record.try_hold(limited(seats[4], ada, 2), T0 + TTL_MS).await, Err(at_limit()));
        let fifth = record.try_hold(limited(seats[4], ada, 2), T0 + 1 + TTL_MS).await.expect("an expired hold frees a place");
        assert_eq!(record.reservation(second.id).await.expect("read").status, ReservationStatus::Held, "not swept");
        // Bought seats count for as long as they are bought.
        record.confirm(fourth.id, ada, None, T0 + 2 + TTL_MS).await.expect("confirm");
        record.confirm(fifth.id, ada, None, T0 + 2 + TTL_MS).await.expect("confirm");
        assert_eq!(record.try_hold(limited(seats[5], ada, 2), T0 + 100 * TTL_MS).await, Err(at_limit()));
        record.cancel(fourth.id, ada, T0 + 100 * TTL_MS).await.expect("cancel a bought seat");
        record.try_hold(limited(seats[5], ada, 2), T0 + 100 * TTL_MS + 1).await.expect("a refund frees a place");
        // Another user's seats are counted apart.
        let bob = user(record, "bob", 0).await;
        record.try_hold(limited(seats[6], bob, 1), T0 + 100 * TTL_MS + 1).await.expect("bob's own limit");
        assert_books_balance(record).await;
    }
);

contract!(
    async fn expired_idempotency_records_count_as_never_seen_and_are_purged(stores) {
        let record = stores.record.as_ref();
        const TTL: u64 = 10_000;
        let response = StoredResponse { status: 201, content_type: "application/json".into(), body: b"{}".to_vec() };
        let begin = |key: &str, fingerprint: u8, now_ms: u64| {
            record.idempotency_begin(key.into(), [fingerprint; 32], 1_000, TTL, now_ms)
        };
        let complete = |key: &str, now_ms: u64| {
            record.idempotency_complete(key.into(), [1; 32], response.clone(), TTL, now_ms)
        };
        for (key, at_ms) in [("old-1", T0), ("old-2", T0 + 1), ("old-3", T0 + 2), ("young", T0 + 5_000)] {
            assert_eq!(begin(key, 1, at_ms).await, Ok(IdempotencyDecision::Proceed));
            complete(key, at_ms + 1).await.expect("complete");
        }
        assert_eq!(begin("old-1", 1, T0 + TTL).await, Ok(IdempotencyDecision::Replay(response.clone())), "still kept");
        // Past its expiry a record counts as none even before a purge, whatever the request.
        assert_eq!(begin("old-1", 2, T0 + 1 + TTL).await, Ok(IdempotencyDecision::Proceed), "runs anew");
        assert_eq!(begin("old-1", 2, T0 + 2 + TTL).await, Ok(IdempotencyDecision::InProgress), "claimed anew");
        assert_eq!(record.purge_idempotency(T0 + 3 + TTL, 1).await, Ok(1), "the limit holds");
        assert_eq!(record.purge_idempotency(T0 + 3 + TTL, 10).await, Ok(1), "old-1 was claimed again");
        assert_eq!(record.purge_idempotency(T0 + 3 + TTL, 10).await, Ok(0));
        assert_eq!(begin("old-2", 2, T0 + 4 + TTL).await, Ok(IdempotencyDecision::Proceed), "purged: never seen");
        assert_eq!(begin("young", 1, T0 + 4 + TTL).await, Ok(IdempotencyDecision::Replay(response.clone())));
        assert_eq!(begin("young", 3, T0 + 4 + TTL).await, Ok(IdempotencyDecision::Mismatch));
        assert_eq!(begin("old-1", 2, T0 + 4 + TTL).await, Ok(IdempotencyDecision::InProgress), "not purged");
    }
);

contract!(
    async fn idempotency_purges_of_several_nodes_delete_each_record_once(stores) {
        let record = Arc::clone(&stores.record);
        let response = StoredResponse { status: 200, content_type: "application/json".into(), body: b"{}".to_vec() };
        for index in 0..50 {
            let key = format!("k-{index}");
            record.idempotency_begin(key.clone(), [1; 32], 1_000, 1_000, T0).await.expect("begin");
            record.idempotency_complete(key, [1; 32], response.clone(), 1_000, T0).await.expect("complete");
        }
        let purgers: Vec<_> = (0..4)
            .map(|_| {
                let record = Arc::clone(&record);
                tokio::spawn(async move {
                    let mut purged = 0;
                    for _ in 0..10 {
                        purged += record.purge_idempotency(T0 + 1_000, 7).await.expect("purge");
                    }
                    purged
                })
            })
            .collect();
        let mut purged = 0;
        for purger in purgers {
            purged += purger.await.expect("task");
        }
        assert_eq!(purged, 50, "each record deleted by exactly one purge");
    }
);
