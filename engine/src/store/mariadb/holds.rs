//! Group commit of holds: the holds a node is asked for at the same time share one
//! transaction, written with one statement per table, so a burst of holds pays for a handful
//! of statements and one commit (one log flush) per batch instead of six statements and a
//! commit per hold.
//!
//! A batch locks its seats in one statement, in seat order, then its users' accounts in id
//! order, so two batches (on this node or another) never wait on each other in a cycle. The
//! domain decides each hold on the locked slots and the users' counted seats exactly as a
//! single hold does (a later hold of the same seat, or by the same user, in the batch sees the
//! earlier one); refused holds are answered alone and take no part in the writes. Every hold
//! of a batch is answered only after the commit, so nobody learns of a hold that could still
//! be rolled back.
//!
//! The per-hold transaction (`MariaDbStore::insert_hold`) stays the reference: a batch that
//! the server picks as a deadlock victim too often, or that meets any other database error
//! (a unique key refusing a write, say), is rolled back whole and each of its holds runs
//! again in a transaction of its own, which answers it exactly as before.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use sqlx::mysql::MySqlPool;
use sqlx::{MySql, QueryBuilder, Row};
use tokio::sync::{Mutex, mpsc, oneshot};

use super::{
    Failure, MariaDbStore, SeatsTaken, Tx, code, error_number, expire_reservation, lock_users, outbox_kind_name,
    slot_from,
};
use crate::domain::{OutboxKind, Reservation, ReservationId, SeatId, SeatSlot, WriteGuard};
use crate::store::{HoldRequest, StoreError};

/// Hold writers per store unless configured.
pub const HOLD_BATCH_WRITERS_DEFAULT: u16 = 4;
/// Holds per transaction at most unless configured.
pub const HOLD_BATCH_MAX_DEFAULT: u16 = 128;

/// How holds are grouped into transactions.
#[derive(Debug, Clone, Copy)]
pub struct HoldBatchConfig {
    /// Transactions writing holds at the same time, per store.
    pub workers: usize,
    /// The most holds one transaction writes.
    pub holds_max: usize,
}

impl Default for HoldBatchConfig {
    fn default() -> Self {
        Self { workers: usize::from(HOLD_BATCH_WRITERS_DEFAULT), holds_max: usize::from(HOLD_BATCH_MAX_DEFAULT) }
    }
}

/// One hold waiting for its batch.
#[derive(Debug)]
struct Job {
    request: HoldRequest,
    guard: Option<WriteGuard>,
    now_ms: u64,
    reply: oneshot::Sender<Result<Reservation, StoreError>>,
}

/// What the hold writers of a store did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HoldBatchStats {
    /// Batches committed.
    pub batches: u64,
    /// Holds answered from committed batches.
    pub holds: u64,
    /// Batches rolled back whose holds were written one by one instead.
    pub rolled_back: u64,
}

#[derive(Debug, Default)]
struct Counters {
    batches: AtomicU64,
    holds: AtomicU64,
    rolled_back: AtomicU64,
}

/// The queue of holds of one store, and the workers that write them; started on first use,
/// on the runtime of that use. The workers stop when the last clone of the store is dropped.
#[derive(Debug, Clone, Default)]
pub(super) struct HoldBatcher {
    queue: Arc<OnceLock<mpsc::UnboundedSender<Job>>>,
    counters: Arc<Counters>,
}

impl HoldBatcher {
    /// Writes one hold with whichever holds are waiting beside it, and answers it after the
    /// commit.
    pub(super) async fn hold(
        &self,
        store: &MariaDbStore,
        request: HoldRequest,
        guard: Option<WriteGuard>,
        now_ms: u64,
    ) -> Result<Reservation, StoreError> {
        let queue = self.queue.get_or_init(|| start(store.clone(), Arc::clone(&self.counters)));
        let (reply, answer) = oneshot::channel();
        let gone = || StoreError::Unavailable { reason: "the hold writer stopped".into() };
        queue.send(Job { request, guard, now_ms, reply }).map_err(|_| gone())?;
        match tokio::time::timeout(store.config.call_timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(gone()),
            Err(_) => Err(StoreError::Unavailable {
                reason: format!("MariaDB did not answer within {} ms", store.config.call_timeout.as_millis()),
            }),
        }
    }

