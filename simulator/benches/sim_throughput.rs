//! The simulator's throughput: simulated HTTP requests per wall second for a scenario, and the
//! same world replayed against a bare axum handler in the same run: the same hosts (store hosts
//! and the agent's host too, listening and idle), network and simulated duration, and the very
//! requests the engine world's clients sent (logged as they went out: method, path, headers
//! and body, users' and bots' alike), each from the same client host to the same node at the
//! same simulated moment, every one answered at once with a constant body. The ratio is the
//! figure that matters: what the engine, its stores and the users' logic cost on top of
//! turmoil's own round trips for the same traffic. A third world, the same hosts with no requests at all,
//! shows what turmoil's steps cost whatever the traffic; the wall time beyond it, per request,
//! is each world's cost per request.
//!
//! The requests are logged in a run of their own before any world is measured: keeping a copy
//! of every request is work that `tcore run` does not do, so the measured engine worlds run
//! exactly as `tcore run` runs them, and each must replay the logged run's operations.
//!
//! The three worlds run in rounds (`BENCH_ROUNDS`, default 3), one of each per round, and the
//! figures are each world's median: a single run on a shared machine can be 5–10 % off (and
//! far more while other work shares its cores). Every round is printed with its own ratio,
//! and the median of those ratios follows the main figure. A run keeps the memory it frees, so
//! every measured world finds its memory already faulted in by the logging run (about 0.2 s
//! less for concert-open than a fresh `tcore run`).
//!
//! Run: `cargo bench -p tcore-sim --bench sim_throughput` (or `just bench-sim`).
//! Environment: `BENCH_SCENARIO` (default `scenarios/ci/concert-open.toml`), `BENCH_ROUNDS`.

#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use axum::Router;
use tcore_engine::config::ConnectionLimits;
use tcore_engine::telemetry::ConnectionMetrics;
use tcore_sim::scenario::{self, AgentPolicy, Scenario};
use tcore_sim::world::net::{ENGINE_PORT, HttpClient, SentRequest, SimListener};
use tcore_sim::world::{self, STORE_PORT};

/// The allocator `tcore` runs on, set up as `tcore` sets it up, so that every world is
/// measured as `tcore run` runs it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    tcore_sim::allocator::configure_for_a_run();
    tcore_sim::logs::init();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let file = std::env::var("BENCH_SCENARIO").unwrap_or_else(|_| "scenarios/ci/concert-open.toml".into());
    let rounds: usize = std::env::var("BENCH_ROUNDS").ok().and_then(|rounds| rounds.parse().ok()).unwrap_or(3).max(1);
    let scenario = Scenario::load(root.join(&file)).unwrap_or_else(|error| panic!("{error}"));
    tcore_sim::allocator::size_pages_for(scenario.users_total());
    let nodes = scenario.engine.nodes.max(1);
    let clients = scenario.clients.max(1);

    // The requests the engine world sends, logged in a run of their own: logging keeps a copy
    // of every request, work (and memory) that `tcore run` does not do, so the measured engine
    // worlds below run without it. The same seed sends the same requests every time.
    let started = Instant::now();
    let mut logged_run =
        world::run_with(&scenario, &file, &mut |_| {}, world::RunOptions { log_requests: true }).unwrap();
    let logging_wall_s = started.elapsed().as_secs_f64();
    let sent = std::mem::take(&mut logged_run.requests);
    let requests = sent.iter().map(Vec::len).sum::<usize>() as u64;
    let (users, end_us, operations) =
        (logged_run.users, logged_run.history.config.end_us, logged_run.history.operations.len());
    drop(logged_run);
    println!("  logging run: {logging_wall_s:.2} s, {requests} requests logged (not measured)");

    // Each round runs the three worlds one after the other, so that a slower spell of the
    // machine weighs on all three alike; the figures are each world's median over the rounds.
    let mut walls = [Vec::new(), Vec::new(), Vec::new()];
    // Each round's own ratio too: a slow spell that lasts a whole round weighs on both of its
    // worlds, so the median of the rounds' ratios is the steadier figure on a busy machine.
    let mut ratios = Vec::new();
    for round in 1..=rounds {
        let started = Instant::now();
        let run = world::run(&scenario, &file, &mut |_| {}).unwrap();
        walls[0].push(started.elapsed().as_secs_f64());
        assert_eq!(run.history.operations.len(), operations, "a seed replays the same run");
        assert_eq!(run.history.config.end_us, end_us, "a seed replays the same run");
        drop(run);
        // Copied before the clock starts: the copy is not the reference's work.
        let sent = sent.clone();
        let started = Instant::now();
        let simulated_s = bare_world(&scenario, nodes, sent, end_us);
        walls[1].push(started.elapsed().as_secs_f64());
        // The same hosts for the same simulated time with no requests at all: what turmoil's
        // steps cost whatever the traffic, so that each world's cost per request can be told
        // apart.
        let started = Instant::now();
        bare_world(&scenario, nodes, vec![Vec::new(); clients as usize], end_us);
        walls[2].push(started.elapsed().as_secs_f64());
        let ratio = 100.0 * walls[1][round - 1] / walls[0][round - 1];
        println!(
            "  round {round}/{rounds}: engine world {:.2} s, bare handler {:.2} s ({simulated_s:.1} s simulated), idle world {:.2} s, ratio {ratio:.1} %",
            walls[0][round - 1],
            walls[1][round - 1],
            walls[2][round - 1],
        );
        ratios.push(ratio);
    }
    let [world_wall_s, bare_wall_s, idle_wall_s] = walls.map(|mut walls| median(&mut walls));

    let world_rate = requests as f64 / world_wall_s;
    let bare_rate = requests as f64 / bare_wall_s;
    let per_request_us = |wall_s: f64| 1e6 * (wall_s - idle_wall_s).max(0.0) / requests.max(1) as f64;
    println!("sim_throughput: {file}, {users} users, {requests} simulated requests, median of {rounds} rounds");
    println!("  engine world: {world_wall_s:>7.2} s wall, {world_rate:>9.0} simulated requests per wall second");
    println!("  bare handler: {bare_wall_s:>7.2} s wall, {bare_rate:>9.0} simulated requests per wall second");
    println!("  idle world:   {idle_wall_s:>7.2} s wall (the same hosts and simulated time, no requests)");
    println!(
        "  per request beyond the idle world: engine world {:.1} us, bare handler {:.1} us",
        per_request_us(world_wall_s),
        per_request_us(bare_wall_s)
    );
    println!("ratio: engine world / bare handler = {:.1} % (target >= 50 %)", 100.0 * world_rate / bare_rate);
    println!("  the median of the rounds' own ratios: {:.1} %", median(&mut ratios));
}

