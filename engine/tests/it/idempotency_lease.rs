//! The lease on an idempotency key, through the API: a payment that runs long keeps its key
//! (its node renews the claim), and a payment whose node died is taken over a lease later,
//! without a second charge.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use parking_lot::Mutex;
use tcore_engine::clock::{Clock, ManualClock, TokioClock};
use tcore_engine::config::{EngineConfig, HoldMode};
use tcore_engine::domain::{LedgerReason, ReservationStatus};
use tcore_engine::faults::NoFaults;
use tcore_engine::store::{CacheStore, MemoryStore, MemoryStoreConfig, RecordStore};
use tcore_engine::{Engine, EngineParts, app};
use tokio::sync::Notify;
use tower::ServiceExt;

use crate::contract;
use crate::support::{
    RecordTap, START_MS, Tapped, config, oneshot_peer_trusted, schedule, session, session_credential,
};

/// Holds calls of a record store up: the next confirm takes a while (a slow store call, the
/// node running on), or the next completion of an idempotency record never returns (the node
/// dies after the payment, before the record is completed). Counts renewals of idempotency
/// leases.
#[derive(Debug)]
struct Held {
    next_confirm_delay: Mutex<Option<Duration>>,
    next_completion_hangs: AtomicBool,
    completion_reached: Notify,
    renewals: AtomicU32,
}

impl Held {
    fn in_front_of(inner: Arc<dyn RecordStore>) -> Tapped<Held> {
        let tap = Self {
            next_confirm_delay: Mutex::new(None),
            next_completion_hangs: AtomicBool::new(false),
            completion_reached: Notify::new(),
            renewals: AtomicU32::new(0),
        };
        Tapped { inner, tap }
    }

    fn renewals(&self) -> u32 {
        self.renewals.load(Ordering::SeqCst)
    }
}

#[async_trait::async_trait]
impl RecordTap for Held {
    async fn before_confirm(&self) {
        let delay = self.next_confirm_delay.lock().take();
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
    }

    async fn before_idempotency_complete(&self) {
        if self.next_completion_hangs.swap(false, Ordering::SeqCst) {
            self.completion_reached.notify_one();
            std::future::pending::<()>().await;
        }
    }

    fn on_idempotency_renew(&self) {
        self.renewals.fetch_add(1, Ordering::SeqCst);
    }
}

/// An answer: status, headers, body.
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn code(&self) -> String {
        let problem: serde_json::Value = serde_json::from_slice(&self.body).unwrap_or_default();
        problem["code"].as_str().unwrap_or_default().to_owned()
    }
}

/// A fan's `POST` with its session, queue token and `Idempotency-Key`.
async fn post(router: Router, uri: String, user_id: u64, token: String, key: &str, body: Option<String>) -> Reply {
    let mut request = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header("x-forwarded-for", "192.0.2.1")
        .header("authorization", format!("Bearer {}", session_credential(user_id)))
        .header("x-queue-token", token)
        .header("idempotency-key", key);
    if body.is_some() {
        request = request.header("content-type", "application/json");
    }
    let request = request.body(body.map_or_else(Body::empty, Body::from)).expect("request");
    let response = router.oneshot(request).await.expect("infallible");
    let (status, headers) = (response.status(), response.headers().clone());
    Reply { status, headers, body: response.into_body().collect().await.expect("body").to_bytes() }
}

/// A node on `record` (the real one, [`Held`] up) and `cache`, with schedule 1 of two
/// seats and one fan with 1,000 points, admitted once `wait` (which moves `clock`) is over;
/// returns the node and the fan's (user id, token).
async fn node_with_a_fan(
    record: Arc<Tapped<Held>>,
    cache: Arc<dyn CacheStore>,
    clock: Arc<dyn Clock>,
    wait: impl Future<Output = ()>,
) -> (Arc<Engine>, u64, String) {
    let config = EngineConfig { trusted_proxies: oneshot_peer_trusted(), ..config(HoldMode::Atomic) };
    let engine = Engine::new(EngineParts { config, clock, record, cache, faults: Arc::new(NoFaults) })
        .unwrap_or_else(|error| panic!("test config is valid: {error}"));
    engine.add_schedule(schedule(START_MS, 2)).await.expect("schedule");
    let user_id = engine.open_account("ada".into(), 1_000).await.expect("user").user_id;
    let token = engine.join_queue(session(user_id), 1).await.expect("join").token;
    wait.await;
    engine.tick_admission().await.expect("tick");
    (engine, user_id, token)
}

