//! Building engines for tests: a memory store, a clock the test controls, and helpers to get
//! users admitted.

use std::sync::Arc;

use tcore_engine::clock::{Clock, ManualClock};
use tcore_engine::config::{ADMIN_TOKEN_NAME_DEFAULT, AdminToken, EngineConfig, HoldMode, TrustedProxies};
use tcore_engine::domain::{AdmissionPolicy, Concert, Schedule, Section};
use tcore_engine::faults::{FaultHook, NoFaults};
use tcore_engine::sessions::{SESSION_AUDIENCE_DEFAULT, Session, SessionClaims, SessionConfig, SessionKey, sign_hs256};
use tcore_engine::store::{MemoryStore, MemoryStoreConfig};
use tcore_engine::{Engine, EngineParts};

pub const START_MS: u64 = 1_800_000_000_000;
pub const ADMIN_TOKEN: &str = "admin-secret";
pub const WEBHOOK_SECRET: &[u8] = b"the-payment-providers-webhook-key";
/// The ops agent's admin token, named [`tcore_engine::agent::ACTOR`].
pub const AGENT_TOKEN: &str = "agent-secret";

/// An engine on the memory store, with the store kept for inspection.
pub struct TestEngine {
    pub engine: Arc<Engine>,
    pub store: Arc<MemoryStore>,
}

pub fn config(hold_mode: HoldMode) -> EngineConfig {
    EngineConfig {
        hold_mode,
        allow_unsafe_hold_mode: hold_mode.is_unsafe(),
        hold_ttl_ms: 60_000,
        lock_ttl_ms: 1_000,
        admission: AdmissionPolicy { rate_per_s: 100_000.0, active_max: 1_000_000, ..AdmissionPolicy::default() },
        admin_tokens: vec![
            AdminToken { name: ADMIN_TOKEN_NAME_DEFAULT.into(), secret: ADMIN_TOKEN.into() },
            AdminToken { name: tcore_engine::agent::ACTOR.into(), secret: AGENT_TOKEN.into() },
        ],
        token_secret: b"test-secret-0123456789".to_vec(),
        sessions: SessionConfig { dev_sessions: true, ..SessionConfig::default() },
        payment_webhook_secret: Some(WEBHOOK_SECRET.to_vec()),
        accounts_per_ip_per_hour: 1_000,
        ..EngineConfig::default()
    }
}

/// Proxies that trust the peer of a `oneshot` request (which has none: `0.0.0.0`), so that
/// the request's `X-Forwarded-For` names its client.
pub fn oneshot_peer_trusted() -> TrustedProxies {
    TrustedProxies::new([std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)])
}

pub fn engine_with(config: EngineConfig, clock: Arc<dyn Clock>, faults: Arc<dyn FaultHook>) -> TestEngine {
    let store = Arc::new(MemoryStore::new(MemoryStoreConfig { seed: 7, ..MemoryStoreConfig::default() }));
    let engine = Engine::new(EngineParts { config, clock, record: store.clone(), cache: store.clone(), faults })
        .unwrap_or_else(|error| panic!("test config is valid: {error}"));
    TestEngine { engine, store }
}

pub fn manual_engine(hold_mode: HoldMode) -> (TestEngine, ManualClock) {
    let clock = ManualClock::starting_at_ms(START_MS);
    (engine_with(config(hold_mode), Arc::new(clock.clone()), Arc::new(NoFaults)), clock)
}

/// Schedule 1, on sale from `opens_at_ms`, with `seats` seats at 100 points.
pub fn schedule(opens_at_ms: u64, seats: u32) -> Schedule {
    Schedule {
        id: 1,
        concert: Concert { id: 1, name: "Test".into() },
        opens_at_ms,
        sections: vec![Section { name: "A".into(), price_points: 100, seats_count: seats }],
    }
}

/// A session for `user_id`, as the API hands the engine one it verified.
pub fn session(user_id: u64) -> Session {
    Session { user_id, expires_at_s: u64::MAX }
}

/// A signed session credential for `user_id`, as a fan sends it to an engine with the test
/// configuration's session key; it lasts until 2096, whatever clock the engine reads.
pub fn session_credential(user_id: u64) -> String {
    let SessionKey::Hs256 { secret } = SessionConfig::default().key else { unreachable!("the default key is HS256") };
    let claims = SessionClaims {
        sub: user_id.to_string(),
        aud: SESSION_AUDIENCE_DEFAULT.into(),
        iat: 0,
        exp: 4_000_000_000,
        iss: None,
    };
    sign_hs256(&secret, &claims).expect("signs")
}

/// The session of the user a queue token names (`v2.<schedule>.<user>.…`).
pub fn session_of(token: &str) -> Session {
    let user_id = token.split('.').nth(2).and_then(|id| id.parse().ok());
    session(user_id.unwrap_or_else(|| panic!("{token} is not a queue token")))
}

/// A user with `points`, joined to schedule 1; returns (user id, token).
pub async fn queued_user(engine: &Engine, name: &str, points: u64) -> (u64, String) {
    let user = engine.open_account(name.into(), points).await.expect("user");
    let joined = engine.join_queue(session(user.user_id), 1).await.expect("join");
    (user.user_id, joined.token)
}

/// Schedule 1 with one seat, and users "a" and "b" with 1,000 points each, joined and then
/// admitted `wait` later (tokio time); returns their tokens.
pub async fn two_admitted_for_one_seat(engine: &Engine, wait: std::time::Duration) -> (String, String) {
    engine.add_schedule(schedule(START_MS, 1)).await.expect("schedule");
    let (_, token_a) = queued_user(engine, "a", 1_000).await;
    let (_, token_b) = queued_user(engine, "b", 1_000).await;
    tokio::time::sleep(wait).await;
    engine.tick_admission().await.expect("tick");
    (token_a, token_b)
}
