//! What every check shares: the history, lookups into the final state, indexes from
//! reservations, keys, seats and users to the operations that touched them (built lazily,
//! only once a counterexample needs them), and the collector of findings.

use std::cell::OnceCell;
use std::collections::BTreeMap;

use crate::history::{FinalReservation, History, OpKind, Outcome};

use super::{
    CheckReport, Invariant, Moment, OPERATIONS_PER_VIOLATION_MAX, OpRef, Subject, VIOLATIONS_PER_INVARIANT_MAX,
    Verdict, Violation,
};

/// Operation indexes into `History::operations`, keyed by what they touched.
type OpIndex<K> = BTreeMap<K, Vec<usize>>;

pub(super) struct Context<'h> {
    pub(super) history: &'h History,
    /// Final reservations sorted by id; the first wins if the store reported an id twice.
    reservations_by_id: Vec<&'h FinalReservation>,
    by_reservation: OnceCell<OpIndex<u64>>,
    by_key: OnceCell<OpIndex<&'h str>>,
    by_seat: OnceCell<OpIndex<(u64, u64)>>,
    by_user: OnceCell<OpIndex<u64>>,
}

impl<'h> Context<'h> {
    pub(super) fn new(history: &'h History) -> Self {
        let mut reservations_by_id: Vec<&FinalReservation> = history.final_state.reservations.iter().collect();
        reservations_by_id.sort_by_key(|reservation| reservation.id);
        reservations_by_id.dedup_by_key(|reservation| reservation.id);
        Self {
            history,
            reservations_by_id,
            by_reservation: OnceCell::new(),
            by_key: OnceCell::new(),
            by_seat: OnceCell::new(),
            by_user: OnceCell::new(),
        }
    }

    pub(super) fn reservation(&self, reservation_id: u64) -> Option<&'h FinalReservation> {
        self.reservations_by_id
            .binary_search_by_key(&reservation_id, |reservation| reservation.id)
            .ok()
            .map(|position| self.reservations_by_id[position])
    }

    /// Final reservations in id order.
    pub(super) fn reservations(&self) -> &[&'h FinalReservation] {
        &self.reservations_by_id
    }

    /// Operations that name the reservation in their call or in their answer.
    pub(super) fn ops_for_reservation(&self, reservation_id: u64) -> &[usize] {
        let index = self.by_reservation.get_or_init(|| {
            self.index_ops(|operation| {
                let from_answer = match &operation.outcome {
                    Outcome::Ok(response) => response.reservation_id,
                    _ => None,
                };
                let from_call = operation.kind.reservation_id();
                match (from_call, from_answer) {
                    (Some(call), Some(answer)) if call != answer => vec![call, answer],
                    (call, answer) => call.or(answer).into_iter().collect(),
                }
            })
        });
        lookup(index, &reservation_id)
    }

    /// Operations that carried the idempotency key.
    pub(super) fn ops_for_key(&self, key: &str) -> &[usize] {
        let index = self
            .by_key
            .get_or_init(|| self.index_ops(|operation| operation.idempotency_key.as_deref().into_iter().collect()));
        index.get(key).map_or(&[], Vec::as_slice)
    }

    /// Hold operations on the seat.
    pub(super) fn holds_on_seat(&self, schedule_id: u64, seat_id: u64) -> &[usize] {
        let index = self.by_seat.get_or_init(|| {
            self.index_ops(|operation| match operation.kind {
                OpKind::Hold { schedule_id, seat_id } => vec![(schedule_id, seat_id)],
                _ => Vec::new(),
            })
        });
        lookup(index, &(schedule_id, seat_id))
    }

    /// Operations that created the user or added points to them.
    pub(super) fn ops_for_user(&self, user_id: u64) -> &[usize] {
        let index = self.by_user.get_or_init(|| {
            self.index_ops(|operation| match (&operation.kind, &operation.outcome) {
                (OpKind::ChargePoints { user_id, .. }, _) => vec![*user_id],
                (OpKind::CreateUser, Outcome::Ok(response)) => response.user_id.into_iter().collect(),
                _ => Vec::new(),
            })
        });
        lookup(index, &user_id)
    }

    fn index_ops<K: Ord>(&self, keys_of: impl Fn(&'h crate::history::Operation) -> Vec<K>) -> OpIndex<K> {
        let mut index: OpIndex<K> = BTreeMap::new();
        for (position, operation) in self.history.operations.iter().enumerate() {
            for key in keys_of(operation) {
                index.entry(key).or_default().push(position);
            }
        }
        index
    }

    /// Quotes the operations at `positions`, in invocation order, without duplicates, at most
    /// [`OPERATIONS_PER_VIOLATION_MAX`].
    pub(super) fn op_refs(&self, positions: impl IntoIterator<Item = usize>) -> Vec<OpRef> {
        let operations = &self.history.operations;
        let mut positions: Vec<usize> = positions.into_iter().collect();
        positions.sort_by_key(|&position| (operations[position].invoke_us, position));
        positions.dedup();
        positions
            .into_iter()
            .take(OPERATIONS_PER_VIOLATION_MAX)
            .map(|position| {
                let operation = &operations[position];
                OpRef {
                    op_id: operation.op_id,
                    client: operation.client,
                    kind: operation.kind.to_string(),
                    idempotency_key: operation.idempotency_key.clone(),
                    invoke_us: operation.invoke_us,
                    complete_us: operation.complete_us,
                    outcome: operation.outcome.to_string(),
                }
            })
            .collect()
    }

    /// A counterexample with the run's seed and scenario; moments are put in time order.
    pub(super) fn violation(
        &self,
        invariant: Invariant,
        subject: Subject,
        message: String,
        operations: Vec<OpRef>,
        mut times_us: Vec<Moment>,
    ) -> Violation {
        times_us.sort();
        times_us.truncate(OPERATIONS_PER_VIOLATION_MAX);
        Violation {
            invariant,
            scenario: self.history.scenario.clone(),
            seed: self.history.seed,
            subject,
            message,
            operations,
            times_us,
        }
    }
}

