//! The payment provider's top-up webhook, `POST /v1/payments/webhook`: points are money, so
//! the only public way to add them is a call the provider signs with a secret of its own.
//!
//! The signature travels as `Tcore-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of
//! "<t>.<body>">` (the scheme Stripe uses). A signature more than [`WEBHOOK_TOLERANCE_S`] off
//! the engine's clock is refused, so a captured call cannot be replayed later; within that
//! window a replay adds nothing, because each event's id is its top-up's idempotency key.
//!
//! **Invariant:** nothing in the body is read before the signature over the raw bytes checks.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use utoipa::ToSchema;

use super::public::UserView;
use super::{ApiError, AppState, hex, respond};

/// The header carrying the signature.
pub const SIGNATURE_HEADER: &str = "tcore-signature";
/// How far a signature's time may be from the engine's clock.
pub const WEBHOOK_TOLERANCE_S: u64 = 300;
/// Who the audit log names for webhook top-ups.
pub const WEBHOOK_ACTOR: &str = "payment-webhook";
/// The longest event id.
pub const EVENT_ID_LEN_MAX: usize = 128;

/// A payment the provider took, to be credited as points.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct TopUpEvent {
    /// The provider's id of the payment: a second delivery of one event adds nothing.
    #[schema(min_length = 1, max_length = 128)]
    event_id: String,
    #[schema(minimum = 1)]
    user_id: u64,
    #[schema(minimum = 1, maximum = 10_000_000)]
    amount: u64,
}

/// The value of [`SIGNATURE_HEADER`] for `body` signed at `at_s` with `secret`.
pub fn sign(secret: &[u8], at_s: u64, body: &[u8]) -> String {
    format!("t={at_s},v1={}", hex(&mac(secret, at_s, body).finalize().into_bytes()))
}

fn mac(secret: &[u8], at_s: u64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret).unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(at_s.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|at| u8::from_str_radix(text.get(at..at + 2)?, 16).ok()).collect()
}

/// Checks `header` against `body` at `now_s`.
fn verify(secret: &[u8], header: Option<&str>, body: &[u8], now_s: u64) -> Result<(), ApiError> {
    let refuse = |detail: &str| ApiError::new(StatusCode::UNAUTHORIZED, "webhook_signature_invalid", detail);
    let header = header.ok_or_else(|| refuse("the webhook needs a Tcore-Signature header"))?;
    let (mut at_s, mut signatures) = (None, Vec::new());
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", value)) => at_s = value.parse::<u64>().ok(),
            Some(("v1", value)) => signatures.extend(unhex(value)),
            _ => {}
        }
    }
    let at_s = at_s.ok_or_else(|| refuse("the signature has no time"))?;
    if at_s.abs_diff(now_s) > WEBHOOK_TOLERANCE_S {
        return Err(refuse("the signature's time is too far from now"));
    }
    let matches = signatures.iter().any(|signature| mac(secret, at_s, body).verify_slice(signature).is_ok());
    if !matches {
        return Err(refuse("the signature does not match"));
    }
    Ok(())
}

/// Credits points for a payment the provider took; signed by the provider.
#[utoipa::path(post, path = "/v1/payments/webhook", request_body = TopUpEvent,
    params(("Tcore-Signature" = String, Header, description = "t=<unix s>,v1=<hex HMAC-SHA256 of \"t.body\">")),
    responses((status = 200, body = UserView),
        (status = 401, description = "`webhook_signature_invalid`: no signature, a wrong one, or one too old.", body = super::Problem),
        (status = 404, description = "`not_found`: no such user, or this engine takes no webhooks.", body = super::Problem),
        (status = 409, description = "`top_up_key_reused`: this event was credited to another account.", body = super::Problem),
        (status = 422, description = "`invalid_body`, `out_of_bounds`, `invalid_amount`: the event cannot be credited.", body = super::Problem)))]
pub(super) async fn top_up(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(secret) = state.engine.config().payment_webhook_secret.as_deref() else {
        return ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route").into_response();
    };
    let now_s = state.engine.clock().now_ms() / 1000;
    let header = headers.get(SIGNATURE_HEADER).and_then(|value| value.to_str().ok());
    if let Err(error) = verify(secret, header, &body, now_s) {
        return error.into_response();
    }
    let event: TopUpEvent = match super::json::parse(&body) {
        Ok(event) => event,
        Err(error) => return error.into_response(),
    };
    if event.event_id.is_empty() || event.event_id.len() > EVENT_ID_LEN_MAX {
        return ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", "event_id must have 1 to 128 bytes")
            .into_response();
    }
    let key = format!("webhook:{}", event.event_id);
    let result = state.engine.top_up(WEBHOOK_ACTOR, event.user_id, event.amount, key).await;
    respond(StatusCode::OK, result.map(UserView::from).map_err(ApiError::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"a-webhook-secret-of-32-bytes-min";

    #[test]
    fn a_signature_verifies_only_for_its_body_secret_and_time() {
        let body = br#"{"event_id":"e1","user_id":1,"amount":5}"#;
        let header = sign(SECRET, 1_000, body);
        assert_eq!(verify(SECRET, Some(&header), body, 1_000), Ok(()));
        assert_eq!(verify(SECRET, Some(&header), body, 1_000 + WEBHOOK_TOLERANCE_S), Ok(()));
        let refused = |result: Result<(), ApiError>| result.map_err(|error| error.code);
        assert_eq!(
            refused(verify(SECRET, Some(&header), body, 1_001 + WEBHOOK_TOLERANCE_S)),
            Err("webhook_signature_invalid")
        );
        assert!(verify(SECRET, Some(&header), br#"{"event_id":"e1","user_id":1,"amount":50}"#, 1_000).is_err());
        assert!(verify(b"another-secret-of-32-bytes-at-least", Some(&header), body, 1_000).is_err());
        assert!(verify(SECRET, None, body, 1_000).is_err());
        assert!(verify(SECRET, Some("t=1000,v1=zz"), body, 1_000).is_err());
        assert!(verify(SECRET, Some(&header.replace("t=1000", "t=1001")), body, 1_000).is_err());
    }
}
