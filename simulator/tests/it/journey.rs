//! One journey, two transports: the simulated client host and the live driver send the same
//! calls, in the same order, when a node gives them the same answers.

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use parking_lot::Mutex;
use tcore_engine::config::ConnectionLimits;
use tcore_engine::server::serve_router;
use tcore_engine::telemetry::ConnectionMetrics;
use tcore_sim::history::{CheckConfig, HistoryRecorder, OpKind, Outcome};
use tcore_sim::journey::{JourneyPlan, Journeys, SectionChoice, UserOutcomes};
use tcore_sim::live::transport::{LiveShared, LiveTransport};
use tcore_sim::scenario::{RangeMs, Users};
use tcore_sim::world::net::{ENGINE_PORT, HttpClient, SimListener};
use tcore_sim::world::users::SimTransport;

/// A call as the node saw it: method, path and query, idempotency key, queue token, body.
type Seen = (String, String, Option<String>, Option<String>, String);

/// A node with scripted answers: a line that admits on the second poll, a first hold refused
/// (the seat was taken), a first payment whose store was unavailable, then success.
#[derive(Clone, Default)]
struct Script {
    seen: Arc<Mutex<Vec<Seen>>>,
    polls: Arc<AtomicU32>,
    holds: Arc<AtomicU32>,
    confirms: Arc<AtomicU32>,
}

