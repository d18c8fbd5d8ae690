//! The engine's settings: what is fixed at start ([`EngineConfig`]), what admin calls may
//! change at run time ([`RuntimeSettings`]), and the bounds every admin change must respect.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::domain::{AdmissionPolicy, QueueOrder};
use crate::sessions::SessionConfig;

/// How a seat is taken. A correctness setting: fixed at start, never changed by admin calls
/// or the ops agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum HoldMode {
    /// One atomic check-and-set in the store; the fence is checked at confirm.
    #[default]
    Atomic,
    /// A lock with a TTL, then a storage write guarded by the lock's fencing token.
    FencedLock,
    /// **Known unsafe.** A lock with a TTL, then read-check-write with no fence: a holder
    /// that pauses past the TTL overwrites the next holder and the seat is sold twice.
    UnfencedLock,
}

impl HoldMode {
    /// Whether this mode can sell a seat twice.
    pub fn is_unsafe(self) -> bool {
        self == HoldMode::UnfencedLock
    }

    /// The mode's name as written in scenarios and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            HoldMode::Atomic => "atomic",
            HoldMode::FencedLock => "fenced-lock",
            HoldMode::UnfencedLock => "unfenced-lock",
        }
    }
}

/// Per-IP and per-token request rate limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RateLimits {
    #[schema(minimum = 1, maximum = 100_000)]
    pub per_ip_per_s: u32,
    #[schema(minimum = 1, maximum = 100_000)]
    pub per_token_per_s: u32,
    #[schema(minimum = 1, maximum = 100_000)]
    pub burst: u32,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self { per_ip_per_s: 50, per_token_per_s: 20, burst: 100 }
    }
}

/// Bounds on every value an admin call may set. Out of bounds is refused, never clamped.
pub mod bounds {
    use std::ops::RangeInclusive;

    pub const ADMISSION_RATE_PER_S: RangeInclusive<f64> = 0.1..=100_000.0;
    pub const ACTIVE_MAX: RangeInclusive<u32> = 1..=1_000_000;
    pub const RATE_LIMIT_PER_S: RangeInclusive<u32> = 1..=100_000;
    pub const RATE_LIMIT_BURST: RangeInclusive<u32> = 1..=100_000;
    pub const BLOCK_TTL_S: RangeInclusive<u64> = 1..=86_400;
    /// A user an admin call names: accounts are numbered from 1.
    pub const USER_ID: RangeInclusive<u64> = 1..=u64::MAX;
    pub const HOLD_TTL_S: RangeInclusive<u64> = 10..=3_600;
    pub const QUEUE_WAIT_S: RangeInclusive<u64> = 0..=30;
    /// Points one top-up may add (admin tool or payment webhook).
    pub const TOP_UP_POINTS: RangeInclusive<u64> = 1..=crate::domain::CHARGE_POINTS_MAX;
    /// Accounts one client address may open per hour.
    pub const ACCOUNTS_PER_IP_PER_HOUR: RangeInclusive<u32> = 1..=100_000;
    pub const SEATS_PER_USER_MAX: RangeInclusive<u32> = 1..=100;
    /// Wrong admin tokens one address may present per minute before its lockout.
    pub const ADMIN_AUTH_FAILURES_MAX: RangeInclusive<u32> = 1..=10_000;
    /// From a minute (longer than a request's lease) to thirty days.
    pub const IDEMPOTENCY_TTL_S: RangeInclusive<u64> = 60..=2_592_000;
    /// From a second (a client told `Retry-After: 1` finds it lapsed at its next try, at the
    /// earliest) to half a minute (shorter than a record's shortest life).
    pub const IDEMPOTENCY_LEASE_MS: RangeInclusive<u64> = 1_000..=30_000;
}

/// Settings an admin call may change while the engine runs (on this node).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RuntimeSettings {
    pub hold_ttl_ms: u64,
    pub rate_limits: RateLimits,
    /// The most seats one user may hold or buy per schedule.
    pub seats_per_user_max: u32,
}

