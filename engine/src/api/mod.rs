//! The HTTP API: one function, [`app`], builds the router, so the very same router runs on
//! tokio sockets live and on simulated sockets in the simulator.
//!
//! **API boundary:** only this module knows HTTP and JSON; it translates requests into
//! [`Engine`] calls and [`EngineError`](crate::engine::EngineError)s into problem responses.

mod admin;
pub mod admin_auth;
mod date;
mod gateway;
mod idempotency;
mod json;
pub mod openapi;
mod problem;
mod public;
mod webhook;

pub use json::ApiJson;
pub use problem::{ApiError, Problem, RequestId};
pub use webhook::{SIGNATURE_HEADER as WEBHOOK_SIGNATURE_HEADER, sign as sign_webhook};

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{FromRequestParts, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::engine::Engine;
use crate::sessions::{Session, SessionError};

/// The most bytes a request body may have.
pub const REQUEST_BODY_MAX: usize = 64 * 1024;

/// Shared by every handler: one reference to [`SharedState`]. Every request clones the state
/// several times (the gateway and its steps, each handler's `State`), and with one counter a
/// clone is one atomic write instead of one per field, each to a line every core shares.
#[derive(Debug, Clone)]
pub struct AppState(Arc<SharedState>);

/// What [`AppState`] refers to.
#[derive(Debug)]
pub struct SharedState {
    pub engine: Arc<Engine>,
    /// The node's name, the first part of its request ids.
    node: Arc<str>,
    request_ids: AtomicU64,
    dates: date::DateHeader,
    admin_auth: admin_auth::AdminAuth,
}

impl std::ops::Deref for AppState {
    type Target = SharedState;

    fn deref(&self) -> &SharedState {
        &self.0
    }
}

impl SharedState {
    /// Numbers the node's requests from 1, for their request ids.
    fn next_request_number(&self) -> u64 {
        self.request_ids.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// A path whose rejections are problem responses. As in JSON bodies (see [`json`]), an
/// integral number written with a fraction (`75.0`) is read as the integer the OpenAPI
/// document's `integer` allows.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiError> {
        let rejection = match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => return Ok(ApiPath(value)),
            Err(rejection) => ApiError::from(rejection),
        };
        let Ok(raw) = axum::extract::RawPathParams::from_request_parts(parts, state).await else {
            return Err(rejection);
        };
        let integral = |text: &str| {
            let (whole, fraction) = text.split_once('.')?;
            let whole =
                whole.parse::<u64>().ok().filter(|_| !fraction.is_empty() && fraction.bytes().all(|b| b == b'0'))?;
            Some(serde_json::Value::from(whole))
        };
        let mut values: Vec<serde_json::Value> = Vec::new();
        for (_, text) in &raw {
            values.push(integral(text).ok_or_else(|| rejection.clone())?);
        }
        let value = if values.len() == 1 { values.remove(0) } else { serde_json::Value::Array(values) };
        serde_json::from_value(value).map(ApiPath).map_err(|_| rejection)
    }
}

/// A query whose rejections are problem responses.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

/// The header every response names its request's id in.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The header a booking call carries its queue token in (the session is in `Authorization`).
pub const QUEUE_TOKEN_HEADER: &str = "x-queue-token";

/// What the gateway found of a public request's session, for the handlers that need one.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SessionCheck(pub Result<Session, SessionError>);

/// The verified session of a request: its handler acts for this user only. Refused with 401
/// when the session is missing, forged or expired.
#[derive(Debug, Clone, Copy)]
pub struct FanSession(pub Session);

impl<S: Send + Sync> FromRequestParts<S> for FanSession {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, ApiError> {
        let check = parts.extensions.get::<SessionCheck>().map_or(Err(SessionError::Missing), |check| check.0);
        check.map(FanSession).map_err(ApiError::from)
    }
}

/// The client's address as the guards saw it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientIp(pub IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<ClientIp>()
            .copied()
            .ok_or_else(|| ApiError::internal("the gateway did not record the client address"))
    }
}

/// `bytes` as lowercase hexadecimal, in one allocation (an idempotent request's record key
/// is one).
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(2 * bytes.len());
    for byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    text
}

/// The bearer token of a request, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ").map(str::trim)
}

/// Builds the whole router for one engine node.
pub fn app(engine: Arc<Engine>) -> Router {
    let admin_auth = admin_auth::AdminAuth::new(
        &engine.config().admin_tokens,
        engine.config().admin_auth_failures_max,
        Arc::clone(engine.clock()),
    );
    let node = Arc::from(engine.config().node.as_str());
    let shared =
        SharedState { engine, node, request_ids: AtomicU64::new(0), dates: date::DateHeader::default(), admin_auth };
    let state = AppState(Arc::new(shared));
    let public = public::routes(&state);
    let ops = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi_json));
    let mut router = public.merge(ops);
    if !state.engine.config().admin_tokens.is_empty() {
        router = router.nest("/admin/v1", admin::routes(state.clone()));
    }
    router
        .fallback(not_found)
        // The gateway reads every body whole, refusing one over `REQUEST_BODY_MAX`, so the
        // extractors never meet a larger one: no body-limit layer (a layer is a boxed service
        // cloned for every request on every route).
        .layer(gateway::GatewayLayer::new(state.clone()))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
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

async fn openapi_json() -> Json<&'static serde_json::Value> {
    Json(openapi::document())
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_is_two_lowercase_digits_per_byte() {
        assert_eq!(super::hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(super::hex(&[]), "");
    }

    #[test]
    fn the_request_id_header_is_the_ids_text() {
        for number in [0, 1, 9, 10, 12_345, u64::MAX] {
            let id = super::RequestId { node: "node-a".into(), number };
            assert_eq!(id.header_value().expect("a valid header"), id.to_string().as_str());
        }
    }
}
