//! The one layer every routed request passes through: it reads the whole request, measures
//! it, guards the public API, and lets a mutating request run to its end.
//!
//! It is a single hand-written service with one boxed future per request. A request waiting in
//! a long poll carries every layer's future for as long as it waits, and a middleware written
//! with `from_fn` keeps room for the request in its own future, in the middleware function's
//! and in `Next::run`'s: three such layers held about 3.5 KB per waiting request. An async
//! function, too, keeps room for each argument for as long as it runs, so the request goes
//! from one step to the next boxed (8 bytes, not 240): this layer's future is about 600 bytes.
//!
//! **Invariants:**
//! - nothing answers a request before its whole body is in (at most [`REQUEST_BODY_MAX`]),
//!   except a body that is not in within the body-read timeout, answered 408 `body_timeout`.
//!   An answer sent while the client is still sending (a refusal of the guards, a bad path,
//!   an unknown route) makes HTTP/2 reset the stream, and h2 remembers a stream it reset for
//!   one second of wall-clock time (not configurable through hyper's server builder): a DATA
//!   frame that arrives later is ignored while the stream is remembered and answered with one
//!   more reset once it is forgotten. The traffic would then depend on how fast the host
//!   runs, which a simulated run could not replay; so the simulator sets a body-read timeout
//!   no request of a run can reach;
//! - the client IP of a request is its connection's peer, or, from a trusted proxy, the
//!   rightmost address of `X-Forwarded-For` that is not a trusted proxy
//!   ([`TrustedProxies`](crate::config::TrustedProxies)), always in canonical form;
//! - a mutating request, once started, runs to its end even if its client goes away (an
//!   HTTP/2 stream reset, a closed connection): a payment half done is never abandoned
//!   between two store calls, and its idempotency record is completed for the client's retry;
//! - every response carries a `Date` header read from the engine's clock (see [`super::date`]),
//!   never the host's wall clock, and an `X-Request-Id`: the node's name and the request's
//!   number on the node, which its problem body (if any) and the node's logs name too;
//! - every request to a route is measured on the engine's clock, under its route's template;
//!   an unknown path (the fallback) is not, so a scan of random paths cannot grow the metrics;
//!   a public request is counted for its address and, with a verified session, its user;
//! - every request to the public API ([`PUBLIC_PREFIX`]) passes the blocklists (of addresses,
//!   and of users for a verified session) and the rate limits before its handler runs;
//!   operations and admin routes do not;
//! - a public request's session is verified once, here, and only a verified session's user
//!   gets a rate limit of its own; a request to a route that acts for a user
//!   ([`super::public::needs_session`]) without a valid session is refused 401 after the
//!   guards and before idempotency; handlers read the result ([`SessionCheck`]) and the client
//!   address ([`ClientIp`]) from the request's extensions;
//! - every public `POST` (every mutating public route) with an `Idempotency-Key` goes through
//!   [`idempotency::run`], after the guards, with the key scoped to the session's user (or,
//!   without a session, the client address), the method and the route template.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, to_bytes};
use axum::extract::{ConnectInfo, MatchedPath, Request};
use axum::http::{HeaderValue, Method, StatusCode, Version, header};
use axum::response::{IntoResponse, Response};
use tower::{Layer, Service};

use super::idempotency::{self, IDEMPOTENCY_KEY};
use super::problem::RequestId;
use super::{ApiError, AppState, ClientIp, REQUEST_BODY_MAX, REQUEST_ID_HEADER, RejectionCode, SessionCheck, bearer};
use crate::domain::UserId;

/// Every public route's template starts with this; no other route's does.
pub(super) const PUBLIC_PREFIX: &str = "/v1/";

/// Wraps each route (and the fallback) in a [`Gateway`].
#[derive(Debug, Clone)]
pub(super) struct GatewayLayer {
    state: AppState,
}

impl GatewayLayer {
    pub(super) fn new(state: AppState) -> Self {
        Self { state }
    }
}

impl<S> Layer<S> for GatewayLayer {
    type Service = Gateway<S>;

    fn layer(&self, inner: S) -> Gateway<S> {
        Gateway { state: self.state.clone(), inner }
    }
}

/// See the module's documentation.
#[derive(Debug, Clone)]
pub(super) struct Gateway<S> {
    state: AppState,
    inner: S,
}

impl<S> Service<Request> for Gateway<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        // The service that was polled ready is the one that takes the request.
        let fresh = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, fresh);
        let state = self.state.clone();
        let id = RequestId { node: Arc::clone(&state.node), number: state.next_request_number() };
        // Boxed: an async function keeps room for each argument for as long as it runs, and a
        // request is 240 bytes; a long poll would carry it at every level below.
        Box::pin(id.clone().scope(read_then_pass(state, inner, Box::new(request), id)))
    }
}

