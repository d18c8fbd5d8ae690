//! The store hosts of the simulated world: a [`MemoryStore`] served over a TCP connection, and
//! [`RemoteStore`], a client that implements the engine's [`RecordStore`] and [`CacheStore`]
//! over that connection. Each engine node talks to its store hosts across the (simulated)
//! network, so a store can be partitioned away, slowed down, crashed, or failed over.
//!
//! # Wire protocol
//!
//! One private request enum names every method of both traits with its arguments; one response
//! enum carries the `Result` of each (errors as a serde mirror of [`StoreError`]). A frame is a
//! 4-byte big-endian length and a `postcard` body (the id, then the request or response), at
//! most [`FRAME_BYTES_MAX`] bytes. One connection carries many calls at once, at most
//! [`IN_FLIGHT_MAX`]; responses are matched to calls by id, never by order. Floats (admission
//! rates, numbers in audit values) travel as their bits, so they arrive exactly.
//!
//! # Server
//!
//! [`serve_store`] accepts connections from anything that implements [`Accept`] (turmoil's and
//! tokio's listeners do). It answers a request on the connection's task when it finishes at its
//! first poll (most do), and runs one that has to wait (a slow store, a failover) in its own
//! task, so a slow one does not hold up the others. A host keeps at most [`CONNECTIONS_MAX`]
//! connections and closes the least recently active one to make room: a connection a partition
//! left half-dead (turmoil drops segments silently, so such a connection stalls instead of
//! failing) cannot pin resources forever.
//!
//! # Failover
//!
//! The state of a store host lives in its [`StoreControl`], not in the serving task, so a
//! crashed and restarted host comes back with its data (a store with a disk), unless
//! [`StoreControl::lose_data`] empties it (a cache server without persistence). The control keeps:
//! - the **primary**, the `MemoryStore` every request runs against;
//! - a **journal** of every mutating request with the time the primary applied it, for the last
//!   [`StoreHostConfig::replication_window`] (and at most [`JOURNAL_ENTRIES_MAX`] entries);
//! - [`StoreHostConfig::failovers_max`] **standby** replicas, which apply each journal entry
//!   once it leaves the journal.
//!
//! A failover that runs closes every connection the host has open (their peer was the old
//! primary): the requests in flight ([`FailoverReport::calls_cut_off`]) are answered to nobody,
//! and clients reconnect to the promoted standby.
//!
//! `MemoryStore` is deterministic for a given sequence of calls, which is what makes this work:
//! [`StoreControl::fail_over`] promotes one standby, replays onto it the journal entries that are
//! at least `lose_last` old, and drops the younger ones. The other standbys stay as they were,
//! still consistent with the (shortened) journal.
//!
//! Why standbys, and not one lagging replica or a full history: `MemoryStore` cannot be cloned,
//! so every failover consumes one copy of the old state, and building a new copy later would mean
//! replaying the whole history (unbounded memory, and a long stall at the worst moment). A fixed
//! number of standbys costs one extra in-memory application of each write per standby, and
//! memory bounded by the window. A host set up for `n` failovers refuses the `n + 1`-th that
//! would lose writes ([`FailoverError::NoStandbyLeft`]); a failover that loses nothing changes
//! nothing and uses no standby.
//!
//! Time in the journal is [`JournalClock`]: turmoil's simulation time in the simulator (the same
//! on every host and across restarts, which tokio's `Instant` is not: turmoil builds a new
//! runtime, with a new clock, when it restarts a host), tokio's clock in plain tokio tests.
//!
//! **Invariant:** a standby's state is the replay of every journaled write up to the newest one
//! it applied, and the primary's state is that plus the journal, in order. Writes are journaled
//! whatever their outcome (a refused confirm can still expire its hold).
//! **Invariant:** the host runs requests one at a time under one lock, and a failover swaps the
//! state under the same lock, so each request sees the old state or the new one, never a mix.
//! **Invariant:** a [`RemoteStore`] call never waits longer than its timeout, and every failure
//! is [`StoreError::Unavailable`] (the outcome is unknown); bad frames close the connection or
//! are answered with an error, never a panic.
//! **Invariant:** nothing here iterates a hash map, so a simulated run replays exactly.

mod replication;

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tcore_engine::domain::{
    Account, AdmissionPolicy, Admitted, FenceToken, IdempotencyDecision, OutboxEvent, QueueOrder, QueueStatus,
    RateLimit, Reservation, ReservationId, ReservationStatus, Schedule, ScheduleId, ScheduleSummary, SeatId, SeatSlot,
    SeatView, StoredResponse, TokenStatus, TransitionError, UserId, WriteGuard,
};
use tcore_engine::store::{
    AdmitReport, AuditEntry, CacheStore, HoldRequest, LockGrant, MemoryStore, MemoryStoreConfig, RecordDump,
    RecordStore, SeatFilter, StoreError,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{Mutex as AsyncMutex, MutexGuard as AsyncMutexGuard, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use self::replication::{Durable, LostWrites, StandbyStream};
pub use self::replication::{Replication, SemiSync};

/// The largest frame body either side sends or accepts, in bytes. A longer incoming frame
/// closes the connection; a longer response is replaced by an `Unavailable` error.
pub const FRAME_BYTES_MAX: usize = 64 * 1024 * 1024;
/// The most calls in flight on one connection. A client call beyond it waits (within its
/// timeout); a server stops reading the connection until one finishes.
pub const IN_FLIGHT_MAX: usize = 4_096;
/// The most connections a store host keeps open; the least recently active one is closed to
/// make room for a new one.
pub const CONNECTIONS_MAX: usize = 256;
/// The most writes a journal keeps. Past it, the oldest leave early for the standbys, which
/// shortens how far back a failover can reach (reported by [`FailoverError::BeyondJournal`]).
pub const JOURNAL_ENTRIES_MAX: usize = 1_000_000;
/// The most failovers asked for and not yet run.
const FAILOVERS_PENDING_MAX: usize = 16;
/// The most bytes one write to a connection batches together.
const WRITE_BATCH_BYTES_MAX: usize = 256 * 1024;
/// The read buffer of a connection.
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// How long an accept loop waits after a failed accept (out of file descriptors, say).
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(50);
/// The entities `StoreError::NotFound` names, so a decoded error gets its `&'static str` back.
const ENTITIES_KNOWN: [&str; 6] = ["seat", "user", "reservation", "schedule", "queue token", "block"];

// ---------------------------------------------------------------------------------------------
// Wire protocol
// ---------------------------------------------------------------------------------------------

/// Every method of [`RecordStore`] and [`CacheStore`], with its arguments.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum StoreRequest {
    RecordPing,
    PutSchedule { schedule: Schedule },
    Schedules { now_ms: u64 },
    Schedule { schedule_id: ScheduleId },
    SeatMap { schedule_id: ScheduleId, filter: SeatFilter, now_ms: u64 },
    Seat { schedule_id: ScheduleId, seat_id: SeatId, fence: Option<FenceToken> },
    CreateUser { name: String, points: u64, now_ms: u64 },
    Account { user_id: UserId },
    ExistingUsers { first: UserId, count: u32 },
    TopUp { user_id: UserId, amount: u64, idempotency_key: String, now_ms: u64 },
    TryHold { request: HoldRequest, now_ms: u64 },
    WriteHold { request: HoldRequest, guard: WriteGuard, now_ms: u64 },
    Confirm { reservation_id: ReservationId, user_id: UserId, idempotency_key: Option<String>, now_ms: u64 },
    Cancel { reservation_id: ReservationId, user_id: UserId, now_ms: u64 },
    Reservation { reservation_id: ReservationId },
    ExpireHolds { now_ms: u64, limit: u32 },
    IdempotencyBegin { key: String, fingerprint: [u8; 32], lease_ms: u64, ttl_ms: u64, now_ms: u64 },
    IdempotencyComplete { key: String, fingerprint: [u8; 32], response: StoredResponse, ttl_ms: u64, now_ms: u64 },
    IdempotencyRenew { key: String, fingerprint: [u8; 32], lease_ms: u64, now_ms: u64 },
    IdempotencyRelease { key: String, fingerprint: [u8; 32] },
    PurgeIdempotency { now_ms: u64, limit: u32 },
    OutboxPending { limit: u32 },
    OutboxMarkSent { ids: Vec<u64> },
    AppendAudit { entry: WireAudit },
    Audit { limit: u32 },
    Dump,
    CachePing,
    CreateLine { schedule_id: ScheduleId, opens_at_ms: u64, order: QueueOrder, policy: AdmissionPolicy },
    Join { schedule_id: ScheduleId, user_id: UserId, now_ms: u64 },
    QueueStatus { schedule_id: ScheduleId, seq: u64, now_ms: u64 },
    Admit { schedule_id: ScheduleId, now_ms: u64 },
    MarkUsed { schedule_id: ScheduleId, seq: u64, now_ms: u64 },
    AdmissionPolicy { schedule_id: ScheduleId },
    SetAdmissionPolicy { schedule_id: ScheduleId, policy: AdmissionPolicy },
    Admissions,
    AcquireLock { key: String, ttl_ms: u64, now_ms: u64 },
    RenewLock { key: String, fence: FenceToken, ttl_ms: u64, now_ms: u64 },
    ReleaseLock { key: String, fence: FenceToken },
    TakeRate { key: String, per_s: u32, burst: u32, now_ms: u64 },
}

impl StoreRequest {
    /// Whether the request may change the store, so it must be journaled. Listed without a
    /// wildcard so a new method has to be placed; when in doubt a method counts as a write
    /// (`queue_status` records that its holder is still there).
    fn is_write(&self) -> bool {
        use StoreRequest as Q;
        match self {
            Q::RecordPing
            | Q::Schedules { .. }
            | Q::Schedule { .. }
            | Q::SeatMap { .. }
            | Q::Seat { fence: None, .. }
            | Q::Account { .. }
            | Q::ExistingUsers { .. }
            | Q::Reservation { .. }
            | Q::OutboxPending { .. }
            | Q::Audit { .. }
            | Q::Dump
            | Q::CachePing
            | Q::AdmissionPolicy { .. }
            | Q::Admissions => false,
            Q::PutSchedule { .. }
            | Q::Seat { fence: Some(_), .. }
            | Q::CreateUser { .. }
            | Q::TopUp { .. }
            | Q::TryHold { .. }
            | Q::WriteHold { .. }
            | Q::Confirm { .. }
            | Q::Cancel { .. }
            | Q::ExpireHolds { .. }
            | Q::IdempotencyBegin { .. }
            | Q::IdempotencyComplete { .. }
            | Q::IdempotencyRenew { .. }
            | Q::IdempotencyRelease { .. }
            | Q::PurgeIdempotency { .. }
            | Q::OutboxMarkSent { .. }
            | Q::AppendAudit { .. }
            | Q::CreateLine { .. }
            | Q::Join { .. }
            | Q::QueueStatus { .. }
            | Q::Admit { .. }
            | Q::MarkUsed { .. }
            | Q::SetAdmissionPolicy { .. }
            | Q::AcquireLock { .. }
            | Q::RenewLock { .. }
            | Q::ReleaseLock { .. }
            | Q::TakeRate { .. } => true,
        }
    }
}

/// The result of each method, grouped by the type it returns.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum StoreResponse {
    Unit(Result<(), WireError>),
    Schedules(Result<Vec<ScheduleSummary>, WireError>),
    Schedule(Result<Schedule, WireError>),
    SeatMap(Result<Vec<SeatView>, WireError>),
    Seat(Result<SeatSlot, WireError>),
    Account(Result<Account, WireError>),
    UserIds(Result<Vec<UserId>, WireError>),
    Reservation(Result<Reservation, WireError>),
    Count(Result<u32, WireError>),
    Idempotency(Result<IdempotencyDecision, WireError>),
    Outbox(Result<Vec<OutboxEvent>, WireError>),
    Audit(Result<Vec<WireAudit>, WireError>),
    Dump(Result<RecordDump, WireError>),
    QueueStatus(Result<QueueStatus, WireError>),
    Admit(Result<AdmitReport, WireError>),
    Policy(Result<AdmissionPolicy, WireError>),
    Admissions(Result<Vec<Admitted>, WireError>),
    Lock(Result<Option<LockGrant>, WireError>),
    Wait(Result<Option<u64>, WireError>),
    Flag(Result<bool, WireError>),
    /// The host could not run the request at all (undecodable, or its answer too large).
    Refused(WireError),
}

