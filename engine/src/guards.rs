//! Guards in front of the public API: rate limits per client IP and per verified user (GCRA,
//! from `governor`, on engine time), a limit on accounts opened per IP and hour, and an IP
//! blocklist and a user blocklist whose entries expire.
//!
//! **Invariant:** a limiter is keyed only by what the engine verified (the connection's or a
//! trusted proxy's address, a session's user), never by an unverified string a client sends,
//! and the sweep forgets idle keys.
//!
//! An IPv4 address and its IPv4-mapped IPv6 form (`::ffff:a.b.c.d`) are one client: every entry
//! point keys by [`IpAddr::to_canonical`].

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::middleware::NoOpMiddleware;
use governor::state::keyed::HashMapStateStore;
use governor::{Quota, RateLimiter};
use parking_lot::{Mutex, RwLock};
use serde::Serialize;

use crate::clock::{Clock, LimiterClock};
use crate::config::RateLimits;
use crate::domain::UserId;

type KeyedLimiter<K> = RateLimiter<K, HashMapStateStore<K>, LimiterClock, NoOpMiddleware<Duration>>;

/// The limits in force and the limiters enforcing them, swapped together.
type Limiters = (RateLimits, Arc<KeyedLimiter<IpAddr>>, Arc<KeyedLimiter<UserId>>);

/// The most IPs the blocklist holds; a block beyond it is refused, not silently dropped.
pub const BLOCKED_IPS_MAX: usize = 100_000;
/// The most users the user blocklist holds; a block beyond it is refused, not silently dropped.
pub const BLOCKED_USERS_MAX: usize = 100_000;

/// Why a request was turned away before it reached a handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The client IP is blocked until `until_ms`.
    Blocked { until_ms: u64 },
    /// The user of the request's verified session is blocked until `until_ms`.
    UserBlocked { until_ms: u64 },
    /// Too many requests; try again after `retry_after_s`.
    RateLimited { scope: LimitScope, retry_after_s: u64 },
}

/// Which limit was hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitScope {
    Ip,
    User,
    /// Accounts opened from one address.
    Accounts,
}

/// A blocklist entry, for the admin snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Block {
    #[schema(value_type = String)]
    pub ip: IpAddr,
    pub until_ms: u64,
}

/// A user blocklist entry, for the admin snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct UserBlock {
    pub user_id: UserId,
    pub until_ms: u64,
}

/// The blocklist is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the blocklist holds {BLOCKED_IPS_MAX} IPs already")]
pub struct BlocklistFull;

/// The user blocklist is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the user blocklist holds {BLOCKED_USERS_MAX} users already")]
pub struct UserBlocklistFull;

/// Rate limits and blocklist of one engine node.
#[derive(Debug)]
pub struct Guards {
    clock: Arc<dyn Clock>,
    limits: RwLock<Limiters>,
    accounts: KeyedLimiter<IpAddr>,
    blocks: Blocklist<IpAddr>,
    user_blocks: Blocklist<UserId>,
}

/// Keys blocked until a time, at most `max` of them.
#[derive(Debug)]
struct Blocklist<K> {
    until_ms: Mutex<BTreeMap<K, u64>>,
    max: usize,
}

/// The blocklist holds its maximum.
struct Full;

impl<K: Ord + Copy> Blocklist<K> {
    fn new(max: usize) -> Self {
        Self { until_ms: Mutex::new(BTreeMap::new()), max }
    }

    /// When `key`'s block ends, if it is in force at `now_ms`.
    fn blocked_until(&self, key: &K, now_ms: u64) -> Option<u64> {
        self.until_ms.lock().get(key).copied().filter(|until_ms| *until_ms > now_ms)
    }

    /// Blocks `key` until `until_ms`; returns when the previous block (if any) would have ended.
    fn block(&self, key: K, until_ms: u64) -> Result<Option<u64>, Full> {
        let mut blocks = self.until_ms.lock();
        if blocks.len() >= self.max && !blocks.contains_key(&key) {
            return Err(Full);
        }
        Ok(blocks.insert(key, until_ms))
    }

    fn unblock(&self, key: &K) -> Option<u64> {
        self.until_ms.lock().remove(key)
    }

