//! Serving the router on any [`Listener`] whose peers have socket addresses: tokio's TCP
//! listener live, the simulator's listener in a simulated world.
//!
//! Each connection speaks HTTP/1.1 or HTTP/2 (prior knowledge, as load balancers and the
//! simulator's clients use it), detected from its first bytes. One HTTP/2 connection carries
//! many concurrent requests, long polls included, so a client host needs one connection per
//! node instead of one per waiting user.
//!
//! **Invariants** (see [`ConnectionLimits`]): at most `connections_max` connections are open at
//! once, each holding a permit, and one more is answered a bare 503 and closed (counted in
//! `tcore_connections_refused`); an HTTP/1.1 connection slower than the header-read timeout
//! to send a request's headers, or idle that long between requests, is closed (hyper's
//! header-read timer runs while it waits for a request); with an idle timeout, a connection
//! that has not started its first request within the header-read timeout, or has had no
//! request in flight for the idle timeout, is closed gracefully, and an HTTP/2 peer that
//! leaves a ping unanswered is dropped. Every timer is tokio's, so a simulated run sees
//! simulated time.

use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::serve::Listener;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use parking_lot::Mutex;
use tokio::io::AsyncWriteExt as _;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::time::Instant;
use tower::ServiceExt as _;

use crate::api::app;
use crate::config::ConnectionLimits;
use crate::engine::Engine;
use crate::telemetry::ConnectionMetrics;

/// The most requests one HTTP/2 connection may have in flight: long polls of a whole client
/// host's waiting users share one connection.
pub const HTTP2_STREAMS_MAX: u32 = 1 << 17;
/// With an idle timeout: how often an HTTP/2 connection is pinged, and how long a ping may go
/// unanswered before the connection is dropped, so a peer that vanished does not keep its
/// long polls' connection open.
pub const HTTP2_PING_INTERVAL: Duration = Duration::from_secs(20);
pub const HTTP2_PING_TIMEOUT: Duration = Duration::from_secs(20);
/// What a connection beyond the maximum is told before it is closed.
const REFUSAL: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-length: 0\r\nretry-after: 1\r\n\r\n";
/// How long writing [`REFUSAL`] may take.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// Refusals are logged once per this many, so a flood of them does not flood the log.
const REFUSALS_PER_LOG: u64 = 1_000;

/// Serves `engine` on `listener`, with its background work, until `shutdown` resolves; then
/// stops taking connections and lets requests in flight finish.
pub async fn serve<L>(
    listener: L,
    engine: Arc<Engine>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: Listener<Addr = SocketAddr>,
    L::Io: Send + 'static,
{
    let background = tokio::spawn(Arc::clone(&engine).run_background());
    let limits = engine.config().connections;
    let metrics = engine.telemetry().connection_metrics();
    let served = serve_router(listener, app(engine), limits, metrics, shutdown).await;
    background.abort();
    served
}

/// Serves any `router` on `listener` the way [`serve`] serves the engine's: HTTP/1.1 and
/// HTTP/2 on each connection, the peer address as `ConnectInfo<SocketAddr>`, the connection
/// `limits` (all but the body-read timeout, which is the router's to apply) counted in
/// `metrics`, and a graceful stop when `shutdown` resolves.
pub async fn serve_router<L>(
    mut listener: L,
    router: Router,
    limits: ConnectionLimits,
    metrics: ConnectionMetrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: Listener<Addr = SocketAddr>,
    L::Io: Send + 'static,
{
    let permits = Arc::new(Semaphore::new(limits.connections_max as usize));
    let refused = AtomicU64::new(0);
    let stopping = Arc::new(Stopping::default());
    // Every connection task holds a sender; when the last one is gone, all have finished.
    let (open, mut all_closed) = mpsc::channel::<()>(1);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (io, peer) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            refuse(io, peer, &refused, &metrics);
            continue;
        };
        metrics.open.inc();
        let activity = Arc::new(Activity::new());
        // The guards read the peer address as `ConnectInfo<SocketAddr>`.
        let service = TowerToHyperService::new(
            router
                .clone()
                .map_request(move |mut request: axum::http::Request<hyper::body::Incoming>| {
                    request.extensions_mut().insert(ConnectInfo(peer));
                    request
                })
                .map_future({
                    let activity = Arc::clone(&activity);
                    move |response| {
                        let busy = Busy::start(&activity);
                        async move {
                            let response = response.await;
                            drop(busy);
                            response
                        }
                    }
                }),
        );
        let (stopping, open, metrics) = (Arc::clone(&stopping), open.clone(), metrics.clone());
        tokio::spawn(async move {
            let _open = open;
            let mut stop = pin!(stopping.notify.notified());
            stop.as_mut().enable();
            // A builder of its own: its header-read timer is the connection's.
            let builder = connection_builder(&limits);
            let mut connection = pin!(builder.serve_connection_with_upgrades(TokioIo::new(io), service));
            let idle = pin!(activity.idle_past(&limits));
            if !stopping.flag.load(Ordering::Acquire) {
                tokio::select! {
                    biased;
                    _ = connection.as_mut() => {
                        metrics.open.dec();
                        drop(permit);
                        return;
                    }
                    () = stop => {}
                    () = idle => {
                        metrics.idle_closed.inc();
                    }
                }
            }
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
            metrics.open.dec();
            drop(permit);
        });
    }
    drop(listener);
    stopping.flag.store(true, Ordering::Release);
    stopping.notify.notify_waiters();
    drop(open);
    let _ = all_closed.recv().await;
    Ok(())
}