    pub(super) fn stats(&self) -> HoldBatchStats {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        HoldBatchStats {
            batches: read(&self.counters.batches),
            holds: read(&self.counters.holds),
            rolled_back: read(&self.counters.rolled_back),
        }
    }
}

fn start(store: MariaDbStore, counters: Arc<Counters>) -> mpsc::UnboundedSender<Job> {
    let (sender, receiver) = mpsc::unbounded_channel();
    let receiver = Arc::new(Mutex::new(receiver));
    for _ in 0..store.config.hold_batch.workers.max(1) {
        let (store, receiver, counters) = (store.without_batcher(), Arc::clone(&receiver), Arc::clone(&counters));
        tokio::spawn(async move {
            while let Some(batch) = next_batch(&receiver, store.config.hold_batch.holds_max.max(1)).await {
                write(&store, batch, &counters).await;
            }
        });
    }
    sender
}

/// The next hold and every hold already waiting behind it, up to `holds_max`; callers that
/// gave up waiting are left out.
async fn next_batch(receiver: &Mutex<mpsc::UnboundedReceiver<Job>>, holds_max: usize) -> Option<Vec<Job>> {
    let mut receiver = receiver.lock().await;
    let mut batch = Vec::new();
    while batch.is_empty() {
        let first = receiver.recv().await?;
        batch.push(first);
        while batch.len() < holds_max {
            let Ok(job) = receiver.try_recv() else { break };
            batch.push(job);
        }
        batch.retain(|job| !job.reply.is_closed());
    }
    Some(batch)
}

/// Writes a batch and answers each of its holds.
async fn write(store: &MariaDbStore, mut batch: Vec<Job>, counters: &Counters) {
    batch.sort_by_key(|job| (job.request.seat_id, job.request.schedule_id));
    let mut retries = 0;
    let outcome = loop {
        match write_batch(&store.pool, &batch).await {
            Err(error)
                if error_number(&error) == Some(code::DEADLOCK) && retries < store.config.deadlock_retries_max =>
            {
                retries += 1;
            }
            outcome => break outcome,
        }
    };
    match outcome {
        Ok(answers) => {
            counters.batches.fetch_add(1, Ordering::Relaxed);
            counters.holds.fetch_add(batch.len() as u64, Ordering::Relaxed);
            for (job, answer) in batch.into_iter().zip(answers) {
                let _ = job.reply.send(answer);
            }
        }
        Err(error) => {
            counters.rolled_back.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%error, holds = batch.len(), "hold batch rolled back; writing its holds one by one");
            for job in batch {
                let answer = store.call(|| store.insert_hold(&job.request, job.guard, job.now_ms)).await;
                let _ = job.reply.send(answer);
            }
        }
    }
}

/// A hold the domain granted in this batch, waiting for its row.
struct Granted {
    index: usize,
    reservation: Reservation,
}

/// One transaction for the whole batch; the answers are in the batch's order. A database
/// error rolls everything back (the transaction is dropped unfinished).
async fn write_batch(pool: &MySqlPool, batch: &[Job]) -> Result<Vec<Result<Reservation, StoreError>>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let mut slots = lock_seats(&mut tx, batch).await?;
    let (users, mut seats) = lock_users(&mut tx, &batch.iter().map(|job| job.request.user_id).collect()).await?;
    let mut answers: Vec<Option<Result<Reservation, StoreError>>> = Vec::with_capacity(batch.len());
    let mut granted = Vec::new();
    for (index, job) in batch.iter().enumerate() {
        let request = &job.request;
        let decided = decide(&users, &mut slots, &mut seats, job);
        match decided {
            Ok((reservation, previous)) => {
                if let Some(previous) = previous {
                    match expire_reservation(&mut tx, previous, job.now_ms).await {
                        Ok(_) => {}
                        Err(Failure::Sql(error)) => return Err(error),
                        Err(Failure::Store(error)) => {
                            answers.push(Some(Err(error)));
                            continue;
                        }
                    }
                }
                granted.push(Granted { index, reservation });
                answers.push(None);
            }
            Err(error) => {
                tracing::trace!(seat_id = request.seat_id, %error, "hold refused in batch");
                answers.push(Some(Err(error)));
            }
        }
    }
    if !granted.is_empty() {
        insert_reservations(&mut tx, &mut granted).await?;
        update_seats(&mut tx, &granted, &slots).await?;
        insert_fences(&mut tx, &granted, batch).await?;
        insert_outbox(&mut tx, &granted, batch).await?;
    }
    tx.commit().await?;
    for Granted { index, reservation } in granted {
        answers[index] = Some(Ok(reservation));
    }
    Ok(answers.into_iter().map(|answer| answer.unwrap_or_else(|| Err(unanswered()))).collect())
}

