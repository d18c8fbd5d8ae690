//! Two engine nodes on one pair of stores, as `serve` runs them side by side: thousands of
//! holds and confirms from both at once never sell a seat twice, on every backend.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use tcore_engine::clock::{ManualClock, TokioClock};
use tcore_engine::config::{EngineConfig, HoldMode, RateLimits};
use tcore_engine::domain::{FenceToken, OutboxKind, ReservationStatus, TransitionError};
use tcore_engine::faults::NoFaults;
use tcore_engine::store::{HoldRequest, RecordStore, SeatFilter, StoreError};
use tcore_engine::{Engine, EngineError, EngineParts};

use crate::contract;
use crate::contract::assert_books_balance;
use crate::hold_modes::PauseFirstHolders;
use crate::services::Stores;
use crate::support::{
    START_MS, config, oneshot_peer_trusted, schedule, session, session_of, two_admitted_for_one_seat,
};

/// Engine nodes named `engine-1`, `engine-2`, ... on `stores`, sharing one clock.
pub fn nodes(stores: &Stores, count: usize, config: &EngineConfig, clock: &ManualClock) -> Vec<Arc<Engine>> {
    (1..=count)
        .map(|index| {
            Engine::new(EngineParts {
                config: EngineConfig { node: format!("engine-{index}"), ..config.clone() },
                clock: Arc::new(clock.clone()),
                record: Arc::clone(&stores.record),
                cache: Arc::clone(&stores.cache),
                faults: Arc::new(NoFaults),
            })
            .unwrap_or_else(|error| panic!("test config is valid: {error}"))
        })
        .collect()
}

const SEATS: u64 = 20;
const USERS: usize = 100;
const ATTEMPTS_PER_USER: usize = 20;

/// Every user tries every seat in its own order until it gets one, alternating nodes, and pays
/// at the other node. Then the books are audited.
async fn race_two_nodes(stores: Stores, mode: HoldMode) {
    let clock = ManualClock::starting_at_ms(START_MS);
    let nodes = nodes(&stores, 2, &config(mode), &clock);
    nodes[0].add_schedule(schedule(START_MS, SEATS as u32)).await.expect("schedule");
    let mut users = Vec::new();
    for index in 0..USERS {
        let node = &nodes[index % 2];
        let user = node.open_account(format!("user-{index}"), 1_000).await.expect("user");
        users.push(node.join_queue(session(user.user_id), 1).await.expect("join").token);
    }
    clock.advance(Duration::from_secs(1));
    nodes[1].tick_admission().await.expect("tick");
    let tasks: Vec<_> = users
        .into_iter()
        .enumerate()
        .map(|(index, token)| {
            let nodes = nodes.clone();
            tokio::spawn(async move {
                // A token buys one seat: its user stops after paying.
                let mut confirmed = 0;
                for attempt in 0..ATTEMPTS_PER_USER {
                    if confirmed > 0 {
                        break;
                    }
                    let seat = ((index * 7 + attempt * 3) as u64 % SEATS) + 1;
                    let (holder, payer) = (&nodes[attempt % 2], &nodes[(attempt + 1) % 2]);
                    match holder.hold(session_of(&token), Some(&token), 1, seat).await {
                        Ok(reservation) => {
                            payer
                                .confirm(session_of(&token), Some(&token), reservation.id, None)
                                .await
                                .expect("confirm");
                            confirmed += 1;
                        }
                        Err(EngineError::SeatTaken | EngineError::SeatLocked) => {}
                        Err(other) => panic!("unexpected refusal: {other}"),
                    }
                }
                confirmed
            })
        })
        .collect();
    let mut confirmed = 0;
    for task in tasks {
        confirmed += task.await.expect("task");
    }
    assert_eq!(confirmed, SEATS, "every seat sold once ({})", stores.backend);
    audit(&stores).await;
}

