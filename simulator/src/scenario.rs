//! Scenario files (`scenarios/*.toml`): what a run replays and how it is judged.
//!
//! A [`Scenario`] names a seed and a duration, and describes the venue, the engine's deployment
//! and settings, the network, the arrival curves of users, their behaviour, bots, a fault
//! timeline, the ops agent's policy and the `[slo]` thresholds. `scenarios/README.md` documents
//! every key.
//!
//! [`Scenario::load`] and [`Scenario::parse`] refuse unknown keys, wrong types and impossible
//! values with a [`ScenarioError`] that names the file, line, column and key:
//!
//! ```text
//! scenarios/x.toml:12:5: key `venue.schedules[0].sections[1].seats`: must be > 0 (got 0)
//! ```
//!
//! Hosts of the simulated world are derived from the scenario ([`Scenario::hosts`]):
//! `engine-1..engine-N`, `store-cache`, `store-record`, `client-1..client-K` and `agent`.
//!
//! **Invariant:** nothing here reads a clock or unseeded randomness; arrival times and
//! perturbed faults are pure functions of the scenario and a seed. Times in the file are
//! seconds or milliseconds as their key says; times handed to the simulation are simulated
//! microseconds.

mod arrivals;
mod checks;
mod faults;
mod sections;
mod slo;
mod source;

use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::rngs::Xoshiro256PlusPlus;
use serde::{Deserialize, Serialize};
use tcore_engine::catalogue::{AccountGroup, Catalogue, CatalogueSchedule};

pub use arrivals::{ArrivalCurve, Constant, Ramp, Spike, Step, Steps, USERS_MAX};
pub use faults::{
    AGENT_HOST, ClockSkew, Crash, FAULT_POINTS, Fault, FaultEvent, HoldLink, HostSet, LatencySpike, OnEvent, Partition,
    Pause, PauseAction, PauseAt, STORE_CACHE_HOST, STORE_RECORD_HOST, SlowStore, StoreFailover, client_host,
    engine_host,
};
pub use sections::{
    Admission, AdmissionOrder, Agent, AgentPolicy, Bot, BotIps, BotTarget, Engine, HoldMode, Network, RangeMs,
    RateLimits, RecordReplication, Schedule, SeatChoice, Section, StoreKind, Users, Venue,
};
pub use slo::{Slo, SloOp, SloThreshold};

use checks::Checks;
use faults::{FAULTS_MAX, HostNames};
use source::{KeyPath, Source};

/// The longest run a scenario may describe: one day of simulated time.
const DURATION_S_MAX: f64 = 86_400.0;
/// The most client hosts.
const CLIENTS_MAX: u64 = 256;
/// The most arrival curves.
const ARRIVALS_MAX: usize = 64;
/// Mixed into the seed of [`Scenario::perturbed`], so perturbing with the run's seed does not
/// replay the random stream of the run itself.
const PERTURBATION_SALT: u64 = 0x7063_6f72_6570_6572;

/// A scenario file, parsed and checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// A short name, used in reports and file names.
    pub name: String,
    /// What the scenario shows, in a sentence or two.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The seed of every random choice of the run (`--seed` overrides it).
    pub seed: u64,
    /// How long the run lasts, in simulated seconds.
    pub duration_s: f64,
    /// How many client hosts multiplex the virtual users (`client-1..client-K`).
    #[serde(default = "default_clients")]
    pub clients: u32,
    /// What is on sale.
    pub venue: Venue,
    /// The engine's deployment and settings.
    #[serde(default)]
    pub engine: Engine,
    /// The simulated network.
    #[serde(default)]
    pub network: Network,
    /// `[[arrivals]]`: when users arrive.
    pub arrivals: Vec<ArrivalCurve>,
    /// How users behave.
    #[serde(default)]
    pub users: Users,
    /// `[[bots]]`: abusive clients.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bots: Vec<Bot>,
    /// `[[faults]]`: the fault timeline.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub faults: Vec<Fault>,
    /// The ops agent.
    #[serde(default)]
    pub agent: Agent,
    /// The thresholds the gate judges the run by.
    #[serde(default)]
    pub slo: Slo,
}

fn default_clients() -> u32 {
    4
}