impl StoreResponse {
    fn kind(&self) -> &'static str {
        match self {
            Self::Unit(_) => "unit",
            Self::Schedules(_) => "schedules",
            Self::Schedule(_) => "schedule",
            Self::SeatMap(_) => "seat map",
            Self::Seat(_) => "seat",
            Self::Account(_) => "account",
            Self::UserIds(_) => "user ids",
            Self::Reservation(_) => "reservation",
            Self::Count(_) => "count",
            Self::Idempotency(_) => "idempotency",
            Self::Outbox(_) => "outbox",
            Self::Audit(_) => "audit",
            Self::Dump(_) => "dump",
            Self::QueueStatus(_) => "queue status",
            Self::Admit(_) => "admit",
            Self::Policy(_) => "policy",
            Self::Admissions(_) => "admissions",
            Self::Lock(_) => "lock",
            Self::Wait(_) => "wait",
            Self::Flag(_) => "flag",
            Self::Refused(_) => "refused",
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct RequestFrame {
    id: u64,
    request: StoreRequest,
}

#[derive(Debug, Serialize, Deserialize)]
struct ResponseFrame {
    id: u64,
    response: StoreResponse,
}

/// Just the id of a request frame, to answer one whose request does not decode.
#[derive(Debug, Deserialize)]
struct FrameId {
    id: u64,
}

/// [`StoreError`] as it travels (the engine's error is not `Serialize`, and names its entity
/// with a `&'static str`).
#[derive(Debug, Clone, Serialize, Deserialize)]
enum WireError {
    NotFound { entity: String, id: u64 },
    Rejected(WireTransition),
    NotOwner,
    Unavailable { reason: String },
    Invalid { reason: String },
}

/// [`TransitionError`] as it travels.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum WireTransition {
    NotHeld { status: ReservationStatus },
    HoldExpired { expires_at_ms: u64, now_ms: u64 },
    HoldStillValid,
    AlreadyFinal { status: ReservationStatus },
    StaleFence { presented: u64, current: u64 },
    InsufficientPoints { balance: u64, needed: u64 },
    TokenNotAdmitted { status: TokenStatus },
    SeatUnavailable,
    InvalidAmount { max: u64 },
    SeatLimitReached { max: u32 },
    TopUpKeyReused,
}

impl From<StoreError> for WireError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound { entity, id } => Self::NotFound { entity: entity.to_owned(), id },
            StoreError::Rejected(transition) => Self::Rejected(transition.into()),
            StoreError::NotOwner => Self::NotOwner,
            StoreError::Unavailable { reason } => Self::Unavailable { reason },
            StoreError::Invalid { reason } => Self::Invalid { reason },
        }
    }
}

impl From<WireError> for StoreError {
    fn from(error: WireError) -> Self {
        match error {
            WireError::NotFound { entity, id } => {
                let entity = ENTITIES_KNOWN.iter().find(|known| **known == entity).copied().unwrap_or("record");
                Self::NotFound { entity, id }
            }
            WireError::Rejected(transition) => Self::Rejected(transition.into()),
            WireError::NotOwner => Self::NotOwner,
            WireError::Unavailable { reason } => Self::Unavailable { reason },
            WireError::Invalid { reason } => Self::Invalid { reason },
        }
    }
}

impl From<TransitionError> for WireTransition {
    fn from(error: TransitionError) -> Self {
        use TransitionError as T;
        match error {
            T::NotHeld { status } => Self::NotHeld { status },
            T::HoldExpired { expires_at_ms, now_ms } => Self::HoldExpired { expires_at_ms, now_ms },
            T::HoldStillValid => Self::HoldStillValid,
            T::AlreadyFinal { status } => Self::AlreadyFinal { status },
            T::StaleFence { presented, current } => Self::StaleFence { presented, current },
            T::InsufficientPoints { balance, needed } => Self::InsufficientPoints { balance, needed },
            T::TokenNotAdmitted { status } => Self::TokenNotAdmitted { status },
            T::SeatUnavailable => Self::SeatUnavailable,
            T::InvalidAmount { max } => Self::InvalidAmount { max },
            T::SeatLimitReached { max } => Self::SeatLimitReached { max },
            T::TopUpKeyReused => Self::TopUpKeyReused,
        }
    }
}

impl From<WireTransition> for TransitionError {
    fn from(error: WireTransition) -> Self {
        use WireTransition as W;
        match error {
            W::NotHeld { status } => Self::NotHeld { status },
            W::HoldExpired { expires_at_ms, now_ms } => Self::HoldExpired { expires_at_ms, now_ms },
            W::HoldStillValid => Self::HoldStillValid,
            W::AlreadyFinal { status } => Self::AlreadyFinal { status },
            W::StaleFence { presented, current } => Self::StaleFence { presented, current },
            W::InsufficientPoints { balance, needed } => Self::InsufficientPoints { balance, needed },
            W::TokenNotAdmitted { status } => Self::TokenNotAdmitted { status },
            W::SeatUnavailable => Self::SeatUnavailable,
            W::InvalidAmount { max } => Self::InvalidAmount { max },
            W::SeatLimitReached { max } => Self::SeatLimitReached { max },
            W::TopUpKeyReused => Self::TopUpKeyReused,
        }
    }
}

/// [`AuditEntry`] as it travels, its JSON values with exact floats.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct WireAudit {
    at_ms: u64,
    node: String,
    actor: String,
    action: String,
    target: String,
    before: WireValue,
    after: WireValue,
    outcome: String,
}

impl From<AuditEntry> for WireAudit {
    fn from(entry: AuditEntry) -> Self {
        let AuditEntry { at_ms, node, actor, action, target, before, after, outcome } = entry;
        Self { at_ms, node, actor, action, target, before: before.into(), after: after.into(), outcome }
    }
}

impl From<WireAudit> for AuditEntry {
    fn from(entry: WireAudit) -> Self {
        let WireAudit { at_ms, node, actor, action, target, before, after, outcome } = entry;
        Self { at_ms, node, actor, action, target, before: before.into(), after: after.into(), outcome }
    }
}

/// A JSON value with exact floats (and its object keys in their order).
#[derive(Debug, Clone, Serialize, Deserialize)]
enum WireValue {
    Null,
    Bool(bool),
    Unsigned(u64),
    Signed(i64),
    Float(f64),
    Text(String),
    Array(Vec<WireValue>),
    Object(Vec<(String, WireValue)>),
}

