//! Baselines: the figures of a run the gate compares later runs of the same scenario with.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Check, CheckKind, Status, slo_prefers_lower};
use crate::scenario::SloThreshold;
use crate::score::lookup;

/// The version of the baseline file's shape.
pub const BASELINE_SCHEMA: &str = "tcore.baseline/1";

/// A baseline file (`scenarios/baselines/<scenario>.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Baseline {
    pub schema: String,
    pub scenario: String,
    pub seed: u64,
    pub hold_mode: String,
    /// The commit the baseline was recorded at.
    pub commit: String,
    /// `live` for a baseline of a live run (`tcore load`); absent for a simulated one. Only
    /// runs of the same mode compare.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Simulated figures by dotted score path; `null` when the run did not produce one (a run
    /// that did not sell out has no `seats.sold_out_at_s`).
    pub metrics: BTreeMap<String, Option<f64>>,
    /// Wall-clock figures from `wall.json`.
    #[serde(default)]
    pub wall: BTreeMap<String, f64>,
}

/// How far a figure may move the wrong way before the gate fails.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerances {
    /// For latencies, goodput and times: percent of the baseline's value.
    pub relative_pct: f64,
    /// For wall-clock figures, which only warn.
    pub wall_pct: f64,
    /// For the same figures of a live run (`"mode": "live"`), which real clocks, sockets and a
    /// shared machine move from run to run: percent of the baseline's value. Safety counts
    /// still fail at any rise.
    pub live_pct: f64,
}

impl Default for Tolerances {
    fn default() -> Self {
        Self { relative_pct: 10.0, wall_pct: 50.0, live_pct: LIVE_TOLERANCE_PCT_DEFAULT }
    }
}

/// The default tolerance of a live run's figures: a p99 may triple before it fails. Two live
/// runs of one scenario on one two-core machine were seen a factor of two apart.
pub const LIVE_TOLERANCE_PCT_DEFAULT: f64 = 200.0;
/// A live run's rates and ratios (`seats.sold_ratio`, error rates) may move this many times
/// their simulated slack.
const LIVE_ABSOLUTE_FACTOR: f64 = 5.0;
/// A live latency's smallest slack, in µs: a scheduler's hiccup on a shared machine.
const LIVE_LATENCY_FLOOR_US: f64 = 5_000.0;

/// Safety counts: any increase over the baseline fails.
const SAFETY_COUNTS: [&str; 10] = [
    "oversell",
    "double_charge",
    "lost_confirmations",
    "idempotency.mismatches",
    "holds.outlived_ttl",
    "ledger.mismatches",
    "fences.regressions",
    "outbox.mismatches",
    "admission.rate_violations",
    "unknown_outcomes.unresolved",
];

/// Figures every baseline keeps besides the safety counts, the latencies and the SLO metrics.
const FIGURES: [&str; 5] =
    ["goodput.confirm_per_s", "seats.sold_ratio", "seats.sold_out_at_s", "errors.error_rate", "errors.unknown_rate"];

