//! The fault timeline (`[[faults]]`), tagged by `kind`, and the host names faults aim at.

use std::fmt;

use rand::RngExt;
use rand::rngs::Xoshiro256PlusPlus;
use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::checks::Checks;
use super::source::{KeyPath, Segment, deserialize_variant, tag_of};

/// The host that runs the cache store (waiting room, holds, locks, rate limits).
pub const STORE_CACHE_HOST: &str = "store-cache";
/// The host that runs the system of record (reservations, payments, ledger, outbox).
pub const STORE_RECORD_HOST: &str = "store-record";
/// The host that runs the ops agent.
pub const AGENT_HOST: &str = "agent";

/// The named fault points of the engine, as written in `pause-at` faults. Mirrors
/// `tcore_engine::faults::FaultPoint::ALL`; a point the engine does not know would never fire,
/// so an unknown name is an error rather than a silent no-op.
pub const FAULT_POINTS: [&str; 3] = ["hold.after_lock", "hold.after_check", "confirm.before_commit"];

/// The most faults in one scenario.
pub(crate) const FAULTS_MAX: usize = 256;
/// The most times one `pause-at` or `on-event` fault fires.
const FAULT_TIMES_MAX: u32 = 10_000;
/// The longest pause, latency or store slowdown a fault may inject: ten minutes.
const FAULT_MS_MAX: u64 = 600_000;
/// The largest clock skew: one hour either way.
const SKEW_MS_MAX: i64 = 3_600_000;

/// The name of engine node `index` (1-based): `engine-1`, `engine-2`, ...
pub fn engine_host(index: u32) -> String {
    format!("engine-{index}")
}

/// The name of client host `index` (1-based): `client-1`, `client-2`, ...
pub fn client_host(index: u32) -> String {
    format!("client-{index}")
}

/// The hosts of a scenario with `engines` engine nodes and `clients` client hosts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HostNames {
    pub(crate) engines: u32,
    pub(crate) clients: u32,
}

impl HostNames {
    /// Every host, in a fixed order: engines, stores, clients, agent.
    pub(crate) fn all(self) -> Vec<String> {
        let mut hosts: Vec<String> = (1..=self.engines).map(engine_host).collect();
        hosts.push(STORE_CACHE_HOST.to_owned());
        hosts.push(STORE_RECORD_HOST.to_owned());
        hosts.extend((1..=self.clients).map(client_host));
        hosts.push(AGENT_HOST.to_owned());
        hosts
    }

    fn is_engine(self, host: &str) -> bool {
        numbered(host, "engine-", self.engines)
    }

    fn is_store(host: &str) -> bool {
        host == STORE_CACHE_HOST || host == STORE_RECORD_HOST
    }

    fn exists(self, host: &str) -> bool {
        self.is_engine(host) || Self::is_store(host) || numbered(host, "client-", self.clients) || host == AGENT_HOST
    }

    fn describe(self) -> String {
        format!(
            "engine-1..engine-{}, {STORE_CACHE_HOST}, {STORE_RECORD_HOST}, client-1..client-{}, {AGENT_HOST}",
            self.engines, self.clients
        )
    }
}

/// Whether `host` is `prefix` followed by a number in `1..=count` (without leading zeros).
fn numbered(host: &str, prefix: &str, count: u32) -> bool {
    host.strip_prefix(prefix)
        .filter(|number| !number.starts_with('0'))
        .and_then(|number| number.parse::<u32>().ok())
        .is_some_and(|number| (1..=count).contains(&number))
}

/// One or more hosts: a name (`engine-1`), a prefix pattern ending in `*` (`client-*`), or a
/// list of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSet(Vec<String>);

impl HostSet {
    /// A set of the given names or patterns.
    pub fn new(patterns: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self(patterns.into_iter().map(Into::into).collect())
    }

    /// The names and patterns as written.
    pub fn patterns(&self) -> &[String] {
        &self.0
    }

    /// Whether `host` is in the set.
    pub fn contains(&self, host: &str) -> bool {
        self.0.iter().any(|pattern| pattern_matches(pattern, host))
    }

    /// The hosts of `hosts` that are in the set, in the order of `hosts`.
    pub fn resolve(&self, hosts: &[String]) -> Vec<String> {
        hosts.iter().filter(|host| self.contains(host)).cloned().collect()
    }
}

fn pattern_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => host.starts_with(prefix),
        None => pattern == host,
    }
}