/// How long an idempotency key stays claimed without word from its request, unless configured.
/// The request renews its claim every third of it, so a claim outlives its node by at most
/// this: a fan whose payment's node died may retry it on another node after 5 s, where a lease
/// that had to cover the longest request (30 s) kept such a retry refused (409) for up to 30 s,
/// past some fans' patience. Renewals cost one record-store write per third of a lease per
/// running request, none for a request that ends sooner.
pub const IDEMPOTENCY_LEASE_MS_DEFAULT: u64 = 5_000;

/// What is fixed when an engine node starts.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// This node's name, in logs, audit entries and metrics.
    pub node: String,
    pub hold_mode: HoldMode,
    /// Must be set to run [`HoldMode::UnfencedLock`].
    pub allow_unsafe_hold_mode: bool,
    pub lock_ttl_ms: u64,
    pub hold_ttl_ms: u64,
    pub queue_order: QueueOrder,
    pub admission: AdmissionPolicy,
    pub rate_limits: RateLimits,
    /// Whether the rate-limit counters live in the cache store, shared by every node on it,
    /// instead of in this node alone.
    pub rate_limits_shared: bool,
    /// The key queue tokens are signed with; nodes sharing a store must share it.
    pub token_secret: Vec<u8>,
    /// How fans' sessions are verified (and, in dev mode, issued).
    pub sessions: SessionConfig,
    /// The secret a payment provider signs its top-up webhooks with; without one the webhook
    /// is not served.
    pub payment_webhook_secret: Option<Vec<u8>>,
    /// Accounts one client address may open per hour (`POST /v1/users`).
    pub accounts_per_ip_per_hour: u32,
    /// The bearer tokens of the admin API, each named for the audit log; without one the
    /// admin API is not served.
    pub admin_tokens: Vec<AdminToken>,
    /// Wrong admin tokens one client address may present within a minute before it is locked
    /// out of the admin API for five minutes.
    pub admin_auth_failures_max: u32,
    /// The proxies whose `X-Forwarded-For` is believed (see [`TrustedProxies`]).
    pub trusted_proxies: TrustedProxies,
    /// Timeouts and the maximum of client connections.
    pub connections: ConnectionLimits,
    /// How long an idempotency key stays claimed without word from its request: the request
    /// renews its claim every third of it while it runs, so this is how soon a retry may run
    /// again once the node running the request died (see [`IDEMPOTENCY_LEASE_MS_DEFAULT`]).
    pub idempotency_lease_ms: u64,
    /// How long an idempotency record is kept: after it, the key counts as never seen, and the
    /// sweep purges the record.
    pub idempotency_ttl_ms: u64,
    /// The most seats one user may hold (live holds) or buy per schedule, at start; an admin
    /// call may change it on a node.
    pub seats_per_user_max: u32,
    /// How often each waiting line is moved forward.
    pub admission_tick_ms: u64,
    /// How often expired holds are swept.
    pub sweep_interval_ms: u64,
    /// The most holds one sweep expires.
    pub sweep_batch_max: u32,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            node: "engine-1".into(),
            hold_mode: HoldMode::Atomic,
            allow_unsafe_hold_mode: false,
            lock_ttl_ms: 2_000,
            hold_ttl_ms: 300_000,
            queue_order: QueueOrder::Fifo,
            admission: AdmissionPolicy::default(),
            rate_limits: RateLimits::default(),
            rate_limits_shared: false,
            token_secret: b"tcore-development-secret".to_vec(),
            sessions: SessionConfig::default(),
            payment_webhook_secret: None,
            accounts_per_ip_per_hour: 20,
            admin_tokens: Vec::new(),
            admin_auth_failures_max: crate::api::admin_auth::FAILURES_MAX,
            trusted_proxies: TrustedProxies::default(),
            connections: ConnectionLimits::default(),
            idempotency_lease_ms: IDEMPOTENCY_LEASE_MS_DEFAULT,
            idempotency_ttl_ms: 24 * 3_600 * 1_000,
            seats_per_user_max: 4,
            admission_tick_ms: 100,
            sweep_interval_ms: 1_000,
            sweep_batch_max: 10_000,
        }
    }
}

