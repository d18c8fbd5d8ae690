//! What an outsider's flood leaves in a release engine's memory: the engine's resident set
//! (`VmRSS` from `/proc`) after each wave of 25,000 hostile requests, each with something
//! distinct the engine might keep: a forged session, a forged queue token, an Idempotency-Key
//! on a refused call without a session, and, from a fan with a real session, an
//! Idempotency-Key on every call (records an authenticated fan can make the engine keep, until
//! their TTL).
//!
//! Run: `cargo bench -p tcore-engine --bench hostile_state` (or `just bench-hostile`).
//! Environment: `BENCH_HOSTILE_PER_WAVE` (default 25,000), `BENCH_CONNECTIONS` (default 32).

#![allow(clippy::print_stdout, clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;

use support::{Fan, Server, admitted_fans, client, engine_command, env_or, free_addr, send};

/// What one wave sends, request `n` of it.
#[derive(Debug, Clone, Copy)]
enum Wave {
    ForgedSessions,
    ForgedQueueTokens,
    KeysWithoutSession,
    KeysOfAFan,
}

impl Wave {
    fn name(self) -> &'static str {
        match self {
            Wave::ForgedSessions => "forged sessions",
            Wave::ForgedQueueTokens => "forged queue tokens",
            Wave::KeysWithoutSession => "idempotency keys without a session",
            Wave::KeysOfAFan => "idempotency keys of one fan (records kept until their TTL)",
        }
    }
}

fn main() {
    let per_wave: u64 = env_or("BENCH_HOSTILE_PER_WAVE", 25_000);
    let connections: u64 = env_or("BENCH_CONNECTIONS", 32);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let addr = free_addr();
        let server = Server::start(&mut engine_command(addr, 100, 10), addr).await;
        let fan = admitted_fans(addr, 1).await.remove(0);
        let pid = server.pid();
        println!(
            "hostile_state: {per_wave} requests per wave over {connections} connections, release engine, memory store"
        );
        let start_kb = rss_kb(pid);
        println!("{:<72} {:>10}", "engine resident set", format!("{:.1} MB", start_kb as f64 / 1024.0));
        let mut before_kb = start_kb;
        for wave in [Wave::ForgedSessions, Wave::ForgedQueueTokens, Wave::KeysWithoutSession, Wave::KeysOfAFan] {
            let statuses = flood(addr, &fan, wave, per_wave, connections).await;
            let after_kb = rss_kb(pid);
            let grown = after_kb.saturating_sub(before_kb) as f64;
            println!(
                "{:<72} {:>10} {:>8.0} B/request  answers {statuses:?}",
                format!("after {per_wave} {}", wave.name()),
                format!("{:+.1} MB", grown / 1024.0),
                grown * 1024.0 / per_wave as f64,
            );
            before_kb = after_kb;
        }
        let total = before_kb.saturating_sub(start_kb) as f64 / 1024.0;
        println!(
            "{:<72} {:>10}",
            format!("in all, after {} hostile requests", 4 * per_wave),
            format!("{total:+.1} MB")
        );
    });
}

/// Sends `count` requests of `wave` over `connections` loops; the statuses answered, counted.
async fn flood(addr: SocketAddr, fan: &Fan, wave: Wave, count: u64, connections: u64) -> Vec<(u16, u64)> {
    let client = Arc::new(client());
    let fan = Arc::new(fan.clone());
    let mut loops = Vec::new();
    for worker in 0..connections {
        let (client, fan) = (Arc::clone(&client), Arc::clone(&fan));
        loops.push(tokio::spawn(async move {
            let mut statuses = std::collections::BTreeMap::<u16, u64>::new();
            for n in (worker..count).step_by(connections as usize) {
                let (method, uri, as_fan, key, body) = request(addr, &fan, wave, n);
                let status =
                    send(&client, method, uri, as_fan.as_ref(), key, body).await.map_or(0, |(status, _)| status);
                *statuses.entry(status).or_default() += 1;
            }
            statuses
        }));
    }
    let mut statuses = std::collections::BTreeMap::<u16, u64>::new();
    for each in loops {
        for (status, count) in each.await.unwrap() {
            *statuses.entry(status).or_default() += count;
        }
    }
    statuses.into_iter().collect()
}

type Call = (&'static str, String, Option<Fan>, Option<String>, Option<String>);

fn request(addr: SocketAddr, fan: &Fan, wave: Wave, n: u64) -> Call {
    let hold = format!("http://{addr}/v1/holds");
    let body = Some(r#"{"schedule_id":1,"seat_id":999999}"#.to_owned());
    match wave {
        Wave::ForgedSessions => {
            let forged =
                Fan { session: format!("eyJhbGciOiJIUzI1NiJ9.forged-{n:012}.{n:043}"), token: fan.token.clone() };
            ("GET", format!("http://{addr}/v1/queue/{}", fan.token), Some(forged), None, None)
        }
        Wave::ForgedQueueTokens => {
            let forged = Fan { session: fan.session.clone(), token: format!("v2.1.1.{n}.{n:016x}.forged-mac-{n}") };
            let token = forged.token.clone();
            ("GET", format!("http://{addr}/v1/queue/{token}"), Some(forged), None, None)
        }
        Wave::KeysWithoutSession => ("POST", hold, None, Some(format!("hostile-{n}")), body),
        Wave::KeysOfAFan => ("POST", hold, Some(fan.clone()), Some(format!("fan-key-{n}")), body),
    }
}

/// The resident set of process `pid`, in kB.
fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
        .unwrap()
}
