//! The score of a run and the run result (`run.json`): verdicts, latency per journey step,
//! goodput, time to sell out, queue wait, errors by reason, a time series per simulated
//! second, fault windows, and the scenario's `[slo]` evaluated against all of it.
//!
//! **Invariant:** the run result is a pure function of the history and the scenario: no wall
//! clock, and every map is ordered, so the same seed and commit give the same bytes. Wall-clock
//! figures go in a separate file (`wall.json`).

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{Value, json};

use crate::checker::CheckReport;
use crate::history::{OpKind, Operation, Outcome, ReservationStatus};
use crate::journey::JOURNEY_ENDINGS;
use crate::scenario::Scenario;
use crate::world::WorldRun;

mod agent;
mod effects;

pub use effects::{FaultWithoutEffect, faults_without_effect};

/// The version of the run result's shape; a change of meaning is a new version.
pub const RUN_SCHEMA: &str = "tcore.run/1";

/// One latency distribution, in simulated microseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

/// One `[slo]` threshold and how the run did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SloResult {
    pub metric: String,
    pub expression: String,
    /// The run's value; `None` when the run did not produce this metric (which fails).
    pub value: Option<f64>,
    pub passed: bool,
}

/// The step of the user journey an operation belongs to.
pub fn step_name(kind: &OpKind) -> &'static str {
    match kind {
        OpKind::CreateUser => "create_user",
        OpKind::ChargePoints { .. } => "charge_points",
        OpKind::JoinQueue { .. } => "queue_join",
        OpKind::QueueStatus { .. } => "queue_status",
        OpKind::SeatMap { .. } => "seat_map",
        OpKind::Hold { .. } => "hold",
        OpKind::Confirm { .. } => "confirm",
        OpKind::Cancel { .. } => "cancel",
        OpKind::ReadReservation { .. } => "read_reservation",
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap_or_else(|_| unreachable!("static bounds are valid"))
}

fn latency(histogram: &Histogram<u64>) -> Latency {
    let at = |q| if histogram.is_empty() { 0 } else { histogram.value_at_quantile(q) };
    Latency { count: histogram.len(), p50_us: at(0.5), p90_us: at(0.9), p99_us: at(0.99), max_us: histogram.max() }
}

/// Percentiles of one journey step within one simulated second, nearest-rank over the
/// operations invoked in that second.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct StepSecond {
    count: u64,
    p50_us: u64,
    p99_us: u64,
}

#[derive(Debug, Default, Clone, Serialize)]
struct Second {
    t_s: u64,
    requests: u64,
    joins: u64,
    admissions: u64,
    holds: u64,
    confirms: u64,
    rejections: u64,
    errors: u64,
    unknown: u64,
    /// p99 of holds and confirms invoked in this second.
    p99_us: u64,
    /// Per journey step, latency of the operations invoked in this second.
    latency: BTreeMap<&'static str, StepSecond>,
    /// Users waiting in the queue during the second: those with a queue status call (a poll
    /// or a long poll) open at some point of it. Admitted users and users who gave up stop
    /// asking.
    queue_depth: u64,
    /// Queue wait of the users admitted in this second.
    queue_wait_p50_us: u64,
    queue_wait_p99_us: u64,
}