/// One bearer token of the admin API. The audit log names whoever used it by `name`.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken {
    pub name: String,
    pub secret: String,
}

/// The name a token given without one (`--admin-token SECRET`) goes by.
pub const ADMIN_TOKEN_NAME_DEFAULT: &str = "admin";
/// The longest name of an admin token.
pub const ADMIN_TOKEN_NAME_CHARS_MAX: usize = 64;

impl AdminToken {
    /// Reads `name=secret`, or a bare secret named [`ADMIN_TOKEN_NAME_DEFAULT`]. A name is 1 to
    /// 64 letters, digits, `-`, `_`, `:` or `.`; a secret is not empty.
    pub fn parse(text: &str) -> Result<AdminToken, ConfigError> {
        let (name, secret) = match text.split_once('=') {
            Some((name, secret)) => (name, secret),
            None => (ADMIN_TOKEN_NAME_DEFAULT, text),
        };
        let name_valid = (1..=ADMIN_TOKEN_NAME_CHARS_MAX).contains(&name.len())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | ':' | '.'));
        if !name_valid {
            return Err(ConfigError::AdminTokenName { name: name.to_owned() });
        }
        if secret.is_empty() {
            return Err(ConfigError::AdminTokenEmpty { name: name.to_owned() });
        }
        Ok(AdminToken { name: name.to_owned(), secret: secret.to_owned() })
    }
}

/// Never prints the secret.
impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminToken").field("name", &self.name).field("secret", &"…").finish()
    }
}

/// The proxies (address ranges) whose `X-Forwarded-For` header is believed. A request's
/// client is its connection's peer, unless the peer is a trusted proxy: then it is the
/// rightmost address of `X-Forwarded-For` that is not itself a trusted proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Trusts every address in `ranges` (an [`IpAddr`] is a range of one).
    pub fn new(ranges: impl IntoIterator<Item = impl Into<IpNet>>) -> Self {
        Self(ranges.into_iter().map(|range| range.into().trunc()).collect())
    }

    /// Whether `ip` (in either form, IPv4 or IPv4-mapped IPv6) is a trusted proxy.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|range| range.contains(&ip))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The client of a request from `peer` that carries the `X-Forwarded-For` values
    /// `forwarded` (each a comma-separated list, in header order): see the type's
    /// documentation. An unreadable entry ends the walk at the last trusted address, as does
    /// a list of trusted proxies only; the answer is canonical (IPv4-mapped IPv6 as IPv4).
    pub fn client_ip<'a>(&self, peer: IpAddr, forwarded: impl DoubleEndedIterator<Item = &'a str>) -> IpAddr {
        let mut client = peer.to_canonical();
        if !self.contains(client) {
            return client;
        }
        for value in forwarded.rev() {
            for entry in value.rsplit(',') {
                let Ok(hop) = entry.trim().parse::<IpAddr>() else { return client };
                client = hop.to_canonical();
                if !self.contains(client) {
                    return client;
                }
            }
        }
        client
    }
}

/// Limits on every client connection, so that slow and idle clients cannot hold the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// How long a client may take to send a request's headers once the server waits for
    /// them; an HTTP/1.1 connection idle between requests waits for headers, so it is closed
    /// after this too. With an idle timeout, also how long a new connection may take to start
    /// its first request.
    pub header_read_timeout_ms: u64,
    /// How long a client may take to send a request's whole body; then it is answered 408.
    pub body_read_timeout_ms: u64,
    /// How long a connection may stay open with no request in flight; `None`: no limit (no
    /// HTTP/2 pings, and no limit on the time to a first request).
    pub idle_timeout_ms: Option<u64>,
    /// The most connections open at once; one more is answered 503 and closed.
    pub connections_max: u32,
}

