//! The HTTP API through `Router::oneshot`: the whole journey, every error code, idempotent
//! replays, token checks and the admin API.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tcore_engine::clock::{Clock, ManualClock};
use tcore_engine::config::{EngineConfig, HoldMode};
use tcore_engine::faults::NoFaults;
use tcore_engine::{Engine, app};
use tower::ServiceExt;

use crate::support::{ADMIN_TOKEN, START_MS, config, engine_with, oneshot_peer_trusted, schedule, session, session_of};

pub(crate) struct Api {
    pub(crate) router: Router,
    pub(crate) engine: Arc<Engine>,
    pub(crate) clock: ManualClock,
}

#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) bytes: Bytes,
}

impl Reply {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes).unwrap_or_else(|_| panic!("JSON body, got {:?}", self.bytes))
    }
}

/// A request; the builder keeps each test to the lines that matter.
pub(crate) struct Call<'a> {
    api: &'a Api,
    method: Method,
    uri: String,
    bearer: Option<String>,
    queue_token: Option<String>,
    key: Option<String>,
    forwarded_for: Option<String>,
    headers: Vec<(&'static str, String)>,
    body: Option<String>,
}

impl Call<'_> {
    pub(crate) fn bearer(mut self, token: &str) -> Self {
        self.bearer = Some(token.to_owned());
        self
    }

    /// As the user `user_id`, with a session the engine issued.
    pub(crate) fn session(mut self, user_id: u64) -> Self {
        let issued = self.api.engine.sessions().issue(user_id, self.api.clock.now_ms());
        self.bearer = Some(issued.expect("the test engine signs with HS256").0);
        self
    }

    /// Only the queue token, with whatever session the call has (or none).
    pub(crate) fn queue_token(mut self, token: &str) -> Self {
        self.queue_token = Some(token.to_owned());
        self
    }

    /// As the fan a queue token names: their session, and the token for booking calls.
    pub(crate) fn fan(mut self, token: &str) -> Self {
        self.queue_token = Some(token.to_owned());
        self.session(session_of(token).user_id)
    }

    pub(crate) fn key(mut self, key: &str) -> Self {
        self.key = Some(key.to_owned());
        self
    }

    pub(crate) fn with_forwarded_ip(mut self, ip: &str) -> Self {
        self.forwarded_for = Some(ip.to_owned());
        self
    }

    pub(crate) fn json(mut self, body: Value) -> Self {
        self.body = Some(body.to_string());
        self
    }

    pub(crate) fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.push((name, value.to_owned()));
        self
    }

    pub(crate) fn raw(mut self, body: &str) -> Self {
        self.body = Some(body.to_owned());
        self
    }

    pub(crate) async fn send(self) -> Reply {
        let mut request = Request::builder().method(self.method).uri(self.uri);
        if let Some(token) = self.bearer {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        if let Some(token) = self.queue_token {
            request = request.header("x-queue-token", token);
        }
        if let Some(key) = self.key {
            request = request.header("idempotency-key", key);
        }
        for (name, value) in self.headers {
            request = request.header(name, value);
        }
        request = request.header("x-forwarded-for", self.forwarded_for.unwrap_or_else(|| "192.0.2.1".into()));
        let body = match self.body {
            Some(body) => {
                request = request.header("content-type", "application/json");
                Body::from(body)
            }
            None => Body::empty(),
        };
        let response = self.api.router.clone().oneshot(request.body(body).expect("request")).await.expect("infallible");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.expect("body").to_bytes();
        Reply { status, headers, bytes }
    }
}

impl Api {
    pub(crate) async fn new() -> Self {
        Self::with_config(config(HoldMode::Atomic)).await
    }

    pub(crate) async fn with_config(config: EngineConfig) -> Self {
        let clock = ManualClock::starting_at_ms(START_MS);
        let config = EngineConfig { trusted_proxies: oneshot_peer_trusted(), ..config };
        let test = engine_with(config, Arc::new(clock.clone()), Arc::new(NoFaults));
        test.engine.add_schedule(schedule(START_MS, 10)).await.expect("schedule");
        Self { router: app(Arc::clone(&test.engine)), engine: test.engine, clock }
    }

    pub(crate) fn call(&self, method: Method, uri: &str) -> Call<'_> {
        Call {
            api: self,
            method,
            uri: uri.to_owned(),
            bearer: None,
            queue_token: None,
            key: None,
            forwarded_for: None,
            headers: Vec::new(),
            body: None,
        }
    }

    pub(crate) fn get(&self, uri: &str) -> Call<'_> {
        self.call(Method::GET, uri)
    }

    pub(crate) fn post(&self, uri: &str) -> Call<'_> {
        self.call(Method::POST, uri)
    }

    pub(crate) fn admin(&self, method: Method, uri: &str) -> Call<'_> {
        self.call(method, uri).bearer(ADMIN_TOKEN)
    }

    /// Blocks `ip` for a minute through the admin API.
    pub(crate) async fn block(&self, ip: &str) {
        let blocked = self.admin(Method::POST, "/admin/v1/blocks").json(json!({ "ip": ip, "ttl_s": 60 })).send().await;
        assert_eq!(blocked.status, StatusCode::OK, "{:?}", blocked.bytes);
    }

    /// Moves time on and lets every line admit.
    pub(crate) async fn advance(&self, by: Duration) {
        self.clock.advance(by);
        self.engine.tick_admission().await.expect("admission tick");
    }

    /// A user with points, in line for schedule 1; returns (user id, token).
    pub(crate) async fn user_in_line(&self, name: &str, points: u64) -> (u64, String) {
        let user = self.post("/v1/users").json(json!({ "name": name })).send().await;
        assert_eq!(user.status, StatusCode::CREATED, "{:?}", user.bytes);
        let id = user.json()["id"].as_u64().expect("id");
        if points > 0 {
            let charged = self
                .admin(Method::POST, &format!("/admin/v1/users/{id}/points"))
                .key(&format!("top-up-{id}"))
                .json(json!({ "amount": points }))
                .send()
                .await;
            assert_eq!(charged.status, StatusCode::OK, "{:?}", charged.bytes);
        }
        let joined = self.post("/v1/schedules/1/queue").session(id).send().await;
        assert_eq!(joined.status, StatusCode::CREATED, "{:?}", joined.bytes);
        (id, joined.json()["token"].as_str().expect("token").to_owned())
    }

    /// A user admitted to schedule 1.
    pub(crate) async fn admitted_user(&self, name: &str, points: u64) -> (u64, String) {
        let user = self.user_in_line(name, points).await;
        self.advance(Duration::from_secs(1)).await;
        user
    }

    pub(crate) async fn hold(&self, token: &str, seat_id: u64) -> Reply {
        self.post("/v1/holds").fan(token).json(json!({ "schedule_id": 1, "seat_id": seat_id })).send().await
    }
}