impl Serialize for HostSet {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [single] => serializer.serialize_str(single),
            many => many.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for HostSet {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct HostSetVisitor;

        impl<'de> Visitor<'de> for HostSetVisitor {
            type Value = HostSet;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a host name, a pattern such as \"client-*\", or a list of them")
            }

            fn visit_str<E: de::Error>(self, value: &str) -> Result<HostSet, E> {
                Ok(HostSet(vec![value.to_owned()]))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<HostSet, A::Error> {
                let mut hosts = Vec::new();
                while let Some(host) = seq.next_element::<String>()? {
                    hosts.push(host);
                }
                Ok(HostSet(hosts))
            }
        }

        deserializer.deserialize_any(HostSetVisitor)
    }
}

/// One entry of the fault timeline, tagged by `kind`. Times are seconds since the start of the
/// run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Fault {
    /// Messages between `a` and `b` are dropped until the partition heals.
    Partition(Partition),
    /// Messages between `a` and `b` are held, then delivered at once when released.
    HoldLink(HoldLink),
    /// Messages between `a` and `b` take `latency_ms` for a while.
    Latency(LatencySpike),
    /// A host stops and, optionally, restarts: an engine node without its memory, a store host
    /// with its data unless it loses it (`lose_data`).
    Crash(Crash),
    /// A whole host stops for `pause_ms` and then goes on where it was (SIGSTOP and SIGCONT
    /// of a process in a live run).
    Pause(Pause),
    /// An engine node pauses when it reaches a named fault point.
    PauseAt(PauseAt),
    /// An engine node pauses when a domain event happens (a lock about to expire).
    OnEvent(OnEvent),
    /// A node's clock jumps by `skew_ms`.
    ClockSkew(ClockSkew),
    /// A store fails over to its replica, losing its last unreplicated writes.
    StoreFailover(StoreFailover),
    /// A store answers `extra_ms` slower for a while.
    SlowStore(SlowStore),
}

/// `kind = "partition"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partition {
    /// When the partition starts.
    pub at_s: f64,
    /// When it heals.
    pub heal_at_s: f64,
    /// One side.
    pub a: HostSet,
    /// The other side.
    pub b: HostSet,
    /// Only messages from `a` to `b` are dropped; `b` still reaches `a`.
    #[serde(default)]
    pub one_way: bool,
}

/// `kind = "hold-link"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoldLink {
    /// When messages start being held.
    pub at_s: f64,
    /// When the held messages are released.
    pub release_at_s: f64,
    /// One side.
    pub a: HostSet,
    /// The other side.
    pub b: HostSet,
}

/// `kind = "latency"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencySpike {
    /// When the spike starts.
    pub at_s: f64,
    /// When latency returns to `[network]`'s.
    pub until_s: f64,
    /// One side.
    pub a: HostSet,
    /// The other side.
    pub b: HostSet,
    /// The one-way latency of every message between `a` and `b` meanwhile.
    pub latency_ms: f64,
}

/// `kind = "crash"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Crash {
    /// When the host crashes.
    pub at_s: f64,
    /// When it restarts; absent, it stays down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_at_s: Option<f64>,
    /// An engine node or a store host.
    pub host: String,
    /// The host restarts empty. Only for the cache store (`store-cache`): its waiting lines,
    /// admissions and locks are soft state the engine rebuilds from the system of record. An
    /// engine node keeps nothing anyway, and the system of record keeps its data on disk and
    /// its replica (`store-failover` is how it loses its last writes).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lose_data: bool,
}

/// `kind = "pause"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pause {
    /// When the host stops.
    pub at_s: f64,
    /// An engine node or a store host.
    pub host: String,
    /// How long it stays stopped.
    pub pause_ms: u64,
}

impl Pause {
    /// When the host goes on again, in seconds since the start of the run.
    pub fn resume_at_s(&self) -> f64 {
        self.at_s + self.pause_ms as f64 / 1000.0
    }
}

/// `kind = "pause-at"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PauseAt {
    /// The fault point, one of [`FAULT_POINTS`].
    pub point: String,
    /// The engine node that pauses.
    pub host: String,
    /// The fault is armed from this time on.
    #[serde(default)]
    pub at_s: f64,
    /// How long each pause lasts.
    pub pause_ms: u64,
    /// How many hits of the point pause, after which the fault is spent.
    #[serde(default = "one")]
    pub times: u32,
}

