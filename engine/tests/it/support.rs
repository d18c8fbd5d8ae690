//! Building engines for tests: a memory store, a clock the test controls, and helpers to get
//! users admitted.

use std::sync::Arc;

use tcore_engine::clock::{Clock, ManualClock};
use tcore_engine::config::{ADMIN_TOKEN_NAME_DEFAULT, AdminToken, EngineConfig, HoldMode, TrustedProxies};
use tcore_engine::domain::{
    Account, AdmissionPolicy, Concert, FenceToken, IdempotencyDecision, OutboxEvent, Reservation, ReservationId,
    Schedule, ScheduleId, ScheduleSummary, SeatId, SeatSlot, SeatView, Section, StoredResponse, UserId, WriteGuard,
};
use tcore_engine::faults::{FaultHook, NoFaults};
use tcore_engine::sessions::{SESSION_AUDIENCE_DEFAULT, Session, SessionClaims, SessionConfig, SessionKey, sign_hs256};
use tcore_engine::store::{
    AuditEntry, HoldRequest, MemoryStore, MemoryStoreConfig, RecordDump, RecordStore, SeatFilter, StoreError,
};
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

/// What a test does to some calls of a record store it stands in front of ([`Tapped`]): wait,
/// hang, count. Every other call passes through untouched.
#[async_trait::async_trait]
pub trait RecordTap: std::fmt::Debug + Send + Sync {
    /// Before a seat is read.
    async fn before_seat(&self) {}
    /// Before a confirm reaches the store.
    async fn before_confirm(&self) {}
    /// Before an idempotency record is completed.
    async fn before_idempotency_complete(&self) {}
    /// When an idempotency lease is renewed.
    fn on_idempotency_renew(&self) {}
}

/// A record store in front of `inner`, with `tap` acting on some of its calls.
#[derive(Debug)]
pub struct Tapped<T> {
    pub inner: Arc<dyn RecordStore>,
    pub tap: T,
}

#[async_trait::async_trait]
impl<T: RecordTap> RecordStore for Tapped<T> {
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
    async fn put_schedule(&self, schedule: Schedule) -> Result<(), StoreError> {
        self.inner.put_schedule(schedule).await
    }
    async fn schedules(&self, now_ms: u64) -> Result<Vec<ScheduleSummary>, StoreError> {
        self.inner.schedules(now_ms).await
    }
    async fn schedule(&self, schedule_id: ScheduleId) -> Result<Schedule, StoreError> {
        self.inner.schedule(schedule_id).await
    }
    async fn seat_map(
        &self,
        schedule_id: ScheduleId,
        filter: SeatFilter,
        now_ms: u64,
    ) -> Result<Vec<SeatView>, StoreError> {
        self.inner.seat_map(schedule_id, filter, now_ms).await
    }
    async fn seat(
        &self,
        schedule_id: ScheduleId,
        seat_id: SeatId,
        fence: Option<FenceToken>,
    ) -> Result<SeatSlot, StoreError> {
        self.tap.before_seat().await;
        self.inner.seat(schedule_id, seat_id, fence).await
    }
    async fn create_user(&self, name: String, points: u64, now_ms: u64) -> Result<Account, StoreError> {
        self.inner.create_user(name, points, now_ms).await
    }
    async fn account(&self, user_id: UserId) -> Result<Account, StoreError> {
        self.inner.account(user_id).await
    }
    async fn existing_users(&self, first: UserId, count: u32) -> Result<Vec<UserId>, StoreError> {
        self.inner.existing_users(first, count).await
    }
    async fn top_up(&self, user_id: UserId, amount: u64, key: String, now_ms: u64) -> Result<Account, StoreError> {
        self.inner.top_up(user_id, amount, key, now_ms).await
    }
    async fn try_hold(&self, request: HoldRequest, now_ms: u64) -> Result<Reservation, StoreError> {
        self.inner.try_hold(request, now_ms).await
    }
    async fn write_hold(
        &self,
        request: HoldRequest,
        guard: WriteGuard,
        now_ms: u64,
    ) -> Result<Reservation, StoreError> {
        self.inner.write_hold(request, guard, now_ms).await
    }
    async fn confirm(
        &self,
        id: ReservationId,
        user_id: UserId,
        key: Option<String>,
        now_ms: u64,
    ) -> Result<Reservation, StoreError> {
        self.tap.before_confirm().await;
        self.inner.confirm(id, user_id, key, now_ms).await
    }
    async fn cancel(&self, id: ReservationId, user_id: UserId, now_ms: u64) -> Result<Reservation, StoreError> {
        self.inner.cancel(id, user_id, now_ms).await
    }
    async fn reservation(&self, id: ReservationId) -> Result<Reservation, StoreError> {
        self.inner.reservation(id).await
    }
    async fn expire_holds(&self, now_ms: u64, limit: u32) -> Result<u32, StoreError> {
        self.inner.expire_holds(now_ms, limit).await
    }
    async fn idempotency_begin(
        &self,
        key: String,
        fingerprint: [u8; 32],
        lease_ms: u64,
        ttl_ms: u64,
        now_ms: u64,
    ) -> Result<IdempotencyDecision, StoreError> {
        self.inner.idempotency_begin(key, fingerprint, lease_ms, ttl_ms, now_ms).await
    }
    async fn idempotency_complete(
        &self,
        key: String,
        fingerprint: [u8; 32],
        response: StoredResponse,
        ttl_ms: u64,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.tap.before_idempotency_complete().await;
        self.inner.idempotency_complete(key, fingerprint, response, ttl_ms, now_ms).await
    }
    async fn idempotency_renew(
        &self,
        key: String,
        fingerprint: [u8; 32],
        lease_ms: u64,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        self.tap.on_idempotency_renew();
        self.inner.idempotency_renew(key, fingerprint, lease_ms, now_ms).await
    }
    async fn idempotency_release(&self, key: String, fingerprint: [u8; 32]) -> Result<(), StoreError> {
        self.inner.idempotency_release(key, fingerprint).await
    }
    async fn purge_idempotency(&self, now_ms: u64, limit: u32) -> Result<u32, StoreError> {
        self.inner.purge_idempotency(now_ms, limit).await
    }
    async fn outbox_pending(&self, limit: u32) -> Result<Vec<OutboxEvent>, StoreError> {
        self.inner.outbox_pending(limit).await
    }
    async fn outbox_mark_sent(&self, ids: Vec<u64>) -> Result<(), StoreError> {
        self.inner.outbox_mark_sent(ids).await
    }
    async fn append_audit(&self, entry: AuditEntry) -> Result<(), StoreError> {
        self.inner.append_audit(entry).await
    }
    async fn audit(&self, limit: u32) -> Result<Vec<AuditEntry>, StoreError> {
        self.inner.audit(limit).await
    }
    async fn dump(&self) -> Result<RecordDump, StoreError> {
        self.inner.dump().await
    }
}