fn lookup<'a, K: Ord>(index: &'a OpIndex<K>, key: &K) -> &'a [usize] {
    index.get(key).map_or(&[], Vec::as_slice)
}

/// A moment in a counterexample.
pub(super) fn moment(at_us: u64, event: impl Into<String>) -> Moment {
    Moment { at_us, event: event.into() }
}

/// Counts violations per invariant and keeps the first
/// [`VIOLATIONS_PER_INVARIANT_MAX`] of each as counterexamples.
#[derive(Debug, Default)]
pub(super) struct Findings {
    counts: [u64; Invariant::ALL.len()],
    kept: Vec<Violation>,
    omitted: u64,
}

impl Findings {
    /// Counts one violation of `invariant`; builds its counterexample only if it will be kept,
    /// so that a run with a million violations does not build a million messages.
    pub(super) fn add(&mut self, invariant: Invariant, build: impl FnOnce() -> Violation) {
        let count = &mut self.counts[invariant.index()];
        *count += 1;
        if *count <= VIOLATIONS_PER_INVARIANT_MAX as u64 {
            let violation = build();
            debug_assert_eq!(violation.invariant, invariant);
            self.kept.push(violation);
        } else {
            self.omitted += 1;
        }
    }

    pub(super) fn into_report(mut self, history: &History, fifo_inversions: u64) -> CheckReport {
        // Stable: within one subject, the order the check found them in is kept.
        self.kept.sort_by(|a, b| (a.invariant, &a.subject).cmp(&(b.invariant, &b.subject)));
        let verdicts = Invariant::ALL
            .iter()
            .map(|&invariant| Verdict {
                invariant,
                passed: self.counts[invariant.index()] == 0,
                violations: self.counts[invariant.index()],
            })
            .collect();
        CheckReport {
            scenario: history.scenario.clone(),
            seed: history.seed,
            verdicts,
            violations: self.kept,
            violations_omitted: self.omitted,
            fifo_inversions,
            history_overflow: history.overflow,
        }
    }
}

/// Formats a list of items as `a, b, c` with at most `shown_max` shown and `and N more`.
pub(super) fn list<T: std::fmt::Display>(items: &[T], shown_max: usize) -> String {
    let mut text = items.iter().take(shown_max).map(ToString::to_string).collect::<Vec<_>>().join(", ");
    if items.len() > shown_max {
        text.push_str(&format!(" and {} more", items.len() - shown_max));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_shows_at_most_the_limit_and_counts_the_rest() {
        assert_eq!(list(&[1, 2, 3], 5), "1, 2, 3");
        assert_eq!(list(&[1, 2, 3, 4], 2), "1, 2 and 2 more");
        assert_eq!(list::<u8>(&[], 2), "");
    }

    #[test]
    fn findings_keep_a_bounded_number_of_counterexamples_but_count_all() {
        let history = crate::history::HistoryRecorder::new(
            "x",
            1,
            crate::history::CheckConfig {
                hold_ttl_us: 1,
                hold_expiry_grace_us: 0,
                admission_rate_per_s: 1.0,
                admission_burst: 1,
                heal_us: 0,
                end_us: 0,
            },
        )
        .finish(crate::history::FinalState::default());
        let context = Context::new(&history);
        let mut findings = Findings::default();
        let total = VIOLATIONS_PER_INVARIANT_MAX + 5;
        for user_id in 0..total as u64 {
            findings.add(Invariant::LedgerBalances, || {
                context.violation(
                    Invariant::LedgerBalances,
                    Subject::User { user_id },
                    String::new(),
                    Vec::new(),
                    Vec::new(),
                )
            });
        }
        let report = findings.into_report(&history, 0);
        assert_eq!(report.violations.len(), VIOLATIONS_PER_INVARIANT_MAX);
        assert_eq!(report.violations_omitted, 5);
        assert_eq!(report.failed_invariants(), vec![Invariant::LedgerBalances]);
        assert_eq!(report.verdicts[Invariant::LedgerBalances.index()].violations, total as u64);
    }
}
