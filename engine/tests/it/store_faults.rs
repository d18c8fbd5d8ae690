//! Redis and MariaDB going away under a running engine, and the database's own backstop.
//! These need the real servers (skipped with a printed reason when they are down, unless
//! `TCORE_REQUIRE_SERVICES=1`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use tcore_engine::clock::ManualClock;
use tcore_engine::config::{EngineConfig, HoldMode};
use tcore_engine::domain::{
    FenceToken, IdempotencyDecision, LedgerReason, ReservationStatus, StoredResponse, TransitionError, WriteGuard,
};
use tcore_engine::faults::{FaultContext, FaultHook, FaultPoint, NoFaults};
use tcore_engine::store::{
    CacheStore, HoldRequest, MariaDbStore, MariaDbStoreConfig, OutboxRelay, OutboxRelayConfig, RecordStore, RedisStore,
    RedisStoreConfig, SeatFilter, StoreError,
};
use tcore_engine::{Engine, EngineParts, app};
use tower::ServiceExt;

use crate::services::{CutProxy, Stores, mariadb_server_url, redis_url};
use crate::support::{START_MS, config, oneshot_peer_trusted, schedule, session, session_credential, session_of};

/// `host:port` of a server URL such as `mysql://root@127.0.0.1:3306` or `redis://127.0.0.1:6379/0`.
fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, rest)| rest);
    rest.split('/').next().unwrap_or(rest).to_owned()
}

/// `url` with its host and port replaced by the proxy's.
fn through(url: &str, proxy: &CutProxy) -> String {
    url.replacen(&host_port(url), &format!("127.0.0.1:{}", proxy.port), 1)
}

async fn send(
    router: &Router,
    method: Method,
    uri: &str,
    token: Option<&str>,
    key: Option<&str>,
    body: Option<String>,
) -> (StatusCode, String, Bytes) {
    let mut request = Request::builder().method(method).uri(uri).header("x-forwarded-for", "192.0.2.1");
    if let Some(token) = token {
        let session = session_credential(session_of(token).user_id);
        request = request.header("authorization", format!("Bearer {session}")).header("x-queue-token", token);
    }
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    if body.is_some() {
        request = request.header("content-type", "application/json");
    }
    let request = request.body(body.map_or_else(Body::empty, Body::from)).expect("request");
    let response = router.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let content_type =
        response.headers().get("content-type").and_then(|value| value.to_str().ok()).unwrap_or("").to_owned();
    (status, content_type, response.into_body().collect().await.expect("body").to_bytes())
}

fn problem_code(bytes: &Bytes) -> String {
    let problem: serde_json::Value = serde_json::from_slice(bytes).expect("a problem document");
    problem["code"].as_str().unwrap_or_default().to_owned()
}

fn engine_on(
    record: Arc<dyn RecordStore>,
    cache: Arc<dyn CacheStore>,
    clock: &ManualClock,
    faults: Arc<dyn FaultHook>,
) -> Arc<Engine> {
    let config = EngineConfig { trusted_proxies: oneshot_peer_trusted(), ..config(HoldMode::Atomic) };
    Engine::new(EngineParts { config, clock: Arc::new(clock.clone()), record, cache, faults })
        .unwrap_or_else(|error| panic!("test config is valid: {error}"))
}

