//! The generic cell rate algorithm (GCRA) of a rate limit shared by engine nodes: the state
//! of one key is a single number, its theoretical arrival time, so a shared store can keep
//! it and decide in one atomic step. The Redis store runs the same arithmetic in Lua.

/// A rate limit: `per_s` requests a second, in bursts of up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub per_s: u32,
    pub burst: u32,
}

impl RateLimit {
    /// Microseconds between two requests at the steady rate.
    pub fn interval_us(self) -> u64 {
        1_000_000 / u64::from(self.per_s.max(1))
    }

    /// One request at `now_us` against a key whose theoretical arrival time is `tat_us`
    /// (`None` for a key not seen yet): `Ok(new tat)` when it passes, `Err(µs to wait)` when
    /// it does not (the state is then unchanged).
    pub fn take(self, tat_us: Option<u64>, now_us: u64) -> Result<u64, u64> {
        let interval = self.interval_us();
        let new_tat = tat_us.unwrap_or(now_us).max(now_us) + interval;
        let allowed_from = new_tat.saturating_sub(interval * u64::from(self.burst.max(1)));
        if allowed_from > now_us { Err(allowed_from - now_us) } else { Ok(new_tat) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_steady_rate_refills_it() {
        let limit = RateLimit { per_s: 10, burst: 3 };
        let mut tat = None;
        for _ in 0..3 {
            tat = Some(limit.take(tat, 0).expect("within the burst"));
        }
        assert_eq!(limit.take(tat, 0), Err(100_000), "the fourth waits one interval");
        assert_eq!(limit.take(tat, 99_999), Err(1));
        let tat = Some(limit.take(tat, 100_000).expect("one refilled"));
        assert!(limit.take(tat, 100_000).is_err());
    }

    #[test]
    fn an_idle_key_starts_with_a_full_burst_again() {
        let limit = RateLimit { per_s: 2, burst: 2 };
        let tat = Some(limit.take(None, 0).expect("first"));
        let tat = Some(limit.take(tat, 0).expect("second"));
        assert!(limit.take(tat, 0).is_err());
        let later = Some(limit.take(tat, 10_000_000).expect("idle for 10 s"));
        assert!(limit.take(later, 10_000_000).is_ok(), "a full burst, not more");
    }
}
