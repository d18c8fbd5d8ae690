//! The waiting room: admissions never exceed the configured rate, and FIFO inversions are
//! counted.
//!
//! The bound for a window `[a, b]` of one schedule is `burst + ∫ rate` over the window: the
//! engine banks at most `burst` credit, and earns credit at the rate in force. The engine
//! earns credit in ticks, and a tick credits the whole time since the previous tick at the
//! rate in force at the tick; so a raised rate may be credited up to a tick before it was
//! set. The checker therefore integrates, at each instant, the highest rate in force within
//! [`RATE_CHANGE_SLACK_US`] after it: never stricter than the engine is entitled to be.

use crate::history::{Admission, AdmissionChange};

use super::context::{Context, Findings, moment};
use super::{Invariant, Subject};

/// How long before it was set a raised admission rate may already have been credited: an
/// upper bound on the engine's admission tick.
pub(super) const RATE_CHANGE_SLACK_US: u64 = 1_000_000;

/// Rounding allowance when comparing a count with a floating-point bound.
const ROUNDING_SLACK: f64 = 1e-6;

const MICROS_PER_S: f64 = 1_000_000.0;

/// The admission credit a schedule may earn over time: a piecewise-constant rate, with the
/// credit earned from time 0 to the start of each piece.
#[derive(Debug, Clone, PartialEq)]
struct CreditCurve {
    /// `(start_us, rate_per_s, credit_before)`, starts ascending, the first at 0.
    pieces: Vec<(u64, f64, f64)>,
}

impl CreditCurve {
    /// The curve of the highest rate in force within `slack_us` of each instant, starting from
    /// `initial_rate_per_s` and following `changes` (`(at_us, rate_per_s)`, sorted by time; of
    /// changes at the same instant the last wins).
    fn new(initial_rate_per_s: f64, changes: &[(u64, f64)], slack_us: u64) -> Self {
        let rate_at = |at_us: u64| {
            let applied = changes.partition_point(|&(change_us, _)| change_us <= at_us);
            applied.checked_sub(1).map_or(initial_rate_per_s, |last| changes[last].1)
        };
        let mut starts: Vec<u64> = std::iter::once(0)
            .chain(changes.iter().map(|&(at_us, _)| at_us))
            .chain(changes.iter().map(|&(at_us, _)| at_us.saturating_sub(slack_us)))
            .collect();
        starts.sort_unstable();
        starts.dedup();
        // Sliding maximum over the changes in (start, start + slack], which enter and leave
        // the window in time order as the start moves right.
        let mut window: std::collections::VecDeque<usize> = std::collections::VecDeque::new();
        let mut entered = 0;
        let mut pieces: Vec<(u64, f64, f64)> = Vec::with_capacity(starts.len());
        for start_us in starts {
            while entered < changes.len() && changes[entered].0 <= start_us.saturating_add(slack_us) {
                while window.back().is_some_and(|&back| changes[back].1 <= changes[entered].1) {
                    window.pop_back();
                }
                window.push_back(entered);
                entered += 1;
            }
            while window.front().is_some_and(|&front| changes[front].0 <= start_us) {
                window.pop_front();
            }
            let upcoming = window.front().map_or(0.0, |&front| changes[front].1);
            let rate = rate_at(start_us).max(upcoming);
            let credit_before = pieces.last().map_or(0.0, |&(previous_us, previous_rate, credit)| {
                credit + previous_rate * (start_us - previous_us) as f64 / MICROS_PER_S
            });
            pieces.push((start_us, rate, credit_before));
        }
        Self { pieces }
    }

    /// The credit earned from time 0 to `at_us`.
    fn credit_until(&self, at_us: u64) -> f64 {
        let piece = self.pieces.partition_point(|&(start_us, _, _)| start_us <= at_us);
        piece.checked_sub(1).map_or(0.0, |piece| {
            let (start_us, rate, credit_before) = self.pieces[piece];
            credit_before + rate * (at_us - start_us) as f64 / MICROS_PER_S
        })
    }
}

/// The worst window of one schedule's admissions.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Excess {
    /// Positions in the time-sorted admissions of the window's first and last admission.
    first: usize,
    last: usize,
    allowed: f64,
    /// How many admissions ended a window that broke the bound.
    admissions_over: u64,
}

