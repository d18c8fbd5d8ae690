//! What this node last read of each queue token, so that a call right after another need not
//! ask the cache store the same question again.
//!
//! Two reuses, both bounded by age on the node's monotonic clock:
//! - **The first long poll after a join.** A client polls its token as soon as it has joined,
//!   usually on the node that served the join. That poll starts from the status the join
//!   returned, when it is at most [`JOINED_REUSE`] old, instead of reading the line again. The
//!   entry is taken, so only one poll reuses it; the next one reads the line (and so refreshes
//!   the holder's last-seen time, which the join set).
//! - **Once admitted.** A seat map, and a call on one's own hold (confirm, cancel, read),
//!   accepts a token this node saw `ADMITTED` at most [`ADMITTED_REUSE`] ago and not yet past
//!   its admission's expiry. For a call on one's hold that is the store's answer too: such a
//!   token can since only have been used, which those calls accept. A seat map wants the token
//!   not used yet: a confirm on this node forgets the entry, so only a token used on another
//!   node can still browse here, for at most [`ADMITTED_REUSE`]. A hold, which needs the token
//!   admitted and not used, always reads it from the store.
//!
//! **Invariant:** an entry is never used past its age bound or its admission's expiry, and a
//! hold, the one call that must see a token not used yet, is authorized from the store alone.
//! **Invariant:** the entries are bounded ([`ENTRIES_MAX`]) and dropped in the order they were
//! read; no hash map is iterated, so a simulated run replays exactly.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use parking_lot::Mutex;

use crate::domain::{QueueStatus, ScheduleId, TokenStatus};

/// How old a join's status may be for the first long poll to start from it.
pub(crate) const JOINED_REUSE: Duration = Duration::from_secs(1);
/// How old an `ADMITTED` reading may be for a seat map, or a call on one's own hold, to
/// accept it.
pub(crate) const ADMITTED_REUSE: Duration = Duration::from_secs(5);
/// The most entries kept; the oldest go first.
pub(crate) const ENTRIES_MAX: usize = 1 << 16;

type Key = (ScheduleId, u64);

/// A status as read, with when: `read_at_us` on the monotonic clock, `read_at_ms` on the
/// node's wall clock (what a long poll measures its wait from).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Reading {
    pub status: QueueStatus,
    pub read_at_us: u64,
    pub read_at_ms: u64,
    joined: bool,
}

#[derive(Debug, Default)]
pub(crate) struct RecentTokens {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    by_token: HashMap<Key, Reading>,
    /// Every reading in the order it was made, to drop the old ones; a key read again has a
    /// newer entry further on, and its old place is skipped when it comes up.
    order: VecDeque<(u64, Key)>,
}

impl RecentTokens {
    /// Keeps the status a join returned.
    pub(crate) fn joined(&self, schedule_id: ScheduleId, status: QueueStatus, now_us: u64, now_ms: u64) {
        self.keep(schedule_id, Reading { status, read_at_us: now_us, read_at_ms: now_ms, joined: true });
    }

    /// Keeps a status read from the store.
    pub(crate) fn read(&self, schedule_id: ScheduleId, status: QueueStatus, now_us: u64, now_ms: u64) {
        self.keep(schedule_id, Reading { status, read_at_us: now_us, read_at_ms: now_ms, joined: false });
    }

    /// Takes the status a join returned for this token, if it is recent enough and still
    /// waiting: a long poll starts from it instead of reading the line.
    pub(crate) fn take_joined(&self, schedule_id: ScheduleId, seq: u64, now_us: u64) -> Option<Reading> {
        let mut inner = self.inner.lock();
        let key = (schedule_id, seq);
        let reading = *inner.by_token.get(&key)?;
        if !reading.joined
            || reading.status.status != TokenStatus::Waiting
            || !within(reading.read_at_us, now_us, JOINED_REUSE)
        {
            return None;
        }
        inner.by_token.remove(&key);
        Some(reading)
    }

    /// The token's status, if this node saw it admitted recently enough and the admission
    /// has not expired.
    pub(crate) fn admitted(&self, schedule_id: ScheduleId, seq: u64, now_us: u64, now_ms: u64) -> Option<QueueStatus> {
        let inner = self.inner.lock();
        let reading = inner.by_token.get(&(schedule_id, seq))?;
        let status = reading.status;
        let unexpired = status.expires_at_ms.is_none_or(|expires_at_ms| now_ms < expires_at_ms);
        (status.status == TokenStatus::Admitted && unexpired && within(reading.read_at_us, now_us, ADMITTED_REUSE))
            .then_some(status)
    }

    /// Forgets a token, once it is used.
    pub(crate) fn forget(&self, schedule_id: ScheduleId, seq: u64) {
        self.inner.lock().by_token.remove(&(schedule_id, seq));
    }

