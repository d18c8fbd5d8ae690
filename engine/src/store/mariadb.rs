//! The system of record on MariaDB (sqlx, MySQL driver): every [`RecordStore`] call that
//! changes state is one transaction, with the row locks taken in one order everywhere (seat,
//! then reservation, then account) so that transactions queue rather than deadlock.
//!
//! **Invariant:** a hold is written only under its user's account row lock, taken after the
//! seat's and before the user's seats on the schedule are counted, so two holds of one user,
//! on any node and in any batch, are counted one after the other: a user's seat limit holds.
//!
//! **Invariant:** the schema backs the code up: two active reservations of one seat, or two
//! charges of one reservation, cannot be written (unique keys on generated columns); such a
//! violation is a domain refusal, never a 500.
//! **Invariant:** every call is bounded by `call_timeout`; a call that times out or loses its
//! connection is `Unavailable` (outcome unknown, safe to retry with the same idempotency key).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions, MySqlRow};
use sqlx::{MySql, QueryBuilder, Row, Transaction};

use super::redis::{IdempotencyCache, SeatGate};
use super::{AcceptedFence, AuditEntry, HoldRequest, RecordDump, RecordStore, SeatFilter, StoreError};
use crate::domain::{
    Account, Concert, FenceToken, IdempotencyDecision, IdempotencyRecord, LedgerEntry, LedgerReason, OutboxEvent,
    OutboxKind, Reservation, ReservationId, ReservationStatus, Schedule, ScheduleId, ScheduleSummary, Seat, SeatId,
    SeatLimit, SeatSlot, SeatStatus, SeatView, Section, StoredResponse, TransitionError, UserId, WriteGuard,
    idempotency_decision, takes_a_seat,
};

/// The schema, embedded in the binary and applied by [`MariaDbStore::migrate`].
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Pool size and limits of the MariaDB store.
#[derive(Debug, Clone)]
pub struct MariaDbStoreConfig {
    /// The most connections the pool opens.
    pub connections_max: u32,
    /// How long a call waits for a free connection.
    pub acquire_timeout: Duration,
    /// The most one call may take, transaction retries included.
    pub call_timeout: Duration,
    /// How often a transaction the server chose as a deadlock victim is run again.
    pub deadlock_retries_max: u32,
    /// The most audit entries kept; older ones are deleted.
    pub audit_entries_max: u64,
    /// How holds asked for at the same time are written together.
    pub hold_batch: HoldBatchConfig,
}

impl Default for MariaDbStoreConfig {
    fn default() -> Self {
        Self {
            connections_max: 32,
            acquire_timeout: Duration::from_secs(2),
            call_timeout: Duration::from_secs(5),
            deadlock_retries_max: 5,
            audit_entries_max: 10_000,
            hold_batch: HoldBatchConfig::default(),
        }
    }
}

/// The MariaDB record store.
#[derive(Debug, Clone)]
pub struct MariaDbStore {
    pool: MySqlPool,
    config: MariaDbStoreConfig,
    gate: Option<SeatGate>,
    idempotency_cache: Option<IdempotencyCache>,
    batcher: holds::HoldBatcher,
}

/// Why a transaction failed: a domain answer, or the database.
#[derive(Debug)]
enum Failure {
    Store(StoreError),
    Sql(sqlx::Error),
}

impl From<StoreError> for Failure {
    fn from(error: StoreError) -> Self {
        Failure::Store(error)
    }
}

impl From<TransitionError> for Failure {
    fn from(error: TransitionError) -> Self {
        Failure::Store(StoreError::Rejected(error))
    }
}

impl From<sqlx::Error> for Failure {
    fn from(error: sqlx::Error) -> Self {
        Failure::Sql(error)
    }
}

type Tx = Transaction<'static, MySql>;

/// MariaDB's error numbers the store reacts to.
mod code {
    pub const DUPLICATE_KEY: u16 = 1062;
    pub const LOCK_WAIT_TIMEOUT: u16 = 1205;
    pub const DEADLOCK: u16 = 1213;
}

fn error_number(error: &sqlx::Error) -> Option<u16> {
    match error {
        sqlx::Error::Database(database) => {
            database.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>().map(|mysql| mysql.number())
        }
        _ => None,
    }
}

/// Maps a database error to what the domain calls it: the active-seat key is a taken seat, the
/// one-charge key an already confirmed reservation; anything else leaves the outcome unknown.
fn map_sql(error: sqlx::Error) -> StoreError {
    if error_number(&error) == Some(code::DUPLICATE_KEY) {
        let message = error.to_string();
        if message.contains("reservations_active_seat") {
            return StoreError::Rejected(TransitionError::SeatUnavailable);
        }
        if message.contains("ledger_one_charge_per_reservation") {
            return StoreError::Rejected(TransitionError::AlreadyFinal { status: ReservationStatus::Confirmed });
        }
    }
    tracing::warn!(%error, "MariaDB call failed");
    StoreError::Unavailable { reason: format!("MariaDB: {error}") }
}

impl MariaDbStore {
    /// A store on `url` (`mysql://user:password@host:port/database`); connects on first use,
    /// so a server that is down at start only makes calls fail until it is back.
    pub fn connect_lazy(url: &str, config: MariaDbStoreConfig) -> Result<Self, StoreError> {
        let malformed = |why: String| StoreError::Invalid {
            reason: format!("malformed MariaDB URL ({why}); expected mysql://user:password@host:port/database"),
        };
        let Some(rest) = url.strip_prefix("mysql://") else {
            return Err(malformed("the scheme must be mysql".into()));
        };
        let database = rest.split_once('/').map_or("", |(_, path)| path.split('?').next().unwrap_or(""));
        if database.is_empty() {
            return Err(malformed("no database named".into()));
        }
        // The name ends up in `CREATE DATABASE` when it is missing: plain names only.
        let plain = |c: char| c.is_ascii_alphanumeric() || c == '_';
        if database.len() > DATABASE_NAME_LEN_MAX || !database.chars().all(plain) {
            return Err(malformed(format!(
                "the database name must be 1 to {DATABASE_NAME_LEN_MAX} letters, digits or underscores"
            )));
        }
        let options = MySqlConnectOptions::from_str(url).map_err(|error| malformed(error.to_string()))?;
        let pool = MySqlPoolOptions::new()
            .max_connections(config.connections_max)
            .acquire_timeout(config.acquire_timeout)
            .connect_lazy_with(options);
        Ok(Self { pool, config, gate: None, idempotency_cache: None, batcher: holds::HoldBatcher::default() })
    }

    /// Puts a seat gate in front of the atomic hold, so that attempts on a seat someone holds
    /// are refused without a transaction.
    pub fn with_seat_gate(mut self, gate: SeatGate) -> Self {
        self.gate = Some(gate);
        self
    }

    /// Answers replays of completed idempotency keys from `cache` when it has them.
    pub fn with_idempotency_cache(mut self, cache: IdempotencyCache) -> Self {
        self.idempotency_cache = Some(cache);
        self
    }

    /// What the hold writers did so far: batches committed, holds in them, batches rolled back.
    pub fn hold_batch_stats(&self) -> HoldBatchStats {
        self.batcher.stats()
    }

