//! Named fault points inside the engine (the BUGGIFY idea): places where the simulator may
//! pause a node, for example right after it took a lock. Outside the simulator the hook is
//! [`NoFaults`] and a fault point costs one virtual call.

use std::time::Duration;

use crate::domain::{ScheduleId, SeatId};

/// A place in the engine where a fault may be injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultPoint {
    /// A lock hold mode has just taken the seat's lock.
    HoldAfterLock,
    /// A lock hold mode has read the seat and found it available, and is about to write.
    HoldAfterCheck,
    /// A confirm has passed its checks and is about to commit.
    ConfirmBeforeCommit,
}

impl FaultPoint {
    /// Every fault point.
    pub const ALL: [FaultPoint; 3] =
        [FaultPoint::HoldAfterLock, FaultPoint::HoldAfterCheck, FaultPoint::ConfirmBeforeCommit];

    /// The point's name in scenario files.
    pub fn name(self) -> &'static str {
        match self {
            FaultPoint::HoldAfterLock => "hold.after_lock",
            FaultPoint::HoldAfterCheck => "hold.after_check",
            FaultPoint::ConfirmBeforeCommit => "confirm.before_commit",
        }
    }

    /// The point named `name`.
    pub fn from_name(name: &str) -> Option<FaultPoint> {
        Self::ALL.into_iter().find(|point| point.name() == name)
    }
}

/// What the engine knows when it reaches a fault point, so faults can fire on domain events
/// (for example "a lock held with less than 1 s of its TTL left").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultContext {
    pub now_ms: u64,
    pub schedule_id: ScheduleId,
    pub seat_id: Option<SeatId>,
    pub lock_expires_at_ms: Option<u64>,
}

/// Decides whether the node pauses at a fault point, and for how long.
pub trait FaultHook: Send + Sync + std::fmt::Debug {
    /// The pause to take at `point`, if any.
    fn pause_at(&self, point: FaultPoint, context: &FaultContext) -> Option<Duration>;

    /// Whether a pause at `point` is possible now at all. Where it is not, the engine skips
    /// the point, and the work of building its context (a store read, before a confirm).
    fn watches(&self, _point: FaultPoint) -> bool {
        true
    }
}

/// The production hook: never pauses.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoFaults;

impl FaultHook for NoFaults {
    fn pause_at(&self, _point: FaultPoint, _context: &FaultContext) -> Option<Duration> {
        None
    }

    fn watches(&self, _point: FaultPoint) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fault_point_round_trips_through_its_name() {
        for point in FaultPoint::ALL {
            assert_eq!(FaultPoint::from_name(point.name()), Some(point));
        }
        assert_eq!(FaultPoint::from_name("hold.nowhere"), None);
    }
}