fn unanswered() -> StoreError {
    StoreError::Unavailable { reason: "a batched hold was left without an answer".into() }
}

/// The domain's decision on one hold, on the slots and the users' seats as the batch has
/// changed them so far: the reservation to write (its id not yet known) and the expired hold it
/// replaces.
fn decide(
    users: &BTreeSet<u64>,
    slots: &mut BTreeMap<SeatId, SeatSlot>,
    seats: &mut SeatsTaken,
    job: &Job,
) -> Result<(Reservation, Option<ReservationId>), StoreError> {
    let request = &job.request;
    if !users.contains(&request.user_id) {
        return Err(StoreError::NotFound { entity: "user", id: request.user_id });
    }
    let slot = slots
        .get_mut(&request.seat_id)
        .filter(|slot| slot.seat.schedule_id == request.schedule_id)
        .ok_or(StoreError::NotFound { entity: "seat", id: request.seat_id })?;
    let previous = slot.holder.filter(|_| !slot.sold).map(|(holder, _)| holder);
    let limit = seats.limit(request, job.now_ms);
    let fence = slot.hold_within_limit(0, job.guard, limit, request.hold_ttl_ms, job.now_ms)?;
    seats.granted(request);
    // A hold granted earlier in this batch has no row yet: it cannot have run out already.
    let previous = previous.filter(|&id| id != 0);
    let reservation = Reservation::hold(0, &slot.seat, request.user_id, fence, request.hold_ttl_ms, job.now_ms);
    Ok((reservation, previous))
}

/// Locks the batch's seats, in seat order.
async fn lock_seats(tx: &mut Tx, batch: &[Job]) -> Result<BTreeMap<SeatId, SeatSlot>, sqlx::Error> {
    let ids: BTreeSet<SeatId> = batch.iter().map(|job| job.request.seat_id).collect();
    let mut query = QueryBuilder::<MySql>::new(concat!("SELECT ", seat_columns!(), " FROM seats WHERE id IN ("));
    let mut list = query.separated(", ");
    for id in &ids {
        list.push_bind(*id);
    }
    query.push(") ORDER BY id FOR UPDATE");
    let rows = query.build().fetch_all(&mut **tx).await?;
    rows.iter().map(|row| slot_from(row).map(|slot| (slot.seat.id, slot))).collect()
}

/// Inserts the reservations in one statement and learns their ids, which the server hands
/// out consecutively to a multi-row insert (`innodb_autoinc_lock_mode` 0 or 1). The ids are
/// read back and checked; under any other allocation the batch is rolled back.
async fn insert_reservations(tx: &mut Tx, granted: &mut [Granted]) -> Result<(), sqlx::Error> {
    let mut query = QueryBuilder::<MySql>::new(
        "INSERT INTO reservations (schedule_id, seat_id, user_id, status, fence, price_points, held_at_ms, \
         expires_at_ms) ",
    );
    query.push_values(granted.iter(), |mut row, Granted { reservation, .. }| {
        row.push_bind(reservation.schedule_id)
            .push_bind(reservation.seat_id)
            .push_bind(reservation.user_id)
            .push("'HELD'")
            .push_bind(reservation.fence.0)
            .push_bind(reservation.price_points)
            .push_bind(reservation.held_at_ms)
            .push_bind(reservation.expires_at_ms);
    });
    let first_id = query.build().execute(&mut **tx).await?.last_insert_id();
    let count = granted.len() as u64;
    let rows = sqlx::query("SELECT id, seat_id, fence FROM reservations WHERE id >= ? AND id < ? ORDER BY id")
        .bind(first_id)
        .bind(first_id + count)
        .fetch_all(&mut **tx)
        .await?;
    let consecutive = rows.len() == granted.len()
        && rows.iter().zip(granted.iter()).enumerate().all(|(offset, (row, Granted { reservation, .. }))| {
            row.try_get::<u64, _>("id").ok() == Some(first_id + offset as u64)
                && row.try_get::<u64, _>("seat_id").ok() == Some(reservation.seat_id)
                && row.try_get::<u64, _>("fence").ok() == Some(reservation.fence.0)
        });
    if !consecutive {
        return Err(sqlx::Error::Protocol("the reservations of a batch did not get consecutive ids".into()));
    }
    for (offset, Granted { reservation, .. }) in granted.iter_mut().enumerate() {
        reservation.id = first_id + offset as u64;
    }
    Ok(())
}

