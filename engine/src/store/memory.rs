//! The embedded store: both roles in one process, each behind one mutex, so every trait call
//! is one atomic step. It is the default for `serve` and the state machine the simulator's
//! store hosts serve over the simulated network.
//!
//! **Invariant:** what a caller can grow is bounded: idempotency records (a maximum, and each
//! expires), audit entries, rate-limit keys, and the outbox (sent events kept, pending events
//! kept; see [`MemoryStoreConfig`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;
use rand::SeedableRng;
use rand::rngs::StdRng;

use super::{
    AcceptedFence, AdmitReport, AuditEntry, CacheStore, HoldRequest, LockGrant, RecordDump, RecordStore, SeatFilter,
    StoreError,
};
use crate::clock::Clock;
use crate::domain::{
    Account, AdmissionPolicy, Admitted, FenceToken, IdempotencyDecision, IdempotencyRecord, LedgerEntry, OutboxEvent,
    OutboxKind, QueueOrder, QueueStatus, RateLimit, Reservation, ReservationId, ReservationStatus, Schedule,
    ScheduleId, ScheduleSummary, SeatId, SeatLimit, SeatSlot, SeatStatus, SeatView, StoredResponse, UserId,
    WaitingLine, WriteGuard, idempotency_decision,
};

/// Sizes, seed and clock of the embedded store.
#[derive(Debug, Clone)]
pub struct MemoryStoreConfig {
    /// Seeds the shuffle of `random-at-open` lines.
    pub seed: u64,
    /// The store's own clock for the cache role (admission and locks), as a shared cache
    /// server judges time by its own clock rather than its callers': a node whose clock is
    /// skewed then cannot speed up admission or stretch a lock. Without one, the caller's
    /// `now_ms` is used (one process, one clock).
    pub cache_clock: Option<Arc<dyn Clock>>,
    /// The most audit entries kept; older ones are dropped first.
    pub audit_entries_max: usize,
    /// The most idempotency records kept; past it, those expiring soonest are dropped first.
    pub idempotency_records_max: usize,
    /// The most outbox events kept once they are marked sent; older sent ones are forgotten.
    pub outbox_sent_kept_max: usize,
    /// The most outbox events kept while not yet sent; past it, the oldest are dropped, counted
    /// and logged (nothing drains an outbox whose relay stopped).
    pub outbox_pending_max: usize,
}

/// [`MemoryStoreConfig::idempotency_records_max`] unless configured.
pub const IDEMPOTENCY_RECORDS_MAX_DEFAULT: usize = 2_000_000;
/// [`MemoryStoreConfig::outbox_sent_kept_max`] unless configured.
pub const OUTBOX_SENT_KEPT_MAX_DEFAULT: usize = 10_000;
/// [`MemoryStoreConfig::outbox_pending_max`] unless configured.
pub const OUTBOX_PENDING_MAX_DEFAULT: usize = 1_000_000;

impl Default for MemoryStoreConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            cache_clock: None,
            audit_entries_max: 10_000,
            idempotency_records_max: IDEMPOTENCY_RECORDS_MAX_DEFAULT,
            outbox_sent_kept_max: OUTBOX_SENT_KEPT_MAX_DEFAULT,
            outbox_pending_max: OUTBOX_PENDING_MAX_DEFAULT,
        }
    }
}

impl MemoryStoreConfig {
    /// The same store, keeping every outbox event: for a store whose whole outbox is read at
    /// the end (the simulator's checker counts one event per confirmation from
    /// [`RecordStore::dump`]), where nothing marks events sent and a run is finite.
    pub fn keeping_the_whole_outbox(self) -> Self {
        Self { outbox_sent_kept_max: usize::MAX, outbox_pending_max: usize::MAX, ..self }
    }
}

/// The embedded store.
#[derive(Debug)]
pub struct MemoryStore {
    config: MemoryStoreConfig,
    records: Mutex<Records>,
    cache: Mutex<Cache>,
}

#[derive(Debug, Default)]
struct Records {
    schedules: BTreeMap<ScheduleId, Schedule>,
    seats: BTreeMap<ScheduleId, BTreeMap<SeatId, SeatSlot>>,
    /// The seats of each schedule that are not sold, so that a seat map asking for available
    /// or held seats does not walk past every sold one. Kept in step by [`Records::change_slot`].
    unsold: BTreeMap<ScheduleId, BTreeSet<SeatId>>,
    /// The unsold seats of each schedule that have a holder, by the end of that hold (a hold
    /// past its end counts as available), so that counting the held seats walks only the
    /// holds that have not ended. Kept in step by [`Records::change_slot`].
    held: BTreeMap<ScheduleId, BTreeSet<(u64, SeatId)>>,
    seat_schedule: HashMap<SeatId, ScheduleId>,
    next_seat_id: SeatId,
    accounts: BTreeMap<UserId, Account>,
    next_user_id: UserId,
    ledger: Vec<LedgerEntry>,
    top_up_keys: HashMap<String, UserId>,
    reservations: BTreeMap<ReservationId, Reservation>,
    next_reservation_id: ReservationId,
    held_by_expiry: BTreeSet<(u64, ReservationId)>,
    /// The reservations of each user and schedule that are held or confirmed, so that a hold
    /// counts the user's seats without walking every reservation. Kept in step by
    /// [`Records::insert_hold`] and [`Records::end_reservation`].
    seats_by_user: BTreeMap<(UserId, ScheduleId), Vec<ReservationId>>,
    fences: Vec<AcceptedFence>,
    idempotency: HashMap<String, IdempotencyRecord>,
    /// Every idempotency key by the expiry of its record: purges take the expired ones from
    /// the front, and past the maximum the soonest to expire go first.
    idempotency_by_expiry: BTreeSet<(u64, String)>,
    /// The outbox from its oldest kept event, whose id is `outbox_first_id`; ids are
    /// consecutive, so an event's place is its id minus that.
    outbox: VecDeque<OutboxEvent>,
    outbox_first_id: u64,
    /// Every event before this place is sent.
    outbox_unsent_from: usize,
    outbox_sent_kept_max: usize,
    outbox_pending_max: usize,
    /// Pending events dropped because there were more than `outbox_pending_max`.
    outbox_dropped: u64,
    audit: VecDeque<AuditEntry>,
}