/// A user with 1,000 points, admitted to schedule 1; returns (user id, token).
async fn admitted_user(engine: &Engine, clock: &ManualClock) -> (u64, String) {
    let user = engine.open_account("ada".into(), 1_000).await.expect("user");
    let token = engine.join_queue(session(user.user_id), 1).await.expect("join").token;
    clock.advance(Duration::from_secs(1));
    engine.tick_admission().await.expect("tick");
    (user.user_id, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_refuses_a_second_active_reservation_of_a_seat_even_from_the_unsafe_write() {
    let Some(stores) = Stores::redis_mariadb().await else { return };
    // The memory store models the known-unsafe design: the stale write lands and the seat is
    // sold twice. MariaDB's unique key on the active seat refuses it.
    for (record, stale_write_lands) in [(Stores::memory().record, true), (stores.record, false)] {
        record.put_schedule(schedule(START_MS, 1)).await.expect("schedule");
        let seat = record.seat_map(1, SeatFilter::default(), START_MS).await.expect("seats")[0].id;
        let ada = record.create_user("ada".into(), 500, START_MS).await.expect("ada").user_id;
        let bob = record.create_user("bob".into(), 500, START_MS).await.expect("bob").user_id;
        let request = |user_id| HoldRequest {
            schedule_id: 1,
            seat_id: seat,
            user_id,
            hold_ttl_ms: 60_000,
            node: "n".into(),
            seats_per_user_max: 4,
        };
        let sold = record.write_hold(request(ada), WriteGuard::Fenced(FenceToken(2)), START_MS).await.expect("hold");
        record.confirm(sold.id, ada, None, START_MS + 1).await.expect("confirm");
        // A paused lock holder with an older fence writes without a fence check.
        let stale = record.write_hold(request(bob), WriteGuard::Unfenced(FenceToken(1)), START_MS + 2).await;
        let active = record
            .dump()
            .await
            .expect("dump")
            .reservations
            .iter()
            .filter(|r| r.status != ReservationStatus::Expired)
            .count();
        if stale_write_lands {
            assert!(stale.is_ok());
            assert_eq!(active, 2);
        } else {
            assert_eq!(stale, Err(StoreError::Rejected(TransitionError::SeatUnavailable)));
            assert_eq!(active, 1);
        }
    }
}

/// Cuts MariaDB off once, when a confirm has claimed its idempotency key and is about to write.
#[derive(Debug)]
struct CutBeforeConfirm {
    proxy: Arc<CutProxy>,
    armed: AtomicBool,
}

impl FaultHook for CutBeforeConfirm {
    fn pause_at(&self, point: FaultPoint, _context: &FaultContext) -> Option<Duration> {
        if point == FaultPoint::ConfirmBeforeCommit && self.armed.swap(false, Ordering::SeqCst) {
            self.proxy.cut();
        }
        None
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_lost_in_the_middle_of_a_confirm_answers_503_and_the_retry_charges_once() {
    let Some(stores) = Stores::redis_mariadb().await else { return };
    let proxy = Arc::new(CutProxy::start(host_port(&mariadb_server_url())).await);
    let database_url = through(stores.database_url.as_deref().expect("database"), &proxy);
    let config = MariaDbStoreConfig {
        call_timeout: Duration::from_secs(2),
        acquire_timeout: Duration::from_millis(500),
        ..MariaDbStoreConfig::default()
    };
    let redis = stores.redis.clone().expect("redis");
    let record =
        Arc::new(MariaDbStore::connect_lazy(&database_url, config).expect("url").with_seat_gate(redis.seat_gate()));
    let clock = ManualClock::starting_at_ms(START_MS);
    let faults = Arc::new(CutBeforeConfirm { proxy: Arc::clone(&proxy), armed: AtomicBool::new(false) });
    let engine = engine_on(record, Arc::clone(&stores.cache), &clock, faults.clone());
    engine.add_schedule(schedule(START_MS, 5)).await.expect("schedule");
    let (user_id, token) = admitted_user(&engine, &clock).await;
    let held = engine.hold(session_of(&token), Some(&token), 1, 1).await.expect("hold");
    let router = app(Arc::clone(&engine));
    let confirm = format!("/v1/reservations/{}/confirm", held.id);

    faults.armed.store(true, Ordering::SeqCst);
    let (status, content_type, body) = send(&router, Method::POST, &confirm, Some(&token), Some("pay-1"), None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(content_type, "application/problem+json");
    assert_eq!(problem_code(&body), "store_unavailable");

    proxy.restore();
    // The key's lease could not be given back while the database was away: until it lapses a
    // retry is told the request is still in progress, and runs nothing.
    let (status, _, body) = send(&router, Method::POST, &confirm, Some(&token), Some("pay-1"), None).await;
    assert_eq!((status, problem_code(&body).as_str()), (StatusCode::CONFLICT, "idempotency_in_progress"));
    clock.advance(Duration::from_millis(engine.config().idempotency_lease_ms));
    let (status, _, first) = send(&router, Method::POST, &confirm, Some(&token), Some("pay-1"), None).await;
    assert_eq!(status, StatusCode::OK, "{first:?}");
    let (status, _, replay) = send(&router, Method::POST, &confirm, Some(&token), Some("pay-1"), None).await;
    assert_eq!((status, &replay), (StatusCode::OK, &first), "the replay is byte for byte");
    let dump = stores.record.dump().await.expect("dump");
    let charges = dump.ledger.iter().filter(|entry| entry.reason == LedgerReason::Charge).count();
    assert_eq!(charges, 1);
    assert_eq!(stores.record.account(user_id).await.expect("account").balance, 900);
    assert_eq!(stores.record.reservation(held.id).await.expect("read").status, ReservationStatus::Confirmed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_readyz_and_booking_calls_answer_503_and_service_resumes() {
    let Some(stores) = Stores::redis_mariadb().await else { return };
    let proxy = CutProxy::start(host_port(&redis_url())).await;
    let redis = RedisStore::connect_lazy(
        &through(&redis_url(), &proxy),
        RedisStoreConfig {
            prefix: stores.redis_prefix.clone().expect("prefix"),
            call_timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_millis(500),
            ..RedisStoreConfig::default()
        },
    )
    .expect("url");
    let record = Arc::new(stores.mariadb.clone().expect("mariadb").with_seat_gate(redis.seat_gate()));
    let clock = ManualClock::starting_at_ms(START_MS);
    let engine = engine_on(record, Arc::new(redis), &clock, Arc::new(NoFaults));
    engine.add_schedule(schedule(START_MS, 5)).await.expect("schedule");
    let (_, token) = admitted_user(&engine, &clock).await;
    let router = app(Arc::clone(&engine));
    let hold_body = Some(serde_json::json!({ "schedule_id": 1, "seat_id": 2 }).to_string());

    proxy.cut();
    let (status, content_type, body) = send(&router, Method::GET, "/readyz", None, None, None).await;
    assert_eq!((status, content_type.as_str()), (StatusCode::SERVICE_UNAVAILABLE, "application/problem+json"));
    assert_eq!(problem_code(&body), "store_unavailable");
    let (status, _, body) = send(&router, Method::POST, "/v1/holds", Some(&token), None, hold_body.clone()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(problem_code(&body), "store_unavailable");

    proxy.restore();
    let mut ready = false;
    for _ in 0..50 {
        if send(&router, Method::GET, "/readyz", None, None, None).await.0 == StatusCode::OK {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "ready again once Redis is back");
    let (status, _, body) = send(&router, Method::POST, "/v1/holds", Some(&token), None, hold_body).await;
    assert_eq!(status, StatusCode::CREATED, "{body:?}");
}

#[tokio::test]
async fn malformed_store_urls_are_refused_with_a_reason() {
    let hostile = [
        "postgres://nope/db",
        "mysql://127.0.0.1:3306",
        "mysql://127.0.0.1:99999/db",
        "mysql://[::1/db",
        "mysql://root@127.0.0.1:3306/x`; DROP DATABASE test; --",
        "mysql://root@127.0.0.1:3306/x%60y",
    ];
    for url in hostile {
        let database = MariaDbStore::connect_lazy(url, MariaDbStoreConfig::default());
        assert!(
            matches!(&database, Err(StoreError::Invalid { reason }) if reason.starts_with("malformed MariaDB URL")),
            "{url}: {database:?}"
        );
    }
    let redis = RedisStore::connect_lazy("redis://[::1", RedisStoreConfig::default());
    assert!(matches!(redis, Err(StoreError::Invalid { reason }) if reason.starts_with("malformed Redis URL")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_relay_publishes_every_event_to_the_stream_and_marks_it_sent() {
    let Some(stores) = Stores::redis_mariadb().await else { return };
    let redis = stores.redis.clone().expect("redis");
    let ada = stores.record.create_user("ada".into(), 0, START_MS).await.expect("user").user_id;
    for index in 0..7 {
        stores.record.top_up(ada, 10, format!("k{index}"), START_MS).await.expect("top up");
    }
    let relay = OutboxRelay::new(
        Arc::clone(&stores.record),
        redis.clone(),
        OutboxRelayConfig { batch_max: 5, ..OutboxRelayConfig::default() },
    );
    assert_eq!(relay.relay_once().await.expect("relay"), 5);
    assert_eq!(relay.relay_once().await.expect("relay"), 2);
    assert_eq!(relay.relay_once().await.expect("relay"), 0);
    assert!(stores.record.outbox_pending(100).await.expect("pending").is_empty());
    let client = redis::Client::open(redis_url()).expect("url");
    let mut connection = client.get_multiplexed_async_connection().await.expect("connect");
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(redis.outbox_stream_key())
        .arg("-")
        .arg("+")
        .query_async(&mut connection)
        .await
        .expect("stream");
    let published: Vec<(String, String)> = entries
        .iter()
        .map(|(_, fields)| {
            let field = |name: &str| fields.iter().find(|(key, _)| key == name).map(|(_, value)| value.clone());
            (field("id").unwrap_or_default(), field("kind").unwrap_or_default())
        })
        .collect();
    let expected: Vec<(String, String)> = stores
        .record
        .dump()
        .await
        .expect("dump")
        .outbox
        .iter()
        .map(|event| (event.id.to_string(), "points_charged".to_owned()))
        .collect();
    assert_eq!(published, expected, "every event once, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_idempotency_key_is_replayed_from_the_redis_cache() {
    let Some(stores) = Stores::redis_mariadb().await else { return };
    let record = stores.record.as_ref();
    let response = StoredResponse { status: 200, content_type: "application/json".into(), body: b"{}".to_vec() };
    assert_eq!(
        record.idempotency_begin("k".into(), [1; 32], 1_000, 86_400_000, START_MS).await,
        Ok(IdempotencyDecision::Proceed)
    );
    record.idempotency_complete("k".into(), [1; 32], response.clone(), 86_400_000, START_MS).await.expect("complete");
    let pool = stores.mariadb.as_ref().expect("mariadb").pool();
    sqlx::query("DELETE FROM idempotency_records").execute(pool).await.expect("delete");
    assert_eq!(
        record.idempotency_begin("k".into(), [1; 32], 1_000, 86_400_000, START_MS).await,
        Ok(IdempotencyDecision::Replay(response)),
        "answered from the cache"
    );
    assert_eq!(
        record.idempotency_begin("k".into(), [2; 32], 1_000, 86_400_000, START_MS).await,
        Ok(IdempotencyDecision::Mismatch)
    );
}
