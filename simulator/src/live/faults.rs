//! The scenario's fault timeline, applied for real to the processes of a spawned deployment:
//! a `crash` kills a process (SIGKILL) and starts it again at `restart_at_s` (an engine node on
//! its port, the run's own Redis server empty); a `pause` stops it (SIGSTOP) and continues it
//! (SIGCONT) `pause_ms` later. Each fault's window is what was applied, on the run's clock,
//! not what was written. When the load ends first, every fault still open is healed (a
//! crashed process is started again, a stopped one continued), as a simulated run heals its
//! faults after the timeline, so the state can be read back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use super::deploy::Deployment;
use crate::scenario::Fault;
use crate::scenario::Scenario;
use crate::world::FaultWindow;

/// How often the timeline looks at the clock while it waits for its next step or the end.
const TICK: Duration = Duration::from_millis(5);

/// One step of the timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Kill(String),
    Restart(String),
    Stop(String),
    Continue(String),
}

impl Step {
    /// Whether the step repairs what an earlier one did (run even after the load ended).
    fn heals(&self) -> bool {
        matches!(self, Step::Restart(_) | Step::Continue(_))
    }
}

/// A scheduled step: when, which fault, what.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Scheduled {
    at_us: u64,
    fault: usize,
    step: Step,
}

/// The live timeline of a scenario's faults.
#[derive(Debug, Default)]
pub struct LiveFaults {
    steps: Vec<Scheduled>,
    kinds: Vec<(usize, &'static str, String)>,
}

/// What the timeline did.
#[derive(Debug, Default)]
pub struct Applied {
    pub windows: Vec<FaultWindow>,
    /// Steps that could not be applied, with why.
    pub errors: Vec<String>,
}

impl LiveFaults {
    /// The steps of `scenario`'s faults, in time order (ties keep the file's order). Only the
    /// kinds a live run applies are here; [`Scenario::load_live`] refuses the others.
    pub fn of(scenario: &Scenario) -> LiveFaults {
        let us = |seconds: f64| (seconds.max(0.0) * 1e6) as u64;
        let mut faults = LiveFaults::default();
        for (fault, entry) in scenario.faults.iter().enumerate() {
            let (host, start, end) = match entry {
                Fault::Crash(crash) => (
                    crash.host.clone(),
                    (us(crash.at_s), Step::Kill(crash.host.clone())),
                    crash.restart_at_s.map(|at_s| (us(at_s), Step::Restart(crash.host.clone()))),
                ),
                Fault::Pause(pause) => (
                    pause.host.clone(),
                    (us(pause.at_s), Step::Stop(pause.host.clone())),
                    Some((us(pause.resume_at_s()), Step::Continue(pause.host.clone()))),
                ),
                _ => continue,
            };
            faults.kinds.push((fault, entry.kind(), host));
            faults.steps.push(Scheduled { at_us: start.0, fault, step: start.1 });
            if let Some((at_us, step)) = end {
                faults.steps.push(Scheduled { at_us, fault, step });
            }
        }
        faults.steps.sort_by_key(|scheduled| scheduled.at_us);
        faults
    }

    /// Whether there is anything to apply.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// The hosts whose processes the faults act on.
    pub fn hosts(&self) -> impl Iterator<Item = &str> {
        self.kinds.iter().map(|(_, _, host)| host.as_str())
    }

    /// How many steps the timeline has.
    pub fn steps_total(&self) -> u64 {
        self.steps.len() as u64
    }

    /// Applies the steps at their times on `now_us` (µs since the run's start) until the last
    /// one, or until `ended` is set: then the steps that heal are applied at once and the rest
    /// dropped. `applied` counts the steps done, for the progress display.
    pub fn run(
        &self,
        deployment: &Deployment,
        now_us: &dyn Fn() -> u64,
        ended: &AtomicBool,
        applied: &AtomicU64,
    ) -> Applied {
        let mut windows: Vec<(usize, Option<u64>, Option<u64>)> =
            self.kinds.iter().map(|(fault, _, _)| (*fault, None, None)).collect();
        let mut errors = Vec::new();
        for scheduled in &self.steps {
            let mut healing_late = false;
            while now_us() < scheduled.at_us {
                if ended.load(Ordering::Relaxed) {
                    healing_late = true;
                    break;
                }
                std::thread::sleep(TICK);
            }
            if healing_late && !scheduled.step.heals() {
                continue;
            }
            let at_us = now_us();
            let outcome = match &scheduled.step {
                Step::Kill(host) => deployment.kill(host),
                Step::Restart(host) => deployment.restart(host),
                Step::Stop(host) => deployment.pause(host, true),
                Step::Continue(host) => deployment.pause(host, false),
            };
            applied.fetch_add(1, Ordering::Relaxed);
            tracing::info!(fault = scheduled.fault, step = ?scheduled.step, at_us, "live fault step");
            if let Err(error) = outcome {
                errors.push(format!("fault {} ({:?}): {error:#}", scheduled.fault, scheduled.step));
            }
            if let Some(window) = windows.iter_mut().find(|(fault, _, _)| *fault == scheduled.fault) {
                if scheduled.step.heals() {
                    // A restart ends when the process is ready again.
                    window.2 = Some(now_us());
                } else {
                    window.1 = Some(at_us);
                }
            }
        }
        // A crash without a restart stays down to the end; the state is read from the others.
        let windows = windows
            .into_iter()
            .zip(&self.kinds)
            .filter_map(|((fault, start, end), (_, kind, host))| {
                let start_us = start?;
                Some(FaultWindow {
                    index: fault,
                    kind,
                    start_us,
                    end_us: end.unwrap_or(start_us).max(start_us),
                    hosts: vec![host.clone()],
                })
            })
            .collect();
        Applied { windows, errors }
    }
}

#[cfg(test)]
mod tests {
    use super::{LiveFaults, Scheduled, Step};
    use crate::scenario::Scenario;

    fn scenario(faults: &str) -> Scenario {
        let base = include_str!("../../../scenarios/live/small-opening-shared.toml");
        Scenario::parse(&format!("{base}\n{faults}"), "t.toml").expect("a valid scenario")
    }

    #[test]
    fn crashes_and_pauses_become_steps_in_time_order() {
        let scenario = scenario(
            "[[faults]]\nkind = \"crash\"\nhost = \"engine-1\"\nat_s = 10\nrestart_at_s = 14\n\
             [[faults]]\nkind = \"pause\"\nhost = \"engine-2\"\nat_s = 5\npause_ms = 1500\n\
             [[faults]]\nkind = \"crash\"\nhost = \"store-cache\"\nat_s = 20\nlose_data = true\n",
        );
        let faults = LiveFaults::of(&scenario);
        let steps: Vec<(u64, usize, Step)> =
            faults.steps.iter().map(|Scheduled { at_us, fault, step }| (*at_us, *fault, step.clone())).collect();
        assert_eq!(
            steps,
            vec![
                (5_000_000, 1, Step::Stop("engine-2".into())),
                (6_500_000, 1, Step::Continue("engine-2".into())),
                (10_000_000, 0, Step::Kill("engine-1".into())),
                (14_000_000, 0, Step::Restart("engine-1".into())),
                (20_000_000, 2, Step::Kill("store-cache".into())),
            ]
        );
    }
}
