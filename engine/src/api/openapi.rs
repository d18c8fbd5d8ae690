//! The OpenAPI document of the public and admin API: the handlers' own annotations (their
//! bodies, parameters, bounds and the refusals only they make), completed here with what the
//! operations share: the refusals of the gateway, the guards, the extractors and the
//! authentication each operation passes, the headers every answer carries, and the links a
//! client follows from one answer to the next call.
//!
//! **Invariants:** every status an operation can answer is listed; every error (4xx, 5xx) is
//! `application/problem+json` with [`Problem`]'s schema, and its description names the stable
//! codes it may carry; the document is built once per process and served as it was built.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use serde_json::{Map, Value, json};
use utoipa::OpenApi;

use super::{Problem, admin, public, webhook};

/// The OpenAPI document, as `GET /openapi.json` serves it.
pub fn document() -> &'static Value {
    static DOCUMENT: LazyLock<Value> = LazyLock::new(build);
    &DOCUMENT
}

/// The handlers' annotations, before [`complete`].
#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "T-CORE engine", description = "Ticket openings without overselling: waiting room, holds, payments."),
    paths(
        public::list_schedules, public::create_user, public::dev_session, public::get_user, public::join_queue,
        public::queue_status, public::seat_map, public::hold, public::confirm, public::cancel, public::get_reservation,
        webhook::top_up,
        admin::snapshot, admin::set_admission, admin::set_rate_limits, admin::block, admin::unblock,
        admin::block_user, admin::unblock_user,
        admin::set_hold_ttl, admin::top_up, admin::set_seat_limit, admin::audit, admin::export, admin::record_decision,
    ),
    components(schemas(Problem)),
    modifiers(&SecuritySchemes),
)]
pub struct Annotated;

fn build() -> Value {
    let mut document = serde_json::to_value(Annotated::openapi()).unwrap_or_else(|error| {
        unreachable!("an OpenAPI document always serializes: {error}");
    });
    complete(&mut document);
    document
}

struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        let session = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .bearer_format("JWT")
            .description(Some("The fan's session: a JWT whose `sub` is the user id, with `aud` and `exp`."))
            .build();
        components.add_security_scheme("session", SecurityScheme::Http(session));
        let queue_token = ApiKeyValue::with_description(
            "X-Queue-Token",
            "The queue token from joining the schedule's waiting room; it must name the session's user.",
        );
        components.add_security_scheme("queue_token", SecurityScheme::ApiKey(ApiKey::Header(queue_token)));
        let admin = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .description(Some("One of the node's named admin tokens; its name is the actor of the audit log."))
            .build();
        components.add_security_scheme("admin_token", SecurityScheme::Http(admin));
    }
}

/// What decides which shared refusals an operation can meet.
#[derive(Debug, Clone, Copy)]
struct Facts {
    public: bool,
    admin: bool,
    post: bool,
    session: bool,
    queue_token: bool,
    body: bool,
    path_parameters: bool,
    query_parameters: bool,
}

impl Facts {
    fn of(path: &str, method: &str, operation: &Value) -> Self {
        let schemes: Vec<&str> = operation["security"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_object)
            .flat_map(|requirement| requirement.keys().map(String::as_str))
            .collect();
        let located = |place: &str| {
            operation["parameters"].as_array().into_iter().flatten().any(|parameter| parameter["in"] == place)
        };
        Self {
            public: path.starts_with(super::gateway::PUBLIC_PREFIX),
            admin: path.starts_with("/admin/"),
            post: method == "post",
            session: schemes.contains(&"session"),
            queue_token: schemes.contains(&"queue_token"),
            body: operation.get("requestBody").is_some(),
            path_parameters: located("path"),
            query_parameters: located("query"),
        }
    }
}

/// A refusal several operations share: its status, stable code, and which operations meet it.
struct Shared {
    status: u16,
    code: &'static str,
    meets: fn(Facts) -> bool,
}

