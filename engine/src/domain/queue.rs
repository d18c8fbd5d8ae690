//! The waiting room of one schedule: who is in line, in which order they are admitted, and
//! how many may be active at once.

use std::collections::{BTreeSet, HashMap, VecDeque};

use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ScheduleId, TransitionError, UserId};

/// A queue token's life: `WAITING → ADMITTED → USED | EXPIRED` (a waiting user who stops
/// polling also ends `EXPIRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TokenStatus {
    Waiting,
    Admitted,
    Used,
    Expired,
}

/// In which order the line is admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum QueueOrder {
    /// First come, first served.
    #[default]
    Fifo,
    /// Everyone who queued before the opening is shuffled at the opening; later arrivals are
    /// served first come, first served behind them.
    RandomAtOpen,
}

/// How fast and how far the line moves.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AdmissionPolicy {
    pub rate_per_s: f64,
    pub active_max: u32,
    pub paused: bool,
    pub admitted_ttl_ms: u64,
    pub waiting_idle_timeout_ms: u64,
}

impl Default for AdmissionPolicy {
    fn default() -> Self {
        Self {
            rate_per_s: 200.0,
            active_max: 2_000,
            paused: false,
            admitted_ttl_ms: 600_000,
            waiting_idle_timeout_ms: 60_000,
        }
    }
}

/// One person in line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueEntry {
    pub seq: u64,
    pub user_id: UserId,
    pub joined_at_ms: u64,
    pub last_seen_ms: u64,
    pub order_index: u64,
    pub status: TokenStatus,
    pub admitted_at_ms: Option<u64>,
    pub expires_at_ms: Option<u64>,
}

/// Where a token stands.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct QueueStatus {
    pub seq: u64,
    pub user_id: UserId,
    pub status: TokenStatus,
    /// 1-based place in line while waiting (an upper bound: some ahead may have left); 0 otherwise.
    pub position: u64,
    pub eta_s: u64,
    pub order_index: u64,
    pub expires_at_ms: Option<u64>,
}

impl QueueStatus {
    /// This waiting status `elapsed_ms` after it was read, once the head of the line has moved
    /// to `head_order_index` (still short of this place): the place moves up by as many as the
    /// head passed, and the wait shrinks with the place, or with the time passed when that is
    /// less (before the opening the head does not move). Lets a long poll that nothing woke
    /// answer without reading the line again.
    pub fn moved_on(self, head_order_index: u64, elapsed_ms: u64) -> QueueStatus {
        if self.status != TokenStatus::Waiting || self.position == 0 {
            return self;
        }
        let head_at_read = (self.order_index + 1).saturating_sub(self.position);
        let head = head_order_index.clamp(head_at_read, self.order_index);
        let position = self.order_index - head + 1;
        let by_place = (u128::from(self.eta_s) * u128::from(position)).div_ceil(u128::from(self.position));
        let by_time = self.eta_s.saturating_sub(elapsed_ms / 1000);
        let eta_s = u64::try_from(by_place).unwrap_or(u64::MAX).min(by_time).max(1);
        QueueStatus { position, eta_s, ..self }
    }
}

/// A record of one admission, for the history and the checker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Admitted {
    pub schedule_id: ScheduleId,
    pub seq: u64,
    pub user_id: UserId,
    pub joined_at_ms: u64,
    pub admitted_at_ms: u64,
}

/// The waiting line of one schedule.
///
/// **Invariant:** `active` equals the number of entries in `ADMITTED` whose expiry has not
/// been processed, and never exceeds the policy's `active_max` through admission.
#[derive(Debug, Clone)]
pub struct WaitingLine {
    schedule_id: ScheduleId,
    opens_at_ms: u64,
    order: QueueOrder,
    policy: AdmissionPolicy,
    entries: Vec<QueueEntry>,
    by_user: HashMap<UserId, u64>,
    line: VecDeque<u64>,
    next_order_index: u64,
    shuffled: bool,
    active: u32,
    admitted_expiry: BTreeSet<(u64, u64)>,
    last_admit_ms: Option<u64>,
    admit_credit: f64,
    admitted_total: u64,
}

impl WaitingLine {
    /// An empty line for a schedule whose sale opens at `opens_at_ms`.
    pub fn new(schedule_id: ScheduleId, opens_at_ms: u64, order: QueueOrder, policy: AdmissionPolicy) -> Self {
        Self {
            schedule_id,
            opens_at_ms,
            order,
            policy,
            entries: Vec::new(),
            by_user: HashMap::new(),
            line: VecDeque::new(),
            next_order_index: 0,
            shuffled: false,
            active: 0,
            admitted_expiry: BTreeSet::new(),
            last_admit_ms: None,
            admit_credit: 0.0,
            admitted_total: 0,
        }
    }

