//! The scenario's fault timeline, applied for real to the processes of a spawned deployment:
//! a `crash` kills a process (SIGKILL) and starts it again at `restart_at_s` (an engine node on
//! its port, the run's own Redis server empty); a `pause` stops it (SIGSTOP) and continues it
//! (SIGCONT) `pause_ms` later; `partition`, `hold-link`, `latency` and `slow-store` set the
//! [`LinkMode`] of the fault proxies on the links they name, and set them back to `Pass` at
//! their end. A live run has links from the load driver (every `client-*`) to each engine
//! node, and from each engine node to `store-cache` and `store-record`; nothing else talks.
//! Each fault's window is what was applied, on the run's clock,
//! not what was written. When the load ends first, every fault still open is healed (a
//! crashed process is started again, a stopped one continued), as a simulated run heals its
//! faults after the timeline, so the state can be read back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use std::collections::BTreeSet;

use super::deploy::Deployment;
use super::proxy::{Direction, LinkMode};
use crate::scenario::{Fault, HostSet, STORE_CACHE_HOST, STORE_RECORD_HOST, Scenario};
use crate::world::FaultWindow;

/// A link of a live deployment, from the side that connects to the side that listens:
/// `(client-N, engine-M)` or `(engine-M, store-*)`.
pub type Link = (String, String);

/// The link between `x` and `y` in a live deployment, in its direction, and whether `x` is
/// the side that connects; `None` where the two never talk.
fn link_between(x: &str, y: &str) -> Option<(Link, bool)> {
    let is_store = |host: &str| host == STORE_CACHE_HOST || host == STORE_RECORD_HOST;
    let (engine, client) = (|host: &str| host.starts_with("engine-"), |host: &str| host.starts_with("client-"));
    if (client(x) && engine(y)) || (engine(x) && is_store(y)) {
        Some(((x.to_owned(), y.to_owned()), true))
    } else if (client(y) && engine(x)) || (engine(y) && is_store(x)) {
        Some(((y.to_owned(), x.to_owned()), false))
    } else {
        None
    }
}

/// The links between the hosts of `a` and those of `b`, each with the direction from `a` to
/// `b` (`Direction::ToUpstream` when `a` is the side that connects).
fn links_across(hosts: &[String], a: &HostSet, b: &HostSet) -> Vec<(Link, Direction)> {
    let (a, b) = (a.resolve(hosts), b.resolve(hosts));
    let mut links = Vec::new();
    for x in &a {
        for y in &b {
            if let Some((link, x_connects)) = link_between(x, y) {
                links.push((link, if x_connects { Direction::ToUpstream } else { Direction::ToClient }));
            }
        }
    }
    links
}

/// The links `fault` acts on, with the mode it sets on each (empty for the faults that act on
/// processes, and for a fault between hosts that never talk).
pub fn link_modes(scenario: &Scenario, fault: &Fault) -> Vec<(Link, LinkMode)> {
    let hosts = scenario.hosts();
    match fault {
        Fault::Partition(partition) => links_across(&hosts, &partition.a, &partition.b)
            .into_iter()
            .map(|(link, a_to_b)| (link, LinkMode::Drop { only: partition.one_way.then_some(a_to_b) }))
            .collect(),
        Fault::HoldLink(hold) => {
            links_across(&hosts, &hold.a, &hold.b).into_iter().map(|(link, _)| (link, LinkMode::Hold)).collect()
        }
        Fault::Latency(latency) => {
            // A live network's own latency is the loopback's: the spike is all of it.
            let one_way_ms = latency.latency_ms.round().max(0.0) as u64;
            links_across(&hosts, &latency.a, &latency.b)
                .into_iter()
                .map(|(link, _)| (link, LinkMode::Delay { one_way_ms, only: None }))
                .collect()
        }
        Fault::SlowStore(slow) => hosts
            .iter()
            .filter(|host| host.starts_with("engine-"))
            .map(|engine| {
                let link = (engine.clone(), slow.host.clone());
                (link, LinkMode::Delay { one_way_ms: slow.extra_ms, only: Some(Direction::ToClient) })
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Every link some fault of `scenario` acts on: the links a deployment puts a proxy on.
pub fn faulted_links(scenario: &Scenario) -> BTreeSet<Link> {
    scenario.faults.iter().flat_map(|fault| link_modes(scenario, fault)).map(|(link, _)| link).collect()
}

/// How often the timeline looks at the clock while it waits for its next step or the end.
const TICK: Duration = Duration::from_millis(5);

/// One step of the timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Kill(String),
    Restart(String),
    Stop(String),
    Continue(String),
    /// Sets these links' modes.
    Links(Vec<(Link, LinkMode)>),
    /// Sets these links back to `Pass`.
    Heal(Vec<Link>),
}

impl Step {
    /// Whether the step repairs what an earlier one did (run even after the load ended).
    fn heals(&self) -> bool {
        matches!(self, Step::Restart(_) | Step::Continue(_) | Step::Heal(_))
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
    kinds: Vec<(usize, &'static str, Vec<String>)>,
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
            let window = |start_s: f64, end_s: f64| {
                let links = link_modes(scenario, entry);
                let hosts: BTreeSet<String> =
                    links.iter().flat_map(|((from, to), _)| [from.clone(), to.clone()]).collect();
                let healed = links.iter().map(|(link, _)| link.clone()).collect();
                (
                    hosts.into_iter().collect::<Vec<_>>(),
                    (us(start_s), Step::Links(links)),
                    Some((us(end_s), Step::Heal(healed))),
                )
            };
            let (hosts, start, end) = match entry {
                Fault::Crash(crash) => (
                    vec![crash.host.clone()],
                    (us(crash.at_s), Step::Kill(crash.host.clone())),
                    crash.restart_at_s.map(|at_s| (us(at_s), Step::Restart(crash.host.clone()))),
                ),
                Fault::Pause(pause) => (
                    vec![pause.host.clone()],
                    (us(pause.at_s), Step::Stop(pause.host.clone())),
                    Some((us(pause.resume_at_s()), Step::Continue(pause.host.clone()))),
                ),
                Fault::Partition(partition) => window(partition.at_s, partition.heal_at_s),
                Fault::HoldLink(hold) => window(hold.at_s, hold.release_at_s),
                Fault::Latency(latency) => window(latency.at_s, latency.until_s),
                Fault::SlowStore(slow) => window(slow.at_s, slow.until_s),
                _ => continue,
            };
            faults.kinds.push((fault, entry.kind(), hosts));
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
        self.steps.iter().filter_map(|scheduled| match &scheduled.step {
            Step::Kill(host) | Step::Restart(host) | Step::Stop(host) | Step::Continue(host) => Some(host.as_str()),
            Step::Links(_) | Step::Heal(_) => None,
        })
    }

    /// The links the faults act on.
    pub fn links(&self) -> impl Iterator<Item = &Link> {
        self.steps
            .iter()
            .filter_map(|scheduled| match &scheduled.step {
                Step::Links(links) => Some(links.iter().map(|(link, _)| link)),
                _ => None,
            })
            .flatten()
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
                Step::Links(links) => {
                    links.iter().try_for_each(|((from, to), mode)| deployment.set_link(from, to, *mode))
                }
                Step::Heal(links) => {
                    links.iter().try_for_each(|(from, to)| deployment.set_link(from, to, LinkMode::Pass))
                }
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
            .filter_map(|((fault, start, end), (_, kind, hosts))| {
                let start_us = start?;
                Some(FaultWindow {
                    index: fault,
                    kind,
                    start_us,
                    end_us: end.unwrap_or(start_us).max(start_us),
                    hosts: hosts.clone(),
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
