//! Which faults of a run bit, and which did not. A fault that had no effect (nothing lost,
//! nothing paused, nobody cut off) tested nothing: the scenario dodged its own fault, and a
//! pass proves nothing about it. The run result lists such faults as `faults_without_effect`.
//!
//! What counts as an effect, by kind:
//! - `store-failover`: something was at stake: a write younger than `lose_last` (lost, or kept
//!   only because a semi-sync standby had acknowledged it), or a call in flight that it cut off;
//! - `pause-at`, `on-event`: a pause fired;
//! - `partition`, `hold-link`, `crash`: an operation in flight during the window failed with a
//!   server error or went without an answer (a crash with no restart: until the end of the run);
//!   a `crash` with `lose_data` must also have found data to lose;
//! - `latency`, `slow-store`, `clock-skew`, `pause`: an operation was in flight during the window.
//!
//! **Invariant:** a pure function of the world's outcome and history; the list follows the
//! scenario's fault order.

use serde::Serialize;

use crate::history::{History, Operation, Outcome};
use crate::world::{FaultWindow, WorldRun};

/// A fault that had no effect on the run, and why it counts as such.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FaultWithoutEffect {
    /// The index of the fault in the scenario's `[[faults]]`.
    pub fault: usize,
    pub kind: &'static str,
    pub reason: String,
}

/// The faults of `world` that had no effect, in the scenario's order.
pub fn faults_without_effect(world: &WorldRun, history: &History) -> Vec<FaultWithoutEffect> {
    world
        .fault_windows
        .iter()
        .filter_map(|window| {
            let reason = no_effect(window, world, history)?;
            Some(FaultWithoutEffect { fault: window.index, kind: window.kind, reason })
        })
        .collect()
}

/// Why the fault of `window` had no effect; `None` when it had one.
fn no_effect(window: &FaultWindow, world: &WorldRun, history: &History) -> Option<String> {
    let end_us = if window.end_us > window.start_us { window.end_us } else { history.config.end_us };
    let in_window = |operation: &Operation| {
        operation.invoke_us <= end_us && operation.complete_us.unwrap_or(u64::MAX) >= window.start_us
    };
    match window.kind {
        "store-failover" => {
            let outcome = world.store_failovers.iter().find(|outcome| outcome.fault == window.index)?;
            if let Some(refused) = &outcome.refused {
                return Some(format!("the failover did not run: {refused}"));
            }
            let at_stake = outcome.writes_lost + outcome.writes_kept_by_standby + outcome.calls_cut_off;
            (at_stake == 0)
                .then(|| "nothing lost: no write was younger than lose_last and no call was in flight".into())
        }
        "pause-at" | "on-event" => {
            let paused = world.fired_pauses.iter().any(|pause| pause.fault_index == window.index);
            (!paused).then(|| "nothing paused: the fault point or event was never reached".into())
        }
        "crash" => match world.store_data_losses.iter().find(|loss| loss.fault == window.index).map(|loss| loss.lost) {
            Some(None) => Some("nothing lost: the store host never came back to lose its data".into()),
            Some(Some(lost)) if lost.writes_lost == 0 => {
                Some("nothing lost: the store held no data when it crashed".into())
            }
            _ => cut_off_in(history, &in_window),
        },
        "partition" | "hold-link" => cut_off_in(history, &in_window),
        _ => {
            let touched = history.operations.iter().any(in_window);
            (!touched).then(|| "nobody there: no operation was in flight in its window".into())
        }
    }
}

/// Why nobody was cut off in a window; `None` when an operation in it failed with a server error
/// or went without an answer.
fn cut_off_in(history: &History, in_window: &dyn Fn(&Operation) -> bool) -> Option<String> {
    let cut_off = history.operations.iter().filter(|operation| in_window(operation)).any(|operation| {
        matches!(operation.outcome, Outcome::Unknown { .. } | Outcome::Fail { http_status: 500.., .. })
    });
    (!cut_off).then(|| "nobody cut off: no operation in its window failed or went unanswered".into())
}