#[derive(Debug)]
struct Cache {
    lines: BTreeMap<ScheduleId, WaitingLine>,
    admissions: Vec<Admitted>,
    locks: HashMap<String, LockState>,
    /// Theoretical arrival time (µs) of each shared rate-limit key.
    rates: BTreeMap<String, u64>,
    rng: StdRng,
}

/// Rate-limit keys kept before those whose bursts are full again are forgotten (forgetting
/// them changes no answer); only keys still inside their burst window stay beyond it.
const RATE_KEYS_MAX: usize = 100_000;

#[derive(Debug, Default)]
struct LockState {
    fence_last: FenceToken,
    holder: Option<LockGrant>,
}

impl MemoryStore {
    /// The time the cache role goes by: its own clock if it has one, else the caller's.
    fn cache_now_ms(&self, caller_now_ms: u64) -> u64 {
        self.config.cache_clock.as_ref().map_or(caller_now_ms, |clock| clock.now_ms())
    }

    /// An empty store.
    pub fn new(config: MemoryStoreConfig) -> Self {
        let records = Records {
            next_seat_id: 1,
            next_user_id: 1,
            next_reservation_id: 1,
            outbox_first_id: 1,
            outbox_sent_kept_max: config.outbox_sent_kept_max,
            outbox_pending_max: config.outbox_pending_max,
            ..Records::default()
        };
        let cache = Cache {
            lines: BTreeMap::new(),
            admissions: Vec::new(),
            locks: HashMap::new(),
            rates: BTreeMap::new(),
            rng: StdRng::seed_from_u64(config.seed),
        };
        Self { config, records: Mutex::new(records), cache: Mutex::new(cache) }
    }

    /// How many pending outbox events were dropped because the outbox was full.
    pub fn outbox_dropped(&self) -> u64 {
        self.records.lock().outbox_dropped
    }
}

/// When the hold on an unsold seat ends, if the seat has a holder: the key of
/// [`Records::held`].
fn held_until(slot: &SeatSlot) -> Option<u64> {
    (slot.holder.is_some() && !slot.sold).then_some(slot.hold_expires_at_ms)
}

impl Records {
    fn slot_mut(&mut self, schedule_id: ScheduleId, seat_id: SeatId) -> Result<&mut SeatSlot, StoreError> {
        self.seats
            .get_mut(&schedule_id)
            .and_then(|seats| seats.get_mut(&seat_id))
            .ok_or(StoreError::NotFound { entity: "seat", id: seat_id })
    }

    /// Changes one seat's slot and keeps the index of unsold seats in step with it: every
    /// change that can sell or free a seat goes through here.
    fn change_slot<T>(
        &mut self,
        schedule_id: ScheduleId,
        seat_id: SeatId,
        change: impl FnOnce(&mut SeatSlot) -> T,
    ) -> Result<T, StoreError> {
        let slot = self.slot_mut(schedule_id, seat_id)?;
        let held_before = held_until(slot);
        let changed = change(slot);
        let (sold, held_after) = (slot.sold, held_until(slot));
        let unsold = self.unsold.entry(schedule_id).or_default();
        if sold {
            unsold.remove(&seat_id);
        } else {
            unsold.insert(seat_id);
        }
        if held_before != held_after {
            let held = self.held.entry(schedule_id).or_default();
            if let Some(until_ms) = held_before {
                held.remove(&(until_ms, seat_id));
            }
            if let Some(until_ms) = held_after {
                held.insert((until_ms, seat_id));
            }
        }
        Ok(changed)
    }

    /// How many seats of the schedule are held as of `now_ms`: unsold, with a hold that has
    /// not ended ([`SeatSlot::status`]).
    fn held_count(&self, schedule_id: ScheduleId, now_ms: u64) -> usize {
        self.held.get(&schedule_id).map_or(0, |held| held.range((now_ms.saturating_add(1), 0)..).count())
    }

    fn account_mut(&mut self, user_id: UserId) -> Result<&mut Account, StoreError> {
        self.accounts.get_mut(&user_id).ok_or(StoreError::NotFound { entity: "user", id: user_id })
    }

    fn owned_reservation(&self, reservation_id: ReservationId, user_id: UserId) -> Result<Reservation, StoreError> {
        let reservation = self
            .reservations
            .get(&reservation_id)
            .ok_or(StoreError::NotFound { entity: "reservation", id: reservation_id })?;
        if reservation.user_id != user_id {
            return Err(StoreError::NotOwner);
        }
        Ok(reservation.clone())
    }

    fn emit(&mut self, kind: OutboxKind, reservation_id: Option<ReservationId>, user_id: UserId, at_ms: u64) {
        let id = self.outbox_first_id + self.outbox.len() as u64;
        self.outbox.push_back(OutboxEvent { id, kind, reservation_id, user_id, at_ms, sent: false });
        while self.outbox.len() - self.outbox_unsent_from > self.outbox_pending_max {
            // Sent events go first; then the oldest pending one is lost, and said so.
            let Some(dropped) = self.outbox.pop_front() else { break };
            self.outbox_first_id += 1;
            self.outbox_unsent_from = self.outbox_unsent_from.saturating_sub(1);
            if !dropped.sent {
                self.outbox_dropped += 1;
                if self.outbox_dropped.is_power_of_two() {
                    tracing::warn!(
                        dropped = self.outbox_dropped,
                        pending_max = self.outbox_pending_max,
                        "outbox full: the oldest unsent events are dropped; is its relay running?"
                    );
                }
            }
        }
        self.advance_outbox_cursor();
    }

    fn advance_outbox_cursor(&mut self) {
        while self.outbox.get(self.outbox_unsent_from).is_some_and(|event| event.sent) {
            self.outbox_unsent_from += 1;
        }
    }

    /// How many seats the user has on the schedule at `now_ms`, held or bought.
    fn seats_taken(&self, user_id: UserId, schedule_id: ScheduleId, now_ms: u64) -> u32 {
        let Some(ids) = self.seats_by_user.get(&(user_id, schedule_id)) else { return 0 };
        let taken = ids.iter().filter(|id| self.reservations.get(id).is_some_and(|r| r.takes_a_seat(now_ms)));
        u32::try_from(taken.count()).unwrap_or(u32::MAX)
    }

