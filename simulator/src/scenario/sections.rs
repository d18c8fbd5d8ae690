//! The plain sections of a scenario: `[venue]`, `[engine]`, `[network]`, `[users]`,
//! `[[bots]]` and `[agent]`, with their defaults and their checks.
//!
//! The engine's bounds (hold TTL, admission, rate limits) are mirrored here so a scenario the
//! engine would refuse is refused when it is loaded, with its line, rather than at start.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::checks::Checks;
use super::source::KeyPath;

/// The most schedules in a venue.
const SCHEDULES_MAX: usize = 64;
/// The most sections in one schedule.
const SECTIONS_MAX: usize = 256;
/// The most seats in one section.
const SECTION_SEATS_MAX: u64 = 1_000_000;
/// The most seats in the whole venue.
pub(crate) const VENUE_SEATS_MAX: u64 = 10_000_000;
/// The most engine nodes.
const NODES_MAX: u64 = 16;
/// The most bots.
pub(crate) const BOTS_MAX: usize = 64;
/// The most addresses one bot uses.
const BOT_IPS_MAX: usize = 4_000;
/// The most accounts one bot may have.
const BOT_ACCOUNTS_MAX: u32 = 100_000;
/// The highest request rate of one bot.
const BOT_RATE_PER_S_MAX: f64 = 1_000_000.0;
/// The longest latency `[network]` may configure.
const LATENCY_MS_MAX: f64 = 60_000.0;
/// Bounds mirrored from `tcore_engine::config::bounds`.
const HOLD_TTL_S: std::ops::RangeInclusive<u64> = 10..=3_600;
const ADMISSION_RATE_PER_S: std::ops::RangeInclusive<f64> = 0.1..=100_000.0;
const ACTIVE_MAX: u64 = 1_000_000;
const RATE_LIMIT_MAX: u64 = 100_000;

/// `[venue]`: what is on sale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Venue {
    /// `[[venue.schedules]]`: the performances on sale.
    pub schedules: Vec<Schedule>,
}

/// One performance: a concert at a time, with its seats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// The schedule's id in the engine, unique in the venue.
    pub id: u64,
    /// The concert's name.
    pub concert: String,
    /// When sales open, in seconds since the start of the run.
    pub opens_at_s: f64,
    /// `[[venue.schedules.sections]]`: the seats, by section.
    pub sections: Vec<Section>,
}

/// A block of seats at one price.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Section {
    /// The section's name, unique in its schedule.
    pub name: String,
    /// How many seats it has.
    pub seats: u32,
    /// The price of one seat, in points.
    pub price_points: u64,
    /// How much users want this section, relative to the others of the schedule.
    pub popularity: f64,
}

/// `[engine]`: how the engine under test is deployed and configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Engine {
    /// How many engine nodes (`engine-1..engine-N`).
    pub nodes: u32,
    /// The stores behind the engine.
    pub store: StoreKind,
    /// How a seat is taken.
    pub hold_mode: HoldMode,
    /// How the system of record replicates to its standby.
    pub record_replication: RecordReplication,
    /// How long a hold lasts before it expires unpaid.
    pub hold_ttl_s: u64,
    /// The TTL of a seat lock (lock hold modes only).
    pub lock_ttl_ms: u64,
    /// The most seats one user may hold or buy per schedule.
    pub seats_per_user_max: u32,
    /// The waiting room's admission policy.
    pub admission: Admission,
    /// Request rate limits; absent, the engine's defaults.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limits: Option<RateLimits>,
}

impl Default for Engine {
    fn default() -> Self {
        Self {
            nodes: 3,
            store: StoreKind::Memory,
            hold_mode: HoldMode::Atomic,
            record_replication: RecordReplication::SemiSync,
            hold_ttl_s: 300,
            lock_ttl_ms: 2_000,
            seats_per_user_max: 4,
            admission: Admission::default(),
            rate_limits: None,
        }
    }
}

/// The stores behind the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum StoreKind {
    /// The embedded state machine; the only store a simulated run uses.
    #[default]
    #[serde(rename = "memory")]
    Memory,
    /// Redis for the cache and MariaDB for the record: live runs only.
    #[serde(rename = "redis+mariadb")]
    RedisMariadb,
}