    /// The current admission policy.
    pub fn policy(&self) -> AdmissionPolicy {
        self.policy
    }

    /// Replaces the admission policy (bounds are checked by the caller).
    pub fn set_policy(&mut self, policy: AdmissionPolicy) {
        self.policy = policy;
    }

    /// How many are waiting, and how many are admitted and active.
    pub fn depth(&self) -> (u64, u32) {
        (self.line.len() as u64, self.active)
    }

    /// The order index of the next one to be admitted: every waiter below it has been
    /// reached (admitted or skipped).
    pub fn head_order_index(&self) -> u64 {
        self.line.front().map_or(self.next_order_index, |&front| self.entries[index(front)].order_index)
    }

    /// All admissions so far.
    pub fn admitted_total(&self) -> u64 {
        self.admitted_total
    }

    /// Joins the line; a user already in line (waiting or admitted) keeps their place.
    pub fn join(&mut self, user_id: UserId, now_ms: u64) -> QueueStatus {
        if let Some(&seq) = self.by_user.get(&user_id) {
            let entry = &self.entries[index(seq)];
            if matches!(entry.status, TokenStatus::Waiting | TokenStatus::Admitted) {
                return self.status(seq, now_ms).unwrap_or_else(|| self.describe(seq));
            }
        }
        let seq = self.entries.len() as u64 + 1;
        let order_index = self.next_order_index;
        self.next_order_index += 1;
        self.entries.push(QueueEntry {
            seq,
            user_id,
            joined_at_ms: now_ms,
            last_seen_ms: now_ms,
            order_index,
            status: TokenStatus::Waiting,
            admitted_at_ms: None,
            expires_at_ms: None,
        });
        self.by_user.insert(user_id, seq);
        self.line.push_back(seq);
        self.describe(seq)
    }

    /// Where `seq` stands; polling also proves the user is still there.
    pub fn status(&mut self, seq: u64, now_ms: u64) -> Option<QueueStatus> {
        if seq == 0 {
            return None;
        }
        let entry = self.entries.get_mut(index(seq))?;
        entry.last_seen_ms = entry.last_seen_ms.max(now_ms);
        Some(self.describe_at(seq, now_ms))
    }

    /// Marks an admitted token used (its user has bought); frees its active slot.
    pub fn mark_used(&mut self, seq: u64, now_ms: u64) -> Result<(), TransitionError> {
        if seq == 0 || index(seq) >= self.entries.len() {
            return Err(TransitionError::TokenNotAdmitted { status: TokenStatus::Expired });
        }
        let status = self.describe_at(seq, now_ms).status;
        if status != TokenStatus::Admitted {
            return Err(TransitionError::TokenNotAdmitted { status });
        }
        let entry = &mut self.entries[index(seq)];
        entry.status = TokenStatus::Used;
        if let Some(expires_at_ms) = entry.expires_at_ms {
            self.admitted_expiry.remove(&(expires_at_ms, seq));
        }
        self.active = self.active.saturating_sub(1);
        Ok(())
    }

    /// Moves the line forward to `now_ms`: expires admitted tokens past their TTL, then admits
    /// as many as the rate allows since the last call, within `active_max`. Waiting users who
    /// stopped polling are skipped and expire.
    pub fn admit(&mut self, now_ms: u64, rng: &mut impl rand::Rng) -> Vec<Admitted> {
        self.expire_admitted(now_ms);
        // Ticks may come out of order (several nodes, each with its own `now`): the last tick's
        // time never moves back, or the credit since it would be earned twice.
        let last_ms = self.last_admit_ms.unwrap_or(self.opens_at_ms);
        self.last_admit_ms = Some(now_ms.max(last_ms));
        if self.policy.paused || now_ms < self.opens_at_ms {
            self.admit_credit = 0.0;
            return Vec::new();
        }
        if self.order == QueueOrder::RandomAtOpen && !self.shuffled {
            self.shuffle_early_arrivals(rng);
        }
        let burst = self.policy.rate_per_s.max(1.0);
        let elapsed_s = now_ms.saturating_sub(last_ms.max(self.opens_at_ms)) as f64 / 1000.0;
        self.admit_credit = (self.admit_credit + elapsed_s * self.policy.rate_per_s).min(burst);
        let mut admitted = Vec::new();
        while self.admit_credit >= 1.0 && self.active < self.policy.active_max {
            let Some(seq) = self.line.pop_front() else { break };
            let entry = &mut self.entries[index(seq)];
            if now_ms.saturating_sub(entry.last_seen_ms) > self.policy.waiting_idle_timeout_ms {
                entry.status = TokenStatus::Expired;
                continue;
            }
            let expires_at_ms = now_ms.saturating_add(self.policy.admitted_ttl_ms);
            entry.status = TokenStatus::Admitted;
            entry.admitted_at_ms = Some(now_ms);
            entry.expires_at_ms = Some(expires_at_ms);
            self.admitted_expiry.insert((expires_at_ms, seq));
            self.active += 1;
            self.admitted_total += 1;
            self.admit_credit -= 1.0;
            admitted.push(Admitted {
                schedule_id: self.schedule_id,
                seq,
                user_id: entry.user_id,
                joined_at_ms: entry.joined_at_ms,
                admitted_at_ms: now_ms,
            });
        }
        debug_assert!(self.active <= self.policy.active_max || admitted.is_empty());
        admitted
    }

