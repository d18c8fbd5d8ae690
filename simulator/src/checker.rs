//! The safety checker: reads a [`History`] and says, invariant by invariant, whether the run
//! kept T-CORE's promises, with a concrete counterexample for every broken one.
//!
//! The invariants are DESIGN.md's "History and checker" list, one [`Invariant`] each, with
//! stable kebab-case names. FIFO inversions in the waiting room are counted, not judged.
//!
//! **Invariant:** the report is a pure function of the history: every grouping is done by
//! sorting or in `BTreeMap`s, violations are sorted, and nothing reads a clock. Each check is
//! O(n log n) in the size of the history, so a run of a million operations checks in seconds.
//!
//! **Invariant:** the checker never fails a run on a guess. Where the history cannot tell
//! whether something happened (an operation with an unknown outcome), the checker assumes it
//! may have, and reports only what the final state proves wrong.

mod admission;
mod context;
mod fences;
mod money;
mod outbox;
mod replay;
mod sale;

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::history::{History, OpId, Overflow};

use context::{Context, Findings};

/// The most counterexamples kept per invariant; the rest are counted in
/// [`CheckReport::violations_omitted`] (and in each [`Verdict`]).
pub const VIOLATIONS_PER_INVARIANT_MAX: usize = 100;

/// The most operations quoted in one counterexample; the message says how many there were.
pub const OPERATIONS_PER_VIOLATION_MAX: usize = 20;

/// A safety property of the engine that a run must keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Invariant {
    /// No seat has two `CONFIRMED` reservations.
    NoDoubleSale,
    /// No schedule has more `CONFIRMED` reservations than seats.
    Capacity,
    /// Every confirmation a client was told of is `CONFIRMED` at the end, unless that client
    /// cancelled it.
    AcknowledgedConfirmationsDurable,
    /// At most one ledger entry per idempotency key (and reason), and at most one charge per
    /// reservation.
    SingleCharge,
    /// No balance is ever below zero, by the ledger or at the end.
    NonNegativeBalance,
    /// Each user's ledger sums to their final balance.
    LedgerBalances,
    /// A reservation carries a net charge exactly when it is `CONFIRMED`; otherwise anything
    /// charged was refunded.
    ChargeIffSold,
    /// Every answer to one idempotency key is the same, byte for byte.
    IdempotentReplay,
    /// The fences a seat accepts strictly grow in acceptance order.
    FencesMonotonic,
    /// No hold outlives its TTL: none is granted longer than the TTL, none is confirmed after
    /// it expired (once faults healed), and none is still `HELD` at the end past its expiry.
    HoldsExpire,
    /// Admissions in any window never exceed the rate times the window plus the burst.
    AdmissionRate,
    /// Every change of a reservation (hold, confirmation and its charge, cancellation and its
    /// refund, expiry) has exactly one outbox event, written with the change, in the order of
    /// the reservation's changes; and every event was relayed at least once.
    OutboxFaithful,
}

impl Invariant {
    /// Every invariant, in report order.
    pub const ALL: [Invariant; 12] = [
        Invariant::NoDoubleSale,
        Invariant::Capacity,
        Invariant::AcknowledgedConfirmationsDurable,
        Invariant::SingleCharge,
        Invariant::NonNegativeBalance,
        Invariant::LedgerBalances,
        Invariant::ChargeIffSold,
        Invariant::IdempotentReplay,
        Invariant::FencesMonotonic,
        Invariant::HoldsExpire,
        Invariant::AdmissionRate,
        Invariant::OutboxFaithful,
    ];

    /// The stable kebab-case name used in reports, run results and gates.
    pub fn name(self) -> &'static str {
        match self {
            Invariant::NoDoubleSale => "no-double-sale",
            Invariant::Capacity => "capacity",
            Invariant::AcknowledgedConfirmationsDurable => "acknowledged-confirmations-durable",
            Invariant::SingleCharge => "single-charge",
            Invariant::NonNegativeBalance => "non-negative-balance",
            Invariant::LedgerBalances => "ledger-balances",
            Invariant::ChargeIffSold => "charge-iff-sold",
            Invariant::IdempotentReplay => "idempotent-replay",
            Invariant::FencesMonotonic => "fences-monotonic",
            Invariant::HoldsExpire => "holds-expire",
            Invariant::AdmissionRate => "admission-rate",
            Invariant::OutboxFaithful => "outbox-faithful",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Invariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The judgement on one invariant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub invariant: Invariant,
    pub passed: bool,
    /// How many violations were found, including those not kept as counterexamples.
    pub violations: u64,
}

/// What the checker found in one history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReport {
    pub scenario: String,
    pub seed: u64,
    /// One verdict per invariant, in [`Invariant::ALL`] order.
    pub verdicts: Vec<Verdict>,
    /// Counterexamples, sorted by invariant and subject; at most
    /// [`VIOLATIONS_PER_INVARIANT_MAX`] per invariant.
    pub violations: Vec<Violation>,
    /// Violations counted but not kept as counterexamples.
    pub violations_omitted: u64,
    /// Pairs of users in one schedule where the later joiner was admitted strictly earlier.
    pub fifo_inversions: u64,
    /// Records the history could not keep; when not empty, a passing verdict covers only the
    /// recorded part of the run.
    pub history_overflow: Overflow,
}

impl CheckReport {
    /// Whether every invariant held.
    pub fn passed(&self) -> bool {
        self.verdicts.iter().all(|verdict| verdict.passed)
    }