/// At most one confirmed reservation per seat, ledgers that sum to balances, one charge per
/// confirmation, and an outbox event for every confirmation.
pub async fn audit(stores: &Stores) {
    let dump = stores.record.dump().await.expect("dump");
    let mut confirmed_per_seat: BTreeMap<u64, u32> = BTreeMap::new();
    for reservation in dump.reservations.iter().filter(|r| r.status == ReservationStatus::Confirmed) {
        *confirmed_per_seat.entry(reservation.seat_id).or_default() += 1;
        let events = dump
            .outbox
            .iter()
            .filter(|event| {
                event.reservation_id == Some(reservation.id) && event.kind == OutboxKind::ReservationConfirmed
            })
            .count();
        assert_eq!(events, 1, "reservation {} has its confirmation event", reservation.id);
        let charges =
            dump.ledger.iter().filter(|entry| entry.reservation_id == Some(reservation.id) && entry.delta < 0);
        assert_eq!(charges.count(), 1, "reservation {} is charged once", reservation.id);
    }
    assert!(confirmed_per_seat.values().all(|&count| count == 1), "a seat was sold twice: {confirmed_per_seat:?}");
    assert_books_balance(stores.record.as_ref()).await;
}

contract!(
    async fn two_nodes_racing_atomic_holds_and_confirms_sell_each_seat_once(stores) {
        race_two_nodes(stores, HoldMode::Atomic).await;
    }
);

contract!(
    async fn two_nodes_racing_fenced_lock_holds_and_confirms_sell_each_seat_once(stores) {
        race_two_nodes(stores, HoldMode::FencedLock).await;
    }
);

contract!(
    async fn a_fenced_lock_holder_paused_past_its_ttl_cannot_overwrite_the_next_holder(stores) {
        // Real time: the first holder sleeps 1.5 s at `hold.after_check` with a 200 ms lock.
        let clock = Arc::new(TokioClock::new(START_MS));
        let config = EngineConfig { lock_ttl_ms: 200, ..config(HoldMode::FencedLock) };
        let faults =
            Arc::new(PauseFirstHolders { pause: Duration::from_millis(1_500), holders: AtomicU32::new(1) });
        let engine = Engine::new(EngineParts {
            config,
            clock,
            record: Arc::clone(&stores.record),
            cache: Arc::clone(&stores.cache),
            faults,
        })
        .unwrap_or_else(|error| panic!("test config is valid: {error}"));
        let (token_a, token_b) = two_admitted_for_one_seat(&engine, Duration::from_millis(20)).await;
        let slow_engine = Arc::clone(&engine);
        let slow = tokio::spawn(async move { slow_engine.hold(session_of(&token_a), Some(&token_a), 1, 1).await });
        tokio::time::sleep(Duration::from_millis(400)).await;
        let taken = engine.hold(session_of(&token_b), Some(&token_b), 1, 1).await.expect("the next holder takes the seat");
        engine.confirm(session_of(&token_b), Some(&token_b), taken.id, None).await.expect("and pays");
        let stale = slow.await.expect("task");
        assert!(
            matches!(stale, Err(EngineError::Rejected(TransitionError::StaleFence { .. }))),
            "the paused holder's write is stale: {stale:?}"
        );
        let dump = stores.record.dump().await.expect("dump");
        let confirmed = dump.reservations.iter().filter(|r| r.status == ReservationStatus::Confirmed).count();
        assert_eq!(confirmed, 1);
        let fences: Vec<FenceToken> = dump.fences.iter().map(|fence| fence.fence).collect();
        assert_eq!(fences, vec![FenceToken(2)]);
    }
);

/// `GET /v1/schedules` from one IP, alternating between the nodes' routers; the statuses.
async fn alternate_schedule_reads(routers: &[axum::Router], count: usize) -> Vec<u16> {
    use tower::ServiceExt;
    let mut statuses = Vec::new();
    for index in 0..count {
        let request = axum::http::Request::get("/v1/schedules")
            .header("x-forwarded-for", "198.51.100.7")
            .body(axum::body::Body::empty())
            .expect("request");
        let response = routers[index % routers.len()].clone().oneshot(request).await.expect("infallible");
        statuses.push(response.status().as_u16());
    }
    statuses
}