    /// A reservation ended (expired or cancelled): it no longer counts among its user's seats.
    fn end_reservation(&mut self, user_id: UserId, schedule_id: ScheduleId, reservation_id: ReservationId) {
        if let Some(ids) = self.seats_by_user.get_mut(&(user_id, schedule_id)) {
            ids.retain(|&id| id != reservation_id);
            if ids.is_empty() {
                self.seats_by_user.remove(&(user_id, schedule_id));
            }
        }
    }

    /// Ends a hold that ran out of time: the reservation expires and its seat is freed.
    fn expire_reservation(&mut self, reservation_id: ReservationId, now_ms: u64) {
        let Some(reservation) = self.reservations.get_mut(&reservation_id) else { return };
        if reservation.expire(now_ms).is_err() {
            return;
        }
        let (schedule_id, seat_id, user_id, expires_at_ms) =
            (reservation.schedule_id, reservation.seat_id, reservation.user_id, reservation.expires_at_ms);
        self.held_by_expiry.remove(&(expires_at_ms, reservation_id));
        self.end_reservation(user_id, schedule_id, reservation_id);
        let _ = self.change_slot(schedule_id, seat_id, |slot| slot.release(reservation_id));
        self.emit(OutboxKind::ReservationExpired, Some(reservation_id), user_id, now_ms);
    }

    fn insert_hold(
        &mut self,
        request: HoldRequest,
        guard: Option<WriteGuard>,
        now_ms: u64,
    ) -> Result<Reservation, StoreError> {
        if !self.accounts.contains_key(&request.user_id) {
            return Err(StoreError::NotFound { entity: "user", id: request.user_id });
        }
        let reservation_id = self.next_reservation_id;
        let limit = SeatLimit {
            taken: self.seats_taken(request.user_id, request.schedule_id, now_ms),
            max: request.seats_per_user_max,
        };
        let (previous, fence, seat) = self.change_slot(request.schedule_id, request.seat_id, |slot| {
            let previous = slot.holder.filter(|_| !slot.sold).map(|(holder, _)| holder);
            let fence = slot.hold_within_limit(reservation_id, guard, limit, request.hold_ttl_ms, now_ms);
            (previous, fence, slot.seat)
        })?;
        let fence = fence?;
        if let Some(previous) = previous {
            self.expire_reservation(previous, now_ms);
        }
        self.next_reservation_id += 1;
        let reservation = Reservation::hold(reservation_id, &seat, request.user_id, fence, request.hold_ttl_ms, now_ms);
        self.held_by_expiry.insert((reservation.expires_at_ms, reservation_id));
        self.fences.push(AcceptedFence {
            schedule_id: request.schedule_id,
            seat_id: request.seat_id,
            fence,
            reservation_id,
            node: request.node.clone(),
            at_ms: now_ms,
        });
        self.reservations.insert(reservation_id, reservation.clone());
        self.seats_by_user.entry((request.user_id, request.schedule_id)).or_default().push(reservation_id);
        self.emit(OutboxKind::ReservationHeld, Some(reservation_id), request.user_id, now_ms);
        Ok(reservation)
    }

    fn confirm(
        &mut self,
        reservation_id: ReservationId,
        user_id: UserId,
        idempotency_key: Option<String>,
        now_ms: u64,
    ) -> Result<Reservation, StoreError> {
        let reservation = self.owned_reservation(reservation_id, user_id)?;
        if reservation.status == ReservationStatus::Confirmed {
            return Ok(reservation);
        }
        if let Err(error) = reservation.check_confirmable(now_ms) {
            self.expire_reservation(reservation_id, now_ms);
            return Err(error.into());
        }
        self.slot_mut(reservation.schedule_id, reservation.seat_id)?.check_holder(reservation_id, reservation.fence)?;
        let charge =
            self.account_mut(user_id)?.debit(reservation.price_points, reservation_id, idempotency_key, now_ms)?;
        self.ledger.push(charge);
        self.change_slot(reservation.schedule_id, reservation.seat_id, SeatSlot::mark_sold)?;
        self.held_by_expiry.remove(&(reservation.expires_at_ms, reservation_id));
        let stored = self
            .reservations
            .get_mut(&reservation_id)
            .ok_or(StoreError::NotFound { entity: "reservation", id: reservation_id })?;
        stored.confirm(reservation.price_points, now_ms)?;
        let confirmed = stored.clone();
        self.emit(OutboxKind::PointsCharged, Some(reservation_id), user_id, now_ms);
        self.emit(OutboxKind::ReservationConfirmed, Some(reservation_id), user_id, now_ms);
        Ok(confirmed)
    }

    fn cancel(
        &mut self,
        reservation_id: ReservationId,
        user_id: UserId,
        now_ms: u64,
    ) -> Result<Reservation, StoreError> {
        let reservation = self.owned_reservation(reservation_id, user_id)?;
        let stored = self
            .reservations
            .get_mut(&reservation_id)
            .ok_or(StoreError::NotFound { entity: "reservation", id: reservation_id })?;
        let refund = stored.cancel(now_ms)?;
        let cancelled = stored.clone();
        self.held_by_expiry.remove(&(reservation.expires_at_ms, reservation_id));
        self.end_reservation(user_id, reservation.schedule_id, reservation_id);
        self.change_slot(reservation.schedule_id, reservation.seat_id, |slot| slot.release(reservation_id))?;
        if refund > 0 {
            let entry = self.account_mut(user_id)?.refund(refund, reservation_id, now_ms);
            self.ledger.push(entry);
            self.emit(OutboxKind::PointsRefunded, Some(reservation_id), user_id, now_ms);
        }
        self.emit(OutboxKind::ReservationCancelled, Some(reservation_id), user_id, now_ms);
        Ok(cancelled)
    }

    fn remember_idempotency(&mut self, key: String, record: IdempotencyRecord, records_max: usize) {
        let expires_at_ms = record.expires_at_ms();
        if let Some(before) = self.idempotency.insert(key.clone(), record) {
            self.idempotency_by_expiry.remove(&(before.expires_at_ms(), key.clone()));
        }
        self.idempotency_by_expiry.insert((expires_at_ms, key));
        while self.idempotency.len() > records_max {
            let Some((_, soonest)) = self.idempotency_by_expiry.pop_first() else { break };
            self.idempotency.remove(&soonest);
        }
    }