/// Why a scenario could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("{}: cannot read the scenario: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or not a valid scenario.
    #[error("{file}:{line}:{column}: {}{message}", key_label(key.as_deref()))]
    Invalid {
        /// The file, as given.
        file: String,
        /// 1-based line.
        line: usize,
        /// 1-based column, in characters.
        column: usize,
        /// The key path, such as `venue.schedules[0].sections[1].seats`; absent for syntax
        /// errors.
        key: Option<String>,
        /// What is wrong.
        message: String,
    },
}

fn key_label(key: Option<&str>) -> String {
    key.map(|key| format!("key `{key}`: ")).unwrap_or_default()
}

impl Scenario {
    /// Reads and checks the scenario file at `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<Scenario, ScenarioError> {
        let path = path.as_ref();
        let text =
            std::fs::read_to_string(path).map_err(|source| ScenarioError::Read { path: path.to_owned(), source })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and checks `text`; errors name `file_name` as the file.
    pub fn parse(text: &str, file_name: &str) -> Result<Scenario, ScenarioError> {
        let source = Source::parse(text, file_name)?;
        let mut scenario: Scenario = source.deserialize(refine)?;
        scenario.slo.sort_by_offsets(&source.flattened_key_offsets(&KeyPath::root().key("slo")));
        let problems = scenario.problems();
        // Report the problem that comes first in the file, as a reader would meet it.
        match problems.iter().min_by_key(|problem| source.problem_offset(problem)) {
            Some(problem) => Err(source.problem_error(problem)),
            None => Ok(scenario),
        }
    }

    /// Reads the scenario at `path` for a live run (`tcore load`), which also refuses what a
    /// live run cannot do, naming the key: a fault, a bot or an agent (live runs replay the
    /// fans' journeys; their faults, bots and agent are not applied live yet).
    pub fn load_live(path: impl AsRef<Path>) -> Result<Scenario, ScenarioError> {
        let path = path.as_ref();
        let text =
            std::fs::read_to_string(path).map_err(|source| ScenarioError::Read { path: path.to_owned(), source })?;
        let file = path.display().to_string();
        let scenario = Self::parse(&text, &file)?;
        let source = Source::parse(&text, &file)?;
        let problems = scenario.live_problems();
        match problems.iter().min_by_key(|problem| source.problem_offset(problem)) {
            Some(problem) => Err(source.problem_error(problem)),
            None => Ok(scenario),
        }
    }

    fn live_problems(&self) -> Vec<source::Problem> {
        let mut checks = Checks::default();
        let root = KeyPath::root();
        for (index, fault) in self.faults.iter().enumerate() {
            if let Some((key, message)) = self.live_fault_problem(fault) {
                checks.fail(root.key("faults").index(index).key(key), message);
            }
        }
        for index in 0..self.bots.len() {
            checks.fail(root.key("bots").index(index), "bots are not replayed in a live run (run it with `tcore run`)");
        }
        if self.agent.policy != AgentPolicy::None {
            checks.fail(root.key("agent").key("policy"), "the ops agent does not run in a live run yet");
        }
        checks.into_problems()
    }

    /// Why `fault` cannot be applied in a live run, with the key to blame; `None` if it can. A
    /// live run kills, restarts, stops and continues processes of its own: engine nodes, and
    /// the Redis server it starts for faults on the cache store. It never touches the MariaDB
    /// server, which it shares with whatever else runs on the machine.
    fn live_fault_problem(&self, fault: &Fault) -> Option<(&'static str, String)> {
        let shared_stores = self.engine.store == StoreKind::RedisMariadb;
        let host = match fault {
            Fault::Crash(crash) => crash.host.as_str(),
            Fault::Pause(pause) => pause.host.as_str(),
            Fault::Partition(_) | Fault::HoldLink(_) | Fault::Latency(_) | Fault::SlowStore(_) => {
                let links = crate::live::faults::link_modes(self, fault);
                let key = if matches!(fault, Fault::SlowStore(_)) { "host" } else { "b" };
                if links.is_empty() {
                    return Some((
                        key,
                        "no live link between these hosts: a live run's links go from the load driver (every \
                         client-*) to each engine node, and from each engine node to store-cache and store-record"
                            .to_owned(),
                    ));
                }
                if !shared_stores && links.iter().any(|((_, to), _)| to == STORE_CACHE_HOST || to == STORE_RECORD_HOST)
                {
                    return Some((
                        key,
                        "with store = \"memory\" the stores are inside the engine node: no link to put a fault on"
                            .to_owned(),
                    ));
                }
                return None;
            }
            other => {
                return Some((
                    "kind",
                    format!(
                        "a `{}` fault is not applied in a live run (live runs apply `crash`, `pause`, \
                         `partition`, `hold-link`, `latency` and `slow-store`; run this one with `tcore run`)",
                        other.kind()
                    ),
                ));
            }
        };
        if host == STORE_RECORD_HOST {
            return Some((
                "host",
                format!(
                    "a live run does not stop {host}: the system of record is the machine's MariaDB server, \
                     shared with others (`just failover` kills a MariaDB of its own)"
                ),
            ));
        }
        if host == STORE_CACHE_HOST && !shared_stores {
            return Some(("host", format!("{host} is a process of its own only with store = \"redis+mariadb\"")));
        }
        match fault {
            Fault::Crash(crash) if crash.host == STORE_CACHE_HOST && !crash.lose_data => Some((
                "lose_data",
                "a live run's Redis keeps nothing on disk, so it restarts empty: set lose_data = true".to_owned(),
            )),
            Fault::Crash(crash) if !shared_stores => Some((
                "host",
                format!(
                    "{} is the only node and holds the whole memory store: a crash would lose every sale; \
                     crash a node with store = \"redis+mariadb\"",
                    crash.host
                ),
            )),
            _ => None,
        }
    }