/// hyper's settings for one connection under `limits`.
fn connection_builder(limits: &ConnectionLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http2().max_concurrent_streams(HTTP2_STREAMS_MAX);
    // The engine's router dates its responses by the engine's clock; hyper's date would be the
    // host's wall clock, which a simulated run must never see.
    builder.http1().auto_date_header(false);
    builder.http2().auto_date_header(false);
    builder
        .http1()
        .timer(HeadTimer::default())
        .header_read_timeout(Duration::from_millis(limits.header_read_timeout_ms));
    if limits.idle_timeout_ms.is_some() {
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(HTTP2_PING_INTERVAL)
            .keep_alive_timeout(HTTP2_PING_TIMEOUT);
    }
    builder
}

/// The header-read timer of one HTTP/1.1 connection, on tokio's timer.
///
/// hyper asks its timer for a new sleep each time it starts waiting for a request's head, and
/// drops it once the head is in: on a keep-alive connection, once per request. Each of
/// tokio's sleeps is registered in the timer wheel and removed again, under the wheel's lock.
/// This timer keeps one tokio sleep for the connection and moves it only when it fires before
/// the deadline awaited then, so a busy connection moves it about once per header-read
/// timeout; a sleep it hands out still resolves at its own deadline, not before.
#[derive(Debug, Clone, Default)]
struct HeadTimer(Arc<Mutex<Option<Pin<Box<tokio::time::Sleep>>>>>);

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(self.now() + duration)
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(HeadDeadline { deadline: Instant::from_std(deadline), timer: Arc::clone(&self.0) })
    }

    fn now(&self) -> std::time::Instant {
        Instant::now().into_std()
    }
}

/// A sleep [`HeadTimer`] hands out: done at `deadline`.
#[derive(Debug)]
struct HeadDeadline {
    deadline: Instant,
    timer: Arc<Mutex<Option<Pin<Box<tokio::time::Sleep>>>>>,
}

impl Future for HeadDeadline {
    type Output = ();

    fn poll(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<()> {
        let deadline = self.deadline;
        let mut timer = self.timer.lock();
        let sleep = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() > deadline {
            sleep.as_mut().reset(deadline);
        }
        loop {
            match sleep.as_mut().poll(context) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) if sleep.deadline() >= deadline => return Poll::Ready(()),
                // It fired for an earlier head: wait on for this one.
                Poll::Ready(()) => sleep.as_mut().reset(deadline),
            }
        }
    }
}

impl hyper::rt::Sleep for HeadDeadline {}

/// Answers a connection beyond the maximum with a bare 503 and closes it, without holding up
/// the accept loop; counts it, and logs the first refusal of every [`REFUSALS_PER_LOG`].
fn refuse<Io>(mut io: Io, peer: SocketAddr, refused: &AtomicU64, metrics: &ConnectionMetrics)
where
    Io: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    metrics.refused.inc();
    let count = refused.fetch_add(1, Ordering::Relaxed);
    if count.is_multiple_of(REFUSALS_PER_LOG) {
        tracing::warn!(%peer, refused_so_far = count + 1, "connection refused: the server holds its maximum of connections");
    }
    tokio::spawn(async move {
        let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, async {
            io.write_all(REFUSAL).await?;
            io.shutdown().await
        })
        .await;
    });
}

/// What one connection is doing: requests in flight, and since when it has had none.
///
/// Requests mark it with atomics only and wake no one: the watcher ([`Activity::idle_past`])
/// sleeps until the earliest moment the connection could have idled too long and judges it
/// then, so a busy connection costs one timer per idle period, not a wakeup and a timer per
/// request.
#[derive(Debug)]
struct Activity {
    /// When the connection opened: the origin of `quiet_since_us`.
    opened: Instant,
    in_flight: AtomicU64,
    /// Whether a request has started on this connection.
    started: AtomicBool,
    /// When the last request ended (or the connection opened), in µs since `opened`.
    quiet_since_us: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            in_flight: AtomicU64::new(0),
            started: AtomicBool::new(false),
            quiet_since_us: AtomicU64::new(0),
        }
    }

    /// Resolves once the connection has had no request in flight for too long: before its
    /// first request, the header-read timeout; after, the idle timeout. Never without an idle
    /// timeout: the simulator runs without one, and a timer per connection there, even one
    /// that never fires, changes a run's bytes.
    async fn idle_past(&self, limits: &ConnectionLimits) {
        let Some(idle) = limits.idle_timeout_ms.map(Duration::from_millis) else {
            return std::future::pending().await;
        };
        let first = Duration::from_millis(limits.header_read_timeout_ms);
        let mut timer = pin!(tokio::time::sleep_until(self.opened + first.min(idle)));
        loop {
            timer.as_mut().await;
            let now = Instant::now();
            // A request in flight, or one that starts now, ends no earlier than now, so the
            // connection cannot idle too long before `now + idle`.
            let deadline = if !self.started.load(Ordering::Acquire) {
                let deadline = self.opened + first;
                if now >= deadline {
                    return;
                }
                deadline.min(now + idle)
            } else if self.in_flight.load(Ordering::Acquire) > 0 {
                now + idle
            } else {
                let deadline = self.opened + Duration::from_micros(self.quiet_since_us.load(Ordering::Acquire)) + idle;
                if now >= deadline {
                    return;
                }
                deadline
            };
            timer.as_mut().reset(deadline);
        }
    }
}

