//! Real run results shared by the gate and report tests, each simulated once per test binary.

use std::sync::OnceLock;

use serde_json::Value;
use tcore_sim::scenario::HoldMode;

use crate::world::{run, scenario};

fn simulate(name: &str, hold_mode: Option<HoldMode>) -> Value {
    let scenario = scenario(name);
    let scenario = match hold_mode {
        Some(hold_mode) => scenario.with_hold_mode(hold_mode),
        None => scenario,
    };
    let (bytes, _report) = run(&scenario);
    serde_json::from_slice(&bytes).expect("the run result is JSON")
}

/// `scenarios/ci/concert-open.toml`: every invariant holds, every SLO is met.
pub fn passing() -> &'static Value {
    static RUN: OnceLock<Value> = OnceLock::new();
    RUN.get_or_init(|| simulate("concert-open.toml", None))
}

/// `scenarios/ci/lock-holder-pause.toml` with the unsafe hold mode: seats are sold twice.
pub fn failing() -> &'static Value {
    static RUN: OnceLock<Value> = OnceLock::new();
    RUN.get_or_init(|| simulate("lock-holder-pause.toml", Some(HoldMode::UnfencedLock)))
}

/// A directory of its own under the system's temporary directory, emptied.
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tcore-it-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temporary directory");
    dir
}