    fn expire_admitted(&mut self, now_ms: u64) {
        while let Some(&(expires_at_ms, seq)) = self.admitted_expiry.first() {
            if expires_at_ms > now_ms {
                break;
            }
            self.admitted_expiry.pop_first();
            self.entries[index(seq)].status = TokenStatus::Expired;
            self.active = self.active.saturating_sub(1);
        }
    }

    fn shuffle_early_arrivals(&mut self, rng: &mut impl rand::Rng) {
        self.shuffled = true;
        let early_count =
            self.line.iter().take_while(|&&seq| self.entries[index(seq)].joined_at_ms < self.opens_at_ms).count();
        let mut early: Vec<u64> = self.line.drain(..early_count).collect();
        let mut order_indexes: Vec<u64> = early.iter().map(|&seq| self.entries[index(seq)].order_index).collect();
        order_indexes.sort_unstable();
        early.shuffle(rng);
        for (&seq, &order_index) in early.iter().zip(&order_indexes) {
            self.entries[index(seq)].order_index = order_index;
        }
        for seq in early.into_iter().rev() {
            self.line.push_front(seq);
        }
    }

    fn describe(&self, seq: u64) -> QueueStatus {
        let entry = &self.entries[index(seq)];
        self.describe_at(seq, entry.last_seen_ms)
    }

    fn describe_at(&self, seq: u64, now_ms: u64) -> QueueStatus {
        let entry = &self.entries[index(seq)];
        let mut status = entry.status;
        if status == TokenStatus::Admitted && entry.expires_at_ms.is_some_and(|expires| expires <= now_ms) {
            status = TokenStatus::Expired;
        }
        let (position, eta_s) = if status == TokenStatus::Waiting {
            let head = self.line.front().map_or(entry.order_index, |&front| self.entries[index(front)].order_index);
            let position = entry.order_index.saturating_sub(head) + 1;
            let rate = self.policy.rate_per_s.max(0.001);
            let until_open_s = self.opens_at_ms.saturating_sub(now_ms).div_ceil(1000);
            (position, until_open_s + (position as f64 / rate).ceil() as u64)
        } else {
            (0, 0)
        };
        QueueStatus {
            seq,
            user_id: entry.user_id,
            status,
            position,
            eta_s,
            order_index: entry.order_index,
            expires_at_ms: entry.expires_at_ms,
        }
    }
}

