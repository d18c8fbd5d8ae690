//! Errors as RFC 7807 `application/problem+json`, each with a stable `code`.
//!
//! **Invariants:** internal detail (store errors, panics) is logged, never sent: a 5xx body
//! says only that something went wrong. Every problem answered by the server names its
//! request's id (`request_id`, also in the `X-Request-Id` header of every response), which
//! the node's logs use too.

use std::fmt;
use std::sync::Arc;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::domain::{TokenStatus, TransitionError};
use crate::engine::EngineError;
use crate::guards::{LimitScope, Rejection};
use crate::sessions::SessionError;

/// A problem document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub problem_type: String,
    pub title: String,
    pub status: u16,
    /// Stable, machine-readable: clients branch on this, never on `title` or `detail`.
    pub code: String,
    pub detail: String,
    /// The request's id, as in its `X-Request-Id` header and the node's logs.
    pub request_id: String,
}

/// A request's id: the node's name and the request's number on that node.
#[derive(Debug, Clone)]
pub struct RequestId {
    pub node: Arc<str>,
    pub number: u64,
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.node, self.number)
    }
}

tokio::task_local! {
    /// The id of the request being answered: the gateway runs each request in its scope.
    static REQUEST_ID: RequestId;
}

impl RequestId {
    /// Runs `future` as the request with this id: the problems it answers name the id.
    pub(crate) fn scope<F: Future>(self, future: F) -> impl Future<Output = F::Output> {
        REQUEST_ID.scope(self, future)
    }

    /// The `X-Request-Id` header's value: the text of [`fmt::Display`], written without the
    /// formatting machinery, since every response carries one.
    pub(crate) fn header_value(&self) -> Option<HeaderValue> {
        let mut digits = [0_u8; 20];
        let mut start = digits.len();
        let mut number = self.number;
        loop {
            start -= 1;
            digits[start] = b'0' + (number % 10) as u8;
            number /= 10;
            if number == 0 {
                break;
            }
        }
        let mut text = Vec::with_capacity(self.node.len() + 1 + digits.len() - start);
        text.extend_from_slice(self.node.as_bytes());
        text.push(b'-');
        text.extend_from_slice(&digits[start..]);
        HeaderValue::from_maybe_shared(bytes::Bytes::from(text)).ok()
    }

    /// The id of the request being answered, or `-` outside of any.
    fn current() -> String {
        REQUEST_ID.try_with(ToString::to_string).unwrap_or_else(|_| "-".to_owned())
    }
}

/// An error on its way to becoming a problem response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
    pub retry_after_s: Option<u64>,
    /// A 401's `WWW-Authenticate: Bearer` challenge.
    pub challenge: bool,
}