    /// The same store, writing holds one transaction each (what the hold writers use).
    fn without_batcher(&self) -> Self {
        Self { batcher: holds::HoldBatcher::default(), ..self.clone() }
    }

    /// Applies the schema's migrations that are not applied yet.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|error| StoreError::Unavailable { reason: format!("migrating the schema: {error}") })
    }

    /// The connection pool (for tools that audit the database).
    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    /// Runs `op` within the call timeout, again if the server picked it as a deadlock victim.
    async fn call<T, F, Fut>(&self, mut op: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let attempts = async {
            let mut retries = 0;
            loop {
                match op().await {
                    Ok(value) => return Ok(value),
                    Err(Failure::Store(error)) => return Err(error),
                    Err(Failure::Sql(error)) => {
                        let number = error_number(&error);
                        let retryable = matches!(number, Some(code::DEADLOCK | code::LOCK_WAIT_TIMEOUT));
                        if retryable && retries < self.config.deadlock_retries_max {
                            retries += 1;
                            continue;
                        }
                        return Err(map_sql(error));
                    }
                }
            }
        };
        match tokio::time::timeout(self.config.call_timeout, attempts).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable {
                reason: format!("MariaDB did not answer within {} ms", self.config.call_timeout.as_millis()),
            }),
        }
    }
}

// Column lists, as macros so that queries stay `&'static str` (sqlx's guard against SQL
// built from input).
macro_rules! reservation_columns {
    () => {
        "id, schedule_id, seat_id, user_id, status, fence, price_points, paid_points, held_at_ms, \
         expires_at_ms, confirmed_at_ms, ended_at_ms"
    };
}

macro_rules! seat_columns {
    () => {
        "id, schedule_id, section_index, price_points, holder_reservation_id, holder_fence, sold, \
         hold_expires_at_ms, fence_last"
    };
}

mod holds;
pub use holds::{HOLD_BATCH_MAX_DEFAULT, HOLD_BATCH_WRITERS_DEFAULT, HoldBatchConfig, HoldBatchStats};

/// A seat's status in SQL, as [`SeatSlot::status`] says; the one parameter is `now_ms`.
macro_rules! seat_status_sql {
    () => {
        "CASE WHEN holder_reservation_id IS NULL THEN 'AVAILABLE' WHEN sold THEN 'SOLD' \
         WHEN ? < hold_expires_at_ms THEN 'HELD' ELSE 'AVAILABLE' END"
    };
}

fn status_name(status: ReservationStatus) -> &'static str {
    match status {
        ReservationStatus::Held => "HELD",
        ReservationStatus::Confirmed => "CONFIRMED",
        ReservationStatus::Expired => "EXPIRED",
        ReservationStatus::Cancelled => "CANCELLED",
    }
}

fn parse_status(name: &str) -> Result<ReservationStatus, sqlx::Error> {
    match name {
        "HELD" => Ok(ReservationStatus::Held),
        "CONFIRMED" => Ok(ReservationStatus::Confirmed),
        "EXPIRED" => Ok(ReservationStatus::Expired),
        "CANCELLED" => Ok(ReservationStatus::Cancelled),
        other => Err(sqlx::Error::Decode(format!("unknown reservation status {other:?}").into())),
    }
}

fn seat_status_from(name: &str) -> Result<SeatStatus, sqlx::Error> {
    match name {
        "AVAILABLE" => Ok(SeatStatus::Available),
        "HELD" => Ok(SeatStatus::Held),
        "SOLD" => Ok(SeatStatus::Sold),
        other => Err(sqlx::Error::Decode(format!("unknown seat status {other:?}").into())),
    }
}

fn seat_status_name(status: SeatStatus) -> &'static str {
    match status {
        SeatStatus::Available => "AVAILABLE",
        SeatStatus::Held => "HELD",
        SeatStatus::Sold => "SOLD",
    }
}

fn reason_name(reason: LedgerReason) -> &'static str {
    match reason {
        LedgerReason::TopUp => "top_up",
        LedgerReason::Charge => "charge",
        LedgerReason::Refund => "refund",
    }
}

fn parse_reason(name: &str) -> Result<LedgerReason, sqlx::Error> {
    match name {
        "top_up" => Ok(LedgerReason::TopUp),
        "charge" => Ok(LedgerReason::Charge),
        "refund" => Ok(LedgerReason::Refund),
        other => Err(sqlx::Error::Decode(format!("unknown ledger reason {other:?}").into())),
    }
}

const OUTBOX_KINDS: [(OutboxKind, &str); 6] = [
    (OutboxKind::ReservationHeld, "reservation_held"),
    (OutboxKind::ReservationConfirmed, "reservation_confirmed"),
    (OutboxKind::ReservationCancelled, "reservation_cancelled"),
    (OutboxKind::ReservationExpired, "reservation_expired"),
    (OutboxKind::PointsCharged, "points_charged"),
    (OutboxKind::PointsRefunded, "points_refunded"),
];

/// The outbox kind's stable name (its serde name), as stored and published.
pub fn outbox_kind_name(kind: OutboxKind) -> &'static str {
    OUTBOX_KINDS.iter().find(|(known, _)| *known == kind).map_or("unknown", |(_, name)| name)
}

fn parse_kind(name: &str) -> Result<OutboxKind, sqlx::Error> {
    OUTBOX_KINDS
        .iter()
        .find(|(_, known)| *known == name)
        .map(|(kind, _)| *kind)
        .ok_or_else(|| sqlx::Error::Decode(format!("unknown outbox kind {name:?}").into()))
}

fn reservation_from(row: &MySqlRow) -> Result<Reservation, sqlx::Error> {
    Ok(Reservation {
        id: row.try_get("id")?,
        schedule_id: row.try_get("schedule_id")?,
        seat_id: row.try_get("seat_id")?,
        user_id: row.try_get("user_id")?,
        status: parse_status(row.try_get("status")?)?,
        fence: FenceToken(row.try_get("fence")?),
        price_points: row.try_get("price_points")?,
        paid_points: row.try_get("paid_points")?,
        held_at_ms: row.try_get("held_at_ms")?,
        expires_at_ms: row.try_get("expires_at_ms")?,
        confirmed_at_ms: row.try_get("confirmed_at_ms")?,
        ended_at_ms: row.try_get("ended_at_ms")?,
    })
}

fn slot_from(row: &MySqlRow) -> Result<SeatSlot, sqlx::Error> {
    let section_index: u32 = row.try_get("section_index")?;
    let holder_reservation_id: Option<u64> = row.try_get("holder_reservation_id")?;
    let holder_fence: Option<u64> = row.try_get("holder_fence")?;
    Ok(SeatSlot {
        seat: Seat {
            id: row.try_get("id")?,
            schedule_id: row.try_get("schedule_id")?,
            section_index: usize::try_from(section_index).unwrap_or(usize::MAX),
            price_points: row.try_get("price_points")?,
        },
        holder: holder_reservation_id.zip(holder_fence.map(FenceToken)),
        sold: row.try_get("sold")?,
        hold_expires_at_ms: row.try_get("hold_expires_at_ms")?,
        fence_last: FenceToken(row.try_get("fence_last")?),
    })
}