/// `kind = "on-event"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnEvent {
    /// The event that triggers the action.
    pub event: FaultEvent,
    /// The event's threshold.
    pub threshold_ms: u64,
    /// What happens when the event fires.
    pub action: PauseAction,
    /// The engine node watched.
    pub host: String,
    /// The fault is armed from this time on.
    #[serde(default)]
    pub at_s: f64,
    /// How many events trigger the action, after which the fault is spent.
    #[serde(default = "one")]
    pub times: u32,
}

/// An engine event an `on-event` fault reacts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultEvent {
    /// The node holds a lock whose remaining TTL is below `threshold_ms` when it reaches a
    /// fault point.
    LockTtlBelow,
}

/// The action of an `on-event` fault: pause the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PauseAction {
    /// How long the node pauses.
    pub pause_ms: u64,
}

/// `kind = "clock-skew"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClockSkew {
    /// The engine node whose clock is skewed.
    pub host: String,
    /// When the clock jumps.
    pub at_s: f64,
    /// By how much: positive runs ahead, negative behind.
    pub skew_ms: i64,
}

/// `kind = "store-failover"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreFailover {
    /// When the store fails over.
    pub at_s: f64,
    /// `store-cache` or `store-record`.
    pub host: String,
    /// Writes acknowledged within this many milliseconds before the failover are lost.
    pub lose_last_ms: u64,
}

/// `kind = "slow-store"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlowStore {
    /// When the store slows down.
    pub at_s: f64,
    /// When it recovers.
    pub until_s: f64,
    /// `store-cache` or `store-record`.
    pub host: String,
    /// Added to every answer meanwhile.
    pub extra_ms: u64,
}

fn one() -> u32 {
    1
}

