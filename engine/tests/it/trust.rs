//! The trust model through the HTTP API: who may act as whom, which credentials are refused,
//! how points are added, and how idempotency keys are scoped.

use std::time::Duration;

use axum::http::{Method, StatusCode};
use serde_json::json;
use tcore_engine::api::{WEBHOOK_SIGNATURE_HEADER, sign_webhook};
use tcore_engine::clock::Clock;
use tcore_engine::config::{EngineConfig, HoldMode, RateLimits};
use tcore_engine::sessions::{SESSION_AUDIENCE_DEFAULT, SESSION_LEEWAY_S, SessionClaims, SessionConfig, sign_hs256};

use crate::api::{Api, Reply, check_problem};
use crate::support::{START_MS, WEBHOOK_SECRET, config};

/// A session for `user_id` signed with `secret`, for `audience`, lasting a minute from the start.
fn signed_session(secret: &[u8], audience: &str, user_id: u64) -> String {
    let claims = SessionClaims {
        sub: user_id.to_string(),
        aud: audience.into(),
        iat: START_MS / 1000,
        exp: START_MS / 1000 + 60,
        iss: None,
    };
    sign_hs256(secret, &claims).expect("signs")
}

async fn balance(api: &Api, user_id: u64) -> u64 {
    api.get(&format!("/v1/users/{user_id}")).session(user_id).send().await.json()["points"].as_u64().expect("points")
}

#[tokio::test]
async fn a_fan_cannot_join_read_hold_pay_or_cancel_as_another_user() {
    let api = Api::new().await;
    let (ada, ada_token) = api.user_in_line("ada", 1_000).await;
    let (bob, bob_token) = api.user_in_line("bob", 1_000).await;
    api.advance(Duration::from_secs(1)).await;
    let held = api.hold(&ada_token, 1).await;
    assert_eq!(held.status, StatusCode::CREATED, "{:?}", held.bytes);
    let reservation_id = held.json()["reservation_id"].as_u64().expect("id");

    // Bob, logged in as himself, presents Ada's queue token: every call is refused.
    let as_bob_with_adas_token =
        |method: Method, uri: String| api.call(method, &uri).session(bob).queue_token(&ada_token);
    let attempts = [
        as_bob_with_adas_token(Method::GET, "/v1/schedules/1/seats".into()).send().await,
        as_bob_with_adas_token(Method::POST, "/v1/holds".into())
            .json(json!({ "schedule_id": 1, "seat_id": 2 }))
            .send()
            .await,
        as_bob_with_adas_token(Method::POST, format!("/v1/reservations/{reservation_id}/confirm")).send().await,
        as_bob_with_adas_token(Method::POST, format!("/v1/reservations/{reservation_id}/cancel")).send().await,
        as_bob_with_adas_token(Method::GET, format!("/v1/reservations/{reservation_id}")).send().await,
        as_bob_with_adas_token(Method::GET, format!("/v1/queue/{ada_token}")).send().await,
    ];
    for attempt in &attempts {
        check_problem(attempt, StatusCode::FORBIDDEN, "token_not_yours");
    }
    // With his own token, Ada's reservation is still not his.
    let with_his_own = api.post(&format!("/v1/reservations/{reservation_id}/confirm")).fan(&bob_token).send().await;
    check_problem(&with_his_own, StatusCode::FORBIDDEN, "not_owner");
    let cancel = api.post(&format!("/v1/reservations/{reservation_id}/cancel")).fan(&bob_token).send().await;
    check_problem(&cancel, StatusCode::FORBIDDEN, "not_owner");
    // Nor is her account.
    let account = api.get(&format!("/v1/users/{ada}")).session(bob).send().await;
    check_problem(&account, StatusCode::FORBIDDEN, "not_your_account");

    let read = api.get(&format!("/v1/reservations/{reservation_id}")).fan(&ada_token).send().await.json();
    assert_eq!(read["status"], "HELD", "nothing Bob tried changed Ada's hold");
    assert_eq!(balance(&api, ada).await, 1_000);
    assert_eq!(balance(&api, bob).await, 1_000);
}