fn index(seq: u64) -> usize {
    usize::try_from(seq.saturating_sub(1)).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    fn policy(rate_per_s: f64, active_max: u32) -> AdmissionPolicy {
        AdmissionPolicy {
            rate_per_s,
            active_max,
            paused: false,
            admitted_ttl_ms: 10_000,
            waiting_idle_timeout_ms: 60_000,
        }
    }

    fn line_with(users: u64, order: QueueOrder, policy: AdmissionPolicy) -> WaitingLine {
        let mut line = WaitingLine::new(1, 1_000, order, policy);
        for user in 1..=users {
            line.join(user, user);
        }
        line
    }

    #[test]
    fn a_waiting_status_moves_on_with_the_head_and_the_time() {
        let read = QueueStatus {
            seq: 7,
            user_id: 7,
            status: TokenStatus::Waiting,
            position: 100,
            eta_s: 50,
            order_index: 149,
            expires_at_ms: None,
        };
        let check = |head, elapsed_ms, expected: (u64, u64)| {
            let moved = read.moved_on(head, elapsed_ms);
            assert_eq!((moved.position, moved.eta_s), expected, "head {head}, {elapsed_ms} ms");
        };
        check(50, 0, (100, 50));
        check(100, 25_000, (50, 25));
        check(100, 10_000, (50, 25));
        check(50, 30_000, (100, 20));
        check(10, 0, (100, 50));
        check(500, 0, (1, 1));
        let admitted = QueueStatus { status: TokenStatus::Admitted, position: 0, eta_s: 0, ..read };
        assert_eq!(admitted.moved_on(500, 1_000), admitted);
    }

    #[test]
    fn nobody_is_admitted_before_the_opening() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut line = line_with(10, QueueOrder::Fifo, policy(100.0, 100));
        assert!(line.admit(999, &mut rng).is_empty());
        assert_eq!(line.status(1, 999).map(|s| s.status), Some(TokenStatus::Waiting));
    }

    #[test]
    fn admission_follows_the_rate_and_fifo_order() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut line = line_with(10, QueueOrder::Fifo, policy(4.0, 100));
        line.admit(1_000, &mut rng);
        let admitted: Vec<u64> = line.admit(2_000, &mut rng).iter().map(|a| a.user_id).collect();
        assert_eq!(admitted, vec![1, 2, 3, 4]);
        assert_eq!(line.status(5, 2_000).map(|s| s.position), Some(1));
        assert_eq!(line.status(10, 2_000).map(|s| (s.position, s.eta_s)), Some((6, 2)));
    }

    #[test]
    fn active_max_caps_admission_until_a_token_is_used() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut line = line_with(5, QueueOrder::Fifo, policy(100.0, 2));
        line.admit(1_000, &mut rng);
        assert_eq!(line.admit(2_000, &mut rng).len(), 2);
        assert!(line.admit(3_000, &mut rng).is_empty());
        line.mark_used(1, 3_000).expect("admitted");
        assert_eq!(line.admit(4_000, &mut rng).len(), 1);
        assert_eq!(line.depth(), (2, 2));
    }

    #[test]
    fn admitted_tokens_expire_and_free_their_slot() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut line = line_with(3, QueueOrder::Fifo, policy(100.0, 1));
        line.admit(1_000, &mut rng);
        assert_eq!(line.admit(2_000, &mut rng).len(), 1);
        assert_eq!(line.status(1, 12_000).map(|s| s.status), Some(TokenStatus::Expired));
        assert_eq!(line.mark_used(1, 12_000), Err(TransitionError::TokenNotAdmitted { status: TokenStatus::Expired }));
        let next: Vec<u64> = line.admit(12_000, &mut rng).iter().map(|a| a.user_id).collect();
        assert_eq!(next, vec![2]);
    }

    #[test]
    fn waiting_users_who_stop_polling_are_skipped() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut line = line_with(3, QueueOrder::Fifo, policy(100.0, 10));
        line.admit(1_000, &mut rng);
        line.status(2, 70_000);
        line.status(3, 70_000);
        let admitted: Vec<u64> = line.admit(70_000, &mut rng).iter().map(|a| a.user_id).collect();
        assert_eq!(admitted, vec![2, 3]);
        assert_eq!(line.status(1, 70_000).map(|s| s.status), Some(TokenStatus::Expired));
    }

    #[test]
    fn random_at_open_shuffles_only_those_who_queued_before_the_opening() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut line = line_with(50, QueueOrder::RandomAtOpen, policy(1_000.0, 1_000));
        line.join(51, 1_500);
        line.admit(1_000, &mut rng);
        let admitted: Vec<u64> = line.admit(2_000, &mut rng).iter().map(|a| a.user_id).collect();
        assert_eq!(admitted.len(), 51);
        assert_ne!(admitted[..50], (1..=50).collect::<Vec<_>>()[..], "early arrivals are shuffled");
        assert_eq!(admitted[50], 51, "late arrival comes after the shuffled block");
    }

    #[test]
    fn paused_line_admits_nobody_and_banks_no_credit() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut line = line_with(10, QueueOrder::Fifo, policy(5.0, 100));
        line.set_policy(AdmissionPolicy { paused: true, ..policy(5.0, 100) });
        line.admit(1_000, &mut rng);
        assert!(line.admit(5_000, &mut rng).is_empty());
        line.set_policy(policy(5.0, 100));
        assert_eq!(line.admit(6_000, &mut rng).len(), 5);
    }

    #[test]
    fn joining_twice_keeps_the_same_place() {
        let mut line = line_with(3, QueueOrder::Fifo, policy(5.0, 100));
        let again = line.join(2, 50);
        assert_eq!(again.seq, 2);
        assert_eq!(line.depth(), (3, 0));
    }
}