/// Asserts a problem response with `status` and stable `code`.
pub(crate) fn check_problem(reply: &Reply, status: StatusCode, code: &str) {
    assert_eq!(reply.status, status, "body: {}", String::from_utf8_lossy(&reply.bytes));
    assert_eq!(reply.headers["content-type"], "application/problem+json");
    let problem = reply.json();
    assert_eq!(problem["code"], code, "{problem}");
    assert_eq!(problem["status"], status.as_u16());
    assert_eq!(problem["type"], format!("urn:tcore:problem:{code}"));
    // The body names the request's id, as its header does.
    let request_id = reply.headers.get("x-request-id").and_then(|value| value.to_str().ok()).expect("x-request-id");
    assert_eq!(problem["request_id"], request_id, "{problem}");
}

#[tokio::test]
async fn whole_journey_join_admitted_hold_confirm_cancel() {
    let api = Api::new().await;
    let (user_id, token) = api.user_in_line("ada", 1_000).await;
    let waiting = api.get(&format!("/v1/queue/{token}")).fan(&token).send().await.json();
    assert_eq!(waiting["status"], "WAITING");
    assert_eq!(waiting["position"], 1);

    api.advance(Duration::from_secs(1)).await;
    let admitted = api.get(&format!("/v1/queue/{token}")).fan(&token).send().await.json();
    assert_eq!(admitted["status"], "ADMITTED");

    let seats = api.get("/v1/schedules/1/seats").fan(&token).send().await;
    assert_eq!(seats.status, StatusCode::OK);
    assert_eq!(seats.json()["seats"].as_array().map(Vec::len), Some(10));
    assert_eq!(seats.json()["seats"][2]["status"], "AVAILABLE");
    let seat_id = seats.json()["seats"][2]["id"].as_u64().expect("seat id");

    let hold = api.hold(&token, seat_id).await;
    assert_eq!(hold.status, StatusCode::CREATED, "{:?}", hold.bytes);
    let reservation_id = hold.json()["reservation_id"].as_u64().expect("reservation");
    assert_eq!(hold.json()["fence"], 1);
    assert_eq!(hold.json()["expires_at"], START_MS + 1_000 + 60_000);
    let seats = api.get("/v1/schedules/1/seats").fan(&token).send().await.json();
    assert_eq!(seats["seats"][2]["status"], "HELD");
    let available = api.get("/v1/schedules/1/seats?status=AVAILABLE&section=A&limit=3").fan(&token).send().await.json();
    let ids: Vec<u64> =
        available["seats"].as_array().expect("seats").iter().map(|seat| seat["id"].as_u64().expect("id")).collect();
    assert_eq!(ids, vec![1, 2, 4], "the held seat 3 is filtered out");

    let confirmed =
        api.post(&format!("/v1/reservations/{reservation_id}/confirm")).fan(&token).key("pay-1").send().await;
    assert_eq!(confirmed.status, StatusCode::OK, "{:?}", confirmed.bytes);
    assert_eq!(confirmed.json()["status"], "CONFIRMED");
    assert_eq!(api.get(&format!("/v1/users/{user_id}")).session(user_id).send().await.json()["points"], 900);
    assert_eq!(api.get(&format!("/v1/queue/{token}")).fan(&token).send().await.json()["status"], "USED");

    let read = api.get(&format!("/v1/reservations/{reservation_id}")).fan(&token).send().await;
    assert_eq!(read.json()["status"], "CONFIRMED");
    let cancelled = api.post(&format!("/v1/reservations/{reservation_id}/cancel")).fan(&token).send().await;
    assert_eq!(cancelled.json()["status"], "CANCELLED");
    assert_eq!(
        api.get(&format!("/v1/users/{user_id}")).session(user_id).send().await.json()["points"],
        1_000,
        "refunded"
    );
    let schedules = api.get("/v1/schedules").send().await.json();
    assert_eq!(schedules[0]["seats_available"], 10);
}