async fn charges(record: &dyn RecordStore) -> usize {
    let dump = record.dump().await.expect("dump");
    dump.ledger.iter().filter(|entry| entry.reason == LedgerReason::Charge).count()
}

/// A confirm whose store call takes three leases: its node renews the claim every third of a
/// lease, so a retry with the same key a lease in (when the claim would have lapsed unrenewed)
/// and again two leases in is told the payment is still in progress, with `Retry-After: 1`.
/// The payment answers, is charged once, and is replayed; a request that ends within a third of
/// the lease renews nothing, and nothing is renewed once the payment answered.
#[tokio::test(start_paused = true)]
async fn a_payment_running_past_a_third_of_its_lease_keeps_its_idempotency_key() {
    let memory = Arc::new(MemoryStore::new(MemoryStoreConfig { seed: 7, ..MemoryStoreConfig::default() }));
    let record = Arc::new(Held::in_front_of(memory.clone()));
    let clock = Arc::new(TokioClock::new(START_MS));
    let wait = tokio::time::sleep(Duration::from_secs(1));
    let (engine, user_id, token) = node_with_a_fan(Arc::clone(&record), memory.clone(), clock, wait).await;
    let lease = Duration::from_millis(engine.config().idempotency_lease_ms);
    let router = app(Arc::clone(&engine));

    let hold_body = serde_json::json!({ "schedule_id": 1, "seat_id": 1 }).to_string();
    let held = post(router.clone(), "/v1/holds".into(), user_id, token.clone(), "hold-1", Some(hold_body)).await;
    assert_eq!(held.status, StatusCode::CREATED, "{:?}", held.body);
    let hold: serde_json::Value = serde_json::from_slice(&held.body).expect("a hold");
    let reservation_id = hold["reservation_id"].as_u64().expect("the hold's reservation");
    let confirm = format!("/v1/reservations/{reservation_id}/confirm");
    assert_eq!(record.tap.renewals(), 0, "a request that ends within a third of the lease renews nothing");

    *record.tap.next_confirm_delay.lock() = Some(lease * 3);
    let owner = tokio::spawn(post(router.clone(), confirm.clone(), user_id, token.clone(), "pay-1", None));
    for waited in [lease, lease * 2] {
        tokio::time::sleep(lease).await;
        let retry = post(router.clone(), confirm.clone(), user_id, token.clone(), "pay-1", None).await;
        assert_eq!(
            (retry.status, retry.code().as_str()),
            (StatusCode::CONFLICT, "idempotency_in_progress"),
            "{waited:?} in, the slow payment still holds its key"
        );
        assert_eq!(retry.headers["retry-after"], "1");
    }
    let paid = owner.await.expect("task");
    assert_eq!(paid.status, StatusCode::OK, "{:?}", paid.body);
    let renewals = record.tap.renewals();
    assert!(renewals >= 8, "renewed every third of the lease for three leases: {renewals}");
    tokio::time::sleep(lease * 2).await;
    assert_eq!(record.tap.renewals(), renewals, "the renewals end with the request");

    let replay = post(router.clone(), confirm, user_id, token, "pay-1", None).await;
    assert_eq!((replay.status, &replay.body), (StatusCode::OK, &paid.body), "replayed byte for byte");
    assert_eq!(charges(memory.as_ref()).await, 1);
    assert_eq!(memory.account(user_id).await.expect("account").balance, 900);

    let request = Request::builder().uri("/openapi.json").body(Body::empty()).expect("request");
    let document = router.oneshot(request).await.expect("infallible").into_body().collect().await.expect("body");
    let document: serde_json::Value = serde_json::from_slice(&document.to_bytes()).expect("the OpenAPI document");
    let in_progress = &document["paths"]["/v1/reservations/{id}/confirm"]["post"]["responses"]["409"];
    assert!(in_progress["description"].as_str().is_some_and(|text| text.contains("idempotency_in_progress")));
    assert!(in_progress["headers"]["Retry-After"].is_object(), "the document says a 409 may carry Retry-After");
}