const SHARED: &[Shared] = &[
    Shared { status: 400, code: "invalid_path", meets: |f| f.path_parameters },
    Shared { status: 400, code: "invalid_query", meets: |f| f.query_parameters },
    Shared { status: 400, code: "invalid_body", meets: |f| f.body },
    Shared { status: 400, code: "invalid_idempotency_key", meets: |f| f.public && f.post },
    Shared { status: 401, code: "session_missing", meets: |f| f.session },
    Shared { status: 401, code: "session_invalid", meets: |f| f.session },
    Shared { status: 401, code: "session_expired", meets: |f| f.session },
    Shared { status: 401, code: "token_missing", meets: |f| f.queue_token },
    Shared { status: 401, code: "token_invalid", meets: |f| f.queue_token },
    Shared { status: 401, code: "admin_unauthorized", meets: |f| f.admin },
    Shared { status: 403, code: "ip_blocked", meets: |f| f.public },
    // The guards judge the session of any public request that carries one, not only of the
    // routes that need one.
    Shared { status: 403, code: "user_blocked", meets: |f| f.public },
    Shared { status: 403, code: "token_not_yours", meets: |f| f.queue_token },
    Shared { status: 403, code: "token_wrong_schedule", meets: |f| f.queue_token },
    Shared { status: 403, code: "token_not_admitted", meets: |f| f.queue_token },
    Shared { status: 403, code: "token_expired", meets: |f| f.queue_token },
    Shared { status: 403, code: "token_used", meets: |f| f.queue_token },
    Shared { status: 403, code: "admin_forbidden", meets: |f| f.admin },
    Shared { status: 408, code: "body_timeout", meets: |f| f.body },
    Shared { status: 409, code: "idempotency_in_progress", meets: |f| f.public && f.post },
    Shared { status: 413, code: "body_too_large", meets: |f| f.body },
    Shared { status: 415, code: "invalid_body", meets: |f| f.body },
    Shared { status: 422, code: "invalid_body", meets: |f| f.body },
    Shared { status: 422, code: "idempotency_key_reused", meets: |f| f.public && f.post },
    Shared { status: 429, code: "rate_limited", meets: |f| f.public },
    Shared { status: 429, code: "admin_auth_locked", meets: |f| f.admin },
    Shared { status: 500, code: "internal", meets: |_| true },
    Shared { status: 503, code: "store_unavailable", meets: |_| true },
];

const METHODS: [&str; 5] = ["get", "put", "post", "delete", "patch"];

/// Adds the shared refusals, problem bodies, headers and links to every operation.
fn complete(document: &mut Value) {
    unsigned_integers(document);
    let Some(paths) = document["paths"].as_object_mut() else { return };
    for (path, item) in paths.iter_mut() {
        for method in METHODS {
            let Some(operation) = item.get_mut(method) else { continue };
            let facts = Facts::of(path, method, operation);
            // Every public POST takes an Idempotency-Key; the admin top-up needs one.
            let top_up = path == "/admin/v1/users/{id}/points";
            if (facts.public && facts.post) || top_up {
                let parameter = idempotency_key_parameter(top_up);
                match operation["parameters"].as_array_mut() {
                    Some(parameters) => parameters.push(parameter),
                    None => operation["parameters"] = json!([parameter]),
                }
            }
            let responses = operation["responses"].as_object_mut().map(std::mem::take).unwrap_or_default();
            operation["responses"] = Value::Object(completed_responses(facts, responses));
        }
    }
    // `std::net::IpAddr` reads exactly the IPv4 and IPv6 forms: say so where one is taken.
    let ip_address =
        json!({ "oneOf": [{ "type": "string", "format": "ipv4" }, { "type": "string", "format": "ipv6" }] });
    document["components"]["schemas"]["BlockRequest"]["properties"]["ip"] = ip_address.clone();
    let unblock = document["paths"]["/admin/v1/blocks/{ip}"]["delete"]["parameters"].as_array_mut();
    for parameter in unblock.into_iter().flatten().filter(|parameter| parameter["name"] == "ip") {
        parameter["schema"] = ip_address.clone();
    }
    for (path, method, status, target, parameter, expression) in LINKS {
        let response = &mut document["paths"][path][method]["responses"][status];
        if response.is_object() {
            let link = json!({ "operationId": target, "parameters": { (*parameter): expression } });
            response["links"][*target] = link;
        }
    }
}