impl ApiError {
    /// A problem with `status`, stable `code` and a human `detail`.
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self { status, code, detail: detail.into(), retry_after_s: None, challenge: false }
    }

    /// Adds a `WWW-Authenticate: Bearer` challenge (RFC 6750).
    pub fn www_authenticate(mut self) -> Self {
        self.challenge = true;
        self
    }

    /// Adds a `Retry-After` header.
    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after_s = Some(seconds.max(1));
        self
    }

    /// The 500 a client sees for anything unexpected; `reason` goes to the log only.
    pub fn internal(reason: &str) -> Self {
        tracing::error!(request_id = %RequestId::current(), reason, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "something went wrong; the request id finds it in the node's logs",
        )
    }

    /// The 413 of a body over [`REQUEST_BODY_MAX`](super::REQUEST_BODY_MAX), or one that
    /// could not be read to its end.
    pub fn body_too_large() -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", "the request body is too large")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem = Problem {
            problem_type: format!("urn:tcore:problem:{}", self.code),
            title: self.status.canonical_reason().unwrap_or("error").to_owned(),
            status: self.status.as_u16(),
            code: self.code.to_owned(),
            detail: self.detail,
            request_id: RequestId::current(),
        };
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut response = (self.status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if let Some(seconds) = self.retry_after_s {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.challenge {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> Self {
        use StatusCode as S;
        let detail = error.to_string();
        match error {
            EngineError::NotFound { .. } => Self::new(S::NOT_FOUND, "not_found", detail),
            EngineError::TokenMissing => Self::new(S::UNAUTHORIZED, "token_missing", detail),
            EngineError::TokenInvalid(_) => Self::new(S::UNAUTHORIZED, "token_invalid", detail),
            EngineError::TokenWrongSchedule { .. } => Self::new(S::FORBIDDEN, "token_wrong_schedule", detail),
            EngineError::TokenNotAdmitted { status } => match status {
                TokenStatus::Waiting => Self::new(S::FORBIDDEN, "token_not_admitted", detail),
                TokenStatus::Expired => Self::new(S::FORBIDDEN, "token_expired", detail),
                TokenStatus::Used | TokenStatus::Admitted => Self::new(S::FORBIDDEN, "token_used", detail),
            },
            EngineError::NotOwner => Self::new(S::FORBIDDEN, "not_owner", detail),
            EngineError::QueuePlaceLost => Self::new(S::GONE, "queue_place_lost", detail),
            EngineError::TokenNotYours => Self::new(S::FORBIDDEN, "token_not_yours", detail),
            EngineError::NotYourAccount => Self::new(S::FORBIDDEN, "not_your_account", detail),
            EngineError::SeatTaken => Self::new(S::CONFLICT, "seat_taken", detail),
            EngineError::SeatLocked => Self::new(S::CONFLICT, "seat_locked", detail).retry_after(1),
            EngineError::Rejected(rejection) => match rejection {
                TransitionError::HoldExpired { .. } => Self::new(S::GONE, "hold_expired", detail),
                TransitionError::StaleFence { .. } => Self::new(S::CONFLICT, "stale_fence", detail),
                TransitionError::NotHeld { .. } => Self::new(S::CONFLICT, "not_held", detail),
                TransitionError::AlreadyFinal { .. } | TransitionError::HoldStillValid => {
                    Self::new(S::CONFLICT, "already_final", detail)
                }
                TransitionError::InsufficientPoints { .. } => {
                    Self::new(S::PAYMENT_REQUIRED, "insufficient_points", detail)
                }
                TransitionError::InvalidAmount { .. } => Self::new(S::UNPROCESSABLE_ENTITY, "invalid_amount", detail),
                TransitionError::TokenNotAdmitted { .. } => Self::new(S::FORBIDDEN, "token_not_admitted", detail),
                TransitionError::SeatUnavailable => Self::new(S::CONFLICT, "seat_taken", detail),
                TransitionError::SeatLimitReached { .. } => Self::new(S::CONFLICT, "seat_limit_reached", detail),
                TransitionError::TopUpKeyReused => Self::new(S::CONFLICT, "top_up_key_reused", detail),
            },
            EngineError::Invalid { .. } => Self::new(S::UNPROCESSABLE_ENTITY, "validation_failed", detail),
            EngineError::OutOfBounds(_) => Self::new(S::UNPROCESSABLE_ENTITY, "out_of_bounds", detail),
            EngineError::StoreUnavailable { reason } => {
                tracing::warn!(%reason, "store unavailable");
                Self::new(
                    S::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "a store is unavailable; retry with the same Idempotency-Key",
                )
                .retry_after(1)
            }
        }
    }
}

impl From<Rejection> for ApiError {
    fn from(rejection: Rejection) -> Self {
        match rejection {
            Rejection::Blocked { until_ms } => {
                Self::new(StatusCode::FORBIDDEN, "ip_blocked", format!("this address is blocked until {until_ms} ms"))
            }
            Rejection::UserBlocked { until_ms } => {
                Self::new(StatusCode::FORBIDDEN, "user_blocked", format!("this user is blocked until {until_ms} ms"))
            }
            Rejection::RateLimited { scope, retry_after_s } => {
                let what = match scope {
                    LimitScope::Ip => "this address",
                    LimitScope::User => "this user",
                    LimitScope::Accounts => "this address: too many accounts opened this hour",
                };
                Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", format!("too many requests from {what}"))
                    .retry_after(retry_after_s)
            }
        }
    }
}

impl From<SessionError> for ApiError {
    fn from(error: SessionError) -> Self {
        let code = match error {
            SessionError::Missing => "session_missing",
            SessionError::Invalid(_) => "session_invalid",
            SessionError::Expired => "session_expired",
        };
        Self::new(StatusCode::UNAUTHORIZED, code, error.to_string()).www_authenticate()
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_path", rejection.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_query", rejection.body_text())
    }
}