contract!(
    /// The node running a payment dies after the store charged it and before the idempotency
    /// record is completed. Until the lease lapses the fan's retry is told the payment is in
    /// progress; then the retry takes the key over, its confirm finds the reservation already
    /// confirmed and answers it, and the fan is charged once.
    async fn a_payment_whose_node_died_is_taken_over_after_the_lease_and_charged_once(stores) {
        let record = Arc::new(Held::in_front_of(Arc::clone(&stores.record)));
        let clock = ManualClock::starting_at_ms(START_MS);
        let wait = async { clock.advance(Duration::from_secs(1)) };
        let (engine, user_id, token) =
            node_with_a_fan(Arc::clone(&record), Arc::clone(&stores.cache), Arc::new(clock.clone()), wait).await;
        let lease = Duration::from_millis(engine.config().idempotency_lease_ms);
        let held = engine.hold(session(user_id), Some(&token), 1, 1).await.expect("hold");
        let router = app(Arc::clone(&engine));
        let confirm = format!("/v1/reservations/{}/confirm", held.id);

        record.tap.next_completion_hangs.store(true, Ordering::SeqCst);
        let owner = tokio::spawn(post(router.clone(), confirm.clone(), user_id, token.clone(), "pay-1", None));
        record.tap.completion_reached.notified().await;
        owner.abort();
        assert!(owner.await.is_err_and(|error| error.is_cancelled()), "the node died before answering");
        assert_eq!(stores.record.reservation(held.id).await.expect("read").status, ReservationStatus::Confirmed);

        let early = post(router.clone(), confirm.clone(), user_id, token.clone(), "pay-1", None).await;
        assert_eq!((early.status, early.code().as_str()), (StatusCode::CONFLICT, "idempotency_in_progress"));
        assert_eq!(early.headers["retry-after"], "1");
        clock.advance(lease - Duration::from_millis(1));
        let still = post(router.clone(), confirm.clone(), user_id, token.clone(), "pay-1", None).await;
        assert_eq!(still.status, StatusCode::CONFLICT, "the lease has a millisecond left");
        clock.advance(Duration::from_millis(1));
        let retried = post(router.clone(), confirm.clone(), user_id, token.clone(), "pay-1", None).await;
        assert_eq!(retried.status, StatusCode::OK, "{:?}", retried.body);
        let answered: serde_json::Value = serde_json::from_slice(&retried.body).expect("a reservation");
        let stored = stores.record.reservation(held.id).await.expect("read");
        assert_eq!((answered["id"].as_u64(), answered["status"].as_str()), (Some(held.id), Some("CONFIRMED")));
        assert_eq!(stored.confirmed_at_ms, Some(START_MS + 1_000), "confirmed by the node that died");
        assert_eq!(answered["confirmed_at"].as_u64(), stored.confirmed_at_ms, "the same reservation, unchanged");
        assert_eq!(answered["paid"].as_u64(), Some(100));
        assert_eq!(charges(stores.record.as_ref()).await, 1, "charged once");
        assert_eq!(stores.record.account(user_id).await.expect("account").balance, 900);
        let replay = post(router, confirm, user_id, token, "pay-1", None).await;
        assert_eq!((replay.status, &replay.body), (StatusCode::OK, &retried.body), "replayed byte for byte");
    }
);