impl From<serde_json::Value> for WireValue {
    fn from(value: serde_json::Value) -> Self {
        use serde_json::Value as V;
        match value {
            V::Null => Self::Null,
            V::Bool(flag) => Self::Bool(flag),
            V::Number(number) => match (number.as_u64(), number.as_i64(), number.as_f64()) {
                (Some(unsigned), _, _) => Self::Unsigned(unsigned),
                (None, Some(signed), _) => Self::Signed(signed),
                (None, None, Some(float)) => Self::Float(float),
                (None, None, None) => Self::Null,
            },
            V::String(text) => Self::Text(text),
            V::Array(items) => Self::Array(items.into_iter().map(Self::from).collect()),
            V::Object(fields) => Self::Object(fields.into_iter().map(|(key, value)| (key, value.into())).collect()),
        }
    }
}

impl From<WireValue> for serde_json::Value {
    fn from(value: WireValue) -> Self {
        match value {
            WireValue::Null => Self::Null,
            WireValue::Bool(flag) => Self::Bool(flag),
            WireValue::Unsigned(unsigned) => Self::from(unsigned),
            WireValue::Signed(signed) => Self::from(signed),
            WireValue::Float(float) => serde_json::Number::from_f64(float).map_or(Self::Null, Self::Number),
            WireValue::Text(text) => Self::String(text),
            WireValue::Array(items) => Self::Array(items.into_iter().map(Self::from).collect()),
            WireValue::Object(fields) => {
                Self::Object(fields.into_iter().map(|(key, value)| (key, value.into())).collect())
            }
        }
    }
}

fn unavailable(reason: impl Into<String>) -> StoreError {
    StoreError::Unavailable { reason: reason.into() }
}

fn wire<T>(result: Result<T, StoreError>) -> Result<T, WireError> {
    result.map_err(WireError::from)
}

/// Runs one request against a store.
async fn execute(store: &MemoryStore, request: StoreRequest) -> StoreResponse {
    use StoreRequest as Q;
    use StoreResponse as A;
    match request {
        Q::RecordPing => A::Unit(wire(RecordStore::ping(store).await)),
        Q::PutSchedule { schedule } => A::Unit(wire(store.put_schedule(schedule).await)),
        Q::Schedules { now_ms } => A::Schedules(wire(store.schedules(now_ms).await)),
        Q::Schedule { schedule_id } => A::Schedule(wire(store.schedule(schedule_id).await)),
        Q::SeatMap { schedule_id, filter, now_ms } => {
            A::SeatMap(wire(store.seat_map(schedule_id, filter, now_ms).await))
        }
        Q::Seat { schedule_id, seat_id, fence } => A::Seat(wire(store.seat(schedule_id, seat_id, fence).await)),
        Q::CreateUser { name, points, now_ms } => A::Account(wire(store.create_user(name, points, now_ms).await)),
        Q::Account { user_id } => A::Account(wire(store.account(user_id).await)),
        Q::ExistingUsers { first, count } => A::UserIds(wire(store.existing_users(first, count).await)),
        Q::TopUp { user_id, amount, idempotency_key, now_ms } => {
            A::Account(wire(store.top_up(user_id, amount, idempotency_key, now_ms).await))
        }
        Q::TryHold { request, now_ms } => A::Reservation(wire(store.try_hold(request, now_ms).await)),
        Q::WriteHold { request, guard, now_ms } => A::Reservation(wire(store.write_hold(request, guard, now_ms).await)),
        Q::Confirm { reservation_id, user_id, idempotency_key, now_ms } => {
            A::Reservation(wire(store.confirm(reservation_id, user_id, idempotency_key, now_ms).await))
        }
        Q::Cancel { reservation_id, user_id, now_ms } => {
            A::Reservation(wire(store.cancel(reservation_id, user_id, now_ms).await))
        }
        Q::Reservation { reservation_id } => A::Reservation(wire(store.reservation(reservation_id).await)),
        Q::ExpireHolds { now_ms, limit } => A::Count(wire(store.expire_holds(now_ms, limit).await)),
        Q::IdempotencyBegin { key, fingerprint, lease_ms, ttl_ms, now_ms } => {
            A::Idempotency(wire(store.idempotency_begin(key, fingerprint, lease_ms, ttl_ms, now_ms).await))
        }
        Q::IdempotencyComplete { key, fingerprint, response, ttl_ms, now_ms } => {
            A::Unit(wire(store.idempotency_complete(key, fingerprint, response, ttl_ms, now_ms).await))
        }
        Q::IdempotencyRenew { key, fingerprint, lease_ms, now_ms } => {
            A::Flag(wire(store.idempotency_renew(key, fingerprint, lease_ms, now_ms).await))
        }
        Q::IdempotencyRelease { key, fingerprint } => A::Unit(wire(store.idempotency_release(key, fingerprint).await)),
        Q::PurgeIdempotency { now_ms, limit } => A::Count(wire(store.purge_idempotency(now_ms, limit).await)),
        Q::OutboxPending { limit } => A::Outbox(wire(store.outbox_pending(limit).await)),
        Q::OutboxMarkSent { ids } => A::Unit(wire(store.outbox_mark_sent(ids).await)),
        Q::AppendAudit { entry } => A::Unit(wire(store.append_audit(entry.into()).await)),
        Q::Audit { limit } => {
            A::Audit(wire(store.audit(limit).await).map(|entries| entries.into_iter().map(WireAudit::from).collect()))
        }
        Q::Dump => A::Dump(wire(store.dump().await)),
        Q::CachePing => A::Unit(wire(CacheStore::ping(store).await)),
        Q::CreateLine { schedule_id, opens_at_ms, order, policy } => {
            A::Unit(wire(store.create_line(schedule_id, opens_at_ms, order, policy).await))
        }
        Q::Join { schedule_id, user_id, now_ms } => {
            A::QueueStatus(wire(store.join(schedule_id, user_id, now_ms).await))
        }
        Q::QueueStatus { schedule_id, seq, now_ms } => {
            A::QueueStatus(wire(store.queue_status(schedule_id, seq, now_ms).await))
        }
        Q::Admit { schedule_id, now_ms } => A::Admit(wire(store.admit(schedule_id, now_ms).await)),
        Q::MarkUsed { schedule_id, seq, now_ms } => A::Unit(wire(store.mark_used(schedule_id, seq, now_ms).await)),
        Q::AdmissionPolicy { schedule_id } => A::Policy(wire(store.admission_policy(schedule_id).await)),
        Q::SetAdmissionPolicy { schedule_id, policy } => {
            A::Policy(wire(store.set_admission_policy(schedule_id, policy).await))
        }
        Q::Admissions => A::Admissions(wire(store.admissions().await)),
        Q::AcquireLock { key, ttl_ms, now_ms } => A::Lock(wire(store.acquire_lock(key, ttl_ms, now_ms).await)),
        Q::RenewLock { key, fence, ttl_ms, now_ms } => {
            A::Lock(wire(store.renew_lock(key, fence, ttl_ms, now_ms).await))
        }
        Q::TakeRate { key, per_s, burst, now_ms } => {
            A::Wait(wire(store.take_rate(key, RateLimit { per_s, burst }, now_ms).await))
        }
        Q::ReleaseLock { key, fence } => A::Unit(wire(store.release_lock(key, fence).await)),
    }
}

/// Encodes a frame: the body's length, then the body.
fn encode_frame<T: Serialize>(frame: &T) -> Result<Vec<u8>, String> {
    let bytes = postcard::to_extend(frame, vec![0; 4]).map_err(|error| format!("encode: {error}"))?;
    let mut bytes = bytes;
    let body_bytes = bytes.len() - 4;
    let length = u32::try_from(body_bytes)
        .ok()
        .filter(|_| body_bytes <= FRAME_BYTES_MAX)
        .ok_or_else(|| format!("a frame of {body_bytes} bytes exceeds the maximum of {FRAME_BYTES_MAX}"))?;
    bytes[..4].copy_from_slice(&length.to_be_bytes());
    Ok(bytes)
}

/// Reads one frame body; `None` when the peer closed the connection between frames.
async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> io::Result<Option<Vec<u8>>> {
    let mut length = [0; 4];
    match reader.read_exact(&mut length).await {
        Ok(_) => {}
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error),
    }
    let body_bytes = usize::try_from(u32::from_be_bytes(length)).unwrap_or(usize::MAX);
    if body_bytes > FRAME_BYTES_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a frame of {body_bytes} bytes exceeds the maximum of {FRAME_BYTES_MAX}"),
        ));
    }
    let mut body = vec![0; body_bytes];
    reader.read_exact(&mut body).await?;
    Ok(Some(body))
}

/// Writes frames from `frames` as they come, batching those already waiting into one write.
async fn write_frames<W, T>(writer: W, mut frames: mpsc::UnboundedReceiver<(Vec<u8>, T)>) -> String
where
    W: AsyncWrite + Unpin,
{
    let mut writer = writer;
    let mut batch = Vec::new();
    // Whatever rides along with a frame (a server's in-flight permit) is released once written.
    let mut riders = Vec::new();
    loop {
        let Some((frame, rider)) = frames.recv().await else { return "no more frames to send".into() };
        batch.extend_from_slice(&frame);
        riders.push(rider);
        while batch.len() < WRITE_BATCH_BYTES_MAX {
            let Ok((frame, rider)) = frames.try_recv() else { break };
            batch.extend_from_slice(&frame);
            riders.push(rider);
        }
        if let Err(error) = writer.write_all(&batch).await {
            return format!("write: {error}");
        }
        if let Err(error) = writer.flush().await {
            return format!("flush: {error}");
        }
        batch.clear();
        riders.clear();
    }
}

