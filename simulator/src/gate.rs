//! The gate: judges run results for CI by their safety verdicts, their scenario's `[slo]`
//! thresholds, and a baseline (`scenarios/baselines/<scenario>.json`), and writes the outcome as
//! JUnit XML and as a Markdown summary.
//!
//! Baselines: simulated figures are deterministic, so every difference from the baseline is
//! reported exactly; a difference only fails the gate when it is a regression beyond the
//! metric's tolerance (safety counts have none: any increase fails). Wall-clock figures
//! (`wall.json`) are compared with a wide tolerance and only warn, since CI hosts are shared.
//! A baseline recorded for another seed or hold mode is not comparable, and fails.
//!
//! **Invariant:** judging is a pure function of the run result, the thresholds and the
//! baseline; the caller reads and writes the files.

mod baseline;
mod output;

use serde_json::Value;

use crate::scenario::{SloOp, SloThreshold};
use crate::score::lookup;

pub use baseline::{BASELINE_SCHEMA, Baseline, LIVE_TOLERANCE_PCT_DEFAULT, Tolerances, compare, record};
pub use output::{junit_xml, markdown};

/// Why a run could not be judged.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// A threshold of the run result's `slo` does not parse.
    #[error("{file}: key `slo.{metric}`: {message}")]
    Threshold {
        /// The run result or scenario file.
        file: String,
        /// The metric, as written.
        metric: String,
        /// What is wrong.
        message: String,
    },
    /// The run result lacks what the gate reads.
    #[error("{file}: not a run result: {message}")]
    NotARun {
        /// The file.
        file: String,
        /// What is missing.
        message: String,
    },
}

/// What a check is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckKind {
    /// A safety invariant of the checker.
    Safety,
    /// A `[slo]` threshold.
    Slo,
    /// A figure compared with the baseline.
    Baseline,
    /// A wall-clock figure compared with the baseline.
    Wall,
}

impl CheckKind {
    pub fn name(self) -> &'static str {
        match self {
            CheckKind::Safety => "safety",
            CheckKind::Slo => "slo",
            CheckKind::Baseline => "baseline",
            CheckKind::Wall => "wall",
        }
    }
}

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pass,
    /// Reported, but does not fail the gate.
    Warn,
    Fail,
}

/// One judged check.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub kind: CheckKind,
    /// What was checked: an invariant, an expression, a metric.
    pub name: String,
    pub status: Status,
    /// The figures behind the status.
    pub message: String,
    /// For baseline checks: the baseline's value and the run's, when they differ.
    pub change: Option<(Option<f64>, Option<f64>)>,
}

/// The gate's judgement of one scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct ScenarioGate {
    /// The scenario's name.
    pub scenario: String,
    /// Where its run result is.
    pub run_file: String,
    pub checks: Vec<Check>,
}

impl ScenarioGate {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|check| check.status != Status::Fail)
    }

    pub fn count(&self, kind: CheckKind, status: Status) -> usize {
        self.checks.iter().filter(|check| check.kind == kind && check.status == status).count()
    }
}

/// The `[slo]` thresholds a run result carries (`slo[].metric` and `.expression`), for judging
/// a run result without its scenario file.
pub fn thresholds_of(run: &Value, file: &str) -> Result<Vec<SloThreshold>, GateError> {
    let Some(results) = run["slo"].as_array() else {
        return Ok(Vec::new());
    };
    results
        .iter()
        .map(|result| {
            let metric = result["metric"].as_str().unwrap_or_default();
            let expression = result["expression"].as_str().unwrap_or_default();
            SloThreshold::parse(metric, expression).map_err(|message| GateError::Threshold {
                file: file.to_owned(),
                metric: metric.to_owned(),
                message,
            })
        })
        .collect()
}

/// Judges one run result: its safety verdicts, `thresholds`, and the baseline comparison
/// (`None` when the baseline is being rewritten, `Some(Err)` when there is none to compare).
pub fn judge(
    run: &Value,
    run_file: &str,
    thresholds: &[SloThreshold],
    baseline: Option<Result<&Baseline, String>>,
    wall: Option<&Value>,
    tolerances: &Tolerances,
) -> Result<ScenarioGate, GateError> {
    let not_a_run = |message: &str| GateError::NotARun { file: run_file.to_owned(), message: message.to_owned() };
    let scenario = run["scenario"]["name"].as_str().ok_or_else(|| not_a_run("no scenario.name"))?.to_owned();
    let invariants = run["safety"]["invariants"].as_array().ok_or_else(|| not_a_run("no safety.invariants"))?;
    let mut checks = Vec::new();
    for invariant in invariants {
        let name = invariant["invariant"].as_str().unwrap_or("?");
        let passed = invariant["passed"].as_bool().unwrap_or(false);
        let violations = invariant["violations"].as_u64().unwrap_or(0);
        let counterexample = run["safety"]["violations"]
            .as_array()
            .and_then(|violations| violations.iter().find(|violation| violation["invariant"] == name))
            .and_then(|violation| violation["message"].as_str())
            .map(|message| format!(": {message}"))
            .unwrap_or_default();
        checks.push(Check {
            kind: CheckKind::Safety,
            name: name.to_owned(),
            status: if passed { Status::Pass } else { Status::Fail },
            message: format!("{violations} violations{counterexample}"),
            change: None,
        });
    }
    if run["safety"]["passed"].as_bool() != Some(true) && checks.iter().all(|check| check.status == Status::Pass) {
        checks.push(Check {
            kind: CheckKind::Safety,
            name: "safety".to_owned(),
            status: Status::Fail,
            message: "the run result says safety did not pass".to_owned(),
            change: None,
        });
    }
    let score = &run["score"];
    for threshold in thresholds {
        let value = lookup(score, &threshold.metric);
        let passed = value.is_some_and(|value| threshold.holds(value));
        checks.push(Check {
            kind: CheckKind::Slo,
            name: threshold.to_string(),
            status: if passed { Status::Pass } else { Status::Fail },
            message: value.map_or_else(|| "not measured by this run".to_owned(), |value| format!("measured {value}")),
            change: None,
        });
    }
    match baseline {
        None => {}
        Some(Err(reason)) => checks.push(Check {
            kind: CheckKind::Baseline,
            name: "baseline".to_owned(),
            status: Status::Fail,
            message: reason,
            change: None,
        }),
        Some(Ok(baseline)) => checks.extend(compare(baseline, run, wall, thresholds, tolerances)),
    }
    Ok(ScenarioGate { scenario, run_file: run_file.to_owned(), checks })
}

/// Which way is better for a metric an SLO names, read from its operator.
fn slo_prefers_lower(op: SloOp) -> bool {
    matches!(op, SloOp::Less | SloOp::LessOrEqual | SloOp::Equal)
}
