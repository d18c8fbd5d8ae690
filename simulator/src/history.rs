//! The record of one run, as the checker reads it: every client operation (invoke, then ok,
//! fail or unknown), the fences and admissions the engine accepted, the policy changes made
//! during the run, and the final state read after the faults healed.
//!
//! **Invariant:** every time is in microseconds since the start of the run, named `*_us`;
//! nothing here reads a clock. Operations, fences, admissions and policy changes carry
//! simulated (true) time; the final state carries the times the engine stored, by the clock of
//! the node that wrote them (which a clock-skew fault may have shifted). Identifiers are the
//! engine's `u64` ids, except queue tokens and idempotency keys, which are strings.
//!
//! **API boundary:** these types are serialised into run results, so field names are stable;
//! fields may be added, a change of meaning is a new version.
//!
//! [`HistoryRecorder`] builds a [`History`] during a run. It holds at most [`OPERATIONS_MAX`]
//! operations (and likewise for fences, admissions and policy changes); whatever does not fit
//! is counted in [`Overflow`], and the checker reports it, so a truncated history is never
//! mistaken for a complete one.

use std::fmt;
use std::net::IpAddr;

use anyhow::Context;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tcore_engine::domain::Admitted;
/// The engine's own reservation statuses, ledger reasons and outbox kinds, with the same
/// names on the wire.
pub use tcore_engine::domain::{LedgerReason, OutboxKind, ReservationStatus};
use tcore_engine::store::RecordDump;

/// Identifies one client operation within a history; the recorder hands them out from 0.
pub type OpId = u64;

/// The most operations a recorder keeps; later ones are counted in [`Overflow::operations`].
pub const OPERATIONS_MAX: usize = 10_000_000;
/// The most accepted fences a recorder keeps.
pub const FENCES_MAX: usize = 2_000_000;
/// The most admissions a recorder keeps.
pub const ADMISSIONS_MAX: usize = 4_000_000;
/// The most policy changes (admission or hold TTL) a recorder keeps.
pub const POLICY_CHANGES_MAX: usize = 100_000;

/// Everything the checker needs to judge one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct History {
    /// The scenario's name or path, for the replay hint (`tcore run SCENARIO --seed N`).
    pub scenario: String,
    /// The seed that drove every random choice of the run.
    pub seed: u64,
    /// The settings the invariants are judged against.
    pub config: CheckConfig,
    /// Client operations in the order they were invoked.
    pub operations: Vec<Operation>,
    /// Hold writes the engine accepted, in acceptance order.
    pub fences: Vec<AcceptedFence>,
    /// Admissions out of the waiting room, in the order the engine made them.
    pub admissions: Vec<Admission>,
    /// Admission policies set during the run (by the agent or an operator), in order.
    pub admission_changes: Vec<AdmissionChange>,
    /// Hold TTLs set during the run, in order.
    pub hold_ttl_changes: Vec<HoldTtlChange>,
    /// What the run could not keep because a limit was reached.
    pub overflow: Overflow,
    /// The engine's state, read at `config.end_us` after the faults healed.
    pub final_state: FinalState,
}

/// The settings of the run that the invariants depend on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckConfig {
    /// The hold TTL in force at the start; [`History::hold_ttl_changes`] may raise it later.
    pub hold_ttl_us: u64,
    /// How long after a hold's expiry (and after the faults healed) the engine may still show
    /// it `HELD`: the sweeper's interval plus slack.
    pub hold_expiry_grace_us: u64,
    /// Admissions per second per schedule at the start.
    pub admission_rate_per_s: f64,
    /// How many admissions may be made at once from banked credit at the start (the engine's
    /// burst, rounded up).
    pub admission_burst: u64,
    /// When the last fault healed; equal to or before `end_us` in a run whose faults all healed.
    pub heal_us: u64,
    /// When the run ended and the final state was read.
    pub end_us: u64,
}

/// One call a virtual user made, from invocation to outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    /// The operation's id, unique within the history.
    pub op_id: OpId,
    /// The virtual user who made the call (the simulator's id, not the engine's user id).
    pub client: u64,
    /// The address the call came from.
    pub ip: IpAddr,
    /// What was asked.
    pub kind: OpKind,
    /// The `Idempotency-Key` the call carried, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// When the call was sent.
    pub invoke_us: u64,
    /// When the answer (or the client's decision to give up) arrived; `None` if the run
    /// ended first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub complete_us: Option<u64>,
    /// How the call ended.
    pub outcome: Outcome,
}

