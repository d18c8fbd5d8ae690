//! The engine's settings: what is fixed at start ([`EngineConfig`]), what admin calls may
//! change at run time ([`RuntimeSettings`]), and the bounds every admin change must respect.

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
    pub per_ip_per_s: u32,
    pub per_token_per_s: u32,
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
    pub const HOLD_TTL_S: RangeInclusive<u64> = 10..=3_600;
    pub const QUEUE_WAIT_S: RangeInclusive<u64> = 0..=30;
    /// Points one top-up may add (admin tool or payment webhook).
    pub const TOP_UP_POINTS: RangeInclusive<u64> = 1..=10_000_000;
    /// Accounts one client address may open per hour.
    pub const ACCOUNTS_PER_IP_PER_HOUR: RangeInclusive<u32> = 1..=100_000;
    pub const SEATS_PER_USER_MAX: RangeInclusive<u32> = 1..=100;
    /// From a minute (longer than a request's lease) to thirty days.
    pub const IDEMPOTENCY_TTL_S: RangeInclusive<u64> = 60..=2_592_000;
}

/// Settings an admin call may change while the engine runs (on this node).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RuntimeSettings {
    pub hold_ttl_ms: u64,
    pub rate_limits: RateLimits,
    /// The most seats one user may hold or buy per schedule.
    pub seats_per_user_max: u32,
}

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
    /// The bearer token of the admin API; without one the admin API is not served.
    pub admin_token: Option<String>,
    /// Take the client address from `X-Forwarded-For` (behind a trusted proxy, or in the simulator).
    pub trust_forwarded_for: bool,
    /// How long an idempotency key stays claimed by a request that never finishes.
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
            admin_token: None,
            trust_forwarded_for: false,
            idempotency_lease_ms: 30_000,
            idempotency_ttl_ms: 24 * 3_600 * 1_000,
            seats_per_user_max: 4,
            admission_tick_ms: 100,
            sweep_interval_ms: 1_000,
            sweep_batch_max: 10_000,
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
        Ok(())
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
    fn out_of_bounds_settings_name_the_setting() {
        let config = EngineConfig { hold_ttl_ms: 5_000, ..EngineConfig::default() };
        let error = config.validate().expect_err("hold TTL of 5 s is below the bound");
        assert_eq!(error.to_string(), "hold TTL (s) must be in 10..=3600 (got 5)");
    }
}