impl Fault {
    /// The fault's `kind` as written in scenario files.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Partition(_) => "partition",
            Fault::HoldLink(_) => "hold-link",
            Fault::Latency(_) => "latency",
            Fault::Crash(_) => "crash",
            Fault::Pause(_) => "pause",
            Fault::PauseAt(_) => "pause-at",
            Fault::OnEvent(_) => "on-event",
            Fault::ClockSkew(_) => "clock-skew",
            Fault::StoreFailover(_) => "store-failover",
            Fault::SlowStore(_) => "slow-store",
        }
    }

    /// When the fault starts (or is armed), in seconds since the start of the run.
    pub fn starts_at_s(&self) -> f64 {
        match self {
            Fault::Partition(Partition { at_s, .. })
            | Fault::HoldLink(HoldLink { at_s, .. })
            | Fault::Latency(LatencySpike { at_s, .. })
            | Fault::Crash(Crash { at_s, .. })
            | Fault::Pause(Pause { at_s, .. })
            | Fault::PauseAt(PauseAt { at_s, .. })
            | Fault::OnEvent(OnEvent { at_s, .. })
            | Fault::ClockSkew(ClockSkew { at_s, .. })
            | Fault::StoreFailover(StoreFailover { at_s, .. })
            | Fault::SlowStore(SlowStore { at_s, .. }) => *at_s,
        }
    }

    /// When the fault is repaired, for faults that last a window: a partition heals, a link is
    /// released, a crashed host restarts, a spike or slowdown ends.
    pub fn ends_at_s(&self) -> Option<f64> {
        match self {
            Fault::Partition(partition) => Some(partition.heal_at_s),
            Fault::HoldLink(hold) => Some(hold.release_at_s),
            Fault::Latency(latency) => Some(latency.until_s),
            Fault::Crash(crash) => crash.restart_at_s,
            Fault::Pause(pause) => Some(pause.resume_at_s()),
            Fault::SlowStore(slow) => Some(slow.until_s),
            Fault::PauseAt(_) | Fault::OnEvent(_) | Fault::ClockSkew(_) | Fault::StoreFailover(_) => None,
        }
    }

    /// Checks the fault at `path`: times within the run, ends after starts, hosts that exist
    /// and can take this kind of fault.
    pub(crate) fn check(&self, checks: &mut Checks, path: &KeyPath, hosts: HostNames, duration_s: f64) {
        let at = (path.key("at_s"), self.starts_at_s());
        match self {
            Fault::Partition(partition) => {
                checks.window_in_run(at, (path.key("heal_at_s"), partition.heal_at_s), "at_s", duration_s);
                check_sides(checks, path, &partition.a, &partition.b, hosts);
            }
            Fault::HoldLink(hold) => {
                checks.window_in_run(at, (path.key("release_at_s"), hold.release_at_s), "at_s", duration_s);
                check_sides(checks, path, &hold.a, &hold.b, hosts);
            }
            Fault::Latency(latency) => {
                checks.window_in_run(at, (path.key("until_s"), latency.until_s), "at_s", duration_s);
                check_sides(checks, path, &latency.a, &latency.b, hosts);
                checks.in_range_f64(path.key("latency_ms"), latency.latency_ms, 0.0..=FAULT_MS_MAX as f64);
            }
            Fault::Crash(crash) => {
                match crash.restart_at_s {
                    Some(restart_at_s) => {
                        checks.window_in_run(at, (path.key("restart_at_s"), restart_at_s), "at_s", duration_s);
                    }
                    None => checks.time_in_run(at.0, at.1, duration_s),
                }
                check_host(checks, path, &crash.host, hosts, HostKind::EngineOrStore);
                if crash.lose_data && crash.host != STORE_CACHE_HOST {
                    checks.fail(
                        path.key("lose_data"),
                        format!(
                            "only {STORE_CACHE_HOST} can lose its data (got `{}`): an engine node always \
                             restarts empty, and {STORE_RECORD_HOST} is the system of record, which keeps its \
                             data; to lose its last writes, use kind = \"store-failover\"",
                            crash.host
                        ),
                    );
                }
            }
            Fault::Pause(pause) => {
                checks.time_in_run(at.0, at.1, duration_s);
                if pause.resume_at_s() > duration_s {
                    checks.fail(
                        path.key("pause_ms"),
                        format!(
                            "the pause would end at {} s, after the run ends ({duration_s} s)",
                            pause.resume_at_s()
                        ),
                    );
                }
                check_host(checks, path, &pause.host, hosts, HostKind::EngineOrStore);
                checks.in_range(path.key("pause_ms"), pause.pause_ms, 1..=FAULT_MS_MAX);
            }
            Fault::PauseAt(pause) => {
                checks.time_in_run(at.0, at.1, duration_s);
                if !FAULT_POINTS.contains(&pause.point.as_str()) {
                    checks.fail(
                        path.key("point"),
                        format!("unknown fault point `{}` (known: {})", pause.point, FAULT_POINTS.join(", ")),
                    );
                }
                check_host(checks, path, &pause.host, hosts, HostKind::Engine);
                checks.in_range(path.key("pause_ms"), pause.pause_ms, 1..=FAULT_MS_MAX);
                checks.in_range(path.key("times"), pause.times, 1..=FAULT_TIMES_MAX);
            }
            Fault::OnEvent(on_event) => {
                checks.time_in_run(at.0, at.1, duration_s);
                check_host(checks, path, &on_event.host, hosts, HostKind::Engine);
                checks.in_range(path.key("threshold_ms"), on_event.threshold_ms, 1..=FAULT_MS_MAX);
                checks.in_range(path.key("action").key("pause_ms"), on_event.action.pause_ms, 1..=FAULT_MS_MAX);
                checks.in_range(path.key("times"), on_event.times, 1..=FAULT_TIMES_MAX);
            }
            Fault::ClockSkew(skew) => {
                checks.time_in_run(at.0, at.1, duration_s);
                check_host(checks, path, &skew.host, hosts, HostKind::Engine);
                checks.in_range(path.key("skew_ms"), skew.skew_ms, -SKEW_MS_MAX..=SKEW_MS_MAX);
            }
            Fault::StoreFailover(failover) => {
                checks.time_in_run(at.0, at.1, duration_s);
                check_host(checks, path, &failover.host, hosts, HostKind::Store);
                checks.in_range(path.key("lose_last_ms"), failover.lose_last_ms, 0..=FAULT_MS_MAX);
            }
            Fault::SlowStore(slow) => {
                checks.window_in_run(at, (path.key("until_s"), slow.until_s), "at_s", duration_s);
                check_host(checks, path, &slow.host, hosts, HostKind::Store);
                checks.in_range(path.key("extra_ms"), slow.extra_ms, 1..=FAULT_MS_MAX);
            }
        }
    }

    /// Redraws the fault's times and magnitudes within ±20 % of the written values, keeping
    /// them inside the run and every end after its start.
    pub(crate) fn perturb(&mut self, rng: &mut Xoshiro256PlusPlus, duration_s: f64) {
        match self {
            Fault::Partition(Partition { at_s, heal_at_s: end_s, .. })
            | Fault::HoldLink(HoldLink { at_s, release_at_s: end_s, .. })
            | Fault::SlowStore(SlowStore { at_s, until_s: end_s, .. }) => {
                (*at_s, *end_s) = perturb_window(rng, *at_s, *end_s, duration_s);
            }
            Fault::Latency(latency) => {
                (latency.at_s, latency.until_s) = perturb_window(rng, latency.at_s, latency.until_s, duration_s);
                latency.latency_ms = round_to_us_in_ms(latency.latency_ms * factor(rng)).min(FAULT_MS_MAX as f64);
            }
            Fault::Crash(crash) => match crash.restart_at_s {
                Some(restart_at_s) => {
                    let (at_s, restart_at_s) = perturb_window(rng, crash.at_s, restart_at_s, duration_s);
                    crash.at_s = at_s;
                    crash.restart_at_s = Some(restart_at_s);
                }
                None => crash.at_s = perturb_time(rng, crash.at_s, duration_s),
            },
            Fault::PauseAt(pause) => {
                pause.at_s = perturb_time(rng, pause.at_s, duration_s);
                pause.pause_ms = perturb_ms(rng, pause.pause_ms);
            }
            Fault::Pause(pause) => {
                pause.at_s = perturb_time(rng, pause.at_s, duration_s);
                // The pause still ends within the run.
                let left_ms = ((duration_s - pause.at_s).max(0.0) * 1000.0) as u64;
                pause.pause_ms = perturb_ms(rng, pause.pause_ms).min(left_ms.max(1));
            }
            Fault::OnEvent(on_event) => {
                on_event.at_s = perturb_time(rng, on_event.at_s, duration_s);
                on_event.threshold_ms = perturb_ms(rng, on_event.threshold_ms);
                on_event.action.pause_ms = perturb_ms(rng, on_event.action.pause_ms);
            }
            Fault::ClockSkew(skew) => {
                skew.at_s = perturb_time(rng, skew.at_s, duration_s);
                skew.skew_ms =
                    ((skew.skew_ms as f64) * factor(rng)).round().clamp(-SKEW_MS_MAX as f64, SKEW_MS_MAX as f64) as i64;
            }
            Fault::StoreFailover(failover) => {
                failover.at_s = perturb_time(rng, failover.at_s, duration_s);
                failover.lose_last_ms = perturb_ms(rng, failover.lose_last_ms);
            }
        }
    }
}