// ---------------------------------------------------------------------------------------------
// The store host: state, journal, failover
// ---------------------------------------------------------------------------------------------

/// Which clock stamps the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JournalClock {
    /// turmoil's simulation time, the same on every host and across host restarts. Outside a
    /// simulated host (setting up before the run), the journal's latest time (0 at the start).
    #[default]
    Simulation,
    /// tokio's clock, from the moment the [`StoreControl`] was made: for tests on plain tokio
    /// (make the control inside the runtime).
    Tokio,
}

/// How a store host is set up.
#[derive(Debug, Clone)]
pub struct StoreHostConfig {
    /// The store's own sizes and seed; the standbys use the same, so they replay identically.
    pub store: MemoryStoreConfig,
    /// How long a write stays in the journal before the standbys apply it: the most a failover
    /// can lose.
    pub replication_window: Duration,
    /// How many failovers that lose writes the host can go through (one standby each).
    pub failovers_max: u32,
    /// When a write is answered: once a standby holds it, or at once (known unsafe).
    pub replication: Replication,
    /// The clock of the journal.
    pub clock: JournalClock,
}

impl Default for StoreHostConfig {
    fn default() -> Self {
        Self {
            store: MemoryStoreConfig::default().keeping_the_whole_outbox(),
            replication_window: Duration::from_secs(30),
            failovers_max: 2,
            replication: Replication::SemiSync(SemiSync::default()),
            clock: JournalClock::Simulation,
        }
    }
}

/// What a failover did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailoverReport {
    /// When it ran, on the journal's clock.
    pub at: Duration,
    /// Journaled writes replayed onto the promoted standby (at least `lose_last` old).
    pub writes_replayed: usize,
    /// Journaled writes lost (younger than `lose_last`).
    pub writes_lost: usize,
    /// Journaled writes younger than `lose_last` kept because the standby had acknowledged
    /// them (semi-sync): what an asynchronous standby would have lost.
    pub writes_kept_by_standby: usize,
    /// Requests that came over the network and had not been answered: their connections to
    /// the old primary are closed, so their callers learn nothing of their outcome.
    pub calls_cut_off: u64,
    /// Failovers that can still lose writes.
    pub failovers_left: usize,
}

/// Why a failover was refused; the store is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FailoverError {
    /// Every standby was already promoted.
    #[error("no standby left: the host was set up for {failovers_max} failovers")]
    NoStandbyLeft { failovers_max: u32 },
    /// Writes that old have already reached the standbys.
    #[error("cannot lose the last {lose_last:?}: the journal reaches back only {journal_covers:?}")]
    BeyondJournal { lose_last: Duration, journal_covers: Duration },
    /// Too many failovers were asked for and have not run yet.
    #[error("more than {FAILOVERS_PENDING_MAX} failovers pending")]
    TooManyPending,
    /// The host's control was dropped before the failover ran.
    #[error("the store host is gone")]
    HostGone,
}

/// A failover asked for: it runs on the store host (on its clock) before the next request, or
/// as soon as the host's server is scheduled.
#[derive(Debug)]
pub struct FailoverTicket {
    outcome: oneshot::Receiver<Result<FailoverReport, FailoverError>>,
}

impl FailoverTicket {
    /// Waits for the failover to run.
    pub async fn outcome(self) -> Result<FailoverReport, FailoverError> {
        self.outcome.await.unwrap_or(Err(FailoverError::HostGone))
    }

    /// The outcome if the failover ran already (for callers outside any runtime, such as a
    /// loop that steps the simulation).
    pub fn try_outcome(&mut self) -> Option<Result<FailoverReport, FailoverError>> {
        match self.outcome.try_recv() {
            Ok(outcome) => Some(outcome),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => Some(Err(FailoverError::HostGone)),
        }
    }
}

/// What a loss of a host's data took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DataLossReport {
    /// The writes the host's state held: every one since it last started empty.
    pub writes_lost: u64,
    /// The admissions out of its waiting lines it had recorded.
    pub admissions_lost: u64,
}

/// A loss of a host's data asked for: it runs on the store host before the next request.
#[derive(Debug)]
pub struct DataLossTicket {
    outcome: oneshot::Receiver<DataLossReport>,
}

impl DataLossTicket {
    /// The report if the loss ran already; `None` while it has not (or never will: the host's
    /// control was dropped, or another loss replaced it).
    pub fn try_outcome(&mut self) -> Option<DataLossReport> {
        self.outcome.try_recv().ok()
    }
}

/// A store host's state and its fault controls. Cheap to clone; every clone is the same host.
///
/// The state lives here rather than in [`serve_store`], so restarting the serving task (a turmoil
/// `bounce`) keeps the data. The control also implements [`RecordStore`] and [`CacheStore`]
/// directly, through the same journal but without the network or the extra latency: that is
/// the door for seeding a store before a run and reading it after.
#[derive(Clone)]
pub struct StoreControl {
    shared: Arc<HostShared>,
}

struct HostShared {
    config: StoreHostConfig,
    tokio_base: Instant,
    extra_latency: parking_lot::Mutex<Duration>,
    state: AsyncMutex<HostState>,
    failovers_pending: parking_lot::Mutex<VecDeque<PendingFailover>>,
    failover_asked: Notify,
    /// A loss of the host's data asked for and not yet run.
    data_loss_pending: parking_lot::Mutex<Option<oneshot::Sender<DataLossReport>>>,
    /// The writes failovers took back, for answers that waited for the standby meanwhile.
    lost_writes: LostWrites,
    /// Requests that came over the network and are not answered yet.
    calls_in_flight: AtomicU64,
    /// Wakes every connection when a failover ran, so each closes: its peer was the old primary.
    failed_over: Notify,
}

struct PendingFailover {
    lose_last: Duration,
    reply: oneshot::Sender<Result<FailoverReport, FailoverError>>,
}

struct HostState {
    primary: MemoryStore,
    standbys: Vec<MemoryStore>,
    journal: VecDeque<JournalEntry>,
    /// When the newest write the standbys applied was applied to the primary.
    standbys_through: Option<Duration>,
    /// The journal's latest time: its clock never goes back.
    clock_last: Duration,
    /// Writes that left the journal early because it was full.
    journal_overflowed: u64,
    /// Whether this host can fail over at all; without standbys it keeps no journal.
    journaling: bool,
    /// Semi-sync mode: the stream of writes to the standby.
    standby_stream: Option<StandbyStream>,
    /// The sequence number the next write gets. Sequence numbers are never reused, not even
    /// those of writes a failover took back.
    sequence_next: u64,
    /// The sequence number of the newest write the primary's state holds.
    sequence_applied: u64,
    /// How many writes the primary's state holds: since the host started empty, less those a
    /// failover took back.
    writes_held: u64,
}

struct JournalEntry {
    at: Duration,
    sequence: u64,
    /// When the standby acknowledged the write (semi-sync mode).
    acknowledged_at: Option<Duration>,
    request: StoreRequest,
}

impl fmt::Debug for StoreControl {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("StoreControl")
            .field("config", &self.shared.config)
            .field("extra_latency", &self.extra_latency())
            .finish_non_exhaustive()
    }
}

impl StoreControl {
    /// A host with an empty store.
    pub fn new(config: StoreHostConfig) -> Self {
        let standbys_count = usize::try_from(config.failovers_max).unwrap_or(usize::MAX);
        let state = HostState {
            primary: MemoryStore::new(config.store.clone()),
            standbys: (0..standbys_count).map(|_| MemoryStore::new(config.store.clone())).collect(),
            journal: VecDeque::new(),
            standbys_through: None,
            clock_last: Duration::ZERO,
            journal_overflowed: 0,
            journaling: standbys_count > 0,
            standby_stream: match &config.replication {
                Replication::Async => None,
                Replication::SemiSync(semi_sync) => Some(StandbyStream::new(semi_sync)),
            },
            sequence_next: 1,
            sequence_applied: 0,
            writes_held: 0,
        };
        let shared = HostShared {
            config,
            tokio_base: Instant::now(),
            extra_latency: parking_lot::Mutex::new(Duration::ZERO),
            state: AsyncMutex::new(state),
            failovers_pending: parking_lot::Mutex::new(VecDeque::new()),
            failover_asked: Notify::new(),
            data_loss_pending: parking_lot::Mutex::new(None),
            lost_writes: LostWrites::default(),
            calls_in_flight: AtomicU64::new(0),
            failed_over: Notify::new(),
        };
        Self { shared: Arc::new(shared) }
    }

    /// Every request that arrives over the network from now on waits this long (in the host's
    /// time) before it runs: a slow store. `Duration::ZERO` ends it.
    pub fn set_extra_latency(&self, latency: Duration) {
        *self.shared.extra_latency.lock() = latency;
    }

    /// The extra latency now in force.
    pub fn extra_latency(&self) -> Duration {
        *self.shared.extra_latency.lock()
    }