/// The API call an operation made, with the arguments that identify what it touched.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "call", rename_all = "snake_case")]
pub enum OpKind {
    /// `POST /v1/users`.
    CreateUser,
    /// `POST /v1/users/{id}/points`: adds points to a balance.
    ChargePoints { user_id: u64, amount: u64 },
    /// `POST /v1/schedules/{id}/queue`.
    JoinQueue { schedule_id: u64 },
    /// `GET /v1/queue/{token}`.
    QueueStatus { token: String },
    /// `GET /v1/schedules/{id}/seats`.
    SeatMap { schedule_id: u64 },
    /// `POST /v1/holds`.
    Hold { schedule_id: u64, seat_id: u64 },
    /// `POST /v1/reservations/{id}/confirm`.
    Confirm { reservation_id: u64 },
    /// `POST /v1/reservations/{id}/cancel`.
    Cancel { reservation_id: u64 },
    /// `GET /v1/reservations/{id}`.
    ReadReservation { reservation_id: u64 },
}

impl OpKind {
    /// The reservation the call names in its path, if any.
    pub fn reservation_id(&self) -> Option<u64> {
        match self {
            OpKind::Confirm { reservation_id }
            | OpKind::Cancel { reservation_id }
            | OpKind::ReadReservation { reservation_id } => Some(*reservation_id),
            _ => None,
        }
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpKind::CreateUser => write!(f, "create-user"),
            OpKind::ChargePoints { user_id, amount } => {
                write!(f, "charge-points user {user_id} +{amount}")
            }
            OpKind::JoinQueue { schedule_id } => write!(f, "join-queue schedule {schedule_id}"),
            OpKind::QueueStatus { token } => write!(f, "queue-status {token}"),
            OpKind::SeatMap { schedule_id } => write!(f, "seat-map schedule {schedule_id}"),
            OpKind::Hold { schedule_id, seat_id } => write!(f, "hold seat {schedule_id}/{seat_id}"),
            OpKind::Confirm { reservation_id } => write!(f, "confirm reservation {reservation_id}"),
            OpKind::Cancel { reservation_id } => write!(f, "cancel reservation {reservation_id}"),
            OpKind::ReadReservation { reservation_id } => {
                write!(f, "read reservation {reservation_id}")
            }
        }
    }
}

/// How an operation ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Outcome {
    /// A 2xx answer.
    Ok(OkResponse),
    /// A 4xx or 5xx answer with its problem `code`.
    Fail {
        http_status: u16,
        code: String,
        /// The digest of the response bytes when the answer is one the engine stores and
        /// replays for the idempotency key (a domain refusal such as a taken seat); `None`
        /// for transient refusals (rate limited, overloaded, request in progress, key reused
        /// with another body), which a retry may legitimately turn into a different answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        digest: Option<Digest>,
    },
    /// No answer: the effect may or may not have happened.
    Unknown { reason: UnknownReason },
}

impl Outcome {
    /// Whether the operation may have changed the engine's state: it succeeded, or nobody
    /// knows (no answer, or a 5xx that may have come after the change was made).
    pub fn may_have_taken_effect(&self) -> bool {
        match self {
            Outcome::Ok(_) | Outcome::Unknown { .. } => true,
            Outcome::Fail { http_status, .. } => *http_status >= 500,
        }
    }

    /// The digest of an answer the engine must replay byte for byte, if this is one.
    pub fn replayable_digest(&self) -> Option<Digest> {
        match self {
            Outcome::Ok(response) => response.digest,
            Outcome::Fail { digest, .. } => *digest,
            Outcome::Unknown { .. } => None,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Ok(response) => write!(f, "{response}"),
            Outcome::Fail { http_status, code, digest } => {
                write!(f, "fail {http_status} {code}")?;
                match digest {
                    Some(digest) => write!(f, " digest {digest}"),
                    None => Ok(()),
                }
            }
            Outcome::Unknown { reason } => write!(f, "unknown ({reason})"),
        }
    }
}

