//! A live run end to end against an engine served on a real socket (memory store, in this
//! process), and the checker catching a doctored live history.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use tcore_engine::clock::SystemClock;
use tcore_engine::config::{AdminToken, EngineConfig, RateLimits, TrustedProxies};
use tcore_engine::domain::ReservationStatus;
use tcore_engine::faults::NoFaults;
use tcore_engine::sessions::{SessionConfig, SessionKey};
use tcore_engine::store::{CacheStore, MemoryStore, MemoryStoreConfig, OutboxRelay, OutboxRelayConfig, RecordStore};
use tcore_engine::{Engine, EngineParts};
use tcore_sim::checker::{CheckReport, check};
use tcore_sim::history::{FinalReservation, History};
use tcore_sim::live::deploy::Deployment;
use tcore_sim::live::{LiveRun, load};
use tcore_sim::scenario::Scenario;

const SESSION_SECRET: &str = "a-live-test-session-secret-of-32-bytes-or-more";
const ADMIN_SECRET: &str = "a-live-test-admin-token";

const SCENARIO: &str = r#"
name = "live-test"
seed = 11
duration_s = 8

[venue]
[[venue.schedules]]
id = 1
concert = "Live Test"
opens_at_s = 0
[[venue.schedules.sections]]
name = "Floor"
seats = 40
price_points = 100
popularity = 1.0

[engine]
nodes = 1
hold_ttl_s = 10

[engine.admission]
rate_per_s = 100
active_max = 200

[[arrivals]]
shape = "spike"
users = 100
start_s = 0.5
ramp_s = 1
decay_s = 1

[users]
patience_s = 5
poll_interval_ms = { min = 100, max = 300 }
request_timeout_ms = 2_000
points = 1_000
"#;

/// Serves an engine on the memory store on a loopback port, with the scenario's sale loaded,
/// on a runtime of its own (the live driver blocks the calling thread).
fn serve(scenario: &Scenario) -> (Deployment, tokio::runtime::Runtime) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let address = runtime.block_on(async {
        let store = Arc::new(MemoryStore::new(MemoryStoreConfig::default()));
        let config = EngineConfig {
            node: "engine-1".into(),
            sessions: SessionConfig {
                key: SessionKey::Hs256 { secret: SESSION_SECRET.as_bytes().to_vec() },
                ..SessionConfig::default()
            },
            admin_tokens: vec![AdminToken { name: "load".into(), secret: ADMIN_SECRET.into() }],
            trusted_proxies: TrustedProxies::new([IpAddr::V4(Ipv4Addr::LOCALHOST)]),
            rate_limits: RateLimits { per_ip_per_s: 100_000, per_token_per_s: 100_000, burst: 100_000 },
            hold_ttl_ms: scenario.engine.hold_ttl_s * 1_000,
            token_secret: b"a-live-test-queue-token-secret".to_vec(),
            ..EngineConfig::default()
        };
        let engine = Engine::new(EngineParts {
            config,
            clock: Arc::new(SystemClock::new()),
            record: Arc::clone(&store) as Arc<dyn RecordStore>,
            cache: Arc::clone(&store) as Arc<dyn CacheStore>,
            faults: Arc::new(NoFaults),
        })
        .expect("an engine");
        scenario.catalogue(scenario.users_total()).load_into(&engine).await.expect("the sale loads");
        // As `tcore-engine serve` runs a node on the memory store: its outbox relayed to the log.
        let relay = OutboxRelay::to_log(Arc::clone(&store) as Arc<dyn RecordStore>, OutboxRelayConfig::default());
        tokio::spawn(relay.run());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a loopback port");
        let address = listener.local_addr().expect("its address");
        tokio::spawn(tcore_engine::server::serve(listener, engine, std::future::pending()));
        address
    });
    let deployment =
        Deployment::target(vec![format!("http://{address}")], ADMIN_SECRET.into(), SESSION_SECRET.as_bytes().to_vec());
    (deployment, runtime)
}