/// The kinds of host a fault may aim at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HostKind {
    Engine,
    Store,
    EngineOrStore,
}

fn check_host(checks: &mut Checks, path: &KeyPath, host: &str, hosts: HostNames, kind: HostKind) {
    let path = path.key("host");
    if !hosts.exists(host) {
        checks.fail(path, format!("no host `{host}` in this scenario (hosts: {})", hosts.describe()));
        return;
    }
    let fits = match kind {
        HostKind::Engine => hosts.is_engine(host),
        HostKind::Store => HostNames::is_store(host),
        HostKind::EngineOrStore => hosts.is_engine(host) || HostNames::is_store(host),
    };
    if !fits {
        let wanted = match kind {
            HostKind::Engine => format!("an engine node (engine-1..engine-{})", hosts.engines),
            HostKind::Store => format!("a store host ({STORE_CACHE_HOST} or {STORE_RECORD_HOST})"),
            HostKind::EngineOrStore => "an engine node or a store host".to_owned(),
        };
        checks.fail(path, format!("must be {wanted} (got `{host}`)"));
    }
}

fn check_sides(checks: &mut Checks, path: &KeyPath, a: &HostSet, b: &HostSet, hosts: HostNames) {
    let all = hosts.all();
    for (key, side) in [("a", a), ("b", b)] {
        if side.patterns().is_empty() {
            checks.fail(path.key(key), "must name at least one host");
        }
        for pattern in side.patterns() {
            if !all.iter().any(|host| pattern_matches(pattern, host)) {
                checks
                    .fail(path.key(key), format!("no host `{pattern}` in this scenario (hosts: {})", hosts.describe()));
            }
        }
    }
    if let Some(shared) = all.iter().find(|host| a.contains(host) && b.contains(host)) {
        checks.fail(path.key("b"), format!("`{shared}` is on both sides"));
    }
}

