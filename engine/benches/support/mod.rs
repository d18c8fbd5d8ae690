//! What the engine's benchmarks share: server processes, an HTTP client, and the demo users'
//! admitted queue tokens.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// The session secret the benchmarked engines verify with (`--session-secret`).
pub const SESSION_SECRET: &str = "bench-session-secret-of-at-least-32-bytes";

/// A fan as the API knows one: a session, and once joined the queue token.
#[derive(Debug, Clone)]
pub struct Fan {
    pub session: String,
    pub token: String,
}

/// A session for `user_id`, signed as an identity provider sharing the secret would, valid for
/// a day from now.
pub fn session_for(user_id: u64) -> String {
    use tcore_engine::sessions::{SESSION_AUDIENCE_DEFAULT, SessionClaims, sign_hs256};
    let now_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let claims = SessionClaims {
        sub: user_id.to_string(),
        aud: SESSION_AUDIENCE_DEFAULT.into(),
        iat: now_s,
        exp: now_s + 86_400,
        iss: None,
    };
    sign_hs256(SESSION_SECRET.as_bytes(), &claims).unwrap()
}

/// `tcore-engine serve` on `listen` with the demo's `seats` and `users`, admission and rate
/// limits that never hold the load back, and the benchmarks' session secret.
pub fn engine_command(listen: SocketAddr, seats: u64, users: u64) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tcore-engine"));
    command
        .args(["serve", "--listen", &listen.to_string()])
        .args(["--demo-seats", &seats.to_string(), "--demo-users", &users.to_string()])
        .args(["--admission-rate-per-s", "100000", "--active-max", "1000000"])
        .args(["--rate-limit-per-ip", "100000", "--rate-limit-per-token", "100000", "--rate-limit-burst", "100000"])
        .args(["--session-secret", SESSION_SECRET]);
    command
}

pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|value| value.parse().ok()).unwrap_or(default)
}

pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// A server process, killed when dropped.
pub struct Server(Child);

impl Server {
    pub async fn start(command: &mut Command, addr: SocketAddr) -> Server {
        let server = Server(command.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("server starts"));
        for _ in 0..400 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return server;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("server on {addr} did not come up");
    }
}

impl Server {
    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub async fn send(
    client: &HttpClient,
    method: &str,
    uri: String,
    fan: Option<&Fan>,
    key: Option<String>,
    body: Option<String>,
) -> Result<(u16, Bytes), ()> {
    let mut request = hyper::Request::builder().method(method).uri(uri);
    if let Some(fan) = fan {
        request = request.header("authorization", format!("Bearer {}", fan.session));
        if !fan.token.is_empty() {
            request = request.header("x-queue-token", &fan.token);
        }
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

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(1024).build_http()
}

/// Joins users `1..=users` to the demo schedule at `addr` and waits until all are admitted.
pub async fn admitted_fans(addr: SocketAddr, users: u64) -> Vec<Fan> {
    let client = client();
    let mut fans = Vec::new();
    for user_id in 1..=users {
        let mut fan = Fan { session: session_for(user_id), token: String::new() };
        let uri = format!("http://{addr}/v1/schedules/1/queue");
        let (status, body) = send(&client, "POST", uri, Some(&fan), None, None).await.expect("join");
        assert_eq!(status, 201, "join: {body:?}");
        let joined: serde_json::Value = serde_json::from_slice(&body).unwrap();
        fan.token = joined["token"].as_str().unwrap().to_owned();
        fans.push(fan);
    }
    for fan in &fans {
        let token = &fan.token;
        let (_, body) =
            send(&client, "GET", format!("http://{addr}/v1/queue/{token}?wait_s=10"), Some(fan), None, None)
                .await
                .expect("status");
        let status: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(status["status"], "ADMITTED", "{status}");
    }
    fans
}

/// Runs `connections` closed loops for `seconds`: each loop sends `request(worker, sequence)`
/// after the last one answered, and its latency is recorded from the moment it was sent.
/// Returns every latency in µs and the seconds the loops ran.
pub async fn closed_loops<F, Fut>(connections: usize, seconds: u64, request: F) -> (hdrhistogram::Histogram<u64>, f64)
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let request = Arc::new(request);
    let stop = Arc::new(AtomicBool::new(false));
    let started = std::time::Instant::now();
    let workers: Vec<_> = (0..connections)
        .map(|worker| {
            let (request, stop) = (Arc::clone(&request), Arc::clone(&stop));
            tokio::spawn(async move {
                let mut latency = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
                let mut sequence = 0_u64;
                while !stop.load(Ordering::Relaxed) {
                    sequence += 1;
                    let begin = std::time::Instant::now();
                    request(worker, sequence).await;
                    latency.saturating_record(u64::try_from(begin.elapsed().as_micros()).unwrap_or(u64::MAX).max(1));
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
    (latency, started.elapsed().as_secs_f64())
}
