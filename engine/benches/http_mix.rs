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

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::{get, post};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

const BARE_LISTEN_ENV: &str = "TCORE_BENCH_BARE_LISTEN";
const SEATS: u64 = 1_000;
const USERS: u64 = 500;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

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
        let bare_tokens: Vec<String> = (0..USERS).map(|i| format!("bare-token-{i}")).collect();
        let engine_addr = free_addr();
        let mut engine_command = Command::new(env!("CARGO_BIN_EXE_tcore-engine"));
        engine_command.args([
            "serve",
            "--listen",
            &engine_addr.to_string(),
            "--demo-seats",
            &SEATS.to_string(),
            "--demo-users",
            &USERS.to_string(),
            "--admission-rate-per-s",
            "100000",
            "--active-max",
            "1000000",
            "--rate-limit-per-ip",
            "100000",
            "--rate-limit-per-token",
            "100000",
            "--rate-limit-burst",
            "100000",
        ]);
        let _engine = Server::start(&mut engine_command, engine_addr).await;
        let tokens = admitted_tokens(engine_addr).await;

        // Both servers run throughout. Alternate the targets so that a disturbance of the machine hits both alike; report
        // each target's median round.
        let (mut bare_rounds, mut engine_rounds) = (Vec::new(), Vec::new());
        for round in 1..=rounds {
            let bare = drive(bare_addr, &bare_tokens, connections, seconds).await;
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

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|value| value.parse().ok()).unwrap_or(default)
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
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

/// A server process, killed when dropped.
struct Server(Child);

impl Server {
    async fn start(command: &mut Command, addr: SocketAddr) -> Server {
        let server = Server(command.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("server starts"));
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return server;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("server on {addr} did not come up");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn send(
    client: &HttpClient,
    method: &str,
    uri: String,
    token: Option<&str>,
    key: Option<String>,
    body: Option<String>,
) -> Result<(u16, Bytes), ()> {
    let mut request = hyper::Request::builder().method(method).uri(uri);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let body = match body {
        Some(body) => {
            request = request.header("content-type", "application/json");
            Full::new(Bytes::from(body))
        }
        None => Full::new(Bytes::new()),
    };
    let response = client.request(request.body(body).map_err(|_| ())?).await.map_err(|_| ())?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.map_err(|_| ())?.to_bytes();
    Ok((status, bytes))
}

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(1024).build_http()
}

/// Joins every demo user to the demo schedule and waits until all are admitted.
async fn admitted_tokens(addr: SocketAddr) -> Vec<String> {
    let client = client();
    let mut tokens = Vec::new();
    for user_id in 1..=USERS {
        let (status, body) = send(
            &client,
            "POST",
            format!("http://{addr}/v1/schedules/1/queue"),
            None,
            None,
            Some(format!("{{\"user_id\":{user_id}}}")),
        )
        .await
        .expect("join");
        assert_eq!(status, 201, "join: {body:?}");
        let joined: serde_json::Value = serde_json::from_slice(&body).unwrap();
        tokens.push(joined["token"].as_str().unwrap().to_owned());
    }
    for token in &tokens {
        let (_, body) = send(&client, "GET", format!("http://{addr}/v1/queue/{token}?wait_s=10"), None, None, None)
            .await
            .expect("status");
        let status: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(status["status"], "ADMITTED", "{status}");
    }
    tokens
}

/// Drives the mix over `connections` closed loops for `seconds`.
async fn drive(addr: SocketAddr, tokens: &[String], connections: usize, seconds: u64) -> Figures {
    let client = client();
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let tokens = Arc::new(tokens.to_vec());
    let started = Instant::now();
    let workers: Vec<_> = (0..connections)
        .map(|worker| {
            let (client, tally, stop, tokens) =
                (client.clone(), Arc::clone(&tally), Arc::clone(&stop), Arc::clone(&tokens));
            tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(worker as u64);
                let mut latency = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
                let mut sequence = 0_u64;
                while !stop.load(Ordering::Relaxed) {
                    let token = &tokens[rng.random_range(0..tokens.len())];
                    let roll = rng.random_range(0..100);
                    let begin = Instant::now();
                    let result = if roll < 75 {
                        send(&client, "GET", format!("http://{addr}/v1/queue/{token}"), None, None, None).await
                    } else if roll < 99 {
                        sequence += 1;
                        let seat = rng.random_range(1..=SEATS);
                        let body = format!("{{\"schedule_id\":1,\"seat_id\":{seat}}}");
                        send(
                            &client,
                            "POST",
                            format!("http://{addr}/v1/holds"),
                            Some(token),
                            Some(format!("w{worker}-{sequence}")),
                            Some(body),
                        )
                        .await
                    } else {
                        send(&client, "GET", format!("http://{addr}/v1/schedules/1/seats"), Some(token), None, None)
                            .await
                    };
                    latency.saturating_record(u64::try_from(begin.elapsed().as_micros()).unwrap_or(u64::MAX).max(1));
                    let counter = match result {
                        Ok((200..=299, _)) => &tally.ok,
                        Ok((400..=499, _)) => &tally.client_errors,
                        Ok(_) => &tally.server_errors,
                        Err(()) => &tally.failures,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                latency
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut latency = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    for worker in workers {
        latency.add(worker.await.unwrap()).unwrap();
    }
    let elapsed_s = started.elapsed().as_secs_f64();
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