    /// Fails the store over to a standby that lacks the writes of the last `lose_last`: writes
    /// applied at least `lose_last` before the failover runs are kept, younger ones are lost.
    /// It runs on the store host, on its clock, before any request that has not started yet
    /// (callable from anywhere, even outside a runtime).
    pub fn fail_over(&self, lose_last: Duration) -> FailoverTicket {
        let (reply, outcome) = oneshot::channel();
        let mut pending = self.shared.failovers_pending.lock();
        if pending.len() >= FAILOVERS_PENDING_MAX {
            let _ = reply.send(Err(FailoverError::TooManyPending));
        } else {
            pending.push_back(PendingFailover { lose_last, reply });
            self.shared.failover_asked.notify_one();
        }
        FailoverTicket { outcome }
    }

    /// Empties the host: its primary, its standbys and its journal start again as they were when
    /// the host was made, as a cache server without persistence comes back from a crash. It runs
    /// on the host before any request that has not started yet (callable from anywhere, even
    /// outside a runtime), so a host crashed meanwhile comes back empty; a second loss asked for
    /// before the first ran replaces it.
    pub fn lose_data(&self) -> DataLossTicket {
        let (reply, outcome) = oneshot::channel();
        *self.shared.data_loss_pending.lock() = Some(reply);
        self.shared.failover_asked.notify_one();
        DataLossTicket { outcome }
    }

    /// Runs a request that came over the network. In semi-sync mode its answer waits until the
    /// standby holds every write the request saw; if a failover took one of those back
    /// meanwhile, the answer is `Unavailable` (the outcome is unknown), never what the lost
    /// state said.
    async fn handle_remote(&self, request: StoreRequest) -> StoreResponse {
        self.shared.calls_in_flight.fetch_add(1, Ordering::Relaxed);
        let _answered = AnsweredOnDrop(&self.shared.calls_in_flight);
        let latency = self.extra_latency();
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let (response, durable) = self.apply(request).await;
        let Some((durable, wait)) = durable else { return response };
        tokio::time::sleep(wait).await;
        if self.shared.lost_writes.saw_a_lost_write(durable.sequence) {
            return StoreResponse::Refused(WireError::Unavailable {
                reason: "store failover: the write was lost before the standby held it".into(),
            });
        }
        response
    }

    /// Runs a request against the primary, journaling it if it writes. Returns the answer and,
    /// in semi-sync mode when the standby does not hold the writes it saw yet, what it must
    /// wait for and how long. Only a write, or a read in semi-sync mode, reads the clock: a
    /// host without standbys in async mode needs no time.
    async fn apply(&self, request: StoreRequest) -> (StoreResponse, Option<(Durable, Duration)>) {
        let mut state = self.lock_state().await;
        let write = request.is_write();
        state.writes_held += u64::from(write);
        // An async host without standbys can never fail over: a journal would only cost; and
        // an async host answers reads at once.
        if state.standby_stream.is_none() && !(write && state.journaling) {
            return (execute(&state.primary, request).await, None);
        }
        let now = self.clock_now(&mut state);
        let (response, durable) = if write {
            state.execute_write(request, now, self.shared.config.replication_window).await
        } else {
            (execute(&state.primary, request).await, state.durable_applied())
        };
        let waiting = durable.filter(|durable| durable.at > now).map(|durable| (durable, durable.at - now));
        (response, waiting)
    }

    /// The state, after running any loss of data or failover asked for.
    async fn lock_state(&self) -> AsyncMutexGuard<'_, HostState> {
        let mut state = self.shared.state.lock().await;
        let data_loss = self.shared.data_loss_pending.lock().take();
        if let Some(reply) = data_loss {
            let report = state.lose_data(&self.shared.config).await;
            tracing::info!(?report, "store host lost its data");
            let _ = reply.send(report);
        }
        loop {
            let Some(pending) = self.shared.failovers_pending.lock().pop_front() else { break };
            let now = self.clock_now(&mut state);
            let outcome = state
                .fail_over(pending.lose_last, now, self.shared.config.failovers_max, &self.shared.lost_writes)
                .await
                .map(|report| FailoverReport {
                    calls_cut_off: self.shared.calls_in_flight.load(Ordering::Relaxed),
                    ..report
                });
            if outcome.is_ok() {
                self.shared.failed_over.notify_waiters();
            }
            match &outcome {
                Ok(report) => tracing::info!(?report, lose_last = ?pending.lose_last, "store failover"),
                Err(error) => tracing::warn!(%error, "store failover refused"),
            }
            let _ = pending.reply.send(outcome);
        }
        state
    }

    /// Runs failovers as they are asked for, even when no request comes.
    async fn run_failovers(&self) {
        loop {
            self.shared.failover_asked.notified().await;
            drop(self.lock_state().await);
        }
    }

    fn clock_now(&self, state: &mut HostState) -> Duration {
        let now = match self.shared.config.clock {
            JournalClock::Simulation => turmoil::sim_elapsed().unwrap_or(state.clock_last),
            JournalClock::Tokio => Instant::now().saturating_duration_since(self.shared.tokio_base),
        };
        state.clock_last = state.clock_last.max(now);
        state.clock_last
    }

    /// Resolves when a failover runs (register before it may run: poll it once first).
    async fn failed_over(&self) {
        self.shared.failed_over.notified().await;
    }

    /// A call from outside the network (seeding before a run, reading after it): no waiting
    /// for the standby, as no failover can come between.
    async fn call(&self, request: StoreRequest) -> Result<StoreResponse, StoreError> {
        Ok(self.apply(request).await.0)
    }
}

impl HostState {
    /// Starts the host's state again, empty, keeping only what must never go back: the journal's
    /// clock and the sequence numbers.
    async fn lose_data(&mut self, config: &StoreHostConfig) -> DataLossReport {
        let report = DataLossReport {
            writes_lost: self.writes_held,
            admissions_lost: self.primary.admissions().await.map_or(0, |admissions| admissions.len() as u64),
        };
        let standbys_count = self.standbys.len();
        self.primary = MemoryStore::new(config.store.clone());
        self.standbys = (0..standbys_count).map(|_| MemoryStore::new(config.store.clone())).collect();
        self.journal.clear();
        self.standbys_through = None;
        self.writes_held = 0;
        report
    }

    /// Runs a write against the primary, ships it to the standby (semi-sync mode) and journals
    /// it (a host that can fail over).
    async fn execute_write(
        &mut self,
        request: StoreRequest,
        now: Duration,
        window: Duration,
    ) -> (StoreResponse, Option<Durable>) {
        let sequence = self.sequence_next;
        self.sequence_next += 1;
        self.sequence_applied = sequence;
        let acknowledged_at = self.standby_stream.as_mut().map(|stream| stream.ship(now));
        let response = if self.journaling {
            let response = execute(&self.primary, request.clone()).await;
            self.journal.push_back(JournalEntry { at: now, sequence, acknowledged_at, request });
            self.replicate(now, window).await;
            response
        } else {
            execute(&self.primary, request).await
        };
        (response, acknowledged_at.map(|at| Durable { sequence, at }))
    }

    /// Semi-sync mode: what an answer computed from the primary's state now waits for.
    fn durable_applied(&self) -> Option<Durable> {
        let stream = self.standby_stream.as_ref()?;
        Some(Durable { sequence: self.sequence_applied, at: stream.acknowledged_last() })
    }

    /// Moves writes older than the window (or beyond the journal's maximum) to the standbys.
    async fn replicate(&mut self, now: Duration, window: Duration) {
        loop {
            let Some(oldest) = self.journal.front() else { return };
            let aged = oldest.at.saturating_add(window) < now;
            let overflowing = self.journal.len() > JOURNAL_ENTRIES_MAX;
            if !aged && !overflowing {
                return;
            }
            if !aged {
                if self.journal_overflowed == 0 {
                    tracing::warn!(JOURNAL_ENTRIES_MAX, "store journal full: writes reach the standbys early");
                }
                self.journal_overflowed += 1;
            }
            let Some(entry) = self.journal.pop_front() else { return };
            for standby in &self.standbys {
                execute(standby, entry.request.clone()).await;
            }
            self.standbys_through = Some(entry.at);
        }
    }

