//! Whom the engine believes, through `Router::oneshot` with the peer address a server would
//! give: which client a request is from (trusted proxies, one form per address), and who an
//! admin call is from (named tokens, a lockout of guessing addresses).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tcore_engine::api::admin_auth::{FAILURES_MAX, LOCKOUT_MS};
use tcore_engine::clock::ManualClock;
use tcore_engine::config::{EngineConfig, HoldMode, TrustedProxies};
use tcore_engine::faults::NoFaults;
use tower::ServiceExt;

use crate::support::{ADMIN_TOKEN, AGENT_TOKEN, START_MS, config, engine_with, schedule};

/// The trusted proxies of these tests.
const PROXIES: &str = "10.0.0.0/8";

struct Node {
    router: Router,
    clock: ManualClock,
}

#[derive(Debug)]
struct Reply {
    status: StatusCode,
    retry_after: Option<String>,
    body: Value,
}

impl Node {
    async fn new() -> Self {
        let clock = ManualClock::starting_at_ms(START_MS);
        let proxies = TrustedProxies::new([PROXIES.parse::<ipnet::IpNet>().expect("range")]);
        let config = EngineConfig { trusted_proxies: proxies, ..config(HoldMode::Atomic) };
        let engine = engine_with(config, Arc::new(clock.clone()), Arc::new(NoFaults)).engine;
        engine.add_schedule(schedule(START_MS, 10)).await.expect("schedule");
        Self { router: tcore_engine::app(engine), clock }
    }

    /// Sends `method uri` from the connection peer `peer` with `headers` and a JSON `body`.
    async fn send(&self, peer: &str, method: &str, uri: &str, headers: &[(&str, &str)], body: Option<Value>) -> Reply {
        let mut request = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let body = match body {
            Some(body) => {
                request = request.header("content-type", "application/json");
                Body::from(body.to_string())
            }
            None => Body::empty(),
        };
        let mut request = request.body(body).expect("request");
        let peer: SocketAddr = (peer.parse::<std::net::IpAddr>().expect("peer"), 40_000).into();
        request.extensions_mut().insert(ConnectInfo(peer));
        let response = self.router.clone().oneshot(request).await.expect("infallible");
        let status = response.status();
        let retry_after = response.headers().get("retry-after").map(|value| value.to_str().expect("ascii").to_owned());
        let bytes = response.into_body().collect().await.expect("body").to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Reply { status, retry_after, body }
    }

    /// An admin call from `peer` with `token`.
    async fn admin(&self, peer: &str, token: &str, method: &str, uri: &str, body: Option<Value>) -> Reply {
        self.send(peer, method, uri, &[("authorization", &format!("Bearer {token}"))], body).await
    }

    async fn block(&self, ip: &str) {
        let reply =
            self.admin("192.0.2.200", ADMIN_TOKEN, "POST", "/admin/v1/blocks", Some(json!({ "ip": ip, "ttl_s": 60 })));
        let reply = reply.await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    }

    /// Whether a public call from `peer`, forwarding `forwarded_for` (if any), is blocked.
    async fn is_blocked(&self, peer: &str, forwarded_for: Option<&str>) -> bool {
        let headers: Vec<(&str, &str)> = forwarded_for.map(|value| ("x-forwarded-for", value)).into_iter().collect();
        let reply = self.send(peer, "GET", "/v1/schedules", &headers, None).await;
        match reply.status {
            StatusCode::OK => false,
            StatusCode::FORBIDDEN if reply.body["code"] == "ip_blocked" => true,
            _ => panic!("unexpected answer {reply:?}"),
        }
    }
}

#[tokio::test]
async fn forwarded_for_names_the_client_only_from_a_trusted_proxy_and_from_the_right() {
    let node = Node::new().await;
    node.block("198.51.100.1").await;
    assert!(!node.is_blocked("203.0.113.5", Some("198.51.100.1")).await, "an untrusted peer is its own client");
    assert!(node.is_blocked("198.51.100.1", None).await, "the peer itself");
    assert!(node.is_blocked("10.0.0.2", Some("198.51.100.1")).await, "a trusted proxy's client");
    assert!(node.is_blocked("10.0.0.2", Some("198.51.100.1, 10.0.0.3")).await, "through two trusted proxies");
    assert!(
        !node.is_blocked("10.0.0.2", Some("198.51.100.1, 192.0.2.9")).await,
        "an address the client wrote left of its own is not believed"
    );
}

