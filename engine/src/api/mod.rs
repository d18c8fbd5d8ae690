//! The HTTP API: one function, [`app`], builds the router, so the very same router runs on
//! tokio sockets live and on simulated sockets in the simulator.
//!
//! **API boundary:** only this module knows HTTP and JSON; it translates requests into
//! [`Engine`] calls and [`EngineError`](crate::engine::EngineError)s into problem responses.

mod admin;
mod idempotency;
mod problem;
mod public;

pub use problem::{ApiError, Problem};

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, MatchedPath, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use utoipa::OpenApi;

use crate::engine::Engine;

/// The most bytes a request body may have.
pub const REQUEST_BODY_MAX: usize = 64 * 1024;

/// Shared by every handler.
#[derive(Debug, Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
    request_ids: Arc<AtomicU64>,
}

impl AppState {
    fn next_request_id(&self) -> String {
        format!("{}-{}", self.engine.config().node, self.request_ids.fetch_add(1, Ordering::Relaxed) + 1)
    }
}

/// The client's IP as the guards see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

/// A JSON body whose rejections are problem responses.
#[derive(Debug, FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

/// A path whose rejections are problem responses.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

/// A query whose rejections are problem responses.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

/// The bearer token of a request, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ").map(str::trim)
}

/// Builds the whole router for one engine node.
pub fn app(engine: Arc<Engine>) -> Router {
    let state = AppState { engine, request_ids: Arc::new(AtomicU64::new(0)) };
    let public = public::routes(state.clone()).route_layer(middleware::from_fn_with_state(state.clone(), guard));
    let ops = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi_json));
    let mut router = public.merge(ops);
    if state.engine.config().admin_token.is_some() {
        router = router.nest("/admin/v1", admin::routes(state.clone()));
    }
    router
        .route_layer(middleware::from_fn_with_state(state.clone(), observe))
        .fallback(not_found)
        .layer(middleware::from_fn(read_whole_request))
        .layer(axum::extract::DefaultBodyLimit::max(REQUEST_BODY_MAX))
        .with_state(state)
}

/// Nothing answers a request before its whole body is in (at most [`REQUEST_BODY_MAX`]).
///
/// An answer sent while the client is still sending (a refusal of the guards, a bad path, an
/// unknown route) makes HTTP/2 reset the stream, and h2 remembers a stream it reset for one
/// second of wall-clock time (not configurable through hyper's server builder): a DATA frame
/// that arrives later is ignored while the stream is remembered and answered with one more
/// reset once it is forgotten. The traffic then depends on how fast the host runs, which a
/// simulated run could not replay; read first, and no stream is left half received.
///
/// Then a mutating request, once started, runs to its end even if its client goes away (an
/// HTTP/2 stream reset, a closed connection): a payment half done is never abandoned between
/// two store calls, and its idempotency record is completed for the client's retry. Both are
/// one layer: every request in flight (a long poll above all) carries each layer's future.
async fn read_whole_request(request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, REQUEST_BODY_MAX).await else {
        return ApiError::body_too_large().into_response();
    };
    let request = Request::from_parts(parts, axum::body::Body::from(bytes));
    if matches!(*request.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(request).await;
    }
    match tokio::spawn(next.run(request)).await {
        Ok(response) => response,
        Err(error) => {
            tracing::error!(%error, "request task failed");
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the request failed").into_response()
        }
    }
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

fn client_ip(state: &AppState, request: &Request) -> IpAddr {
    if state.engine.config().trust_forwarded_for {
        let forwarded = request
            .headers()
            .get("x-forwarded-for")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.split(',').next())
            .and_then(|first| first.trim().parse().ok());
        if let Some(ip) = forwarded {
            return ip;
        }
    }
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

/// Measures every routed request on the engine's clock, and names its client.
async fn observe(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let clock = Arc::clone(state.engine.clock());
    let start_us = clock.monotonic_us();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let ip = client_ip(&state, &request);
    request.extensions_mut().insert(ClientIp(ip));
    let request_id = state.next_request_id();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    if status >= 500 && status != 503 {
        tracing::error!(%request_id, route, status, "request failed");
    }
    let latency_us = clock.monotonic_us().saturating_sub(start_us);
    state.engine.telemetry().record_request(&route, status, latency_us, ip, clock.now_ms());
    response
}

/// Blocklist and rate limits, before any public handler runs.
async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let ip = request.extensions().get::<ClientIp>().map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |client| client.0);
    if let Err(rejection) = state.engine.admit_request(ip, bearer(request.headers())).await {
        let error = ApiError::from(rejection);
        state.engine.telemetry().record_rejection(error.code);
        return error.into_response();
    }
    let response = next.run(request).await;
    if let Some(code) = response.extensions().get::<RejectionCode>() {
        state.engine.telemetry().record_rejection(code.0);
    }
    response
}

/// Marks a response with the stable code of the refusal it carries, for the metrics.
#[derive(Debug, Clone, Copy)]
struct RejectionCode(&'static str);

/// Turns an engine result into a response, tagging refusals for the metrics.
fn respond<T: serde::Serialize>(status: StatusCode, result: Result<T, ApiError>) -> Response {
    match result {
        Ok(body) => (status, Json(body)).into_response(),
        Err(error) => {
            let code = error.code;
            let mut response = error.into_response();
            response.extensions_mut().insert(RejectionCode(code));
            response
        }
    }
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<AppState>) -> Response {
    match state.engine.ready().await {
        Ok(()) => "ready".into_response(),
        Err(error) => ApiError::from(error).into_response(),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        state.engine.telemetry().encode(),
    )
        .into_response()
}

async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// The OpenAPI document of the public and admin API.
#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "T-CORE engine", description = "Ticket openings without overselling: waiting room, holds, payments."),
    paths(
        public::list_schedules, public::create_user, public::get_user, public::charge_points, public::join_queue,
        public::queue_status, public::seat_map, public::hold, public::confirm, public::cancel, public::get_reservation,
        admin::snapshot, admin::set_admission, admin::set_rate_limits, admin::block, admin::unblock,
        admin::set_hold_ttl, admin::audit, admin::record_decision,
    ),
    components(schemas(Problem)),
    modifiers(&SecuritySchemes),
)]
pub struct ApiDoc;

struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        let bearer = || SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build());
        components.add_security_scheme("queue_token", bearer());
        components.add_security_scheme("admin_token", bearer());
    }
}