/// How the simulated system of record (`store-record`) replicates to its standby, so what a
/// `store-failover` of it can take back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RecordReplication {
    /// A write is acknowledged once a standby holds it (a round trip to the standby): a
    /// failover loses nothing acknowledged.
    #[default]
    SemiSync,
    /// **Known unsafe.** A write is acknowledged once the primary has it; the standby trails,
    /// and a failover loses what it had not received, acknowledged confirmations included.
    Async,
}

impl RecordReplication {
    /// Whether a failover can lose a confirmation a client was told of.
    pub fn is_unsafe(self) -> bool {
        self == Self::Async
    }

    /// The mode's name as written in scenarios and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::SemiSync => "semi-sync",
            Self::Async => "async",
        }
    }
}

/// How a seat is taken: the engine's own safety modes (`atomic`, `fenced-lock`, and the
/// known-unsafe `unfenced-lock`).
pub use tcore_engine::config::HoldMode;

/// `[engine.admission]`: how fast and how far the waiting line moves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Admission {
    /// Users admitted per second.
    pub rate_per_s: f64,
    /// The most admitted users at once.
    pub active_max: u32,
    /// In which order waiting users are admitted.
    pub order: AdmissionOrder,
    /// How long an admitted token stays valid.
    pub admitted_ttl_s: u64,
}

impl Default for Admission {
    fn default() -> Self {
        Self { rate_per_s: 200.0, active_max: 2_000, order: AdmissionOrder::Fifo, admitted_ttl_s: 600 }
    }
}

/// In which order the waiting room admits: the engine's own orders (`fifo`, and
/// `random-at-open`, which shuffles those who queued before the opening).
pub use tcore_engine::domain::QueueOrder as AdmissionOrder;

/// `[engine.rate_limits]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimits {
    /// Requests per second from one IP address.
    pub per_ip_per_s: u32,
    /// Requests per second with one queue token.
    pub per_token_per_s: u32,
    /// How many requests above the rate a burst may take.
    pub burst: u32,
}

/// `[network]`: the latencies of the simulated network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Network {
    /// One-way latency between clients and engine nodes.
    pub latency_ms: RangeMs,
    /// One-way latency between engine nodes and stores.
    pub store_latency_ms: RangeMs,
    /// Probability that a message between a client and an engine node is lost.
    pub fail_rate: f64,
    /// The simulation's step: messages are delivered and timers fire on whole ticks, so it is
    /// the resolution of every simulated time.
    pub tick_ms: u64,
}

impl Default for Network {
    fn default() -> Self {
        Self {
            latency_ms: RangeMs { min: 1.0, max: 5.0 },
            store_latency_ms: RangeMs { min: 0.2, max: 1.0 },
            fail_rate: 0.0,
            tick_ms: 1,
        }
    }
}

/// A range of milliseconds, `{ min = 1, max = 5 }`; each draw is uniform in it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RangeMs {
    /// The smallest value.
    pub min: f64,
    /// The largest value.
    pub max: f64,
}

impl RangeMs {
    fn check(self, checks: &mut Checks, path: &KeyPath, min_allowed: f64, max_allowed: f64) {
        checks.in_range_f64(path.key("min"), self.min, min_allowed..=max_allowed);
        if self.max.is_finite() && self.min.is_finite() && self.max < self.min {
            checks.fail(path.key("max"), format!("must be >= min = {} (got {})", self.min, self.max));
        } else {
            checks.in_range_f64(path.key("max"), self.max, min_allowed..=max_allowed);
        }
    }
}

/// `[users]`: how the simulated users behave.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Users {
    /// How long a user waits (in the queue, or retrying) before giving up.
    pub patience_s: f64,
    /// The pause between queue polls, drawn in this range each time (jittered backoff).
    pub poll_interval_ms: RangeMs,
    /// How long a user waits for one answer before retrying with the same idempotency key.
    pub request_timeout_ms: u64,
    /// How many retries of one request, after the first attempt.
    pub retries_max: u32,
    /// Each user's starting point balance.
    pub points: u64,
    /// How many seats each user tries to buy.
    pub seats_per_user: u32,
    /// Probability that a user cancels a confirmed reservation.
    pub cancel_probability: f64,
    /// How a user picks seats.
    pub seat_choice: SeatChoice,
}