/// A seat column a hold writes: its value from the reservation and the seat's newest fence.
type SeatColumn = fn(&Reservation, u64) -> u64;

/// Points each granted seat at its new reservation, in one statement. The seats are distinct:
/// the insert before it refuses two active reservations of one seat, which rolls the batch back.
async fn update_seats(tx: &mut Tx, granted: &[Granted], slots: &BTreeMap<SeatId, SeatSlot>) -> Result<(), sqlx::Error> {
    let mut rows = Vec::with_capacity(granted.len());
    for Granted { reservation, .. } in granted {
        let slot = slots
            .get(&reservation.seat_id)
            .ok_or_else(|| sqlx::Error::Protocol("a granted seat of the batch was not locked".into()))?;
        rows.push((reservation, slot.fence_last.0));
    }
    let columns: [(&str, SeatColumn); 4] = [
        ("holder_reservation_id", |reservation, _| reservation.id),
        ("holder_fence", |reservation, _| reservation.fence.0),
        ("hold_expires_at_ms", |reservation, _| reservation.expires_at_ms),
        ("fence_last", |_, fence_last| fence_last),
    ];
    let mut query = QueryBuilder::<MySql>::new("UPDATE seats SET sold = FALSE");
    for (column, value) in columns {
        query.push(", ").push(column).push(" = CASE id");
        for &(reservation, fence_last) in &rows {
            query
                .push(" WHEN ")
                .push_bind(reservation.seat_id)
                .push(" THEN ")
                .push_bind(value(reservation, fence_last));
        }
        query.push(" END");
    }
    query.push(" WHERE id IN (");
    let mut list = query.separated(", ");
    for (reservation, _) in &rows {
        list.push_bind(reservation.seat_id);
    }
    query.push(")");
    query.build().execute(&mut **tx).await?;
    Ok(())
}

async fn insert_fences(tx: &mut Tx, granted: &[Granted], batch: &[Job]) -> Result<(), sqlx::Error> {
    let mut query = QueryBuilder::<MySql>::new(
        "INSERT INTO accepted_fences (schedule_id, seat_id, fence, reservation_id, node, at_ms) ",
    );
    query.push_values(granted.iter(), |mut row, Granted { index, reservation }| {
        let job = &batch[*index];
        row.push_bind(reservation.schedule_id)
            .push_bind(reservation.seat_id)
            .push_bind(reservation.fence.0)
            .push_bind(reservation.id)
            .push_bind(job.request.node.clone())
            .push_bind(job.now_ms);
    });
    query.build().execute(&mut **tx).await?;
    Ok(())
}

async fn insert_outbox(tx: &mut Tx, granted: &[Granted], batch: &[Job]) -> Result<(), sqlx::Error> {
    let mut query = QueryBuilder::<MySql>::new("INSERT INTO outbox (kind, reservation_id, user_id, at_ms) ");
    query.push_values(granted.iter(), |mut row, Granted { index, reservation }| {
        row.push_bind(outbox_kind_name(OutboxKind::ReservationHeld))
            .push_bind(reservation.id)
            .push_bind(reservation.user_id)
            .push_bind(batch[*index].now_ms);
    });
    query.build().execute(&mut **tx).await?;
    Ok(())
}