    fn forget_idempotency(&mut self, key: String) {
        if let Some(record) = self.idempotency.remove(&key) {
            self.idempotency_by_expiry.remove(&(record.expires_at_ms(), key));
        }
    }
}

fn line_mut(
    lines: &mut BTreeMap<ScheduleId, WaitingLine>,
    schedule_id: ScheduleId,
) -> Result<&mut WaitingLine, StoreError> {
    lines.get_mut(&schedule_id).ok_or(StoreError::NotFound { entity: "schedule", id: schedule_id })
}

#[async_trait]
impl RecordStore for MemoryStore {
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn put_schedule(&self, schedule: Schedule) -> Result<(), StoreError> {
        let mut records = self.records.lock();
        if records.schedules.contains_key(&schedule.id) {
            return Err(StoreError::Invalid { reason: format!("schedule {} exists", schedule.id) });
        }
        let seats = schedule.layout_seats(records.next_seat_id);
        records.next_seat_id += seats.len() as u64;
        for seat in &seats {
            records.seat_schedule.insert(seat.id, schedule.id);
        }
        records.unsold.insert(schedule.id, seats.iter().map(|seat| seat.id).collect());
        let slots = seats.into_iter().map(|seat| (seat.id, SeatSlot::new(seat))).collect();
        records.seats.insert(schedule.id, slots);
        records.schedules.insert(schedule.id, schedule);
        Ok(())
    }

    async fn schedules(&self, now_ms: u64) -> Result<Vec<ScheduleSummary>, StoreError> {
        let records = self.records.lock();
        Ok(records
            .schedules
            .values()
            .map(|schedule| {
                // A seat is sold, held or available; the indexes count the first two.
                let slots = records.seats.get(&schedule.id).map_or(0, BTreeMap::len);
                let unsold = records.unsold.get(&schedule.id).map_or(0, BTreeSet::len);
                let sold = (slots - unsold) as u64;
                let available = (unsold - records.held_count(schedule.id, now_ms)) as u64;
                ScheduleSummary {
                    id: schedule.id,
                    concert: schedule.concert.name.clone(),
                    opens_at: schedule.opens_at_ms,
                    seats_total: schedule.seats_total(),
                    seats_available: available,
                    seats_sold: sold,
                }
            })
            .collect())
    }

    async fn schedule(&self, schedule_id: ScheduleId) -> Result<Schedule, StoreError> {
        let records = self.records.lock();
        records.schedules.get(&schedule_id).cloned().ok_or(StoreError::NotFound { entity: "schedule", id: schedule_id })
    }

    async fn seat_map(
        &self,
        schedule_id: ScheduleId,
        filter: SeatFilter,
        now_ms: u64,
    ) -> Result<Vec<SeatView>, StoreError> {
        let records = self.records.lock();
        let schedule =
            records.schedules.get(&schedule_id).ok_or(StoreError::NotFound { entity: "schedule", id: schedule_id })?;
        let seats =
            records.seats.get(&schedule_id).ok_or(StoreError::NotFound { entity: "schedule", id: schedule_id })?;
        // Seats are laid out section by section, so a section is one range of seat ids:
        // filter on the slots first and build views only for the seats returned.
        let first_seat_id = seats.keys().next().copied().unwrap_or(0);
        let section_range = match &filter.section {
            None => first_seat_id..SeatId::MAX,
            Some(name) => {
                let Some(index) = schedule.sections.iter().position(|section| section.name == *name) else {
                    return Ok(Vec::new());
                };
                let before: u64 = schedule.sections[..index].iter().map(|section| u64::from(section.seats_count)).sum();
                let start = first_seat_id + before;
                start..start + u64::from(schedule.sections[index].seats_count)
            }
        };
        let limit = filter.limit.map_or(usize::MAX, |limit| usize::try_from(limit).unwrap_or(usize::MAX));
        // Available and held seats are among the unsold ones: walk only those.
        let slots: Box<dyn Iterator<Item = &SeatSlot>> = match (filter.status, records.unsold.get(&schedule_id)) {
            (Some(SeatStatus::Available | SeatStatus::Held), Some(unsold)) => {
                Box::new(unsold.range(section_range).filter_map(|seat_id| seats.get(seat_id)))
            }
            _ => Box::new(seats.range(section_range).map(|(_, slot)| slot)),
        };
        Ok(slots
            .map(|slot| (slot, slot.status(now_ms)))
            .filter(|(_, status)| filter.status.is_none_or(|wanted| wanted == *status))
            .take(limit)
            .map(|(slot, status)| SeatView {
                id: slot.seat.id,
                section: schedule.sections.get(slot.seat.section_index).map(|s| s.name.clone()).unwrap_or_default(),
                price: slot.seat.price_points,
                status,
            })
            .collect())
    }

    async fn seat(
        &self,
        schedule_id: ScheduleId,
        seat_id: SeatId,
        fence: Option<FenceToken>,
    ) -> Result<SeatSlot, StoreError> {
        let mut records = self.records.lock();
        let slot = records.slot_mut(schedule_id, seat_id)?;
        if let Some(fence) = fence {
            slot.observe_fence(fence);
        }
        Ok(slot.clone())
    }

    async fn create_user(&self, name: String, points: u64, now_ms: u64) -> Result<Account, StoreError> {
        let mut records = self.records.lock();
        let user_id = records.next_user_id;
        let mut account = Account { user_id, name, balance: 0 };
        if points > 0 {
            let entry = account.top_up(points, None, now_ms)?;
            records.ledger.push(entry);
        }
        records.next_user_id += 1;
        records.accounts.insert(user_id, account.clone());
        Ok(account)
    }

    async fn account(&self, user_id: UserId) -> Result<Account, StoreError> {
        let mut records = self.records.lock();
        records.account_mut(user_id).map(|account| account.clone())
    }

    async fn existing_users(&self, first: UserId, count: u32) -> Result<Vec<UserId>, StoreError> {
        super::check_user_ids_read(count)?;
        let records = self.records.lock();
        Ok(records.accounts.range(first..first.saturating_add(u64::from(count))).map(|(&id, _)| id).collect())
    }