    fn keep(&self, schedule_id: ScheduleId, reading: Reading) {
        let mut inner = self.inner.lock();
        let key = (schedule_id, reading.status.seq);
        let now_us = reading.read_at_us;
        inner.by_token.insert(key, reading);
        inner.order.push_back((now_us, key));
        let keep_us = ADMITTED_REUSE.max(JOINED_REUSE).as_micros() as u64;
        while let Some(&(read_at_us, old_key)) = inner.order.front() {
            let too_many = inner.order.len() > ENTRIES_MAX;
            if !too_many && now_us.saturating_sub(read_at_us) <= keep_us {
                break;
            }
            inner.order.pop_front();
            // Only the entry this place stands for: a key read again since stays.
            if inner.by_token.get(&old_key).is_some_and(|kept| kept.read_at_us == read_at_us) {
                inner.by_token.remove(&old_key);
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().by_token.len()
    }
}

fn within(read_at_us: u64, now_us: u64, bound: Duration) -> bool {
    now_us.saturating_sub(read_at_us) <= bound.as_micros() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::UserId;

    fn status(seq: u64, status: TokenStatus, expires_at_ms: Option<u64>) -> QueueStatus {
        QueueStatus {
            seq,
            user_id: UserId::from(seq),
            status,
            position: if status == TokenStatus::Waiting { 7 } else { 0 },
            eta_s: 3,
            order_index: seq,
            expires_at_ms,
        }
    }

    #[test]
    fn a_joins_status_serves_one_poll_and_only_while_recent() {
        let recent = RecentTokens::default();
        recent.joined(1, status(5, TokenStatus::Waiting, None), 1_000, 50);
        assert_eq!(recent.take_joined(1, 5, 1_000 + 1_000_001), None, "older than the bound");
        let taken = recent.take_joined(1, 5, 2_000).expect("recent");
        assert_eq!((taken.status.seq, taken.read_at_ms), (5, 50));
        assert_eq!(recent.take_joined(1, 5, 2_000), None, "taken once");
        assert_eq!(recent.take_joined(2, 5, 2_000), None, "another schedule");
    }

    #[test]
    fn a_status_read_by_a_poll_is_not_a_joins() {
        let recent = RecentTokens::default();
        recent.read(1, status(5, TokenStatus::Waiting, None), 1_000, 50);
        assert_eq!(recent.take_joined(1, 5, 1_000), None);
        recent.joined(1, status(6, TokenStatus::Admitted, None), 1_000, 50);
        assert_eq!(recent.take_joined(1, 6, 1_000), None, "only a waiting token's");
    }

    #[test]
    fn an_admission_is_accepted_while_recent_unexpired_and_not_forgotten() {
        let recent = RecentTokens::default();
        recent.read(1, status(5, TokenStatus::Admitted, Some(10_000)), 0, 1_000);
        assert!(recent.admitted(1, 5, 5_000_000, 9_999).is_some());
        assert!(recent.admitted(1, 5, 5_000_001, 9_999).is_none(), "too old");
        assert!(recent.admitted(1, 5, 1, 10_000).is_none(), "expired");
        recent.read(1, status(6, TokenStatus::Used, None), 0, 1_000);
        assert!(recent.admitted(1, 6, 1, 1_000).is_none(), "used");
        recent.forget(1, 5);
        assert!(recent.admitted(1, 5, 1, 1_000).is_none(), "forgotten");
    }

    #[test]
    fn old_entries_go_and_a_key_read_again_stays() {
        let recent = RecentTokens::default();
        recent.read(1, status(1, TokenStatus::Admitted, None), 0, 0);
        recent.read(1, status(2, TokenStatus::Admitted, None), 0, 0);
        recent.read(1, status(1, TokenStatus::Admitted, None), 4_000_000, 4_000);
        recent.read(1, status(3, TokenStatus::Admitted, None), 5_500_000, 5_500);
        assert_eq!(recent.len(), 2, "token 2 dropped, token 1 kept by its newer reading");
        assert!(recent.admitted(1, 1, 5_500_000, 5_500).is_some());
        assert!(recent.admitted(1, 2, 5_500_000, 5_500).is_none());
    }

    #[test]
    fn entries_are_bounded() {
        let recent = RecentTokens::default();
        for seq in 0..(ENTRIES_MAX as u64 + 10) {
            recent.read(1, status(seq, TokenStatus::Admitted, None), 0, 0);
        }
        assert_eq!(recent.len(), ENTRIES_MAX);
        assert!(recent.admitted(1, 0, 0, 0).is_none(), "the oldest went first");
        assert!(recent.admitted(1, ENTRIES_MAX as u64 + 9, 0, 0).is_some());
    }
}