/// The value at quantile `q` of sorted `values` (nearest rank); 0 when empty.
fn nearest_rank(values: &[u64], q: f64) -> u64 {
    if values.is_empty() {
        return 0;
    }
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

/// Upper bounds of the latency histogram buckets, in microseconds: ten per decade (the
/// Renard R10 series) from 100 µs to 1,000 s; a last bucket takes anything slower.
fn histogram_bounds_us() -> impl Iterator<Item = u64> {
    const R10: [u64; 10] = [100, 125, 160, 200, 250, 315, 400, 500, 630, 800];
    (0..7).flat_map(|exponent| R10.map(|mantissa| mantissa * 10_u64.pow(exponent))).chain([1_000_000_000])
}

/// Counts per bucket of a step's latencies, from the first bucket with a count to the last.
fn latency_buckets(histogram: &Histogram<u64>) -> Vec<Value> {
    let bounds: Vec<u64> = histogram_bounds_us().collect();
    let mut counts = vec![0_u64; bounds.len() + 1];
    for recorded in histogram.iter_recorded() {
        // The lowest value of the recorded value's bucket, so a value on a bound counts in it.
        let value = histogram.lowest_equivalent(recorded.value_iterated_to());
        let bucket = bounds.iter().position(|&bound| value <= bound).unwrap_or(bounds.len());
        counts[bucket] += recorded.count_at_value();
    }
    let first = counts.iter().position(|&count| count > 0).unwrap_or(0);
    let last = counts.iter().rposition(|&count| count > 0).unwrap_or(0);
    (first..=last).map(|bucket| json!({ "le_us": bounds.get(bucket).copied(), "count": counts[bucket] })).collect()
}

/// How many clients had a queue status call open at some point of each simulated second,
/// indexed by second: each client counts once per second, however many of its calls (a bot's
/// overlap) span it. A call with no answer stays open until the run ended.
///
/// Each client's calls, in order of start, are merged into the seconds they cover, and each
/// covered run of seconds adds one to its first second and takes one away after its last, so
/// the depth is a running sum: the work grows with the calls, not with how long they waited.
fn queue_depth_by_second(operations: &[Operation], end_us: u64) -> Vec<u64> {
    // (client, first second, last second); seconds index the result.
    let mut spans: Vec<(u64, usize, usize)> = operations
        .iter()
        .filter(|operation| matches!(operation.kind, OpKind::QueueStatus { .. }))
        .map(|operation| {
            let last_us = operation.complete_us.unwrap_or(end_us).max(operation.invoke_us);
            (operation.client, (operation.invoke_us / 1_000_000) as usize, (last_us / 1_000_000) as usize)
        })
        .collect();
    spans.sort_unstable();
    let seconds = spans.iter().map(|&(_, _, last)| last).max().map_or(0, |last| last + 2);
    let mut changes = vec![0_i64; seconds];
    // The client whose spans are being merged, and the last second counted for it.
    let mut counted: Option<(u64, usize)> = None;
    for (client, first, last) in spans {
        let first = match counted {
            Some((counted_client, through)) if counted_client == client => first.max(through + 1),
            _ => first,
        };
        // A span that ends within the seconds already counted for its client adds nothing.
        if first <= last {
            changes[first] += 1;
            changes[last + 1] -= 1;
            counted = Some((client, last));
        }
    }
    let mut depth = 0_i64;
    changes
        .into_iter()
        .map(|change| {
            depth += change;
            u64::try_from(depth).unwrap_or(0)
        })
        .collect()
}

/// Builds the run result.
pub fn run_result(
    scenario: &Scenario,
    scenario_file: &str,
    commit: &str,
    world: &WorldRun,
    report: &CheckReport,
) -> Value {
    let history = &world.history;
    let violations_of = |names: &[&str]| -> u64 {
        report
            .verdicts
            .iter()
            .filter(|verdict| names.contains(&verdict.invariant.name()))
            .map(|verdict| verdict.violations)
            .sum()
    };

    let mut steps: BTreeMap<&'static str, Histogram<u64>> = BTreeMap::new();
    let mut by_code: BTreeMap<String, u64> = BTreeMap::new();
    let mut series: BTreeMap<u64, (Second, Histogram<u64>)> = BTreeMap::new();
    let mut step_seconds: BTreeMap<(u64, &'static str), Vec<u64>> = BTreeMap::new();
    let queue_depth = queue_depth_by_second(&history.operations, history.config.end_us);
    let (mut unknown, mut failed, mut rejected, mut completed) = (0_u64, 0_u64, 0_u64, 0_u64);
    for operation in &history.operations {
        let step = step_name(&operation.kind);
        let second = operation.invoke_us / 1_000_000;
        let entry = series.entry(second).or_insert_with(|| (Second { t_s: second, ..Second::default() }, histogram()));
        entry.0.requests += 1;
        if matches!(operation.kind, OpKind::JoinQueue { .. }) {
            entry.0.joins += 1;
        }
        match (&operation.outcome, operation.complete_us) {
            (Outcome::Ok(_), Some(complete_us)) => {
                let elapsed = complete_us.saturating_sub(operation.invoke_us).max(1);
                steps.entry(step).or_insert_with(histogram).saturating_record(elapsed);
                step_seconds.entry((second, step)).or_default().push(elapsed);
                if matches!(operation.kind, OpKind::Hold { .. } | OpKind::Confirm { .. }) {
                    entry.1.saturating_record(elapsed);
                }
                let done = series
                    .entry(complete_us / 1_000_000)
                    .or_insert_with(|| (Second { t_s: complete_us / 1_000_000, ..Second::default() }, histogram()));
                match operation.kind {
                    OpKind::Hold { .. } => done.0.holds += 1,
                    OpKind::Confirm { .. } => done.0.confirms += 1,
                    _ => {}
                }
                completed += 1;
            }
            (Outcome::Fail { http_status, code, .. }, complete_us) => {
                if let Some(complete_us) = complete_us {
                    let elapsed = complete_us.saturating_sub(operation.invoke_us).max(1);
                    steps.entry(step).or_insert_with(histogram).saturating_record(elapsed);
                    step_seconds.entry((second, step)).or_default().push(elapsed);
                }
                *by_code.entry(code.clone()).or_default() += 1;
                completed += 1;
                if *http_status >= 500 {
                    failed += 1;
                    entry.0.errors += 1;
                } else {
                    rejected += 1;
                    entry.0.rejections += 1;
                }
            }
            (Outcome::Unknown { .. }, _) | (Outcome::Ok(_), None) => {
                unknown += 1;
                entry.0.unknown += 1;
            }
        }
    }
    let mut waits_by_second: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for admission in &history.admissions {
        let second = admission.admitted_us / 1_000_000;
        series
            .entry(second)
            .or_insert_with(|| (Second { t_s: second, ..Second::default() }, histogram()))
            .0
            .admissions += 1;
        waits_by_second.entry(second).or_default().push(admission.admitted_us.saturating_sub(admission.joined_us));
    }
    for ((second, step), mut elapsed) in step_seconds {
        elapsed.sort_unstable();
        let at = |q| nearest_rank(&elapsed, q);
        let percentiles = StepSecond { count: elapsed.len() as u64, p50_us: at(0.5), p99_us: at(0.99) };
        if let Some((entry, _)) = series.get_mut(&second) {
            entry.latency.insert(step, percentiles);
        }
    }
    let series: Vec<Second> = series
        .into_values()
        .map(|(mut second, latency)| {
            second.p99_us = if latency.is_empty() { 0 } else { latency.value_at_quantile(0.99) };
            second.queue_depth =
                usize::try_from(second.t_s).ok().and_then(|index| queue_depth.get(index)).copied().unwrap_or(0);
            if let Some(mut waits) = waits_by_second.remove(&second.t_s) {
                waits.sort_unstable();
                second.queue_wait_p50_us = nearest_rank(&waits, 0.5);
                second.queue_wait_p99_us = nearest_rank(&waits, 0.99);
            }
            second
        })
        .collect();

    let mut queue_wait = histogram();
    for admission in &history.admissions {
        queue_wait.saturating_record(admission.admitted_us.saturating_sub(admission.joined_us).max(1));
    }
    let fans_wait = fans_queue_wait(history);
    let final_state = &history.final_state;
    let seats_total: u64 = final_state.schedules.iter().map(|schedule| schedule.capacity).sum();
    let mut confirmed_at: Vec<u64> = final_state
        .reservations
        .iter()
        .filter(|reservation| reservation.status == ReservationStatus::Confirmed)
        .filter_map(|reservation| reservation.confirmed_us)
        .collect();
    confirmed_at.sort_unstable();
    let seats_sold = confirmed_at.len() as u64;
    let sold_out_us = (seats_total > 0 && seats_sold >= seats_total).then(|| confirmed_at.last().copied()).flatten();
    let first_confirm_us = confirmed_at.first().copied();
    let selling_s = match (first_confirm_us, confirmed_at.last()) {
        (Some(first), Some(&last)) if last > first => (last - first) as f64 / 1e6,
        _ => 1.0,
    };
    let peak = series.iter().map(|second| second.confirms).max().unwrap_or(0);
    let still_held =
        final_state.reservations.iter().filter(|reservation| reservation.status == ReservationStatus::Held).count();
    let total_ops = history.operations.len() as u64;
    let ratio = |part: u64| if total_ops == 0 { 0.0 } else { part as f64 / total_ops as f64 };

    let latency_by_step: BTreeMap<&str, Latency> =
        steps.iter().map(|(step, histogram)| (*step, latency(histogram))).collect();
    let mut score = json!({
        "users": world.users,
        "operations": total_ops,
        "oversell": violations_of(&["no-double-sale", "capacity"]),
        "double_charge": violations_of(&["single-charge"]),
        "lost_confirmations": violations_of(&["acknowledged-confirmations-durable"]),
        "idempotency": { "mismatches": violations_of(&["idempotent-replay"]) },
        "holds": { "outlived_ttl": violations_of(&["holds-expire"]) },
        "ledger": { "mismatches": violations_of(&["ledger-balances", "non-negative-balance", "charge-iff-sold"]) },
        "fences": { "regressions": violations_of(&["fences-monotonic"]) },
        "outbox": { "mismatches": violations_of(&["outbox-faithful"]) },
        "admission": { "rate_violations": violations_of(&["admission-rate"]), "fifo_inversions": report.fifo_inversions },
        "unknown_outcomes": { "total": unknown, "unresolved": still_held },
        "seats": {
            "total": seats_total,
            "sold": seats_sold,
            "sold_ratio": if seats_total == 0 { 0.0 } else { seats_sold as f64 / seats_total as f64 },
            "sold_out_at_s": sold_out_us.map(|at| at as f64 / 1e6),
        },
        "goodput": {
            "confirm_per_s": seats_sold as f64 / selling_s,
            "peak_confirm_per_s": peak,
        },
        "latency": latency_by_step,
        "queue_wait": latency(&queue_wait),
        "queue_wait_fans": latency(&fans_wait),
        "errors": {
            "by_code": by_code,
            "error_rate": ratio(failed),
            "rejection_rate": ratio(rejected),
            "unknown_rate": ratio(unknown),
            "completed": completed,
        },
        "journeys": journeys_ended(world),
        "bots": { "requests": world.outcomes.bot_requests, "dropped": world.outcomes.bot_dropped, "answers": world.outcomes.bot_answers },
    });
    let safety_passed = report.passed();
    let (agent_actions, agent) = agent::agent_result(scenario, world.agent.as_ref(), history, safety_passed);
    if let Some(object) = score.as_object_mut() {
        object.insert("agent".into(), agent);
    }
    let slo: Vec<SloResult> = scenario
        .slo
        .thresholds
        .iter()
        .map(|threshold| {
            let value = lookup(&score, &threshold.metric);
            SloResult {
                metric: threshold.metric.clone(),
                expression: threshold.expression(),
                value,
                passed: value.is_some_and(|value| threshold.holds(value)),
            }
        })
        .collect();
    let slo_passed = slo.iter().all(|result| result.passed);
    json!({
        "schema": RUN_SCHEMA,
        "mode": "simulated",
        "scenario": { "name": scenario.name, "file": scenario_file, "description": scenario.description },
        "seed": scenario.seed,
        "commit": commit,
        "hold_mode": format!("{:?}", scenario.engine.hold_mode),
        "record_replication": scenario.engine.record_replication.name(),
        "duration_s": scenario.duration_s,
        "tick_ms": scenario.network.tick_ms,
        "verdict": if safety_passed && slo_passed { "pass" } else { "fail" },
        "safety": {
            "passed": safety_passed,
            "invariants": report.verdicts.iter().map(|verdict| json!({
                "invariant": verdict.invariant.name(), "passed": verdict.passed, "violations": verdict.violations,
            })).collect::<Vec<_>>(),
            "violations": report.violations,
            "violations_omitted": report.violations_omitted,
        },
        "slo": slo,
        "score": score,
        "series": series,
        "latency_histograms": steps.iter().map(|(step, histogram)| (*step, latency_buckets(histogram))).collect::<BTreeMap<_, _>>(),
        "faults": world.fault_windows,
        "fault_pauses": world.fired_pauses.iter().map(|pause| json!({
            "fault": pause.fault_index, "host": pause.host, "point": pause.point, "at_us": pause.at_us, "pause_us": pause.pause_us,
        })).collect::<Vec<_>>(),
        "store_failovers": world.store_failovers,
        "store_data_losses": world.store_data_losses,
        "faults_without_effect": faults_without_effect(world, history),
        "agent_actions": agent_actions,
        "history_overflow": report.history_overflow,
    })
}

/// How long each user who joined waited, as the user saw it: from the first join call to the
/// first answer saying ADMITTED; a user never admitted counts until their last call. Unlike
/// `queue_wait` (every admission the store made), this counts only the users' own calls and
/// leaves out nobody who gave up or was still waiting at the end.
fn fans_queue_wait(history: &crate::history::History) -> Histogram<u64> {
    let mut waits: BTreeMap<u64, (u64, Option<u64>, u64)> = BTreeMap::new();
    for operation in &history.operations {
        let done_us = operation.complete_us.unwrap_or(operation.invoke_us);
        if let Some(wait) = waits.get_mut(&operation.client) {
            wait.2 = wait.2.max(done_us);
            let admitted = matches!(&operation.outcome, Outcome::Ok(ok) if ok.status == Some(crate::history::ReportedStatus::Admitted));
            if admitted && wait.1.is_none() {
                wait.1 = Some(done_us);
            }
        } else if matches!(operation.kind, OpKind::JoinQueue { .. }) {
            waits.insert(operation.client, (operation.invoke_us, None, done_us));
        }
    }
    let mut histogram = histogram();
    for (joined_us, admitted_us, last_us) in waits.into_values() {
        histogram.saturating_record(admitted_us.unwrap_or(last_us).saturating_sub(joined_us).max(1));
    }
    histogram
}

/// The value at a dotted path of the score, as a number.
pub fn lookup(score: &Value, metric: &str) -> Option<f64> {
    metric.split('.').try_fold(score, |value, key| value.get(key))?.as_f64()
}

/// How the journeys ended, every ending named (0 for those none met), so an SLO can bound
/// any of them.
fn journeys_ended(world: &WorldRun) -> BTreeMap<String, u64> {
    let mut ended: BTreeMap<String, u64> = JOURNEY_ENDINGS.iter().map(|ending| ((*ending).to_owned(), 0)).collect();
    ended.extend(world.outcomes.journeys_ended.iter().map(|(ending, count)| (ending.clone(), *count)));
    ended
}

/// Whether a run result passed its safety invariants.
pub fn safety_passed(run: &Value) -> bool {
    run["safety"]["passed"].as_bool().unwrap_or(false)
}

/// Whether every SLO threshold of a run result held.
pub fn slo_passed(run: &Value) -> bool {
    run["slo"].as_array().is_none_or(|results| results.iter().all(|result| result["passed"].as_bool().unwrap_or(false)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_picks_the_ranked_value() {
        let values: Vec<u64> = (1..=100).collect();
        assert_eq!(nearest_rank(&values, 0.5), 50);
        assert_eq!(nearest_rank(&values, 0.99), 99);
        assert_eq!(nearest_rank(&values, 1.0), 100);
        assert_eq!(nearest_rank(&[7], 0.99), 7);
        assert_eq!(nearest_rank(&[], 0.5), 0);
    }

    fn status_call(client: u64, invoke_us: u64, complete_us: Option<u64>) -> Operation {
        Operation {
            op_id: invoke_us,
            client,
            ip: std::net::IpAddr::from([10, 0, 0, 1]),
            kind: OpKind::QueueStatus { token: format!("token-{client}") },
            idempotency_key: None,
            invoke_us,
            complete_us,
            outcome: Outcome::Fail { http_status: 429, code: "rate_limited".into(), digest: None },
        }
    }

    #[test]
    fn queue_depth_counts_each_waiting_client_once_per_second() {
        let operations = [
            // Client 1 polls in seconds 0–1, then long-polls from 1.5 s to 4.2 s.
            status_call(1, 200_000, Some(1_100_000)),
            status_call(1, 1_500_000, Some(4_200_000)),
            // Client 2, a bot, has overlapping calls in seconds 2–3, one inside the other.
            status_call(2, 2_100_000, Some(3_900_000)),
            status_call(2, 2_500_000, Some(2_600_000)),
            // Client 3's call has no answer when the run ends at 6.5 s.
            status_call(3, 5_000_000, None),
            // Not a queue status call: not waiting in line.
            Operation { kind: OpKind::SeatMap { schedule_id: 1 }, ..status_call(4, 0, Some(6_000_000)) },
        ];
        assert_eq!(queue_depth_by_second(&operations, 6_500_000), [1, 1, 2, 2, 1, 1, 1, 0]);
        assert!(queue_depth_by_second(&[], 6_500_000).is_empty());
    }

    #[test]
    fn latency_buckets_span_the_recorded_values_only() {
        let mut recorded = histogram();
        for value in [150, 180, 900, 1_500, 40_000] {
            recorded.saturating_record(value);
        }
        let buckets = latency_buckets(&recorded);
        let pairs: Vec<(Option<u64>, u64)> =
            buckets.iter().map(|bucket| (bucket["le_us"].as_u64(), bucket["count"].as_u64().unwrap_or(0))).collect();
        assert_eq!(
            pairs,
            [
                (Some(160), 1),
                (Some(200), 1),
                (Some(250), 0),
                (Some(315), 0),
                (Some(400), 0),
                (Some(500), 0),
                (Some(630), 0),
                (Some(800), 0),
                (Some(1_000), 1),
                (Some(1_250), 0),
                (Some(1_600), 1)
            ]
            .into_iter()
            .chain(
                [2_000, 2_500, 3_150, 4_000, 5_000, 6_300, 8_000, 10_000, 12_500, 16_000, 20_000, 25_000, 31_500]
                    .map(|bound| (Some(bound), 0))
            )
            .chain([(Some(40_000), 1)])
            .collect::<Vec<_>>()
        );
    }
}