#[tokio::test]
async fn missing_forged_expired_and_other_audience_sessions_are_refused() {
    let api = Api::new().await;
    let (ada, _) = api.user_in_line("ada", 0).await;
    let join = |credential: Option<String>| {
        let call = api.post("/v1/schedules/1/queue");
        match credential {
            Some(credential) => call.bearer(&credential),
            None => call,
        }
        .send()
    };
    let missing = join(None).await;
    check_problem(&missing, StatusCode::UNAUTHORIZED, "session_missing");
    assert_eq!(missing.headers["www-authenticate"], "Bearer");
    check_problem(&join(Some("garbage".into())).await, StatusCode::UNAUTHORIZED, "session_invalid");
    let foreign = signed_session(b"not-the-engines-session-secret-at-all", SESSION_AUDIENCE_DEFAULT, ada);
    check_problem(&join(Some(foreign)).await, StatusCode::UNAUTHORIZED, "session_invalid");
    let tcore_engine::sessions::SessionKey::Hs256 { secret } = SessionConfig::default().key else {
        unreachable!("the test engine's key is HS256")
    };
    let elsewhere = signed_session(&secret, "another-service", ada);
    check_problem(&join(Some(elsewhere)).await, StatusCode::UNAUTHORIZED, "session_invalid");
    let good = signed_session(&secret, SESSION_AUDIENCE_DEFAULT, ada);
    assert_eq!(join(Some(good.clone())).await.status, StatusCode::CREATED);
    api.clock.advance(Duration::from_secs(60 + SESSION_LEEWAY_S));
    check_problem(&join(Some(good)).await, StatusCode::UNAUTHORIZED, "session_expired");
}

#[tokio::test]
async fn a_call_without_a_session_is_refused_before_it_can_claim_an_idempotency_key() {
    let api = Api::new().await;
    let (_, token) = api.admitted_user("ada", 1_000).await;
    // The same key, from the same address, on two different calls without a session: both are
    // refused for the session, none is stored, so neither can make the other a key mismatch.
    for seat_id in [1, 2] {
        let body = json!({ "schedule_id": 1, "seat_id": seat_id });
        let call = api.post("/v1/holds").header("x-queue-token", &token).key("shared-key").json(body);
        check_problem(&call.send().await, StatusCode::UNAUTHORIZED, "session_missing");
    }
    let forged =
        api.post("/v1/holds").bearer("forged").key("shared-key").json(json!({ "schedule_id": 1, "seat_id": 3 }));
    check_problem(&forged.send().await, StatusCode::UNAUTHORIZED, "session_invalid");
    // A call that acts for no user still takes a key without a session.
    let opened = api.post("/v1/users").key("shared-key").json(json!({ "name": "cleo" })).send().await;
    assert_eq!(opened.status, StatusCode::CREATED, "{:?}", opened.bytes);
    let replayed = api.post("/v1/users").key("shared-key").json(json!({ "name": "cleo" })).send().await;
    assert_eq!(replayed.json()["id"], opened.json()["id"], "the retry replays the first answer");
}