impl Default for Users {
    fn default() -> Self {
        Self {
            patience_s: 900.0,
            poll_interval_ms: RangeMs { min: 1_000.0, max: 3_000.0 },
            request_timeout_ms: 5_000,
            retries_max: 3,
            points: 1_000_000,
            seats_per_user: 1,
            cancel_probability: 0.0,
            seat_choice: SeatChoice::PopularSection,
        }
    }
}

/// How a user picks seats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SeatChoice {
    /// A section drawn by popularity, then a random available seat in it.
    #[default]
    PopularSection,
    /// Any available seat.
    Random,
    /// The most expensive available seat (the best section first).
    BestAvailable,
}

/// `[[bots]]`: a client that hammers the API from a few addresses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bot {
    /// The bot's name, unique in the scenario.
    pub name: String,
    /// Its addresses: how many, or which.
    pub ips: BotIps,
    /// Requests per second, across all its addresses.
    pub rate_per_s: f64,
    /// When it starts, in seconds since the start of the run.
    pub start_s: f64,
    /// When it stops.
    pub end_s: f64,
    /// The calls it makes, in turn.
    pub targets: Vec<BotTarget>,
    /// Accounts of its own (a scalper's farm of real accounts), whose sessions it takes turns
    /// with; 0, the default: it has no session, and every call that needs one refuses it.
    #[serde(default)]
    pub accounts: u32,
}

/// A bot's addresses: a count (`ips = 8`) or a list (`ips = ["198.51.100.7"]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BotIps {
    /// This many addresses, drawn from 100.64.0.0/10 (see [`Bot::addresses`]).
    Count(u32),
    /// These addresses.
    List(Vec<IpAddr>),
}

/// A call a bot makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BotTarget {
    /// `POST /v1/schedules/{id}/queue`.
    QueueJoin,
    /// `GET /v1/schedules/{id}/seats`.
    SeatMap,
    /// `GET /v1/queue/{token}`.
    QueueStatus,
}

impl Bot {
    /// The bot's addresses. A count gives each bot its own block of the shared address space
    /// 100.64.0.0/10, by the bot's position in `[[bots]]`, so addresses never collide.
    pub fn addresses(&self, bot_index: usize) -> Vec<IpAddr> {
        match &self.ips {
            BotIps::List(addresses) => addresses.clone(),
            BotIps::Count(count) => {
                let block = u32::from(Ipv4Addr::new(100, 64, 0, 0)) + (bot_index as u32) * 4_096;
                (1..=*count).map(|host| IpAddr::V4(Ipv4Addr::from(block + host))).collect()
            }
        }
    }

    fn check(&self, checks: &mut Checks, path: &KeyPath, duration_s: f64) {
        checks.not_blank(path.key("name"), &self.name);
        checks.in_range(path.key("accounts"), self.accounts, 0..=BOT_ACCOUNTS_MAX);
        match &self.ips {
            BotIps::Count(count) => checks.count(path.key("ips"), u64::from(*count), BOT_IPS_MAX as u64),
            BotIps::List(addresses) => {
                checks.list_length(path.key("ips"), addresses.len(), BOT_IPS_MAX);
                let unique: BTreeSet<&IpAddr> = addresses.iter().collect();
                if unique.len() != addresses.len() {
                    checks.fail(path.key("ips"), "lists an address twice");
                }
            }
        }
        if self.rate_per_s > BOT_RATE_PER_S_MAX {
            checks.fail(
                path.key("rate_per_s"),
                format!("must be at most {BOT_RATE_PER_S_MAX} (got {})", self.rate_per_s),
            );
        } else {
            checks.positive(path.key("rate_per_s"), self.rate_per_s);
        }
        checks.window_in_run(
            (path.key("start_s"), self.start_s),
            (path.key("end_s"), self.end_s),
            "start_s",
            duration_s,
        );
        checks.list_length(path.key("targets"), self.targets.len(), 16);
    }
}