contract!(
    async fn shared_rate_limits_hold_across_nodes_and_own_limits_do_not(stores) {
        let clock = ManualClock::starting_at_ms(START_MS);
        let limits = RateLimits { per_ip_per_s: 2, per_token_per_s: 100, burst: 4 };
        let own = EngineConfig { rate_limits: limits, trusted_proxies: oneshot_peer_trusted(), ..config(HoldMode::Atomic) };
        let routers = |config: &EngineConfig| -> Vec<axum::Router> {
            nodes(&stores, 2, config, &clock).into_iter().map(tcore_engine::app).collect()
        };

        let apart = alternate_schedule_reads(&routers(&own), 10).await;
        assert_eq!(apart.iter().filter(|&&status| status == 200).count(), 8, "a burst per node: {apart:?}");

        let shared = EngineConfig { rate_limits_shared: true, ..own.clone() };
        let together = routers(&shared);
        let statuses = alternate_schedule_reads(&together, 6).await;
        assert_eq!(statuses, [200, 200, 200, 200, 429, 429], "one burst for both nodes");
        clock.advance(Duration::from_millis(500));
        assert_eq!(alternate_schedule_reads(&together, 2).await, [200, 429], "one refill at 2 a second");
    }
);

/// Seat hints: a node refuses, without asking Redis, a seat it saw closed, for at most the
/// hint's lifetime and never past the end of the hold that closed it; a seat opened at the node
/// itself is forgotten there at once. The database judges every attempt that gets past.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seat_hints_refuse_only_what_a_node_saw_closed_and_never_past_the_hold() {
    let Some(stores) = Stores::redis_mariadb().await else { return };
    let (redis, mariadb) = (stores.redis.clone().expect("redis"), stores.mariadb.clone().expect("mariadb"));
    let lifetime_ms = 10_000;
    let gate_a = redis.seat_gate().with_hints(Duration::from_millis(lifetime_ms));
    let gate_b = redis.seat_gate().with_hints(Duration::from_millis(lifetime_ms));
    let (node_a, node_b) = (mariadb.clone().with_seat_gate(gate_a.clone()), mariadb.with_seat_gate(gate_b.clone()));
    node_a.put_schedule(schedule(START_MS, 3)).await.expect("schedule");
    let seats: Vec<u64> =
        node_a.seat_map(1, SeatFilter::default(), START_MS).await.expect("seats").iter().map(|seat| seat.id).collect();
    let ada = node_a.create_user("ada".into(), 500, START_MS).await.expect("ada").user_id;
    let bob = node_a.create_user("bob".into(), 500, START_MS).await.expect("bob").user_id;
    let hold = |user_id, seat_id, hold_ttl_ms| HoldRequest {
        schedule_id: 1,
        seat_id,
        user_id,
        hold_ttl_ms,
        node: "n".into(),
        seats_per_user_max: 4,
    };
    let refused =
        |result: Result<_, StoreError>| matches!(result, Err(StoreError::Rejected(TransitionError::SeatUnavailable)));

    // Ada holds the first seat at A; Bob is refused at B by the shared gate, and B learns it.
    let t0 = START_MS;
    let first = node_a.try_hold(hold(ada, seats[0], 60_000), t0).await.expect("ada holds");
    assert!(refused(node_b.try_hold(hold(bob, seats[0], 60_000), t0 + 1).await));
    assert_eq!(gate_b.hints_kept(), 1);
    // Ada lets it go at A. B, which saw it closed, refuses it for the hint's lifetime...
    node_a.cancel(first.id, ada, t0 + 2).await.expect("cancel");
    assert!(refused(node_b.try_hold(hold(bob, seats[0], 60_000), t0 + 3).await), "B's hint still stands");
    // ... and no longer.
    let bobs = node_b.try_hold(hold(bob, seats[0], 60_000), t0 + 1 + lifetime_ms).await.expect("bob holds at B");
    assert_eq!(bobs.seat_id, seats[0]);

    // A seat opened at A is forgotten at A at once.
    let second = node_a.try_hold(hold(ada, seats[1], 60_000), t0 + 20_000).await.expect("ada holds");
    node_a.cancel(second.id, ada, t0 + 20_001).await.expect("cancel");
    node_a.try_hold(hold(ada, seats[1], 60_000), t0 + 20_002).await.expect("ada holds it again at A");

    // A hint never outlives the hold it saw: a 5 s hold frees the seat after 5 s at B.
    node_a.try_hold(hold(ada, seats[2], 5_000), t0 + 30_000).await.expect("ada holds for 5 s");
    assert!(refused(node_b.try_hold(hold(bob, seats[2], 60_000), t0 + 30_001).await));
    assert!(refused(node_b.try_hold(hold(bob, seats[2], 60_000), t0 + 34_999).await));
    let after = node_b.try_hold(hold(bob, seats[2], 60_000), t0 + 35_000).await.expect("the hold lapsed");
    assert_eq!(after.user_id, bob);
}

