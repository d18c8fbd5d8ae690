//! A live fan's [`Transport`]: real HTTP through reqwest, the run's monotonic clock, and the
//! history shared by every goose user.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use parking_lot::Mutex;

use crate::history::{HistoryRecorder, OpId, OpKind, Outcome};
use crate::journey::{HttpFailure, HttpReply, HttpRequest, Transport, UserOutcomes};

/// What every live journey of a run shares.
#[derive(Debug)]
pub struct LiveShared {
    /// The run's start on the monotonic clock: history times count from it.
    pub started: Instant,
    /// The run's start on the Unix clock, in ms: engine times are read against it.
    pub started_unix_ms: u64,
    pub recorder: Mutex<HistoryRecorder>,
    pub outcomes: Mutex<UserOutcomes>,
    /// Every call's time from its intended start to its answer, in µs.
    pub latency: Mutex<Histogram<u64>>,
    pub requests: AtomicU64,
    /// Calls answered 5xx or not at all.
    pub errors: AtomicU64,
}

impl LiveShared {
    pub fn new(recorder: HistoryRecorder, started: Instant) -> anyhow::Result<LiveShared> {
        let (now, unix) = (Instant::now(), SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default());
        // `started` may lie ahead (the pool starts first) or behind.
        let started_unix = match started.checked_duration_since(now) {
            Some(ahead) => unix + ahead,
            None => unix.saturating_sub(now.duration_since(started)),
        };
        Ok(LiveShared {
            started,
            started_unix_ms: started_unix.as_millis() as u64,
            recorder: Mutex::new(recorder),
            outcomes: Mutex::new(UserOutcomes::default()),
            latency: Mutex::new(Histogram::new_with_bounds(1, 3_600_000_000, 3)?),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        })
    }

    /// µs since the run's start (0 before it).
    pub fn now_us(&self) -> u64 {
        Instant::now().saturating_duration_since(self.started).as_micros() as u64
    }

    /// An engine time (ms since the Unix epoch) as the run's µs.
    pub fn engine_time_us(&self, at_ms: u64) -> u64 {
        at_ms.saturating_sub(self.started_unix_ms).saturating_mul(1_000)
    }
}

/// One call as goose's own metrics take it.
#[derive(Debug, Clone)]
pub struct StepTime {
    pub method: &'static str,
    pub name: &'static str,
    pub duration: Duration,
    pub status: Option<u16>,
}

/// The transport of one live journey.
#[derive(Debug)]
pub struct LiveTransport {
    pub shared: Arc<LiveShared>,
    pub client: reqwest::Client,
    /// When the journey was meant to start: its first call counts from there, so a journey
    /// that started late because the pool was busy shows it (coordinated omission counted).
    intended_start_us: Mutex<Option<u64>>,
    /// Each call's invoke time and name, by operation id, until it completes.
    pending: Mutex<Vec<(OpId, u64, &'static str, &'static str)>>,
    /// The journey's calls, for goose's metrics once it ends.
    pub steps: Mutex<Vec<StepTime>>,
}

impl LiveTransport {
    pub fn new(shared: Arc<LiveShared>, client: reqwest::Client, intended_start_us: u64) -> LiveTransport {
        LiveTransport {
            shared,
            client,
            intended_start_us: Mutex::new(Some(intended_start_us)),
            pending: Mutex::new(Vec::new()),
            steps: Mutex::new(Vec::new()),
        }
    }
}

/// A request ready to send, or why it cannot be.
pub type Prepared = Result<reqwest::Request, HttpFailure>;

impl Transport for LiveTransport {
    type Prepared = Prepared;

    fn now_us(&self) -> u64 {
        self.shared.now_us()
    }

    fn wall_ms(&self) -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
    }

    fn sleep(&self, duration: Duration) -> impl Future<Output = ()> {
        tokio::time::sleep(duration)
    }

    fn prepare(&self, node: &str, request: HttpRequest) -> Prepared {
        let method = reqwest::Method::from_bytes(request.method.as_bytes()).map_err(|_| HttpFailure::ConnectionLost)?;
        let mut builder = self
            .client
            .request(method, format!("{node}{}", request.path))
            .header("x-forwarded-for", request.forwarded_for);
        if let Some(token) = request.bearer {
            builder = builder.bearer_auth(token);
        }
        if let Some(token) = request.queue_token {
            builder = builder.header("x-queue-token", token);
        }
        if let Some(key) = request.idempotency_key {
            builder = builder.header("idempotency-key", key);
        }
        if let Some(body) = request.body {
            builder = builder.header("content-type", "application/json").body(body);
        }
        builder.build().map_err(|_| HttpFailure::ConnectionLost)
    }

    async fn send(&self, _node: &str, request: Prepared, timeout: Duration) -> Result<HttpReply, HttpFailure> {
        let mut request = request?;
        *request.timeout_mut() = Some(timeout);
        let failure = |error: reqwest::Error| {
            if error.is_timeout() { HttpFailure::Timeout } else { HttpFailure::ConnectionLost }
        };
        let response = self.client.execute(request).await.map_err(failure)?;
        let status = response.status().as_u16();
        let body = response.bytes().await.map_err(failure)?;
        Ok(HttpReply { status, body })
    }

    fn invoke(&self, user: u64, ip: IpAddr, kind: OpKind, key: Option<String>) -> OpId {
        let now_us = self.shared.now_us();
        let at_us = self.intended_start_us.lock().take().map_or(now_us, |intended| intended.min(now_us));
        let (method, name) = step_of(&kind);
        let op = self.shared.recorder.lock().invoke(user, ip, kind, key, at_us);
        self.pending.lock().push((op, at_us, method, name));
        op
    }

    fn complete(&self, op: OpId, outcome: Outcome) {
        let now_us = self.shared.now_us();
        let status = match &outcome {
            Outcome::Ok(response) => Some(response.http_status),
            Outcome::Fail { http_status, .. } => Some(*http_status),
            Outcome::Unknown { .. } => None,
        };
        self.shared.requests.fetch_add(1, Ordering::Relaxed);
        if status.is_none_or(|status| status >= 500) {
            self.shared.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.shared.recorder.lock().complete(op, outcome, now_us);
        let started = {
            let mut pending = self.pending.lock();
            let index = pending.iter().position(|(id, ..)| *id == op);
            index.map(|index| pending.swap_remove(index))
        };
        if let Some((_, invoked_us, method, name)) = started {
            let took_us = now_us.saturating_sub(invoked_us);
            let _ = self.shared.latency.lock().record(took_us.max(1));
            self.steps.lock().push(StepTime { method, name, duration: Duration::from_micros(took_us), status });
        }
    }

    fn ended(&self, how: &'static str) {
        self.shared.outcomes.lock().ended(how);
    }
}

/// A call's method and name in goose's metrics: long polls apart from the other reads.
fn step_of(kind: &OpKind) -> (&'static str, &'static str) {
    match kind {
        OpKind::JoinQueue { .. } => ("POST", "queue_join"),
        OpKind::QueueStatus { .. } => ("GET", "queue_long_poll"),
        OpKind::SeatMap { .. } => ("GET", "seat_map"),
        OpKind::Hold { .. } => ("POST", "hold"),
        OpKind::Confirm { .. } => ("POST", "confirm"),
        OpKind::Cancel { .. } => ("POST", "cancel"),
        _ => ("GET", "other"),
    }
}