/// Wall-clock figures of `wall.json` a baseline keeps.
const WALL_FIGURES: [&str; 1] = ["operations_per_wall_s"];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Slack {
    /// Any move the wrong way fails.
    None,
    /// The relative tolerance, but never less than this much.
    Relative { floor: f64 },
    /// This much, whatever the value.
    Absolute(f64),
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Policy {
    lower_is_better: bool,
    slack: Slack,
}

/// `latency_floor_us` is the smallest move of a latency that can count as a regression.
fn policy(metric: &str, thresholds: &[SloThreshold], latency_floor_us: f64) -> Policy {
    let lower = |slack| Policy { lower_is_better: true, slack };
    let higher = |slack| Policy { lower_is_better: false, slack };
    if SAFETY_COUNTS.contains(&metric) {
        return lower(Slack::None);
    }
    if (metric.starts_with("latency.") || metric.starts_with("queue_wait.")) && metric.ends_with("_us") {
        return lower(Slack::Relative { floor: latency_floor_us });
    }
    match metric {
        "goodput.confirm_per_s" => higher(Slack::Relative { floor: 0.0 }),
        "seats.sold_ratio" => higher(Slack::Absolute(0.01)),
        "seats.sold_out_at_s" => lower(Slack::Relative { floor: 1.0 }),
        "errors.error_rate" | "errors.unknown_rate" => lower(Slack::Absolute(0.01)),
        _ => {
            let lower_is_better = thresholds
                .iter()
                .find(|threshold| threshold.metric == metric)
                .is_none_or(|threshold| slo_prefers_lower(threshold.op));
            Policy { lower_is_better, slack: Slack::Relative { floor: 0.0 } }
        }
    }
}

/// The metrics a baseline of this run keeps: safety counts, p50 and p99 of every journey step
/// and of the queue wait, goodput and sell-out, error rates, and every SLO metric.
fn tracked(score: &Value, thresholds: &[SloThreshold]) -> Vec<String> {
    let mut metrics: Vec<String> = SAFETY_COUNTS.iter().map(|metric| (*metric).to_owned()).collect();
    if let Some(steps) = score["latency"].as_object() {
        for step in steps.keys() {
            metrics.push(format!("latency.{step}.p50_us"));
            metrics.push(format!("latency.{step}.p99_us"));
        }
    }
    metrics.extend(["queue_wait.p50_us", "queue_wait.p99_us"].map(str::to_owned));
    metrics.extend(FIGURES.map(str::to_owned));
    metrics.extend(thresholds.iter().map(|threshold| threshold.metric.clone()));
    metrics.sort();
    metrics.dedup();
    metrics
}

/// The baseline of a run result (and its `wall.json`, if any).
pub fn record(run: &Value, wall: Option<&Value>, thresholds: &[SloThreshold]) -> Baseline {
    let score = &run["score"];
    Baseline {
        schema: BASELINE_SCHEMA.to_owned(),
        scenario: run["scenario"]["name"].as_str().unwrap_or_default().to_owned(),
        seed: run["seed"].as_u64().unwrap_or_default(),
        hold_mode: run["hold_mode"].as_str().unwrap_or_default().to_owned(),
        commit: run["commit"].as_str().unwrap_or_default().to_owned(),
        mode: live_mode(run),
        metrics: tracked(score, thresholds)
            .into_iter()
            .map(|metric| (metric.clone(), lookup(score, &metric)))
            .collect(),
        wall: wall
            .map(|wall| {
                WALL_FIGURES
                    .iter()
                    .filter_map(|figure| wall[*figure].as_f64().map(|value| ((*figure).to_owned(), value)))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// `Some("live")` for a live run result, `None` for a simulated one.
fn live_mode(run: &Value) -> Option<String> {
    (run["mode"].as_str() == Some("live")).then(|| "live".to_owned())
}

/// A figure with six significant digits, so a small difference does not print as zero.
fn number(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        return format!("{value:.0}");
    }
    let decimals = (5 - value.abs().log10().floor() as i64).clamp(1, 15) as usize;
    let formatted = format!("{value:.decimals$}");
    formatted.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// How far `run` is from `baseline` the wrong way, and whether that is within `allowed`.
fn judge_change(baseline: f64, run: f64, lower_is_better: bool, allowed: f64) -> (Status, String) {
    let difference = run - baseline;
    let percent =
        if baseline == 0.0 { String::new() } else { format!(", {:+.1} %", difference / baseline.abs() * 100.0) };
    let moved = format!(
        "{} → {} ({}{}{percent})",
        number(baseline),
        number(run),
        if difference > 0.0 { "+" } else { "" },
        number(difference)
    );
    let worse_by = if lower_is_better { difference } else { -difference };
    if worse_by <= 0.0 {
        (Status::Pass, format!("improved: {moved}"))
    } else if worse_by <= allowed {
        (Status::Pass, format!("{moved}, within the tolerance of {}", number(allowed)))
    } else {
        (Status::Fail, format!("regressed: {moved}, beyond the tolerance of {}", number(allowed)))
    }
}

/// Compares a run result (and its `wall.json`) with its baseline, one check per metric.
pub fn compare(
    baseline: &Baseline,
    run: &Value,
    wall: Option<&Value>,
    thresholds: &[SloThreshold],
    tolerances: &Tolerances,
) -> Vec<Check> {
    let seed = run["seed"].as_u64().unwrap_or_default();
    let hold_mode = run["hold_mode"].as_str().unwrap_or_default();
    let mode = live_mode(run);
    if baseline.mode != mode {
        let name = |mode: &Option<String>| mode.clone().unwrap_or_else(|| "simulated".into());
        return vec![Check {
            kind: CheckKind::Baseline,
            name: "baseline".to_owned(),
            status: Status::Fail,
            message: format!(
                "the baseline was recorded from a {} run, this is a {} run: not comparable",
                name(&baseline.mode),
                name(&mode)
            ),
            change: None,
        }];
    }
    if baseline.seed != seed || baseline.hold_mode != hold_mode {
        return vec![Check {
            kind: CheckKind::Baseline,
            name: "baseline".to_owned(),
            status: Status::Fail,
            message: format!(
                "the baseline was recorded with seed {} and hold mode {}, this run has seed {seed} and hold mode {hold_mode}: \
                 not comparable (run with the baseline's settings, or record a new one with --update-baseline)",
                baseline.seed, baseline.hold_mode
            ),
            change: None,
        }];
    }
    let score = &run["score"];
    let live = run["mode"].as_str() == Some("live");
    // Simulated time moves in ticks (at 1 ms, a latency reads 8003 µs, then 9007 µs): one tick
    // is never a regression, two are when beyond the relative tolerance. Run results from before
    // the tick was configurable ran at 1 ms. A live run's latencies have the slack of a shared
    // machine instead.
    let latency_floor_us =
        if live { LIVE_LATENCY_FLOOR_US } else { 1.5 * run["tick_ms"].as_f64().unwrap_or(1.0) * 1_000.0 };
    let relative_pct = if live { tolerances.live_pct } else { tolerances.relative_pct };
    let absolute_factor = if live { LIVE_ABSOLUTE_FACTOR } else { 1.0 };
    let mut metrics: Vec<String> = tracked(score, thresholds);
    metrics.extend(baseline.metrics.keys().cloned());
    metrics.sort();
    metrics.dedup();
    let mut checks: Vec<Check> = metrics
        .into_iter()
        .map(|metric| {
            let before = baseline.metrics.get(&metric).copied().flatten();
            let after = lookup(score, &metric);
            let policy = policy(&metric, thresholds, latency_floor_us);
            let (status, message) = match (before, after) {
                (None, None) => (Status::Pass, "not measured, as in the baseline".to_owned()),
                (Some(before), None) => {
                    (Status::Fail, format!("{} in the baseline, not measured by this run", number(before)))
                }
                (None, Some(after)) if baseline.metrics.contains_key(&metric) => {
                    (Status::Pass, format!("measured {} where the baseline measured nothing", number(after)))
                }
                (None, Some(after)) => (Status::Pass, format!("{}: not in the baseline yet", number(after))),
                (Some(before), Some(after)) if before == after => (Status::Pass, format!("= {}", number(after))),
                (Some(before), Some(after)) => {
                    let allowed = match policy.slack {
                        Slack::None => 0.0,
                        Slack::Relative { floor } => (before.abs() * relative_pct / 100.0).max(floor),
                        Slack::Absolute(allowed) => allowed * absolute_factor,
                    };
                    judge_change(before, after, policy.lower_is_better, allowed)
                }
            };
            let change = (before != after).then_some((before, after));
            Check { kind: CheckKind::Baseline, name: metric, status, message, change }
        })
        .collect();
    if let Some(wall) = wall {
        for (figure, &before) in &baseline.wall {
            let Some(after) = wall[figure.as_str()].as_f64() else { continue };
            let (status, message) = judge_change(before, after, false, before.abs() * tolerances.wall_pct / 100.0);
            checks.push(Check {
                kind: CheckKind::Wall,
                name: figure.clone(),
                status: if status == Status::Fail { Status::Warn } else { status },
                message,
                change: (before != after).then_some((Some(before), Some(after))),
            });
        }
    }
    checks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(baseline: f64, run: f64, lower_is_better: bool, allowed: f64, expected: Status) {
        assert_eq!(judge_change(baseline, run, lower_is_better, allowed).0, expected, "{baseline} → {run}");
    }

    #[test]
    fn only_a_regression_beyond_the_tolerance_fails() {
        check(100.0, 105.0, true, 10.0, Status::Pass);
        check(100.0, 110.0, true, 10.0, Status::Pass);
        check(100.0, 111.0, true, 10.0, Status::Fail);
        check(100.0, 50.0, true, 10.0, Status::Pass);
        check(100.0, 89.0, false, 10.0, Status::Fail);
        check(100.0, 200.0, false, 10.0, Status::Pass);
        check(0.0, 1.0, true, 0.0, Status::Fail);
    }

    #[test]
    fn a_live_run_is_judged_with_the_live_tolerance_and_its_safety_counts_exactly() {
        let run = |p99_us: f64, oversell: u64, mode: &str| {
            serde_json::json!({
                "mode": mode, "seed": 1, "hold_mode": "Atomic", "scenario": { "name": "s" },
                "score": { "oversell": oversell, "latency": { "hold": { "p50_us": 1_000.0, "p99_us": p99_us } } },
            })
        };
        let status = |baseline: &Baseline, run: &Value, metric: &str| {
            let checks = compare(baseline, run, None, &[], &Tolerances::default());
            checks.into_iter().find(|check| check.name == metric).map(|check| check.status)
        };
        let live = record(&run(20_000.0, 0, "live"), None, &[]);
        assert_eq!(live.mode.as_deref(), Some("live"));
        assert_eq!(status(&live, &run(55_000.0, 0, "live"), "latency.hold.p99_us"), Some(Status::Pass));
        assert_eq!(status(&live, &run(65_000.0, 0, "live"), "latency.hold.p99_us"), Some(Status::Fail));
        assert_eq!(status(&live, &run(20_000.0, 1, "live"), "oversell"), Some(Status::Fail));
        // A simulated run is not compared with a live baseline, nor the other way round.
        assert_eq!(status(&live, &run(20_000.0, 0, "simulated"), "baseline"), Some(Status::Fail));
        let simulated = record(&run(20_000.0, 0, "simulated"), None, &[]);
        assert_eq!(simulated.mode, None);
        assert_eq!(status(&simulated, &run(25_000.0, 0, "simulated"), "latency.hold.p99_us"), Some(Status::Fail));
        assert_eq!(status(&simulated, &run(20_000.0, 0, "live"), "baseline"), Some(Status::Fail));
    }

    #[test]
    fn figures_keep_six_significant_digits() {
        assert_eq!(number(8003.0), "8003");
        assert_eq!(number(101.76390773405699), "101.764");
        assert_eq!(number(0.8491123), "0.849112");
        assert_eq!(number(-0.0000083412), "-0.0000083412");
        assert_eq!(number(2.5), "2.5");
    }

    #[test]
    fn policies_follow_the_metric() {
        assert_eq!(policy("oversell", &[], 1_500.0), Policy { lower_is_better: true, slack: Slack::None });
        assert_eq!(
            policy("latency.hold.p99_us", &[], 1_500.0),
            Policy { lower_is_better: true, slack: Slack::Relative { floor: 1_500.0 } }
        );
        assert_eq!(
            policy("queue_wait.p50_us", &[], 15_000.0),
            Policy { lower_is_better: true, slack: Slack::Relative { floor: 15_000.0 } }
        );
        assert!(!policy("goodput.confirm_per_s", &[], 1_500.0).lower_is_better);
        let slo = [SloThreshold::parse("journeys.bought", ">= 10").expect("valid")];
        assert!(!policy("journeys.bought", &slo, 1_500.0).lower_is_better);
        assert!(policy("bots.dropped", &[], 1_500.0).lower_is_better);
    }
}