    async fn top_up(
        &self,
        user_id: UserId,
        amount: u64,
        idempotency_key: String,
        now_ms: u64,
    ) -> Result<Account, StoreError> {
        let mut records = self.records.lock();
        match records.top_up_keys.get(&idempotency_key) {
            Some(&owner) if owner == user_id => return records.account_mut(user_id).map(|account| account.clone()),
            Some(_) => return Err(crate::domain::TransitionError::TopUpKeyReused.into()),
            None => {}
        }
        let account = records.account_mut(user_id)?;
        let entry = account.top_up(amount, Some(idempotency_key.clone()), now_ms)?;
        let account = account.clone();
        records.ledger.push(entry);
        records.top_up_keys.insert(idempotency_key, user_id);
        records.emit(OutboxKind::PointsCharged, None, user_id, now_ms);
        Ok(account)
    }

    async fn try_hold(&self, request: HoldRequest, now_ms: u64) -> Result<Reservation, StoreError> {
        self.records.lock().insert_hold(request, None, now_ms)
    }

    async fn write_hold(
        &self,
        request: HoldRequest,
        guard: WriteGuard,
        now_ms: u64,
    ) -> Result<Reservation, StoreError> {
        self.records.lock().insert_hold(request, Some(guard), now_ms)
    }

    async fn confirm(
        &self,
        reservation_id: ReservationId,
        user_id: UserId,
        idempotency_key: Option<String>,
        now_ms: u64,
    ) -> Result<Reservation, StoreError> {
        self.records.lock().confirm(reservation_id, user_id, idempotency_key, now_ms)
    }

    async fn cancel(
        &self,
        reservation_id: ReservationId,
        user_id: UserId,
        now_ms: u64,
    ) -> Result<Reservation, StoreError> {
        self.records.lock().cancel(reservation_id, user_id, now_ms)
    }

    async fn reservation(&self, reservation_id: ReservationId) -> Result<Reservation, StoreError> {
        let records = self.records.lock();
        records
            .reservations
            .get(&reservation_id)
            .cloned()
            .ok_or(StoreError::NotFound { entity: "reservation", id: reservation_id })
    }

    async fn expire_holds(&self, now_ms: u64, limit: u32) -> Result<u32, StoreError> {
        let mut records = self.records.lock();
        let mut expired = 0;
        while expired < limit {
            let Some(&(expires_at_ms, reservation_id)) = records.held_by_expiry.first() else { break };
            if expires_at_ms > now_ms {
                break;
            }
            records.held_by_expiry.pop_first();
            records.expire_reservation(reservation_id, now_ms);
            expired += 1;
        }
        Ok(expired)
    }

    async fn idempotency_begin(
        &self,
        key: String,
        fingerprint: [u8; 32],
        lease_ms: u64,
        ttl_ms: u64,
        now_ms: u64,
    ) -> Result<IdempotencyDecision, StoreError> {
        let mut records = self.records.lock();
        let decision = idempotency_decision(records.idempotency.get(&key), &fingerprint, now_ms);
        if decision == IdempotencyDecision::Proceed {
            let lease = IdempotencyRecord::InProgress {
                fingerprint,
                lease_until_ms: now_ms.saturating_add(lease_ms),
                expires_at_ms: now_ms.saturating_add(ttl_ms),
            };
            records.remember_idempotency(key, lease, self.config.idempotency_records_max);
        }
        Ok(decision)
    }

    async fn idempotency_complete(
        &self,
        key: String,
        fingerprint: [u8; 32],
        response: StoredResponse,
        ttl_ms: u64,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let mut records = self.records.lock();
        let holds_lease = matches!(records.idempotency.get(&key), Some(IdempotencyRecord::InProgress { fingerprint: held, .. }) if *held == fingerprint);
        if holds_lease {
            let expires_at_ms = now_ms.saturating_add(ttl_ms);
            let completed =
                IdempotencyRecord::Completed { fingerprint, response, completed_at_ms: now_ms, expires_at_ms };
            records.remember_idempotency(key, completed, self.config.idempotency_records_max);
        }
        Ok(())
    }