/// A summary of a successful answer: its status, a digest of its bytes, and the values the
/// checker reads. Every value is optional so that any call's answer fits.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct OkResponse {
    /// The HTTP status (200, 201, ...).
    pub http_status: u16,
    /// The digest of the response body bytes (see [`Digest::of`]), for a call that carried an
    /// idempotency key: the only answers the engine replays, and so the only ones the checker
    /// compares.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<Digest>,
    /// The reservation the answer is about (hold, confirm, cancel, read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation_id: Option<u64>,
    /// The fencing token of a hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<u64>,
    /// The reservation's or queue token's status as the answer gave it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ReportedStatus>,
    /// The user the answer is about (create user, charge points).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<u64>,
    /// The user's point balance as the answer gave it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub points: Option<u64>,
    /// The queue token handed out by a join.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl fmt::Display for OkResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ok {}", self.http_status)?;
        if let Some(reservation_id) = self.reservation_id {
            write!(f, " reservation {reservation_id}")?;
        }
        if let Some(fence) = self.fence {
            write!(f, " fence {fence}")?;
        }
        if let Some(status) = self.status {
            write!(f, " {status}")?;
        }
        if let Some(user_id) = self.user_id {
            write!(f, " user {user_id}")?;
        }
        if let Some(points) = self.points {
            write!(f, " points {points}")?;
        }
        match self.digest {
            Some(digest) => write!(f, " digest {digest}"),
            None => Ok(()),
        }
    }
}

/// A status named in an answer: a reservation's or a queue token's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReportedStatus {
    Held,
    Confirmed,
    Expired,
    Cancelled,
    Waiting,
    Admitted,
    Used,
}

impl fmt::Display for ReportedStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReportedStatus::Held => "HELD",
            ReportedStatus::Confirmed => "CONFIRMED",
            ReportedStatus::Expired => "EXPIRED",
            ReportedStatus::Cancelled => "CANCELLED",
            ReportedStatus::Waiting => "WAITING",
            ReportedStatus::Admitted => "ADMITTED",
            ReportedStatus::Used => "USED",
        })
    }
}

/// Why an operation has no known outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnknownReason {
    /// The client gave up waiting.
    Timeout,
    /// The connection broke (partition, crash) before an answer arrived.
    ConnectionLost,
    /// The run ended while the call was still out.
    RunEnded,
}

impl fmt::Display for UnknownReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UnknownReason::Timeout => "timeout",
            UnknownReason::ConnectionLost => "connection lost",
            UnknownReason::RunEnded => "run ended",
        })
    }
}

/// A 64-bit FNV-1a digest of response bytes, serialised as 16 hex digits (a string, so that
/// JSON readers with 53-bit numbers keep it exact).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Digest(pub u64);

impl Digest {
    /// The digest of `bytes`; stable across platforms and releases.
    pub fn of(bytes: &[u8]) -> Digest {
        const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        let hash = bytes.iter().fold(OFFSET_BASIS, |hash, &byte| (hash ^ u64::from(byte)).wrapping_mul(PRIME));
        Digest(hash)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        u64::from_str_radix(&text, 16)
            .map(Digest)
            .map_err(|error| serde::de::Error::custom(format!("digest {text:?}: {error}")))
    }
}

/// A hold write the engine accepted, appended by the engine node at the moment of acceptance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptedFence {
    pub schedule_id: u64,
    pub seat_id: u64,
    /// The fencing token the write carried.
    pub fence: u64,
    pub reservation_id: u64,
    /// The engine node (0-based) that accepted the write.
    pub node: u32,
    pub at_us: u64,
}

/// One user let out of a schedule's waiting room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Admission {
    pub schedule_id: u64,
    pub user_id: u64,
    /// The user's place in the order of joining (1 = first to join), per schedule.
    pub join_seq: u64,
    pub joined_us: u64,
    /// When the engine admitted the user, in simulated time (not a skewed node clock).
    pub admitted_us: u64,
}

/// An admission policy set for one schedule during the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdmissionChange {
    pub at_us: u64,
    pub schedule_id: u64,
    pub rate_per_s: f64,
    /// The credit the engine may bank under this policy.
    pub burst: u64,
    /// A paused line admits nobody, whatever the rate.
    pub paused: bool,
}

/// A hold TTL set during the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldTtlChange {
    pub at_us: u64,
    pub hold_ttl_us: u64,
}

/// Counts of records a recorder could not keep because a limit was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Overflow {
    pub operations: u64,
    pub fences: u64,
    pub admissions: u64,
    pub policy_changes: u64,
}

impl Overflow {
    /// Whether nothing was lost.
    pub fn is_empty(&self) -> bool {
        *self == Overflow::default()
    }
}

/// The engine's state read after the run, once the faults healed.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FinalState {
    pub reservations: Vec<FinalReservation>,
    pub users: Vec<FinalUser>,
    pub ledger: Vec<LedgerRecord>,
    pub schedules: Vec<FinalSchedule>,
    pub outbox: Vec<OutboxRecord>,
}

