//! `Idempotency-Key` on every mutating call: the same key with the same request returns the
//! same response, byte for byte; the same key with another request is a 422; a key whose
//! request is still running is a 409 (`Retry-After: 1`).
//!
//! A request claims its key with a short lease (`EngineConfig::idempotency_lease_ms`) and
//! renews it every third of the lease while it runs ([`crate::Engine::idempotency_watchdog`]):
//! a slow request keeps its claim, and once the node running it dies, a retry with the same
//! key runs at most a lease later (the confirm it runs again is itself idempotent).
//!
//! Keys are scoped: the record is kept under a digest of the session's user (or, for a caller
//! without a session, the client address), the method, the route template and the key, so one
//! caller's key can never replay, block or refuse another caller's request.
//!
//! **Invariant:** a response is stored only when the outcome is final (not a 5xx, 429 or
//! 503), so a retry after a failure runs the request again instead of replaying the failure.

use std::convert::Infallible;
use std::net::IpAddr;

use axum::body::{Body, to_bytes};
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use tower::Service;

use super::gateway::answer;
use super::{ApiError, AppState, REQUEST_BODY_MAX};
use crate::domain::{IdempotencyDecision, StoredResponse, UserId};

/// The header's name.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// The longest key accepted.
pub const IDEMPOTENCY_KEY_LEN_MAX: usize = 255;
/// Whether `key` is a usable key: 1 to [`IDEMPOTENCY_KEY_LEN_MAX`] visible ASCII characters or
/// spaces, starting and ending with a visible one (the OpenAPI document's pattern).
pub fn is_valid_key(key: &[u8]) -> bool {
    let visible = |byte: &u8| (0x21..=0x7e).contains(byte);
    (1..=IDEMPOTENCY_KEY_LEN_MAX).contains(&key.len())
        && key.iter().all(|byte| *byte == b' ' || visible(byte))
        && key.first().is_some_and(visible)
        && key.last().is_some_and(visible)
}

/// The largest response stored for replay.
pub const STORED_RESPONSE_MAX: usize = 256 * 1024;

/// Whose key it is, and for which operation.
#[derive(Debug, Clone, Copy)]
pub(super) struct Scope<'a> {
    /// The verified session's user, if any.
    pub user: Option<UserId>,
    /// The client address, which scopes the keys of callers without a session.
    pub ip: IpAddr,
    /// The route template (`/v1/reservations/{id}/confirm`), not the concrete path.
    pub route: &'a str,
}

impl Scope<'_> {
    /// The key a record is stored under: a hex SHA-256 of the scope and the client's key, so
    /// it stays within the stores' 255-byte key columns whatever the key's length.
    fn record_key(&self, method: &str, key: &str) -> String {
        let mut hasher = Sha256::new();
        match self.user {
            Some(user) => hasher.update(format!("user:{user}")),
            None => hasher.update(format!("ip:{}", self.ip)),
        }
        for part in [method, self.route, key] {
            hasher.update([0]);
            hasher.update(part);
        }
        super::hex(&hasher.finalize())
    }
}

/// Runs a request that carries `key` in its `Idempotency-Key` header: the gateway calls it for
/// every public `POST` (every mutating public route) with one, after the guards.
pub(super) async fn run<S>(
    state: AppState,
    key: HeaderValue,
    scope: Scope<'_>,
    request: Request,
    mut inner: S,
) -> Response
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    let key = match key.to_str() {
        Ok(key) if is_valid_key(key.as_bytes()) => key.to_owned(),
        _ => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_idempotency_key",
                "Idempotency-Key must be 1 to 255 visible ASCII characters",
            )
            .into_response();
        }
    };
    let key = scope.record_key(request.method().as_str(), &key);
    let (parts, body) = request.into_parts();
    let Ok(body) = to_bytes(body, REQUEST_BODY_MAX).await else {
        return ApiError::body_too_large().into_response();
    };
    let fingerprint = fingerprint(&parts, &body);
    let engine = &state.engine;
    let lease_ms = engine.config().idempotency_lease_ms;
    let decision = match engine.idempotency_begin(key.clone(), fingerprint, lease_ms).await {
        Ok(decision) => decision,
        Err(error) => return ApiError::from(error).into_response(),
    };
    match decision {
        IdempotencyDecision::Replay(stored) => replay(stored),
        IdempotencyDecision::InProgress => ApiError::new(
            StatusCode::CONFLICT,
            "idempotency_in_progress",
            "a request with this Idempotency-Key is still running",
        )
        .retry_after(1)
        .into_response(),
        IdempotencyDecision::Mismatch => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            "this Idempotency-Key was used with a different request",
        )
        .into_response(),
        IdempotencyDecision::Proceed => {
            let running = async {
                let response = answer(inner.call(Request::from_parts(parts, Body::from(body))).await);
                let (response_parts, response_body) = response.into_parts();
                (response_parts, to_bytes(response_body, STORED_RESPONSE_MAX).await)
            };
            // The claim stays ours only as long as this node keeps renewing it: a retry meets
            // 409 while the request runs, and runs it again a lease after the node died.
            let (response_parts, bytes) = tokio::select! {
                biased;
                done = running => done,
                never = engine.idempotency_watchdog(&key, fingerprint, lease_ms) => match never {},
            };
            let status = response_parts.status;
            let Ok(bytes) = bytes else {
                let _ = engine.idempotency_release(key, fingerprint).await;
                return ApiError::internal("response too large to store").into_response();
            };
            let outcome = if is_final(status) {
                let content_type = response_parts
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|value| value.to_str().ok())
                    .unwrap_or("application/json")
                    .to_owned();
                let stored = StoredResponse { status: status.as_u16(), content_type, body: bytes.to_vec() };
                engine.idempotency_complete(key, fingerprint, stored).await
            } else {
                engine.idempotency_release(key, fingerprint).await
            };
            if let Err(error) = outcome {
                tracing::warn!(%error, "idempotency record not updated; the lease will lapse");
            }
            Response::from_parts(response_parts, Body::from(bytes))
        }
    }
}

fn is_final(status: StatusCode) -> bool {
    !(status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS)
}

fn fingerprint(parts: &axum::http::request::Parts, body: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(parts.method.as_str());
    hasher.update([0]);
    hasher.update(parts.uri.path());
    hasher.update([0]);
    hasher.update(parts.uri.query().unwrap_or(""));
    hasher.update([0]);
    // The queue token, not the session: a fan whose session was renewed may still retry. The
    // session's user is part of the record's key already.
    hasher.update(parts.headers.get(super::QUEUE_TOKEN_HEADER).map_or(&b""[..], HeaderValue::as_bytes));
    hasher.update([0]);
    hasher.update(body);
    hasher.finalize().into()
}

fn replay(stored: StoredResponse) -> Response {
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    let content_type =
        HeaderValue::from_str(&stored.content_type).unwrap_or(HeaderValue::from_static("application/json"));
    (status, [(header::CONTENT_TYPE, content_type)], stored.body).into_response()
}