    /// The venue and the accounts to open, as the engine loads them (`tcore_engine::catalogue`):
    /// the `users` fans' accounts first (user ids from 1), then each bot's, in `[[bots]]` order.
    pub fn catalogue(&self, users: u64) -> Catalogue {
        let schedules = self
            .venue
            .schedules
            .iter()
            .map(|schedule| CatalogueSchedule {
                id: schedule.id,
                concert: schedule.concert.clone(),
                opens_in_ms: (schedule.opens_at_s.max(0.0) * 1000.0) as u64,
                sections: schedule
                    .sections
                    .iter()
                    .map(|section| tcore_engine::domain::Section {
                        name: section.name.clone(),
                        price_points: section.price_points,
                        seats_count: section.seats,
                    })
                    .collect(),
            })
            .collect();
        let mut accounts = vec![AccountGroup { prefix: "user-".into(), count: users, points: self.users.points }];
        accounts.extend(self.bots.iter().map(|bot| AccountGroup {
            prefix: format!("{}-", bot.name),
            count: u64::from(bot.accounts),
            points: 0,
        }));
        Catalogue { schedules, accounts }
    }

    /// The same scenario with another seed (`tcore run --seed N`).
    #[must_use]
    pub fn with_seed(mut self, seed: u64) -> Scenario {
        self.seed = seed;
        self
    }

    /// The same scenario with another hold mode (`tcore run --hold-mode M`).
    #[must_use]
    pub fn with_hold_mode(mut self, hold_mode: HoldMode) -> Scenario {
        self.engine.hold_mode = hold_mode;
        self
    }

    /// The same scenario with another replication of the system of record
    /// (`tcore run --record-replication M`).
    #[must_use]
    pub fn with_record_replication(mut self, record_replication: RecordReplication) -> Scenario {
        self.engine.record_replication = record_replication;
        self
    }

    /// Whether the scenario runs a configuration known to break a safety invariant: the hold
    /// mode `unfenced-lock` (oversells) or the record replication `async` (a failover loses
    /// acknowledged confirmations). Such scenarios are allowed, to prove the checker catches
    /// the violation; runners must say so ([`Scenario::unsafe_settings`]) and start the engine
    /// with its explicit unsafe flag.
    pub fn is_unsafe(&self) -> bool {
        !self.unsafe_settings().is_empty()
    }

    /// The known-unsafe settings of the scenario, each as `key = "value"`.
    pub fn unsafe_settings(&self) -> Vec<String> {
        let engine = &self.engine;
        let mut settings = Vec::new();
        if engine.hold_mode.is_unsafe() {
            settings.push(format!("engine.hold_mode = \"{}\"", engine.hold_mode.name()));
        }
        if engine.record_replication.is_unsafe() {
            settings.push(format!("engine.record_replication = \"{}\"", engine.record_replication.name()));
        }
        settings
    }