contract!(
    async fn one_fan_racing_a_thousand_holds_at_two_nodes_gets_the_seat_limit_and_rejoining_resets_nothing(stores) {
        const SEATS: u32 = 1_000;
        let clock = ManualClock::starting_at_ms(START_MS);
        let nodes = nodes(&stores, 2, &config(HoldMode::Atomic), &clock);
        let max = EngineConfig::default().seats_per_user_max;
        nodes[0].add_schedule(schedule(START_MS, SEATS)).await.expect("schedule");
        let fan = nodes[0].open_account("fan".into(), 10_000).await.expect("user").user_id;
        let admitted = || async {
            let token = nodes[1].join_queue(session(fan), 1).await.expect("join").token;
            clock.advance(Duration::from_secs(1));
            nodes[0].tick_admission().await.expect("tick");
            token
        };
        let token = admitted().await;
        let holds: Vec<_> = (1..=u64::from(SEATS))
            .map(|seat| {
                let (node, token) = (Arc::clone(&nodes[seat as usize % 2]), token.clone());
                tokio::spawn(async move { node.hold(session_of(&token), Some(&token), 1, seat).await })
            })
            .collect();
        let mut held = Vec::new();
        for hold in holds {
            match hold.await.expect("task") {
                Ok(reservation) => held.push(reservation),
                Err(error) => assert_eq!(error, EngineError::Rejected(TransitionError::SeatLimitReached { max })),
            }
        }
        assert_eq!(held.len(), max as usize, "exactly the limit ({})", stores.backend);
        for (index, reservation) in held.iter().enumerate() {
            nodes[index % 2].confirm(session_of(&token), Some(&token), reservation.id, None).await.expect("pay");
        }
        // Bought seats stay counted: a new place in line brings no new seats.
        let again = admitted().await;
        let free = (1..=u64::from(SEATS)).find(|seat| held.iter().all(|r| r.seat_id != *seat)).expect("a free seat");
        assert_eq!(
            nodes[1].hold(session_of(&again), Some(&again), 1, free).await,
            Err(EngineError::Rejected(TransitionError::SeatLimitReached { max }))
        );
        nodes[0].cancel(session_of(&again), Some(&again), held[0].id).await.expect("cancel a bought seat");
        nodes[1].hold(session_of(&again), Some(&again), 1, free).await.expect("a refunded seat frees a place");
        audit(&stores).await;
    }
);

contract!(
    async fn the_sweep_purges_expired_idempotency_records_once_an_interval_and_keeps_the_rest(stores) {
        use tcore_engine::engine::IDEMPOTENCY_PURGE_INTERVAL_MS;
        let clock = ManualClock::starting_at_ms(START_MS);
        let ttl_ms = 60_000;
        let config = EngineConfig { idempotency_ttl_ms: ttl_ms, ..config(HoldMode::Atomic) };
        let node = nodes(&stores, 1, &config, &clock).remove(0);
        let response = tcore_engine::domain::StoredResponse {
            status: 200,
            content_type: "application/json".into(),
            body: b"{}".to_vec(),
        };
        let keep = |key: &'static str| async {
            node.idempotency_begin(key.into(), [1; 32], 1_000).await.expect("begin");
            node.idempotency_complete(key.into(), [1; 32], response.clone()).await.expect("complete");
        };
        node.sweep().await.expect("the first sweep sets the purge's time");
        keep("old").await;
        clock.advance(Duration::from_millis(IDEMPOTENCY_PURGE_INTERVAL_MS - ttl_ms + 1));
        keep("young").await;
        clock.advance(Duration::from_millis(ttl_ms - 2));
        node.sweep().await.expect("sweep");
        let far_future = START_MS + 100 * IDEMPOTENCY_PURGE_INTERVAL_MS;
        clock.advance(Duration::from_millis(1));
        node.sweep().await.expect("sweep: the purge is due");
        assert_eq!(stores.record.purge_idempotency(far_future, 10).await, Ok(1), "only the young record was left");
    }
);

