//! Hold attempts per second and their p99: the release engine on the memory store, then two
//! engine nodes sharing Redis and MariaDB, driven by the same closed-loop driver in the same
//! run; and, as the reference for the store alone, `redis-benchmark` running the seat gate's
//! Lua script by its SHA (when `redis-benchmark` is installed).
//!
//! Every request is `POST /v1/holds` on a random seat by a random admitted user, without an
//! Idempotency-Key: the first attempts take free seats (a database transaction each on
//! redis+mariadb), and as the map fills most meet a taken seat (refused by the node's seat
//! hints, or by the seat gate in Redis for a seat the node has not seen closed lately; the
//! nodes read `TCORE_SEAT_HINT_MS` from the environment, `0` to measure without hints).
//! Round 1 includes the filling, and reports how fast the first half of the seats was granted
//! (the database's share of the work); later rounds are the steady state of a spike on a
//! mostly taken map.
//!
//! Run: `cargo bench -p tcore-engine --bench holds` (`just bench-holds`). Environment:
//! `BENCH_SECONDS` per round (5), `BENCH_ROUNDS` (3), `BENCH_CONNECTIONS` (64), `BENCH_SEATS`
//! (5000), `TCORE_BENCH_MARIADB` (mysql://root@127.0.0.1:3306), `TCORE_BENCH_REDIS`
//! (redis://127.0.0.1:6379). Servers, drivers, Redis and MariaDB all share this machine.

#![allow(clippy::print_stdout, clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use sqlx::migrate::MigrateDatabase;
use support::{Fan, Server, admitted_fans, client, closed_loops, env_or, free_addr, send};
use tcore_engine::domain::ScheduleId;
use tcore_engine::store::{HoldRequest, RedisStore, RedisStoreConfig};

const USERS: u64 = 1_000;
const SECRET: &str = "bench-secret-0123456789";

#[derive(Debug, Default)]
struct Tally {
    granted: AtomicU64,
    taken: AtomicU64,
    other_client_errors: AtomicU64,
    server_errors: AtomicU64,
    failures: AtomicU64,
    /// When (µs after the round began) half the seats were granted, if they were.
    half_filled_at_us: AtomicU64,
}

fn main() {
    let seconds: u64 = env_or("BENCH_SECONDS", 5);
    let rounds: usize = env_or("BENCH_ROUNDS", 3);
    let connections: usize = env_or("BENCH_CONNECTIONS", 64);
    let seats: u64 = env_or("BENCH_SEATS", 5_000);
    let mariadb: String = env_or("TCORE_BENCH_MARIADB", "mysql://root@127.0.0.1:3306".to_owned());
    let redis_url: String = env_or("TCORE_BENCH_REDIS", "redis://127.0.0.1:6379".to_owned());
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        println!(
            "holds: {connections} connections, {rounds} rounds of {seconds} s per setup, {seats} seats, {USERS} users; \
             everything shares this machine ({} cores)",
            std::thread::available_parallelism().map_or(0, usize::from)
        );

        let memory_addr = free_addr();
        let memory = Server::start(&mut node_command(memory_addr, "memory", seats, USERS, &[]), memory_addr).await;
        let tokens = admitted_fans(memory_addr, USERS).await;
        for round in 1..=rounds {
            report(
                &format!("memory, 1 node, round {round}"),
                seats,
                &drive(&[memory_addr], &tokens, connections, seats, seconds).await,
            );
        }
        drop(memory);

        let name = format!("tcore_bench_{}", std::process::id());
        let database_url = format!("{mariadb}/{name}");
        let prefix = format!("{name}:");
        let shared = [
            "--database-url".to_owned(),
            database_url.clone(),
            "--redis-url".to_owned(),
            redis_url.clone(),
            "--redis-prefix".to_owned(),
            prefix.clone(),
        ];
        let (first, second) = (free_addr(), free_addr());
        let node_1 = Server::start(&mut node_command(first, "redis+mariadb", seats, USERS, &shared), first).await;
        let node_2 = Server::start(&mut node_command(second, "redis+mariadb", seats, 0, &shared), second).await;
        let tokens = admitted_fans(first, USERS).await;
        for round in 1..=rounds {
            let figures = drive(&[first, second], &tokens, connections, seats, seconds).await;
            report(&format!("redis+mariadb, 2 nodes, round {round}"), seats, &figures);
        }
        drop((node_1, node_2));

        redis_benchmark_reference(&redis_url, &prefix, seats).await;
        let _ = sqlx::MySql::drop_database(&database_url).await;
        delete_keys(&redis_url, &prefix).await;
    });
}

fn node_command(listen: SocketAddr, store: &str, seats: u64, users: u64, extra: &[String]) -> Command {
    let mut command = support::engine_command(listen, seats, users);
    command
        .args(["--store", store, "--node", &format!("engine-{}", listen.port()), "--token-secret", SECRET])
        // Random users on random seats: with the default of 4 seats a user, 1,000 users could not
        // fill the map the measurement is about.
        .args(["--seats-per-user-max", "100"])
        .args(extra);
    command
}

struct Figures {
    attempts_per_s: f64,
    latency_us_p50: u64,
    latency_us_p99: u64,
    tally: Arc<Tally>,
}