    /// A variant for swarm testing (`tcore run --seeds A..B`): the seed becomes `seed`, and
    /// every fault's times, pause lengths, latencies, skews and losses are redrawn within
    /// ±20 % of the written values, deterministically from `seed`. Windows stay inside the run
    /// and end after they start, so the result passes the same checks as the original.
    #[must_use]
    pub fn perturbed(&self, seed: u64) -> Scenario {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed ^ PERTURBATION_SALT);
        let mut scenario = self.clone().with_seed(seed);
        for fault in &mut scenario.faults {
            fault.perturb(&mut rng, scenario.duration_s);
        }
        scenario
    }

    /// Every host of the simulated world, in a fixed order: `engine-1..engine-N`,
    /// `store-cache`, `store-record`, `client-1..client-K`, `agent`.
    pub fn hosts(&self) -> Vec<String> {
        self.host_names().all()
    }

    /// The run's duration in simulated microseconds.
    pub fn duration_us(&self) -> u64 {
        us_from_s(self.duration_s)
    }

    /// How many users all arrival curves bring.
    pub fn users_total(&self) -> u64 {
        self.arrivals.iter().map(ArrivalCurve::users).sum()
    }

    /// The arrival times of every user, in simulated microseconds since the start of the run,
    /// sorted. Curve `i` is expanded with a seed derived from the scenario's seed and `i`.
    pub fn arrival_times_us(&self) -> Vec<u64> {
        let mut times: Vec<u64> = self
            .arrivals
            .iter()
            .enumerate()
            .flat_map(|(index, curve)| curve.arrival_times_us(curve_seed(self.seed, index)))
            .collect();
        times.sort_unstable();
        times
    }

    fn host_names(&self) -> HostNames {
        HostNames { engines: self.engine.nodes, clients: self.clients }
    }

    /// Every semantic problem of the scenario, each at its key.
    fn problems(&self) -> Vec<source::Problem> {
        let mut checks = Checks::default();
        let root = KeyPath::root();
        checks.not_blank(root.key("name"), &self.name);
        checks.in_range_f64(root.key("duration_s"), self.duration_s, 0.001..=DURATION_S_MAX);
        checks.count(root.key("clients"), u64::from(self.clients), CLIENTS_MAX);
        // Later checks compare times with the duration; a nonsensical one would only add noise.
        let duration_s = if self.duration_s.is_finite() { self.duration_s } else { 0.0 };
        self.venue.check(&mut checks, &root.key("venue"), duration_s);
        self.engine.check(&mut checks, &root.key("engine"));
        self.network.check(&mut checks, &root.key("network"));
        self.check_arrivals(&mut checks, duration_s);
        self.users.check(&mut checks, &root.key("users"));
        sections::check_bots(&self.bots, &mut checks, duration_s);
        self.check_faults(&mut checks, duration_s);
        self.agent.check(&mut checks, &root.key("agent"));
        checks.into_problems()
    }

    fn check_arrivals(&self, checks: &mut Checks, duration_s: f64) {
        let path = KeyPath::root().key("arrivals");
        checks.list_length(path.clone(), self.arrivals.len(), ARRIVALS_MAX);
        for (index, curve) in self.arrivals.iter().enumerate() {
            curve.check(checks, &path.index(index), duration_s);
        }
        let users_total = self.arrivals.iter().map(ArrivalCurve::users).fold(0_u64, u64::saturating_add);
        if users_total > USERS_MAX {
            checks.fail(path, format!("the curves bring {users_total} users; at most {USERS_MAX}"));
        }
    }

    fn check_faults(&self, checks: &mut Checks, duration_s: f64) {
        let path = KeyPath::root().key("faults");
        if self.faults.len() > FAULTS_MAX {
            checks.fail(path.clone(), format!("must have at most {FAULTS_MAX} entries (got {})", self.faults.len()));
        }
        let hosts = self.host_names();
        for (index, fault) in self.faults.iter().enumerate() {
            fault.check(checks, &path.index(index), hosts, duration_s);
        }
    }
}

/// Finds precise error locations inside the tagged enums of `[[arrivals]]` and `[[faults]]`.
fn refine(path: &KeyPath, value: &toml::Spanned<toml::de::DeValue<'_>>) -> Option<toml::de::Error> {
    arrivals::refine_arrival(path, value).or_else(|| faults::refine_fault(path, value))
}

