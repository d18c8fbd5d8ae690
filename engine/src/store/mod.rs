//! The stores behind the engine, as traits at the level of the domain.
//!
//! Two roles, so that each can be placed, cut off or fail on its own:
//! - [`RecordStore`], the system of record: catalogue, accounts and ledger, seats and
//!   reservations, idempotency records, outbox and audit log;
//! - [`CacheStore`], the fast shared state: waiting lines and admission, locks for the lock
//!   hold modes.
//!
//! **Invariant:** every method is one atomic step of the domain (a hold is one call; a
//! confirm checks the fence, debits, confirms and writes its outbox event together), so a
//! caller never has to compose store calls to stay correct.
//! **API boundary:** callers see domain types and [`StoreError`] only, never a backend's types.
//!
//! Implementations: [`MemoryStore`] (both roles, one process; the reference semantics),
//! [`MariaDbStore`] (the record role on MariaDB, with [`SeatGate`] and [`IdempotencyCache`] on
//! Redis in front of it) and [`RedisStore`] (the cache role). One contract suite
//! (`engine/tests/it/contract.rs`) runs the same test bodies against each.

mod mariadb;
mod memory;
mod redis;
mod relay;
mod seat_hints;

pub use mariadb::{
    HOLD_BATCH_MAX_DEFAULT, HOLD_BATCH_WRITERS_DEFAULT, HoldBatchConfig, HoldBatchStats, MIGRATOR, MariaDbStore,
    MariaDbStoreConfig, outbox_kind_name,
};
pub use memory::{MemoryStore, MemoryStoreConfig};
pub use redis::{GatePass, IdempotencyCache, RedisStore, RedisStoreConfig, SeatGate};
pub use relay::{OutboxRelay, OutboxRelayConfig};
pub use seat_hints::SeatHints;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::domain::{
    Account, AdmissionPolicy, Admitted, FenceToken, IdempotencyDecision, LedgerEntry, OutboxEvent, QueueOrder,
    QueueStatus, RateLimit, Reservation, ReservationId, Schedule, ScheduleId, ScheduleSummary, SeatId, SeatSlot,
    SeatStatus, SeatView, StoredResponse, TransitionError, UserId, WriteGuard,
};

/// The most ids one [`RecordStore::existing_users`] call looks at.
pub const USER_IDS_PER_READ_MAX: u32 = 4_096;

/// Refuses an [`RecordStore::existing_users`] range longer than [`USER_IDS_PER_READ_MAX`].
pub(crate) fn check_user_ids_read(count: u32) -> Result<(), StoreError> {
    if count > USER_IDS_PER_READ_MAX {
        return Err(StoreError::Invalid {
            reason: format!("at most {USER_IDS_PER_READ_MAX} user ids per read, not {count}"),
        });
    }
    Ok(())
}

/// Why a store call did not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The thing named does not exist.
    #[error("{entity} {id} not found")]
    NotFound { entity: &'static str, id: u64 },
    /// The domain refused the change; nothing was written.
    #[error(transparent)]
    Rejected(#[from] TransitionError),
    /// The reservation or token belongs to someone else.
    #[error("not the owner")]
    NotOwner,
    /// The store could not be reached or did not answer in time; the outcome is unknown.
    #[error("store unavailable: {reason}")]
    Unavailable { reason: String },
    /// The request is malformed for the store (for example a duplicate id).
    #[error("invalid: {reason}")]
    Invalid { reason: String },
}

/// What a hold asks of the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldRequest {
    pub schedule_id: ScheduleId,
    pub seat_id: SeatId,
    pub user_id: UserId,
    pub hold_ttl_ms: u64,
    /// The engine node writing the hold, recorded with the fence it is accepted with.
    pub node: String,
    /// The most seats the user may have on this schedule, held (live holds) or bought,
    /// counting this one: a hold beyond it is refused with
    /// [`TransitionError::SeatLimitReached`]. The engine sets it from its runtime settings;
    /// the store counts the user's reservations, so re-joining the line resets nothing.
    pub seats_per_user_max: u32,
}

/// A fence the store accepted for a seat, in the order it accepted them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptedFence {
    pub schedule_id: ScheduleId,
    pub seat_id: SeatId,
    pub fence: FenceToken,
    pub reservation_id: ReservationId,
    /// The engine node whose write was accepted.
    pub node: String,
    pub at_ms: u64,
}

/// Which seats a seat map shows: a section, a status, and at most `limit` of them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeatFilter {
    pub section: Option<String>,
    pub status: Option<SeatStatus>,
    pub limit: Option<u32>,
}

/// One audited admin call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditEntry {
    pub at_ms: u64,
    pub node: String,
    pub actor: String,
    pub action: String,
    pub target: String,
    /// What the target was before the call: any JSON value, `null` where nothing was.
    #[schema(value_type = Option<Object>)]
    pub before: serde_json::Value,
    /// What the target is after it: any JSON value, `null` where nothing is.
    #[schema(value_type = Option<Object>)]
    pub after: serde_json::Value,
    pub outcome: String,
}