    async fn fail_over(
        &mut self,
        lose_last: Duration,
        now: Duration,
        failovers_max: u32,
        lost_writes: &LostWrites,
    ) -> Result<FailoverReport, FailoverError> {
        let old_enough = |at: Duration| at.saturating_add(lose_last) <= now;
        if let Some(through) = self.standbys_through.filter(|through| !old_enough(*through)) {
            return Err(FailoverError::BeyondJournal { lose_last, journal_covers: now.saturating_sub(through) });
        }
        // A write survives when it is old enough to have reached the standby anyway, or when
        // the standby acknowledged it (semi-sync). Both times never go back along the journal,
        // so the writes to keep are a prefix.
        let kept = |entry: &JournalEntry| {
            old_enough(entry.at) || entry.acknowledged_at.is_some_and(|acknowledged| acknowledged <= now)
        };
        let writes_replayed = self.journal.iter().take_while(|entry| kept(entry)).count();
        let writes_lost = self.journal.len() - writes_replayed;
        let writes_old_enough = self.journal.iter().take_while(|entry| old_enough(entry.at)).count();
        let writes_kept_by_standby = writes_replayed - writes_old_enough;
        if writes_lost > 0 {
            let promoted = self.standbys.pop().ok_or(FailoverError::NoStandbyLeft { failovers_max })?;
            let first_lost = self.journal[writes_replayed].sequence;
            lost_writes.record(first_lost..=self.sequence_applied);
            self.sequence_applied = first_lost - 1;
            self.writes_held = self.writes_held.saturating_sub(writes_lost as u64);
            self.journal.truncate(writes_replayed);
            for entry in &self.journal {
                execute(&promoted, entry.request.clone()).await;
            }
            self.primary = promoted;
        }
        Ok(FailoverReport {
            at: now,
            writes_replayed,
            writes_lost,
            writes_kept_by_standby,
            calls_cut_off: 0,
            failovers_left: self.standbys.len(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------------

/// A source of accepted connections: turmoil's `TcpListener` in the simulator, tokio's live and
/// in tests, or anything else that hands out byte streams.
pub trait Accept: Send {
    /// The connection type.
    type Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static;
    /// Waits for the next connection.
    fn accept(&mut self) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

impl Accept for turmoil::net::TcpListener {
    type Stream = turmoil::net::TcpStream;

    async fn accept(&mut self) -> io::Result<Self::Stream> {
        turmoil::net::TcpListener::accept(self).await.map(|(stream, _)| stream)
    }
}

impl Accept for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;

    async fn accept(&mut self) -> io::Result<Self::Stream> {
        let (stream, _) = tokio::net::TcpListener::accept(self).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// Serves the store host behind `control` on every connection `listener` accepts, until the
/// returned future is dropped (which closes every connection it opened). It never returns on
/// its own.
pub async fn serve_store<L: Accept>(mut listener: L, control: StoreControl) {
    let registry = Arc::new(Registry::default());
    let _close_all = CloseAllOnDrop(registry.clone());
    let accept_loop = async {
        loop {
            match listener.accept().await {
                Ok(stream) => registry.admit(stream, &control),
                Err(error) => {
                    tracing::warn!(%error, "store host: accept failed");
                    tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
                }
            }
        }
    };
    // `biased` everywhere here: tokio otherwise polls branches in an order drawn from its own
    // unseeded RNG, and a simulated run would not replay.
    tokio::select! {
        biased;
        () = accept_loop => {}
        () = control.run_failovers() => {}
    }
}

/// The open connections of one server, with how recently each was active.
#[derive(Default)]
struct Registry {
    inner: parking_lot::Mutex<RegistryInner>,
    /// Counts frames read over all connections: a connection's last activity is a tick of it.
    ticks: AtomicU64,
}

#[derive(Default)]
struct RegistryInner {
    next_connection_id: u64,
    connections: BTreeMap<u64, OpenConnection>,
}

struct OpenConnection {
    last_active_tick: Arc<AtomicU64>,
    task: AbortHandle,
}

impl Registry {
    fn admit<S>(self: &Arc<Self>, stream: S, control: &StoreControl)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let evicted = {
            let mut inner = self.inner.lock();
            let evicted = if inner.connections.len() >= CONNECTIONS_MAX {
                let least_active = inner
                    .connections
                    .iter()
                    .min_by_key(|(id, open)| (open.last_active_tick.load(Ordering::Relaxed), **id))
                    .map(|(id, _)| *id);
                least_active.and_then(|id| inner.connections.remove(&id))
            } else {
                None
            };
            let connection_id = inner.next_connection_id;
            inner.next_connection_id += 1;
            let last_active_tick = Arc::new(AtomicU64::new(self.ticks.load(Ordering::Relaxed)));
            let activity = Activity { registry: self.clone(), last_active_tick: last_active_tick.clone() };
            let forget = ForgetOnDrop { registry: self.clone(), connection_id };
            let task = tokio::spawn(serve_connection(stream, control.clone(), activity, forget));
            inner.connections.insert(connection_id, OpenConnection { last_active_tick, task: task.abort_handle() });
            evicted
        };
        // Aborted outside the lock: the task's `ForgetOnDrop` takes it.
        if let Some(open) = evicted {
            tracing::warn!(CONNECTIONS_MAX, "store host: closing its least recently active connection");
            open.task.abort();
        }
    }
}

struct Activity {
    registry: Arc<Registry>,
    last_active_tick: Arc<AtomicU64>,
}

impl Activity {
    fn touch(&self) {
        let tick = self.registry.ticks.fetch_add(1, Ordering::Relaxed) + 1;
        self.last_active_tick.store(tick, Ordering::Relaxed);
    }
}

/// Removes a connection from the registry when its task ends, however it ends.
struct ForgetOnDrop {
    registry: Arc<Registry>,
    connection_id: u64,
}

impl Drop for ForgetOnDrop {
    fn drop(&mut self) {
        self.registry.inner.lock().connections.remove(&self.connection_id);
    }
}

struct CloseAllOnDrop(Arc<Registry>);

impl Drop for CloseAllOnDrop {
    fn drop(&mut self) {
        let connections = std::mem::take(&mut self.0.inner.lock().connections);
        for open in connections.into_values() {
            open.task.abort();
        }
    }
}

async fn serve_connection<S>(stream: S, control: StoreControl, activity: Activity, forget: ForgetOnDrop)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let _forget = forget;
    let (read_half, write_half) = tokio::io::split(stream);
    let (responses, responses_out) = mpsc::unbounded_channel();
    let failed_over = control.clone();
    let reason = tokio::select! {
        biased;
        () = failed_over.failed_over() => "store failover: the peer was the old primary".to_owned(),
        reason = read_requests(read_half, control, activity, responses) => reason,
        reason = write_frames(write_half, responses_out) => reason,
    };
    tracing::debug!(%reason, "store host: connection closed");
}

/// Reads requests and answers each at once, or in its own task if it has to wait. The permit
/// that each holds until its response is written bounds what one connection can have in flight
/// (and queued to send).
async fn read_requests<R>(
    read_half: R,
    control: StoreControl,
    activity: Activity,
    responses: mpsc::UnboundedSender<(Vec<u8>, OwnedSemaphorePermit)>,
) -> String
where
    R: AsyncRead + Unpin,
{
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, read_half);
    let permits = Arc::new(Semaphore::new(IN_FLIGHT_MAX));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else { return "in-flight permits closed".into() };
        let body = match read_frame(&mut reader).await {
            Ok(Some(body)) => body,
            Ok(None) => return "closed by the client".into(),
            Err(error) => return format!("read: {error}"),
        };
        activity.touch();
        match postcard::from_bytes::<RequestFrame>(&body) {
            Ok(RequestFrame { id, request }) => {
                let control = control.clone();
                let responses = responses.clone();
                let mut answering = Box::pin(async move {
                    let response = control.handle_remote(request).await;
                    if let Some(frame) = encode_response(id, response) {
                        let _ = responses.send((frame, permit));
                    }
                });
                // Most requests finish at their first poll (no slow-store delay, the state
                // free): answered here, without a task of their own. One that waits goes on in
                // its own task, so it holds up no other request.
                let first_poll = std::future::poll_fn(|context| Poll::Ready(answering.as_mut().poll(context))).await;
                if first_poll.is_pending() {
                    tokio::spawn(answering);
                }
            }
            Err(error) => {
                let Ok(FrameId { id }) = postcard::from_bytes::<FrameId>(&body) else {
                    return format!("undecodable frame: {error}");
                };
                let refused =
                    StoreResponse::Refused(WireError::Invalid { reason: format!("undecodable request: {error}") });
                if let Some(frame) = encode_response(id, refused) {
                    let _ = responses.send((frame, permit));
                }
            }
        }
    }
}

/// Counts a network request as answered when its handling ends, however it ends.
struct AnsweredOnDrop<'a>(&'a AtomicU64);

impl Drop for AnsweredOnDrop<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Encodes a response; one that cannot be sent is replaced by an `Unavailable` error.
fn encode_response(id: u64, response: StoreResponse) -> Option<Vec<u8>> {
    encode_frame(&ResponseFrame { id, response })
        .or_else(|reason| {
            let refused = StoreResponse::Refused(WireError::Unavailable { reason: format!("store host: {reason}") });
            encode_frame(&ResponseFrame { id, response: refused })
        })
        .inspect_err(|reason| tracing::error!(%reason, "store host: response dropped"))
        .ok()
}

// ---------------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------------

/// How a [`RemoteStore`] behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteStoreConfig {
    /// The longest a call waits, connecting included; past it the call fails `Unavailable`.
    pub call_timeout: Duration,
    /// The wait after a failed connection attempt before the next; doubled after each failure.
    pub reconnect_backoff_min: Duration,
    /// The longest wait between connection attempts.
    pub reconnect_backoff_max: Duration,
}

impl Default for RemoteStoreConfig {
    fn default() -> Self {
        Self {
            call_timeout: Duration::from_secs(2),
            reconnect_backoff_min: Duration::from_millis(50),
            reconnect_backoff_max: Duration::from_secs(1),
        }
    }
}

trait ByteStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> ByteStream for T {}

type ConnectFuture = Pin<Box<dyn Future<Output = io::Result<Box<dyn ByteStream>>> + Send>>;
type Connector = Box<dyn Fn() -> ConnectFuture + Send + Sync>;

/// A store host reached over one multiplexed connection; implements [`RecordStore`] and
/// [`CacheStore`].
///
/// The connection is opened on the first call and again on the first call after it broke (no
/// sooner than the reconnect backoff allows). A connection is broken when the host closes it,
/// when a frame is bad, or when a call times out without a single frame arriving on the
/// connection meanwhile (a partition in turmoil stalls a connection rather than failing it).
/// Breaking fails every call in flight with `Unavailable`.
///
/// Make it inside the runtime that will use it (in turmoil: inside the host's software), as its
/// connection's tasks live there.
pub struct RemoteStore {
    config: RemoteStoreConfig,
    connector: Connector,
    next_request_id: AtomicU64,
    in_flight: Semaphore,
    link: AsyncMutex<Link>,
}

#[derive(Default)]
struct Link {
    connection: Option<Arc<Connection>>,
    /// When the last connection attempt that did not succeed started.
    attempt_failed_at: Option<Instant>,
    backoff: Duration,
    last_error: String,
}

impl fmt::Debug for RemoteStore {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("RemoteStore")
            .field("config", &self.config)
            .field("in_flight", &(IN_FLIGHT_MAX - self.in_flight.available_permits()))
            .finish_non_exhaustive()
    }
}

