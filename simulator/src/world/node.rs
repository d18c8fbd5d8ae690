//! An engine node in the simulated world: its clock (simulated time, with a skew the fault
//! timeline can set) and its fault hook (pauses at named fault points, and on domain events).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;
use tcore_engine::clock::Clock;
use tcore_engine::faults::{FaultContext, FaultHook, FaultPoint};

/// The simulated time since the run started, in microseconds (0 outside a simulation).
pub fn sim_now_us() -> u64 {
    turmoil::sim_elapsed().map_or(0, |elapsed| u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX))
}

/// A node's clock: the world's epoch plus simulated time, plus this node's skew.
#[derive(Debug, Clone)]
pub struct SimClock {
    epoch_ms: u64,
    skew_ms: Arc<AtomicI64>,
    /// For a clock read only on its own host: the host runtime's instant and the simulated
    /// time at the first reading (see [`SimClock::on_host`]).
    anchor: Option<Arc<OnceLock<(tokio::time::Instant, u64)>>>,
}

impl SimClock {
    /// A clock reading `epoch_ms` at the start of the run, skewed by whatever `skew_ms` holds.
    /// It may be read from any host, or from outside the simulation (where time stands at 0).
    pub fn new(epoch_ms: u64, skew_ms: Arc<AtomicI64>) -> Self {
        Self { epoch_ms, skew_ms, anchor: None }
    }

    /// The same clock, for one that is only ever read on the host that made it (an engine
    /// node's): it reads the host runtime's own paused clock, which turmoil moves in step with
    /// simulated time, instead of looking the host up in the simulation on every reading. The
    /// two agree to the microsecond (a run gives the same bytes either way); a host that turmoil
    /// restarts builds a new runtime, and with it a new clock.
    pub fn on_host(epoch_ms: u64, skew_ms: Arc<AtomicI64>) -> Self {
        Self { epoch_ms, skew_ms, anchor: Some(Arc::default()) }
    }

    fn now_us(&self) -> u64 {
        let Some(anchor) = &self.anchor else { return sim_now_us() };
        let &(at, sim_us) = anchor.get_or_init(|| (tokio::time::Instant::now(), sim_now_us()));
        let since = tokio::time::Instant::now().saturating_duration_since(at);
        sim_us.saturating_add(u64::try_from(since.as_micros()).unwrap_or(u64::MAX))
    }
}

impl Clock for SimClock {
    fn now_ms(&self) -> u64 {
        (self.epoch_ms + self.now_us() / 1000).saturating_add_signed(self.skew_ms.load(Ordering::Relaxed))
    }

    fn monotonic_us(&self) -> u64 {
        self.now_us()
    }
}

/// When a pause fires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// At a named fault point.
    Point(FaultPoint),
    /// At any hold fault point where the lock has less than this left.
    LockTtlBelow { threshold_ms: u64 },
}

/// One armed pause.
#[derive(Debug, Clone)]
pub struct ArmedPause {
    pub trigger: Trigger,
    pub from_us: u64,
    pub pause: Duration,
    pub times_left: u32,
    /// The fault's index in the scenario, for the fault windows.
    pub fault_index: usize,
}

/// A pause that fired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FiredPause {
    pub fault_index: usize,
    pub host: String,
    pub point: &'static str,
    pub at_us: u64,
    pub pause_us: u64,
}

/// The fault hook of one node.
#[derive(Debug)]
pub struct SimFaults {
    host: String,
    armed: Mutex<Vec<ArmedPause>>,
    fired: Arc<Mutex<Vec<FiredPause>>>,
}

impl SimFaults {
    /// The hook of `host`, with its armed pauses; fired pauses are appended to `fired`.
    pub fn new(host: String, armed: Vec<ArmedPause>, fired: Arc<Mutex<Vec<FiredPause>>>) -> Self {
        Self { host, armed: Mutex::new(armed), fired }
    }
}

impl ArmedPause {
    /// Whether this pause may fire at `point` now, whatever the context says.
    fn live_at(&self, point: FaultPoint, now_us: u64) -> bool {
        self.times_left > 0
            && self.from_us <= now_us
            && match self.trigger {
                Trigger::Point(wanted) => wanted == point,
                Trigger::LockTtlBelow { .. } => matches!(point, FaultPoint::HoldAfterLock | FaultPoint::HoldAfterCheck),
            }
    }
}

