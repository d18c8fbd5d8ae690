//! The live driver's ceiling: the most requests per second goose, configured as `tcore load`
//! configures it (its reqwest client without cookies, one per goose user), gets from a release
//! engine on `GET /v1/schedules`, and `wrk` on the same endpoint of the same engine in the same
//! run, with as many connections. The ratio is the figure that matters: how much of what the
//! machine can serve the driver can ask for. Driver and engine share the machine's cores, as
//! `wrk` and the engine do.
//!
//! The two run in rounds (`BENCH_ROUNDS`, default 3), one of each per round, alternating so a
//! disturbance of the machine hits both alike; each figure is the median round.
//!
//! Run: `just bench-live` (it builds the release engine first). Environment: `BENCH_SECONDS`
//! per round and driver (default 5), `BENCH_ROUNDS`, `BENCH_CONNECTIONS` (default 32),
//! `TCORE_ENGINE_BIN` (default `target/release/tcore-engine`), `WRK` (default `wrk`, from
//! Debian's package of that name).

#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use goose::prelude::*;

const PATH: &str = "/v1/schedules";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|value| value.parse().ok()).unwrap_or(default)
}

/// The engine under load, killed when dropped.
struct Engine(Child);

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_engine(addr: SocketAddr) -> Engine {
    let bin = std::env::var_os("TCORE_ENGINE_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/tcore-engine"),
        PathBuf::from,
    );
    assert!(
        bin.is_file(),
        "{} is missing: `cargo build --release -p tcore-engine` (or `just bench-live`)",
        bin.display()
    );
    let child = Command::new(&bin)
        .args(["serve", "--listen", &addr.to_string(), "--demo-seats", "1000", "--demo-users", "10"])
        .args(["--rate-limit-per-ip", "100000", "--rate-limit-burst", "100000"])
        .args(["--session-secret", "bench-session-secret-of-at-least-32-bytes"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|error| panic!("starting {}: {error}", bin.display()));
    let engine = Engine(child);
    for _ in 0..400 {
        if TcpStream::connect(addr).is_ok() {
            return engine;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the engine did not listen on {addr}");
}

/// Requests per second goose got with `users` users for `seconds`, every one answered 200.
fn goose_round(base: &str, users: usize, seconds: u64) -> f64 {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let get: TransactionFunction = Arc::new(|user: &mut GooseUser| {
            Box::pin(async move {
                let _ = user.get(PATH).await?;
                Ok(())
            })
        });
        let scenario = goose::goose::Scenario::new("schedules").register_transaction(Transaction::new(get));
        let mut configuration = goose::config::GooseConfiguration::default();
        configuration.host = Some(base.to_owned());
        configuration.users = Some(users);
        configuration.increase_rate = Some(users.to_string());
        configuration.run_time = Some(seconds.to_string());
        configuration.quiet = 1;
        configuration.no_print_metrics = true;
        configuration.no_error_summary = true;
        let client = goose::client::GooseClientBuilder::new().without_cookies().timeout(Duration::from_secs(10));
        let metrics = GooseAttack::initialize_with_config(configuration)
            .unwrap()
            .register_scenario(scenario)
            .set_client_builder_without_cookies(client)
            .unwrap()
            .execute()
            .await
            .unwrap();
        let (ok, failed): (usize, usize) = metrics
            .requests
            .values()
            .fold((0, 0), |(ok, failed), request| (ok + request.success_count, failed + request.fail_count));
        assert_eq!(failed, 0, "goose saw failures");
        // Metrics are reset once every user has started; the run time counts from then.
        ok as f64 / metrics.duration.max(1) as f64
    })
}

/// Requests per second `wrk` got with `connections` connections for `seconds`.
fn wrk_round(wrk: &str, base: &str, connections: usize, seconds: u64) -> f64 {
    let output = Command::new(wrk)
        .args(["-t", "2", "-c", &connections.to_string(), "-d", &format!("{seconds}s"), &format!("{base}{PATH}")])
        .output()
        .unwrap_or_else(|error| panic!("running {wrk}: {error} (install Debian's `wrk` package, or set WRK)"));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(!text.contains("Non-2xx"), "wrk saw errors:\n{text}");
    text.lines()
        .find_map(|line| line.trim().strip_prefix("Requests/sec:"))
        .and_then(|rate| rate.trim().parse().ok())
        .unwrap_or_else(|| panic!("no rate in wrk's output:\n{text}"))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let seconds: u64 = env_or("BENCH_SECONDS", 5);
    let rounds: usize = env_or("BENCH_ROUNDS", 3);
    let connections: usize = env_or("BENCH_CONNECTIONS", 32);
    let wrk = std::env::var("WRK").unwrap_or_else(|_| "wrk".into());
    let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let _engine = start_engine(addr);
    let base = format!("http://{addr}");
    println!(
        "live_driver: GET {PATH}, {connections} connections, {rounds} rounds of {seconds} s; driver and engine share the machine"
    );
    let (mut driver, mut reference) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let goose = goose_round(&base, connections, seconds);
        let wrk = wrk_round(&wrk, &base, connections, seconds);
        println!("round {round}: goose {goose:>9.0} req/s   wrk {wrk:>9.0} req/s   ratio {:.1} %", 100.0 * goose / wrk);
        driver.push(goose);
        reference.push(wrk);
    }
    let (goose, wrk) = (median(driver), median(reference));
    println!("median: goose {goose:.0} req/s, wrk {wrk:.0} req/s");
    println!("ratio: live driver / wrk = {:.1} % (target >= 50 %)", 100.0 * goose / wrk);
}