impl Script {
    fn router(&self) -> Router {
        let script = self.clone();
        Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let script = script.clone();
            async move { script.answer(&method, &uri, &headers, &body) }
        })
    }

    fn answer(&self, method: &Method, uri: &Uri, headers: &HeaderMap, body: &Bytes) -> axum::response::Response {
        let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok()).map(str::to_owned);
        let path = uri.path_and_query().map_or_else(String::new, |path| path.to_string());
        self.seen.lock().push((
            method.to_string(),
            path.clone(),
            header("idempotency-key"),
            header("x-queue-token"),
            String::from_utf8_lossy(body).into_owned(),
        ));
        assert!(header("authorization").is_some_and(|value| value.starts_with("Bearer ")), "{path} had no session");
        let json = |status: StatusCode, body: &str| {
            (status, [("content-type", "application/json")], body.to_owned()).into_response()
        };
        if path.ends_with("/queue") {
            return json(StatusCode::OK, r#"{"token":"tok-1","status":"WAITING","sold_out":false}"#);
        }
        if path.starts_with("/v1/queue/") {
            return match self.polls.fetch_add(1, Ordering::SeqCst) {
                0 => json(StatusCode::OK, r#"{"status":"WAITING","sold_out":false}"#),
                _ => json(StatusCode::OK, r#"{"status":"ADMITTED"}"#),
            };
        }
        if path.contains("/seats") {
            return json(StatusCode::OK, r#"{"seats":[{"id":11},{"id":12}]}"#);
        }
        if path == "/v1/holds" {
            return match self.holds.fetch_add(1, Ordering::SeqCst) {
                0 => json(StatusCode::CONFLICT, r#"{"code":"seat_taken"}"#),
                _ => json(StatusCode::CREATED, r#"{"reservation_id":7,"status":"HELD","fence":3}"#),
            };
        }
        if path.ends_with("/confirm") {
            return match self.confirms.fetch_add(1, Ordering::SeqCst) {
                0 => json(StatusCode::SERVICE_UNAVAILABLE, r#"{"code":"store_unavailable"}"#),
                _ => json(StatusCode::OK, r#"{"id":7,"status":"CONFIRMED"}"#),
            };
        }
        if path.ends_with("/cancel") {
            return json(StatusCode::OK, r#"{"id":7,"status":"CANCELLED"}"#);
        }
        json(StatusCode::NOT_FOUND, r#"{"code":"not_found"}"#)
    }
}

/// As the engine world serves its nodes: idle connections stay open.
fn limits() -> ConnectionLimits {
    ConnectionLimits { idle_timeout_ms: None, ..ConnectionLimits::default() }
}

fn plan(node: String) -> Arc<JourneyPlan> {
    let users = Users {
        patience_s: 60.0,
        poll_interval_ms: RangeMs { min: 5.0, max: 20.0 },
        request_timeout_ms: 2_000,
        retries_max: 3,
        cancel_probability: 1.0,
        ..Users::default()
    };
    let sections = vec![SectionChoice { name: "Front".into(), popularity: 1.0, price_points: 100 }];
    Arc::new(JourneyPlan {
        seed: 7,
        nodes: vec![node],
        users,
        schedules: vec![(1, sections)],
        session_secret: b"a-session-secret-of-at-least-32-bytes".to_vec(),
    })
}

fn recorder() -> HistoryRecorder {
    HistoryRecorder::new(
        "journey",
        7,
        CheckConfig {
            hold_ttl_us: 60_000_000,
            hold_expiry_grace_us: 0,
            admission_rate_per_s: 1.0,
            admission_burst: 1,
            heal_us: 0,
            end_us: 60_000_000,
        },
    )
}

/// The calls and outcomes of a history, without times.
fn calls(recorder: HistoryRecorder) -> Vec<(OpKind, String)> {
    let history = recorder.finish(Default::default());
    history
        .operations
        .into_iter()
        .map(|operation| {
            let outcome = match operation.outcome {
                Outcome::Ok(response) => format!("ok {}", response.http_status),
                Outcome::Fail { http_status, code, .. } => format!("fail {http_status} {code}"),
                Outcome::Unknown { .. } => "unknown".to_owned(),
            };
            (operation.kind, outcome)
        })
        .collect()
}

fn simulated(script: &Script) -> (Vec<(OpKind, String)>, UserOutcomes) {
    let mut sim = turmoil::Builder::new().rng_seed(7).simulation_duration(Duration::from_secs(120)).build();
    let router = script.router();
    sim.host("node", move || {
        let router = router.clone();
        async move {
            let listener = turmoil::net::TcpListener::bind((IpAddr::V4(Ipv4Addr::UNSPECIFIED), ENGINE_PORT)).await?;
            serve_router(SimListener(listener), router, limits(), ConnectionMetrics::default(), std::future::pending())
                .await?;
            Ok(())
        }
    });
    let recorder = Rc::new(RefCell::new(recorder()));
    let outcomes = Rc::new(RefCell::new(UserOutcomes::default()));
    let fan = Rc::new(Journeys {
        transport: SimTransport {
            http: HttpClient::default(),
            recorder: Rc::clone(&recorder),
            outcomes: Rc::clone(&outcomes),
        },
        plan: plan("node".into()),
    });
    sim.client("client", async move {
        fan.journey(0).await;
        Ok(())
    });
    sim.run().expect("the simulated journey runs");
    let recorder = Rc::try_unwrap(recorder).expect("the recorder is no longer shared").into_inner();
    let outcomes = outcomes.borrow().clone();
    (calls(recorder), outcomes)
}

fn live(script: &Script) -> (Vec<(OpKind, String)>, UserOutcomes) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a loopback port");
        let address = listener.local_addr().expect("its address");
        let router = script.router();
        tokio::spawn(serve_router(listener, router, limits(), ConnectionMetrics::default(), std::future::pending()));
        let shared = Arc::new(LiveShared::new(recorder(), Instant::now()).expect("shared state"));
        let fan = Journeys {
            transport: LiveTransport::new(Arc::clone(&shared), reqwest::Client::new(), 0),
            plan: plan(format!("http://{address}")),
        };
        fan.journey(0).await;
        drop(fan);
        let shared = Arc::try_unwrap(shared).expect("the journey has ended");
        (calls(shared.recorder.into_inner()), shared.outcomes.into_inner())
    })
}

#[test]
fn both_transports_send_the_same_calls_for_the_same_answers() {
    let (simulated_script, live_script) = (Script::default(), Script::default());
    let (simulated_calls, simulated_outcomes) = simulated(&simulated_script);
    let (live_calls, live_outcomes) = live(&live_script);

    let simulated_seen = simulated_script.seen.lock().clone();
    let live_seen = live_script.seen.lock().clone();
    // The journey went the whole way: join, two polls, a seat map, a refused hold, another
    // map, a hold, an unavailable payment retried with the same key, a cancel.
    let paths: Vec<&str> = simulated_seen.iter().map(|seen| seen.1.as_str()).collect();
    assert_eq!(paths.len(), 10, "{paths:#?}");
    assert!(paths[0].ends_with("/queue") && paths[9].ends_with("/cancel"), "{paths:#?}");
    let confirms: Vec<&Seen> = simulated_seen.iter().filter(|seen| seen.1.ends_with("/confirm")).collect();
    assert_eq!(confirms.len(), 2);
    assert_eq!(confirms[0].2, confirms[1].2, "a retried payment keeps its idempotency key");

    assert_eq!(simulated_seen, live_seen, "the node saw other calls from the two transports");
    assert_eq!(simulated_calls, live_calls, "the two histories differ");
    assert_eq!(simulated_outcomes, live_outcomes);
    assert_eq!(live_outcomes.journeys_ended.get("bought-then-cancelled"), Some(&1));
}
