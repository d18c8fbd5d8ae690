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
use crate::history::{OpKind, Outcome, ReservationStatus};
use crate::scenario::Scenario;
use crate::world::WorldRun;

mod agent;

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
    p99_us: u64,
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
                    steps
                        .entry(step)
                        .or_insert_with(histogram)
                        .saturating_record(complete_us.saturating_sub(operation.invoke_us).max(1));
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
    for admission in &history.admissions {
        let second = admission.admitted_us / 1_000_000;
        series
            .entry(second)
            .or_insert_with(|| (Second { t_s: second, ..Second::default() }, histogram()))
            .0
            .admissions += 1;
    }
    let series: Vec<Second> = series
        .into_values()
        .map(|(mut second, latency)| {
            second.p99_us = if latency.is_empty() { 0 } else { latency.value_at_quantile(0.99) };
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
        "journeys": world.outcomes.journeys_ended,
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
        "scenario": { "name": scenario.name, "file": scenario_file, "description": scenario.description },
        "seed": scenario.seed,
        "commit": commit,
        "hold_mode": format!("{:?}", scenario.engine.hold_mode),
        "duration_s": scenario.duration_s,
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
        "faults": world.fault_windows,
        "fault_pauses": world.fired_pauses.iter().map(|pause| json!({
            "fault": pause.fault_index, "host": pause.host, "point": pause.point, "at_us": pause.at_us, "pause_us": pause.pause_us,
        })).collect::<Vec<_>>(),
        "store_failovers": world.store_failovers,
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
fn lookup(score: &Value, metric: &str) -> Option<f64> {
    metric.split('.').try_fold(score, |value, key| value.get(key))?.as_f64()
}

/// Whether a run result passed its safety invariants.
pub fn safety_passed(run: &Value) -> bool {
    run["safety"]["passed"].as_bool().unwrap_or(false)
}

/// Whether every SLO threshold of a run result held.
pub fn slo_passed(run: &Value) -> bool {
    run["slo"].as_array().is_none_or(|results| results.iter().all(|result| result["passed"].as_bool().unwrap_or(false)))
}