impl Serialize for BotIps {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            BotIps::Count(count) => serializer.serialize_u32(*count),
            BotIps::List(addresses) => addresses.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for BotIps {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BotIpsVisitor;

        impl<'de> Visitor<'de> for BotIpsVisitor {
            type Value = BotIps;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of addresses, or a list of IP addresses")
            }

            fn visit_i64<E: de::Error>(self, count: i64) -> Result<BotIps, E> {
                u32::try_from(count)
                    .map(BotIps::Count)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(count), &"a count of addresses"))
            }

            fn visit_u64<E: de::Error>(self, count: u64) -> Result<BotIps, E> {
                u32::try_from(count)
                    .map(BotIps::Count)
                    .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(count), &"a count of addresses"))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<BotIps, A::Error> {
                let mut addresses = Vec::new();
                while let Some(address) = seq.next_element::<IpAddr>()? {
                    addresses.push(address);
                }
                Ok(BotIps::List(addresses))
            }
        }

        deserializer.deserialize_any(BotIpsVisitor)
    }
}

/// `[agent]`: the ops agent that watches and tunes the engine during the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Agent {
    /// How it decides.
    pub policy: AgentPolicy,
    /// How often it reads a snapshot and decides.
    pub interval_s: f64,
    /// The recorded LLM answers: replayed by `replay`, recorded into by `llm`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cassette: Option<String>,
    /// `rules`: the p99 latency (ms) above which the cluster counts as overloaded; also the
    /// bound the score's time to mitigate waits for.
    pub latency_p99_ms_max: f64,
    /// `rules`: the server error rate above which the cluster counts as overloaded.
    pub error_rate_max: f64,
    /// `llm`: the OpenAI-compatible endpoint.
    pub base_url: String,
    /// `llm`: the model.
    pub model: String,
    /// `llm`: the environment variable holding the API key.
    pub api_key_env: String,
    /// `llm`: how long one answer may take, in wall seconds (simulated time stands still).
    pub timeout_s: f64,
}

impl Default for Agent {
    fn default() -> Self {
        Self {
            policy: AgentPolicy::None,
            interval_s: 5.0,
            cassette: None,
            latency_p99_ms_max: 500.0,
            error_rate_max: 0.05,
            base_url: "https://api.openai.com/v1".into(),
            model: "gpt-4o-mini".into(),
            api_key_env: "OPENAI_API_KEY".into(),
            timeout_s: 20.0,
        }
    }
}

/// How the ops agent decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AgentPolicy {
    /// No agent: the run's baseline.
    #[default]
    None,
    /// Deterministic thresholds with hysteresis.
    Rules,
    /// A language model behind an OpenAI-compatible endpoint.
    Llm,
    /// A recorded cassette of language-model answers, replayed exactly.
    Replay,
}

impl AgentPolicy {
    /// The policy's name, as in scenarios and run results.
    pub fn name(self) -> &'static str {
        match self {
            AgentPolicy::None => "none",
            AgentPolicy::Rules => "rules",
            AgentPolicy::Llm => "llm",
            AgentPolicy::Replay => "replay",
        }
    }
}

impl Venue {
    /// All seats of all schedules.
    pub fn seats_total(&self) -> u64 {
        self.schedules.iter().flat_map(|schedule| &schedule.sections).map(|section| u64::from(section.seats)).sum()
    }

    pub(crate) fn check(&self, checks: &mut Checks, path: &KeyPath, duration_s: f64) {
        let schedules_path = path.key("schedules");
        checks.list_length(schedules_path.clone(), self.schedules.len(), SCHEDULES_MAX);
        let mut first_with_id: BTreeMap<u64, usize> = BTreeMap::new();
        for (index, schedule) in self.schedules.iter().enumerate() {
            let path = schedules_path.index(index);
            if let Some(first) = first_with_id.insert(schedule.id, index) {
                checks.fail(
                    path.key("id"),
                    format!("duplicate schedule id {} (also venue.schedules[{first}])", schedule.id),
                );
            }
            checks.not_blank(path.key("concert"), &schedule.concert);
            checks.time_in_run(path.key("opens_at_s"), schedule.opens_at_s, duration_s);
            schedule.check_sections(checks, &path);
        }
        let seats_total = self.seats_total();
        if seats_total > VENUE_SEATS_MAX {
            checks.fail(schedules_path, format!("the venue has {seats_total} seats; at most {VENUE_SEATS_MAX}"));
        }
    }
}