fn section_from(row: &MySqlRow) -> Result<Section, sqlx::Error> {
    Ok(Section {
        name: row.try_get("name")?,
        price_points: row.try_get("price_points")?,
        seats_count: row.try_get("seats_count")?,
    })
}

fn summary_from(row: &MySqlRow) -> Result<ScheduleSummary, sqlx::Error> {
    Ok(ScheduleSummary {
        id: row.try_get("id")?,
        concert: row.try_get("concert_name")?,
        opens_at: row.try_get("opens_at_ms")?,
        seats_total: row.try_get("total")?,
        seats_available: row.try_get("available")?,
        seats_sold: row.try_get("sold")?,
    })
}

fn fence_from(row: &MySqlRow) -> Result<AcceptedFence, sqlx::Error> {
    Ok(AcceptedFence {
        schedule_id: row.try_get("schedule_id")?,
        seat_id: row.try_get("seat_id")?,
        fence: FenceToken(row.try_get("fence")?),
        reservation_id: row.try_get("reservation_id")?,
        node: row.try_get("node")?,
        at_ms: row.try_get("at_ms")?,
    })
}

fn account_from(row: &MySqlRow) -> Result<Account, sqlx::Error> {
    Ok(Account { user_id: row.try_get("id")?, name: row.try_get("name")?, balance: row.try_get("balance")? })
}

fn ledger_from(row: &MySqlRow) -> Result<LedgerEntry, sqlx::Error> {
    Ok(LedgerEntry {
        user_id: row.try_get("user_id")?,
        delta: row.try_get("delta")?,
        reason: parse_reason(row.try_get("reason")?)?,
        reservation_id: row.try_get("reservation_id")?,
        idempotency_key: row.try_get("idempotency_key")?,
        at_ms: row.try_get("at_ms")?,
    })
}

fn outbox_from(row: &MySqlRow) -> Result<OutboxEvent, sqlx::Error> {
    Ok(OutboxEvent {
        id: row.try_get("id")?,
        kind: parse_kind(row.try_get("kind")?)?,
        reservation_id: row.try_get("reservation_id")?,
        user_id: row.try_get("user_id")?,
        at_ms: row.try_get("at_ms")?,
        sent: row.try_get("sent")?,
    })
}

fn audit_from(row: &MySqlRow) -> Result<AuditEntry, sqlx::Error> {
    let json = |column: &str| -> Result<serde_json::Value, sqlx::Error> {
        let text: String = row.try_get(column)?;
        serde_json::from_str(&text).map_err(|error| sqlx::Error::Decode(Box::new(error)))
    };
    Ok(AuditEntry {
        at_ms: row.try_get("at_ms")?,
        node: row.try_get("node")?,
        actor: row.try_get("actor")?,
        action: row.try_get("action")?,
        target: row.try_get("target")?,
        before: json("before_json")?,
        after: json("after_json")?,
        outcome: row.try_get("outcome")?,
    })
}

