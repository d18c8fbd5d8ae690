//! Serving the router on any [`Listener`] whose peers have socket addresses: tokio's TCP
//! listener live, the simulator's listener in a simulated world.
//!
//! Each connection speaks HTTP/1.1 or HTTP/2 (prior knowledge, as load balancers and the
//! simulator's clients use it), detected from its first bytes. One HTTP/2 connection carries
//! many concurrent requests, long polls included, so a client host needs one connection per
//! node instead of one per waiting user.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::ConnectInfo;
use axum::serve::Listener;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::sync::{Notify, mpsc};
use tower::ServiceExt as _;

use crate::api::app;
use crate::engine::Engine;

/// The most requests one HTTP/2 connection may have in flight: long polls of a whole client
/// host's waiting users share one connection.
pub const HTTP2_STREAMS_MAX: u32 = 1 << 17;

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
    let served = serve_router(listener, app(engine), shutdown).await;
    background.abort();
    served
}

/// Serves any `router` on `listener` the way [`serve`] serves the engine's: HTTP/1.1 and
/// HTTP/2 on each connection, the peer address as `ConnectInfo<SocketAddr>`, and a graceful
/// stop when `shutdown` resolves.
pub async fn serve_router<L>(
    mut listener: L,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: Listener<Addr = SocketAddr>,
    L::Io: Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http2().max_concurrent_streams(HTTP2_STREAMS_MAX);
    // The engine's router dates its responses by the engine's clock; hyper's date would be the
    // host's wall clock, which a simulated run must never see.
    builder.http1().auto_date_header(false);
    builder.http2().auto_date_header(false);
    let builder = Arc::new(builder);
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
        // The guards read the peer address as `ConnectInfo<SocketAddr>`.
        let service = TowerToHyperService::new(router.clone().map_request(
            move |mut request: axum::http::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                request
            },
        ));
        let (builder, stopping, open) = (Arc::clone(&builder), Arc::clone(&stopping), open.clone());
        tokio::spawn(async move {
            let _open = open;
            let mut stop = std::pin::pin!(stopping.notify.notified());
            stop.as_mut().enable();
            let mut connection = std::pin::pin!(builder.serve_connection_with_upgrades(TokioIo::new(io), service));
            if !stopping.flag.load(Ordering::Acquire) {
                tokio::select! {
                    biased;
                    _ = connection.as_mut() => return,
                    () = stop => {}
                }
            }
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        });
    }
    drop(listener);
    stopping.flag.store(true, Ordering::Release);
    stopping.notify.notify_waiters();
    drop(open);
    let _ = all_closed.recv().await;
    Ok(())
}

/// Tells connection tasks that the server is stopping.
#[derive(Debug, Default)]
struct Stopping {
    flag: AtomicBool,
    notify: Notify,
}