/// Redis restarted empty mid-sale (no persistence, or a failover to a replica that lagged):
/// the waiting line is created again from the record store, the sale goes on, a fan with a
/// hold still pays for it, a fan whose place was lost is told to join again, and no seat is
/// sold twice.
#[tokio::test]
async fn a_cache_store_that_loses_its_memory_mid_sale_keeps_the_sale_going() {
    let Some(stores) = Stores::redis_mariadb().await else { return };
    let prefix = stores.redis_prefix.clone().expect("a Redis prefix");
    let clock = ManualClock::starting_at_ms(START_MS);
    let nodes = nodes(&stores, 2, &config(HoldMode::Atomic), &clock);
    nodes[0].add_schedule(schedule(START_MS, 10)).await.expect("schedule");
    let mut fans = Vec::new();
    for name in ["ada", "bob"] {
        let user = nodes[0].open_account(name.into(), 1_000).await.expect("account");
        fans.push(nodes[0].join_queue(session(user.user_id), 1).await.expect("join").token);
    }
    clock.advance(Duration::from_secs(1));
    nodes[0].tick_admission().await.expect("tick");
    let (ada, bob) = (fans[0].clone(), fans[1].clone());
    let held = nodes[0].hold(session_of(&ada), Some(&ada), 1, 1).await.expect("ada holds seat 1");

    crate::services::delete_keys(&prefix).await.expect("Redis loses every key of the sale");

    // Ada still pays for her hold, at the other node.
    let paid = nodes[1].confirm(session_of(&ada), Some(&ada), held.id, None).await.expect("ada pays");
    assert_eq!(paid.status, ReservationStatus::Confirmed);
    // Bob's admission went with the line: he is told to join again, and does.
    let refused = nodes[1].hold(session_of(&bob), Some(&bob), 1, 2).await;
    assert!(matches!(refused, Err(EngineError::QueuePlaceLost)), "{refused:?}");
    let status = nodes[1].queue_status(session_of(&bob), &bob, Duration::ZERO).await;
    assert!(matches!(status, Err(EngineError::QueuePlaceLost)), "{status:?}");
    // Cleo, new, joins first: the new line's first place, which Ada's old token named too.
    let cleo = nodes[0].open_account("cleo".into(), 1_000).await.expect("account");
    let cleo = nodes[0].join_queue(session(cleo.user_id), 1).await.expect("a new fan joins").token;
    let bob = nodes[1].join_queue(session_of(&bob), 1).await.expect("bob joins again").token;
    let old_place = nodes[1].queue_status(session_of(&ada), &ada, Duration::ZERO).await;
    assert!(matches!(old_place, Err(EngineError::QueuePlaceLost)), "Ada never reads Cleo's place: {old_place:?}");
    clock.advance(Duration::from_secs(1));
    nodes[1].tick_admission().await.expect("the line moves again");
    assert!(nodes[0].snapshot().await.is_ok(), "the admin snapshot reads the new line");
    // The sale goes on, and the seat Ada bought stays hers.
    let taken = nodes[0].hold(session_of(&bob), Some(&bob), 1, 1).await;
    assert!(matches!(taken, Err(EngineError::SeatTaken)), "{taken:?}");
    for (fan, seat) in [(&bob, 2), (&cleo, 3)] {
        let hold = nodes[0].hold(session_of(fan), Some(fan), 1, seat).await.expect("a hold after the loss");
        nodes[1].confirm(session_of(fan), Some(fan), hold.id, None).await.expect("a sale after the loss");
    }
    let sold = stores.record.dump().await.expect("dump").reservations;
    let confirmed: Vec<u64> =
        sold.iter().filter(|r| r.status == ReservationStatus::Confirmed).map(|r| r.seat_id).collect();
    assert_eq!(confirmed.len(), 3, "{confirmed:?}");
    assert_books_balance(stores.record.as_ref()).await;
}