async fn read_then_pass<S>(
    state: AppState,
    inner: S,
    mut request: Box<Request>,
    id: RequestId,
) -> Result<Response, Infallible>
where
    S: Service<Request, Response = Response, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    let body = std::mem::take(request.body_mut());
    let mut response = match read_body(&state, body).await {
        Err(BodyError::TooLarge) => ApiError::body_too_large().into_response(),
        Err(BodyError::Timeout) => body_timeout(&state, request.version()),
        Ok(bytes) => {
            *request.body_mut() = Body::from(bytes);
            if matches!(*request.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
                pass(state.clone(), inner, request, &id).await
            } else {
                let (task_state, task_id) = (state.clone(), id.clone());
                let task = id.clone().scope(async move { pass(task_state, inner, request, &task_id).await });
                match tokio::spawn(task).await {
                    Ok(response) => response,
                    Err(error) => ApiError::internal(&format!("request task failed: {error}")).into_response(),
                }
            }
        }
    };
    let now_ms = state.engine.clock().now_ms();
    let headers = response.headers_mut();
    headers.insert(header::DATE, state.dates.at(now_ms));
    if let Some(value) = id.header_value() {
        headers.insert(REQUEST_ID_HEADER, value);
    }
    Ok(response)
}

/// Why a request's body was not read.
enum BodyError {
    TooLarge,
    Timeout,
}

/// The whole body, unless it is larger than [`REQUEST_BODY_MAX`] or slower than the
/// body-read timeout. A body already complete (a `GET`'s) sets no timer.
async fn read_body(state: &AppState, body: Body) -> Result<axum::body::Bytes, BodyError> {
    use axum::body::HttpBody as _;
    if body.is_end_stream() {
        return Ok(axum::body::Bytes::new());
    }
    let timeout = Duration::from_millis(state.engine.config().connections.body_read_timeout_ms);
    match tokio::time::timeout(timeout, to_bytes(body, REQUEST_BODY_MAX)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(_)) => Err(BodyError::TooLarge),
        Err(_) => Err(BodyError::Timeout),
    }
}

/// The 408 of a body not in within the body-read timeout. An HTTP/1.1 connection is closed
/// with it: the rest of that body would otherwise be read as the next request.
fn body_timeout(state: &AppState, version: Version) -> Response {
    let error = ApiError::new(StatusCode::REQUEST_TIMEOUT, "body_timeout", "the request body was not sent in time");
    state.engine.telemetry().record_rejection(error.code);
    let mut response = error.into_response();
    if version <= Version::HTTP_11 {
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Measures and guards a whole request, and hands it to its route.
async fn pass<S>(state: AppState, mut inner: S, request: Box<Request>, id: &RequestId) -> Response
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    let Some(route) = request.extensions().get::<MatchedPath>().cloned() else {
        return answer(inner.call(*request).await);
    };
    let clock = Arc::clone(state.engine.clock());
    let start_us = clock.monotonic_us();
    let ip = client_ip(&state, &request);
    let (response, user) = if route.as_str().starts_with(PUBLIC_PREFIX) {
        guard(&state, ip, route.as_str(), inner, request).await
    } else {
        (answer(inner.call(*request).await), None)
    };
    let status = response.status().as_u16();
    if status >= 500 && status != 503 {
        tracing::error!(request_id = %id, route = route.as_str(), status, "request failed");
    }
    let latency_us = clock.monotonic_us().saturating_sub(start_us);
    state.engine.telemetry().record_request(route.as_str(), status, latency_us, ip, user, clock.now_ms());
    response
}

/// The session, blocklists and rate limits, before any public handler runs; then idempotency
/// for a `POST`. Returns the answer and the user of the verified session, if any.
async fn guard<S>(
    state: &AppState,
    ip: IpAddr,
    route: &str,
    mut inner: S,
    mut request: Box<Request>,
) -> (Response, Option<UserId>)
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    let session = match bearer(request.headers()) {
        Some(credential) => state.engine.verify_session(credential),
        None => Err(crate::sessions::SessionError::Missing),
    };
    let user = session.ok().map(|session| session.user_id);
    if let Err(rejection) = state.engine.admit_request(ip, user).await {
        let error = ApiError::from(rejection);
        state.engine.telemetry().record_rejection(error.code);
        return (error.into_response(), user);
    }
    // A call that needs a session and has none is refused before it can claim an idempotency
    // key: an outsider's calls store nothing, and cannot make a later call's key mismatch.
    if let Err(error) = session
        && super::public::needs_session(route)
    {
        let refused = ApiError::from(error);
        state.engine.telemetry().record_rejection(refused.code);
        return (refused.into_response(), user);
    }
    request.extensions_mut().insert(SessionCheck(session));
    request.extensions_mut().insert(ClientIp(ip));
    let key = (request.method() == Method::POST).then(|| request.headers().get(IDEMPOTENCY_KEY).cloned()).flatten();
    let response = match key {
        Some(key) => {
            let scope = idempotency::Scope { user, ip, route };
            // Boxed: the largest future here, and only a mutating request carries it.
            Box::pin(idempotency::run(state.clone(), key, scope, *request, inner)).await
        }
        None => answer(inner.call(*request).await),
    };
    if let Some(code) = response.extensions().get::<RejectionCode>() {
        state.engine.telemetry().record_rejection(code.0);
    }
    (response, user)
}

pub(super) fn answer(result: Result<Response, Infallible>) -> Response {
    match result {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

/// The client's IP as the guards see it: see [`TrustedProxies`](crate::config::TrustedProxies).
pub(super) fn client_ip(state: &AppState, request: &Request) -> IpAddr {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let forwarded = request.headers().get_all("x-forwarded-for").iter().filter_map(|value| value.to_str().ok());
    state.engine.config().trusted_proxies.client_ip(peer, forwarded)
}