impl FaultHook for SimFaults {
    fn pause_at(&self, point: FaultPoint, context: &FaultContext) -> Option<Duration> {
        let now_us = sim_now_us();
        let mut armed = self.armed.lock();
        let pause = armed.iter_mut().find(|pause| {
            pause.live_at(point, now_us)
                && match pause.trigger {
                    Trigger::Point(_) => true,
                    Trigger::LockTtlBelow { threshold_ms } => context
                        .lock_expires_at_ms
                        .is_some_and(|expires| expires.saturating_sub(context.now_ms) < threshold_ms),
                }
        })?;
        pause.times_left -= 1;
        self.fired.lock().push(FiredPause {
            fault_index: pause.fault_index,
            host: self.host.clone(),
            point: point.name(),
            at_us: now_us,
            pause_us: u64::try_from(pause.pause.as_micros()).unwrap_or(u64::MAX),
        });
        Some(pause.pause)
    }

    fn watches(&self, point: FaultPoint) -> bool {
        let now_us = sim_now_us();
        self.armed.lock().iter().any(|pause| pause.live_at(point, now_us))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn armed(trigger: Trigger, from_us: u64, times_left: u32) -> ArmedPause {
        ArmedPause { trigger, from_us, pause: Duration::from_secs(1), times_left, fault_index: 0 }
    }

    fn hook(armed: Vec<ArmedPause>) -> SimFaults {
        SimFaults::new("engine-1".into(), armed, Arc::default())
    }

    /// Outside a simulation the time is 0, so a pause armed from 0 is live.
    #[test]
    fn a_hook_watches_only_the_points_where_an_armed_pause_can_fire() {
        let confirm = hook(vec![armed(Trigger::Point(FaultPoint::ConfirmBeforeCommit), 0, 1)]);
        assert!(confirm.watches(FaultPoint::ConfirmBeforeCommit));
        assert!(!confirm.watches(FaultPoint::HoldAfterLock));

        let lock_ttl = hook(vec![armed(Trigger::LockTtlBelow { threshold_ms: 500 }, 0, 1)]);
        assert!(lock_ttl.watches(FaultPoint::HoldAfterLock) && lock_ttl.watches(FaultPoint::HoldAfterCheck));
        assert!(!lock_ttl.watches(FaultPoint::ConfirmBeforeCommit));

        let later = hook(vec![armed(Trigger::Point(FaultPoint::ConfirmBeforeCommit), 1, 1)]);
        assert!(!later.watches(FaultPoint::ConfirmBeforeCommit), "armed from a later time");
        let spent = hook(vec![armed(Trigger::Point(FaultPoint::ConfirmBeforeCommit), 0, 0)]);
        assert!(!spent.watches(FaultPoint::ConfirmBeforeCommit), "no times left");
        assert!(!hook(Vec::new()).watches(FaultPoint::ConfirmBeforeCommit));
    }

    /// Read on its own host, the clock agrees with simulated time to the microsecond, for a
    /// host that runs from the start and for one that joins later, across sleeps that end
    /// inside a tick and on its edge.
    #[test]
    fn a_clock_read_on_its_host_agrees_with_simulated_time() {
        async fn agree() -> turmoil::Result {
            let on_host = SimClock::on_host(1_000_000, Arc::new(AtomicI64::new(-250)));
            let shared = SimClock::new(1_000_000, Arc::new(AtomicI64::new(-250)));
            for pause_us in [0, 1, 250, 1_000, 3_333, 40_000, 999] {
                tokio::time::sleep(Duration::from_micros(pause_us)).await;
                assert_eq!(on_host.monotonic_us(), shared.monotonic_us());
                assert_eq!(on_host.now_ms(), shared.now_ms());
            }
            assert!(shared.monotonic_us() > 45_000);
            Ok(())
        }
        let mut sim = turmoil::Builder::new().tick_duration(Duration::from_millis(1)).build();
        sim.client("early", agree());
        for _ in 0..17 {
            sim.step().expect("step");
        }
        sim.client("late", agree());
        sim.run().expect("run");
    }

    #[test]
    fn a_fired_pause_stops_being_watched() {
        let hook = hook(vec![armed(Trigger::Point(FaultPoint::ConfirmBeforeCommit), 0, 1)]);
        let context = FaultContext { now_ms: 0, schedule_id: 1, seat_id: None, lock_expires_at_ms: None };
        assert_eq!(hook.pause_at(FaultPoint::ConfirmBeforeCommit, &context), Some(Duration::from_secs(1)));
        assert!(!hook.watches(FaultPoint::ConfirmBeforeCommit));
        assert_eq!(hook.fired.lock().len(), 1);
    }
}