/// A reservation as the system of record holds it at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalReservation {
    pub id: u64,
    pub schedule_id: u64,
    pub seat_id: u64,
    pub user_id: u64,
    pub status: ReservationStatus,
    /// The fencing token of the hold.
    pub fence: u64,
    /// When the hold was taken, as the engine stored it.
    pub held_us: u64,
    /// When the hold lapses unless confirmed.
    pub expires_us: u64,
    /// When it was confirmed, if it ever was (a cancelled reservation keeps it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed_us: Option<u64>,
    /// When it was cancelled or expired, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_us: Option<u64>,
    /// Points paid at confirmation (0 while held).
    pub amount_paid: u64,
}

/// A user's point balance at the end. Signed, so that a store that lets it go below zero
/// can say so.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalUser {
    pub id: u64,
    pub balance: i64,
}

/// One movement of a balance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerRecord {
    pub user_id: u64,
    /// Positive for top-ups and refunds, negative for charges.
    pub delta: i64,
    pub reason: LedgerReason,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    pub at_us: u64,
}

/// A schedule and how many seats it has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalSchedule {
    pub id: u64,
    /// How many seats the schedule has.
    pub capacity: u64,
}

/// An event the outbox recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxRecord {
    /// The event's id: the outbox's order, the order the store wrote its events in.
    pub id: u64,
    pub kind: OutboxKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation_id: Option<u64>,
    pub user_id: u64,
    pub at_us: u64,
    /// Whether a relay published it (at least once) and marked it so.
    pub sent: bool,
}

/// Builds a [`History`] while a run goes on.
///
/// **Invariant:** an operation's id is its index in `operations` while the operation limit
/// has not been reached; ids keep counting past the limit so that completions of dropped
/// operations are recognised and not mistaken for programmer errors.
#[derive(Debug)]
pub struct HistoryRecorder {
    scenario: String,
    seed: u64,
    config: CheckConfig,
    operations: Vec<Operation>,
    next_op_id: OpId,
    fences: Vec<AcceptedFence>,
    admissions: Vec<Admission>,
    admission_changes: Vec<AdmissionChange>,
    hold_ttl_changes: Vec<HoldTtlChange>,
    overflow: Overflow,
}

impl HistoryRecorder {
    /// An empty history for a run of `scenario` with `seed`, judged against `config`.
    pub fn new(scenario: impl Into<String>, seed: u64, config: CheckConfig) -> Self {
        Self {
            scenario: scenario.into(),
            seed,
            config,
            operations: Vec::new(),
            next_op_id: 0,
            fences: Vec::new(),
            admissions: Vec::new(),
            admission_changes: Vec::new(),
            hold_ttl_changes: Vec::new(),
            overflow: Overflow::default(),
        }
    }

    /// Makes room for `count` operations at once (at most [`OPERATIONS_MAX`]), so that a large
    /// run does not copy its history each time it outgrows it.
    #[must_use]
    pub fn expecting(mut self, count: usize) -> Self {
        self.operations.reserve(count.min(OPERATIONS_MAX));
        self
    }

    /// Records that `client` sent a call at `invoke_us`; its outcome stays unknown until
    /// [`HistoryRecorder::complete`].
    pub fn invoke(
        &mut self,
        client: u64,
        ip: IpAddr,
        kind: OpKind,
        idempotency_key: Option<String>,
        invoke_us: u64,
    ) -> OpId {
        let op_id = self.next_op_id;
        self.next_op_id += 1;
        if self.operations.len() >= OPERATIONS_MAX {
            self.overflow.operations += 1;
            return op_id;
        }
        self.operations.push(Operation {
            op_id,
            client,
            ip,
            kind,
            idempotency_key,
            invoke_us,
            complete_us: None,
            outcome: Outcome::Unknown { reason: UnknownReason::RunEnded },
        });
        op_id
    }

    /// Records how operation `op_id` ended. A timeout or broken connection is completed with
    /// [`Outcome::Unknown`] at the time the client gave up.
    pub fn complete(&mut self, op_id: OpId, outcome: Outcome, complete_us: u64) {
        debug_assert!(op_id < self.next_op_id, "operation {op_id} was never invoked");
        let Some(operation) = usize::try_from(op_id).ok().and_then(|index| self.operations.get_mut(index)) else {
            // Dropped at invocation because the limit was reached; already counted.
            return;
        };
        debug_assert!(operation.complete_us.is_none(), "operation {op_id} completed twice");
        debug_assert!(complete_us >= operation.invoke_us, "operation {op_id} ends before it starts");
        if operation.complete_us.is_none() {
            operation.complete_us = Some(complete_us);
            operation.outcome = outcome;
        }
    }