#[tokio::test]
async fn a_block_on_either_form_of_an_ipv4_address_blocks_both() {
    let node = Node::new().await;
    node.block("::ffff:127.0.0.9").await;
    node.block("127.0.0.8").await;
    for peer in ["127.0.0.9", "::ffff:127.0.0.9", "127.0.0.8", "::ffff:127.0.0.8"] {
        assert!(node.is_blocked(peer, None).await, "{peer}");
    }
    assert!(node.is_blocked("10.0.0.2", Some("::ffff:127.0.0.8")).await, "forwarded in the mapped form");
    let snapshot = node.admin("192.0.2.200", ADMIN_TOKEN, "GET", "/admin/v1/snapshot", None).await.body;
    let blocked: Vec<&str> =
        snapshot["blocks"].as_array().expect("blocks").iter().map(|b| b["ip"].as_str().expect("ip")).collect();
    assert_eq!(blocked, vec!["127.0.0.8", "127.0.0.9"], "one entry per address, in its IPv4 form");
    let lifted = node.admin("192.0.2.200", ADMIN_TOKEN, "DELETE", "/admin/v1/blocks/::ffff:127.0.0.8", None).await;
    assert_eq!(lifted.status, StatusCode::OK, "{lifted:?}");
    assert!(!node.is_blocked("127.0.0.8", None).await);
}

#[tokio::test]
async fn repeated_wrong_admin_tokens_lock_their_address_out_and_no_other() {
    let node = &Node::new().await;
    let (guesser, other) = ("203.0.113.66", "203.0.113.67");
    let snapshot = |peer: &'static str, token: &'static str| node.admin(peer, token, "GET", "/admin/v1/snapshot", None);
    for _ in 0..FAILURES_MAX {
        let reply = snapshot(guesser, "guess").await;
        assert_eq!((reply.status, reply.body["code"].as_str()), (StatusCode::FORBIDDEN, Some("admin_forbidden")));
    }
    let locked = snapshot(guesser, ADMIN_TOKEN).await;
    assert_eq!(locked.status, StatusCode::TOO_MANY_REQUESTS, "the right token too: {locked:?}");
    assert_eq!(locked.body["code"], "admin_auth_locked");
    assert_eq!(locked.retry_after.as_deref(), Some((LOCKOUT_MS / 1000).to_string().as_str()));
    assert_eq!(snapshot(other, ADMIN_TOKEN).await.status, StatusCode::OK, "another address is unaffected");
    // Behind a trusted proxy the lockout follows the client, not the proxy.
    let forwarded = |client: &'static str| {
        let auth = format!("Bearer {ADMIN_TOKEN}");
        async move {
            let headers = [("authorization", auth.as_str()), ("x-forwarded-for", client)];
            node.send("10.0.0.2", "GET", "/admin/v1/snapshot", &headers, None).await.status
        }
    };
    assert_eq!(forwarded(guesser).await, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(forwarded(other).await, StatusCode::OK);

    node.clock.advance(Duration::from_millis(LOCKOUT_MS - 1_000));
    assert_eq!(snapshot(guesser, ADMIN_TOKEN).await.retry_after.as_deref(), Some("1"));
    node.clock.advance(Duration::from_millis(1_000));
    assert_eq!(snapshot(guesser, ADMIN_TOKEN).await.status, StatusCode::OK, "the lockout ended");
}

#[tokio::test]
async fn the_audit_log_names_the_token_that_authenticated_whatever_a_header_says() {
    let node = &Node::new().await;
    let set_ttl = |token: &'static str| {
        let auth = format!("Bearer {token}");
        async move {
            let headers = [("authorization", auth.as_str()), ("x-admin-actor", "somebody-else")];
            let reply =
                node.send("192.0.2.200", "PUT", "/admin/v1/hold-ttl", &headers, Some(json!({ "ttl_s": 30 }))).await;
            assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        }
    };
    set_ttl(ADMIN_TOKEN).await;
    set_ttl(AGENT_TOKEN).await;
    let audit = node.admin("192.0.2.200", ADMIN_TOKEN, "GET", "/admin/v1/audit", None).await.body;
    let actors: Vec<&str> =
        audit.as_array().expect("entries").iter().map(|entry| entry["actor"].as_str().expect("actor")).collect();
    assert_eq!(actors, vec!["admin", tcore_engine::agent::ACTOR]);
}
