//! Who calls the admin API: one of the configured named tokens, compared as digests (so the
//! time taken does not depend on how much of a token was right), and a lockout of client IPs
//! that keep presenting wrong ones.
//!
//! **Invariants:** the actor an admin call is audited under is the name of the token that
//! authenticated it, never anything the caller says; an IP locked out is refused whatever
//! token it presents, until the lockout ends; at most [`FAILING_IPS_MAX`] IPs are tracked,
//! and an entry lasts no longer than its window or its lockout.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use crate::clock::Clock;
use crate::config::AdminToken;

/// Wrong tokens an IP may present within [`FAILURE_WINDOW_MS`] before it is locked out, unless
/// the node is configured otherwise (`admin_auth_failures_max`).
pub const FAILURES_MAX: u32 = 5;
/// The window failures are counted in, from an IP's first failure.
pub const FAILURE_WINDOW_MS: u64 = 60_000;
/// How long an IP that reached [`FAILURES_MAX`] is refused.
pub const LOCKOUT_MS: u64 = 300_000;
/// The most IPs whose failures are tracked at once. Beyond it a failing IP is not tracked
/// (and the event is logged): admin tokens are long random secrets, so the lockout slows an
/// attacker with that many addresses rather than being what stops one.
pub const FAILING_IPS_MAX: usize = 10_000;

/// Why an admin call is not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// No bearer token at all: not counted as a failure.
    Missing,
    /// A token that is none of the configured ones.
    Wrong,
    /// This IP presented too many wrong tokens; refused until `retry_after_s` from now.
    Locked { retry_after_s: u64 },
}

/// The admin tokens of a node and its failure counts.
#[derive(Debug)]
pub(super) struct AdminAuth {
    tokens: Vec<(String, [u8; 32])>,
    failures_max: u32,
    clock: Arc<dyn Clock>,
    failing: Mutex<BTreeMap<IpAddr, Failures>>,
}

/// One IP's recent failures.
#[derive(Debug, Clone, Copy)]
struct Failures {
    window_start_ms: u64,
    count: u32,
    locked_until_ms: Option<u64>,
}

impl Failures {
    /// Whether this entry still says anything at `now_ms`.
    fn is_live(&self, now_ms: u64) -> bool {
        match self.locked_until_ms {
            Some(until_ms) => until_ms > now_ms,
            None => now_ms < self.window_start_ms.saturating_add(FAILURE_WINDOW_MS),
        }
    }
}

impl AdminAuth {
    pub(super) fn new(tokens: &[AdminToken], failures_max: u32, clock: Arc<dyn Clock>) -> Self {
        let tokens = tokens.iter().map(|token| (token.name.clone(), digest(&token.secret))).collect();
        Self { tokens, failures_max, clock, failing: Mutex::new(BTreeMap::new()) }
    }

    /// The name of the token `presented` from `ip`, or why the call is refused.
    pub(super) fn authenticate(&self, ip: IpAddr, presented: Option<&str>) -> Result<&str, Refusal> {
        let ip = ip.to_canonical();
        let now_ms = self.clock.now_ms();
        if let Some(until_ms) = self.locked_until_ms(ip, now_ms) {
            return Err(Refusal::Locked { retry_after_s: (until_ms - now_ms).div_ceil(1000) });
        }
        let presented = digest(presented.ok_or(Refusal::Missing)?);
        match self.tokens.iter().find(|(_, expected)| *expected == presented) {
            Some((name, _)) => {
                self.failing.lock().remove(&ip);
                Ok(name)
            }
            None => {
                self.record_failure(ip, now_ms);
                Err(Refusal::Wrong)
            }
        }
    }

    fn locked_until_ms(&self, ip: IpAddr, now_ms: u64) -> Option<u64> {
        let failing = self.failing.lock();
        failing.get(&ip)?.locked_until_ms.filter(|until_ms| *until_ms > now_ms)
    }

    fn record_failure(&self, ip: IpAddr, now_ms: u64) {
        let mut failing = self.failing.lock();
        if failing.len() >= FAILING_IPS_MAX && !failing.contains_key(&ip) {
            failing.retain(|_, failures| failures.is_live(now_ms));
            if failing.len() >= FAILING_IPS_MAX {
                tracing::warn!(%ip, tracked = FAILING_IPS_MAX, "admin authentication failure not tracked: too many failing IPs");
                return;
            }
        }
        let fresh = Failures { window_start_ms: now_ms, count: 0, locked_until_ms: None };
        let failures = failing.entry(ip).or_insert(fresh);
        if !failures.is_live(now_ms) {
            *failures = fresh;
        }
        failures.count += 1;
        if failures.count >= self.failures_max {
            failures.locked_until_ms = Some(now_ms.saturating_add(LOCKOUT_MS));
            tracing::warn!(%ip, lockout_ms = LOCKOUT_MS, "admin authentication locked out after repeated wrong tokens");
        }
    }
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::clock::ManualClock;

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 7));

    fn auth() -> (AdminAuth, ManualClock) {
        let clock = ManualClock::starting_at_ms(1_000_000);
        let tokens = [AdminToken { name: "ops".into(), secret: "right".into() }];
        (AdminAuth::new(&tokens, FAILURES_MAX, Arc::new(clock.clone())), clock)
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let (auth, clock) = auth();
        for _ in 0..FAILURES_MAX - 1 {
            assert_eq!(auth.authenticate(IP, Some("wrong")), Err(Refusal::Wrong));
        }
        clock.advance(Duration::from_millis(FAILURE_WINDOW_MS));
        assert_eq!(auth.authenticate(IP, Some("wrong")), Err(Refusal::Wrong));
        assert_eq!(auth.authenticate(IP, Some("right")), Ok("ops"));
    }

    #[test]
    fn a_missing_token_is_not_a_failure() {
        let (auth, _clock) = auth();
        for _ in 0..FAILURES_MAX * 2 {
            assert_eq!(auth.authenticate(IP, None), Err(Refusal::Missing));
        }
        assert_eq!(auth.authenticate(IP, Some("right")), Ok("ops"));
    }

    #[test]
    fn the_lockout_names_its_remaining_seconds_and_covers_the_mapped_form() {
        let (auth, clock) = auth();
        for _ in 0..FAILURES_MAX {
            assert_eq!(auth.authenticate(IP, Some("wrong")), Err(Refusal::Wrong));
        }
        clock.advance(Duration::from_millis(1_500));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().expect("address");
        let remaining_s = (LOCKOUT_MS - 1_500).div_ceil(1000);
        assert_eq!(auth.authenticate(mapped, Some("right")), Err(Refusal::Locked { retry_after_s: remaining_s }));
    }

    #[test]
    fn failing_ips_are_bounded_and_expired_ones_make_room() {
        let (auth, clock) = auth();
        let ip = |index: usize| IpAddr::V6(std::net::Ipv6Addr::from(index as u128 + 1));
        for index in 0..FAILING_IPS_MAX {
            assert_eq!(auth.authenticate(ip(index), Some("wrong")), Err(Refusal::Wrong));
        }
        assert_eq!(auth.failing.lock().len(), FAILING_IPS_MAX);
        assert_eq!(auth.authenticate(IP, Some("wrong")), Err(Refusal::Wrong));
        assert_eq!(auth.failing.lock().len(), FAILING_IPS_MAX);
        clock.advance(Duration::from_millis(FAILURE_WINDOW_MS));
        assert_eq!(auth.authenticate(IP, Some("wrong")), Err(Refusal::Wrong));
        assert_eq!(auth.failing.lock().len(), 1);
    }
}
