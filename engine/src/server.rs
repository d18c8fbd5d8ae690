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
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    let builder = Arc::new(connection_builder(&limits));
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
        let (builder, stopping, open, metrics) =
            (Arc::clone(&builder), Arc::clone(&stopping), open.clone(), metrics.clone());
        tokio::spawn(async move {
            let _open = open;
            let mut stop = pin!(stopping.notify.notified());
            stop.as_mut().enable();
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

/// hyper's connection settings for `limits`.
fn connection_builder(limits: &ConnectionLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http2().max_concurrent_streams(HTTP2_STREAMS_MAX);
    // The engine's router dates its responses by the engine's clock; hyper's date would be the
    // host's wall clock, which a simulated run must never see.
    builder.http1().auto_date_header(false);
    builder.http2().auto_date_header(false);
    builder.http1().timer(TokioTimer::new()).header_read_timeout(Duration::from_millis(limits.header_read_timeout_ms));
    if limits.idle_timeout_ms.is_some() {
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(HTTP2_PING_INTERVAL)
            .keep_alive_timeout(HTTP2_PING_TIMEOUT);
    }
    builder
}

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
#[derive(Debug)]
struct Activity {
    state: Mutex<ActivityState>,
    /// Told when the last request in flight ends.
    quiet: Notify,
}

#[derive(Debug, Clone, Copy)]
struct ActivityState {
    in_flight: u64,
    /// Whether a request has started on this connection.
    started: bool,
    /// When the last request ended (or the connection opened).
    quiet_since: Instant,
}

impl Activity {
    fn new() -> Self {
        let state = ActivityState { in_flight: 0, started: false, quiet_since: Instant::now() };
        Self { state: Mutex::new(state), quiet: Notify::new() }
    }

    /// Resolves once the connection has had no request in flight for too long: before its
    /// first request, the header-read timeout; after, the idle timeout. Never without an idle
    /// timeout: the simulator runs without one, and a timer per connection there, even one
    /// that never fires, changes a run's bytes. No timer runs while a request is in flight.
    async fn idle_past(&self, limits: &ConnectionLimits) {
        let Some(idle) = limits.idle_timeout_ms.map(Duration::from_millis) else {
            return std::future::pending().await;
        };
        let first = Duration::from_millis(limits.header_read_timeout_ms);
        loop {
            let state = *self.state.lock();
            let allowed = if state.started { idle } else { first };
            if state.in_flight > 0 {
                self.quiet.notified().await;
                continue;
            }
            let deadline = state.quiet_since + allowed;
            if Instant::now() >= deadline {
                return;
            }
            tokio::select! {
                biased;
                () = self.quiet.notified() => {}
                () = tokio::time::sleep_until(deadline) => {}
            }
        }
    }
}

/// One request in flight on a connection, from its call until its answer is ready (or it
/// is dropped).
struct Busy(Arc<Activity>);

impl Busy {
    fn start(activity: &Arc<Activity>) -> Self {
        let mut state = activity.state.lock();
        state.in_flight += 1;
        state.started = true;
        drop(state);
        Self(Arc::clone(activity))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut state = self.0.state.lock();
        state.in_flight -= 1;
        if state.in_flight == 0 {
            state.quiet_since = Instant::now();
            drop(state);
            // A permit is kept if the watcher is not waiting yet, so no end is missed.
            self.0.quiet.notify_one();
        }
    }
}

/// Tells connection tasks that the server is stopping.
#[derive(Debug, Default)]
struct Stopping {
    flag: AtomicBool,
    notify: Notify,
}