fn verdict(report: &CheckReport, invariant: &str) -> (bool, u64) {
    let verdict = report.verdicts.iter().find(|verdict| verdict.invariant.name() == invariant).expect("an invariant");
    (verdict.passed, verdict.violations)
}

fn confirmed(history: &History) -> Vec<FinalReservation> {
    let state = &history.final_state;
    state
        .reservations
        .iter()
        .filter(|reservation| reservation.status == ReservationStatus::Confirmed)
        .cloned()
        .collect()
}

#[test]
fn a_live_run_passes_and_its_history_doctored_with_a_double_sale_or_a_lost_confirmation_fails() {
    let scenario = Scenario::parse(SCENARIO, "live-test.toml").expect("a scenario");
    let (deployment, _runtime) = serve(&scenario);
    let LiveRun { world, figures } = load(&scenario, "live-test.toml", &deployment, &mut |_| {}).expect("a live run");

    assert_eq!(figures.arrivals, 100);
    assert_eq!(figures.journeys_started, 100);
    assert!(!figures.partial);
    // The open model: no journey starts before its arrival time (the pool is started ahead of
    // the run, so a journey that slept from then would), and the first starts on time.
    let first_arrival_us = scenario.arrival_times_us()[0];
    let first_call_us = world.history.operations.iter().map(|operation| operation.invoke_us).min().expect("calls");
    assert!(
        (first_arrival_us..first_arrival_us + 50_000).contains(&first_call_us),
        "the first call went out at {first_call_us} us, the first arrival is at {first_arrival_us} us"
    );
    let report = check(&world.history);
    assert!(report.verdicts.iter().all(|verdict| verdict.passed), "{:#?}", report.violations);
    let sold = confirmed(&world.history);
    assert!(!sold.is_empty(), "nothing was sold: the run tested nothing");

    // A second confirmed reservation of a sold seat, for another user: a double sale.
    let mut doubled = world.history.clone();
    let twin = FinalReservation {
        id: doubled.final_state.reservations.iter().map(|reservation| reservation.id).max().unwrap_or(0) + 1,
        user_id: sold[0].user_id % 100 + 1,
        ..sold[0].clone()
    };
    doubled.final_state.reservations.push(twin);
    let (passed, violations) = verdict(&check(&doubled), "no-double-sale");
    assert!(!passed && violations > 0, "a double sale went unseen");

    // A confirmation a fan was told of, gone from the system of record.
    let mut lost = world.history.clone();
    lost.final_state.reservations.retain(|reservation| reservation.id != sold[0].id);
    let (passed, violations) = verdict(&check(&lost), "acknowledged-confirmations-durable");
    assert!(!passed && violations > 0, "a lost confirmation went unseen");
}