impl Schedule {
    fn check_sections(&self, checks: &mut Checks, path: &KeyPath) {
        let sections_path = path.key("sections");
        checks.list_length(sections_path.clone(), self.sections.len(), SECTIONS_MAX);
        let mut names = BTreeSet::new();
        for (index, section) in self.sections.iter().enumerate() {
            let path = sections_path.index(index);
            checks.not_blank(path.key("name"), &section.name);
            if !names.insert(section.name.as_str()) {
                checks.fail(path.key("name"), format!("duplicate section name {:?} in this schedule", section.name));
            }
            checks.count(path.key("seats"), u64::from(section.seats), SECTION_SEATS_MAX);
            checks.count(path.key("price_points"), section.price_points, u64::MAX);
            checks.positive(path.key("popularity"), section.popularity);
        }
    }
}

impl Engine {
    pub(crate) fn check(&self, checks: &mut Checks, path: &KeyPath) {
        checks.count(path.key("nodes"), u64::from(self.nodes), NODES_MAX);
        checks.in_range(path.key("hold_ttl_s"), self.hold_ttl_s, HOLD_TTL_S);
        checks.count(path.key("lock_ttl_ms"), self.lock_ttl_ms, 600_000);
        let seats_per_user_max = tcore_engine::config::bounds::SEATS_PER_USER_MAX;
        checks.in_range(path.key("seats_per_user_max"), self.seats_per_user_max, seats_per_user_max);
        let admission = path.key("admission");
        checks.in_range_f64(admission.key("rate_per_s"), self.admission.rate_per_s, ADMISSION_RATE_PER_S);
        checks.count(admission.key("active_max"), u64::from(self.admission.active_max), ACTIVE_MAX);
        checks.count(admission.key("admitted_ttl_s"), self.admission.admitted_ttl_s, 86_400);
        if let Some(limits) = &self.rate_limits {
            let path = path.key("rate_limits");
            checks.count(path.key("per_ip_per_s"), u64::from(limits.per_ip_per_s), RATE_LIMIT_MAX);
            checks.count(path.key("per_token_per_s"), u64::from(limits.per_token_per_s), RATE_LIMIT_MAX);
            checks.count(path.key("burst"), u64::from(limits.burst), RATE_LIMIT_MAX);
        }
    }
}

/// The longest simulation step a scenario may ask for.
const TICK_MS_MAX: u64 = 10;

impl Network {
    pub(crate) fn check(&self, checks: &mut Checks, path: &KeyPath) {
        self.latency_ms.check(checks, &path.key("latency_ms"), 0.0, LATENCY_MS_MAX);
        self.store_latency_ms.check(checks, &path.key("store_latency_ms"), 0.0, LATENCY_MS_MAX);
        if !(self.fail_rate.is_finite() && (0.0..1.0).contains(&self.fail_rate)) {
            checks.fail(path.key("fail_rate"), format!("must be in 0..1, 1 excluded (got {})", self.fail_rate));
        }
        checks.in_range(path.key("tick_ms"), self.tick_ms, 1..=TICK_MS_MAX);
    }
}

impl Users {
    pub(crate) fn check(&self, checks: &mut Checks, path: &KeyPath) {
        checks.in_range_f64(path.key("patience_s"), self.patience_s, 0.001..=86_400.0);
        self.poll_interval_ms.check(checks, &path.key("poll_interval_ms"), 1.0, 600_000.0);
        checks.count(path.key("request_timeout_ms"), self.request_timeout_ms, 600_000);
        checks.in_range(path.key("retries_max"), self.retries_max, 0..=100);
        checks.count(path.key("seats_per_user"), u64::from(self.seats_per_user), 10);
        checks.in_range_f64(path.key("cancel_probability"), self.cancel_probability, 0.0..=1.0);
        // An account's starting balance is recorded as one top-up, which the engine bounds.
        checks.in_range(path.key("points"), self.points, 0..=tcore_engine::domain::CHARGE_POINTS_MAX);
    }
}