    async fn idempotency_renew(
        &self,
        key: String,
        fingerprint: [u8; 32],
        lease_ms: u64,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        let mut records = self.records.lock();
        match records.idempotency.get_mut(&key) {
            // The expiry stays, so the record keeps its place in `idempotency_by_expiry`.
            Some(IdempotencyRecord::InProgress { fingerprint: held, lease_until_ms, expires_at_ms })
                if *held == fingerprint && *lease_until_ms > now_ms && *expires_at_ms > now_ms =>
            {
                *lease_until_ms = (*lease_until_ms).max(now_ms.saturating_add(lease_ms));
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn idempotency_release(&self, key: String, fingerprint: [u8; 32]) -> Result<(), StoreError> {
        let mut records = self.records.lock();
        let holds_lease = matches!(records.idempotency.get(&key), Some(IdempotencyRecord::InProgress { fingerprint: held, .. }) if *held == fingerprint);
        if holds_lease {
            records.forget_idempotency(key);
        }
        Ok(())
    }

    async fn purge_idempotency(&self, now_ms: u64, limit: u32) -> Result<u32, StoreError> {
        let mut records = self.records.lock();
        let mut purged = 0;
        while purged < limit {
            let Some((expires_at_ms, _)) = records.idempotency_by_expiry.first() else { break };
            if *expires_at_ms > now_ms {
                break;
            }
            let Some((_, key)) = records.idempotency_by_expiry.pop_first() else { break };
            records.idempotency.remove(&key);
            purged += 1;
        }
        Ok(purged)
    }

    async fn outbox_pending(&self, limit: u32) -> Result<Vec<OutboxEvent>, StoreError> {
        let records = self.records.lock();
        Ok(records
            .outbox
            .range(records.outbox_unsent_from..)
            .filter(|event| !event.sent)
            .take(usize::try_from(limit).unwrap_or(usize::MAX))
            .cloned()
            .collect())
    }

    async fn outbox_mark_sent(&self, ids: Vec<u64>) -> Result<(), StoreError> {
        let mut records = self.records.lock();
        for id in ids {
            let place = id.checked_sub(records.outbox_first_id).and_then(|place| usize::try_from(place).ok());
            if let Some(event) = place.and_then(|place| records.outbox.get_mut(place)) {
                event.sent = true;
            }
        }
        records.advance_outbox_cursor();
        while records.outbox_unsent_from > records.outbox_sent_kept_max {
            records.outbox.pop_front();
            records.outbox_first_id += 1;
            records.outbox_unsent_from -= 1;
        }
        Ok(())
    }

    async fn append_audit(&self, entry: AuditEntry) -> Result<(), StoreError> {
        let mut records = self.records.lock();
        records.audit.push_back(entry);
        while records.audit.len() > self.config.audit_entries_max {
            records.audit.pop_front();
        }
        Ok(())
    }

    async fn audit(&self, limit: u32) -> Result<Vec<AuditEntry>, StoreError> {
        let records = self.records.lock();
        let skip = records.audit.len().saturating_sub(usize::try_from(limit).unwrap_or(usize::MAX));
        Ok(records.audit.iter().skip(skip).cloned().collect())
    }

    async fn dump(&self) -> Result<RecordDump, StoreError> {
        let records = self.records.lock();
        Ok(RecordDump {
            schedules: records.schedules.values().cloned().collect(),
            accounts: records.accounts.values().cloned().collect(),
            ledger: records.ledger.clone(),
            reservations: records.reservations.values().cloned().collect(),
            fences: records.fences.clone(),
            outbox: records.outbox.iter().cloned().collect(),
        })
    }
}

#[async_trait]
impl CacheStore for MemoryStore {
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn create_line(
        &self,
        schedule_id: ScheduleId,
        opens_at_ms: u64,
        order: QueueOrder,
        policy: AdmissionPolicy,
    ) -> Result<(), StoreError> {
        let mut cache = self.cache.lock();
        cache.lines.entry(schedule_id).or_insert_with(|| WaitingLine::new(schedule_id, opens_at_ms, order, policy));
        Ok(())
    }

    async fn join(&self, schedule_id: ScheduleId, user_id: UserId, now_ms: u64) -> Result<QueueStatus, StoreError> {
        let now_ms = self.cache_now_ms(now_ms);
        let mut cache = self.cache.lock();
        Ok(line_mut(&mut cache.lines, schedule_id)?.join(user_id, now_ms))
    }

    async fn queue_status(&self, schedule_id: ScheduleId, seq: u64, now_ms: u64) -> Result<QueueStatus, StoreError> {
        let now_ms = self.cache_now_ms(now_ms);
        let mut cache = self.cache.lock();
        line_mut(&mut cache.lines, schedule_id)?
            .status(seq, now_ms)
            .ok_or(StoreError::NotFound { entity: "queue token", id: seq })
    }

    async fn admit(&self, schedule_id: ScheduleId, now_ms: u64) -> Result<AdmitReport, StoreError> {
        let now_ms = self.cache_now_ms(now_ms);
        let mut guard = self.cache.lock();
        let cache = &mut *guard;
        let line = line_mut(&mut cache.lines, schedule_id)?;
        let admitted = line.admit(now_ms, &mut cache.rng);
        let (waiting, active) = line.depth();
        let report = AdmitReport {
            admitted_now: u32::try_from(admitted.len()).unwrap_or(u32::MAX),
            waiting,
            active,
            admitted_total: line.admitted_total(),
            head_order_index: line.head_order_index(),
        };
        cache.admissions.extend(admitted);
        Ok(report)
    }

    async fn mark_used(&self, schedule_id: ScheduleId, seq: u64, now_ms: u64) -> Result<(), StoreError> {
        let now_ms = self.cache_now_ms(now_ms);
        let mut cache = self.cache.lock();
        Ok(line_mut(&mut cache.lines, schedule_id)?.mark_used(seq, now_ms)?)
    }

    async fn admission_policy(&self, schedule_id: ScheduleId) -> Result<AdmissionPolicy, StoreError> {
        let mut cache = self.cache.lock();
        Ok(line_mut(&mut cache.lines, schedule_id)?.policy())
    }

    async fn set_admission_policy(
        &self,
        schedule_id: ScheduleId,
        policy: AdmissionPolicy,
    ) -> Result<AdmissionPolicy, StoreError> {
        let mut cache = self.cache.lock();
        let line = line_mut(&mut cache.lines, schedule_id)?;
        let before = line.policy();
        line.set_policy(policy);
        Ok(before)
    }

    async fn admissions(&self) -> Result<Vec<Admitted>, StoreError> {
        Ok(self.cache.lock().admissions.clone())
    }

    async fn acquire_lock(&self, key: String, ttl_ms: u64, now_ms: u64) -> Result<Option<LockGrant>, StoreError> {
        let now_ms = self.cache_now_ms(now_ms);
        let mut cache = self.cache.lock();
        let lock = cache.locks.entry(key).or_default();
        if lock.holder.is_some_and(|holder| holder.expires_at_ms > now_ms) {
            return Ok(None);
        }
        let grant = LockGrant { fence: lock.fence_last.next(), expires_at_ms: now_ms.saturating_add(ttl_ms) };
        lock.fence_last = grant.fence;
        lock.holder = Some(grant);
        Ok(Some(grant))
    }

    async fn renew_lock(
        &self,
        key: String,
        fence: FenceToken,
        ttl_ms: u64,
        now_ms: u64,
    ) -> Result<Option<LockGrant>, StoreError> {
        let now_ms = self.cache_now_ms(now_ms);
        let mut cache = self.cache.lock();
        let Some(holder) = cache.locks.get_mut(&key).and_then(|lock| lock.holder.as_mut()) else {
            return Ok(None);
        };
        if holder.fence != fence || holder.expires_at_ms <= now_ms {
            return Ok(None);
        }
        holder.expires_at_ms = now_ms.saturating_add(ttl_ms);
        Ok(Some(*holder))
    }

    async fn release_lock(&self, key: String, fence: FenceToken) -> Result<(), StoreError> {
        let mut cache = self.cache.lock();
        if let Some(lock) = cache.locks.get_mut(&key)
            && lock.holder.is_some_and(|holder| holder.fence == fence)
        {
            lock.holder = None;
        }
        Ok(())
    }

    async fn take_rate(&self, key: String, limit: RateLimit, now_ms: u64) -> Result<Option<u64>, StoreError> {
        let now_us = self.cache_now_ms(now_ms).saturating_mul(1_000);
        let mut cache = self.cache.lock();
        if cache.rates.len() >= RATE_KEYS_MAX && !cache.rates.contains_key(&key) {
            cache.rates.retain(|_, tat_us| *tat_us > now_us);
        }
        match limit.take(cache.rates.get(&key).copied(), now_us) {
            Ok(tat_us) => {
                cache.rates.insert(key, tat_us);
                Ok(None)
            }
            Err(wait_us) => Ok(Some(wait_us.div_ceil(1_000))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_lock_is_exclusive_until_its_ttl_and_fences_grow() {
        let store = MemoryStore::new(MemoryStoreConfig::default());
        let first = store.acquire_lock("seat:1".into(), 100, 0).await.expect("store").expect("free");
        assert_eq!(store.acquire_lock("seat:1".into(), 100, 99).await.expect("store"), None);
        let second = store.acquire_lock("seat:1".into(), 100, 100).await.expect("store").expect("expired");
        assert!(second.fence > first.fence);
        store.release_lock("seat:1".into(), first.fence).await.expect("store");
        assert_eq!(
            store.acquire_lock("seat:1".into(), 100, 150).await.expect("store"),
            None,
            "a stale release frees nothing"
        );
    }

    #[tokio::test]
    async fn outbox_marks_advance_the_pending_cursor() {
        let store = MemoryStore::new(MemoryStoreConfig::default());
        let user = store.create_user("ada".into(), 0, 0).await.expect("user");
        store.top_up(user.user_id, 5, "k1".into(), 1).await.expect("top up");
        store.top_up(user.user_id, 5, "k2".into(), 2).await.expect("top up");
        let pending = store.outbox_pending(10).await.expect("pending");
        assert_eq!(pending.len(), 2);
        store.outbox_mark_sent(vec![pending[0].id]).await.expect("mark");
        let pending = store.outbox_pending(10).await.expect("pending");
        assert_eq!(pending.iter().map(|e| e.id).collect::<Vec<_>>(), vec![2]);
    }

    #[tokio::test]
    async fn a_seat_map_page_of_one_section_skips_taken_seats() {
        use crate::domain::{Concert, Schedule, Section};
        let store = MemoryStore::new(MemoryStoreConfig::default());
        let section = |name: &str, seats_count| Section { name: name.into(), price_points: 10, seats_count };
        let schedule = Schedule {
            id: 1,
            concert: Concert { id: 1, name: "x".into() },
            opens_at_ms: 0,
            sections: vec![section("A", 2), section("B", 4)],
        };
        store.put_schedule(schedule).await.expect("schedule");
        let user = store.create_user("ada".into(), 0, 0).await.expect("user");
        store.try_hold(hold_request(3, user.user_id), 0).await.expect("hold");
        let filter = SeatFilter { section: Some("B".into()), status: Some(SeatStatus::Available), limit: Some(2) };
        let page = store.seat_map(1, filter, 10).await.expect("seat map");
        let ids: Vec<SeatId> = page.iter().map(|seat| seat.id).collect();
        assert_eq!(ids, vec![4, 5]);
        assert!(page.iter().all(|seat| seat.section == "B"));
        let unknown = SeatFilter { section: Some("Z".into()), ..SeatFilter::default() };
        assert!(store.seat_map(1, unknown, 10).await.expect("seat map").is_empty());
    }

    /// A hold of a second on schedule 1, with no seat limit in the way.
    fn hold_request(seat_id: SeatId, user_id: UserId) -> HoldRequest {
        HoldRequest {
            schedule_id: 1,
            seat_id,
            user_id,
            hold_ttl_ms: 1_000,
            node: "n".into(),
            seats_per_user_max: u32::MAX,
        }
    }

    /// A store with schedule 1 of `seats` seats in one section, and a user with `points`.
    async fn one_section_store(seats: u32, points: u64) -> (MemoryStore, Account) {
        use crate::domain::{Concert, Schedule, Section};
        let store = MemoryStore::new(MemoryStoreConfig::default());
        let section = Section { name: "A".into(), price_points: 10, seats_count: seats };
        let schedule =
            Schedule { id: 1, concert: Concert { id: 1, name: "x".into() }, opens_at_ms: 0, sections: vec![section] };
        store.put_schedule(schedule).await.expect("schedule");
        let user = store.create_user("ada".into(), points, 0).await.expect("user");
        (store, user)
    }

    /// The seat map by status and the schedule's counts agree with every seat's own status
    /// through holds, a sale, a cancellation and an expiry.
    #[tokio::test]
    async fn seat_maps_by_status_follow_sales_cancellations_and_expiries() {
        let (store, user) = &one_section_store(4, 100).await;
        let hold = |seat_id, now_ms| store.try_hold(hold_request(seat_id, user.user_id), now_ms);
        let ids = |status, now_ms| async move {
            let filter = SeatFilter { section: None, status: Some(status), limit: None };
            store.seat_map(1, filter, now_ms).await.expect("seat map").iter().map(|seat| seat.id).collect::<Vec<_>>()
        };
        let counts = |now_ms| async move {
            let summary = store.schedules(now_ms).await.expect("schedules").remove(0);
            (summary.seats_available, summary.seats_sold)
        };
        let sold = hold(1, 0).await.expect("hold");
        store.confirm(sold.id, user.user_id, None, 10).await.expect("confirm");
        let cancelled = hold(2, 0).await.expect("hold");
        store.confirm(cancelled.id, user.user_id, None, 10).await.expect("confirm");
        store.cancel(cancelled.id, user.user_id, 20).await.expect("cancel");
        hold(3, 0).await.expect("hold");
        assert_eq!(ids(SeatStatus::Available, 30).await, vec![2, 4]);
        assert_eq!(ids(SeatStatus::Held, 30).await, vec![3]);
        assert_eq!(ids(SeatStatus::Sold, 30).await, vec![1]);
        assert_eq!(counts(30).await, (2, 1));
        // Past its expiry a hold counts as available before any sweep, and after one.
        assert_eq!(ids(SeatStatus::Available, 1_000).await, vec![2, 3, 4]);
        assert_eq!(counts(1_000).await, (3, 1));
        store.expire_holds(1_000, 10).await.expect("sweep");
        assert_eq!(ids(SeatStatus::Available, 1_000).await, vec![2, 3, 4]);
        assert!(ids(SeatStatus::Held, 1_000).await.is_empty());
        assert_eq!(counts(1_000).await, (3, 1));
        // A seat held again counts as held until its new hold ends.
        hold(3, 1_500).await.expect("hold again");
        assert_eq!(counts(2_499).await, (2, 1));
        assert_eq!(counts(2_500).await, (3, 1));
    }

    /// The schedule's counts, kept by indexes, agree with a walk over every seat's status
    /// after each of many random holds, confirmations, cancellations, sweeps and ticks.
    #[tokio::test]
    async fn schedule_counts_agree_with_every_seat_through_random_changes() {
        use rand::RngExt as _;

        let (store, user) = &one_section_store(12, 1_000_000).await;
        let mut rng = StdRng::seed_from_u64(7);
        let (mut now_ms, mut reservations) = (0_u64, Vec::new());
        for _ in 0..2_000 {
            now_ms += rng.random_range(0..300);
            match rng.random_range(0..5) {
                0 | 1 => {
                    let request = HoldRequest {
                        hold_ttl_ms: rng.random_range(1..2_000),
                        ..hold_request(rng.random_range(1..=12), user.user_id)
                    };
                    if let Ok(reservation) = store.try_hold(request, now_ms).await {
                        reservations.push(reservation.id);
                    }
                }
                2 if !reservations.is_empty() => {
                    let id = reservations[rng.random_range(0..reservations.len())];
                    let _ = store.confirm(id, user.user_id, None, now_ms).await;
                }
                3 if !reservations.is_empty() => {
                    let id = reservations[rng.random_range(0..reservations.len())];
                    let _ = store.cancel(id, user.user_id, now_ms).await;
                }
                _ => {
                    store.expire_holds(now_ms, rng.random_range(1..4)).await.expect("sweep");
                }
            }
            let seats = store.seat_map(1, SeatFilter::default(), now_ms).await.expect("seat map");
            let count = |status| seats.iter().filter(|seat| seat.status == status).count() as u64;
            let summary = store.schedules(now_ms).await.expect("schedules").remove(0);
            assert_eq!(
                (summary.seats_available, summary.seats_sold),
                (count(SeatStatus::Available), count(SeatStatus::Sold)),
                "at {now_ms} ms"
            );
        }
    }

    /// A store with small outbox bounds, schedule 1 of `seats` seats, and one user with points
    /// for all of them and no seat limit in the way.
    async fn small_outbox_store(seats: u32) -> (Arc<MemoryStore>, Account) {
        use crate::domain::{Concert, Schedule, Section};
        let config =
            MemoryStoreConfig { outbox_sent_kept_max: 10, outbox_pending_max: 100, ..MemoryStoreConfig::default() };
        let store = Arc::new(MemoryStore::new(config));
        let section = Section { name: "A".into(), price_points: 1, seats_count: seats };
        let schedule =
            Schedule { id: 1, concert: Concert { id: 1, name: "x".into() }, opens_at_ms: 0, sections: vec![section] };
        store.put_schedule(schedule).await.expect("schedule");
        let user = store.create_user("ada".into(), u64::from(seats), 0).await.expect("user");
        (store, user)
    }

    #[tokio::test]
    async fn a_flood_of_confirmations_drained_by_the_log_relay_leaves_the_outbox_within_its_bound() {
        use crate::store::{OutboxRelay, OutboxRelayConfig};
        let (store, user) = small_outbox_store(1_000).await;
        let relay = OutboxRelay::to_log(store.clone(), OutboxRelayConfig::default());
        for seat_id in 1..=1_000 {
            let held = store.try_hold(hold_request(seat_id, user.user_id), seat_id).await.expect("hold");
            store.confirm(held.id, user.user_id, None, seat_id).await.expect("confirm");
            if seat_id % 20 == 0 {
                relay.relay_once().await.expect("relay");
            }
            assert!(store.dump().await.expect("dump").outbox.len() <= 10 + 100, "bounded after {seat_id} sales");
        }
        relay.relay_once().await.expect("relay");
        let outbox = store.dump().await.expect("dump").outbox;
        // Three events a sale (held, charged, confirmed): every one relayed, the newest kept.
        assert_eq!(relay.logged(), 3_000);
        assert_eq!(outbox.iter().map(|event| event.id).collect::<Vec<_>>(), (2_991..=3_000).collect::<Vec<_>>());
        assert!(outbox.iter().all(|event| event.sent));
        assert_eq!(store.outbox_dropped(), 0, "the relay kept up: nothing pending was lost");
    }

    #[tokio::test]
    async fn past_its_pending_maximum_the_outbox_drops_the_oldest_events_and_counts_them() {
        let (store, user) = small_outbox_store(1).await;
        for index in 0..103 {
            store.top_up(user.user_id, 1, format!("k{index}"), 1).await.expect("top up");
        }
        // The opening top-up of `create_user` emits no event: 103 events, ids 1..=103.
        let pending = store.outbox_pending(1_000).await.expect("pending");
        assert_eq!(pending.len(), 100);
        assert_eq!((pending[0].id, pending[99].id), (4, 103));
        assert_eq!(store.outbox_dropped(), 3);
        store.outbox_mark_sent(vec![4, 5, 103]).await.expect("mark");
        let left: Vec<u64> = store.outbox_pending(1_000).await.expect("pending").iter().map(|e| e.id).collect();
        assert_eq!(left, (6..=102).collect::<Vec<_>>(), "ids keep their meaning after a drop");
    }

    #[tokio::test]
    async fn the_simulators_store_keeps_every_outbox_event() {
        let config =
            MemoryStoreConfig { outbox_pending_max: 1, outbox_sent_kept_max: 1, ..MemoryStoreConfig::default() };
        let store = MemoryStore::new(config.keeping_the_whole_outbox());
        let user = store.create_user("ada".into(), 0, 0).await.expect("user");
        for index in 0..50 {
            store.top_up(user.user_id, 1, format!("k{index}"), 1).await.expect("top up");
        }
        store.outbox_mark_sent((1..=25).collect()).await.expect("mark");
        assert_eq!(store.dump().await.expect("dump").outbox.len(), 50);
    }

    #[tokio::test]
    async fn a_repeated_top_up_key_adds_points_once() {
        let store = MemoryStore::new(MemoryStoreConfig::default());
        let user = store.create_user("ada".into(), 10, 0).await.expect("user");
        store.top_up(user.user_id, 5, "k".into(), 1).await.expect("top up");
        let again = store.top_up(user.user_id, 5, "k".into(), 2).await.expect("replay");
        assert_eq!(again.balance, 15);
    }
}