/// The middle value (the mean of the two middle ones for an even count).
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len().is_multiple_of(2) { (values[middle - 1] + values[middle]) / 2.0 } else { values[middle] }
}

/// The same hosts, registered in the same order, and the same network, every node answering a
/// constant body: each request a client host sent in the engine world (the same method, path,
/// headers and body) is sent again from that host, at the same simulated moment, to the same
/// node, and the world runs until the recorded run ended. The store hosts (and the agent's
/// host, where the scenario has one) listen and stay idle: turmoil runs every host each step,
/// so leaving them out would make the reference cheaper than the world it stands for. Returns
/// the simulated seconds it took.
fn bare_world(scenario: &Scenario, nodes: u32, sent: Vec<Vec<SentRequest>>, end_us: u64) -> f64 {
    let latency = &scenario.network.latency_ms;
    let mut sim = turmoil::Builder::new()
        .rng_seed(scenario.seed)
        .simulation_duration(Duration::from_micros(end_us) + Duration::from_secs(60))
        .tick_duration(Duration::from_millis(scenario.network.tick_ms))
        .min_message_latency(Duration::from_micros((latency.min * 1000.0) as u64))
        .max_message_latency(Duration::from_micros((latency.max * 1000.0) as u64))
        .tcp_capacity(1 << 16)
        .build();
    // The engine world registers its store hosts by name order, then the nodes, the agent and
    // the clients; turmoil hands out addresses in that order.
    let mut stores = [scenario::STORE_CACHE_HOST, scenario::STORE_RECORD_HOST];
    stores.sort_unstable();
    for store in stores {
        sim.host(store, || async {
            let _listener = turmoil::net::TcpListener::bind((IpAddr::V4(Ipv4Addr::UNSPECIFIED), STORE_PORT)).await?;
            std::future::pending::<()>().await;
            Ok(())
        });
    }
    for node in 1..=nodes {
        sim.host(format!("engine-{node}").as_str(), || async {
            let router = Router::new().fallback(|| async { "{\"status\":\"WAITING\",\"position\":1,\"eta_s\":1}" });
            let listener = turmoil::net::TcpListener::bind((IpAddr::V4(Ipv4Addr::UNSPECIFIED), ENGINE_PORT)).await?;
            // As the engine world serves its nodes: idle connections stay open.
            let limits = ConnectionLimits { idle_timeout_ms: None, ..ConnectionLimits::default() };
            let metrics = ConnectionMetrics::default();
            tcore_engine::server::serve_router(SimListener(listener), router, limits, metrics, std::future::pending())
                .await?;
            Ok(())
        });
    }
    if scenario.agent.policy != AgentPolicy::None {
        sim.host(scenario::AGENT_HOST, || async {
            std::future::pending::<()>().await;
            Ok(())
        });
    }
    for (client, mine) in (1..).zip(sent) {
        sim.client(format!("client-{client}").as_str(), async move {
            let http = HttpClient::default();
            for SentRequest { at_us, node, request } in mine {
                let now_us = u64::try_from(turmoil::sim_elapsed().unwrap_or_default().as_micros()).unwrap_or(u64::MAX);
                if at_us > now_us {
                    tokio::time::sleep(Duration::from_micros(at_us - now_us)).await;
                }
                let http = http.clone();
                tokio::task::spawn_local(async move {
                    let _ = http.send(&node, request, Duration::from_secs(30)).await;
                });
            }
            let now_us = u64::try_from(turmoil::sim_elapsed().unwrap_or_default().as_micros()).unwrap_or(u64::MAX);
            tokio::time::sleep(Duration::from_micros(end_us.saturating_sub(now_us))).await;
            Ok(())
        });
    }
    sim.run().unwrap();
    sim.elapsed().as_secs_f64()
}
