//! The parts of a run result (`run.json`, schema `tcore.run/1`) a report reads.
//!
//! Fields the simulator added over time are optional here, so an older run result still
//! renders (the report says what it could not chart). Unknown fields are ignored.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

/// The run result schema this crate reads.
pub const RUN_SCHEMA: &str = "tcore.run/1";

fn simulated() -> String {
    "simulated".to_owned()
}

/// One run result.
#[derive(Debug, Clone, Deserialize)]
pub struct Run {
    pub scenario: ScenarioInfo,
    pub seed: u64,
    #[serde(default)]
    pub commit: String,
    #[serde(default)]
    pub hold_mode: String,
    /// `simulated` or `live`; older run results are simulated.
    #[serde(default = "simulated")]
    pub mode: String,
    /// What a live run measured beyond the score: its pool, late journeys, deployment.
    #[serde(default)]
    pub live: Option<Value>,
    #[serde(default)]
    pub duration_s: f64,
    #[serde(default)]
    pub tick_ms: Option<u64>,
    #[serde(default)]
    pub verdict: String,
    pub safety: Safety,
    #[serde(default)]
    pub slo: Vec<SloResult>,
    #[serde(default)]
    pub score: Value,
    #[serde(default)]
    pub series: Vec<Second>,
    #[serde(default)]
    pub latency_histograms: BTreeMap<String, Vec<Bucket>>,
    #[serde(default)]
    pub faults: Vec<FaultWindow>,
    #[serde(default)]
    pub fault_pauses: Vec<FaultPause>,
    /// Faults that had no effect on the run (nothing lost, paused or cut off).
    #[serde(default)]
    pub faults_without_effect: Vec<FaultWithoutEffect>,
    #[serde(default)]
    pub agent_actions: Option<Vec<AgentAction>>,
    #[serde(default)]
    pub replay: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ScenarioInfo {
    pub name: String,
    #[serde(default)]
    pub file: String,
    #[serde(default)]
    pub description: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Safety {
    pub passed: bool,
    #[serde(default)]
    pub invariants: Vec<InvariantVerdict>,
    #[serde(default)]
    pub violations: Vec<Violation>,
    #[serde(default)]
    pub violations_omitted: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct InvariantVerdict {
    pub invariant: String,
    pub passed: bool,
    #[serde(default)]
    pub violations: u64,
}

/// A counterexample, as the checker wrote it.
#[derive(Debug, Clone, Deserialize)]
pub struct Violation {
    pub invariant: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub subject: Value,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub operations: Vec<Value>,
    #[serde(default)]
    pub times_us: Vec<Moment>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Moment {
    pub at_us: u64,
    #[serde(default)]
    pub event: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SloResult {
    pub metric: String,
    #[serde(default)]
    pub expression: String,
    #[serde(default)]
    pub value: Option<f64>,
    pub passed: bool,
}

/// One simulated second of the series.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Second {
    pub t_s: u64,
    pub requests: u64,
    pub joins: u64,
    pub admissions: u64,
    pub holds: u64,
    pub confirms: u64,
    pub rejections: u64,
    pub errors: u64,
    pub unknown: u64,
    pub p99_us: u64,
    pub latency: Option<BTreeMap<String, StepSecond>>,
    pub queue_depth: Option<u64>,
    pub queue_wait_p50_us: Option<u64>,
    pub queue_wait_p99_us: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct StepSecond {
    pub count: u64,
    pub p50_us: u64,
    pub p99_us: u64,
}

/// One latency histogram bucket: values up to `le_us` (`None`: anything slower).
#[derive(Debug, Clone, Deserialize)]
pub struct Bucket {
    pub le_us: Option<u64>,
    pub count: u64,
}

/// A fault the scenario dodged, and why it counts as without effect.
#[derive(Debug, Clone, Deserialize)]
pub struct FaultWithoutEffect {
    pub fault: usize,
    pub kind: String,
    #[serde(default)]
    pub reason: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct FaultWindow {
    #[serde(default)]
    pub index: usize,
    pub kind: String,
    pub start_us: u64,
    pub end_us: u64,
    #[serde(default)]
    pub hosts: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct FaultPause {
    #[serde(default)]
    pub fault: usize,
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub point: String,
    pub at_us: u64,
    pub pause_us: u64,
}

/// One action of the ops agent.
#[derive(Debug, Clone, Deserialize)]
pub struct AgentAction {
    pub at_us: u64,
    pub tool: String,
    #[serde(default)]
    pub args: Value,
    pub outcome: String,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub detail: Option<String>,
}

impl Run {
    /// The last simulated second the run covers, for a common time axis.
    pub fn end_s(&self) -> f64 {
        let last_second = self.series.last().map_or(0.0, |second| second.t_s as f64 + 1.0);
        self.duration_s.max(last_second).max(1.0)
    }

    /// Whether the series carries per-step latency, queue depth and queue wait (run results
    /// written before these were added lack them).
    pub fn has_detailed_series(&self) -> bool {
        self.series.iter().any(|second| second.latency.is_some() || second.queue_depth.is_some())
    }

    /// A short label: scenario, hold mode and seed.
    pub fn label(&self) -> String {
        format!("{} · {} · seed {}", self.scenario.name, self.hold_mode, self.seed)
    }
}