impl RemoteStore {
    /// A store reached through `connect`, for example
    /// `|| turmoil::net::TcpStream::connect(("store-record", 7000))`.
    pub fn new<F, Fut, S>(config: RemoteStoreConfig, connect: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = io::Result<S>> + Send + 'static,
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let connector: Connector = Box::new(move || {
            let connecting = connect();
            Box::pin(async move { connecting.await.map(|stream| Box::new(stream) as Box<dyn ByteStream>) })
        });
        Self {
            config,
            connector,
            next_request_id: AtomicU64::new(1),
            in_flight: Semaphore::new(IN_FLIGHT_MAX),
            link: AsyncMutex::new(Link { backoff: config.reconnect_backoff_min, ..Link::default() }),
        }
    }

    async fn call(&self, request: StoreRequest) -> Result<StoreResponse, StoreError> {
        let deadline = Instant::now() + self.config.call_timeout;
        let timed_out = || unavailable(format!("no answer within {:?}", self.config.call_timeout));
        let _permit = tokio::time::timeout_at(deadline, self.in_flight.acquire())
            .await
            .map_err(|_| timed_out())?
            .map_err(|_| unavailable("client closed"))?;
        let connection = tokio::time::timeout_at(deadline, self.connection()).await.map_err(|_| timed_out())??;
        let id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode_frame(&RequestFrame { id, request }).map_err(|reason| StoreError::Invalid { reason })?;
        let mut waiter = connection.send(id, frame)?;
        let frames_before = connection.table.frames_received();
        match tokio::time::timeout_at(deadline, &mut waiter.answer).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(_)) => Err(unavailable(connection.table.closed_reason())),
            Err(_) => {
                if connection.table.frames_received() == frames_before {
                    connection.close("no frame arrived within a call's timeout");
                }
                Err(timed_out())
            }
        }
    }

    /// The open connection, or a new one.
    async fn connection(&self) -> Result<Arc<Connection>, StoreError> {
        let mut link = self.link.lock().await;
        if let Some(connection) = link.connection.as_ref().filter(|connection| connection.is_open()) {
            return Ok(connection.clone());
        }
        link.connection = None;
        let now = Instant::now();
        // A clock that went back (a restarted turmoil host) does not extend the backoff.
        let backing_off = link
            .attempt_failed_at
            .and_then(|failed_at| now.checked_duration_since(failed_at))
            .is_some_and(|since| since < link.backoff);
        if backing_off {
            return Err(unavailable(format!("store host unreachable, retrying soon: {}", link.last_error)));
        }
        // Counted as failed until it succeeds, so a call that times out mid-connect still backs off.
        link.attempt_failed_at = Some(now);
        match (self.connector)().await {
            Ok(stream) => {
                link.attempt_failed_at = None;
                link.backoff = self.config.reconnect_backoff_min;
                let connection = Connection::start(stream);
                link.connection = Some(connection.clone());
                Ok(connection)
            }
            Err(error) => {
                link.last_error = format!("connect: {error}");
                link.backoff = link
                    .backoff
                    .saturating_mul(2)
                    .clamp(self.config.reconnect_backoff_min, self.config.reconnect_backoff_max);
                Err(unavailable(link.last_error.clone()))
            }
        }
    }
}

/// One connection to a store host: frames go out through `outgoing`, answers come back to the
/// waiters in `table`.
struct Connection {
    outgoing: mpsc::UnboundedSender<(Vec<u8>, ())>,
    table: Arc<WaiterTable>,
    task: AbortHandle,
}

impl Connection {
    fn start(stream: Box<dyn ByteStream>) -> Arc<Self> {
        let table = Arc::new(WaiterTable::default());
        let (outgoing, frames) = mpsc::unbounded_channel();
        let task = tokio::spawn(run_client_connection(stream, frames, table.clone()));
        Arc::new(Self { outgoing, table, task: task.abort_handle() })
    }

    fn is_open(&self) -> bool {
        self.table.inner.lock().closed.is_none()
    }

    fn send(self: &Arc<Self>, id: u64, frame: Vec<u8>) -> Result<Waiter, StoreError> {
        let (answer_in, answer) = oneshot::channel();
        {
            let mut inner = self.table.inner.lock();
            if let Some(reason) = &inner.closed {
                return Err(unavailable(reason.clone()));
            }
            inner.waiters.insert(id, answer_in);
        }
        let waiter = Waiter { id, answer, table: self.table.clone() };
        self.outgoing.send((frame, ())).map_err(|_| unavailable(self.table.closed_reason()))?;
        Ok(waiter)
    }

    fn close(&self, reason: &str) {
        self.table.close(reason);
        self.task.abort();
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The calls waiting on one connection, by request id.
#[derive(Default)]
struct WaiterTable {
    inner: parking_lot::Mutex<WaiterTableInner>,
}

#[derive(Default)]
struct WaiterTableInner {
    /// Why the connection closed; `None` while it is open.
    closed: Option<String>,
    waiters: BTreeMap<u64, oneshot::Sender<StoreResponse>>,
    frames_received: u64,
}

impl WaiterTable {
    fn deliver(&self, id: u64, response: StoreResponse) {
        let waiter = {
            let mut inner = self.inner.lock();
            inner.frames_received += 1;
            inner.waiters.remove(&id)
        };
        // No waiter: its call timed out or was dropped; the answer is not wanted any more.
        if let Some(waiter) = waiter {
            let _ = waiter.send(response);
        }
    }

    /// Closes the table: every waiter, now and later, fails. The first reason stays.
    fn close(&self, reason: &str) {
        let waiters = {
            let mut inner = self.inner.lock();
            inner.closed.get_or_insert_with(|| reason.to_owned());
            std::mem::take(&mut inner.waiters)
        };
        drop(waiters);
    }

    fn closed_reason(&self) -> String {
        self.inner.lock().closed.clone().unwrap_or_else(|| "connection lost".into())
    }

    fn frames_received(&self) -> u64 {
        self.inner.lock().frames_received
    }
}

/// A call waiting for its answer; gives up its place in the table when dropped.
struct Waiter {
    id: u64,
    answer: oneshot::Receiver<StoreResponse>,
    table: Arc<WaiterTable>,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.table.inner.lock().waiters.remove(&self.id);
    }
}

/// Closes a table when the connection's task ends, even when it is aborted or its runtime is
/// dropped (a crashed turmoil host).
struct CloseOnDrop(Arc<WaiterTable>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close("connection task ended");
    }
}

async fn run_client_connection(
    stream: Box<dyn ByteStream>,
    frames: mpsc::UnboundedReceiver<(Vec<u8>, ())>,
    table: Arc<WaiterTable>,
) {
    let _close = CloseOnDrop(table.clone());
    let (read_half, write_half) = tokio::io::split(stream);
    let reason = tokio::select! {
        biased;
        reason = read_responses(read_half, &table) => reason,
        reason = write_frames(write_half, frames) => reason,
    };
    tracing::debug!(%reason, "store client: connection closed");
    table.close(&reason);
}

async fn read_responses<R: AsyncRead + Unpin>(read_half: R, table: &WaiterTable) -> String {
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, read_half);
    loop {
        let body = match read_frame(&mut reader).await {
            Ok(Some(body)) => body,
            Ok(None) => return "closed by the store host".into(),
            Err(error) => return format!("read: {error}"),
        };
        match postcard::from_bytes::<ResponseFrame>(&body) {
            Ok(ResponseFrame { id, response }) => table.deliver(id, response),
            Err(error) => return format!("undecodable frame from the store host: {error}"),
        }
    }
}

fn unexpected(response: &StoreResponse) -> StoreError {
    unavailable(format!("protocol: unexpected {} response", response.kind()))
}

/// Unpacks the answer to one call: the `Result` in the expected variant.
macro_rules! answer {
    ($self:ident, $request:expr, $variant:ident) => {
        answer!($self, $request, $variant => std::convert::identity)
    };
    ($self:ident, $request:expr, $variant:ident => $convert:expr) => {
        match $self.call($request).await? {
            StoreResponse::$variant(result) => result.map($convert).map_err(StoreError::from),
            StoreResponse::Refused(error) => Err(StoreError::from(error)),
            other => Err(unexpected(&other)),
        }
    };
}