/// Everything the record store holds, read at the end of a run for the checker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordDump {
    pub schedules: Vec<Schedule>,
    pub accounts: Vec<Account>,
    pub ledger: Vec<LedgerEntry>,
    pub reservations: Vec<Reservation>,
    pub fences: Vec<AcceptedFence>,
    pub outbox: Vec<OutboxEvent>,
}

/// Counts after one admission step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdmitReport {
    pub admitted_now: u32,
    pub waiting: u64,
    pub active: u32,
    pub admitted_total: u64,
    /// The order index of the next one in line: every waiter below it has been reached.
    pub head_order_index: u64,
}

/// A lock for the lock hold modes: held by `owner` until `expires_at_ms`, with a fence that
/// grows with every grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockGrant {
    pub fence: FenceToken,
    pub expires_at_ms: u64,
}

/// The system of record.
#[async_trait]
pub trait RecordStore: Send + Sync + std::fmt::Debug {
    /// Answers if the store is reachable.
    async fn ping(&self) -> Result<(), StoreError>;
    /// Adds a schedule with its seats.
    async fn put_schedule(&self, schedule: Schedule) -> Result<(), StoreError>;
    /// What is on sale, with live availability.
    async fn schedules(&self, now_ms: u64) -> Result<Vec<ScheduleSummary>, StoreError>;
    /// One schedule.
    async fn schedule(&self, schedule_id: ScheduleId) -> Result<Schedule, StoreError>;
    /// The seat map of a schedule, or the part of it `filter` asks for.
    async fn seat_map(
        &self,
        schedule_id: ScheduleId,
        filter: SeatFilter,
        now_ms: u64,
    ) -> Result<Vec<SeatView>, StoreError>;
    /// One seat's record, as the lock hold modes read it before writing.
    /// A fenced read (`fence` given) also raises the seat's fence to it, so that a write
    /// carrying an older fence is refused from then on: a lock holder whose lock ran out
    /// while it was paused cannot overwrite what a newer holder saw.
    async fn seat(
        &self,
        schedule_id: ScheduleId,
        seat_id: SeatId,
        fence: Option<FenceToken>,
    ) -> Result<SeatSlot, StoreError>;

    /// Opens an account with a starting balance (recorded as a top-up).
    async fn create_user(&self, name: String, points: u64, now_ms: u64) -> Result<Account, StoreError>;
    /// Reads an account.
    async fn account(&self, user_id: UserId) -> Result<Account, StoreError>;
    /// The ids of the accounts that exist among `first .. first + count`, in order; `count` is
    /// at most [`USER_IDS_PER_READ_MAX`] (more is `Invalid`). Accounts are never deleted, so an
    /// id once listed stays an account.
    async fn existing_users(&self, first: UserId, count: u32) -> Result<Vec<UserId>, StoreError>;
    /// Adds points once per idempotency key: a repeated key changes nothing.
    async fn top_up(
        &self,
        user_id: UserId,
        amount: u64,
        idempotency_key: String,
        now_ms: u64,
    ) -> Result<Account, StoreError>;

    /// The atomic hold: takes the seat if it is available, with a fence one above the seat's last.
    async fn try_hold(&self, request: HoldRequest, now_ms: u64) -> Result<Reservation, StoreError>;
    /// A hold decided under a lock, written as `guard` says.
    async fn write_hold(&self, request: HoldRequest, guard: WriteGuard, now_ms: u64)
    -> Result<Reservation, StoreError>;
    /// Pays for a hold: checks owner, expiry and fence, debits, confirms, writes the outbox
    /// event, all at once. Confirming an already confirmed reservation again returns it unchanged.
    async fn confirm(
        &self,
        reservation_id: ReservationId,
        user_id: UserId,
        idempotency_key: Option<String>,
        now_ms: u64,
    ) -> Result<Reservation, StoreError>;
    /// Cancels a hold, or a confirmed reservation with a refund, at once.
    async fn cancel(
        &self,
        reservation_id: ReservationId,
        user_id: UserId,
        now_ms: u64,
    ) -> Result<Reservation, StoreError>;
    /// Reads a reservation.
    async fn reservation(&self, reservation_id: ReservationId) -> Result<Reservation, StoreError>;
    /// Expires up to `limit` holds past their time and frees their seats; returns how many.
    async fn expire_holds(&self, now_ms: u64, limit: u32) -> Result<u32, StoreError>;

