//! Scenario files: the shipped ones load, and bad ones are refused with the file, line and key.

use std::path::{Path, PathBuf};

use tcore_engine::server::HTTP2_STREAMS_MAX;
use tcore_sim::scenario::{ArrivalCurve, Fault, HoldMode, Scenario, ScenarioError, SloOp};

/// The scenarios the repository ships, by path under `scenarios/`.
const SHIPPED: [&str; 22] = [
    "bot-storm.toml",
    "cache-loss.toml",
    "calm-opening.toml",
    "ci/bot-storm.toml",
    "ci/cache-loss.toml",
    "ci/calm-opening.toml",
    "ci/clock-skew.toml",
    "ci/concert-open.toml",
    "ci/lock-holder-pause.toml",
    "ci/node-crash.toml",
    "ci/partition-during-payment.toml",
    "ci/retry-storm.toml",
    "ci/slow-store.toml",
    "ci/store-failover.toml",
    "clock-skew.toml",
    "concert-open.toml",
    "lock-holder-pause.toml",
    "node-crash.toml",
    "partition-during-payment.toml",
    "retry-storm.toml",
    "slow-store.toml",
    "store-failover.toml",
];

/// A small valid scenario; the error tests change one thing in it. Line numbers in the
/// expectations below count from its first line.
const BASE: &str = r#"name = "fixture"
seed = 1
duration_s = 60

[venue]
[[venue.schedules]]
id = 1
concert = "Fixture"
opens_at_s = 5
[[venue.schedules.sections]]
name = "A"
seats = 100
price_points = 1_000
popularity = 1
[[venue.schedules.sections]]
name = "B"
seats = 200
price_points = 500
popularity = 2

[engine]
nodes = 2

[engine.admission]
rate_per_s = 50

[[arrivals]]
shape = "spike"
users = 2_000
start_s = 4
ramp_s = 2
decay_s = 8
"#;

fn scenarios_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios")
}

fn load_shipped(name: &str) -> Scenario {
    let path = scenarios_dir().join(name);
    Scenario::load(&path).unwrap_or_else(|error| panic!("{name} does not load: {error}"))
}

/// Parses `text` as `scenarios/x.toml` and expects it to be refused with exactly `expected`.
fn check_error(text: &str, expected: &str) {
    match Scenario::parse(text, "scenarios/x.toml") {
        Ok(_) => panic!("accepted, expected {expected:?}; scenario:\n{text}"),
        Err(error) => assert_eq!(error.to_string(), expected, "scenario:\n{text}"),
    }
}

/// `BASE` with `extra` appended.
fn with(extra: &str) -> String {
    format!("{BASE}{extra}")
}