/// Finds the window `[times[i], times[j]]` whose count most exceeds
/// `burst + credit(times[j]) − credit(times[i])`, in one pass: with `f(k) = k − credit(t_k)`,
/// the count minus the earned credit of window `i..=j` is `f(j) − f(i) + 1`, so the worst
/// window ending at `j` starts at the `i ≤ j` with the least `f(i)`.
fn worst_window(times_us: &[u64], curve: &CreditCurve, burst: f64) -> Option<Excess> {
    let mut least: Option<(f64, usize)> = None;
    let mut worst: Option<(f64, Excess)> = None;
    let mut admissions_over = 0;
    for (position, &at_us) in times_us.iter().enumerate() {
        let f = position as f64 - curve.credit_until(at_us);
        let (least_f, first) = match least {
            // On a tie the later start wins, so the counterexample is the shortest window.
            Some((least_f, first)) if least_f < f => (least_f, first),
            _ => (f, position),
        };
        least = Some((least_f, first));
        let excess = f - least_f + 1.0 - burst;
        if excess <= ROUNDING_SLACK {
            continue;
        }
        admissions_over += 1;
        if worst.is_none_or(|(worst_excess, _)| excess > worst_excess) {
            let count = (position - first + 1) as f64;
            let excess_found = Excess { first, last: position, allowed: count - excess, admissions_over: 0 };
            worst = Some((excess, excess_found));
        }
    }
    worst.map(|(_, excess)| Excess { admissions_over, ..excess })
}

/// Admissions of each schedule in any window never exceed the burst plus the rate in force
/// times the window. One counterexample per schedule: its worst window.
pub(super) fn check_admission_rate(context: &Context<'_>, findings: &mut Findings) {
    let history = context.history;
    let config = &history.config;
    let mut admissions: Vec<&Admission> = history.admissions.iter().collect();
    admissions.sort_by_key(|admission| (admission.schedule_id, admission.admitted_us, admission.join_seq));
    let mut changes: Vec<&AdmissionChange> = history.admission_changes.iter().collect();
    // Stable: of changes at the same instant, the one recorded last stays last and wins.
    changes.sort_by_key(|change| (change.schedule_id, change.at_us));
    for schedule in admissions.chunk_by(|a, b| a.schedule_id == b.schedule_id) {
        let schedule_id = schedule[0].schedule_id;
        let first_change = changes.partition_point(|change| change.schedule_id < schedule_id);
        let last_change = changes.partition_point(|change| change.schedule_id <= schedule_id);
        let schedule_changes = &changes[first_change..last_change];
        let rates: Vec<(u64, f64)> = schedule_changes
            .iter()
            .map(|change| (change.at_us, if change.paused { 0.0 } else { change.rate_per_s }))
            .collect();
        let burst = schedule_changes.iter().map(|change| change.burst).fold(config.admission_burst, u64::max) as f64;
        let curve = CreditCurve::new(config.admission_rate_per_s, &rates, RATE_CHANGE_SLACK_US);
        let times_us: Vec<u64> = schedule.iter().map(|admission| admission.admitted_us).collect();
        let Some(excess) = worst_window(&times_us, &curve, burst) else {
            continue;
        };
        findings.add(Invariant::AdmissionRate, || {
            let (first, last) = (schedule[excess.first], schedule[excess.last]);
            let count = excess.last - excess.first + 1;
            let window_us = last.admitted_us - first.admitted_us;
            let mut times = vec![
                moment(
                    first.admitted_us,
                    format!("first admission of the window: user {} (join #{})", first.user_id, first.join_seq),
                ),
                moment(
                    last.admitted_us,
                    format!("last admission of the window: user {} (join #{})", last.user_id, last.join_seq),
                ),
            ];
            // The policy in force when the window opened, and every change within it.
            let in_force =
                schedule_changes.partition_point(|change| change.at_us <= first.admitted_us).saturating_sub(1);
            times.extend(schedule_changes[in_force..].iter().filter(|change| change.at_us <= last.admitted_us).map(
                |change| {
                    moment(
                        change.at_us,
                        format!(
                            "admission set to {}/s, burst {}{}",
                            change.rate_per_s,
                            change.burst,
                            if change.paused { ", paused" } else { "" }
                        ),
                    )
                },
            ));
            context.violation(
                Invariant::AdmissionRate,
                Subject::Schedule { schedule_id },
                format!(
                    "{count} users were admitted in {window_us} us ({} us to {} us), more than the \
                     {:.3} allowed (burst {burst} plus the rate in force over the window); \
                     {} admissions ended a window over the bound",
                    first.admitted_us, last.admitted_us, excess.allowed, excess.admissions_over
                ),
                Vec::new(),
                times,
            )
        });
    }
}

