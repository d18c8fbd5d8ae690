//! Serving the router on any [`Listener`] whose peers have socket addresses: tokio's TCP
//! listener live, the simulator's listener in a simulated world.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::serve::{Listener, ListenerExt};

use crate::api::app;
use crate::engine::Engine;

/// Serves `engine` on `listener`, with its background work, until `shutdown` resolves; then
/// stops taking connections and lets requests in flight finish.
pub async fn serve<L>(
    listener: L,
    engine: Arc<Engine>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: Listener<Addr = SocketAddr>,
    L::Io: Send,
{
    let background = tokio::spawn(Arc::clone(&engine).run_background());
    let router = app(engine).into_make_service_with_connect_info::<SocketAddr>();
    // Tapping the listener gives any listener with socket addresses the peer address as
    // `ConnectInfo<SocketAddr>`, which the guards read.
    let listener = listener.tap_io(|_io| {});
    let served = axum::serve(listener, router).with_graceful_shutdown(shutdown).await;
    background.abort();
    served
}