/// Defaults of [`ConnectionLimits`].
pub mod connection_defaults {
    pub const HEADER_READ_TIMEOUT_MS: u64 = 10_000;
    pub const BODY_READ_TIMEOUT_MS: u64 = 10_000;
    pub const IDLE_TIMEOUT_MS: u64 = 60_000;
    pub const CONNECTIONS_MAX: u32 = 10_000;
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_read_timeout_ms: connection_defaults::HEADER_READ_TIMEOUT_MS,
            body_read_timeout_ms: connection_defaults::BODY_READ_TIMEOUT_MS,
            idle_timeout_ms: Some(connection_defaults::IDLE_TIMEOUT_MS),
            connections_max: connection_defaults::CONNECTIONS_MAX,
        }
    }
}

/// A configuration the engine refuses to start with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "hold mode `unfenced-lock` is known to oversell (a lock holder that pauses past the lock TTL \
         overwrites the next holder); it exists only to prove the testbed catches oversells. \
         Start with --allow-unsafe-hold-mode to run it anyway"
    )]
    UnsafeHoldMode,
    #[error("{name} must be in {range} (got {value})")]
    OutOfBounds { name: &'static str, range: String, value: String },
    #[error("the token secret must be at least 16 bytes")]
    WeakTokenSecret,
    #[error("sessions: {reason}")]
    SessionKey { reason: String },
    #[error("the payment webhook secret must be at least 32 bytes")]
    WeakWebhookSecret,
    #[error("admin token name `{name}` must be 1 to 64 letters, digits, `-`, `_`, `:` or `.`")]
    AdminTokenName { name: String },
    #[error("admin token `{name}` has an empty secret")]
    AdminTokenEmpty { name: String },
    #[error("admin token name `{name}` is given twice")]
    AdminTokenTwice { name: String },
    #[error("admin tokens `{first}` and `{second}` share a secret: the audit log could not tell them apart")]
    AdminTokenSecretShared { first: String, second: String },
    #[error("{name} must be at least 1")]
    Zero { name: &'static str },
}

impl EngineConfig {
    /// Checks the configuration before anything starts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.hold_mode.is_unsafe() && !self.allow_unsafe_hold_mode {
            return Err(ConfigError::UnsafeHoldMode);
        }
        if self.token_secret.len() < 16 {
            return Err(ConfigError::WeakTokenSecret);
        }
        crate::sessions::Sessions::new(&self.sessions)?;
        if self.payment_webhook_secret.as_ref().is_some_and(|secret| secret.len() < 32) {
            return Err(ConfigError::WeakWebhookSecret);
        }
        check_bound("accounts per IP per hour", self.accounts_per_ip_per_hour, &bounds::ACCOUNTS_PER_IP_PER_HOUR)?;
        check_bound("hold TTL (s)", self.hold_ttl_ms / 1000, &bounds::HOLD_TTL_S)?;
        check_bound("admission rate (per s)", self.admission.rate_per_s, &bounds::ADMISSION_RATE_PER_S)?;
        check_bound("active max", self.admission.active_max, &bounds::ACTIVE_MAX)?;
        check_bound("rate limit per IP (per s)", self.rate_limits.per_ip_per_s, &bounds::RATE_LIMIT_PER_S)?;
        check_bound("rate limit per token (per s)", self.rate_limits.per_token_per_s, &bounds::RATE_LIMIT_PER_S)?;
        check_bound("rate limit burst", self.rate_limits.burst, &bounds::RATE_LIMIT_BURST)?;
        check_bound("seats per user", self.seats_per_user_max, &bounds::SEATS_PER_USER_MAX)?;
        check_bound("idempotency TTL (s)", self.idempotency_ttl_ms / 1000, &bounds::IDEMPOTENCY_TTL_S)?;
        check_bound("idempotency lease (ms)", self.idempotency_lease_ms, &bounds::IDEMPOTENCY_LEASE_MS)?;
        check_bound("admin authentication failures", self.admin_auth_failures_max, &bounds::ADMIN_AUTH_FAILURES_MAX)?;
        self.check_admin_tokens()?;
        self.check_connections()
    }

    fn check_admin_tokens(&self) -> Result<(), ConfigError> {
        for (index, token) in self.admin_tokens.iter().enumerate() {
            for earlier in &self.admin_tokens[..index] {
                if earlier.name == token.name {
                    return Err(ConfigError::AdminTokenTwice { name: token.name.clone() });
                }
                if earlier.secret == token.secret {
                    let (first, second) = (earlier.name.clone(), token.name.clone());
                    return Err(ConfigError::AdminTokenSecretShared { first, second });
                }
            }
        }
        Ok(())
    }

    fn check_connections(&self) -> Result<(), ConfigError> {
        let limits = &self.connections;
        let positive = [
            ("header read timeout (ms)", limits.header_read_timeout_ms),
            ("body read timeout (ms)", limits.body_read_timeout_ms),
            ("idle timeout (ms)", limits.idle_timeout_ms.unwrap_or(1)),
            ("connections max", u64::from(limits.connections_max)),
        ];
        match positive.into_iter().find(|(_, value)| *value == 0) {
            Some((name, _)) => Err(ConfigError::Zero { name }),
            None => Ok(()),
        }
    }

    /// The settings this node starts with.
    pub fn runtime_settings(&self) -> RuntimeSettings {
        RuntimeSettings {
            hold_ttl_ms: self.hold_ttl_ms,
            rate_limits: self.rate_limits,
            seats_per_user_max: self.seats_per_user_max,
        }
    }
}