fn report(name: &str, seats: u64, figures: &Figures) {
    let count = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    let half_filled_at_us = count(&figures.tally.half_filled_at_us);
    if half_filled_at_us > 0 {
        println!(
            "{name:>32}: first half of the seats ({}) granted in {:.2} s, {:.0} granted holds/s",
            seats / 2,
            half_filled_at_us as f64 / 1e6,
            (seats / 2) as f64 / (half_filled_at_us as f64 / 1e6)
        );
    }
    println!(
        "{name:>32}: {:>8.0} hold attempts/s  p50 {:>6} us  p99 {:>6} us  (granted {}, seat taken {}, other 4xx {}, 5xx {}, transport failures {})",
        figures.attempts_per_s,
        figures.latency_us_p50,
        figures.latency_us_p99,
        count(&figures.tally.granted),
        count(&figures.tally.taken),
        count(&figures.tally.other_client_errors),
        count(&figures.tally.server_errors),
        count(&figures.tally.failures),
    );
}

/// Closed loops over `connections`, spread over the nodes, each sending hold attempts.
async fn drive(nodes: &[SocketAddr], tokens: &[Fan], connections: usize, seats: u64, seconds: u64) -> Figures {
    let client = client();
    let tally = Arc::new(Tally::default());
    let (nodes, tokens) = (nodes.to_vec(), Arc::new(tokens.to_vec()));
    let loop_tally = Arc::clone(&tally);
    let started = std::time::Instant::now();
    let (latency, elapsed_s) = closed_loops(connections, seconds, move |worker, sequence| {
        let (client, tally, tokens) = (client.clone(), Arc::clone(&loop_tally), Arc::clone(&tokens));
        let node = nodes[worker % nodes.len()];
        let mut rng = StdRng::seed_from_u64(((worker as u64) << 40) ^ sequence);
        let token = tokens[rng.random_range(0..tokens.len())].clone();
        let body = format!("{{\"schedule_id\":1,\"seat_id\":{}}}", rng.random_range(1..=seats));
        async move {
            let result = send(&client, "POST", format!("http://{node}/v1/holds"), Some(&token), None, Some(body)).await;
            let granted = matches!(result, Ok((201, _)));
            let counter = match result {
                Ok((201, _)) => &tally.granted,
                Ok((409, _)) => &tally.taken,
                Ok((400..=499, _)) => &tally.other_client_errors,
                Ok(_) => &tally.server_errors,
                Err(()) => &tally.failures,
            };
            let before = counter.fetch_add(1, Ordering::Relaxed);
            if granted && before + 1 == seats / 2 {
                tally.half_filled_at_us.store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            }
        }
    })
    .await;
    Figures {
        attempts_per_s: latency.len() as f64 / elapsed_s,
        latency_us_p50: latency.value_at_quantile(0.5),
        latency_us_p99: latency.value_at_quantile(0.99),
        tally,
    }
}

/// `redis-benchmark` running the seat gate's script by SHA on random seats: what Redis alone
/// does with the atomic step every hold attempt on redis+mariadb begins with.
async fn redis_benchmark_reference(redis_url: &str, prefix: &str, seats: u64) {
    if Command::new("redis-benchmark").arg("--version").output().is_err() {
        println!("redis-benchmark not installed: no store reference");
        return;
    }
    let redis = RedisStore::connect_lazy(
        redis_url,
        RedisStoreConfig { prefix: prefix.to_owned(), ..RedisStoreConfig::default() },
    )
    .expect("Redis URL");
    let gate = redis.seat_gate();
    let schedule_id: ScheduleId = 2;
    let request = HoldRequest {
        schedule_id,
        seat_id: 0,
        user_id: 1,
        hold_ttl_ms: 300_000,
        node: "bench".into(),
        seats_per_user_max: u32::MAX,
    };
    gate.take(&request, 0).await.expect("the gate script loads");
    let host_port = redis_url.trim_start_matches("redis://").trim_end_matches('/');
    let (host, port) = host_port.rsplit_once(':').unwrap_or((host_port, "6379"));
    let key = format!("{prefix}gate:{{{schedule_id}}}:__rand_int__");
    let output = Command::new("redis-benchmark")
        .args(["-h", host, "-p", port, "-q", "-c", "50", "-n", "300000", "-r", &seats.to_string()])
        .args(["EVALSHA", gate.take_script_hash(), "1", &key, "1000", "301000", "bench-token", "86400000"])
        .output()
        .expect("redis-benchmark runs");
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text.split(['\r', '\n']).rfind(|line| line.contains("requests per second"));
    println!("{:>32}: {}", "redis-benchmark, gate script", line.unwrap_or("no figure").trim());
}

async fn delete_keys(redis_url: &str, prefix: &str) {
    let Ok(client) = redis::Client::open(redis_url) else { return };
    let Ok(mut connection) = client.get_multiplexed_async_connection().await else { return };
    let keys: Vec<String> =
        redis::cmd("KEYS").arg(format!("{prefix}*")).query_async(&mut connection).await.unwrap_or_default();
    for chunk in keys.chunks(1_000) {
        let _: Result<(), _> = redis::cmd("DEL").arg(chunk).query_async(&mut connection).await;
    }
}