/// One request in flight on a connection, from its call until its answer is ready (or it
/// is dropped).
struct Busy(Arc<Activity>);

impl Busy {
    fn start(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        if !activity.started.load(Ordering::Relaxed) {
            activity.started.store(true, Ordering::Release);
        }
        Self(Arc::clone(activity))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let activity = &self.0;
        let ended_us = u64::try_from(activity.opened.elapsed().as_micros()).unwrap_or(u64::MAX);
        // Before the count drops, so a watcher that sees no request in flight sees this end;
        // the latest end wins when requests of an HTTP/2 connection end at once.
        activity.quiet_since_us.fetch_max(ended_us, Ordering::AcqRel);
        activity.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Tells connection tasks that the server is stopping.
#[derive(Debug, Default)]
struct Stopping {
    flag: AtomicBool,
    notify: Notify,
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER_READ: Duration = Duration::from_secs(1);
    const IDLE: Duration = Duration::from_secs(5);

    /// Watches `activity` as a connection task would; resolves to when it found the
    /// connection idle.
    fn watch(activity: &Arc<Activity>, header_read: Duration, idle: Duration) -> tokio::task::JoinHandle<Instant> {
        let limits = ConnectionLimits {
            header_read_timeout_ms: header_read.as_millis() as u64,
            body_read_timeout_ms: header_read.as_millis() as u64,
            idle_timeout_ms: Some(idle.as_millis() as u64),
            connections_max: 1,
        };
        let activity = Arc::clone(activity);
        tokio::spawn(async move {
            activity.idle_past(&limits).await;
            Instant::now()
        })
    }

    /// `actual` is `expected`, give or take the timer's millisecond.
    fn check(actual: Duration, expected: Duration) {
        assert!(actual >= expected && actual <= expected + Duration::from_millis(2), "{actual:?}, not {expected:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_starts_no_request_is_idle_after_the_header_read_timeout() {
        let activity = Arc::new(Activity::new());
        let idle_at = watch(&activity, HEADER_READ, IDLE).await.expect("the watcher ends");
        check(idle_at - activity.opened, HEADER_READ);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_past_the_idle_timeout_keeps_its_connection_until_idle_after_it() {
        let activity = Arc::new(Activity::new());
        let watcher = watch(&activity, HEADER_READ, IDLE);
        tokio::time::sleep(HEADER_READ / 2).await;
        let request = Busy::start(&activity);
        tokio::time::sleep(IDLE * 3).await;
        assert!(!watcher.is_finished(), "closed with a request in flight");
        drop(request);
        let ended = Instant::now();
        // Requests that come and go within the idle timeout each put the end off again.
        for _ in 0..3 {
            tokio::time::sleep(IDLE / 2).await;
            drop(Busy::start(&activity));
        }
        let last_ended = Instant::now();
        assert!(last_ended > ended);
        let idle_at = watcher.await.expect("the watcher ends");
        check(idle_at - last_ended, IDLE);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_timeout_shorter_than_the_header_read_timeout_counts_from_the_first_request() {
        let activity = Arc::new(Activity::new());
        let watcher = watch(&activity, IDLE, HEADER_READ);
        tokio::time::sleep(HEADER_READ / 10).await;
        drop(Busy::start(&activity));
        let ended = Instant::now();
        let idle_at = watcher.await.expect("the watcher ends");
        check(idle_at - ended, HEADER_READ);
    }

    #[tokio::test(start_paused = true)]
    async fn each_head_deadline_resolves_at_its_own_time_on_the_connections_one_timer() {
        use hyper::rt::Timer as _;
        let timer = HeadTimer::default();
        // A head awaited for a while and then received: its sleep is dropped unfired.
        let mut received = timer.sleep(HEADER_READ);
        assert!(tokio::time::timeout(HEADER_READ / 10, &mut received).await.is_err());
        drop(received);
        tokio::time::sleep(HEADER_READ / 2).await;
        // The next head: the connection's timer fires at the first deadline, and this sleep
        // still waits for its own.
        let start = Instant::now();
        timer.sleep(HEADER_READ).await;
        check(start.elapsed(), HEADER_READ);
        // A shorter wait than the timer's is not held back by it either.
        let mut long = timer.sleep(HEADER_READ * 10);
        assert!(tokio::time::timeout(HEADER_READ / 10, &mut long).await.is_err());
        let start = Instant::now();
        timer.sleep(HEADER_READ).await;
        check(start.elapsed(), HEADER_READ);
    }
}