fn completed_responses(facts: Facts, mut responses: Map<String, Value>) -> Map<String, Value> {
    let mut shared: BTreeMap<u16, Vec<&'static str>> = BTreeMap::new();
    for refusal in SHARED.iter().filter(|refusal| (refusal.meets)(facts)) {
        let codes = shared.entry(refusal.status).or_default();
        if !codes.contains(&refusal.code) {
            codes.push(refusal.code);
        }
    }
    for (status, codes) in shared {
        let response = responses.entry(status.to_string()).or_insert_with(|| json!({ "description": "" }));
        let listed = codes.iter().map(|code| format!("`{code}`")).collect::<Vec<_>>().join(", ");
        let description = response["description"].as_str().unwrap_or_default().trim().to_owned();
        let shared_text = format!("Also: {listed}.");
        response["description"] =
            Value::String(if description.is_empty() { shared_text } else { format!("{description} {shared_text}") });
    }
    for (status, response) in &mut responses {
        let error = status.parse::<u16>().is_ok_and(|status| status >= 400);
        if error {
            response["content"] = json!({
                "application/problem+json": { "schema": { "$ref": "#/components/schemas/Problem" } }
            });
        }
        let headers = response.as_object_mut().map(|response| response.entry("headers").or_insert_with(|| json!({})));
        if let Some(headers) = headers {
            headers["X-Request-Id"] = json!({
                "description": "The request's id: the node's name and the request's number on it, as in its logs.",
                "schema": { "type": "string" }
            });
            if status == "429" || status == "503" {
                headers["Retry-After"] =
                    json!({ "description": "Seconds to wait before trying again.", "schema": { "type": "integer" } });
            }
            // A request with the same Idempotency-Key still runs (its node renews its claim;
            // a claim whose node died lapses within the lease, 5 s by default).
            if status == "409" && facts.public && facts.post {
                headers["Retry-After"] = json!({
                    "description": "With `idempotency_in_progress` (and `seat_locked`): seconds to wait before trying again.",
                    "schema": { "type": "integer" }
                });
            }
            if status == "401" {
                headers["WWW-Authenticate"] = json!({ "description": "`Bearer`, when a credential is missing or refused.", "schema": { "type": "string" } });
            }
        }
    }
    responses
}

/// The `Idempotency-Key` header: what [`super::idempotency`] reads as a key.
fn idempotency_key_parameter(required: bool) -> Value {
    json!({
        "name": "Idempotency-Key",
        "in": "header",
        "required": required,
        "description": "1 to 255 visible ASCII characters: a retry with the same key and request replays the first answer.",
        "schema": { "type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[\\x21-\\x7e]([\\x20-\\x7e]*[\\x21-\\x7e])?$" }
    })
}

/// The document names Rust's unsigned integers as JSON Schema formats `int32` and `int64` with
/// `minimum: 0`, which read as signed: name them `uint32` and `uint64`, with their maximum.
fn unsigned_integers(value: &mut Value) {
    match value {
        Value::Object(fields) => {
            let unsigned = fields.get("minimum").and_then(Value::as_f64).is_some_and(|minimum| minimum >= 0.0);
            let width = match fields.get("format").and_then(Value::as_str) {
                Some("int32") if unsigned => Some(("uint32", json!(u32::MAX))),
                Some("int64") if unsigned => Some(("uint64", json!(u64::MAX))),
                _ => None,
            };
            if let Some((format, maximum)) = width {
                fields.insert("format".into(), json!(format));
                fields.entry("maximum").or_insert(maximum);
            }
            fields.values_mut().for_each(unsigned_integers);
        }
        Value::Array(items) => items.iter_mut().for_each(unsigned_integers),
        _ => {}
    }
}

