//! Time as the engine sees it. Every decision that depends on time takes `now` from a
//! [`Clock`] handed in at start, never from the operating system directly, so that the
//! simulator can run the engine on simulated (and skewed) time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A source of time for one engine node.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// Milliseconds since the Unix epoch, as this node believes it (it may be skewed).
    fn now_ms(&self) -> u64;
    /// A monotonic reading in microseconds, for measuring durations on this node.
    fn monotonic_us(&self) -> u64;
}

/// The operating system's clock: the live server's only source of time.
#[derive(Debug)]
pub struct SystemClock {
    origin: std::time::Instant,
}

impl SystemClock {
    /// A clock whose monotonic readings start at zero now.
    pub fn new() -> Self {
        Self { origin: std::time::Instant::now() }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or(Duration::ZERO);
        u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
    }

    fn monotonic_us(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}

/// A clock that moves only when told to: for tests, and for anything that drives time itself.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now_us: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock reading `start_ms` milliseconds since the epoch.
    pub fn starting_at_ms(start_ms: u64) -> Self {
        Self { now_us: Arc::new(AtomicU64::new(start_ms.saturating_mul(1000))) }
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let by_us = u64::try_from(by.as_micros()).unwrap_or(u64::MAX);
        self.now_us.fetch_add(by_us, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.now_us.load(Ordering::SeqCst) / 1000
    }

    fn monotonic_us(&self) -> u64 {
        self.now_us.load(Ordering::SeqCst)
    }
}

/// Time from tokio's clock plus a fixed epoch and an adjustable skew. In a simulated world
/// tokio's clock is simulated, so this is the simulator's node clock; with tokio's paused
/// test clock it lets tests pause a node for minutes in no time.
#[derive(Debug)]
pub struct TokioClock {
    epoch_ms: u64,
    origin: tokio::time::Instant,
    skew_ms: std::sync::atomic::AtomicI64,
}

impl TokioClock {
    /// A clock that reads `epoch_ms` now. Must be called inside a tokio runtime.
    pub fn new(epoch_ms: u64) -> Self {
        Self { epoch_ms, origin: tokio::time::Instant::now(), skew_ms: std::sync::atomic::AtomicI64::new(0) }
    }

    /// Skews this node's wall time by `skew_ms` (negative: behind).
    pub fn set_skew_ms(&self, skew_ms: i64) {
        self.skew_ms.store(skew_ms, Ordering::SeqCst);
    }
}

impl Clock for TokioClock {
    fn now_ms(&self) -> u64 {
        let elapsed_ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        let unskewed = self.epoch_ms.saturating_add(elapsed_ms);
        unskewed.saturating_add_signed(self.skew_ms.load(Ordering::SeqCst))
    }

    fn monotonic_us(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}

/// Adapts an engine clock to the rate limiter's clock, so rate limits run on engine time too.
#[derive(Debug, Clone)]
pub(crate) struct LimiterClock(pub(crate) Arc<dyn Clock>);

impl governor::clock::Clock for LimiterClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        Duration::from_micros(self.0.monotonic_us())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_advanced() {
        let clock = ManualClock::starting_at_ms(1_000);
        assert_eq!(clock.now_ms(), 1_000);
        clock.advance(Duration::from_millis(250));
        assert_eq!(clock.now_ms(), 1_250);
        assert_eq!(clock.monotonic_us(), 1_250_000);
    }
}