/// Refuses `value` outside `range`, naming it.
pub fn check_bound<T: PartialOrd + std::fmt::Display + std::fmt::Debug>(
    name: &'static str,
    value: T,
    range: &std::ops::RangeInclusive<T>,
) -> Result<(), ConfigError> {
    if range.contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::OutOfBounds {
            name,
            range: format!("{}..={}", range.start(), range.end()),
            value: value.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unfenced_lock_is_refused_without_the_unsafe_flag() {
        let config = EngineConfig { hold_mode: HoldMode::UnfencedLock, ..EngineConfig::default() };
        assert_eq!(config.validate(), Err(ConfigError::UnsafeHoldMode));
        let allowed = EngineConfig { allow_unsafe_hold_mode: true, ..config };
        assert_eq!(allowed.validate(), Ok(()));
    }

    #[test]
    fn the_idempotency_lease_is_short_by_default_and_bounded() {
        let config = EngineConfig::default();
        assert_eq!(config.idempotency_lease_ms, 5_000, "a dead node's key is free again within 5 s");
        for lease_ms in [1_000, 30_000] {
            assert_eq!(EngineConfig { idempotency_lease_ms: lease_ms, ..config.clone() }.validate(), Ok(()));
        }
        for lease_ms in [0, 999, 30_001] {
            let refused = EngineConfig { idempotency_lease_ms: lease_ms, ..config.clone() }.validate();
            assert!(
                matches!(refused, Err(ConfigError::OutOfBounds { name: "idempotency lease (ms)", .. })),
                "{lease_ms}"
            );
        }
    }

    /// The client of a request from `peer` with `forwarded` (X-Forwarded-For lines), behind
    /// proxies in `10.0.0.0/8` and `2001:db8::/32`.
    fn check_client(peer: &str, forwarded: &[&str], expected: &str) {
        let proxies =
            TrustedProxies::new(["10.0.0.0/8", "2001:db8::/32"].map(|range| range.parse::<IpNet>().expect("range")));
        let peer: IpAddr = peer.parse().expect("peer");
        let client = proxies.client_ip(peer, forwarded.iter().copied());
        assert_eq!(client.to_string(), expected, "peer {peer}, X-Forwarded-For {forwarded:?}");
    }

    #[test]
    fn forwarded_for_counts_only_from_trusted_proxies_and_from_the_right() {
        // An untrusted peer is the client, whatever it forwards.
        check_client("203.0.113.5", &["198.51.100.1"], "203.0.113.5");
        // A trusted proxy's client is the rightmost address that is not a trusted proxy: what
        // the client wrote further left is not believed.
        check_client("10.0.0.2", &["198.51.100.1, 192.0.2.9"], "192.0.2.9");
        check_client("10.0.0.2", &["198.51.100.1, 10.0.0.3"], "198.51.100.1");
        check_client("10.0.0.2", &["198.51.100.1", "10.9.9.9"], "198.51.100.1");
        // Without a header, or with trusted proxies only, the last trusted address is the client.
        check_client("10.0.0.2", &[], "10.0.0.2");
        check_client("10.0.0.2", &["10.0.0.7, 10.0.0.3"], "10.0.0.7");
        // An unreadable entry ends the walk at the proxy that sent it.
        check_client("10.0.0.2", &["198.51.100.1, bogus, 10.0.0.3"], "10.0.0.3");
        // Both address families, and IPv4-mapped IPv6 as IPv4.
        check_client("2001:db8::1", &["2001:db8::2, 2001:db9::5"], "2001:db9::5");
        check_client("::ffff:10.0.0.2", &["::ffff:192.0.2.9"], "192.0.2.9");
        check_client("::ffff:203.0.113.5", &[], "203.0.113.5");
    }

    #[test]
    fn admin_tokens_are_named_or_named_admin() {
        let named = AdminToken::parse("ops-agent=s3cret=with=equals").expect("valid");
        assert_eq!((named.name.as_str(), named.secret.as_str()), ("ops-agent", "s3cret=with=equals"));
        let bare = AdminToken::parse("s3cret").expect("valid");
        assert_eq!((bare.name.as_str(), bare.secret.as_str()), (ADMIN_TOKEN_NAME_DEFAULT, "s3cret"));
        assert_eq!(AdminToken::parse("=s3cret"), Err(ConfigError::AdminTokenName { name: String::new() }));
        assert_eq!(AdminToken::parse("a b=s3cret"), Err(ConfigError::AdminTokenName { name: "a b".into() }));
        assert_eq!(AdminToken::parse("ops="), Err(ConfigError::AdminTokenEmpty { name: "ops".into() }));
        assert!(!format!("{named:?}").contains("s3cret"), "Debug hides the secret");
    }

    #[test]
    fn admin_tokens_must_differ_in_name_and_in_secret() {
        let tokens = |list: &[&str]| EngineConfig {
            admin_tokens: list.iter().map(|text| AdminToken::parse(text).expect("valid")).collect(),
            ..EngineConfig::default()
        };
        assert_eq!(tokens(&["a=one", "b=two"]).validate(), Ok(()));
        assert_eq!(tokens(&["a=one", "a=two"]).validate(), Err(ConfigError::AdminTokenTwice { name: "a".into() }));
        assert_eq!(
            tokens(&["a=one", "b=one"]).validate(),
            Err(ConfigError::AdminTokenSecretShared { first: "a".into(), second: "b".into() })
        );
    }

    #[test]
    fn out_of_bounds_settings_name_the_setting() {
        let config = EngineConfig { hold_ttl_ms: 5_000, ..EngineConfig::default() };
        let error = config.validate().expect_err("hold TTL of 5 s is below the bound");
        assert_eq!(error.to_string(), "hold TTL (s) must be in 10..=3600 (got 5)");
    }
}
