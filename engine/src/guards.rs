//! Guards in front of the public API: rate limits per client IP and per verified user (GCRA,
//! from `governor`, on engine time), a limit on accounts opened per IP and hour, and an IP
//! blocklist whose entries expire.
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

/// Why a request was turned away before it reached a handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The client IP is blocked until `until_ms`.
    Blocked { until_ms: u64 },
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

/// The blocklist is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the blocklist holds {BLOCKED_IPS_MAX} IPs already")]
pub struct BlocklistFull;

/// Rate limits and blocklist of one engine node.
#[derive(Debug)]
pub struct Guards {
    clock: Arc<dyn Clock>,
    limits: RwLock<Limiters>,
    accounts: KeyedLimiter<IpAddr>,
    blocks: Mutex<BTreeMap<IpAddr, u64>>,
}

impl Guards {
    /// Guards with `limits` and `accounts_per_ip_per_hour`, on `clock`.
    pub fn new(limits: RateLimits, accounts_per_ip_per_hour: u32, clock: Arc<dyn Clock>) -> Self {
        let (per_ip, per_user) = limiters(limits, &clock);
        let per_hour = NonZeroU32::new(accounts_per_ip_per_hour).unwrap_or(NonZeroU32::MIN);
        let accounts = RateLimiter::hashmap_with_clock(Quota::per_hour(per_hour), LimiterClock(Arc::clone(&clock)));
        Self { clock, limits: RwLock::new((limits, per_ip, per_user)), accounts, blocks: Mutex::new(BTreeMap::new()) }
    }

    /// Admits or turns away a request from `ip` by the user of its verified session (if any),
    /// by the blocklist and this node's own rate limits.
    pub fn check(&self, ip: IpAddr, user: Option<UserId>) -> Result<(), Rejection> {
        let ip = ip.to_canonical();
        self.check_blocked(ip)?;
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

    /// Turns away a request from a blocked `ip`.
    pub fn check_blocked(&self, ip: IpAddr) -> Result<(), Rejection> {
        let now_ms = self.clock.now_ms();
        match self.blocks.lock().get(&ip.to_canonical()) {
            Some(&until_ms) if until_ms > now_ms => Err(Rejection::Blocked { until_ms }),
            _ => Ok(()),
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
        let ip = ip.to_canonical();
        let mut blocks = self.blocks.lock();
        if blocks.len() >= BLOCKED_IPS_MAX && !blocks.contains_key(&ip) {
            return Err(BlocklistFull);
        }
        Ok(blocks.insert(ip, self.clock.now_ms().saturating_add(ttl_ms)))
    }

    /// Lifts a block; returns when it would have ended.
    pub fn unblock(&self, ip: IpAddr) -> Option<u64> {
        self.blocks.lock().remove(&ip.to_canonical())
    }

    /// The blocks in force, in IP order.
    pub fn blocks(&self) -> Vec<Block> {
        let now_ms = self.clock.now_ms();
        self.blocks
            .lock()
            .iter()
            .filter(|(_, until)| **until > now_ms)
            .map(|(&ip, &until_ms)| Block { ip, until_ms })
            .collect()
    }

    /// Forgets expired blocks and idle limiter state, so memory stays bounded.
    pub fn sweep(&self) {
        let now_ms = self.clock.now_ms();
        self.blocks.lock().retain(|_, until| *until > now_ms);
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
    fn an_ipv4_address_and_its_mapped_form_are_one_client() {
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("address");
        let (guards, _clock) = guards(1_000, 1);
        assert_eq!(guards.check(mapped, None), Ok(()));
        assert!(matches!(guards.check(IP, None), Err(Rejection::RateLimited { scope: LimitScope::Ip, .. })));
        guards.block(mapped, 10_000).expect("room");
        assert!(matches!(guards.check_blocked(IP), Err(Rejection::Blocked { .. })));
        assert_eq!(guards.blocks(), vec![Block { ip: IP, until_ms: 1_010_000 }]);
        assert_eq!(guards.unblock(IP), Some(1_010_000));
        assert_eq!(guards.check_blocked(mapped), Ok(()));
    }
}
