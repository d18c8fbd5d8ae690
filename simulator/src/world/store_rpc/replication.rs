//! How a store host's standby learns of its writes, and so what a failover can take back.
//!
//! - [`Replication::Async`]: a write is answered as soon as the primary applied it; the standby
//!   trails behind, and a failover loses what it had not received yet, acknowledged or not.
//!   **Known unsafe** for a system of record: a confirmation the client was told of can vanish.
//! - [`Replication::SemiSync`]: a write is answered only once a standby holds it (MySQL's
//!   lossless semi-synchronous replication, `AFTER_SYNC`). Shipping a write to the standby and
//!   hearing back takes a round trip, each leg drawn uniformly from the store link's latency
//!   with a seeded RNG, in the order the primary applied the writes (one ordered stream, so a
//!   write is held by the standby no sooner than the one before it). A failover keeps every write
//!   the standby acknowledged by then; writes still in flight are lost, and their callers are
//!   answered `Unavailable` (outcome unknown), never success.
//!
//! In semi-sync mode a read is answered only once the standby holds every write the primary had
//! applied when the read ran: MySQL hides a commit from other sessions until the standby has it,
//! and this store cannot show the older state instead, so it delays the reader. Either way no
//! answer tells a caller of a write that a failover could still take back.
//!
//! **Invariant:** the acknowledgement times of the writes never decrease along the journal, so
//! the writes a failover keeps are a prefix of it.
//! **Invariant:** the draws depend only on the seed and the order of the writes; nothing here
//! reads a clock.

use std::ops::RangeInclusive;
use std::time::Duration;

use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

/// How writes reach the standby.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replication {
    /// Answered at once; the standby trails by the replication window. Known unsafe.
    Async,
    /// Answered once a standby holds the write.
    SemiSync(SemiSync),
}

/// The round trip of semi-synchronous replication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SemiSync {
    /// One leg's latency (primary to standby, or back), drawn uniformly in this range.
    pub leg_latency: RangeInclusive<Duration>,
    /// The seed of the draws.
    pub seed: u64,
}

impl Default for SemiSync {
    /// The default store link of a scenario's `[network]` (0.2 to 1 ms each way).
    fn default() -> Self {
        Self { leg_latency: Duration::from_micros(200)..=Duration::from_millis(1), seed: 0 }
    }
}

impl Replication {
    /// Whether a failover can lose a write its caller was told of.
    pub fn is_unsafe(&self) -> bool {
        matches!(self, Self::Async)
    }
}

/// Mixed into the seed, so the round trips draw no numbers the store itself draws.
const ROUND_TRIP_SALT: u64 = 0x7374_616e_6462_7921;

/// The stream of writes to the standby in semi-sync mode: when each is acknowledged.
pub(super) struct StandbyStream {
    rng: Xoshiro256PlusPlus,
    leg_us: RangeInclusive<u64>,
    /// When the standby acknowledged (or will acknowledge) the newest write shipped.
    acknowledged_last: Duration,
}

impl StandbyStream {
    pub(super) fn new(semi_sync: &SemiSync) -> Self {
        let micros = |duration: &Duration| u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
        let (min_us, max_us) = (micros(semi_sync.leg_latency.start()), micros(semi_sync.leg_latency.end()));
        Self {
            rng: Xoshiro256PlusPlus::seed_from_u64(semi_sync.seed ^ ROUND_TRIP_SALT),
            leg_us: min_us.min(max_us)..=max_us,
            acknowledged_last: Duration::ZERO,
        }
    }

    /// Ships a write the primary applied at `now`; returns when the standby acknowledges it.
    pub(super) fn ship(&mut self, now: Duration) -> Duration {
        let there_us = self.rng.random_range(self.leg_us.clone());
        let back_us = self.rng.random_range(self.leg_us.clone());
        let acknowledged = now.saturating_add(Duration::from_micros(there_us.saturating_add(back_us)));
        self.acknowledged_last = self.acknowledged_last.max(acknowledged);
        self.acknowledged_last
    }

    /// When the standby holds every write shipped so far.
    pub(super) fn acknowledged_last(&self) -> Duration {
        self.acknowledged_last
    }
}

/// What an answer waits for before it is sent: the standby holding the primary's writes up to
/// `sequence`, at `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Durable {
    pub(super) sequence: u64,
    pub(super) at: Duration,
}

/// The writes failovers took back, by sequence number: at most one range per failover.
#[derive(Debug, Default)]
pub(super) struct LostWrites {
    ranges: parking_lot::Mutex<Vec<RangeInclusive<u64>>>,
}

impl LostWrites {
    pub(super) fn record(&self, lost: RangeInclusive<u64>) {
        self.ranges.lock().push(lost);
    }

    /// Whether an answer that saw the primary's writes up to `sequence` saw one that was lost.
    /// Sequence numbers after a failover continue past the lost ones, so an answer computed
    /// after it sees none of them.
    pub(super) fn saw_a_lost_write(&self, sequence: u64) -> bool {
        self.ranges.lock().iter().any(|lost| lost.contains(&sequence))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledgements_never_overtake_an_earlier_write() {
        let mut stream = StandbyStream::new(&SemiSync {
            leg_latency: Duration::from_micros(100)..=Duration::from_millis(5),
            seed: 3,
        });
        let mut previous = Duration::ZERO;
        for at_us in 0..1_000_u64 {
            let now = Duration::from_micros(at_us * 10);
            let acknowledged = stream.ship(now);
            assert!(acknowledged >= previous && acknowledged >= now + Duration::from_micros(200));
            assert!(acknowledged <= now.max(previous) + Duration::from_millis(10));
            previous = acknowledged;
        }
    }

    #[test]
    fn the_same_seed_draws_the_same_round_trips() {
        let semi_sync = SemiSync { seed: 11, ..SemiSync::default() };
        let draws =
            |mut stream: StandbyStream| (0..50).map(|i| stream.ship(Duration::from_millis(i))).collect::<Vec<_>>();
        assert_eq!(draws(StandbyStream::new(&semi_sync)), draws(StandbyStream::new(&semi_sync)));
    }

    #[test]
    fn a_lost_range_covers_only_answers_that_saw_it() {
        let lost = LostWrites::default();
        lost.record(5..=9);
        assert!(!lost.saw_a_lost_write(4));
        assert!(lost.saw_a_lost_write(5) && lost.saw_a_lost_write(9));
        assert!(!lost.saw_a_lost_write(10));
    }
}
