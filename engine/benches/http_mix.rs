//! The engine's HTTP benchmark: the release engine on the memory store against a bare axum
//! handler, both driven with the same realistic mix by the same closed-loop driver in the
//! same run, so the figure that matters is their ratio.
//!
//! The mix, per request: 75 % queue status polls, 24 % holds on random seats of a 1,000-seat
//! map (each with its own Idempotency-Key; most meet a taken seat once the map fills), 1 %
//! seat map reads. Run: `cargo bench -p tcore-engine --bench http_mix` (or `just bench`).
//! Environment: `BENCH_SECONDS` per round and target (default 5), `BENCH_ROUNDS` (default 3),
//! `BENCH_CONNECTIONS` (default 64).

#![allow(clippy::print_stdout, clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::routing::{get, post};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use support::{Fan, Server, admitted_fans, client, closed_loops, engine_command, env_or, free_addr, send, session_for};

const BARE_LISTEN_ENV: &str = "TCORE_BENCH_BARE_LISTEN";
const SEATS: u64 = 1_000;
const USERS: u64 = 500;

#[derive(Debug, Default)]
struct Tally {
    ok: AtomicU64,
    client_errors: AtomicU64,
    server_errors: AtomicU64,
    failures: AtomicU64,
}

struct Figures {
    requests_per_s: f64,
    latency_us_p50: u64,
    latency_us_p99: u64,
    ok: u64,
    client_errors: u64,
    server_errors: u64,
    failures: u64,
}

fn main() {
    if let Ok(listen) = std::env::var(BARE_LISTEN_ENV) {
        serve_bare(listen.parse().expect("bare listen address"));
        return;
    }
    let seconds: u64 = env_or("BENCH_SECONDS", 5);
    let rounds: usize = env_or("BENCH_ROUNDS", 3);
    let connections: usize = env_or("BENCH_CONNECTIONS", 64);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        println!("http_mix: {connections} connections, {rounds} rounds of {seconds} s per target; server and driver share the machine");
        let bare_addr = free_addr();
        let _bare = Server::start(Command::new(std::env::current_exe().unwrap()).env(BARE_LISTEN_ENV, bare_addr.to_string()), bare_addr).await;
        // The bare handler is sent the same credentials, so both targets read the same bytes.
        let bare_fans: Vec<Fan> =
            (1..=USERS).map(|user_id| Fan { session: session_for(user_id), token: format!("v2.1.{user_id}.1.0.bare-token") }).collect();
        let engine_addr = free_addr();
        let _engine = Server::start(&mut engine_command(engine_addr, SEATS, USERS), engine_addr).await;
        let tokens = admitted_fans(engine_addr, USERS).await;

        // Both servers run throughout. Alternate the targets so that a disturbance of the machine hits both alike; report
        // each target's median round.
        let (mut bare_rounds, mut engine_rounds) = (Vec::new(), Vec::new());
        for round in 1..=rounds {
            let bare = drive(bare_addr, &bare_fans, connections, seconds).await;
            report(&format!("round {round} bare axum"), &bare);
            bare_rounds.push(bare);
            let engine = drive(engine_addr, &tokens, connections, seconds).await;
            report(&format!("round {round} engine"), &engine);
            engine_rounds.push(engine);
        }
        let bare = median(bare_rounds);
        let engine = median(engine_rounds);
        println!("median of {rounds} rounds:");
        report("bare axum handler", &bare);
        report("engine (memory store)", &engine);
        println!("ratio: engine / bare = {:.1} % (target >= 60 %)", 100.0 * engine.requests_per_s / bare.requests_per_s);
    });
}

fn median(mut rounds: Vec<Figures>) -> Figures {
    rounds.sort_by(|a, b| a.requests_per_s.total_cmp(&b.requests_per_s));
    rounds.swap_remove(rounds.len() / 2)
}

fn report(name: &str, figures: &Figures) {
    println!(
        "{name:>22}: {:>9.0} req/s  p50 {:>6} us  p99 {:>6} us  (2xx {}, 4xx {}, 5xx {}, transport failures {})",
        figures.requests_per_s,
        figures.latency_us_p50,
        figures.latency_us_p99,
        figures.ok,
        figures.client_errors,
        figures.server_errors,
        figures.failures
    );
}

/// Drives the mix over `connections` closed loops for `seconds`.
async fn drive(addr: SocketAddr, tokens: &[Fan], connections: usize, seconds: u64) -> Figures {
    let client = client();
    let tally = Arc::new(Tally::default());
    let tokens = Arc::new(tokens.to_vec());
    let loop_tally = Arc::clone(&tally);
    let (latency, elapsed_s) = closed_loops(connections, seconds, move |worker, sequence| {
        let (client, tally, tokens) = (client.clone(), Arc::clone(&loop_tally), Arc::clone(&tokens));
        let mut rng = StdRng::seed_from_u64(((worker as u64) << 40) ^ sequence);
        let fan = tokens[rng.random_range(0..tokens.len())].clone();
        let roll = rng.random_range(0..100);
        let seat = rng.random_range(1..=SEATS);
        async move {
            let result = if roll < 75 {
                let token = &fan.token;
                send(&client, "GET", format!("http://{addr}/v1/queue/{token}"), Some(&fan), None, None).await
            } else if roll < 99 {
                let body = format!("{{\"schedule_id\":1,\"seat_id\":{seat}}}");
                let key = Some(format!("w{worker}-{sequence}"));
                send(&client, "POST", format!("http://{addr}/v1/holds"), Some(&fan), key, Some(body)).await
            } else {
                send(&client, "GET", format!("http://{addr}/v1/schedules/1/seats"), Some(&fan), None, None).await
            };
            let counter = match result {
                Ok((200..=299, _)) => &tally.ok,
                Ok((400..=499, _)) => &tally.client_errors,
                Ok(_) => &tally.server_errors,
                Err(()) => &tally.failures,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    })
    .await;
    Figures {
        requests_per_s: latency.len() as f64 / elapsed_s,
        latency_us_p50: latency.value_at_quantile(0.5),
        latency_us_p99: latency.value_at_quantile(0.99),
        ok: tally.ok.load(Ordering::Relaxed),
        client_errors: tally.client_errors.load(Ordering::Relaxed),
        server_errors: tally.server_errors.load(Ordering::Relaxed),
        failures: tally.failures.load(Ordering::Relaxed),
    }
}

/// The reference: the same routes answered by handlers that do nothing but return a small
/// JSON body, on the same axum and tokio.
fn serve_bare(listen: SocketAddr) {
    const BODY: &str = "{\"status\":\"ADMITTED\",\"position\":0,\"eta_s\":0}";
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let router = Router::new()
            .route("/v1/queue/{token}", get(|| async { ([("content-type", "application/json")], BODY) }))
            .route("/v1/holds", post(|| async { ([("content-type", "application/json")], BODY) }))
            .route("/v1/schedules/{id}/seats", get(|| async { ([("content-type", "application/json")], BODY) }));
        let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
        axum::serve(listener, router).await.unwrap();
    });
}