/// The seed of arrival curve `index`: distinct per curve, so two equal curves do not arrive in
/// lockstep.
fn curve_seed(seed: u64, index: usize) -> u64 {
    seed ^ (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Seconds to whole microseconds, saturating (negative and NaN become 0).
pub(crate) fn us_from_s(seconds: f64) -> u64 {
    (seconds * 1_000_000.0).round() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
name = "minimal"
seed = 7
duration_s = 60

[venue]
[[venue.schedules]]
id = 1
concert = "Test"
opens_at_s = 5
[[venue.schedules.sections]]
name = "A"
seats = 100
price_points = 1000
popularity = 1

[[arrivals]]
shape = "spike"
users = 500
start_s = 4
ramp_s = 2
decay_s = 5
"#;

    fn parse(text: &str) -> Result<Scenario, String> {
        Scenario::parse(text, "t.toml").map_err(|error| error.to_string())
    }

    /// `MINIMAL` with `extra` appended, expected to fail with `expected`.
    fn check_error(extra: &str, expected: &str) {
        let text = format!("{MINIMAL}{extra}");
        assert_eq!(parse(&text).err().as_deref(), Some(expected), "scenario:\n{text}");
    }

    #[test]
    fn a_minimal_scenario_takes_the_defaults() {
        let scenario = parse(MINIMAL).expect("valid");
        assert_eq!(scenario.engine, Engine::default());
        assert_eq!(scenario.users, Users::default());
        assert_eq!(scenario.clients, 4);
        assert_eq!(scenario.users_total(), 500);
        assert_eq!(scenario.venue.seats_total(), 100);
        assert_eq!(scenario.duration_us(), 60_000_000);
        assert!(!scenario.is_unsafe());
        assert_eq!(
            scenario.hosts(),
            [
                "engine-1",
                "engine-2",
                "engine-3",
                "store-cache",
                "store-record",
                "client-1",
                "client-2",
                "client-3",
                "client-4",
                "agent"
            ]
        );
    }

    #[test]
    fn a_missing_key_is_named() {
        let text = MINIMAL.replace("seed = 7\n", "");
        assert_eq!(parse(&text).err().as_deref(), Some("t.toml:1:1: key `seed`: missing field `seed`"));
    }

    #[test]
    fn a_wrong_type_names_line_and_key() {
        let text = MINIMAL.replace("seats = 100", "seats = \"many\"");
        assert_eq!(
            parse(&text).err().as_deref(),
            Some(
                "t.toml:13:9: key `venue.schedules[0].sections[0].seats`: invalid type: string \"many\", expected u32"
            )
        );
    }

    #[test]
    fn errors_inside_tagged_tables_point_at_the_key() {
        check_error(
            "\n[[faults]]\nkind = \"crash\"\nat_s = \"soon\"\nhost = \"engine-1\"\n",
            "t.toml:26:8: key `faults[0].at_s`: invalid type: string \"soon\", expected f64",
        );
        check_error(
            "\n[[faults]]\nkind = \"crash\"\nat_s = 3\nhost = \"engine-1\"\nbogus = 1\n",
            "t.toml:28:1: key `faults[0].bogus`: unknown field `bogus`, expected one of `at_s`, `restart_at_s`, `host`, \
             `lose_data`",
        );
        check_error(
            "\n[[faults]]\nkind = \"crash\"\nat_s = 3\n",
            "t.toml:24:1: key `faults[0].host`: missing field `host`",
        );
        check_error(
            "\n[[faults]]\nkind = \"crush\"\n",
            "t.toml:25:8: key `faults[0].kind`: unknown variant `crush`, expected one of `partition`, `hold-link`, \
             `latency`, `crash`, `pause`, `pause-at`, `on-event`, `clock-skew`, `store-failover`, `slow-store`",
        );
    }

    #[test]
    fn the_first_problem_in_the_file_is_reported() {
        let text = MINIMAL.replace("seats = 100", "seats = 0").replace("users = 500", "users = 0");
        assert_eq!(
            parse(&text).err().as_deref(),
            Some("t.toml:13:1: key `venue.schedules[0].sections[0].seats`: must be > 0 (got 0)")
        );
    }

    #[test]
    fn the_seat_limit_is_read_and_bounded_as_the_engines() {
        let text = format!("{MINIMAL}\n[engine]\nseats_per_user_max = 2\n");
        assert_eq!(parse(&text).expect("valid").engine.seats_per_user_max, 2);
        check_error(
            "\n[engine]\nseats_per_user_max = 0\n",
            "t.toml:25:1: key `engine.seats_per_user_max`: must be in 1..=100 (got 0)",
        );
        check_error(
            "\n[engine]\nseats_per_user_max = 101\n",
            "t.toml:25:1: key `engine.seats_per_user_max`: must be in 1..=100 (got 101)",
        );
    }

    #[test]
    fn replay_without_a_cassette_is_refused() {
        check_error(
            "\n[agent]\npolicy = \"replay\"\n",
            "t.toml:25:1: key `agent.policy`: the replay policy needs a `cassette` to replay",
        );
    }

    #[test]
    fn slo_thresholds_keep_the_file_order() {
        let text = format!(
            "{MINIMAL}\n[slo]\noversell = \"== 0\"\n\"latency.hold.p99_us\" = \"< 50_000\"\n[slo.goodput]\nconfirm_per_s = \"> 100\"\n"
        );
        let scenario = parse(&text).expect("valid");
        let thresholds: Vec<String> = scenario.slo.thresholds.iter().map(ToString::to_string).collect();
        assert_eq!(thresholds, ["oversell == 0", "latency.hold.p99_us < 50000", "goodput.confirm_per_s > 100"]);
    }

    #[test]
    fn seed_and_hold_mode_overrides() {
        let scenario = parse(MINIMAL).expect("valid").with_seed(99).with_hold_mode(HoldMode::UnfencedLock);
        assert_eq!(scenario.seed, 99);
        assert!(scenario.is_unsafe());
    }

    #[test]
    fn record_replication_defaults_to_semi_sync_and_async_is_flagged_unsafe() {
        let scenario = parse(MINIMAL).expect("valid");
        assert_eq!(scenario.engine.record_replication, RecordReplication::SemiSync);
        assert!(scenario.unsafe_settings().is_empty());
        let text = format!("{MINIMAL}\n[engine]\nrecord_replication = \"async\"\n");
        let unsafe_run = parse(&text).expect("the unsafe replication is allowed in scenarios");
        assert_eq!(unsafe_run.unsafe_settings(), ["engine.record_replication = \"async\""]);
        assert!(!unsafe_run.with_record_replication(RecordReplication::SemiSync).is_unsafe());
        check_error(
            "\n[engine]\nrecord_replication = \"sync\"\n",
            "t.toml:25:22: key `engine.record_replication`: unknown variant `sync`, expected `semi-sync` or `async`",
        );
    }

    #[test]
    fn arrival_times_merge_every_curve_in_order() {
        let text =
            format!("{MINIMAL}\n[[arrivals]]\nshape = \"constant\"\nrate_per_s = 10\nstart_s = 20\nduration_s = 30\n");
        let scenario = parse(&text).expect("valid");
        let times = scenario.arrival_times_us();
        assert_eq!(times.len(), 800);
        assert!(times.is_sorted());
        assert_eq!(times, scenario.arrival_times_us());
        assert_ne!(times, scenario.clone().with_seed(8).arrival_times_us());
    }

    #[test]
    fn perturbed_scenarios_differ_by_seed_and_still_pass_their_checks() {
        let text = format!(
            "{MINIMAL}\n[[faults]]\nkind = \"pause-at\"\npoint = \"hold.after_check\"\nhost = \"engine-2\"\nat_s = 6\npause_ms = 2500\ntimes = 2\n\
             [[faults]]\nkind = \"partition\"\nat_s = 20\nheal_at_s = 50\na = \"engine-1\"\nb = [\"store-*\"]\n"
        );
        let scenario = parse(&text).expect("valid");
        let first = scenario.perturbed(1);
        assert_eq!(first, scenario.perturbed(1));
        assert_ne!(first.faults, scenario.perturbed(2).faults);
        assert_eq!(first.seed, 1);
        for seed in 0..100 {
            let perturbed = scenario.perturbed(seed);
            assert_eq!(perturbed.problems(), [], "seed {seed}: {:?}", perturbed.faults);
            let Fault::PauseAt(pause) = &perturbed.faults[0] else { unreachable!("kinds are kept") };
            assert!((2_000..=3_000).contains(&pause.pause_ms), "seed {seed}: {pause:?}");
        }
    }

    #[test]
    fn us_from_s_rounds_and_saturates() {
        assert_eq!(us_from_s(1.5), 1_500_000);
        assert_eq!(us_from_s(0.000_000_4), 0);
        assert_eq!(us_from_s(-3.0), 0);
        assert_eq!(us_from_s(f64::NAN), 0);
    }
}