    /// Records a hold write the engine accepted.
    pub fn fence(&mut self, fence: AcceptedFence) {
        push_bounded(&mut self.fences, fence, FENCES_MAX, &mut self.overflow.fences);
    }

    /// Records an admission out of a waiting room.
    pub fn admission(&mut self, admission: Admission) {
        push_bounded(&mut self.admissions, admission, ADMISSIONS_MAX, &mut self.overflow.admissions);
    }

    /// Records an admission policy set during the run.
    pub fn admission_change(&mut self, change: AdmissionChange) {
        let kept = self.admission_changes.len() + self.hold_ttl_changes.len();
        if kept >= POLICY_CHANGES_MAX {
            self.overflow.policy_changes += 1;
        } else {
            self.admission_changes.push(change);
        }
    }

    /// Records a hold TTL set during the run.
    pub fn hold_ttl_change(&mut self, change: HoldTtlChange) {
        let kept = self.admission_changes.len() + self.hold_ttl_changes.len();
        if kept >= POLICY_CHANGES_MAX {
            self.overflow.policy_changes += 1;
        } else {
            self.hold_ttl_changes.push(change);
        }
    }

    /// How many operations have been invoked, kept or not.
    pub fn operations_invoked(&self) -> u64 {
        self.next_op_id
    }

    /// [`Self::finish`] with what the stores hold at the end: the final state, the fences they
    /// accepted and the admissions they made (as [`from_stores`] reads them).
    pub fn finish_with(mut self, (final_state, fences, admissions): StoresRead) -> History {
        for fence in fences {
            self.fence(fence);
        }
        for admission in admissions {
            self.admission(admission);
        }
        self.finish(final_state)
    }

    /// Ends the recording with the state read after the run. Operations still out stay
    /// [`UnknownReason::RunEnded`] with no completion time.
    pub fn finish(self, final_state: FinalState) -> History {
        History {
            scenario: self.scenario,
            seed: self.seed,
            config: self.config,
            operations: self.operations,
            fences: self.fences,
            admissions: self.admissions,
            admission_changes: self.admission_changes,
            hold_ttl_changes: self.hold_ttl_changes,
            overflow: self.overflow,
            final_state,
        }
    }
}

fn push_bounded<T>(records: &mut Vec<T>, record: T, records_max: usize, overflow: &mut u64) {
    if records.len() >= records_max {
        *overflow += 1;
    } else {
        records.push(record);
    }
}

/// What the stores hold after a run, in the history's terms: the final state, accepted
/// fences, admissions.
pub type StoresRead = (FinalState, Vec<AcceptedFence>, Vec<Admission>);