#[test]
fn every_shipped_scenario_loads_and_is_listed_here() {
    let mut found = Vec::new();
    for directory in [scenarios_dir(), scenarios_dir().join("ci")] {
        for entry in std::fs::read_dir(&directory).expect("scenarios/ is readable") {
            let path = entry.expect("directory entry").path();
            if path.extension().is_some_and(|extension| extension == "toml") {
                let relative = path.strip_prefix(scenarios_dir()).expect("under scenarios/");
                found.push(relative.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    found.sort();
    assert_eq!(found, SHIPPED);
    for name in SHIPPED {
        let scenario = load_shipped(name);
        assert!(!scenario.slo.thresholds.is_empty(), "{name} sets no SLO");
        assert!(
            scenario.slo.thresholds.iter().any(|threshold| threshold.metric == "oversell"
                && threshold.op == SloOp::Equal
                && threshold.value == 0.0),
            "{name} does not require oversell == 0"
        );
        assert!(!scenario.is_unsafe(), "{name} runs an unsafe hold mode by default");
    }
}

#[test]
fn shipped_scenarios_survive_a_round_trip_through_toml() {
    for name in SHIPPED {
        let scenario = load_shipped(name);
        let text = toml::to_string(&scenario).unwrap_or_else(|error| panic!("{name} does not serialize: {error}"));
        let again = Scenario::parse(&text, name).unwrap_or_else(|error| panic!("{name} again: {error}\n{text}"));
        assert_eq!(again, scenario, "{name}");
    }
}

#[test]
fn ci_scenarios_are_small_versions_of_the_full_ones() {
    for name in SHIPPED.iter().filter(|name| name.starts_with("ci/")) {
        let small = load_shipped(name);
        let full = load_shipped(name.trim_start_matches("ci/"));
        assert!(small.duration_s <= 60.0, "{name}");
        // The bot storm needs a sale long enough for the scalpers' queue entries to hog the
        // active slots, or the agent that blocks them has nothing to show.
        let (users_max, seats_max) = if *name == "ci/bot-storm.toml" { (3_000, 1_500) } else { (2_000, 300) };
        assert!(small.users_total() <= users_max, "{name}");
        assert!(small.venue.seats_total() <= seats_max, "{name}");
        assert_eq!(small.engine.hold_mode, full.engine.hold_mode, "{name}");
        let kinds = |scenario: &Scenario| scenario.faults.iter().map(Fault::kind).collect::<Vec<_>>();
        assert_eq!(kinds(&small), kinds(&full), "{name}");
        assert_eq!(small.bots.len(), full.bots.len().min(2), "{name}");
    }
}

#[test]
fn the_benchmark_inputs_are_concert_open_with_ten_times_the_crowd() {
    let (open, million) = (load_shipped("concert-open.toml"), load_shipped("bench/million-open.toml"));
    assert_eq!((open.users_total(), million.users_total()), (100_000, 1_000_000));
    let seats = |scenario: &Scenario| -> u32 {
        scenario.venue.schedules.iter().flat_map(|schedule| &schedule.sections).map(|section| section.seats).sum()
    };
    assert_eq!((seats(&open), seats(&million)), (20_000, 200_000));
    assert!(million.faults.is_empty() && !million.is_unsafe());
    let spike = load_shipped("bench/million-spike.toml");
    assert_eq!((spike.users_total(), seats(&spike)), (1_000_000, 20_000));
    assert_eq!(spike.engine.admission.rate_per_s, open.engine.admission.rate_per_s);
    assert!(spike.faults.is_empty() && !spike.is_unsafe());
    // Every waiting fan holds one long poll: the client hosts' connections must carry them all.
    for scenario in [&million, &spike] {
        let streams = u64::from(scenario.clients) * u64::from(scenario.engine.nodes) * u64::from(HTTP2_STREAMS_MAX);
        assert!(
            streams >= scenario.users_total(),
            "{}: {streams} streams for {} fans",
            scenario.name,
            scenario.users_total()
        );
    }
}

#[test]
fn concert_open_is_a_spike_of_100_000_users_for_20_000_seats_without_faults() {
    let scenario = load_shipped("concert-open.toml");
    assert_eq!(scenario.users_total(), 100_000);
    assert_eq!(scenario.venue.seats_total(), 20_000);
    assert!(scenario.venue.schedules[0].sections.len() >= 3);
    assert!(matches!(scenario.arrivals.as_slice(), [ArrivalCurve::Spike(_)]));
    assert!(scenario.faults.is_empty());
}

#[test]
fn lock_holder_pause_outlasts_the_lock_ttl_under_fenced_lock() {
    let scenario = load_shipped("lock-holder-pause.toml");
    assert_eq!(scenario.engine.hold_mode, HoldMode::FencedLock);
    let pause = scenario
        .faults
        .iter()
        .find_map(|fault| match fault {
            Fault::PauseAt(pause) if pause.point == "hold.after_check" => Some(pause),
            _ => None,
        })
        .expect("a pause at hold.after_check");
    assert!(pause.pause_ms > scenario.engine.lock_ttl_ms);
    let unsafe_run = scenario.with_hold_mode(HoldMode::UnfencedLock);
    assert!(unsafe_run.is_unsafe());
}

#[test]
fn store_failover_fails_the_record_store_over_after_the_opening_even_when_perturbed() {
    for name in ["store-failover.toml", "ci/store-failover.toml"] {
        let scenario = load_shipped(name);
        let opens_at_s = scenario.venue.schedules[0].opens_at_s;
        assert!(
            scenario.faults.iter().any(|fault| matches!(
                fault,
                Fault::StoreFailover(failover) if failover.host == "store-record"
                    && failover.lose_last_ms > 0
                    && failover.at_s * 0.8 > opens_at_s
            )),
            "{name}: a swarm's 20 % earlier must still come after the opening"
        );
    }
}

#[test]
fn an_unknown_key_names_file_line_and_key() {
    check_error(
        &BASE.replace("rate_per_s = 50\n", "rate_per_s = 50\nrate_per_sec = 5\n"),
        "scenarios/x.toml:26:1: key `engine.admission.rate_per_sec`: unknown field `rate_per_sec`, expected one \
         of `rate_per_s`, `active_max`, `order`, `admitted_ttl_s`",
    );
    check_error(
        &BASE.replace("seed = 1\n", "seed = 1\nsede = 3\n"),
        "scenarios/x.toml:3:1: key `sede`: unknown field `sede`, expected one of `name`, `description`, `seed`, \
         `duration_s`, `clients`, `venue`, `engine`, `network`, `arrivals`, `users`, `bots`, `faults`, `agent`, `slo`",
    );
}

#[test]
fn a_missing_key_is_named_at_the_table_that_lacks_it() {
    let venue_start = BASE.find("[venue]").expect("BASE has a venue");
    let venue_end = BASE.find("[engine]").expect("BASE has an engine");
    check_error(
        &format!("{}{}", &BASE[..venue_start], &BASE[venue_end..]),
        "scenarios/x.toml:1:1: key `venue`: missing field `venue`",
    );
    check_error(
        &BASE.replace("concert = \"Fixture\"\n", ""),
        "scenarios/x.toml:6:1: key `venue.schedules[0].concert`: missing field `concert`",
    );
    check_error(
        &BASE.replace("price_points = 500\n", ""),
        "scenarios/x.toml:15:1: key `venue.schedules[0].sections[1].price_points`: missing field `price_points`",
    );
}

#[test]
fn zero_or_negative_seats_name_line_and_key() {
    check_error(
        &BASE.replace("seats = 200", "seats = 0"),
        "scenarios/x.toml:17:1: key `venue.schedules[0].sections[1].seats`: must be > 0 (got 0)",
    );
    check_error(
        &BASE.replace("seats = 200", "seats = -5"),
        "scenarios/x.toml:17:9: key `venue.schedules[0].sections[1].seats`: invalid value: integer `-5`, expected u32",
    );
}

#[test]
fn a_tick_outside_1_to_10_ms_names_line_and_key() {
    let text = with("\n[network]\ntick_ms = 0\n");
    let line = text.lines().position(|line| line == "tick_ms = 0").expect("the key") + 1;
    check_error(&text, &format!("scenarios/x.toml:{line}:1: key `network.tick_ms`: must be in 1..=10 (got 0)"));
}

/// A starting balance the engine would refuse at run time is refused when the scenario loads.
#[test]
fn points_beyond_what_an_account_may_be_given_name_line_and_key() {
    let text = with("\n[users]\npoints = 20_000_000\n");
    let line = text.lines().position(|line| line == "points = 20_000_000").expect("the key") + 1;
    check_error(
        &text,
        &format!("scenarios/x.toml:{line}:1: key `users.points`: must be in 0..=10000000 (got 20000000)"),
    );
}

#[test]
fn a_fault_aimed_at_a_host_that_does_not_exist_names_key_and_host() {
    check_error(
        &with("\n[[faults]]\nkind = \"crash\"\nat_s = 10\nrestart_at_s = 20\nhost = \"engine-3\"\n"),
        "scenarios/x.toml:38:1: key `faults[0].host`: no host `engine-3` in this scenario (hosts: \
         engine-1..engine-2, store-cache, store-record, client-1..client-4, agent)",
    );
    check_error(
        &with("\n[[faults]]\nkind = \"partition\"\nat_s = 10\nheal_at_s = 20\na = \"engine-1\"\nb = [\"db-*\"]\n"),
        "scenarios/x.toml:39:1: key `faults[0].b`: no host `db-*` in this scenario (hosts: engine-1..engine-2, \
         store-cache, store-record, client-1..client-4, agent)",
    );
}

#[test]
fn a_crash_that_loses_the_data_of_the_system_of_record_names_line_and_key() {
    let text = with(
        "\n[[faults]]\nkind = \"crash\"\nat_s = 10\nrestart_at_s = 20\nhost = \"store-record\"\nlose_data = true\n",
    );
    let line = text.lines().position(|line| line == "lose_data = true").expect("the key") + 1;
    check_error(
        &text,
        &format!(
            "scenarios/x.toml:{line}:1: key `faults[0].lose_data`: only store-cache can lose its data (got \
             `store-record`): an engine node always restarts empty, and store-record is the system of record, \
             which keeps its data; to lose its last writes, use kind = \"store-failover\""
        ),
    );
    let cache = text.replace("host = \"store-record\"", "host = \"store-cache\"");
    let scenario = Scenario::parse(&cache, "scenarios/x.toml").unwrap_or_else(|error| panic!("{error}"));
    assert!(matches!(scenario.faults.as_slice(), [Fault::Crash(crash)] if crash.lose_data));
}

#[test]
fn fault_windows_must_end_after_they_start_and_inside_the_run() {
    check_error(
        &with(
            "\n[[faults]]\nkind = \"partition\"\nat_s = 30\nheal_at_s = 20\na = \"engine-1\"\nb = \"store-record\"\n",
        ),
        "scenarios/x.toml:37:1: key `faults[0].heal_at_s`: must be after at_s = 30 (got 20)",
    );
    check_error(
        &with("\n[[faults]]\nkind = \"slow-store\"\nat_s = 30\nuntil_s = 75\nhost = \"store-record\"\nextra_ms = 50\n"),
        "scenarios/x.toml:37:1: key `faults[0].until_s`: must be within the run, at most duration_s = 60 (got 75)",
    );
}

#[test]
fn a_bad_slo_expression_names_the_key() {
    check_error(
        &with("\n[slo]\noversell = \"=< 0\"\n"),
        "scenarios/x.toml:35:12: key `slo.oversell`: invalid SLO expression \"=< 0\": expected an operator (<, <=, \
         ==, >=, >) and a number, as in \"< 50000\"",
    );
    check_error(
        &with("\n[slo.latency.hold]\np99_us = \"fast\"\n"),
        "scenarios/x.toml:35:10: key `slo.latency.hold.p99_us`: invalid SLO expression \"fast\": expected an \
         operator (<, <=, ==, >=, >) and a number, as in \"< 50000\"",
    );
    check_error(
        &with("\n[slo]\n\"latency.Hold\" = \"< 5\"\n"),
        "scenarios/x.toml:35:1: key `slo.\"latency.Hold\"`: invalid SLO metric name \"latency.Hold\": use dotted \
         segments of a-z, 0-9, _ and -, as in \"latency.hold.p99_us\"",
    );
}

#[test]
fn a_toml_syntax_error_names_line_and_column() {
    let text = BASE.replace("nodes = 2", "nodes = = 2");
    let error = Scenario::parse(&text, "scenarios/x.toml").expect_err("not TOML");
    match &error {
        ScenarioError::Invalid { file, line, column, key, .. } => {
            assert_eq!((file.as_str(), *line, *column, key.as_deref()), ("scenarios/x.toml", 22, 9, None));
        }
        ScenarioError::Read { .. } => panic!("unexpected {error}"),
    }
    assert!(error.to_string().starts_with("scenarios/x.toml:22:9: "), "{error}");
}

#[test]
fn a_missing_file_is_named() {
    let error = Scenario::load("scenarios/does-not-exist.toml").expect_err("no such file");
    assert!(error.to_string().starts_with("scenarios/does-not-exist.toml: cannot read the scenario: "), "{error}");
}

#[test]
fn unfenced_lock_is_allowed_but_flagged() {
    let scenario = Scenario::parse(&BASE.replace("nodes = 2", "nodes = 2\nhold_mode = \"unfenced-lock\""), "x.toml")
        .expect("unsafe modes are allowed in scenarios");
    assert!(scenario.is_unsafe());
    assert!(!scenario.with_hold_mode(HoldMode::FencedLock).is_unsafe());
}

#[test]
fn arrivals_expand_to_exactly_the_users_sorted_and_inside_the_window() {
    let scenario = Scenario::parse(BASE, "x.toml").expect("valid");
    let times = scenario.arrival_times_us();
    assert_eq!(times.len() as u64, scenario.users_total());
    assert_eq!(times.len(), 2_000);
    assert!(times.is_sorted());
    let curve = &scenario.arrivals[0];
    let start_us = (curve.start_s() * 1e6) as u64;
    let end_us = ((curve.start_s() + curve.window_s()) * 1e6) as u64;
    assert!(times.iter().all(|time| (start_us..=end_us).contains(time)), "{:?}..{:?}", times.first(), times.last());
}

#[test]
fn a_spike_is_front_loaded() {
    let scenario = Scenario::parse(BASE, "x.toml").expect("valid");
    let times = scenario.arrival_times_us();
    let curve = &scenario.arrivals[0];
    let at = |fraction: f64| ((curve.start_s() + curve.window_s() * fraction) * 1e6) as u64;
    let first_quarter = times.iter().filter(|&&time| time < at(0.25)).count();
    let second_half = times.iter().filter(|&&time| time >= at(0.5)).count();
    assert!(first_quarter > 5 * second_half, "{first_quarter} in the first quarter, {second_half} in the second half");
}

#[test]
fn arrival_times_depend_only_on_the_seed() {
    let scenario = Scenario::parse(BASE, "x.toml").expect("valid");
    assert_eq!(scenario.arrival_times_us(), scenario.clone().arrival_times_us());
    assert_ne!(scenario.arrival_times_us(), scenario.clone().with_seed(2).arrival_times_us());
}

#[test]
fn perturbed_shipped_scenarios_still_load() {
    for name in SHIPPED {
        let scenario = load_shipped(name);
        for seed in 0..20 {
            let perturbed = scenario.perturbed(seed);
            let text = toml::to_string(&perturbed).expect("serializes");
            if let Err(error) = Scenario::parse(&text, name) {
                panic!("{name} perturbed with seed {seed} is refused: {error}\n{text}");
            }
            if !scenario.faults.is_empty() && seed == 0 {
                assert_ne!(perturbed.faults, scenario.faults, "{name}");
            }
        }
    }
}

/// A scenario that uses every key, every shape and every fault kind.
const EVERYTHING: &str = r#"
name = "everything"
description = "every key at least once"
seed = 3
duration_s = 300
clients = 3

[venue]
[[venue.schedules]]
id = 1
concert = "Everything Live"
opens_at_s = 20
[[venue.schedules.sections]]
name = "A"
seats = 10
price_points = 100
popularity = 1.5

[engine]
nodes = 2
store = "memory"
hold_mode = "fenced-lock"
hold_ttl_s = 60
lock_ttl_ms = 800
admission = { rate_per_s = 10.5, active_max = 100, order = "random-at-open", admitted_ttl_s = 120 }
rate_limits = { per_ip_per_s = 5, per_token_per_s = 2, burst = 10 }

[network]
latency_ms = { min = 0.5, max = 3 }
store_latency_ms = { min = 0.1, max = 0.4 }
fail_rate = 0.001
tick_ms = 2

[[arrivals]]
shape = "spike"
users = 100
start_s = 15
ramp_s = 3
decay_s = 10
[[arrivals]]
shape = "ramp"
users = 50
start_s = 30
duration_s = 20
[[arrivals]]
shape = "constant"
rate_per_s = 2
start_s = 60
duration_s = 30
[[arrivals]]
shape = "steps"
users = 40
start_s = 100
duration_s = 60
steps = [{ at_s = 0, rate_per_s = 1 }, { at_s = 30, rate_per_s = 3 }]

[users]
patience_s = 120
poll_interval_ms = { min = 200, max = 900 }
request_timeout_ms = 1_500
retries_max = 2
points = 10_000
seats_per_user = 2
cancel_probability = 0.1
seat_choice = "random"

[[bots]]
name = "counted"
ips = 2
rate_per_s = 50
start_s = 10
end_s = 60
targets = ["queue-join", "seat-map", "queue-status"]
[[bots]]
name = "listed"
ips = ["192.0.2.1", "2001:db8::1"]
rate_per_s = 5
start_s = 10
end_s = 20
targets = ["seat-map"]

[[faults]]
kind = "partition"
at_s = 30
heal_at_s = 40
a = ["engine-1", "engine-2"]
b = "store-*"
one_way = true
[[faults]]
kind = "hold-link"
at_s = 50
release_at_s = 52
a = "client-1"
b = "engine-1"
[[faults]]
kind = "latency"
at_s = 60
until_s = 70
a = "engine-*"
b = "store-cache"
latency_ms = 25.5
[[faults]]
kind = "crash"
at_s = 80
restart_at_s = 90
host = "store-cache"
[[faults]]
kind = "pause-at"
point = "confirm.before_commit"
host = "engine-1"
at_s = 25
pause_ms = 700
times = 4
[[faults]]
kind = "on-event"
event = "lock-ttl-below"
threshold_ms = 50
action = { pause_ms = 900 }
host = "engine-2"
at_s = 20
times = 2
[[faults]]
kind = "clock-skew"
host = "engine-1"
at_s = 5
skew_ms = -250
[[faults]]
kind = "store-failover"
at_s = 100
host = "store-cache"
lose_last_ms = 0
[[faults]]
kind = "slow-store"
at_s = 110
until_s = 130
host = "store-record"
extra_ms = 40

[agent]
policy = "llm"
interval_s = 2.5
cassette = "cassettes/everything.json"

[slo]
oversell = "<= 0"
"violations.no-double-sale" = "== 0"
"#;

/// Every word written inside backticks in `text`.
fn backticked_words(text: &str) -> std::collections::BTreeSet<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .flat_map(|span| span.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '+')))
        .filter(|word| !word.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Keys whose string values are names from a fixed list (enums), which must be documented.
const NAMED_VALUES: [&str; 11] = [
    "store",
    "hold_mode",
    "record_replication",
    "order",
    "seat_choice",
    "targets",
    "shape",
    "kind",
    "point",
    "event",
    "policy",
];

/// The keys of `value` (not those under `[slo]`, which are metric names), and the string
/// values of the keys in [`NAMED_VALUES`].
fn keys_and_names(value: &toml::Value, parent_key: &str, words: &mut Vec<String>) {
    match value {
        toml::Value::Table(table) => {
            for (key, value) in table {
                if parent_key != "slo" {
                    words.push(key.clone());
                    keys_and_names(value, key, words);
                }
            }
        }
        toml::Value::Array(items) => items.iter().for_each(|item| keys_and_names(item, parent_key, words)),
        toml::Value::String(name) if NAMED_VALUES.contains(&parent_key) => words.push(name.clone()),
        _ => {}
    }
}

#[test]
fn every_key_and_every_value_name_is_documented_in_the_readme() {
    let scenario = Scenario::parse(EVERYTHING, "everything.toml").unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(scenario.faults.len(), 9);
    assert_eq!(scenario.users_total(), 100 + 50 + 60 + 40);
    let readme = std::fs::read_to_string(scenarios_dir().join("README.md")).expect("scenarios/README.md");
    let documented = backticked_words(&readme);
    let value = toml::Value::try_from(&scenario).expect("a scenario is a TOML table");
    let mut words = Vec::new();
    keys_and_names(&value, "", &mut words);
    assert!(words.len() > 100, "{words:?}");
    let missing: Vec<&String> =
        words.iter().filter(|word| !documented.contains(*word) && !readme.contains(&format!("`{word}`"))).collect();
    assert!(missing.is_empty(), "not documented in scenarios/README.md: {missing:?}");
}

#[test]
fn the_readme_example_loads() {
    let readme = std::fs::read_to_string(scenarios_dir().join("README.md")).expect("scenarios/README.md");
    let example = readme
        .split("## Example")
        .nth(1)
        .and_then(|section| section.split("```toml\n").nth(1))
        .and_then(|block| block.split("```").next())
        .expect("an example TOML block under `## Example`");
    let scenario = Scenario::parse(example, "README.md").unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(scenario.hosts().len(), 2 + 2 + 4 + 1);
}

#[test]
fn errors_inside_arrival_curves_point_at_the_key() {
    check_error(
        &BASE.replace("ramp_s = 2\n", "ramp_s = \"slow\"\n"),
        "scenarios/x.toml:31:10: key `arrivals[0].ramp_s`: invalid type: string \"slow\", expected f64",
    );
    check_error(
        &BASE.replace("ramp_s = 2\n", "ramp_s = 2\nrise_s = 1\n"),
        "scenarios/x.toml:32:1: key `arrivals[0].rise_s`: unknown field `rise_s`, expected one of `users`, \
         `start_s`, `ramp_s`, `decay_s`",
    );
    check_error(
        &BASE.replace("decay_s = 8\n", "decay_s = 20\n"),
        "scenarios/x.toml:32:1: key `arrivals[0].decay_s`: the curve ends at 98.1 s (start_s + ramp_s + 4.6 × \
         decay_s), after the run's duration_s = 60",
    );
}

#[test]
fn live_scenarios_load_for_a_live_run() {
    let directory = scenarios_dir().join("live");
    let mut loaded = 0;
    for entry in std::fs::read_dir(&directory).expect("scenarios/live/ is readable") {
        let path = entry.expect("directory entry").path();
        if path.extension().is_some_and(|extension| extension == "toml") {
            Scenario::load_live(&path).unwrap_or_else(|error| panic!("{error}"));
            loaded += 1;
        }
    }
    assert!(loaded >= 2, "{loaded} live scenarios");
}

#[test]
fn a_fault_a_live_run_cannot_apply_is_refused_with_file_line_and_key() {
    let base = std::fs::read_to_string(scenarios_dir().join("live/small-opening-shared.toml")).expect("scenario");
    let base_lines = base.lines().count();
    let cases = [
        (
            "[[faults]]\nkind = \"clock-skew\"\nhost = \"engine-1\"\nat_s = 5\nskew_ms = 100\n",
            Some(1),
            "faults[0].kind",
            "is not applied in a live run",
        ),
        (
            "[[faults]]\nkind = \"crash\"\nhost = \"store-record\"\nat_s = 5\n",
            Some(2),
            "faults[0].host",
            "does not stop store-record",
        ),
        (
            "[[faults]]\nkind = \"crash\"\nhost = \"store-cache\"\nat_s = 5\nrestart_at_s = 8\n",
            None,
            "faults[0].lose_data",
            "restarts empty",
        ),
        ("[[faults]]\nkind = \"pause\"\nhost = \"engine-2\"\nat_s = 5\npause_ms = 1_000\n", None, "", ""),
    ];
    for (faults, line, key, words) in cases {
        let path = std::env::temp_dir().join(format!("tcore-live-refusal-{}.toml", std::process::id()));
        std::fs::write(&path, format!("{base}\n{faults}")).expect("a temporary scenario");
        let outcome = Scenario::load_live(&path);
        std::fs::remove_file(&path).ok();
        if key.is_empty() {
            outcome.unwrap_or_else(|error| panic!("{faults}: {error}"));
            continue;
        }
        let error = outcome.expect_err(faults);
        match &error {
            ScenarioError::Invalid { line: at, key: named, .. } => {
                assert_eq!(named.as_deref(), Some(key), "{error}");
                // The fault's table starts after the base and a blank line; a key not written
                // (`lose_data`) is blamed on its fault's lines.
                let first = base_lines + 2;
                match line {
                    Some(offset) => assert_eq!(*at, first + offset, "{error}"),
                    None => assert!((first..first + 6).contains(at), "{error}"),
                }
            }
            ScenarioError::Read { .. } => panic!("unexpected {error}"),
        }
        assert!(error.to_string().contains(words), "{error}");
    }
}