    /// The invariants that were violated, in report order.
    pub fn failed_invariants(&self) -> Vec<Invariant> {
        self.verdicts.iter().filter(|verdict| !verdict.passed).map(|verdict| verdict.invariant).collect()
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let failed = self.failed_invariants().len();
        let verdict = if failed == 0 { "PASS" } else { "FAIL" };
        writeln!(
            f,
            "check of {} with seed {}: {verdict} ({failed} of {} invariants violated)",
            scenario_or_placeholder(&self.scenario),
            self.seed,
            self.verdicts.len()
        )?;
        for verdict in &self.verdicts {
            if verdict.passed {
                writeln!(f, "  PASS {}", verdict.invariant)?;
            } else {
                writeln!(f, "  FAIL {} ({} violations)", verdict.invariant, verdict.violations)?;
            }
        }
        writeln!(f, "  FIFO inversions: {}", self.fifo_inversions)?;
        if !self.history_overflow.is_empty() {
            let overflow = &self.history_overflow;
            writeln!(
                f,
                "  WARNING: the history is incomplete (limits reached): {} operations, {} fences, \
                 {} admissions and {} policy changes were not recorded",
                overflow.operations, overflow.fences, overflow.admissions, overflow.policy_changes
            )?;
        }
        if self.violations_omitted > 0 {
            writeln!(
                f,
                "  {} more violations not shown (at most {VIOLATIONS_PER_INVARIANT_MAX} per invariant)",
                self.violations_omitted
            )?;
        }
        for violation in &self.violations {
            writeln!(f)?;
            write!(f, "{violation}")?;
        }
        Ok(())
    }
}

/// A concrete counterexample to one invariant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    pub invariant: Invariant,
    pub scenario: String,
    pub seed: u64,
    /// What the violation is about.
    pub subject: Subject,
    /// What went wrong, in a sentence with the numbers that prove it.
    pub message: String,
    /// The client operations involved, by invocation time; at most
    /// [`OPERATIONS_PER_VIOLATION_MAX`].
    pub operations: Vec<OpRef>,
    /// The moments that matter, in time order.
    pub times_us: Vec<Moment>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} violated for {}: {}", self.invariant, self.subject, self.message)?;
        writeln!(
            f,
            "  seed {}; replay with: tcore run {} --seed {}",
            self.seed,
            scenario_or_placeholder(&self.scenario),
            self.seed
        )?;
        for moment in &self.times_us {
            writeln!(f, "  at {:>12} us: {}", moment.at_us, moment.event)?;
        }
        for operation in &self.operations {
            writeln!(f, "  {operation}")?;
        }
        Ok(())
    }
}

/// What a violation is about.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Subject {
    /// A seat, shown as `schedule/seat`.
    Seat { schedule_id: u64, seat_id: u64 },
    /// A schedule, for capacity and admission.
    Schedule { schedule_id: u64 },
    /// A reservation, for durability, holds and payments.
    Reservation { reservation_id: u64 },
    /// A user, for balances.
    User { user_id: u64 },
    /// An idempotency key, for replays and single charges.
    IdempotencyKey { key: String },
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Seat { schedule_id, seat_id } => write!(f, "seat {schedule_id}/{seat_id}"),
            Subject::Schedule { schedule_id } => write!(f, "schedule {schedule_id}"),
            Subject::Reservation { reservation_id } => write!(f, "reservation {reservation_id}"),
            Subject::User { user_id } => write!(f, "user {user_id}"),
            Subject::IdempotencyKey { key } => write!(f, "idempotency key {key:?}"),
        }
    }
}

/// A client operation quoted in a counterexample.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpRef {
    pub op_id: OpId,
    pub client: u64,
    /// The call, e.g. `confirm reservation 7`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    pub invoke_us: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub complete_us: Option<u64>,
    /// How it ended, e.g. `ok 200 reservation 7 CONFIRMED digest …`.
    pub outcome: String,
}

impl fmt::Display for OpRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let complete = self.complete_us.map_or_else(|| "never".to_owned(), |at_us| format!("{at_us} us"));
        write!(f, "op #{} client {} [{} us -> {complete}] {}", self.op_id, self.client, self.invoke_us, self.kind)?;
        if let Some(key) = &self.idempotency_key {
            write!(f, " key {key:?}")?;
        }
        write!(f, " => {}", self.outcome)
    }
}

/// A moment in a counterexample.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Moment {
    pub at_us: u64,
    pub event: String,
}

/// Checks every invariant against `history`.
pub fn check(history: &History) -> CheckReport {
    let context = Context::new(history);
    let mut findings = Findings::default();
    sale::check_no_double_sale(&context, &mut findings);
    sale::check_capacity(&context, &mut findings);
    sale::check_acknowledged_confirmations_durable(&context, &mut findings);
    sale::check_holds_expire(&context, &mut findings);
    money::check_single_charge(&context, &mut findings);
    money::check_non_negative_balance(&context, &mut findings);
    money::check_ledger_balances(&context, &mut findings);
    money::check_charge_iff_sold(&context, &mut findings);
    replay::check_idempotent_replay(&context, &mut findings);
    fences::check_fences_monotonic(&context, &mut findings);
    admission::check_admission_rate(&context, &mut findings);
    outbox::check_outbox_faithful(&context, &mut findings);
    let fifo_inversions = admission::count_fifo_inversions(&history.admissions);
    findings.into_report(history, fifo_inversions)
}

fn scenario_or_placeholder(scenario: &str) -> &str {
    if scenario.is_empty() { "SCENARIO" } else { scenario }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invariants_index_is_its_place_in_all() {
        for (place, invariant) in Invariant::ALL.iter().enumerate() {
            assert_eq!(invariant.index(), place, "{invariant}");
        }
    }
}