    /// Claims an idempotency key for a request with `fingerprint`, or says why not. The claim
    /// expires `ttl_ms` from now; a key whose record expired counts as never seen. Its lease
    /// lapses `lease_ms` from now unless renewed ([`RecordStore::idempotency_renew`]); a claim
    /// with the same fingerprint whose lease lapsed (its holder died) is taken over.
    async fn idempotency_begin(
        &self,
        key: String,
        fingerprint: [u8; 32],
        lease_ms: u64,
        ttl_ms: u64,
        now_ms: u64,
    ) -> Result<IdempotencyDecision, StoreError>;
    /// Stores the response for a claimed key, kept until `ttl_ms` from now.
    async fn idempotency_complete(
        &self,
        key: String,
        fingerprint: [u8; 32],
        response: StoredResponse,
        ttl_ms: u64,
        now_ms: u64,
    ) -> Result<(), StoreError>;
    /// Extends a claim's lease to `lease_ms` from now (never shortens it), if the key is still
    /// in progress with `fingerprint`, its lease has not lapsed and its record has not expired;
    /// whether it did. The request holding the claim calls it while it runs. A lapsed lease is
    /// never revived, even if no one took the key since; a completed, released or expired key,
    /// or one claimed with another fingerprint, is left as it is.
    async fn idempotency_renew(
        &self,
        key: String,
        fingerprint: [u8; 32],
        lease_ms: u64,
        now_ms: u64,
    ) -> Result<bool, StoreError>;
    /// Gives up a claimed key without a response (the request may be retried).
    async fn idempotency_release(&self, key: String, fingerprint: [u8; 32]) -> Result<(), StoreError>;
    /// Deletes up to `limit` idempotency records expired as of `now_ms`; returns how many.
    /// Several nodes may purge at once.
    async fn purge_idempotency(&self, now_ms: u64, limit: u32) -> Result<u32, StoreError>;

    /// Outbox events not yet published, oldest first.
    async fn outbox_pending(&self, limit: u32) -> Result<Vec<OutboxEvent>, StoreError>;
    /// Marks outbox events published. A store may forget sent events beyond what it keeps
    /// (the memory store does, see [`MemoryStoreConfig`]).
    async fn outbox_mark_sent(&self, ids: Vec<u64>) -> Result<(), StoreError>;
    /// Appends to the admin audit log.
    async fn append_audit(&self, entry: AuditEntry) -> Result<(), StoreError>;
    /// The newest audit entries, oldest first.
    async fn audit(&self, limit: u32) -> Result<Vec<AuditEntry>, StoreError>;
    /// Everything, for the checker.
    async fn dump(&self) -> Result<RecordDump, StoreError>;
}

/// The fast shared state: waiting lines and locks.
#[async_trait]
pub trait CacheStore: Send + Sync + std::fmt::Debug {
    /// Answers if the store is reachable.
    async fn ping(&self) -> Result<(), StoreError>;
    /// Creates the waiting line of a schedule (again: no change).
    async fn create_line(
        &self,
        schedule_id: ScheduleId,
        opens_at_ms: u64,
        order: QueueOrder,
        policy: AdmissionPolicy,
    ) -> Result<(), StoreError>;
    /// Joins a line.
    async fn join(&self, schedule_id: ScheduleId, user_id: UserId, now_ms: u64) -> Result<QueueStatus, StoreError>;
    /// Where a token stands (and proof its holder is still there).
    async fn queue_status(&self, schedule_id: ScheduleId, seq: u64, now_ms: u64) -> Result<QueueStatus, StoreError>;
    /// Moves a line forward to `now_ms`.
    async fn admit(&self, schedule_id: ScheduleId, now_ms: u64) -> Result<AdmitReport, StoreError>;
    /// Marks an admitted token used.
    async fn mark_used(&self, schedule_id: ScheduleId, seq: u64, now_ms: u64) -> Result<(), StoreError>;
    /// The admission policy of a line.
    async fn admission_policy(&self, schedule_id: ScheduleId) -> Result<AdmissionPolicy, StoreError>;
    /// Replaces the admission policy of a line; returns the one before.
    async fn set_admission_policy(
        &self,
        schedule_id: ScheduleId,
        policy: AdmissionPolicy,
    ) -> Result<AdmissionPolicy, StoreError>;
    /// Every admission so far, in order, for the checker.
    async fn admissions(&self) -> Result<Vec<Admitted>, StoreError>;
    /// Takes the lock on `key` if it is free or its holder's time ran out.
    async fn acquire_lock(&self, key: String, ttl_ms: u64, now_ms: u64) -> Result<Option<LockGrant>, StoreError>;
    /// Extends the lock on `key` to `ttl_ms` from now if `fence` still holds it and its time has
    /// not run out; `None` when the holder lost it (a lock that ran out is never revived, even
    /// if no one took it since). The fence stays.
    async fn renew_lock(
        &self,
        key: String,
        fence: FenceToken,
        ttl_ms: u64,
        now_ms: u64,
    ) -> Result<Option<LockGrant>, StoreError>;
    /// Releases the lock if `fence` still holds it.
    async fn release_lock(&self, key: String, fence: FenceToken) -> Result<(), StoreError>;
    /// One request against the shared rate limit `key` at `now_ms`: `None` when it passes,
    /// else the milliseconds until one would (a refused request changes nothing).
    async fn take_rate(&self, key: String, limit: RateLimit, now_ms: u64) -> Result<Option<u64>, StoreError>;
}
