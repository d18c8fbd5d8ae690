//! JSON request bodies, read the way their schemas in the OpenAPI document say.
//!
//! **Invariant:** a body the document's schema accepts is read, and one it refuses is refused
//! with a problem: JSON Schema counts `42.0` as an integer, so an integral number written with
//! a fraction is read as that integer wherever an integer is expected.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, StatusCode, header};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::ApiError;

/// A JSON body whose refusals are problem responses (400 `invalid_body` for what is not JSON,
/// 415 without a JSON content type, 422 for JSON of the wrong shape).
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        if !has_json_content_type(request.headers()) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_body",
                "expected a request with `Content-Type: application/json`",
            ));
        }
        // The gateway has read the whole body already: this only takes it.
        let bytes = Bytes::from_request(request, state).await.map_err(|_| ApiError::body_too_large())?;
        parse(&bytes).map(ApiJson)
    }
}

fn has_json_content_type(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE).and_then(|value| value.to_str().ok()) else {
        return false;
    };
    // Compared without an allocation: this runs for every request with a JSON body.
    let essence = value.split(';').next().unwrap_or_default().trim();
    let Some((kind, subtype)) = essence.split_once('/') else { return false };
    let suffix = subtype.len().checked_sub(5).and_then(|at| subtype.get(at..));
    kind.eq_ignore_ascii_case("application")
        && (subtype.eq_ignore_ascii_case("json") || suffix.is_some_and(|suffix| suffix.eq_ignore_ascii_case("+json")))
}

/// Reads `bytes` as a `T`: see the module's invariant.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let first = match serde_json::from_slice(bytes) {
        Ok(parsed) => return Ok(parsed),
        Err(error) => error,
    };
    let refused = |error: &serde_json::Error| {
        let status = if error.is_data() { StatusCode::UNPROCESSABLE_ENTITY } else { StatusCode::BAD_REQUEST };
        ApiError::new(status, "invalid_body", format!("the body could not be read: {error}"))
    };
    if !first.is_data() {
        return Err(refused(&first));
    }
    let Ok(mut value) = serde_json::from_slice::<Value>(bytes) else { return Err(refused(&first)) };
    if !integral_numbers_as_integers(&mut value) {
        return Err(refused(&first));
    }
    serde_json::from_value(value).map_err(|_| refused(&first))
}

/// Rewrites every number with a zero fraction that fits an `i64` or a `u64` as that integer;
/// whether it rewrote any.
fn integral_numbers_as_integers(value: &mut Value) -> bool {
    match value {
        Value::Number(number) => {
            let Some(float) = number.as_f64().filter(|_| number.is_f64()) else { return false };
            if float.fract() != 0.0 || !float.is_finite() {
                return false;
            }
            // Casts saturate; the bounds check makes them exact.
            let integer = if (0.0..18_446_744_073_709_551_616.0).contains(&float) {
                serde_json::Number::from(float as u64)
            } else if (-9_223_372_036_854_775_808.0..0.0).contains(&float) {
                serde_json::Number::from(float as i64)
            } else {
                return false;
            };
            *number = integer;
            true
        }
        // Every item is visited: `any` would stop at the first one it changed.
        Value::Array(items) => {
            items.iter_mut().map(integral_numbers_as_integers).filter(|changed| *changed).count() > 0
        }
        Value::Object(fields) => {
            fields.values_mut().map(integral_numbers_as_integers).filter(|changed| *changed).count() > 0
        }
        Value::Null | Value::Bool(_) | Value::String(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Hold {
        seat_id: u64,
        rate: f64,
    }

    #[test]
    fn json_content_types_are_told_apart_from_others() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, value.parse().expect("header value"));
            has_json_content_type(&headers)
        };
        for json in
            ["application/json", "Application/JSON; charset=utf-8", "application/problem+json", "application/x+JSON"]
        {
            assert!(with(json), "{json}");
        }
        for other in ["text/json", "application/jsonx", "application/+jso", "json", "application/x-www-form-urlencoded"]
        {
            assert!(!with(other), "{other}");
        }
        assert!(!has_json_content_type(&HeaderMap::new()));
    }

    #[test]
    fn integral_numbers_with_a_fraction_are_read_as_integers_and_nothing_else_is() {
        assert_eq!(parse::<Hold>(br#"{"seat_id":42.0,"rate":1.5}"#), Ok(Hold { seat_id: 42, rate: 1.5 }));
        assert_eq!(parse::<Hold>(br#"{"seat_id":42,"rate":2.0}"#), Ok(Hold { seat_id: 42, rate: 2.0 }));
        let code = |body: &[u8]| parse::<Hold>(body).map_err(|error| (error.status, error.code));
        let shape = Err((StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"));
        assert_eq!(code(br#"{"seat_id":42.5,"rate":1}"#), shape);
        assert_eq!(code(br#"{"seat_id":-1.0,"rate":1}"#), shape);
        assert_eq!(code(br#"{"seat_id":1e30,"rate":1}"#), shape);
        assert_eq!(code(br#"{"seat_id":1,"rate":1,"extra":1.0}"#), shape);
        assert_eq!(code(br#"{"seat_id":1,"#), Err((StatusCode::BAD_REQUEST, "invalid_body")));
    }
}