/// The links a client follows: (path, method, status, target operation, its parameter, the
/// runtime expression that fills it).
const LINKS: &[(&str, &str, &str, &str, &str, &str)] = &[
    ("/v1/users", "post", "201", "get_user", "id", "$response.body#/id"),
    ("/v1/schedules/{id}/queue", "post", "201", "queue_status", "token", "$response.body#/token"),
    ("/v1/holds", "post", "201", "get_reservation", "id", "$response.body#/reservation_id"),
    ("/v1/holds", "post", "201", "confirm", "id", "$response.body#/reservation_id"),
    ("/v1/holds", "post", "201", "cancel", "id", "$response.body#/reservation_id"),
    ("/v1/reservations/{id}/confirm", "post", "200", "get_reservation", "id", "$response.body#/id"),
    ("/v1/reservations/{id}/confirm", "post", "200", "cancel", "id", "$response.body#/id"),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn operations() -> impl Iterator<Item = (String, &'static str, &'static Value)> {
        document()["paths"].as_object().into_iter().flatten().flat_map(|(path, item)| {
            METHODS.into_iter().filter_map(move |method| Some((path.clone(), method, item.get(method)?)))
        })
    }

    #[test]
    fn every_error_of_every_operation_is_a_problem_and_names_its_codes() {
        let mut errors = 0;
        for (path, method, operation) in operations() {
            for (status, response) in operation["responses"].as_object().into_iter().flatten() {
                if status.parse::<u16>().is_ok_and(|status| status >= 400) {
                    errors += 1;
                    let schema = &response["content"]["application/problem+json"]["schema"]["$ref"];
                    assert_eq!(schema, "#/components/schemas/Problem", "{method} {path} {status}");
                    assert_eq!(response["content"].as_object().map(Map::len), Some(1), "{method} {path} {status}");
                    assert!(
                        response["description"].as_str().is_some_and(|d| d.contains('`')),
                        "{method} {path} {status}"
                    );
                }
            }
        }
        assert!(errors > 100, "only {errors} error responses documented");
    }

    #[test]
    fn every_operation_lists_the_refusals_of_what_it_passes_through() {
        for (path, method, operation) in operations() {
            let statuses: Vec<&String> =
                operation["responses"].as_object().into_iter().flatten().map(|(s, _)| s).collect();
            let has = |status: &str| statuses.iter().any(|listed| listed.as_str() == status);
            assert!(has("500") && has("503"), "{method} {path}: {statuses:?}");
            if path.starts_with("/v1/") {
                assert!(has("403") && has("429"), "{method} {path}: guards");
            }
            if path.starts_with("/admin/") {
                assert!(has("401") && has("403") && has("429"), "{method} {path}: admin authentication");
            }
            if operation.get("requestBody").is_some() {
                for status in ["400", "408", "413", "415", "422"] {
                    assert!(has(status), "{method} {path}: a body can be refused with {status}");
                }
            }
            if operation["security"].as_array().into_iter().flatten().any(|r| r.get("session").is_some()) {
                assert!(has("401"), "{method} {path}: a session can be missing");
            }
        }
    }

    #[test]
    fn the_problem_schema_names_every_field_a_problem_body_has() {
        let schema = &document()["components"]["schemas"]["Problem"];
        let problem = super::super::ApiError::new(axum::http::StatusCode::CONFLICT, "seat_taken", "taken");
        let body = serde_json::to_value(Problem {
            problem_type: "urn:tcore:problem:seat_taken".into(),
            title: "Conflict".into(),
            status: problem.status.as_u16(),
            code: problem.code.into(),
            detail: problem.detail,
            request_id: "node-1".into(),
        })
        .unwrap_or_default();
        let required: Vec<&str> =
            schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        for field in body.as_object().into_iter().flatten().map(|(field, _)| field.as_str()) {
            assert!(required.contains(&field), "{field} is not in the Problem schema's required fields");
        }
    }

    #[test]
    fn a_blocked_users_refusal_is_documented_on_every_session_route() {
        let mut session_routes = 0;
        for (path, method, operation) in operations() {
            if operation["security"].as_array().into_iter().flatten().any(|r| r.get("session").is_some()) {
                session_routes += 1;
                let forbidden = operation["responses"]["403"]["description"].as_str().unwrap_or_default();
                assert!(forbidden.contains("`user_blocked`"), "{method} {path}: {forbidden}");
            }
        }
        assert!(session_routes >= 8, "only {session_routes} session routes");
        let admin = &document()["paths"]["/admin/v1/user-blocks"]["post"];
        assert_eq!(
            admin["requestBody"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/UserBlockRequest"
        );
        let ttl = &document()["components"]["schemas"]["UserBlockRequest"]["properties"]["ttl_s"];
        assert_eq!((ttl["minimum"].as_u64(), ttl["maximum"].as_u64()), (Some(1), Some(86_400)));
    }

    #[test]
    fn links_point_at_operations_that_exist() {
        let ids: Vec<&str> = operations().filter_map(|(_, _, operation)| operation["operationId"].as_str()).collect();
        for (path, method, status, target, _, _) in LINKS {
            assert!(ids.contains(target), "{target}");
            assert!(document()["paths"][path][method]["responses"][status]["links"][target].is_object(), "{path}");
        }
    }
}
