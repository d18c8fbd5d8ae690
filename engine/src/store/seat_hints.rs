//! What one node last learned of closed seats: a short-lived, node-local copy of the seat
//! gate, so that attempts on seats a live hold or a sale is known to close are refused without
//! a call to the shared gate.
//!
//! A hint only ever refuses, and only until the earlier of the closing hold's expiry and the
//! hint's own lifetime. A seat opened elsewhere (a hold cancelled or a sale refunded at another
//! node) can be refused here for at most that lifetime; a seat opened at this node is forgotten
//! at once. The record store stays the judge of every hold that gets past.

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::Mutex;

use crate::domain::{ScheduleId, SeatId};

/// The most hints kept; past it, lapsed ones are dropped, and if that is not enough, all.
const HINTS_MAX: usize = 1 << 20;

/// Seats known closed, each until when (ms on the callers' clock).
#[derive(Debug)]
pub struct SeatHints {
    lifetime_ms: u64,
    closed_until_ms: Mutex<HashMap<(ScheduleId, SeatId), u64>>,
}

impl SeatHints {
    /// Hints that live `lifetime` at most.
    pub fn new(lifetime: Duration) -> Self {
        Self {
            lifetime_ms: u64::try_from(lifetime.as_millis()).unwrap_or(u64::MAX),
            closed_until_ms: Mutex::new(HashMap::new()),
        }
    }

    /// Whether the seat is known closed at `now_ms`.
    pub fn is_closed(&self, schedule_id: ScheduleId, seat_id: SeatId, now_ms: u64) -> bool {
        self.closed_until_ms.lock().get(&(schedule_id, seat_id)).is_some_and(|&until_ms| until_ms > now_ms)
    }

    /// The seat was seen closed at `now_ms` by a hold that lasts until `hold_ends_ms` (`None`
    /// for a sale, which lasts until someone refunds it).
    pub fn closed(&self, schedule_id: ScheduleId, seat_id: SeatId, now_ms: u64, hold_ends_ms: Option<u64>) {
        let until_ms = now_ms.saturating_add(self.lifetime_ms).min(hold_ends_ms.unwrap_or(u64::MAX));
        if until_ms <= now_ms {
            return;
        }
        let mut hints = self.closed_until_ms.lock();
        if hints.len() >= HINTS_MAX {
            hints.retain(|_, &mut kept_until_ms| kept_until_ms > now_ms);
            if hints.len() >= HINTS_MAX {
                hints.clear();
            }
        }
        hints.insert((schedule_id, seat_id), until_ms);
    }

    /// The seat was opened at this node: forget what was known of it.
    pub fn opened(&self, schedule_id: ScheduleId, seat_id: SeatId) {
        self.closed_until_ms.lock().remove(&(schedule_id, seat_id));
    }

    /// How many hints are kept.
    pub fn len(&self) -> usize {
        self.closed_until_ms.lock().len()
    }

    /// Whether no hint is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hint_lasts_its_lifetime_or_until_the_hold_ends_whichever_is_first() {
        let hints = SeatHints::new(Duration::from_millis(1_000));
        hints.closed(1, 7, 10_000, Some(10_400));
        assert!(hints.is_closed(1, 7, 10_399));
        assert!(!hints.is_closed(1, 7, 10_400), "the hold ended: the seat may be free");
        hints.closed(1, 8, 10_000, Some(60_000));
        assert!(hints.is_closed(1, 8, 10_999));
        assert!(!hints.is_closed(1, 8, 11_000), "the hint outlived its lifetime");
        hints.closed(1, 9, 10_000, None);
        assert!(hints.is_closed(1, 9, 10_999));
        assert!(!hints.is_closed(1, 9, 11_000));
        assert!(!hints.is_closed(2, 9, 10_500), "another schedule's seat");
    }

    #[test]
    fn a_seat_opened_here_is_forgotten_at_once() {
        let hints = SeatHints::new(Duration::from_secs(5));
        hints.closed(1, 7, 0, None);
        hints.opened(1, 7);
        assert!(!hints.is_closed(1, 7, 1));
        assert!(hints.is_empty());
    }

    #[test]
    fn a_hold_already_over_or_a_zero_lifetime_leaves_no_hint() {
        let hints = SeatHints::new(Duration::from_secs(5));
        hints.closed(1, 7, 1_000, Some(1_000));
        assert!(hints.is_empty());
        let none = SeatHints::new(Duration::ZERO);
        none.closed(1, 7, 1_000, None);
        assert!(!none.is_closed(1, 7, 1_000));
        assert!(none.is_empty());
    }

    #[test]
    fn lapsed_hints_make_room_when_the_map_is_full() {
        let hints = SeatHints::new(Duration::from_millis(10));
        for seat in 0..HINTS_MAX as u64 {
            hints.closed(1, seat, 0, None);
        }
        assert_eq!(hints.len(), HINTS_MAX);
        hints.closed(2, 1, 100, None);
        assert_eq!(hints.len(), 1, "every earlier hint had lapsed");
        assert!(hints.is_closed(2, 1, 105));
    }
}