/// A factor in `[0.8, 1.2]`.
fn factor(rng: &mut Xoshiro256PlusPlus) -> f64 {
    rng.random_range(0.8..=1.2)
}

/// Seconds rounded to whole milliseconds, so perturbed scenarios stay readable.
fn round_to_ms_in_s(seconds: f64) -> f64 {
    (seconds * 1_000.0).round() / 1_000.0
}

fn round_to_us_in_ms(milliseconds: f64) -> f64 {
    (milliseconds * 1_000.0).round() / 1_000.0
}

fn perturb_time(rng: &mut Xoshiro256PlusPlus, at_s: f64, duration_s: f64) -> f64 {
    round_to_ms_in_s(at_s * factor(rng)).clamp(0.0, duration_s)
}

/// A window whose start and length are each scaled by their own factor; if it would end
/// outside the run or before its start, the written window is kept.
fn perturb_window(rng: &mut Xoshiro256PlusPlus, at_s: f64, end_s: f64, duration_s: f64) -> (f64, f64) {
    let new_at_s = perturb_time(rng, at_s, duration_s);
    let length_s = (end_s - at_s) * factor(rng);
    let new_end_s = round_to_ms_in_s(new_at_s + length_s).min(duration_s);
    if new_end_s > new_at_s { (new_at_s, new_end_s) } else { (at_s, end_s) }
}

fn perturb_ms(rng: &mut Xoshiro256PlusPlus, milliseconds: u64) -> u64 {
    let scaled = ((milliseconds as f64) * factor(rng)).round().min(FAULT_MS_MAX as f64) as u64;
    if milliseconds > 0 { scaled.max(1) } else { 0 }
}