#[tokio::test]
async fn idempotent_replay_returns_identical_bytes_and_other_body_is_422() {
    let api = Api::new().await;
    let (_, token) = api.admitted_user("ada", 1_000).await;
    let first =
        api.post("/v1/holds").fan(&token).key("hold-1").json(json!({ "schedule_id": 1, "seat_id": 3 })).send().await;
    assert_eq!(first.status, StatusCode::CREATED);
    api.clock.advance(Duration::from_secs(5));
    let replay =
        api.post("/v1/holds").fan(&token).key("hold-1").json(json!({ "schedule_id": 1, "seat_id": 3 })).send().await;
    assert_eq!(replay.status, StatusCode::CREATED);
    assert_eq!(replay.bytes, first.bytes, "same key, same body: the same bytes");
    let other =
        api.post("/v1/holds").fan(&token).key("hold-1").json(json!({ "schedule_id": 1, "seat_id": 4 })).send().await;
    check_problem(&other, StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused");

    let reservation_id = first.json()["reservation_id"].as_u64().expect("id");
    let uri = format!("/v1/reservations/{reservation_id}/confirm");
    let paid = api.post(&uri).fan(&token).key("pay").send().await;
    let paid_again = api.post(&uri).fan(&token).key("pay").send().await;
    assert_eq!(paid.bytes, paid_again.bytes);
    let ledger = api.engine.user(session(1), 1).await.expect("user");
    assert_eq!(ledger.balance, 900, "charged once");
}

/// Every public `POST` (found through the OpenAPI document) honours `Idempotency-Key`: the same
/// key with another request is refused, so a route added later cannot forget it.
#[tokio::test]
async fn every_public_post_honours_the_idempotency_key() {
    let api = Api::new().await;
    let openapi = api.get("/openapi.json").send().await.json();
    let mut posts = 0;
    for (template, operations) in openapi["paths"].as_object().expect("paths") {
        if !template.starts_with("/v1/") || operations.get("post").is_none() {
            continue;
        }
        posts += 1;
        let uri = template.replace("{id}", "1");
        let key = format!("key-{posts}");
        // With a session: a call without one is refused before idempotency.
        let first = api.post(&uri).session(1).key(&key).json(json!({ "probe": 1 })).send().await;
        let replay = api.post(&uri).session(1).key(&key).json(json!({ "probe": 1 })).send().await;
        assert_eq!(replay.bytes, first.bytes, "POST {template}: same key, same request, same bytes");
        let other = api.post(&uri).session(1).key(&key).json(json!({ "probe": 2 })).send().await;
        check_problem(&other, StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused");
    }
    assert!(posts >= 6, "{posts} public POST routes documented");
}

#[tokio::test]
async fn a_refusal_is_replayed_too_but_a_key_on_a_new_request_runs_it() {
    let api = Api::new().await;
    let (_, first) = api.admitted_user("ada", 1_000).await;
    let (_, second) = api.admitted_user("bob", 1_000).await;
    assert_eq!(api.hold(&first, 3).await.status, StatusCode::CREATED);
    let taken =
        api.post("/v1/holds").fan(&second).key("k").json(json!({ "schedule_id": 1, "seat_id": 3 })).send().await;
    check_problem(&taken, StatusCode::CONFLICT, "seat_taken");
    let again =
        api.post("/v1/holds").fan(&second).key("k").json(json!({ "schedule_id": 1, "seat_id": 3 })).send().await;
    assert_eq!(again.bytes, taken.bytes);
}

#[tokio::test]
async fn booking_without_a_token_or_with_a_forged_one_is_refused() {
    let api = Api::new().await;
    let (ada, token) = api.admitted_user("ada", 1_000).await;
    let seats = api.get("/v1/schedules/1/seats").session(ada).send().await;
    check_problem(&seats, StatusCode::UNAUTHORIZED, "token_missing");
    let hold = |token: String| {
        api.post("/v1/holds").session(ada).queue_token(&token).json(json!({ "schedule_id": 1, "seat_id": 1 })).send()
    };
    let forged = token.replacen("v2.1.1.", "v2.1.2.", 1);
    assert_ne!(forged, token);
    check_problem(&hold(forged).await, StatusCode::UNAUTHORIZED, "token_invalid");
    check_problem(&hold("v2.1.1.1.1.bm90LWEtbWFj".into()).await, StatusCode::UNAUTHORIZED, "token_invalid");
    check_problem(&hold("nonsense".into()).await, StatusCode::UNAUTHORIZED, "token_invalid");
}

#[tokio::test]
async fn waiting_expired_used_and_foreign_schedule_tokens_are_refused() {
    let api = Api::new().await;
    let (_, waiting) = api.user_in_line("ada", 1_000).await;
    check_problem(&api.hold(&waiting, 1).await, StatusCode::FORBIDDEN, "token_not_admitted");

    api.advance(Duration::from_secs(1)).await;
    let wrong_schedule =
        api.post("/v1/holds").fan(&waiting).json(json!({ "schedule_id": 2, "seat_id": 1 })).send().await;
    check_problem(&wrong_schedule, StatusCode::FORBIDDEN, "token_wrong_schedule");

    let hold = api.hold(&waiting, 1).await.json();
    let reservation_id = hold["reservation_id"].as_u64().expect("id");
    api.post(&format!("/v1/reservations/{reservation_id}/confirm")).fan(&waiting).send().await;
    check_problem(&api.hold(&waiting, 2).await, StatusCode::FORBIDDEN, "token_used");

    let (_, late) = api.admitted_user("bob", 1_000).await;
    api.advance(Duration::from_secs(601)).await;
    check_problem(&api.hold(&late, 2).await, StatusCode::FORBIDDEN, "token_expired");
}

#[tokio::test]
async fn seat_conflicts_ownership_expiry_and_points_have_their_codes() {
    let api = Api::new().await;
    let (_, ada) = api.admitted_user("ada", 1_000).await;
    let (_, bob) = api.admitted_user("bob", 50).await;
    let held = api.hold(&ada, 1).await.json();
    let ada_reservation = held["reservation_id"].as_u64().expect("id");
    check_problem(&api.hold(&bob, 1).await, StatusCode::CONFLICT, "seat_taken");
    check_problem(&api.hold(&bob, 999).await, StatusCode::NOT_FOUND, "not_found");
    let foreign = api.get(&format!("/v1/reservations/{ada_reservation}")).fan(&bob).send().await;
    check_problem(&foreign, StatusCode::FORBIDDEN, "not_owner");

    let bob_reservation = api.hold(&bob, 2).await.json()["reservation_id"].as_u64().expect("id");
    let poor = api.post(&format!("/v1/reservations/{bob_reservation}/confirm")).fan(&bob).send().await;
    check_problem(&poor, StatusCode::PAYMENT_REQUIRED, "insufficient_points");

    api.clock.advance(Duration::from_secs(61));
    let late = api.post(&format!("/v1/reservations/{ada_reservation}/confirm")).fan(&ada).send().await;
    check_problem(&late, StatusCode::GONE, "hold_expired");
    assert_eq!(api.engine.user(session(1), 1).await.expect("user").balance, 1_000, "an expired hold takes no points");
    let again = api.post(&format!("/v1/reservations/{ada_reservation}/cancel")).fan(&ada).send().await;
    check_problem(&again, StatusCode::CONFLICT, "already_final");
}

#[tokio::test]
async fn every_response_names_its_request_by_node_and_number() {
    let api = Api::new().await;
    let node = api.engine.config().node.clone();
    let mut ids = Vec::new();
    for uri in ["/v1/schedules", "/healthz", "/no/such/route", "/v1/users/1"] {
        let reply = api.get(uri).send().await;
        let id = reply.headers.get("x-request-id").and_then(|value| value.to_str().ok()).expect("x-request-id");
        assert!(id.starts_with(&format!("{node}-")), "{id}");
        ids.push(id.to_owned());
    }
    ids.dedup();
    assert_eq!(ids.len(), 4, "{ids:?}");
}

#[tokio::test]
async fn malformed_requests_get_problem_bodies() {
    let api = Api::new().await;
    check_problem(&api.get("/v1/users/999").session(999).send().await, StatusCode::NOT_FOUND, "not_found");
    check_problem(&api.get("/v1/nowhere").send().await, StatusCode::NOT_FOUND, "not_found");
    check_problem(&api.get("/v1/users/abc").session(1).send().await, StatusCode::BAD_REQUEST, "invalid_path");
    check_problem(&api.post("/v1/users").raw("{not json").send().await, StatusCode::BAD_REQUEST, "invalid_body");
    let unknown_field = api.post("/v1/users").json(json!({ "name": "ada", "admin": true })).send().await;
    check_problem(&unknown_field, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");
    // A name is what the OpenAPI document says: 1 to 100 characters, no control character.
    for name in ["", "bell\u{7}", &"a".repeat(101)] {
        let refused = api.post("/v1/users").json(json!({ "name": name })).send().await;
        check_problem(&refused, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    }
    for name in ["  ", "Zoë 🎫", &"a".repeat(100)] {
        let opened = api.post("/v1/users").json(json!({ "name": name })).send().await;
        assert_eq!(opened.status, StatusCode::CREATED, "{name:?}");
        assert_eq!(opened.json()["name"], name);
    }
    // JSON Schema counts 42.0 as an integer, and so does the API, in paths as in bodies.
    let whole = api.get(&format!("/v1/users/{}.0", 1)).session(1).send().await;
    assert_eq!(whole.status, StatusCode::OK, "{:?}", whole.bytes);
    check_problem(&api.get("/v1/users/1.5").session(1).send().await, StatusCode::BAD_REQUEST, "invalid_path");
    check_problem(&api.get("/v1/users/1.").session(1).send().await, StatusCode::BAD_REQUEST, "invalid_path");
    let user = api.post("/v1/users").json(json!({ "name": "floats" })).send().await.json();
    let id = user["id"].as_u64().expect("id");
    let top_up = format!("/admin/v1/users/{id}/points");
    let whole = api.admin(Method::POST, &top_up).key("f1").raw(r#"{"amount":5.0}"#).send().await;
    assert_eq!(whole.status, StatusCode::OK, "{:?}", whole.bytes);
    assert_eq!(whole.json()["points"], 5);
    let fraction = api.admin(Method::POST, &top_up).key("f2").raw(r#"{"amount":5.5}"#).send().await;
    check_problem(&fraction, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");
    let bad_key = api.admin(Method::POST, &top_up).key("tab\tkey").json(json!({ "amount": 5 })).send().await;
    check_problem(&bad_key, StatusCode::BAD_REQUEST, "idempotency_key_required");
    let no_key = api.admin(Method::POST, "/admin/v1/users/1/points").json(json!({ "amount": 5 })).send().await;
    check_problem(&no_key, StatusCode::BAD_REQUEST, "idempotency_key_required");
    let user = api.post("/v1/users").json(json!({ "name": "ada" })).send().await.json();
    let top_up = format!("/admin/v1/users/{}/points", user["id"]);
    let zero = api.admin(Method::POST, &top_up).key("z").json(json!({ "amount": 0 })).send().await;
    check_problem(&zero, StatusCode::UNPROCESSABLE_ENTITY, "out_of_bounds");
    let long_wait = api.get("/v1/queue/whatever?wait_s=31").session(1).send().await;
    check_problem(&long_wait, StatusCode::UNPROCESSABLE_ENTITY, "out_of_bounds");
}

#[tokio::test]
async fn a_body_over_the_limit_is_refused_before_any_handler_and_one_at_the_limit_is_read() {
    let api = Api::new().await;
    let name = "a".repeat(tcore_engine::api::REQUEST_BODY_MAX);
    let over = api.post("/v1/users").json(json!({ "name": name })).send().await;
    check_problem(&over, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large");
    // Exactly at the limit the body reaches the handler, which judges the name itself.
    let filler = tcore_engine::api::REQUEST_BODY_MAX - r#"{"name":""}"#.len();
    let at_limit = api.post("/v1/users").json(json!({ "name": "a".repeat(filler) })).send().await;
    assert_ne!(at_limit.status, StatusCode::PAYLOAD_TOO_LARGE, "{:?}", at_limit.bytes);
    let in_line = api.post("/v1/schedules/1/queue").json(json!({ "user_id": 1, "pad": name })).send().await;
    check_problem(&in_line, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large");
}

#[tokio::test]
async fn a_long_poll_answers_when_the_token_is_admitted() {
    let api = Api::new().await;
    let (_, token) = api.user_in_line("ada", 0).await;
    let engine = Arc::clone(&api.engine);
    let clock = api.clock.clone();
    let admitter = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        clock.advance(Duration::from_secs(1));
        engine.tick_admission().await.expect("tick");
    });
    let reply = api.get(&format!("/v1/queue/{token}?wait_s=5")).fan(&token).send().await;
    admitter.await.expect("admitter");
    assert_eq!(reply.json()["status"], "ADMITTED");
}

/// A join reads which accounts exist a block of ids at a time: the next user of the block
/// joins without a store call for their account, a user opened since is found by reading the
/// block again, and a user without an account is refused, from a fresh read each time.
#[tokio::test]
async fn joins_read_which_accounts_exist_a_block_at_a_time_and_still_refuse_unknown_users() {
    let api = Api::new().await;
    let join = |user_id: u64| api.post("/v1/schedules/1/queue").session(user_id).send();
    let (ada, bob) = (opened(&api, "ada").await, opened(&api, "bob").await);
    assert_eq!(join(ada).await.status, StatusCode::CREATED);
    assert_eq!(store_calls(&api, "existing_users").await, 1);
    assert_eq!(join(bob).await.status, StatusCode::CREATED, "bob was listed with ada");
    assert_eq!(store_calls(&api, "existing_users").await, 1, "bob's join read no account");
    assert_eq!(store_calls(&api, "account").await, 0);

    let cyd = opened(&api, "cyd").await;
    assert_eq!(join(cyd).await.status, StatusCode::CREATED, "an account opened since the block was read");
    assert_eq!(store_calls(&api, "existing_users").await, 2);
    for _ in 0..2 {
        check_problem(&join(999).await, StatusCode::NOT_FOUND, "not_found");
    }
    assert_eq!(store_calls(&api, "existing_users").await, 4, "each refusal comes from a fresh read");
}

/// Opens an account through the API; returns its id.
async fn opened(api: &Api, name: &str) -> u64 {
    api.post("/v1/users").json(json!({ "name": name })).send().await.json()["id"].as_u64().expect("id")
}

/// How many times this node has read a token's place in line from the cache store.
async fn queue_status_reads(api: &Api) -> u64 {
    store_calls(api, "queue_status").await
}

/// How many store calls `op` this node has made.
async fn store_calls(api: &Api, op: &str) -> u64 {
    let metrics = String::from_utf8(api.get("/metrics").send().await.bytes.to_vec()).expect("utf-8");
    let label = format!("op=\"{op}\"");
    metrics
        .lines()
        .find(|line| line.starts_with("tcore_store_call_duration_seconds_count") && line.contains(&label))
        .and_then(|line| line.rsplit(' ').next())
        .map_or(0, |count| count.parse().expect("a count"))
}

/// With no fault hook that may pause before the commit, a confirm does not read the
/// reservation first: the store's confirm checks the owner. A repeated confirm is answered
/// and not counted as a confirmation again.
#[tokio::test]
async fn a_confirm_reads_no_reservation_first_and_a_repeated_one_is_not_counted_again() {
    let api = Api::new().await;
    let (_, token) = api.admitted_user("ada", 1_000).await;
    let (_, other) = api.admitted_user("bob", 1_000).await;
    let hold = api.hold(&token, 1).await;
    let reservation_id = hold.json()["reservation_id"].as_u64().expect("id");
    let confirm = |bearer: String| {
        let api = &api;
        async move { api.post(&format!("/v1/reservations/{reservation_id}/confirm")).fan(&bearer).send().await }
    };
    check_problem(&confirm(other).await, StatusCode::FORBIDDEN, "not_owner");
    let first = confirm(token.clone()).await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.bytes);
    let confirmations = || async {
        let metrics = String::from_utf8(api.get("/metrics").send().await.bytes.to_vec()).expect("utf-8");
        let line = metrics.lines().find(|line| line.starts_with("tcore_confirmations_total")).map(str::to_owned);
        line.expect("the confirmations counter").rsplit(' ').next().map(|count| count.parse::<u64>().expect("a count"))
    };
    assert_eq!(confirmations().await, Some(1));
    let again = confirm(token).await;
    assert_eq!(again.status, StatusCode::OK, "{:?}", again.bytes);
    assert_eq!(again.json()["status"], "CONFIRMED");
    assert_eq!(confirmations().await, Some(1), "counted once");
    assert_eq!(store_calls(&api, "reservation").await, 0, "no reservation read");
}

#[tokio::test]
async fn a_long_poll_nothing_woke_answers_from_its_first_read() {
    let api = Api::new().await;
    api.user_in_line("ada", 0).await;
    let (_, token) = api.user_in_line("bob", 0).await;
    // Not the first poll after the join, which would start from the join's answer.
    api.get(&format!("/v1/queue/{token}")).fan(&token).send().await;
    let reads_before = queue_status_reads(&api).await;
    let reply = api.get(&format!("/v1/queue/{token}?wait_s=1")).fan(&token).send().await.json();
    assert_eq!((reply["status"].as_str(), reply["position"].as_u64()), (Some("WAITING"), Some(2)));
    assert_eq!(queue_status_reads(&api).await - reads_before, 1, "no second read at the deadline");
}

#[tokio::test]
async fn the_first_long_poll_after_a_join_starts_from_the_joins_answer_and_only_the_first() {
    let api = Api::new().await;
    api.user_in_line("ada", 0).await;
    let (_, token) = api.user_in_line("bob", 0).await;
    let reads_before = queue_status_reads(&api).await;
    let first = api.get(&format!("/v1/queue/{token}?wait_s=1")).fan(&token).send().await.json();
    assert_eq!((first["status"].as_str(), first["position"].as_u64()), (Some("WAITING"), Some(2)));
    assert_eq!(queue_status_reads(&api).await - reads_before, 0, "the join's answer, not a read");
    let second = api.get(&format!("/v1/queue/{token}?wait_s=1")).fan(&token).send().await.json();
    assert_eq!(second["status"], "WAITING");
    assert_eq!(queue_status_reads(&api).await - reads_before, 1, "the next poll reads the line");

    // A join's answer more than a second old is read again; so is one for a poll that does
    // not wait.
    let (_, late) = api.user_in_line("cy", 0).await;
    api.clock.advance(Duration::from_millis(1_001));
    api.get(&format!("/v1/queue/{late}?wait_s=1")).fan(&late).send().await;
    assert_eq!(queue_status_reads(&api).await - reads_before, 2, "too old to start from");
    let (_, quick) = api.user_in_line("dee", 0).await;
    api.get(&format!("/v1/queue/{quick}")).fan(&quick).send().await;
    assert_eq!(queue_status_reads(&api).await - reads_before, 3, "no wait, a fresh read");
}

#[tokio::test]
async fn seat_maps_and_confirms_start_from_a_recent_admission_and_holds_and_used_tokens_read_the_line() {
    let api = Api::new().await;
    let (_, token) = api.admitted_user("ada", 1_000).await;
    let admitted = api.get(&format!("/v1/queue/{token}?wait_s=1")).fan(&token).send().await.json();
    assert_eq!(admitted["status"], "ADMITTED");
    let reads_before = queue_status_reads(&api).await;
    let seats = api.get("/v1/schedules/1/seats").fan(&token).send().await;
    assert_eq!(seats.status, StatusCode::OK, "{:?}", seats.bytes);
    assert_eq!(queue_status_reads(&api).await - reads_before, 0, "admitted a moment ago");

    let hold = api.hold(&token, 1).await;
    assert_eq!(hold.status, StatusCode::CREATED, "{:?}", hold.bytes);
    assert_eq!(queue_status_reads(&api).await - reads_before, 1, "a hold always reads the line");
    let reservation_id = hold.json()["reservation_id"].as_u64().expect("id");
    let confirmed = api.post(&format!("/v1/reservations/{reservation_id}/confirm")).fan(&token).send().await;
    assert_eq!(confirmed.status, StatusCode::OK, "{:?}", confirmed.bytes);
    assert_eq!(queue_status_reads(&api).await - reads_before, 1, "the hold read it a moment ago");
    let read = api.get(&format!("/v1/reservations/{reservation_id}")).fan(&token).send().await;
    assert_eq!(read.status, StatusCode::OK, "{:?}", read.bytes);
    assert_eq!(queue_status_reads(&api).await - reads_before, 2, "the confirm forgot it");
    let reads_after_confirm = queue_status_reads(&api).await;
    check_problem(&api.get("/v1/schedules/1/seats").fan(&token).send().await, StatusCode::FORBIDDEN, "token_used");
    assert_eq!(queue_status_reads(&api).await - reads_after_confirm, 1, "a used token is read again");

    // An admission read more than five seconds ago is read again.
    let (_, later) = api.admitted_user("bob", 1_000).await;
    api.get(&format!("/v1/queue/{later}")).fan(&later).send().await;
    api.clock.advance(Duration::from_millis(5_001));
    let reads_before = queue_status_reads(&api).await;
    assert_eq!(api.get("/v1/schedules/1/seats").fan(&later).send().await.status, StatusCode::OK);
    assert_eq!(queue_status_reads(&api).await - reads_before, 1, "too old to start from");
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after_and_blocks_403() {
    let api = Api::new().await;
    let limits = api
        .admin(Method::PUT, "/admin/v1/rate-limits")
        .json(json!({ "per_ip_per_s": 2, "per_token_per_s": 2, "burst": 2 }))
        .send()
        .await;
    assert_eq!(limits.status, StatusCode::OK, "{:?}", limits.bytes);
    for _ in 0..2 {
        assert_eq!(api.get("/v1/schedules").with_forwarded_ip("198.51.100.7").send().await.status, StatusCode::OK);
    }
    let limited = api.get("/v1/schedules").with_forwarded_ip("198.51.100.7").send().await;
    check_problem(&limited, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert_eq!(limited.headers["retry-after"], "1");
    assert_eq!(
        api.get("/v1/schedules").with_forwarded_ip("198.51.100.8").send().await.status,
        StatusCode::OK,
        "other IPs unaffected"
    );

    api.block("198.51.100.9").await;
    check_problem(
        &api.get("/v1/schedules").with_forwarded_ip("198.51.100.9").send().await,
        StatusCode::FORBIDDEN,
        "ip_blocked",
    );
    let unblocked = api.admin(Method::DELETE, "/admin/v1/blocks/198.51.100.9").send().await;
    assert_eq!(unblocked.status, StatusCode::OK);
    assert_eq!(api.get("/v1/schedules").with_forwarded_ip("198.51.100.9").send().await.status, StatusCode::OK);
    let metrics = String::from_utf8(api.get("/metrics").send().await.bytes.to_vec()).expect("utf-8");
    assert!(metrics.contains("reason=\"rate_limited\"} 1"), "{metrics}");
    assert!(metrics.contains("reason=\"ip_blocked\"} 1"), "{metrics}");
}

/// A user block refuses every call the user's session makes, from any address, while the
/// others behind the same address are served; it is audited, listed, lifted and expires.
#[tokio::test]
async fn a_blocked_user_is_refused_from_any_address_and_the_others_behind_theirs_are_served() {
    let api = Api::new().await;
    let (ada, _) = api.user_in_line("ada", 0).await;
    let (bob, _) = api.user_in_line("bob", 0).await;
    let read = |user_id: u64, ip: &'static str| {
        api.get(&format!("/v1/users/{user_id}")).session(user_id).with_forwarded_ip(ip).send()
    };
    let blocked =
        api.admin(Method::POST, "/admin/v1/user-blocks").json(json!({ "user_id": ada, "ttl_s": 30 })).send().await;
    assert_eq!(blocked.status, StatusCode::OK, "{:?}", blocked.bytes);
    assert_eq!(blocked.json()["blocked_until_ms"], START_MS + 30_000);
    for ip in ["203.0.113.5", "198.51.100.20"] {
        check_problem(&read(ada, ip).await, StatusCode::FORBIDDEN, "user_blocked");
    }
    let join = api.post("/v1/schedules/1/queue").session(ada).with_forwarded_ip("203.0.113.5").send().await;
    check_problem(&join, StatusCode::FORBIDDEN, "user_blocked");
    assert_eq!(read(bob, "203.0.113.5").await.status, StatusCode::OK, "the others behind the address");
    assert_eq!(api.get("/v1/schedules").with_forwarded_ip("203.0.113.5").send().await.status, StatusCode::OK);
    let snapshot = api.admin(Method::GET, "/admin/v1/snapshot").send().await.json();
    assert_eq!(snapshot["user_blocks"], json!([{ "user_id": ada, "until_ms": START_MS + 30_000 }]));
    assert_eq!(snapshot["blocks"], json!([]), "no address is blocked");

    let audit = api.admin(Method::GET, "/admin/v1/audit").send().await.json();
    let entry =
        audit.as_array().expect("entries").iter().find(|entry| entry["action"] == "block_user").expect("audited");
    assert_eq!(
        (&entry["target"], &entry["outcome"], &entry["after"]["blocked_until_ms"]),
        (&json!(format!("user/{ada}")), &json!("applied"), &json!(START_MS + 30_000))
    );

    // Lifted by hand, then blocked again: the second block expires on its own.
    assert_eq!(api.admin(Method::DELETE, &format!("/admin/v1/user-blocks/{ada}")).send().await.status, StatusCode::OK);
    assert_eq!(read(ada, "203.0.113.5").await.status, StatusCode::OK);
    let again = api.admin(Method::DELETE, &format!("/admin/v1/user-blocks/{ada}")).send().await;
    check_problem(&again, StatusCode::NOT_FOUND, "not_found");
    api.admin(Method::POST, "/admin/v1/user-blocks").json(json!({ "user_id": ada, "ttl_s": 10 })).send().await;
    check_problem(&read(ada, "203.0.113.5").await, StatusCode::FORBIDDEN, "user_blocked");
    api.advance(Duration::from_secs(10)).await;
    assert_eq!(read(ada, "203.0.113.5").await.status, StatusCode::OK, "the block expired");
    let audit = api.admin(Method::GET, "/admin/v1/audit").send().await.json();
    let actions: Vec<&str> =
        audit.as_array().expect("entries").iter().filter_map(|entry| entry["action"].as_str()).collect();
    assert_eq!(actions.iter().filter(|action| action.ends_with("_user")).count(), 4, "{actions:?}");
    let metrics = String::from_utf8(api.get("/metrics").send().await.bytes.to_vec()).expect("utf-8");
    assert!(metrics.contains("reason=\"user_blocked\"} 4"), "{metrics}");
}

/// Every public route passes the guards (found through the OpenAPI document, so a route added
/// later is covered too); the operations and admin routes do not, so operators can still reach
/// a node from an address that is blocked; a refusal is measured under its route.
#[tokio::test]
async fn the_guards_cover_every_public_route_and_no_other() {
    let api = Api::new().await;
    api.block("198.51.100.9").await;
    let openapi = api.get("/openapi.json").send().await.json();
    let paths = openapi["paths"].as_object().expect("paths");
    let mut public = 0;
    for (template, operations) in paths {
        let uri = template
            .replace("{id}", "1")
            .replace("{token}", "t")
            .replace("{ip}", "192.0.2.1")
            .replace("{user_id}", "1");
        for method in operations.as_object().expect("operations").keys() {
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
            let reply = if template.starts_with("/admin/") {
                api.admin(method.clone(), &uri)
            } else {
                api.call(method.clone(), &uri)
            }
            .with_forwarded_ip("198.51.100.9")
            .send()
            .await;
            if template.starts_with("/v1/") {
                public += 1;
                check_problem(&reply, StatusCode::FORBIDDEN, "ip_blocked");
            } else {
                assert_ne!(reply.status, StatusCode::FORBIDDEN, "{method} {template} is not guarded");
            }
        }
    }
    assert!(public >= 10, "{public} public operations documented");
    for uri in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        assert_eq!(api.get(uri).with_forwarded_ip("198.51.100.9").send().await.status, StatusCode::OK, "{uri}");
    }
    let metrics = String::from_utf8(api.get("/metrics").send().await.bytes.to_vec()).expect("utf-8");
    assert!(
        metrics.contains("tcore_http_requests_total{node=\"engine-1\",route=\"/v1/holds\",status=\"403\"} 1"),
        "{metrics}"
    );
}

/// A request body that arrives when the test sends it.
struct LateBody(Option<tokio::sync::oneshot::Receiver<Bytes>>);

impl hyper::body::Body for LateBody {
    type Data = Bytes;
    type Error = tokio::sync::oneshot::error::RecvError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let Some(receiver) = self.0.as_mut() else { return std::task::Poll::Ready(None) };
        let bytes = std::task::ready!(std::pin::Pin::new(receiver).poll(context));
        self.0 = None;
        std::task::Poll::Ready(Some(bytes.map(hyper::body::Frame::data)))
    }
}

/// An answer sent while the body is still on its way would make HTTP/2 reset the stream, and
/// what happens to the rest of the body would then depend on wall-clock time.
#[tokio::test]
async fn a_blocked_client_is_refused_only_once_its_whole_request_is_in() {
    let api = Api::new().await;
    api.block("198.51.100.9").await;
    let (send_body, body) = tokio::sync::oneshot::channel();
    let request = Request::post("/v1/schedules/1/queue")
        .header("x-forwarded-for", "198.51.100.9")
        .header("content-type", "application/json")
        .body(Body::new(LateBody(Some(body))))
        .expect("request");
    let answer = tokio::spawn(api.router.clone().oneshot(request));
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert!(!answer.is_finished(), "answered before the body was in");
    send_body.send(Bytes::from_static(br#"{"user_id":1}"#)).expect("the router waits for the body");
    let response = answer.await.expect("no panic").expect("infallible");
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn admin_needs_the_token_401_without_403_wrong() {
    let api = Api::new().await;
    check_problem(&api.get("/admin/v1/snapshot").send().await, StatusCode::UNAUTHORIZED, "admin_unauthorized");
    check_problem(
        &api.get("/admin/v1/snapshot").bearer("guess").send().await,
        StatusCode::FORBIDDEN,
        "admin_forbidden",
    );
    let snapshot = api.admin(Method::GET, "/admin/v1/snapshot").send().await;
    assert_eq!(snapshot.status, StatusCode::OK);
    assert_eq!(snapshot.json()["hold_mode"], "atomic");

    let closed = Api::with_config(EngineConfig { admin_tokens: Vec::new(), ..config(HoldMode::Atomic) }).await;
    check_problem(&closed.admin(Method::GET, "/admin/v1/snapshot").send().await, StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test]
async fn admin_values_out_of_bounds_are_422_never_clamped() {
    let api = Api::new().await;
    let cases = [
        (Method::PUT, "/admin/v1/schedules/1/admission", json!({ "rate_per_s": 0.0, "active_max": 10 })),
        (Method::PUT, "/admin/v1/schedules/1/admission", json!({ "rate_per_s": 10.0, "active_max": 0 })),
        (Method::PUT, "/admin/v1/rate-limits", json!({ "per_ip_per_s": 0, "per_token_per_s": 5, "burst": 5 })),
        (Method::PUT, "/admin/v1/rate-limits", json!({ "per_ip_per_s": 5, "per_token_per_s": 5, "burst": 1_000_000 })),
        (Method::POST, "/admin/v1/blocks", json!({ "ip": "192.0.2.1", "ttl_s": 0 })),
        (Method::POST, "/admin/v1/blocks", json!({ "ip": "192.0.2.1", "ttl_s": 86_401 })),
        (Method::POST, "/admin/v1/user-blocks", json!({ "user_id": 1, "ttl_s": 0 })),
        (Method::POST, "/admin/v1/user-blocks", json!({ "user_id": 0, "ttl_s": 60 })),
        (Method::POST, "/admin/v1/user-blocks", json!({ "user_id": 1, "ttl_s": 86_401 })),
        (Method::PUT, "/admin/v1/hold-ttl", json!({ "ttl_s": 9 })),
        (Method::PUT, "/admin/v1/hold-ttl", json!({ "ttl_s": 3_601 })),
    ];
    for (method, uri, body) in cases {
        let reply = api.admin(method, uri).json(body.clone()).send().await;
        check_problem(&reply, StatusCode::UNPROCESSABLE_ENTITY, "out_of_bounds");
    }
    let snapshot = api.admin(Method::GET, "/admin/v1/snapshot").send().await.json();
    assert_eq!(snapshot["hold_ttl_s"], 60, "nothing was applied");
    assert_eq!(snapshot["user_blocks"], json!([]), "nothing was applied");
    assert_eq!(snapshot["rate_limits"]["per_ip_per_s"], 50);
}

#[tokio::test]
async fn admin_changes_apply_and_are_audited_with_before_and_after() {
    let api = Api::new().await;
    let reply = api.admin(Method::PUT, "/admin/v1/hold-ttl").json(json!({ "ttl_s": 30 })).send().await;
    assert_eq!(reply.status, StatusCode::OK);
    let admission = api
        .admin(Method::PUT, "/admin/v1/schedules/1/admission")
        .json(json!({ "rate_per_s": 5.0, "active_max": 7, "paused": true }))
        .send()
        .await;
    assert_eq!(admission.status, StatusCode::OK, "{:?}", admission.bytes);
    api.admin(Method::PUT, "/admin/v1/hold-ttl").json(json!({ "ttl_s": 1 })).send().await;

    let (_, token) = api.user_in_line("ada", 0).await;
    api.advance(Duration::from_secs(5)).await;
    assert_eq!(
        api.get(&format!("/v1/queue/{token}")).fan(&token).send().await.json()["status"],
        "WAITING",
        "paused line admits nobody"
    );

    let audit = api.admin(Method::GET, "/admin/v1/audit").send().await.json();
    let entries = audit.as_array().expect("entries");
    assert_eq!(entries.len(), 3);
    assert_eq!(entries[0]["action"], "set_hold_ttl");
    assert_eq!(entries[0]["before"], json!({ "ttl_s": 60 }));
    assert_eq!(entries[0]["after"], json!({ "ttl_s": 30 }));
    assert_eq!(entries[1]["after"]["active_max"], 7);
    assert_eq!(entries[1]["before"]["paused"], false);
    assert!(entries[2]["outcome"].as_str().expect("outcome").starts_with("rejected"));
    let snapshot = api.admin(Method::GET, "/admin/v1/snapshot").send().await.json();
    assert_eq!(snapshot["queues"][0]["admission"]["paused"], true);
    assert_eq!(snapshot["queues"][0]["waiting"], 1);
}

/// The `Date` of every response is the engine's clock, whatever route answered: a simulated
/// run's bytes must not carry the host's wall-clock time.
#[tokio::test]
async fn every_response_is_dated_by_the_engines_clock() {
    let api = Api::new().await;
    let date = |reply: &Reply| {
        reply.headers.get_all("date").iter().map(|value| value.to_str().expect("ascii").to_owned()).collect::<Vec<_>>()
    };
    assert_eq!(date(&api.get("/v1/schedules").send().await), ["Fri, 15 Jan 2027 08:00:00 GMT"]);
    assert_eq!(date(&api.get("/no/such/route").send().await), ["Fri, 15 Jan 2027 08:00:00 GMT"]);
    api.clock.advance(Duration::from_secs(90));
    let too_large = api.post("/v1/users").raw(&"x".repeat(tcore_engine::api::REQUEST_BODY_MAX + 1)).send().await;
    assert_eq!(date(&too_large), ["Fri, 15 Jan 2027 08:01:30 GMT"]);
    assert_eq!(date(&api.get("/healthz").send().await), ["Fri, 15 Jan 2027 08:01:30 GMT"]);
}

/// Served on a real socket, a response carries exactly one date, the engine's, not the host's
/// wall-clock time.
#[tokio::test]
async fn a_served_response_carries_only_the_engines_date() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let api = Api::new().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(tcore_engine::server::serve(listener, Arc::clone(&api.engine), std::future::pending()));
    let mut stream = tokio::net::TcpStream::connect(address).await.expect("connect");
    stream.write_all(b"GET /healthz HTTP/1.1\r\nhost: engine\r\nconnection: close\r\n\r\n").await.expect("send");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("answer");
    let dates: Vec<&str> = answer.lines().filter(|line| line.to_ascii_lowercase().starts_with("date:")).collect();
    assert_eq!(dates, ["date: Fri, 15 Jan 2027 08:00:00 GMT"], "{answer}");
}

#[tokio::test]
async fn operational_endpoints_answer() {
    let api = Api::new().await;
    assert_eq!(api.get("/healthz").send().await.status, StatusCode::OK);
    assert_eq!(api.get("/readyz").send().await.status, StatusCode::OK);
    api.get("/v1/schedules").send().await;
    let metrics = String::from_utf8(api.get("/metrics").send().await.bytes.to_vec()).expect("utf-8");
    assert!(
        metrics.contains("tcore_http_requests_total{node=\"engine-1\",route=\"/v1/schedules\",status=\"200\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("tcore_http_request_duration_seconds_bucket"), "{metrics}");
    let openapi = api.get("/openapi.json").send().await.json();
    for path in ["/v1/holds", "/v1/queue/{token}", "/v1/reservations/{id}/confirm", "/admin/v1/snapshot"] {
        assert!(openapi["paths"][path].is_object(), "{path} is documented");
    }
}

#[tokio::test]
async fn waiting_users_learn_when_every_seat_is_sold() {
    let api = Api::new().await;
    for seat_id in 1..=10 {
        let (_, buyer) = api.admitted_user(&format!("buyer-{seat_id}"), 1_000).await;
        let hold = api.hold(&buyer, seat_id).await.json();
        let reservation_id = hold["reservation_id"].as_u64().expect("held");
        let paid = api.post(&format!("/v1/reservations/{reservation_id}/confirm")).fan(&buyer).send().await;
        assert_eq!(paid.status, StatusCode::OK);
    }
    let pause = json!({ "rate_per_s": 1.0, "active_max": 1, "paused": true });
    api.admin(Method::PUT, "/admin/v1/schedules/1/admission").json(pause).send().await;
    let (_, waiting) = api.user_in_line("bob", 1_000).await;
    let before = api.get(&format!("/v1/queue/{waiting}")).fan(&waiting).send().await.json();
    assert_eq!(before["sold_out"], false, "not known before the sweep");
    api.engine.sweep().await.expect("sweep");
    let after = api.get(&format!("/v1/queue/{waiting}?wait_s=30")).fan(&waiting).send().await.json();
    assert_eq!(after["status"], "WAITING");
    assert_eq!(after["sold_out"], true, "a long poll answers at once when nothing is left");
    let carol = api.post("/v1/users").json(json!({ "name": "carol" })).send().await.json();
    let carol = carol["id"].as_u64().expect("id");
    let joined = api.post("/v1/schedules/1/queue").session(carol).send().await;
    assert_eq!(joined.status, StatusCode::CREATED);
    assert_eq!(joined.json()["sold_out"], true, "a join after the sale says so too");
}

#[tokio::test]
async fn the_seat_limit_is_an_audited_bounded_admin_setting_and_a_hold_past_it_is_409() {
    let api = Api::new().await;
    for refused in [0, 101] {
        let reply =
            api.admin(Method::PUT, "/admin/v1/seat-limit").json(json!({ "seats_per_user_max": refused })).send().await;
        check_problem(&reply, StatusCode::UNPROCESSABLE_ENTITY, "out_of_bounds");
    }
    let (_, token) = api.admitted_user("ada", 0).await;
    for seat_id in 1..=4 {
        assert_eq!(api.hold(&token, seat_id).await.status, StatusCode::CREATED, "the default of 4 applies");
    }
    check_problem(&api.hold(&token, 5).await, StatusCode::CONFLICT, "seat_limit_reached");
    let reply = api.admin(Method::PUT, "/admin/v1/seat-limit").json(json!({ "seats_per_user_max": 5 })).send().await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.bytes);
    assert_eq!(api.hold(&token, 5).await.status, StatusCode::CREATED);
    check_problem(&api.hold(&token, 6).await, StatusCode::CONFLICT, "seat_limit_reached");

    let audit = api.admin(Method::GET, "/admin/v1/audit").send().await.json();
    let entries = audit.as_array().expect("entries");
    let actions: Vec<(&str, &str)> = entries
        .iter()
        .map(|entry| (entry["action"].as_str().expect("action"), entry["outcome"].as_str().expect("outcome")))
        .collect();
    assert_eq!(actions.len(), 3);
    assert!(actions.iter().all(|(action, _)| *action == "set_seat_limit"), "{actions:?}");
    assert!(actions[0].1.starts_with("rejected") && actions[1].1.starts_with("rejected"), "{actions:?}");
    assert_eq!(entries[2]["before"], json!({ "seats_per_user_max": 4 }));
    assert_eq!(entries[2]["after"], json!({ "seats_per_user_max": 5 }));
}