/// The stores' state after a run, in the history's terms: the system of record's `dump` and
/// the cache store's admissions, with `to_us` turning an engine time (ms since the Unix epoch)
/// into the run's µs.
pub fn from_stores(dump: &RecordDump, admitted: &[Admitted], to_us: impl Fn(u64) -> u64) -> anyhow::Result<StoresRead> {
    let final_state = FinalState {
        reservations: dump
            .reservations
            .iter()
            .map(|r| FinalReservation {
                id: r.id,
                schedule_id: r.schedule_id,
                seat_id: r.seat_id,
                user_id: r.user_id,
                status: r.status,
                fence: r.fence.0,
                held_us: to_us(r.held_at_ms),
                expires_us: to_us(r.expires_at_ms),
                confirmed_us: r.confirmed_at_ms.map(&to_us),
                ended_us: r.ended_at_ms.map(&to_us),
                amount_paid: r.paid_points,
            })
            .collect(),
        users: dump
            .accounts
            .iter()
            .map(|a| FinalUser { id: a.user_id, balance: i64::try_from(a.balance).unwrap_or(i64::MAX) })
            .collect(),
        ledger: dump
            .ledger
            .iter()
            .map(|entry| LedgerRecord {
                user_id: entry.user_id,
                delta: entry.delta,
                reason: entry.reason,
                reservation_id: entry.reservation_id,
                idempotency_key: entry.idempotency_key.clone(),
                at_us: to_us(entry.at_ms),
            })
            .collect(),
        schedules: dump.schedules.iter().map(|s| FinalSchedule { id: s.id, capacity: s.seats_total() }).collect(),
        outbox: dump
            .outbox
            .iter()
            .map(|event| OutboxRecord {
                id: event.id,
                kind: event.kind,
                reservation_id: event.reservation_id,
                user_id: event.user_id,
                at_us: to_us(event.at_ms),
                sent: event.sent,
            })
            .collect(),
    };
    let fences = dump
        .fences
        .iter()
        .map(|f| {
            Ok(AcceptedFence {
                schedule_id: f.schedule_id,
                seat_id: f.seat_id,
                fence: f.fence.0,
                reservation_id: f.reservation_id,
                node: node_index(&f.node)?,
                at_us: to_us(f.at_ms),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let admissions = admitted
        .iter()
        .map(|a| Admission {
            schedule_id: a.schedule_id,
            user_id: a.user_id,
            join_seq: a.seq,
            joined_us: to_us(a.joined_at_ms),
            admitted_us: to_us(a.admitted_at_ms),
        })
        .collect();
    Ok((final_state, fences, admissions))
}

/// The 0-based index of an engine node `engine-N`, as the history names nodes.
fn node_index(node: &str) -> anyhow::Result<u32> {
    node.strip_prefix("engine-")
        .and_then(|number| number.parse::<u32>().ok())
        .and_then(|number| number.checked_sub(1))
        .with_context(|| format!("a fence was accepted from {node:?}, which is not an engine node"))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn config() -> CheckConfig {
        CheckConfig {
            hold_ttl_us: 1_000,
            hold_expiry_grace_us: 100,
            admission_rate_per_s: 10.0,
            admission_burst: 10,
            heal_us: 0,
            end_us: 10_000,
        }
    }

    const IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));

    #[test]
    fn digest_is_fnv1a_and_round_trips_as_hex() {
        assert_eq!(Digest::of(b""), Digest(0xcbf2_9ce4_8422_2325));
        assert_eq!(Digest::of(b"a"), Digest(0xaf63_dc4c_8601_ec8c));
        let json = serde_json::to_string(&Digest(0xab)).expect("serialise");
        assert_eq!(json, "\"00000000000000ab\"");
        assert_eq!(serde_json::from_str::<Digest>(&json).expect("parse"), Digest(0xab));
        assert!(serde_json::from_str::<Digest>("\"xyz\"").is_err());
    }

    #[test]
    fn recorder_completes_operations_and_leaves_unanswered_ones_unknown() {
        let mut recorder = HistoryRecorder::new("spike", 7, config());
        let hold = recorder.invoke(1, IP, OpKind::Hold { schedule_id: 1, seat_id: 2 }, Some("k1".into()), 10);
        let confirm = recorder.invoke(1, IP, OpKind::Confirm { reservation_id: 3 }, None, 20);
        recorder.complete(
            hold,
            Outcome::Ok(OkResponse { http_status: 201, reservation_id: Some(3), ..OkResponse::default() }),
            15,
        );
        let history = recorder.finish(FinalState::default());
        assert_eq!((hold, confirm), (0, 1));
        assert_eq!(history.operations[0].complete_us, Some(15));
        assert_eq!(history.operations[1].complete_us, None);
        assert_eq!(history.operations[1].outcome, Outcome::Unknown { reason: UnknownReason::RunEnded });
        assert!(history.overflow.is_empty());
    }

    #[test]
    fn bounded_records_count_their_overflow() {
        let mut records = vec![1, 2];
        let mut overflow = 0;
        push_bounded(&mut records, 3, 2, &mut overflow);
        push_bounded(&mut records, 4, 2, &mut overflow);
        assert_eq!((records, overflow), (vec![1, 2], 2));
    }

    #[test]
    fn history_serialises_with_stable_field_names() {
        let mut recorder = HistoryRecorder::new("spike", 7, config());
        let op = recorder.invoke(4, IP, OpKind::Cancel { reservation_id: 9 }, None, 1);
        recorder.complete(op, Outcome::Fail { http_status: 409, code: "not_held".into(), digest: None }, 2);
        let history = recorder.finish(FinalState::default());
        let json = serde_json::to_value(&history).expect("serialise");
        assert_eq!(
            json["operations"][0],
            serde_json::json!({
                "op_id": 0, "client": 4, "ip": "10.0.0.1",
                "kind": {"call": "cancel", "reservation_id": 9},
                "invoke_us": 1, "complete_us": 2,
                "outcome": {"result": "fail", "http_status": 409, "code": "not_held"},
            })
        );
        let back: History = serde_json::from_value(json).expect("parse");
        assert_eq!(back, history);
    }
}