/// `tcore load` interrupted with SIGINT (Ctrl-C) stops the fans, still reads the nodes' state
/// back, writes a run result marked partial and exits 1.
#[cfg(target_os = "linux")]
#[test]
fn an_interrupted_live_run_reads_the_nodes_back_and_writes_a_partial_run_result() {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    let tcore = std::path::PathBuf::from(env!("CARGO_BIN_EXE_tcore"));
    let engine = tcore.with_file_name("tcore-engine");
    assert!(engine.is_file(), "{} is built with the workspace (`cargo build --workspace --bins`)", engine.display());
    let scenario = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/live/small-opening.toml");
    let out = std::env::temp_dir().join(format!("tcore-interrupted-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let mut child = Command::new(&tcore)
        .args(["load", "--spawn", "--quiet", "--out"])
        .arg(&out)
        .arg(&scenario)
        .env("TCORE_ENGINE_BIN", &engine)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcore load starts");
    // Well into the spike (it starts at 1 s, after a 2 s launch lead), long before its end.
    std::thread::sleep(Duration::from_secs(6));
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("a pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("tcore load did not stop within 90 s of SIGINT");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = child.wait_with_output().expect("output");
    let printed = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert_eq!(status.code(), Some(1), "a partial run does not pass:\n{printed}");
    let run: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.join("run.json")).unwrap_or_else(|error| panic!("{error}\n{printed}")),
    )
    .expect("JSON");
    assert_eq!(run["partial"], serde_json::json!(true), "{printed}");
    assert_eq!(run["mode"], serde_json::json!("live"));
    let started = run["live"]["journeys_started"].as_u64().expect("a count");
    assert!(started > 0 && started < run["live"]["arrivals"].as_u64().expect("a count"), "{}", run["live"]);
    assert_eq!(run["safety"]["passed"], serde_json::json!(true), "what ran was judged: {}", run["safety"]);
    assert!(printed.contains("partial: the run stopped before every arrival ran"), "{printed}");
    let _ = std::fs::remove_dir_all(&out);
}

/// The open model: with the driver's link to the node slowed by a `latency` fault (a fault
/// proxy on the link), journeys still start on schedule, and the latency measured from each
/// call's intended start takes the slowdown in.
#[test]
fn journeys_start_on_schedule_against_a_slowed_node_and_their_latency_shows_it() {
    use std::process::Command;

    let tcore = std::path::PathBuf::from(env!("CARGO_BIN_EXE_tcore"));
    let engine = tcore.with_file_name("tcore-engine");
    assert!(engine.is_file(), "{} is built with the workspace (`cargo build --workspace --bins`)", engine.display());
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/live/small-opening.toml");
    let text = std::fs::read_to_string(&base).expect("scenario");
    // Across the spike (1 s to about 7 s): 250 ms each way, so a join takes half a second.
    let slowed = format!(
        "{text}\n[[faults]]\nkind = \"latency\"\nat_s = 1\nuntil_s = 8\na = \"client-*\"\nb = \"engine-1\"\nlatency_ms = 250\n"
    );
    let dir = std::env::temp_dir().join(format!("tcore-slowed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory");
    let scenario = dir.join("slowed.toml");
    std::fs::write(&scenario, slowed).expect("a scenario");
    let output = Command::new(&tcore)
        .args(["load", "--spawn", "--quiet", "--out"])
        .arg(dir.join("out"))
        .arg(&scenario)
        .env("TCORE_ENGINE_BIN", &engine)
        .output()
        .expect("tcore load runs");
    let printed = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    let run: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join("out/run.json")).unwrap_or_else(|error| panic!("{error}\n{printed}")),
    )
    .expect("JSON");
    assert_eq!(run["safety"]["passed"], serde_json::json!(true), "{printed}");
    let live = &run["live"];
    assert_eq!(live["journeys_started"], live["arrivals"], "{live}");
    // On schedule: on a machine busy with other tests a few may start some milliseconds late
    // (past the 10 ms that counts as late), none by anything like the slowed node's 500 ms join,
    // which a closed model would wait for.
    let late = live["journeys_late"].as_u64().expect("a count");
    let lateness_max_us = live["lateness_max_us"].as_u64().expect("a lateness");
    assert!(late <= 20 && lateness_max_us < 200_000, "journeys started on schedule: {live}");
    assert_eq!(live["fault_errors"], serde_json::json!([]), "{live}");
    let window = &run["faults"][0];
    assert_eq!(window["kind"], serde_json::json!("latency"), "{}", run["faults"]);
    let join_p99_us = run["score"]["latency"]["queue_join"]["p99_us"].as_u64().expect("a join p99");
    assert!(join_p99_us >= 500_000, "a join took a round trip of 2 × 250 ms: p99 {join_p99_us} us\n{printed}");
    let proxied = live["links"]["client-* → engine-1"]["bytes_to_upstream"].as_u64().unwrap_or(0);
    assert!(proxied > 0, "the fans' calls went through the proxy: {}", live["links"]);
    let _ = std::fs::remove_dir_all(&dir);
}
