//! An engine node in the simulated world: its clock (simulated time, with a skew the fault
//! timeline can set) and its fault hook (pauses at named fault points, and on domain events).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
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
}

impl SimClock {
    /// A clock reading `epoch_ms` at the start of the run, skewed by whatever `skew_ms` holds.
    pub fn new(epoch_ms: u64, skew_ms: Arc<AtomicI64>) -> Self {
        Self { epoch_ms, skew_ms }
    }
}

impl Clock for SimClock {
    fn now_ms(&self) -> u64 {
        (self.epoch_ms + sim_now_us() / 1000).saturating_add_signed(self.skew_ms.load(Ordering::Relaxed))
    }

    fn monotonic_us(&self) -> u64 {
        sim_now_us()
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

    #[test]
    fn a_fired_pause_stops_being_watched() {
        let hook = hook(vec![armed(Trigger::Point(FaultPoint::ConfirmBeforeCommit), 0, 1)]);
        let context = FaultContext { now_ms: 0, schedule_id: 1, seat_id: None, lock_expires_at_ms: None };
        assert_eq!(hook.pause_at(FaultPoint::ConfirmBeforeCommit, &context), Some(Duration::from_secs(1)));
        assert!(!hook.watches(FaultPoint::ConfirmBeforeCommit));
        assert_eq!(hook.fired.lock().len(), 1);
    }
}