    /// The blocks in force at `now_ms`, in key order.
    fn in_force(&self, now_ms: u64) -> Vec<(K, u64)> {
        self.until_ms.lock().iter().filter(|(_, until)| **until > now_ms).map(|(&key, &until)| (key, until)).collect()
    }

    fn sweep(&self, now_ms: u64) {
        self.until_ms.lock().retain(|_, until| *until > now_ms);
    }
}

impl Guards {
    /// Guards with `limits` and `accounts_per_ip_per_hour`, on `clock`.
    pub fn new(limits: RateLimits, accounts_per_ip_per_hour: u32, clock: Arc<dyn Clock>) -> Self {
        let (per_ip, per_user) = limiters(limits, &clock);
        let per_hour = NonZeroU32::new(accounts_per_ip_per_hour).unwrap_or(NonZeroU32::MIN);
        let accounts = RateLimiter::hashmap_with_clock(Quota::per_hour(per_hour), LimiterClock(Arc::clone(&clock)));
        Self {
            clock,
            limits: RwLock::new((limits, per_ip, per_user)),
            accounts,
            blocks: Blocklist::new(BLOCKED_IPS_MAX),
            user_blocks: Blocklist::new(BLOCKED_USERS_MAX),
        }
    }

    /// Admits or turns away a request from `ip` by the user of its verified session (if any),
    /// by the blocklists and this node's own rate limits.
    pub fn check(&self, ip: IpAddr, user: Option<UserId>) -> Result<(), Rejection> {
        let ip = ip.to_canonical();
        self.check_blocked(ip, user)?;
        let (per_ip, per_user) = {
            let guard = self.limits.read();
            (Arc::clone(&guard.1), Arc::clone(&guard.2))
        };
        let now = governor::clock::Clock::now(&LimiterClock(Arc::clone(&self.clock)));
        per_ip.check_key(&ip).map_err(|not_until| rate_limited(LimitScope::Ip, not_until.wait_time_from(now)))?;
        if let Some(user) = user {
            per_user
                .check_key(&user)
                .map_err(|not_until| rate_limited(LimitScope::User, not_until.wait_time_from(now)))?;
        }
        Ok(())
    }

    /// Counts one account opened from `ip`, or refuses it beyond the hourly allowance.
    pub fn check_account_creation(&self, ip: IpAddr) -> Result<(), Rejection> {
        let now = governor::clock::Clock::now(&LimiterClock(Arc::clone(&self.clock)));
        self.accounts
            .check_key(&ip.to_canonical())
            .map_err(|not_until| rate_limited(LimitScope::Accounts, not_until.wait_time_from(now)))
    }