/// Re-deserializes `[[faults]]` entries by kind, so errors inside them point at their key.
pub(crate) fn refine_fault(path: &KeyPath, value: &toml::Spanned<toml::de::DeValue<'_>>) -> Option<toml::de::Error> {
    let [Segment::Key(section), Segment::Index(_)] = path.segments() else {
        return None;
    };
    if section != "faults" {
        return None;
    }
    match tag_of(value, "kind")? {
        "partition" => deserialize_variant::<Partition>(value, "kind"),
        "hold-link" => deserialize_variant::<HoldLink>(value, "kind"),
        "latency" => deserialize_variant::<LatencySpike>(value, "kind"),
        "crash" => deserialize_variant::<Crash>(value, "kind"),
        "pause-at" => deserialize_variant::<PauseAt>(value, "kind"),
        "on-event" => deserialize_variant::<OnEvent>(value, "kind"),
        "clock-skew" => deserialize_variant::<ClockSkew>(value, "kind"),
        "store-failover" => deserialize_variant::<StoreFailover>(value, "kind"),
        "slow-store" => deserialize_variant::<SlowStore>(value, "kind"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    const HOSTS: HostNames = HostNames { engines: 3, clients: 2 };

    fn problems(fault: &Fault) -> Vec<String> {
        let mut checks = Checks::default();
        fault.check(&mut checks, &KeyPath::root().key("faults").index(0), HOSTS, 100.0);
        checks.into_problems().into_iter().map(|problem| format!("{}: {}", problem.path, problem.message)).collect()
    }

    #[test]
    fn hosts_are_listed_in_a_fixed_order() {
        assert_eq!(
            HOSTS.all(),
            ["engine-1", "engine-2", "engine-3", "store-cache", "store-record", "client-1", "client-2", "agent"]
        );
        assert!(HOSTS.exists("engine-3"));
        assert!(!HOSTS.exists("engine-4"));
        assert!(!HOSTS.exists("engine-01"));
        assert!(!HOSTS.exists("client-0"));
    }

    #[test]
    fn host_sets_match_names_and_prefix_patterns() {
        let set = HostSet::new(["engine-1", "client-*"]);
        assert_eq!(set.resolve(&HOSTS.all()), ["engine-1", "client-1", "client-2"]);
        assert!(!set.contains("engine-2"));
    }

    #[test]
    fn a_crash_of_a_host_that_does_not_exist_names_the_host() {
        let fault =
            Fault::Crash(Crash { at_s: 10.0, restart_at_s: Some(20.0), host: "engine-7".into(), lose_data: false });
        assert_eq!(
            problems(&fault),
            ["faults[0].host: no host `engine-7` in this scenario (hosts: engine-1..engine-3, store-cache, \
              store-record, client-1..client-2, agent)"]
        );
    }

    #[test]
    fn only_the_cache_store_can_lose_its_data_in_a_crash() {
        let crash = |host: &str| {
            Fault::Crash(Crash { at_s: 10.0, restart_at_s: Some(20.0), host: host.into(), lose_data: true })
        };
        assert!(problems(&crash("store-cache")).is_empty());
        assert_eq!(
            problems(&crash("store-record")),
            ["faults[0].lose_data: only store-cache can lose its data (got `store-record`): an engine node always \
              restarts empty, and store-record is the system of record, which keeps its data; to lose its last \
              writes, use kind = \"store-failover\""]
        );
        assert_eq!(problems(&crash("engine-1")).len(), 1);
    }

    #[test]
    fn a_store_failover_must_aim_at_a_store() {
        let fault = Fault::StoreFailover(StoreFailover { at_s: 10.0, host: "engine-1".into(), lose_last_ms: 100 });
        assert_eq!(
            problems(&fault),
            ["faults[0].host: must be a store host (store-cache or store-record) (got `engine-1`)"]
        );
    }

    #[test]
    fn a_partition_that_heals_before_it_starts_is_refused() {
        let fault = Fault::Partition(Partition {
            at_s: 50.0,
            heal_at_s: 40.0,
            a: HostSet::new(["engine-1"]),
            b: HostSet::new(["store-*"]),
            one_way: false,
        });
        assert_eq!(problems(&fault), ["faults[0].heal_at_s: must be after at_s = 50 (got 40)"]);
    }

    #[test]
    fn partition_sides_must_exist_and_be_disjoint() {
        let fault = Fault::Partition(Partition {
            at_s: 5.0,
            heal_at_s: 10.0,
            a: HostSet::new(["engine-*"]),
            b: HostSet::new(["engine-2", "db-*"]),
            one_way: true,
        });
        assert_eq!(
            problems(&fault),
            [
                "faults[0].b: no host `db-*` in this scenario (hosts: engine-1..engine-3, store-cache, store-record, \
                 client-1..client-2, agent)",
                "faults[0].b: `engine-2` is on both sides",
            ]
        );
    }

    #[test]
    fn a_pause_at_an_unknown_point_lists_the_known_points() {
        let fault = Fault::PauseAt(PauseAt {
            point: "hold.after_lok".into(),
            host: "engine-1".into(),
            at_s: 0.0,
            pause_ms: 100,
            times: 1,
        });
        assert_eq!(
            problems(&fault),
            ["faults[0].point: unknown fault point `hold.after_lok` (known: hold.after_lock, hold.after_check, \
              confirm.before_commit)"]
        );
    }

    #[test]
    fn a_fault_after_the_end_of_the_run_is_refused() {
        let fault = Fault::ClockSkew(ClockSkew { host: "engine-2".into(), at_s: 120.0, skew_ms: 500 });
        assert_eq!(problems(&fault), ["faults[0].at_s: must be within the run, at most duration_s = 100 (got 120)"]);
    }

    #[test]
    fn perturbation_stays_within_twenty_percent_and_inside_the_run() {
        let written = Fault::Partition(Partition {
            at_s: 50.0,
            heal_at_s: 60.0,
            a: HostSet::new(["engine-1"]),
            b: HostSet::new(["store-record"]),
            one_way: false,
        });
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(5);
        let mut seen_other = false;
        for _ in 0..200 {
            let mut fault = written.clone();
            fault.perturb(&mut rng, 100.0);
            let Fault::Partition(partition) = &fault else { unreachable!("the kind does not change") };
            assert!((40.0..=60.0).contains(&partition.at_s), "{partition:?}");
            let length_s = partition.heal_at_s - partition.at_s;
            assert!((7.999..=12.001).contains(&length_s), "{partition:?}");
            assert!(problems(&fault).is_empty(), "{fault:?}");
            seen_other |= fault != written;
        }
        assert!(seen_other);
    }

    #[test]
    fn perturbation_never_ends_a_window_past_the_run() {
        let written =
            Fault::SlowStore(SlowStore { at_s: 95.0, until_s: 100.0, host: "store-cache".into(), extra_ms: 50 });
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(11);
        for _ in 0..200 {
            let mut fault = written.clone();
            fault.perturb(&mut rng, 100.0);
            assert!(problems(&fault).is_empty(), "{fault:?}");
        }
    }
}