/// Counts, per schedule, the pairs where the user who joined later was admitted strictly
/// earlier, summed over schedules.
pub(super) fn count_fifo_inversions(admissions: &[Admission]) -> u64 {
    let mut by_join: Vec<&Admission> = admissions.iter().collect();
    by_join.sort_by_key(|admission| (admission.schedule_id, admission.join_seq, admission.admitted_us));
    by_join
        .chunk_by(|a, b| a.schedule_id == b.schedule_id)
        .map(|schedule| {
            let mut admitted_us: Vec<u64> = schedule.iter().map(|admission| admission.admitted_us).collect();
            count_strict_inversions(&mut admitted_us)
        })
        .sum()
}

/// Counts pairs `i < j` with `values[j] < values[i]` by merge sort, leaving `values` sorted.
fn count_strict_inversions(values: &mut [u64]) -> u64 {
    let mut scratch = values.to_vec();
    merge_count(values, &mut scratch)
}

fn merge_count(values: &mut [u64], scratch: &mut [u64]) -> u64 {
    let length = values.len();
    if length < 2 {
        return 0;
    }
    let middle = length / 2;
    let mut inversions = merge_count(&mut values[..middle], &mut scratch[..middle])
        + merge_count(&mut values[middle..], &mut scratch[middle..]);
    let (mut left, mut right, mut out) = (0, middle, 0);
    while left < middle && right < length {
        // Equal values are not inversions: take from the left first.
        if values[right] < values[left] {
            inversions += (middle - left) as u64;
            scratch[out] = values[right];
            right += 1;
        } else {
            scratch[out] = values[left];
            left += 1;
        }
        out += 1;
    }
    scratch[out..out + middle - left].copy_from_slice(&values[left..middle]);
    out += middle - left;
    scratch[out..].copy_from_slice(&values[right..]);
    values.copy_from_slice(&scratch[..length]);
    inversions
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute_force_inversions(values: &[u64]) -> u64 {
        let mut count = 0;
        for i in 0..values.len() {
            for j in i + 1..values.len() {
                if values[j] < values[i] {
                    count += 1;
                }
            }
        }
        count
    }

    #[test]
    fn merge_sort_counts_only_strict_inversions() {
        let cases: [&[u64]; 6] = [&[], &[1], &[1, 2, 3], &[3, 2, 1], &[2, 2, 1, 2], &[5, 1, 4, 1, 3, 9, 0, 0]];
        for case in cases {
            let mut values = case.to_vec();
            assert_eq!(count_strict_inversions(&mut values), brute_force_inversions(case), "{case:?}");
            assert!(values.is_sorted());
        }
    }

    #[test]
    fn credit_follows_the_rate_and_raises_early_by_the_slack() {
        let constant = CreditCurve::new(10.0, &[], 0);
        assert_eq!(constant.credit_until(2_500_000), 25.0);

        // 10/s until 4 s, paused until 6 s, then 20/s; raises are credited 1 s early.
        let curve = CreditCurve::new(10.0, &[(4_000_000, 0.0), (6_000_000, 20.0)], 1_000_000);
        assert_eq!(curve.credit_until(4_000_000), 40.0);
        assert_eq!(curve.credit_until(5_000_000), 40.0);
        assert_eq!(curve.credit_until(6_000_000), 60.0);
        assert_eq!(curve.credit_until(7_000_000), 80.0);
    }

    #[test]
    fn a_lowered_rate_in_force_later_does_not_lower_the_credit_early() {
        let curve = CreditCurve::new(10.0, &[(2_000_000, 1.0)], 1_000_000);
        assert_eq!(curve.credit_until(2_000_000), 20.0);
        assert_eq!(curve.credit_until(3_000_000), 21.0);
    }

    #[test]
    fn the_worst_window_is_found_in_one_pass() {
        let curve = CreditCurve::new(1.0, &[], 0);
        // Within budget: one per second with a burst of 2.
        let steady: Vec<u64> = (0..10).map(|second| second * 1_000_000).collect();
        assert_eq!(worst_window(&steady, &curve, 2.0), None);
        // Four more at 3 s break it: the shortest worst window is the 5 admitted at 3 s,
        // where the burst allows 2.
        let mut burst_at_3s = steady.clone();
        burst_at_3s.extend([3_000_000; 4]);
        burst_at_3s.sort_unstable();
        let excess = worst_window(&burst_at_3s, &curve, 2.0).expect("over the bound");
        assert_eq!((excess.first, excess.last), (3, 7));
        assert!((excess.allowed - 2.0).abs() < 1e-9, "{excess:?}");
        assert_eq!(excess.admissions_over, 9);
    }
}
