//! The `Date` header of every response, read from the engine's clock.
//!
//! hyper would otherwise stamp each response with the host's wall-clock time. In a simulated
//! run that is the time the simulation happens to run at: the header's bytes (and with them
//! HPACK's table, each frame's size and how frames are cut into writes) would then depend on
//! how fast the machine runs, and a seed would not replay. The engine's clock is the real
//! clock live and the node's simulated (and possibly skewed) clock in a simulation.

use std::time::{Duration, UNIX_EPOCH};

use axum::http::HeaderValue;
use parking_lot::Mutex;

/// The header's value, formatted once per second of the engine's clock.
#[derive(Debug, Default)]
pub(super) struct DateHeader {
    /// The second (since the Unix epoch) last formatted, and its value.
    cached: Mutex<Option<(u64, HeaderValue)>>,
}

impl DateHeader {
    /// The header's value at `now_ms` (milliseconds since the Unix epoch), as RFC 9110's
    /// IMF-fixdate.
    pub(super) fn at(&self, now_ms: u64) -> HeaderValue {
        let second = now_ms / 1000;
        let mut cached = self.cached.lock();
        match &*cached {
            Some((cached_second, value)) if *cached_second == second => value.clone(),
            _ => {
                let text = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(second));
                let value =
                    HeaderValue::from_str(&text).unwrap_or_else(|_| unreachable!("an HTTP date is visible ASCII"));
                *cached = Some((second, value.clone()));
                value
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_date_is_the_clocks_second_in_imf_fixdate() {
        let dates = DateHeader::default();
        assert_eq!(dates.at(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(dates.at(784_111_777_999), "Sun, 06 Nov 1994 08:49:37 GMT");
        // Within the same second the cached value is reused; the next second is formatted anew.
        assert_eq!(dates.at(784_111_777_000), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(dates.at(784_111_778_000), "Sun, 06 Nov 1994 08:49:38 GMT");
        // A clock set back (a skewed node) is followed too.
        assert_eq!(dates.at(1_000), "Thu, 01 Jan 1970 00:00:01 GMT");
    }
}