/// An outsider's flood of forged sessions, forged queue tokens, idempotency keys and accounts
/// leaves the engine's state bounded: nothing forged is remembered, no key is claimed without a
/// session, and an address opens only its hourly allowance of accounts.
#[tokio::test]
async fn a_flood_of_forged_credentials_keys_and_accounts_leaves_the_state_bounded() {
    // Rate limits out of the way: what is measured is what the flood leaves behind.
    let limits = RateLimits { per_ip_per_s: 100_000, per_token_per_s: 100_000, burst: 100_000 };
    let config = EngineConfig { accounts_per_ip_per_hour: 20, rate_limits: limits, ..config(HoldMode::Atomic) };
    let api = Api::with_config(config).await;
    let (ada, token) = api.admitted_user("ada", 1_000).await;
    // Ada's own session, as the flood below sends it, is remembered once.
    assert_eq!(api.get(&format!("/v1/queue/{token}")).session(ada).send().await.status, StatusCode::OK);
    let remembered = api.engine.sessions_remembered();
    let mut opened = 0;
    for n in 0..2_000 {
        let forged = format!("eyJhbGciOiJIUzI1NiJ9.forged-{n}.signature");
        let status = api.get(&format!("/v1/queue/{token}")).bearer(&forged).send().await;
        check_problem(&status, StatusCode::UNAUTHORIZED, "session_invalid");
        let forged_token = format!("v2.1.{ada}.{n}.{n:016x}.forged-mac");
        let call = api.get(&format!("/v1/queue/{forged_token}")).session(ada);
        check_problem(&call.send().await, StatusCode::UNAUTHORIZED, "token_invalid");
        let keyed = api.post("/v1/holds").key(&format!("k-{n}")).json(json!({ "schedule_id": 1, "seat_id": 1 }));
        check_problem(&keyed.send().await, StatusCode::UNAUTHORIZED, "session_missing");
        let account = api.post("/v1/users").json(json!({ "name": format!("sock-{n}") })).send().await;
        if account.status == StatusCode::CREATED {
            opened += 1;
        } else {
            check_problem(&account, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
        }
    }
    assert_eq!(api.engine.sessions_remembered(), remembered, "no forged session is remembered");
    assert!(opened <= 20, "one address opened {opened} accounts in an hour");
    // None of the keys was claimed: the same key with another request is still only a 401.
    let again = api.post("/v1/holds").key("k-7").json(json!({ "schedule_id": 1, "seat_id": 2 }));
    check_problem(&again.send().await, StatusCode::UNAUTHORIZED, "session_missing");
}

#[tokio::test]
async fn a_second_join_returns_the_same_place_under_a_new_token_and_fans_never_share_one() {
    let api = Api::new().await;
    let (ada, first) = api.user_in_line("ada", 1_000).await;
    let (_, bobs) = api.user_in_line("bob", 1_000).await;
    let again = api.post("/v1/schedules/1/queue").session(ada).send().await;
    assert_eq!(again.status, StatusCode::CREATED);
    let second = again.json()["token"].as_str().expect("token").to_owned();
    assert_ne!(second, first, "every token issued carries a nonce of its own");
    assert_ne!(bobs, first);
    assert_ne!(bobs, second);
    assert_eq!(place(&api, &first).await, 1);
    assert_eq!(place(&api, &second).await, 1, "the same place, not a new one");
    assert_eq!(place(&api, &bobs).await, 2);
    api.advance(Duration::from_secs(1)).await;
    assert_eq!(api.hold(&second, 1).await.status, StatusCode::CREATED);
    assert_eq!(api.get("/v1/schedules/1/seats").fan(&first).send().await.status, StatusCode::OK);
}

async fn place(api: &Api, token: &str) -> serde_json::Value {
    api.get(&format!("/v1/queue/{token}")).fan(token).send().await.json()["position"].clone()
}

#[tokio::test]
async fn points_cannot_be_added_through_the_public_api() {
    let api = Api::new().await;
    let (ada, _) = api.user_in_line("ada", 0).await;
    let minted =
        api.post(&format!("/v1/users/{ada}/points")).session(ada).key("mint").json(json!({ "amount": 10_000_000 }));
    check_problem(&minted.send().await, StatusCode::NOT_FOUND, "not_found");
    assert_eq!(balance(&api, ada).await, 0);
}

/// The last audit entry of `action`.
async fn last_audit(api: &Api, action: &str) -> serde_json::Value {
    let audit = api.admin(Method::GET, "/admin/v1/audit").send().await.json();
    let entries = audit.as_array().expect("entries");
    entries
        .iter()
        .rev()
        .find(|entry| entry["action"] == action)
        .cloned()
        .unwrap_or_else(|| panic!("no {action} in {audit}"))
}

#[tokio::test]
async fn admin_top_ups_add_once_per_key_and_are_audited() {
    let api = Api::new().await;
    let (ada, _) = api.user_in_line("ada", 0).await;
    let uri = format!("/admin/v1/users/{ada}/points");
    for _ in 0..2 {
        let topped = api.admin(Method::POST, &uri).key("goodwill-1").json(json!({ "amount": 500 })).send().await;
        assert_eq!(topped.status, StatusCode::OK, "{:?}", topped.bytes);
    }
    assert_eq!(balance(&api, ada).await, 500, "once per key");
    let entry = last_audit(&api, "top_up").await;
    assert_eq!(entry["actor"], "admin");
    assert_eq!(entry["target"], format!("user/{ada}"));
    assert_eq!(entry["after"]["points"], 500);
    let over = api.admin(Method::POST, &uri).key("big").json(json!({ "amount": 10_000_001 })).send().await;
    check_problem(&over, StatusCode::UNPROCESSABLE_ENTITY, "out_of_bounds");
}

async fn webhook(api: &Api, secret: &[u8], at_s: u64, body: &str) -> Reply {
    api.post("/v1/payments/webhook")
        .raw(body)
        .header(WEBHOOK_SIGNATURE_HEADER, &sign_webhook(secret, at_s, body.as_bytes()))
        .send()
        .await
}

#[tokio::test]
async fn a_signed_webhook_adds_points_once_per_event_and_a_bad_signature_is_refused() {
    let api = Api::new().await;
    let (ada, _) = api.user_in_line("ada", 0).await;
    let now_s = api.clock.now_ms() / 1000;
    let body = format!(r#"{{"event_id":"pay_1","user_id":{ada},"amount":250}}"#);
    for _ in 0..2 {
        let delivered = webhook(&api, WEBHOOK_SECRET, now_s, &body).await;
        assert_eq!(delivered.status, StatusCode::OK, "{:?}", delivered.bytes);
    }
    assert_eq!(balance(&api, ada).await, 250, "a second delivery of one event adds nothing");
    assert_eq!(last_audit(&api, "top_up").await["actor"], "payment-webhook");
    // One event credits one account: the same event id for another user is a conflict.
    let (bob, _) = api.user_in_line("bob", 0).await;
    let elsewhere = format!(r#"{{"event_id":"pay_1","user_id":{bob},"amount":250}}"#);
    check_problem(&webhook(&api, WEBHOOK_SECRET, now_s, &elsewhere).await, StatusCode::CONFLICT, "top_up_key_reused");
    assert_eq!(balance(&api, bob).await, 0);

    let forged = format!(r#"{{"event_id":"pay_2","user_id":{ada},"amount":9999}}"#);
    let refused = webhook(&api, b"a-guess-at-the-providers-secret!!", now_s, &forged).await;
    check_problem(&refused, StatusCode::UNAUTHORIZED, "webhook_signature_invalid");
    let stale = webhook(&api, WEBHOOK_SECRET, now_s - 301, &forged).await;
    check_problem(&stale, StatusCode::UNAUTHORIZED, "webhook_signature_invalid");
    let unsigned = api.post("/v1/payments/webhook").raw(&forged).send().await;
    check_problem(&unsigned, StatusCode::UNAUTHORIZED, "webhook_signature_invalid");
    assert_eq!(balance(&api, ada).await, 250);
}

#[tokio::test]
async fn one_fans_idempotency_key_never_affects_another_fans_call() {
    let api = Api::new().await;
    let (_, ada) = api.admitted_user("ada", 1_000).await;
    let (_, bob) = api.admitted_user("bob", 1_000).await;
    // A stranger spends the key first, on another route, from another address.
    let stranger =
        api.post("/v1/users").key("pay-1").with_forwarded_ip("203.0.113.66").json(json!({ "name": "mallory" }));
    assert_eq!(stranger.send().await.status, StatusCode::CREATED);
    // Ada and Bob use one key for different holds: each gets their own.
    let hold = |token: &str, seat_id: u64| {
        api.post("/v1/holds").fan(token).key("hold-1").json(json!({ "schedule_id": 1, "seat_id": seat_id })).send()
    };
    let adas = hold(&ada, 1).await;
    let bobs = hold(&bob, 2).await;
    assert_eq!((adas.status, bobs.status), (StatusCode::CREATED, StatusCode::CREATED), "{:?}", bobs.bytes);
    assert_ne!(adas.json()["reservation_id"], bobs.json()["reservation_id"]);
    let reservation_id = adas.json()["reservation_id"].as_u64().expect("id");
    let paid = api.post(&format!("/v1/reservations/{reservation_id}/confirm")).fan(&ada).key("pay-1").send().await;
    assert_eq!(paid.status, StatusCode::OK, "{:?}", paid.bytes);
}

#[tokio::test]
async fn accounts_per_address_are_limited_per_hour() {
    let api = Api::with_config(EngineConfig { accounts_per_ip_per_hour: 2, ..config(HoldMode::Atomic) }).await;
    let open = |ip: &'static str| api.post("/v1/users").with_forwarded_ip(ip).json(json!({ "name": "fan" })).send();
    assert_eq!(open("203.0.113.1").await.status, StatusCode::CREATED);
    assert_eq!(open("203.0.113.1").await.status, StatusCode::CREATED);
    let third = open("203.0.113.1").await;
    check_problem(&third, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert_eq!(third.headers["retry-after"], "1800");
    assert_eq!(open("203.0.113.2").await.status, StatusCode::CREATED);
}

#[tokio::test]
async fn dev_sessions_are_served_only_when_asked_for() {
    let api = Api::new().await;
    let (ada, _) = api.user_in_line("ada", 0).await;
    let issued = api.post("/v1/sessions").json(json!({ "user_id": ada })).send().await;
    assert_eq!(issued.status, StatusCode::CREATED, "{:?}", issued.bytes);
    let session = issued.json()["session"].as_str().expect("session").to_owned();
    let joined = api.post("/v1/schedules/1/queue").bearer(&session).send().await;
    assert_eq!(joined.status, StatusCode::CREATED);
    let unknown = api.post("/v1/sessions").json(json!({ "user_id": 999 })).send().await;
    check_problem(&unknown, StatusCode::NOT_FOUND, "not_found");

    let production = SessionConfig { dev_sessions: false, ..SessionConfig::default() };
    let api = Api::with_config(EngineConfig { sessions: production, ..config(HoldMode::Atomic) }).await;
    let refused = api.post("/v1/sessions").json(json!({ "user_id": 1 })).send().await;
    check_problem(&refused, StatusCode::NOT_FOUND, "not_found");
    let openapi = api.get("/openapi.json").send().await.json();
    assert!(openapi["components"]["securitySchemes"]["session"].is_object());
}