/// Implements both store traits for a type with `async fn call(&self, StoreRequest)`.
macro_rules! impl_store_traits {
    ($type:ty) => {
        #[async_trait]
        impl RecordStore for $type {
            async fn ping(&self) -> Result<(), StoreError> {
                answer!(self, StoreRequest::RecordPing, Unit)
            }

            async fn put_schedule(&self, schedule: Schedule) -> Result<(), StoreError> {
                answer!(self, StoreRequest::PutSchedule { schedule }, Unit)
            }

            async fn schedules(&self, now_ms: u64) -> Result<Vec<ScheduleSummary>, StoreError> {
                answer!(self, StoreRequest::Schedules { now_ms }, Schedules)
            }

            async fn schedule(&self, schedule_id: ScheduleId) -> Result<Schedule, StoreError> {
                answer!(self, StoreRequest::Schedule { schedule_id }, Schedule)
            }

            async fn seat_map(
                &self,
                schedule_id: ScheduleId,
                filter: SeatFilter,
                now_ms: u64,
            ) -> Result<Vec<SeatView>, StoreError> {
                answer!(self, StoreRequest::SeatMap { schedule_id, filter, now_ms }, SeatMap)
            }

            async fn seat(
                &self,
                schedule_id: ScheduleId,
                seat_id: SeatId,
                fence: Option<FenceToken>,
            ) -> Result<SeatSlot, StoreError> {
                answer!(self, StoreRequest::Seat { schedule_id, seat_id, fence }, Seat)
            }

            async fn create_user(&self, name: String, points: u64, now_ms: u64) -> Result<Account, StoreError> {
                answer!(self, StoreRequest::CreateUser { name, points, now_ms }, Account)
            }

            async fn account(&self, user_id: UserId) -> Result<Account, StoreError> {
                answer!(self, StoreRequest::Account { user_id }, Account)
            }

            async fn existing_users(&self, first: UserId, count: u32) -> Result<Vec<UserId>, StoreError> {
                answer!(self, StoreRequest::ExistingUsers { first, count }, UserIds)
            }

            async fn top_up(
                &self,
                user_id: UserId,
                amount: u64,
                idempotency_key: String,
                now_ms: u64,
            ) -> Result<Account, StoreError> {
                answer!(self, StoreRequest::TopUp { user_id, amount, idempotency_key, now_ms }, Account)
            }

            async fn try_hold(&self, request: HoldRequest, now_ms: u64) -> Result<Reservation, StoreError> {
                answer!(self, StoreRequest::TryHold { request, now_ms }, Reservation)
            }

            async fn write_hold(
                &self,
                request: HoldRequest,
                guard: WriteGuard,
                now_ms: u64,
            ) -> Result<Reservation, StoreError> {
                answer!(self, StoreRequest::WriteHold { request, guard, now_ms }, Reservation)
            }

            async fn confirm(
                &self,
                reservation_id: ReservationId,
                user_id: UserId,
                idempotency_key: Option<String>,
                now_ms: u64,
            ) -> Result<Reservation, StoreError> {
                answer!(self, StoreRequest::Confirm { reservation_id, user_id, idempotency_key, now_ms }, Reservation)
            }

            async fn cancel(
                &self,
                reservation_id: ReservationId,
                user_id: UserId,
                now_ms: u64,
            ) -> Result<Reservation, StoreError> {
                answer!(self, StoreRequest::Cancel { reservation_id, user_id, now_ms }, Reservation)
            }

            async fn reservation(&self, reservation_id: ReservationId) -> Result<Reservation, StoreError> {
                answer!(self, StoreRequest::Reservation { reservation_id }, Reservation)
            }

            async fn expire_holds(&self, now_ms: u64, limit: u32) -> Result<u32, StoreError> {
                answer!(self, StoreRequest::ExpireHolds { now_ms, limit }, Count)
            }

            async fn idempotency_begin(
                &self,
                key: String,
                fingerprint: [u8; 32],
                lease_ms: u64,
                ttl_ms: u64,
                now_ms: u64,
            ) -> Result<IdempotencyDecision, StoreError> {
                answer!(
                    self,
                    StoreRequest::IdempotencyBegin { key, fingerprint, lease_ms, ttl_ms, now_ms },
                    Idempotency
                )
            }

            async fn idempotency_complete(
                &self,
                key: String,
                fingerprint: [u8; 32],
                response: StoredResponse,
                ttl_ms: u64,
                now_ms: u64,
            ) -> Result<(), StoreError> {
                answer!(self, StoreRequest::IdempotencyComplete { key, fingerprint, response, ttl_ms, now_ms }, Unit)
            }

            async fn idempotency_renew(
                &self,
                key: String,
                fingerprint: [u8; 32],
                lease_ms: u64,
                now_ms: u64,
            ) -> Result<bool, StoreError> {
                answer!(self, StoreRequest::IdempotencyRenew { key, fingerprint, lease_ms, now_ms }, Flag)
            }

            async fn idempotency_release(&self, key: String, fingerprint: [u8; 32]) -> Result<(), StoreError> {
                answer!(self, StoreRequest::IdempotencyRelease { key, fingerprint }, Unit)
            }

            async fn purge_idempotency(&self, now_ms: u64, limit: u32) -> Result<u32, StoreError> {
                answer!(self, StoreRequest::PurgeIdempotency { now_ms, limit }, Count)
            }

            async fn outbox_pending(&self, limit: u32) -> Result<Vec<OutboxEvent>, StoreError> {
                answer!(self, StoreRequest::OutboxPending { limit }, Outbox)
            }

            async fn outbox_mark_sent(&self, ids: Vec<u64>) -> Result<(), StoreError> {
                answer!(self, StoreRequest::OutboxMarkSent { ids }, Unit)
            }

            async fn append_audit(&self, entry: AuditEntry) -> Result<(), StoreError> {
                answer!(self, StoreRequest::AppendAudit { entry: entry.into() }, Unit)
            }

            async fn audit(&self, limit: u32) -> Result<Vec<AuditEntry>, StoreError> {
                answer!(self, StoreRequest::Audit { limit }, Audit => |entries| entries.into_iter().map(AuditEntry::from).collect())
            }

            async fn dump(&self) -> Result<RecordDump, StoreError> {
                answer!(self, StoreRequest::Dump, Dump)
            }
        }

        #[async_trait]
        impl CacheStore for $type {
            async fn ping(&self) -> Result<(), StoreError> {
                answer!(self, StoreRequest::CachePing, Unit)
            }

            async fn create_line(
                &self,
                schedule_id: ScheduleId,
                opens_at_ms: u64,
                order: QueueOrder,
                policy: AdmissionPolicy,
            ) -> Result<(), StoreError> {
                answer!(self, StoreRequest::CreateLine { schedule_id, opens_at_ms, order, policy }, Unit)
            }

            async fn join(
                &self,
                schedule_id: ScheduleId,
                user_id: UserId,
                now_ms: u64,
            ) -> Result<QueueStatus, StoreError> {
                answer!(self, StoreRequest::Join { schedule_id, user_id, now_ms }, QueueStatus)
            }

            async fn queue_status(
                &self,
                schedule_id: ScheduleId,
                seq: u64,
                now_ms: u64,
            ) -> Result<QueueStatus, StoreError> {
                answer!(self, StoreRequest::QueueStatus { schedule_id, seq, now_ms }, QueueStatus)
            }

            async fn admit(&self, schedule_id: ScheduleId, now_ms: u64) -> Result<AdmitReport, StoreError> {
                answer!(self, StoreRequest::Admit { schedule_id, now_ms }, Admit)
            }

            async fn mark_used(&self, schedule_id: ScheduleId, seq: u64, now_ms: u64) -> Result<(), StoreError> {
                answer!(self, StoreRequest::MarkUsed { schedule_id, seq, now_ms }, Unit)
            }

            async fn admission_policy(&self, schedule_id: ScheduleId) -> Result<AdmissionPolicy, StoreError> {
                answer!(self, StoreRequest::AdmissionPolicy { schedule_id }, Policy)
            }

            async fn set_admission_policy(
                &self,
                schedule_id: ScheduleId,
                policy: AdmissionPolicy,
            ) -> Result<AdmissionPolicy, StoreError> {
                answer!(self, StoreRequest::SetAdmissionPolicy { schedule_id, policy }, Policy)
            }

            async fn admissions(&self) -> Result<Vec<Admitted>, StoreError> {
                answer!(self, StoreRequest::Admissions, Admissions)
            }

            async fn acquire_lock(
                &self,
                key: String,
                ttl_ms: u64,
                now_ms: u64,
            ) -> Result<Option<LockGrant>, StoreError> {
                answer!(self, StoreRequest::AcquireLock { key, ttl_ms, now_ms }, Lock)
            }

            async fn renew_lock(
                &self,
                key: String,
                fence: FenceToken,
                ttl_ms: u64,
                now_ms: u64,
            ) -> Result<Option<LockGrant>, StoreError> {
                answer!(self, StoreRequest::RenewLock { key, fence, ttl_ms, now_ms }, Lock)
            }

            async fn release_lock(&self, key: String, fence: FenceToken) -> Result<(), StoreError> {
                answer!(self, StoreRequest::ReleaseLock { key, fence }, Unit)
            }

            async fn take_rate(&self, key: String, limit: RateLimit, now_ms: u64) -> Result<Option<u64>, StoreError> {
                let RateLimit { per_s, burst } = limit;
                answer!(self, StoreRequest::TakeRate { key, per_s, burst, now_ms }, Wait)
            }
        }
    };
}

impl_store_traits!(RemoteStore);
impl_store_traits!(StoreControl);