impl Agent {
    pub(crate) fn check(&self, checks: &mut Checks, path: &KeyPath) {
        checks.in_range_f64(path.key("interval_s"), self.interval_s, 0.1..=3_600.0);
        checks.in_range_f64(path.key("latency_p99_ms_max"), self.latency_p99_ms_max, 1.0..=600_000.0);
        checks.in_range_f64(path.key("error_rate_max"), self.error_rate_max, 0.0001..=1.0);
        checks.in_range_f64(path.key("timeout_s"), self.timeout_s, 0.1..=600.0);
        checks.not_blank(path.key("base_url"), &self.base_url);
        checks.not_blank(path.key("model"), &self.model);
        checks.not_blank(path.key("api_key_env"), &self.api_key_env);
        match (self.policy, &self.cassette) {
            (AgentPolicy::Replay, None) => {
                checks.fail(path.key("policy"), "the replay policy needs a `cassette` to replay");
            }
            (AgentPolicy::None | AgentPolicy::Rules, Some(_)) => {
                checks.fail(path.key("cassette"), "only the llm and replay policies use a cassette");
            }
            (_, Some(cassette)) => checks.not_blank(path.key("cassette"), cassette),
            _ => {}
        }
    }
}

pub(crate) fn check_bots(bots: &[Bot], checks: &mut Checks, duration_s: f64) {
    let path = KeyPath::root().key("bots");
    if bots.len() > BOTS_MAX {
        checks.fail(path.clone(), format!("must have at most {BOTS_MAX} entries (got {})", bots.len()));
    }
    let mut names = BTreeSet::new();
    for (index, bot) in bots.iter().enumerate() {
        let path = path.index(index);
        bot.check(checks, &path, duration_s);
        if !names.insert(bot.name.as_str()) {
            checks.fail(path.key("name"), format!("duplicate bot name {:?}", bot.name));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bots_given_a_count_get_disjoint_address_blocks() {
        let bot = Bot {
            name: "b".into(),
            ips: BotIps::Count(3),
            rate_per_s: 10.0,
            start_s: 0.0,
            end_s: 1.0,
            targets: vec![BotTarget::SeatMap],
            accounts: 0,
        };
        let first: Vec<String> = bot.addresses(0).iter().map(ToString::to_string).collect();
        assert_eq!(first, ["100.64.0.1", "100.64.0.2", "100.64.0.3"]);
        let second: Vec<String> = bot.addresses(1).iter().map(ToString::to_string).collect();
        assert_eq!(second, ["100.64.16.1", "100.64.16.2", "100.64.16.3"]);
    }

    #[test]
    fn defaults_match_the_engine_defaults() {
        let engine = Engine::default();
        assert_eq!((engine.hold_ttl_s, engine.lock_ttl_ms), (300, 2_000));
        assert_eq!(engine.seats_per_user_max, tcore_engine::config::EngineConfig::default().seats_per_user_max);
        assert_eq!((engine.admission.rate_per_s, engine.admission.active_max), (200.0, 2_000));
        let mut checks = Checks::default();
        engine.check(&mut checks, &KeyPath::root().key("engine"));
        Users::default().check(&mut checks, &KeyPath::root().key("users"));
        Network::default().check(&mut checks, &KeyPath::root().key("network"));
        Agent::default().check(&mut checks, &KeyPath::root().key("agent"));
        assert_eq!(checks.into_problems(), []);
    }

    #[test]
    fn a_range_whose_max_is_below_its_min_is_reported_at_max() {
        let mut checks = Checks::default();
        RangeMs { min: 5.0, max: 2.0 }.check(&mut checks, &KeyPath::root().key("latency_ms"), 0.0, 100.0);
        let problems = checks.into_problems();
        assert_eq!(problems.len(), 1);
        assert_eq!(
            format!("{}: {}", problems[0].path, problems[0].message),
            "latency_ms.max: must be >= min = 5 (got 2)"
        );
    }
}