    /// Turns away a request from a blocked `ip`, or by a blocked `user`. A blocked user's
    /// requests take nothing of their address's rate: the others behind it keep it all.
    pub fn check_blocked(&self, ip: IpAddr, user: Option<UserId>) -> Result<(), Rejection> {
        let now_ms = self.clock.now_ms();
        if let Some(until_ms) = self.blocks.blocked_until(&ip.to_canonical(), now_ms) {
            return Err(Rejection::Blocked { until_ms });
        }
        match user.and_then(|user| self.user_blocks.blocked_until(&user, now_ms)) {
            Some(until_ms) => Err(Rejection::UserBlocked { until_ms }),
            None => Ok(()),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> RateLimits {
        self.limits.read().0
    }

    /// Replaces the limits (bounds are checked by the caller); returns the old ones.
    pub fn set_limits(&self, limits: RateLimits) -> RateLimits {
        let (per_ip, per_token) = limiters(limits, &self.clock);
        let mut guard = self.limits.write();
        let before = guard.0;
        *guard = (limits, per_ip, per_token);
        before
    }

    /// Blocks `ip` for `ttl_ms`; returns when the previous block (if any) would have ended.
    pub fn block(&self, ip: IpAddr, ttl_ms: u64) -> Result<Option<u64>, BlocklistFull> {
        self.blocks.block(ip.to_canonical(), self.clock.now_ms().saturating_add(ttl_ms)).map_err(|Full| BlocklistFull)
    }

    /// Lifts a block; returns when it would have ended.
    pub fn unblock(&self, ip: IpAddr) -> Option<u64> {
        self.blocks.unblock(&ip.to_canonical())
    }

    /// The blocks in force, in IP order.
    pub fn blocks(&self) -> Vec<Block> {
        self.blocks.in_force(self.clock.now_ms()).into_iter().map(|(ip, until_ms)| Block { ip, until_ms }).collect()
    }

    /// Blocks `user` for `ttl_ms`; returns when the previous block (if any) would have ended.
    pub fn block_user(&self, user: UserId, ttl_ms: u64) -> Result<Option<u64>, UserBlocklistFull> {
        self.user_blocks.block(user, self.clock.now_ms().saturating_add(ttl_ms)).map_err(|Full| UserBlocklistFull)
    }

    /// Lifts a user's block; returns when it would have ended.
    pub fn unblock_user(&self, user: UserId) -> Option<u64> {
        self.user_blocks.unblock(&user)
    }

    /// The user blocks in force, in user order.
    pub fn user_blocks(&self) -> Vec<UserBlock> {
        let in_force = self.user_blocks.in_force(self.clock.now_ms());
        in_force.into_iter().map(|(user_id, until_ms)| UserBlock { user_id, until_ms }).collect()
    }

    /// Forgets expired blocks and idle limiter state, so memory stays bounded.
    pub fn sweep(&self) {
        let now_ms = self.clock.now_ms();
        self.blocks.sweep(now_ms);
        self.user_blocks.sweep(now_ms);
        let guard = self.limits.read();
        guard.1.retain_recent();
        guard.2.retain_recent();
        self.accounts.retain_recent();
    }
}

fn limiters(limits: RateLimits, clock: &Arc<dyn Clock>) -> (Arc<KeyedLimiter<IpAddr>>, Arc<KeyedLimiter<UserId>>) {
    let quota = |per_s: u32| {
        let per_s = NonZeroU32::new(per_s).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(limits.burst).unwrap_or(NonZeroU32::MIN);
        Quota::per_second(per_s).allow_burst(burst)
    };
    let limiter_clock = LimiterClock(Arc::clone(clock));
    (
        Arc::new(RateLimiter::hashmap_with_clock(quota(limits.per_ip_per_s), limiter_clock.clone())),
        Arc::new(RateLimiter::hashmap_with_clock(quota(limits.per_token_per_s), limiter_clock)),
    )
}

pub(crate) fn rate_limited(scope: LimitScope, wait: Duration) -> Rejection {
    Rejection::RateLimited { scope, retry_after_s: wait.as_secs() + u64::from(wait.subsec_nanos() > 0) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn guards(per_ip_per_s: u32, burst: u32) -> (Guards, ManualClock) {
        let clock = ManualClock::starting_at_ms(1_000_000);
        let limits = RateLimits { per_ip_per_s, per_token_per_s: per_ip_per_s, burst };
        (Guards::new(limits, 2, Arc::new(clock.clone())), clock)
    }

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));

    #[test]
    fn an_ip_over_its_rate_is_limited_with_a_retry_after() {
        let (guards, clock) = guards(2, 2);
        assert_eq!(guards.check(IP, None), Ok(()));
        assert_eq!(guards.check(IP, None), Ok(()));
        assert_eq!(guards.check(IP, None), Err(Rejection::RateLimited { scope: LimitScope::Ip, retry_after_s: 1 }));
        clock.advance(Duration::from_millis(500));
        assert_eq!(guards.check(IP, None), Ok(()));
    }

    #[test]
    fn a_user_over_their_rate_is_limited_even_across_ips() {
        let (guards, _clock) = guards(1_000, 1);
        let other = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(guards.check(IP, Some(7)), Ok(()));
        assert!(matches!(guards.check(other, Some(7)), Err(Rejection::RateLimited { scope: LimitScope::User, .. })));
        let third = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 3));
        assert_eq!(guards.check(third, Some(8)), Ok(()), "another user has a limit of their own");
    }

    #[test]
    fn accounts_per_address_are_limited_per_hour() {
        let (guards, clock) = guards(1_000, 1_000);
        let other = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(guards.check_account_creation(IP), Ok(()));
        assert_eq!(guards.check_account_creation(IP), Ok(()));
        assert!(matches!(
            guards.check_account_creation(IP),
            Err(Rejection::RateLimited { scope: LimitScope::Accounts, retry_after_s: 1_800 })
        ));
        assert_eq!(guards.check_account_creation(other), Ok(()));
        clock.advance(Duration::from_secs(1_800));
        assert_eq!(guards.check_account_creation(IP), Ok(()));
    }

    #[test]
    fn blocks_expire() {
        let (guards, clock) = guards(1_000, 1_000);
        guards.block(IP, 10_000).expect("room");
        assert_eq!(guards.check(IP, None), Err(Rejection::Blocked { until_ms: 1_010_000 }));
        clock.advance(Duration::from_secs(10));
        assert_eq!(guards.check(IP, None), Ok(()));
        guards.sweep();
        assert!(guards.blocks().is_empty());
    }

    #[test]
    fn a_blocked_user_is_refused_from_any_address_and_the_others_behind_theirs_pass() {
        let (guards, clock) = guards(1_000, 1_000);
        let other = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));
        guards.block_user(7, 10_000).expect("room");
        assert_eq!(guards.check(IP, Some(7)), Err(Rejection::UserBlocked { until_ms: 1_010_000 }));
        assert_eq!(guards.check(other, Some(7)), Err(Rejection::UserBlocked { until_ms: 1_010_000 }));
        assert_eq!(guards.check(IP, Some(8)), Ok(()), "another user behind the same address");
        assert_eq!(guards.check(IP, None), Ok(()), "the address itself is not blocked");
        assert_eq!(guards.user_blocks(), vec![UserBlock { user_id: 7, until_ms: 1_010_000 }]);
        clock.advance(Duration::from_secs(10));
        assert_eq!(guards.check(IP, Some(7)), Ok(()), "the block expired");
        assert!(guards.user_blocks().is_empty());
        guards.sweep();
        assert!(guards.user_blocks.until_ms.lock().is_empty(), "the sweep forgets it");
    }

    #[test]
    fn a_blocked_user_takes_nothing_of_their_addresss_rate() {
        let (guards, _clock) = guards(2, 2);
        guards.block_user(7, 10_000).expect("room");
        for _ in 0..10 {
            assert!(matches!(guards.check(IP, Some(7)), Err(Rejection::UserBlocked { .. })));
        }
        assert_eq!(guards.check(IP, Some(8)), Ok(()));
        assert_eq!(guards.check(IP, Some(9)), Ok(()));
    }

    #[test]
    fn the_user_blocklist_is_bounded_and_refuses_beyond_it() {
        let (guards, _clock) = guards(1_000, 1_000);
        for user in 0..BLOCKED_USERS_MAX as u64 {
            guards.block_user(user, 10_000).expect("room");
        }
        assert_eq!(guards.block_user(BLOCKED_USERS_MAX as u64, 10_000), Err(UserBlocklistFull));
        assert_eq!(guards.block_user(0, 20_000), Ok(Some(1_010_000)), "a block already there is renewed");
        assert_eq!(guards.unblock_user(1), Some(1_010_000));
        assert_eq!(guards.block_user(BLOCKED_USERS_MAX as u64, 10_000), Ok(None));
    }

    #[test]
    fn an_ipv4_address_and_its_mapped_form_are_one_client() {
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("address");
        let (guards, _clock) = guards(1_000, 1);
        assert_eq!(guards.check(mapped, None), Ok(()));
        assert!(matches!(guards.check(IP, None), Err(Rejection::RateLimited { scope: LimitScope::Ip, .. })));
        guards.block(mapped, 10_000).expect("room");
        assert!(matches!(guards.check_blocked(IP, None), Err(Rejection::Blocked { .. })));
        assert_eq!(guards.blocks(), vec![Block { ip: IP, until_ms: 1_010_000 }]);
        assert_eq!(guards.unblock(IP), Some(1_010_000));
        assert_eq!(guards.check_blocked(mapped, None), Ok(()));
    }
}