async fn emit(
    tx: &mut Tx,
    kind: OutboxKind,
    reservation_id: Option<ReservationId>,
    user_id: UserId,
    at_ms: u64,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO outbox (kind, reservation_id, user_id, at_ms) VALUES (?, ?, ?, ?)")
        .bind(outbox_kind_name(kind))
        .bind(reservation_id)
        .bind(user_id)
        .bind(at_ms)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

async fn append_ledger(tx: &mut Tx, entry: &LedgerEntry) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO ledger (user_id, delta, reason, reservation_id, idempotency_key, at_ms) \
         VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(entry.user_id)
    .bind(entry.delta)
    .bind(reason_name(entry.reason))
    .bind(entry.reservation_id)
    .bind(entry.idempotency_key.as_deref())
    .bind(entry.at_ms)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn set_balance(tx: &mut Tx, account: &Account) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE accounts SET balance = ? WHERE id = ?")
        .bind(account.balance)
        .bind(account.user_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

async fn lock_account(tx: &mut Tx, user_id: UserId) -> Result<Account, Failure> {
    let row = sqlx::query("SELECT id, name, balance FROM accounts WHERE id = ? FOR UPDATE")
        .bind(user_id)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or(StoreError::NotFound { entity: "user", id: user_id })?;
    Ok(account_from(&row)?)
}

/// The seats each user of a hold (or a batch of holds) has per schedule: the reservations read
/// under the users' account locks, then the holds granted since in the same transaction.
#[derive(Debug, Default)]
struct SeatsTaken {
    /// Status and hold expiry of each held or confirmed reservation.
    stored: BTreeMap<(UserId, ScheduleId), Vec<(ReservationStatus, u64)>>,
    granted: BTreeMap<(UserId, ScheduleId), u32>,
}

impl SeatsTaken {
    /// What `request` is checked against at `now_ms`.
    fn limit(&self, request: &HoldRequest, now_ms: u64) -> SeatLimit {
        let key = (request.user_id, request.schedule_id);
        let stored = self.stored.get(&key).map_or(0, |reservations| {
            reservations.iter().filter(|&&(status, expires_at_ms)| takes_a_seat(status, expires_at_ms, now_ms)).count()
        });
        let taken =
            u32::try_from(stored).unwrap_or(u32::MAX).saturating_add(self.granted.get(&key).copied().unwrap_or(0));
        SeatLimit { taken, max: request.seats_per_user_max }
    }

    /// `request` was granted in this transaction.
    fn granted(&mut self, request: &HoldRequest) {
        *self.granted.entry((request.user_id, request.schedule_id)).or_default() += 1;
    }
}

/// Locks the accounts of `user_ids` in id order (after any seat: the lock order), then reads
/// their held and confirmed reservations; returns the users that exist and their seats.
///
/// The read is the transaction's first plain read, so its snapshot is taken once the account
/// locks are held (InnoDB takes a repeatable-read snapshot at the first consistent read, not at
/// `BEGIN`): it sees every hold committed by whoever held those locks before.
async fn lock_users(tx: &mut Tx, user_ids: &BTreeSet<UserId>) -> Result<(BTreeSet<UserId>, SeatsTaken), sqlx::Error> {
    let mut query = QueryBuilder::<MySql>::new("SELECT id FROM accounts WHERE id IN (");
    let mut list = query.separated(", ");
    for id in user_ids {
        list.push_bind(*id);
    }
    query.push(") ORDER BY id FOR UPDATE");
    let rows = query.build().fetch_all(&mut **tx).await?;
    let existing = rows.iter().map(|row| row.try_get::<u64, _>("id")).collect::<Result<BTreeSet<_>, _>>()?;
    let mut seats = SeatsTaken::default();
    if existing.is_empty() {
        return Ok((existing, seats));
    }
    let mut query = QueryBuilder::<MySql>::new(
        "SELECT user_id, schedule_id, status, expires_at_ms FROM reservations WHERE status IN ('HELD', 'CONFIRMED') \
         AND user_id IN (",
    );
    let mut list = query.separated(", ");
    for id in &existing {
        list.push_bind(*id);
    }
    query.push(")");
    for row in query.build().fetch_all(&mut **tx).await? {
        let key = (row.try_get("user_id")?, row.try_get("schedule_id")?);
        let taken = (parse_status(row.try_get("status")?)?, row.try_get("expires_at_ms")?);
        seats.stored.entry(key).or_default().push(taken);
    }
    Ok((existing, seats))
}

async fn lock_seat(tx: &mut Tx, schedule_id: ScheduleId, seat_id: SeatId) -> Result<SeatSlot, Failure> {
    let row =
        sqlx::query(concat!("SELECT ", seat_columns!(), " FROM seats WHERE id = ? AND schedule_id = ? FOR UPDATE"))
            .bind(seat_id)
            .bind(schedule_id)
            .fetch_optional(&mut **tx)
            .await?
            .ok_or(StoreError::NotFound { entity: "seat", id: seat_id })?;
    Ok(slot_from(&row)?)
}

async fn lock_reservation(tx: &mut Tx, reservation_id: ReservationId) -> Result<Reservation, Failure> {
    let row = sqlx::query(concat!("SELECT ", reservation_columns!(), " FROM reservations WHERE id = ? FOR UPDATE"))
        .bind(reservation_id)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or(StoreError::NotFound { entity: "reservation", id: reservation_id })?;
    Ok(reservation_from(&row)?)
}

async fn write_reservation(tx: &mut Tx, reservation: &Reservation) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE reservations SET status = ?, paid_points = ?, confirmed_at_ms = ?, ended_at_ms = ? WHERE id = ?",
    )
    .bind(status_name(reservation.status))
    .bind(reservation.paid_points)
    .bind(reservation.confirmed_at_ms)
    .bind(reservation.ended_at_ms)
    .bind(reservation.id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Frees the seat if `reservation_id` still holds it (the seat's row must be locked).
async fn release_seat(tx: &mut Tx, seat_id: SeatId, reservation_id: ReservationId) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE seats SET holder_reservation_id = NULL, holder_fence = NULL, sold = FALSE, hold_expires_at_ms = 0 \
         WHERE id = ? AND holder_reservation_id = ?",
    )
    .bind(seat_id)
    .bind(reservation_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Ends a hold that ran out of time, as the memory store does: the reservation expires, its
/// seat is freed and the outbox says so; a reservation that cannot expire is left alone.
/// The seat's row must already be locked. Returns whether it expired.
async fn expire_reservation(tx: &mut Tx, reservation_id: ReservationId, now_ms: u64) -> Result<bool, Failure> {
    let mut reservation = lock_reservation(tx, reservation_id).await?;
    if reservation.expire(now_ms).is_err() {
        return Ok(false);
    }
    write_reservation(tx, &reservation).await?;
    release_seat(tx, reservation.seat_id, reservation_id).await?;
    emit(tx, OutboxKind::ReservationExpired, Some(reservation_id), reservation.user_id, now_ms).await?;
    Ok(true)
}

impl MariaDbStore {
    async fn insert_hold(
        &self,
        request: &HoldRequest,
        guard: Option<WriteGuard>,
        now_ms: u64,
    ) -> Result<Reservation, Failure> {
        let mut tx = self.pool.begin().await?;
        // Seat, then account: the lock order. A missing user is named before a missing seat,
        // as a batch does.
        let slot = match lock_seat(&mut tx, request.schedule_id, request.seat_id).await {
            Ok(slot) => Some(slot),
            Err(Failure::Store(StoreError::NotFound { .. })) => None,
            Err(error) => return Err(error),
        };
        let (users, seats) = lock_users(&mut tx, &BTreeSet::from([request.user_id])).await?;
        if !users.contains(&request.user_id) {
            return Err(StoreError::NotFound { entity: "user", id: request.user_id }.into());
        }
        let mut slot = slot.ok_or(StoreError::NotFound { entity: "seat", id: request.seat_id })?;
        let previous = slot.holder.filter(|_| !slot.sold).map(|(holder, _)| holder);
        // The domain decides on the slot; the reservation's id is known only after its insert.
        let limit = seats.limit(request, now_ms);
        let fence = slot.hold_within_limit(0, guard, limit, request.hold_ttl_ms, now_ms)?;
        if let Some(previous) = previous {
            expire_reservation(&mut tx, previous, now_ms).await?;
        }
        let mut reservation = Reservation::hold(0, &slot.seat, request.user_id, fence, request.hold_ttl_ms, now_ms);
        let inserted = sqlx::query(
            "INSERT INTO reservations (schedule_id, seat_id, user_id, status, fence, price_points, held_at_ms, \
             expires_at_ms) VALUES (?, ?, ?, 'HELD', ?, ?, ?, ?)",
        )
        .bind(reservation.schedule_id)
        .bind(reservation.seat_id)
        .bind(reservation.user_id)
        .bind(fence.0)
        .bind(reservation.price_points)
        .bind(reservation.held_at_ms)
        .bind(reservation.expires_at_ms)
        .execute(&mut *tx)
        .await?;
        reservation.id = inserted.last_insert_id();
        sqlx::query(
            "UPDATE seats SET holder_reservation_id = ?, holder_fence = ?, sold = FALSE, hold_expires_at_ms = ?, \
             fence_last = ? WHERE id = ?",
        )
        .bind(reservation.id)
        .bind(fence.0)
        .bind(slot.hold_expires_at_ms)
        .bind(slot.fence_last.0)
        .bind(request.seat_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO accepted_fences (schedule_id, seat_id, fence, reservation_id, node, at_ms) \
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(request.schedule_id)
        .bind(request.seat_id)
        .bind(fence.0)
        .bind(reservation.id)
        .bind(&request.node)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        emit(&mut tx, OutboxKind::ReservationHeld, Some(reservation.id), request.user_id, now_ms).await?;
        tx.commit().await?;
        Ok(reservation)
    }

    /// Caches a completed record, after reading back that the database holds exactly it (a
    /// completion that lost its lease changed nothing there and must not be cached).
    async fn cache_completed(
        &self,
        cache: &IdempotencyCache,
        key: &str,
        fingerprint: &[u8; 32],
        response: &StoredResponse,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let stored = self.call(|| self.idempotency_record(key)).await?;
        match stored {
            Some(IdempotencyRecord::Completed { fingerprint: held, response: kept, expires_at_ms, .. })
                if held == *fingerprint && kept == *response && expires_at_ms > now_ms =>
            {
                cache.put(key, fingerprint, response, expires_at_ms, now_ms).await
            }
            _ => Ok(()),
        }
    }

    /// Reads a reservation without locking it, to learn which seat to lock first.
    async fn peek_owned(&self, reservation_id: ReservationId, user_id: UserId) -> Result<Reservation, Failure> {
        let reservation = self.read_reservation(reservation_id).await?;
        if reservation.user_id != user_id {
            return Err(StoreError::NotOwner.into());
        }
        Ok(reservation)
    }

    async fn read_reservation(&self, reservation_id: ReservationId) -> Result<Reservation, Failure> {
        let row = sqlx::query(concat!("SELECT ", reservation_columns!(), " FROM reservations WHERE id = ?"))
            .bind(reservation_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound { entity: "reservation", id: reservation_id })?;
        Ok(reservation_from(&row)?)
    }

    async fn confirm_once(
        &self,
        reservation_id: ReservationId,
        user_id: UserId,
        idempotency_key: Option<&str>,
        now_ms: u64,
    ) -> Result<Reservation, Failure> {
        let peeked = self.peek_owned(reservation_id, user_id).await?;
        if peeked.status == ReservationStatus::Confirmed {
            return Ok(peeked);
        }
        let mut tx = self.pool.begin().await?;
        let slot = lock_seat(&mut tx, peeked.schedule_id, peeked.seat_id).await?;
        let mut reservation = lock_reservation(&mut tx, reservation_id).await?;
        if reservation.status == ReservationStatus::Confirmed {
            return Ok(reservation);
        }
        if let Err(error) = reservation.check_confirmable(now_ms) {
            expire_reservation(&mut tx, reservation_id, now_ms).await?;
            tx.commit().await?;
            return Err(error.into());
        }
        slot.check_holder(reservation_id, reservation.fence)?;
        let mut account = lock_account(&mut tx, user_id).await?;
        let charge =
            account.debit(reservation.price_points, reservation_id, idempotency_key.map(str::to_owned), now_ms)?;
        reservation.confirm(reservation.price_points, now_ms)?;
        set_balance(&mut tx, &account).await?;
        append_ledger(&mut tx, &charge).await?;
        sqlx::query("UPDATE seats SET sold = TRUE WHERE id = ?").bind(slot.seat.id).execute(&mut *tx).await?;
        write_reservation(&mut tx, &reservation).await?;
        emit(&mut tx, OutboxKind::PointsCharged, Some(reservation_id), user_id, now_ms).await?;
        emit(&mut tx, OutboxKind::ReservationConfirmed, Some(reservation_id), user_id, now_ms).await?;
        tx.commit().await?;
        Ok(reservation)
    }

    async fn cancel_once(
        &self,
        reservation_id: ReservationId,
        user_id: UserId,
        now_ms: u64,
    ) -> Result<Reservation, Failure> {
        let peeked = self.peek_owned(reservation_id, user_id).await?;
        let mut tx = self.pool.begin().await?;
        lock_seat(&mut tx, peeked.schedule_id, peeked.seat_id).await?;
        let mut reservation = lock_reservation(&mut tx, reservation_id).await?;
        let refund = reservation.cancel(now_ms)?;
        write_reservation(&mut tx, &reservation).await?;
        release_seat(&mut tx, reservation.seat_id, reservation_id).await?;
        if refund > 0 {
            let mut account = lock_account(&mut tx, user_id).await?;
            let entry = account.refund(refund, reservation_id, now_ms);
            set_balance(&mut tx, &account).await?;
            append_ledger(&mut tx, &entry).await?;
            emit(&mut tx, OutboxKind::PointsRefunded, Some(reservation_id), user_id, now_ms).await?;
        }
        emit(&mut tx, OutboxKind::ReservationCancelled, Some(reservation_id), user_id, now_ms).await?;
        tx.commit().await?;
        Ok(reservation)
    }

    /// Expires one hold found past its time. Another node sweeping at once skips the seat it
    /// is working on (`SKIP LOCKED`) instead of queueing behind it.
    async fn expire_one(&self, reservation_id: ReservationId, seat_id: SeatId, now_ms: u64) -> Result<bool, Failure> {
        let mut tx = self.pool.begin().await?;
        let locked = sqlx::query("SELECT id FROM seats WHERE id = ? FOR UPDATE SKIP LOCKED")
            .bind(seat_id)
            .fetch_optional(&mut *tx)
            .await?;
        if locked.is_none() {
            return Ok(false);
        }
        let expired = expire_reservation(&mut tx, reservation_id, now_ms).await?;
        tx.commit().await?;
        Ok(expired)
    }

    async fn top_up_once(
        &self,
        user_id: UserId,
        amount: u64,
        idempotency_key: &str,
        now_ms: u64,
    ) -> Result<Account, Failure> {
        let mut tx = self.pool.begin().await?;
        let claimed = sqlx::query("INSERT IGNORE INTO top_ups (idempotency_key, user_id) VALUES (?, ?)")
            .bind(idempotency_key)
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        if claimed.rows_affected() == 0 {
            let owner: u64 = sqlx::query_scalar("SELECT user_id FROM top_ups WHERE idempotency_key = ?")
                .bind(idempotency_key)
                .fetch_one(&mut *tx)
                .await?;
            if owner != user_id {
                return Err(StoreError::from(TransitionError::TopUpKeyReused).into());
            }
            let account = lock_account(&mut tx, user_id).await?;
            tx.commit().await?;
            return Ok(account);
        }
        let mut account = lock_account(&mut tx, user_id).await?;
        let entry = account.top_up(amount, Some(idempotency_key.to_owned()), now_ms)?;
        set_balance(&mut tx, &account).await?;
        append_ledger(&mut tx, &entry).await?;
        emit(&mut tx, OutboxKind::PointsCharged, None, user_id, now_ms).await?;
        tx.commit().await?;
        Ok(account)
    }

    async fn put_schedule_once(&self, schedule: &Schedule) -> Result<(), Failure> {
        let mut tx = self.pool.begin().await?;
        let exists = sqlx::query("SELECT id FROM schedules WHERE id = ? FOR UPDATE")
            .bind(schedule.id)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_some() {
            return Err(StoreError::Invalid { reason: format!("schedule {} exists", schedule.id) }.into());
        }
        let first_seat_id: u64 = sqlx::query_scalar("SELECT next_id FROM id_counters WHERE name = 'seat' FOR UPDATE")
            .fetch_one(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO schedules (id, concert_id, concert_name, opens_at_ms) VALUES (?, ?, ?, ?)")
            .bind(schedule.id)
            .bind(schedule.concert.id)
            .bind(&schedule.concert.name)
            .bind(schedule.opens_at_ms)
            .execute(&mut *tx)
            .await?;
        for (section_index, section) in schedule.sections.iter().enumerate() {
            sqlx::query(
                "INSERT INTO sections (schedule_id, section_index, name, price_points, seats_count) \
                 VALUES (?, ?, ?, ?, ?)",
            )
            .bind(schedule.id)
            .bind(u32::try_from(section_index).unwrap_or(u32::MAX))
            .bind(&section.name)
            .bind(section.price_points)
            .bind(section.seats_count)
            .execute(&mut *tx)
            .await?;
        }
        let seats = schedule.layout_seats(first_seat_id);
        for chunk in seats.chunks(SEAT_INSERT_BATCH_MAX) {
            let mut insert =
                QueryBuilder::<MySql>::new("INSERT INTO seats (id, schedule_id, section_index, price_points) ");
            insert.push_values(chunk, |mut row, seat| {
                row.push_bind(seat.id)
                    .push_bind(seat.schedule_id)
                    .push_bind(u32::try_from(seat.section_index).unwrap_or(u32::MAX))
                    .push_bind(seat.price_points);
            });
            insert.build().execute(&mut *tx).await?;
        }
        sqlx::query("UPDATE id_counters SET next_id = ? WHERE name = 'seat'")
            .bind(first_seat_id + seats.len() as u64)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn sections(&self, schedule_id: ScheduleId) -> Result<Vec<Section>, Failure> {
        let rows = sqlx::query(
            "SELECT name, price_points, seats_count FROM sections WHERE schedule_id = ? ORDER BY section_index",
        )
        .bind(schedule_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(section_from).collect::<Result<_, _>>()?)
    }

    async fn schedule_once(&self, schedule_id: ScheduleId) -> Result<Schedule, Failure> {
        let row = sqlx::query("SELECT id, concert_id, concert_name, opens_at_ms FROM schedules WHERE id = ?")
            .bind(schedule_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound { entity: "schedule", id: schedule_id })?;
        Ok(Schedule {
            id: row.try_get("id")?,
            concert: Concert { id: row.try_get("concert_id")?, name: row.try_get("concert_name")? },
            opens_at_ms: row.try_get("opens_at_ms")?,
            sections: self.sections(schedule_id).await?,
        })
    }

    async fn seat_map_once(
        &self,
        schedule_id: ScheduleId,
        filter: &SeatFilter,
        now_ms: u64,
    ) -> Result<Vec<SeatView>, Failure> {
        let schedule = self.schedule_once(schedule_id).await?;
        let section_index = match &filter.section {
            None => None,
            Some(name) => match schedule.sections.iter().position(|section| section.name == *name) {
                Some(index) => Some(u32::try_from(index).unwrap_or(u32::MAX)),
                None => return Ok(Vec::new()),
            },
        };
        let status = filter.status.map(seat_status_name);
        let rows = sqlx::query(concat!(
            "SELECT id, section_index, price_points, ",
            seat_status_sql!(),
            " AS status FROM seats WHERE schedule_id = ? AND (? IS NULL OR section_index = ?) \
             HAVING (? IS NULL OR status = ?) ORDER BY id LIMIT ?"
        ))
        .bind(now_ms)
        .bind(schedule_id)
        .bind(section_index)
        .bind(section_index)
        .bind(status)
        .bind(status)
        .bind(u64::from(filter.limit.unwrap_or(u32::MAX)))
        .fetch_all(&self.pool)
        .await?;
        let mut views = Vec::with_capacity(rows.len());
        for row in rows {
            let section_index: u32 = row.try_get("section_index")?;
            let section = usize::try_from(section_index).ok().and_then(|index| schedule.sections.get(index));
            views.push(SeatView {
                id: row.try_get("id")?,
                section: section.map(|section| section.name.clone()).unwrap_or_default(),
                price: row.try_get("price_points")?,
                status: seat_status_from(row.try_get("status")?)?,
            });
        }
        Ok(views)
    }

    async fn idempotency_begin_once(
        &self,
        key: &str,
        fingerprint: &[u8; 32],
        lease_ms: u64,
        ttl_ms: u64,
        now_ms: u64,
    ) -> Result<IdempotencyDecision, Failure> {
        let lease_until_ms = now_ms.saturating_add(lease_ms);
        let expires_at_ms = now_ms.saturating_add(ttl_ms);
        for _ in 0..IDEMPOTENCY_CLAIM_ATTEMPTS_MAX {
            let claimed = sqlx::query(
                "INSERT IGNORE INTO idempotency_records (idempotency_key, fingerprint, state, lease_until_ms, \
                 expires_at_ms) VALUES (?, ?, 'in_progress', ?, ?)",
            )
            .bind(key)
            .bind(&fingerprint[..])
            .bind(lease_until_ms)
            .bind(expires_at_ms)
            .execute(&self.pool)
            .await?;
            if claimed.rows_affected() == 1 {
                return Ok(IdempotencyDecision::Proceed);
            }
            let Some(record) = self.idempotency_record(key).await? else { continue };
            let decision = idempotency_decision(Some(&record), fingerprint, now_ms);
            if decision != IdempotencyDecision::Proceed {
                return Ok(decision);
            }
            // The record expired, or its lease lapsed: take it over, unless another caller just did.
            let taken = sqlx::query(
                "UPDATE idempotency_records SET fingerprint = ?, state = 'in_progress', lease_until_ms = ?, \
                 expires_at_ms = ?, response_status = NULL, response_content_type = NULL, response_body = NULL, \
                 completed_at_ms = NULL WHERE idempotency_key = ? AND (expires_at_ms <= ? OR (fingerprint = ? \
                 AND state = 'in_progress' AND lease_until_ms <= ?))",
            )
            .bind(&fingerprint[..])
            .bind(lease_until_ms)
            .bind(expires_at_ms)
            .bind(key)
            .bind(now_ms)
            .bind(&fingerprint[..])
            .bind(now_ms)
            .execute(&self.pool)
            .await?;
            if taken.rows_affected() == 1 {
                return Ok(IdempotencyDecision::Proceed);
            }
        }
        Ok(IdempotencyDecision::InProgress)
    }

    async fn idempotency_record(&self, key: &str) -> Result<Option<IdempotencyRecord>, Failure> {
        let Some(row) = sqlx::query(
            "SELECT fingerprint, state, lease_until_ms, response_status, response_content_type, response_body, \
             completed_at_ms, expires_at_ms FROM idempotency_records WHERE idempotency_key = ?",
        )
        .bind(key)
        .fetch_optional(&self.pool)
        .await?
        else {
            return Ok(None);
        };
        let stored: Vec<u8> = row.try_get("fingerprint")?;
        let fingerprint: [u8; 32] =
            stored.try_into().map_err(|_| sqlx::Error::Decode("an idempotency fingerprint is not 32 bytes".into()))?;
        let state: String = row.try_get("state")?;
        let expires_at_ms = row.try_get("expires_at_ms")?;
        Ok(Some(if state == "completed" {
            IdempotencyRecord::Completed {
                fingerprint,
                response: StoredResponse {
                    status: row.try_get::<Option<u16>, _>("response_status")?.unwrap_or(200),
                    content_type: row.try_get::<Option<String>, _>("response_content_type")?.unwrap_or_default(),
                    body: row.try_get::<Option<Vec<u8>>, _>("response_body")?.unwrap_or_default(),
                },
                completed_at_ms: row.try_get::<Option<u64>, _>("completed_at_ms")?.unwrap_or(0),
                expires_at_ms,
            }
        } else {
            IdempotencyRecord::InProgress { fingerprint, lease_until_ms: row.try_get("lease_until_ms")?, expires_at_ms }
        }))
    }

    async fn dump_once(&self) -> Result<RecordDump, Failure> {
        let schedule_ids: Vec<u64> =
            sqlx::query_scalar("SELECT id FROM schedules ORDER BY id").fetch_all(&self.pool).await?;
        let mut schedules = Vec::with_capacity(schedule_ids.len());
        for schedule_id in schedule_ids {
            schedules.push(self.schedule_once(schedule_id).await?);
        }
        let rows = sqlx::query("SELECT id, name, balance FROM accounts ORDER BY id").fetch_all(&self.pool).await?;
        let accounts = rows.iter().map(account_from).collect::<Result<_, _>>()?;
        let rows = sqlx::query(
            "SELECT user_id, delta, reason, reservation_id, idempotency_key, at_ms FROM ledger ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        let ledger = rows.iter().map(ledger_from).collect::<Result<_, _>>()?;
        let rows = sqlx::query(concat!("SELECT ", reservation_columns!(), " FROM reservations ORDER BY id"))
            .fetch_all(&self.pool)
            .await?;
        let reservations = rows.iter().map(reservation_from).collect::<Result<_, _>>()?;
        let rows = sqlx::query(
            "SELECT schedule_id, seat_id, fence, reservation_id, node, at_ms FROM accepted_fences ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        let fences = rows.iter().map(fence_from).collect::<Result<_, _>>()?;
        let rows = sqlx::query("SELECT id, kind, reservation_id, user_id, at_ms, sent FROM outbox ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        let outbox = rows.iter().map(outbox_from).collect::<Result<_, _>>()?;
        Ok(RecordDump { schedules, accounts, ledger, reservations, fences, outbox })
    }
}

/// MariaDB's longest database name.
const DATABASE_NAME_LEN_MAX: usize = 64;
/// Seats written per `INSERT` when a schedule is added.
const SEAT_INSERT_BATCH_MAX: usize = 1_000;
/// How often claiming an idempotency key is tried before the caller is told it is in progress.
const IDEMPOTENCY_CLAIM_ATTEMPTS_MAX: u32 = 3;

#[async_trait]
impl RecordStore for MariaDbStore {
    async fn ping(&self) -> Result<(), StoreError> {
        self.call(|| async { Ok(sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ())?) }).await
    }

    async fn put_schedule(&self, schedule: Schedule) -> Result<(), StoreError> {
        self.call(|| self.put_schedule_once(&schedule)).await
    }

    async fn schedules(&self, now_ms: u64) -> Result<Vec<ScheduleSummary>, StoreError> {
        self.call(|| async {
            let rows = sqlx::query(concat!(
                "SELECT s.id, s.concert_name, s.opens_at_ms, CAST(COUNT(seats.id) AS UNSIGNED) AS total, \
                 CAST(COALESCE(SUM(",
                seat_status_sql!(),
                " = 'AVAILABLE'), 0) AS UNSIGNED) AS available, \
                 CAST(COALESCE(SUM(seats.holder_reservation_id IS NOT NULL AND seats.sold), 0) AS UNSIGNED) AS sold \
                 FROM schedules s LEFT JOIN seats ON seats.schedule_id = s.id GROUP BY s.id ORDER BY s.id"
            ))
            .bind(now_ms)
            .fetch_all(&self.pool)
            .await?;
            Ok(rows.iter().map(summary_from).collect::<Result<_, _>>()?)
        })
        .await
    }

    async fn schedule(&self, schedule_id: ScheduleId) -> Result<Schedule, StoreError> {
        self.call(|| self.schedule_once(schedule_id)).await
    }

    async fn seat_map(
        &self,
        schedule_id: ScheduleId,
        filter: SeatFilter,
        now_ms: u64,
    ) -> Result<Vec<SeatView>, StoreError> {
        self.call(|| self.seat_map_once(schedule_id, &filter, now_ms)).await
    }

    async fn seat(
        &self,
        schedule_id: ScheduleId,
        seat_id: SeatId,
        fence: Option<FenceToken>,
    ) -> Result<SeatSlot, StoreError> {
        self.call(|| async {
            let mut tx = self.pool.begin().await?;
            let mut slot = lock_seat(&mut tx, schedule_id, seat_id).await?;
            if let Some(fence) = fence {
                slot.observe_fence(fence);
                sqlx::query("UPDATE seats SET fence_last = ? WHERE id = ?")
                    .bind(slot.fence_last.0)
                    .bind(seat_id)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(slot)
        })
        .await
    }

    async fn create_user(&self, name: String, points: u64, now_ms: u64) -> Result<Account, StoreError> {
        self.call(|| async {
            let mut account = Account { user_id: 0, name: name.clone(), balance: 0 };
            let top_up = if points > 0 { Some(account.top_up(points, None, now_ms)?) } else { None };
            let mut tx = self.pool.begin().await?;
            let inserted = sqlx::query("INSERT INTO accounts (name, balance) VALUES (?, ?)")
                .bind(&account.name)
                .bind(account.balance)
                .execute(&mut *tx)
                .await?;
            account.user_id = inserted.last_insert_id();
            if let Some(mut entry) = top_up {
                entry.user_id = account.user_id;
                append_ledger(&mut tx, &entry).await?;
            }
            tx.commit().await?;
            Ok(account)
        })
        .await
    }

    async fn account(&self, user_id: UserId) -> Result<Account, StoreError> {
        self.call(|| async {
            let row = sqlx::query("SELECT id, name, balance FROM accounts WHERE id = ?")
                .bind(user_id)
                .fetch_optional(&self.pool)
                .await?
                .ok_or(StoreError::NotFound { entity: "user", id: user_id })?;
            Ok(account_from(&row)?)
        })
        .await
    }

    async fn existing_users(&self, first: UserId, count: u32) -> Result<Vec<UserId>, StoreError> {
        super::check_user_ids_read(count)?;
        let end = first.saturating_add(u64::from(count));
        self.call(|| async {
            let ids: Vec<u64> = sqlx::query_scalar("SELECT id FROM accounts WHERE id >= ? AND id < ? ORDER BY id")
                .bind(first)
                .bind(end)
                .fetch_all(&self.pool)
                .await?;
            Ok(ids)
        })
        .await
    }

    async fn top_up(
        &self,
        user_id: UserId,
        amount: u64,
        idempotency_key: String,
        now_ms: u64,
    ) -> Result<Account, StoreError> {
        self.call(|| self.top_up_once(user_id, amount, &idempotency_key, now_ms)).await
    }

    async fn try_hold(&self, request: HoldRequest, now_ms: u64) -> Result<Reservation, StoreError> {
        let Some(gate) = &self.gate else {
            return self.batcher.hold(self, request, None, now_ms).await;
        };
        let pass = gate.take(&request, now_ms).await?.ok_or(TransitionError::SeatUnavailable)?;
        let held = self.batcher.hold(self, request, None, now_ms).await;
        let gate_kept = match &held {
            Ok(reservation) => gate.bind(&pass, reservation.id).await,
            Err(_) => gate.release(&pass).await,
        };
        if let Err(error) = gate_kept {
            tracing::warn!(%error, "seat gate not updated; it opens when the hold would expire");
        }
        held
    }

    async fn write_hold(
        &self,
        request: HoldRequest,
        guard: WriteGuard,
        now_ms: u64,
    ) -> Result<Reservation, StoreError> {
        self.batcher.hold(self, request, Some(guard), now_ms).await
    }

    async fn confirm(
        &self,
        reservation_id: ReservationId,
        user_id: UserId,
        idempotency_key: Option<String>,
        now_ms: u64,
    ) -> Result<Reservation, StoreError> {
        let confirmed =
            self.call(|| self.confirm_once(reservation_id, user_id, idempotency_key.as_deref(), now_ms)).await?;
        if let Some(gate) = &self.gate
            && let Err(error) = gate.sold(confirmed.schedule_id, confirmed.seat_id, confirmed.id, now_ms).await
        {
            tracing::warn!(%error, "seat gate not marked sold; the record store still refuses the seat");
        }
        Ok(confirmed)
    }

    async fn cancel(
        &self,
        reservation_id: ReservationId,
        user_id: UserId,
        now_ms: u64,
    ) -> Result<Reservation, StoreError> {
        let cancelled = self.call(|| self.cancel_once(reservation_id, user_id, now_ms)).await?;
        if let Some(gate) = &self.gate
            && let Err(error) = gate.freed(cancelled.schedule_id, cancelled.seat_id, cancelled.id).await
        {
            tracing::warn!(%error, "seat gate not opened; it opens when the hold would have expired");
        }
        Ok(cancelled)
    }

    async fn reservation(&self, reservation_id: ReservationId) -> Result<Reservation, StoreError> {
        self.call(|| self.read_reservation(reservation_id)).await
    }

    async fn expire_holds(&self, now_ms: u64, limit: u32) -> Result<u32, StoreError> {
        let due = self
            .call(|| async {
                let rows = sqlx::query(
                    "SELECT id, seat_id FROM reservations WHERE status = 'HELD' AND expires_at_ms <= ? \
                     ORDER BY expires_at_ms, id LIMIT ?",
                )
                .bind(now_ms)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
                let mut due = Vec::with_capacity(rows.len());
                for row in rows {
                    due.push((row.try_get::<u64, _>("id")?, row.try_get::<u64, _>("seat_id")?));
                }
                Ok(due)
            })
            .await?;
        let mut expired = 0;
        for (reservation_id, seat_id) in due {
            if self.call(|| self.expire_one(reservation_id, seat_id, now_ms)).await? {
                expired += 1;
            }
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
        if let Some(cache) = &self.idempotency_cache {
            match cache.get(&key).await {
                // An expired record is claimed anew in the database, which decides between callers.
                Ok(Some(completed)) if completed.expires_at_ms() > now_ms => {
                    return Ok(idempotency_decision(Some(&completed), &fingerprint, now_ms));
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "idempotency cache unavailable; asking the database"),
            }
        }
        let decision = self.call(|| self.idempotency_begin_once(&key, &fingerprint, lease_ms, ttl_ms, now_ms)).await?;
        if let (Some(cache), IdempotencyDecision::Replay(response)) = (&self.idempotency_cache, &decision)
            && let Err(error) = self.cache_completed(cache, &key, &fingerprint, response, now_ms).await
        {
            tracing::warn!(%error, "completed idempotency record not cached");
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
        self.call(|| async {
            sqlx::query(
                "UPDATE idempotency_records SET state = 'completed', response_status = ?, response_content_type = ?, \
                 response_body = ?, completed_at_ms = ?, expires_at_ms = ? \
                 WHERE idempotency_key = ? AND fingerprint = ? AND state = 'in_progress'",
            )
            .bind(response.status)
            .bind(&response.content_type)
            .bind(&response.body)
            .bind(now_ms)
            .bind(now_ms.saturating_add(ttl_ms))
            .bind(&key)
            .bind(&fingerprint[..])
            .execute(&self.pool)
            .await?;
            Ok(())
        })
        .await?;
        if let Some(cache) = &self.idempotency_cache
            && let Err(error) = self.cache_completed(cache, &key, &fingerprint, &response, now_ms).await
        {
            tracing::warn!(%error, "completed idempotency record not cached");
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
        // One statement, on the primary key. The connection reports rows found, not rows changed
        // (sqlx sets CLIENT_FOUND_ROWS), so a renewal that moves nothing still counts as held.
        self.call(|| async {
            let renewed = sqlx::query(
                "UPDATE idempotency_records SET lease_until_ms = GREATEST(lease_until_ms, ?) \
                 WHERE idempotency_key = ? AND fingerprint = ? AND state = 'in_progress' AND lease_until_ms > ? \
                 AND expires_at_ms > ?",
            )
            .bind(now_ms.saturating_add(lease_ms))
            .bind(&key)
            .bind(&fingerprint[..])
            .bind(now_ms)
            .bind(now_ms)
            .execute(&self.pool)
            .await?;
            Ok(renewed.rows_affected() == 1)
        })
        .await
    }

    async fn idempotency_release(&self, key: String, fingerprint: [u8; 32]) -> Result<(), StoreError> {
        self.call(|| async {
            sqlx::query(
                "DELETE FROM idempotency_records WHERE idempotency_key = ? AND fingerprint = ? AND state = 'in_progress'",
            )
            .bind(&key)
            .bind(&fingerprint[..])
            .execute(&self.pool)
            .await?;
            Ok(())
        })
        .await
    }

    async fn purge_idempotency(&self, now_ms: u64, limit: u32) -> Result<u32, StoreError> {
        // Nodes purging at once lock the same oldest rows in the same order: one waits for the
        // other and then finds them gone. A key claimed again meanwhile no longer matches.
        self.call(|| async {
            let purged =
                sqlx::query("DELETE FROM idempotency_records WHERE expires_at_ms <= ? ORDER BY expires_at_ms LIMIT ?")
                    .bind(now_ms)
                    .bind(limit)
                    .execute(&self.pool)
                    .await?;
            Ok(u32::try_from(purged.rows_affected()).unwrap_or(u32::MAX))
        })
        .await
    }

    async fn outbox_pending(&self, limit: u32) -> Result<Vec<OutboxEvent>, StoreError> {
        self.call(|| async {
            let rows = sqlx::query(
                "SELECT id, kind, reservation_id, user_id, at_ms, sent FROM outbox WHERE sent = FALSE ORDER BY id LIMIT ?",
            )
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
            Ok(rows.iter().map(outbox_from).collect::<Result<_, _>>()?)
        })
        .await
    }

    async fn outbox_mark_sent(&self, ids: Vec<u64>) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.call(|| async {
            for chunk in ids.chunks(SEAT_INSERT_BATCH_MAX) {
                let mut update = QueryBuilder::<MySql>::new("UPDATE outbox SET sent = TRUE WHERE id IN (");
                let mut list = update.separated(", ");
                for id in chunk {
                    list.push_bind(*id);
                }
                update.push(")");
                update.build().execute(&self.pool).await?;
            }
            Ok(())
        })
        .await
    }

    async fn append_audit(&self, entry: AuditEntry) -> Result<(), StoreError> {
        self.call(|| async {
            let inserted = sqlx::query(
                "INSERT INTO audit_log (at_ms, node, actor, action, target, before_json, after_json, outcome) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(entry.at_ms)
            .bind(&entry.node)
            .bind(&entry.actor)
            .bind(&entry.action)
            .bind(&entry.target)
            .bind(entry.before.to_string())
            .bind(entry.after.to_string())
            .bind(&entry.outcome)
            .execute(&self.pool)
            .await?;
            let oldest_kept = inserted.last_insert_id().saturating_sub(self.config.audit_entries_max);
            if oldest_kept > 0 {
                sqlx::query("DELETE FROM audit_log WHERE id <= ?").bind(oldest_kept).execute(&self.pool).await?;
            }
            Ok(())
        })
        .await
    }

    async fn audit(&self, limit: u32) -> Result<Vec<AuditEntry>, StoreError> {
        self.call(|| async {
            let rows = sqlx::query(
                "SELECT at_ms, node, actor, action, target, before_json, after_json, outcome FROM \
                 (SELECT * FROM audit_log ORDER BY id DESC LIMIT ?) newest ORDER BY id",
            )
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
            Ok(rows.iter().map(audit_from).collect::<Result<_, _>>()?)
        })
        .await
    }

    async fn dump(&self) -> Result<RecordDump, StoreError> {
        self.call(|| self.dump_once()).await
    }
}
