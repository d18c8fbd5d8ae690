//! The engine's use cases, independent of HTTP: join the line, hold, confirm, cancel, charge
//! points, the admin tools, and the background work (admission ticks, hold expiry).
//!
//! **Invariant:** every call that acts for a user takes the user from a verified [`Session`],
//! never from a body or a path; every booking call checks a signed queue token first, and the
//! token must name the session's user; a hold is taken only through the configured
//! [`HoldMode`]; correctness settings never change after start.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::clock::Clock;
use crate::config::{ConfigError, EngineConfig, HoldMode, RateLimits, RuntimeSettings, bounds, check_bound};
use crate::domain::{
    Account, AdmissionPolicy, Concert, IdempotencyDecision, QueueStatus, RateLimit, Reservation, ReservationId,
    Schedule, ScheduleId, ScheduleSummary, SeatId, SeatStatus, SeatView, Section, StoredResponse, TokenStatus,
    TransitionError, UserId, WriteGuard,
};
use crate::faults::{FaultContext, FaultHook, FaultPoint};
use crate::guards::{Block, Guards, LimitScope, Rejection, UserBlock, rate_limited};
use crate::known_users::{self, KnownUsers};
use crate::recent_tokens::RecentTokens;
use crate::sessions::{Session, Sessions};
use crate::store::{AdmitReport, AuditEntry, CacheStore, HoldRequest, RecordStore, SeatFilter, StoreError};
use crate::telemetry::{Telemetry, TrafficSnapshot};
use crate::tokens::{QueueClaim, TokenError, TokenSigner};
use crate::waiters::LineSignal;

/// Why the engine refused or failed a call.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    #[error("{entity} {id} not found")]
    NotFound { entity: &'static str, id: u64 },
    #[error("this call needs a queue token: `Authorization: Bearer <token>`")]
    TokenMissing,
    #[error(transparent)]
    TokenInvalid(#[from] TokenError),
    #[error("the queue token is for schedule {token_schedule}, not {requested}")]
    TokenWrongSchedule { token_schedule: ScheduleId, requested: ScheduleId },
    #[error("the queue token is {status:?}")]
    TokenNotAdmitted { status: TokenStatus },
    #[error("the waiting line lost this place (its store lost its memory); join again")]
    QueuePlaceLost,
    #[error("the reservation belongs to another user")]
    NotOwner,
    #[error("the queue token belongs to another user")]
    TokenNotYours,
    #[error("this account is not the session's")]
    NotYourAccount,
    #[error("the seat is taken")]
    SeatTaken,
    #[error("the seat is being taken by someone else right now")]
    SeatLocked,
    #[error(transparent)]
    Rejected(TransitionError),
    #[error("{reason}")]
    Invalid { reason: String },
    #[error(transparent)]
    OutOfBounds(#[from] ConfigError),
    #[error("a store is unavailable: {reason}")]
    StoreUnavailable { reason: String },
}

impl From<StoreError> for EngineError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound { entity, id } => EngineError::NotFound { entity, id },
            StoreError::Rejected(TransitionError::SeatUnavailable) => EngineError::SeatTaken,
            StoreError::Rejected(TransitionError::TokenNotAdmitted { status }) => {
                EngineError::TokenNotAdmitted { status }
            }
            StoreError::Rejected(rejection) => EngineError::Rejected(rejection),
            StoreError::NotOwner => EngineError::NotOwner,
            StoreError::Unavailable { reason } => EngineError::StoreUnavailable { reason },
            StoreError::Invalid { reason } => EngineError::Invalid { reason },
        }
    }
}

/// The answer to joining a line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Joined {
    pub token: String,
    pub position: u64,
    pub eta_s: u64,
    /// Every seat of the schedule is sold (as of the last sweep): waiting is pointless.
    pub sold_out: bool,
}

/// The answer to a queue status call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct QueuePosition {
    pub status: TokenStatus,
    pub position: u64,
    pub eta_s: u64,
    /// Every seat of the schedule is sold (as of the last sweep): waiting is pointless.
    pub sold_out: bool,
}

/// An admission change asked for by an admin.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdmissionChange {
    #[schema(minimum = 0.1, maximum = 100_000.0)]
    pub rate_per_s: f64,
    #[schema(minimum = 1, maximum = 1_000_000)]
    pub active_max: u32,
    #[serde(default)]
    pub paused: bool,
}

/// A line's state in the admin snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct QueueSnapshot {
    pub schedule_id: ScheduleId,
    pub waiting: u64,
    pub active: u32,
    pub admitted_total: u64,
    pub admission: AdmissionPolicy,
}

/// What the ops agent reads: traffic, lines, settings and blocks of one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Snapshot {
    pub node: String,
    pub at_ms: u64,
    pub hold_mode: HoldMode,
    pub traffic: TrafficSnapshot,
    pub queues: Vec<QueueSnapshot>,
    pub hold_ttl_s: u64,
    pub rate_limits: RateLimits,
    pub blocks: Vec<Block>,
    #[serde(default)]
    pub user_blocks: Vec<UserBlock>,
}

/// Which token statuses a call accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenNeed {
    /// Holding: the user must be admitted right now, as the store says.
    Admitted,
    /// Browsing, a read: admitted, as the store says or as this node read it moments ago
    /// (`recent_tokens`).
    Browse,
    /// Paying for, reading or cancelling one's own hold: admitted, or already used to buy, as
    /// the store says or as this node read it moments ago (an admission read then and not yet
    /// expired can only have been used since, which this accepts too).
    AdmittedOrUsed,
}

/// What an engine node is built from.
#[derive(Debug)]
pub struct EngineParts {
    pub config: EngineConfig,
    pub clock: Arc<dyn Clock>,
    pub record: Arc<dyn RecordStore>,
    pub cache: Arc<dyn CacheStore>,
    pub faults: Arc<dyn FaultHook>,
}

/// One engine node.
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    clock: Arc<dyn Clock>,
    record: Arc<dyn RecordStore>,
    cache: Arc<dyn CacheStore>,
    faults: Arc<dyn FaultHook>,
    signer: TokenSigner,
    /// How many queue tokens this node issued: each token's nonce comes from this count.
    tokens_issued: AtomicU64,
    sessions: Sessions,
    guards: Guards,
    telemetry: Telemetry,
    settings: RwLock<RuntimeSettings>,
    lines: Mutex<BTreeMap<ScheduleId, LineWatch>>,
    /// The token statuses this node read last: the first long poll after a join, a seat map
    /// and the calls on one's own hold once admitted start from them instead of asking the
    /// cache store again (a hold never does).
    recent_tokens: RecentTokens,
    /// The accounts this node saw the record store list: a join by one of them reads no
    /// account.
    known_users: KnownUsers,
    /// The reservations this node counted as confirmed in the latest millisecond it did:
    /// see [`Engine::first_confirmation`].
    confirmed_this_ms: Mutex<(u64, Vec<ReservationId>)>,
    /// What is on sale, as of the last sweep: admission ticks and sold-out answers read it
    /// instead of scanning every seat.
    on_sale: Mutex<BTreeMap<ScheduleId, ScheduleSummary>>,
    /// Until when (monotonic µs) a fault point stops this node. A pause stands for the whole
    /// process stopping (a long garbage collection, a VM stall): lock watchdogs renew nothing
    /// meanwhile, so a holder paused past its lock's TTL loses the lock as it would there.
    paused_until_us: AtomicU64,
    /// When (engine ms) the next purge of expired idempotency records is due; 0 before the
    /// first sweep.
    idempotency_purge_due_ms: AtomicU64,
}

#[derive(Debug, Default)]
struct LineWatch {
    signal: Arc<LineSignal>,
    last_report: Option<AdmitReport>,
}

/// The longest account name.
pub const ACCOUNT_NAME_CHARS_MAX: usize = 100;

/// The most a long poll on queue status waits.
pub const QUEUE_WAIT_MAX: Duration = Duration::from_secs(30);

/// The most expired idempotency records one sweep purges; more wait for the next sweep.
const IDEMPOTENCY_PURGE_MAX: u32 = 10_000;
/// How often the sweep purges expired idempotency records. Records live a day by default and
/// an expired one already counts as never seen, so purging is about space, not meaning; seldom
/// purges keep the store calls of every sweep, and so a simulated run, as they were.
pub const IDEMPOTENCY_PURGE_INTERVAL_MS: u64 = 10 * 60 * 1_000;

impl Engine {
    /// Builds a node; refuses an invalid or unsafe configuration.
    pub fn new(parts: EngineParts) -> Result<Arc<Self>, ConfigError> {
        parts.config.validate()?;
        let guards =
            Guards::new(parts.config.rate_limits, parts.config.accounts_per_ip_per_hour, Arc::clone(&parts.clock));
        Ok(Arc::new(Self {
            signer: TokenSigner::new(&parts.config.token_secret),
            tokens_issued: AtomicU64::new(0),
            sessions: Sessions::new(&parts.config.sessions)?,
            telemetry: Telemetry::new(&parts.config.node),
            settings: RwLock::new(parts.config.runtime_settings()),
            lines: Mutex::new(BTreeMap::new()),
            recent_tokens: RecentTokens::default(),
            known_users: KnownUsers::default(),
            confirmed_this_ms: Mutex::new((0, Vec::new())),
            on_sale: Mutex::new(BTreeMap::new()),
            paused_until_us: AtomicU64::new(0),
            idempotency_purge_due_ms: AtomicU64::new(0),
            guards,
            config: parts.config,
            clock: parts.clock,
            record: parts.record,
            cache: parts.cache,
            faults: parts.faults,
        }))
    }

    /// The node's fixed configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The node's clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The node's session verifier.
    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// The session `credential` proves now, on this node's clock.
    pub fn verify_session(&self, credential: &str) -> Result<Session, crate::sessions::SessionError> {
        self.sessions.verify(credential, self.now_ms())
    }

    /// The node's guards.
    pub fn guards(&self) -> &Guards {
        &self.guards
    }

    /// The node's measurements.
    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    /// How many verified sessions the node remembers (at most
    /// [`VERIFIED_SESSIONS_MAX`](crate::sessions::VERIFIED_SESSIONS_MAX)).
    pub fn sessions_remembered(&self) -> usize {
        self.sessions.remembered()
    }

    pub(crate) fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, EngineError> {
        let start_us = self.clock.monotonic_us();
        let result = call.await;
        let latency_us = self.clock.monotonic_us().saturating_sub(start_us);
        self.telemetry.record_store_call(op, latency_us, self.now_ms());
        Ok(result?)
    }

    /// Runs `call` on the waiting line of `schedule_id`. A cache store that lost its memory (a
    /// Redis restarted empty, a failover to a replica that lagged) answers that the line does
    /// not exist although the record store has the schedule: the line is then created again
    /// from the record store, empty, and `call` runs once more. The record store stays the
    /// source of truth; what the old line knew of fans (places, admissions) is gone, and a token
    /// it issued gets [`EngineError::QueuePlaceLost`] where a place or an admission is needed.
    async fn on_line<T, F, Fut>(&self, op: &'static str, schedule_id: ScheduleId, call: F) -> Result<T, EngineError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        match self.timed(op, call()).await {
            Err(EngineError::NotFound { entity: "schedule", .. }) if self.recreate_line(schedule_id).await? => {
                self.timed(op, call()).await
            }
            other => other,
        }
    }

    /// Creates the line of `schedule_id` again if the record store has the schedule; whether it
    /// did. Several nodes may do it at once: creating a line that exists changes nothing.
    async fn recreate_line(&self, schedule_id: ScheduleId) -> Result<bool, EngineError> {
        let schedule = match self.timed("schedule", self.record.schedule(schedule_id)).await {
            Ok(schedule) => schedule,
            Err(EngineError::NotFound { .. }) => return Ok(false),
            Err(error) => return Err(error),
        };
        let (order, admission) = (self.config.queue_order, self.config.admission);
        self.timed("create_line", self.cache.create_line(schedule_id, schedule.opens_at_ms, order, admission)).await?;
        tracing::warn!(schedule_id, "the cache store had lost this waiting line; it was created again, empty");
        Ok(true)
    }

    /// Admits or turns away a public request from `ip` by the user of its verified session
    /// (if any): the blocklists, then the rate limits, this node's own or, with
    /// `rate_limits_shared`, the counters every node keeps in the cache store. Only verified
    /// users get a limiter entry of their own, so forged credentials cannot grow the limiter.
    /// A cache store that cannot answer lets the request through (the booking calls behind it
    /// need that store anyway and answer 503).
    pub async fn admit_request(&self, ip: IpAddr, user: Option<UserId>) -> Result<(), Rejection> {
        if !self.config.rate_limits_shared {
            return self.guards.check(ip, user);
        }
        self.guards.check_blocked(ip, user)?;
        let limits = self.guards.limits();
        let per_ip = RateLimit { per_s: limits.per_ip_per_s, burst: limits.burst };
        self.take_shared_rate(LimitScope::Ip, format!("ip:{ip}"), per_ip).await?;
        if let Some(user) = user {
            let per_user = RateLimit { per_s: limits.per_token_per_s, burst: limits.burst };
            self.take_shared_rate(LimitScope::User, format!("user:{user}"), per_user).await?;
        }
        Ok(())
    }

    async fn take_shared_rate(&self, scope: LimitScope, key: String, limit: RateLimit) -> Result<(), Rejection> {
        match self.timed("take_rate", self.cache.take_rate(key, limit, self.now_ms())).await {
            Ok(None) => Ok(()),
            Ok(Some(wait_ms)) => Err(rate_limited(scope, Duration::from_millis(wait_ms))),
            Err(error) => {
                tracing::warn!(%error, "shared rate limit unavailable; the request passes");
                Ok(())
            }
        }
    }

    async fn fault_point(&self, point: FaultPoint, context: FaultContext) {
        if let Some(pause) = self.faults.pause_at(point, &context) {
            tracing::warn!(point = point.name(), pause_ms = pause.as_millis() as u64, "fault point: pausing");
            let until_us = self.clock.monotonic_us().saturating_add(pause.as_micros() as u64);
            self.paused_until_us.fetch_max(until_us, Ordering::Relaxed);
            tokio::time::sleep(pause).await;
        }
    }

    /// Answers whether both stores can be reached.
    pub async fn ready(&self) -> Result<(), EngineError> {
        self.timed("ping", self.record.ping()).await?;
        self.timed("ping", self.cache.ping()).await
    }

    /// Puts a schedule on sale and opens its waiting line.
    pub async fn add_schedule(&self, schedule: Schedule) -> Result<(), EngineError> {
        let (id, opens_at_ms) = (schedule.id, schedule.opens_at_ms);
        self.record.put_schedule(schedule).await?;
        self.cache.create_line(id, opens_at_ms, self.config.queue_order, self.config.admission).await?;
        Ok(())
    }

    /// Loads a demo concert with `seats` seats in three sections, on sale from now.
    pub async fn load_demo(&self, seats: u32) -> Result<(), EngineError> {
        let front = seats / 5;
        let middle = seats * 2 / 5;
        let back = seats - front - middle;
        let sections = [("Floor", 300, front), ("Lower", 200, middle), ("Upper", 100, back)]
            .into_iter()
            .filter(|(_, _, count)| *count > 0)
            .map(|(name, price_points, seats_count)| Section { name: name.into(), price_points, seats_count })
            .collect();
        self.add_schedule(Schedule {
            id: 1,
            concert: Concert { id: 1, name: "Demo Concert".into() },
            opens_at_ms: self.now_ms(),
            sections,
        })
        .await
    }

    /// What is on sale.
    pub async fn schedules(&self) -> Result<Vec<ScheduleSummary>, EngineError> {
        self.timed("schedules", self.record.schedules(self.now_ms())).await
    }

    /// Reads what is on sale and keeps it for admission ticks and sold-out answers.
    async fn refresh_on_sale(&self) -> Result<Vec<ScheduleSummary>, EngineError> {
        let summaries = self.schedules().await?;
        let sold_out = |sale: &ScheduleSummary| sale.seats_total > 0 && sale.seats_sold >= sale.seats_total;
        let newly_sold_out: Vec<ScheduleId> = {
            let mut on_sale = self.on_sale.lock();
            let newly = summaries
                .iter()
                .filter(|summary| sold_out(summary) && !on_sale.get(&summary.id).is_some_and(sold_out))
                .map(|summary| summary.id)
                .collect();
            *on_sale = summaries.iter().map(|summary| (summary.id, summary.clone())).collect();
            newly
        };
        for schedule_id in newly_sold_out {
            // Those still waiting learn at once that there is nothing left to wait for.
            self.line_signal(schedule_id).wake_all();
        }
        Ok(summaries)
    }

    /// Whether every seat of the schedule is sold, as of the last sweep.
    fn sold_out(&self, schedule_id: ScheduleId) -> bool {
        self.on_sale
            .lock()
            .get(&schedule_id)
            .is_some_and(|sale| sale.seats_total > 0 && sale.seats_sold >= sale.seats_total)
    }

    fn position(&self, status: QueueStatus, schedule_id: ScheduleId) -> QueuePosition {
        let sold_out = self.sold_out(schedule_id);
        QueuePosition { status: status.status, position: status.position, eta_s: status.eta_s, sold_out }
    }

    /// Opens an account with no points.
    pub async fn create_user(&self, name: String) -> Result<Account, EngineError> {
        self.open_account(name, 0).await
    }

    /// Opens an account with a starting balance: for operators loading users (the demo, the
    /// testbed), never reachable from the public API.
    pub async fn open_account(&self, name: String, points: u64) -> Result<Account, EngineError> {
        let length = name.chars().count();
        if length == 0 || length > ACCOUNT_NAME_CHARS_MAX || name.chars().any(char::is_control) {
            return Err(EngineError::Invalid {
                reason: format!("name must have 1 to {ACCOUNT_NAME_CHARS_MAX} characters, none a control character"),
            });
        }
        self.timed("create_user", self.record.create_user(name, points, self.now_ms())).await
    }

    /// A session for an existing user, issued without proof of identity: dev mode only.
    pub async fn dev_session(&self, user_id: UserId) -> Result<(String, Session), EngineError> {
        if !self.config.sessions.dev_sessions {
            return Err(EngineError::NotFound { entity: "route", id: 0 });
        }
        self.check_user_exists(user_id).await?;
        self.sessions
            .issue(user_id, self.now_ms())
            .ok_or_else(|| EngineError::Invalid { reason: "this engine verifies sessions only".into() })
    }

    /// Reads the session user's own account.
    pub async fn user(&self, session: Session, user_id: UserId) -> Result<Account, EngineError> {
        if user_id != session.user_id {
            return Err(EngineError::NotYourAccount);
        }
        self.timed("account", self.record.account(user_id)).await
    }

    /// Adds points to an account, once per idempotency key: the admin tool and the payment
    /// webhook, both audited as `actor`.
    pub async fn top_up(
        &self,
        actor: &str,
        user_id: UserId,
        amount: u64,
        idempotency_key: String,
    ) -> Result<Account, EngineError> {
        let requested = serde_json::json!({ "user_id": user_id, "amount": amount, "key": idempotency_key });
        let mut topped_up = None;
        self.audited(actor, "top_up", format!("user/{user_id}"), &requested, async {
            check_bound("amount", amount, &bounds::TOP_UP_POINTS)?;
            let before = self.timed("account", self.record.account(user_id)).await?;
            let after =
                self.timed("top_up", self.record.top_up(user_id, amount, idempotency_key, self.now_ms())).await?;
            let change =
                (serde_json::json!({ "points": before.balance }), serde_json::json!({ "points": after.balance }));
            topped_up = Some(after);
            Ok(change)
        })
        .await?;
        topped_up.ok_or_else(|| EngineError::Invalid { reason: "the top-up was not applied".into() })
    }

    /// Joins a schedule's line as the session's user; joining again returns the same place.
    pub async fn join_queue(&self, session: Session, schedule_id: ScheduleId) -> Result<Joined, EngineError> {
        let user_id = session.user_id;
        self.check_user_exists(user_id).await?;
        let status = self.on_line("join", schedule_id, || self.cache.join(schedule_id, user_id, self.now_ms())).await?;
        self.recent_tokens.joined(schedule_id, status, self.clock.monotonic_us(), self.now_ms());
        let nonce = self.signer.nonce(&self.config.node, self.tokens_issued.fetch_add(1, Ordering::Relaxed));
        let token = self.signer.sign(QueueClaim { schedule_id, user_id, seq: status.seq, nonce });
        Ok(Joined { token, position: status.position, eta_s: status.eta_s, sold_out: self.sold_out(schedule_id) })
    }

    /// Refuses a user without an account. A user this node saw listed needs no store call;
    /// otherwise the node reads which accounts exist around the user's id, and keeps the answer
    /// (see [`KnownUsers`]).
    async fn check_user_exists(&self, user_id: UserId) -> Result<(), EngineError> {
        if self.known_users.contains(user_id) {
            return Ok(());
        }
        let first = KnownUsers::block_start(user_id);
        let existing = self.timed("existing_users", self.record.existing_users(first, known_users::BLOCK_IDS)).await?;
        self.known_users.learn(first, &existing);
        // The store lists the ids in order.
        if existing.binary_search(&user_id).is_err() {
            return Err(EngineError::NotFound { entity: "user", id: user_id });
        }
        Ok(())
    }

    /// Where a token stands; with `wait`, answers when it stops waiting or when `wait` ends.
    ///
    /// The line is read once at the start, which also proves the holder is still there (the
    /// first poll right after a join on this node starts from the join's answer instead). A long
    /// poll reads it again only when the head of the line has passed this place (the token was
    /// admitted, skipped, or moved by the shuffle at the opening); when it is woken because the
    /// schedule sold out before the head reached it, or when `wait` ends, it answers from what
    /// it read and what this node saw of the head since, without another store call.
    pub async fn queue_status(
        &self,
        session: Session,
        token: &str,
        wait: Duration,
    ) -> Result<QueuePosition, EngineError> {
        let claim = self.verify_token(session, token)?;
        let joined = self.recent_tokens.take_joined(claim.schedule_id, claim.seq, self.clock.monotonic_us());
        let (mut status, mut read_at_ms) = match joined {
            Some(reading) if !wait.is_zero() => (reading.status, reading.read_at_ms),
            _ => self.read_queue_status(claim).await?,
        };
        if status.status != TokenStatus::Waiting || wait.is_zero() || self.position(status, claim.schedule_id).sold_out
        {
            return Ok(self.position(status, claim.schedule_id));
        }
        let signal = self.line_signal(claim.schedule_id);
        let deadline = tokio::time::Instant::now() + wait.min(QUEUE_WAIT_MAX);
        loop {
            let mut registration = signal.register(status.order_index);
            // `biased`: tokio otherwise polls branches in random order, which a simulated
            // run could not replay.
            let woken = tokio::select! {
                biased;
                () = registration.woken() => true,
                () = tokio::time::sleep_until(deadline) => false,
            };
            drop(registration);
            let order_index = status.order_index;
            let reached = signal.head() > order_index;
            if !reached {
                // The deadline, or a sale that ended before the head came here: still waiting.
                let moved_on = status.moved_on(signal.head(), self.now_ms().saturating_sub(read_at_ms));
                let position = self.position(moved_on, claim.schedule_id);
                if !woken || position.sold_out {
                    return Ok(position);
                }
            }
            (status, read_at_ms) = self.read_queue_status(claim).await?;
            let reached_but_waiting = status.order_index == order_index && signal.head() > order_index;
            if status.status != TokenStatus::Waiting
                || reached_but_waiting
                || self.position(status, claim.schedule_id).sold_out
            {
                return Ok(self.position(status, claim.schedule_id));
            }
        }
    }

    /// Reads a token's status from the line (which also refreshes when its holder was last
    /// seen), and keeps it for the calls that may reuse it; returns it with when it was read.
    async fn read_queue_status(&self, claim: QueueClaim) -> Result<(QueueStatus, u64), EngineError> {
        let read_at_ms = self.now_ms();
        let read = || self.cache.queue_status(claim.schedule_id, claim.seq, read_at_ms);
        let status = match self.on_line("queue_status", claim.schedule_id, read).await {
            Err(EngineError::NotFound { entity: "queue token", .. }) => return Err(EngineError::QueuePlaceLost),
            other => other?,
        };
        // A token this engine signed names the user of its place; another user there means the
        // line was lost and created again, and its numbers handed out anew.
        if status.user_id != claim.user_id {
            return Err(EngineError::QueuePlaceLost);
        }
        self.recent_tokens.read(claim.schedule_id, status, self.clock.monotonic_us(), read_at_ms);
        Ok((status, read_at_ms))
    }

    fn line_signal(&self, schedule_id: ScheduleId) -> Arc<LineSignal> {
        let mut lines = self.lines.lock();
        Arc::clone(&lines.entry(schedule_id).or_default().signal)
    }

    /// The claim of `token` if this engine signed it for the session's user.
    fn verify_token(&self, session: Session, token: &str) -> Result<QueueClaim, EngineError> {
        let claim = self.signer.verify(token)?;
        if claim.user_id != session.user_id {
            return Err(EngineError::TokenNotYours);
        }
        Ok(claim)
    }

    async fn authorize(
        &self,
        session: Session,
        token: Option<&str>,
        need: TokenNeed,
    ) -> Result<QueueClaim, EngineError> {
        let claim = self.verify_token(session, token.ok_or(EngineError::TokenMissing)?)?;
        let recent = match need {
            TokenNeed::Browse | TokenNeed::AdmittedOrUsed => {
                self.recent_tokens.admitted(claim.schedule_id, claim.seq, self.clock.monotonic_us(), self.now_ms())
            }
            TokenNeed::Admitted => None,
        };
        let status = match recent {
            Some(status) if status.user_id == claim.user_id => Ok(status),
            Some(_) => Err(EngineError::QueuePlaceLost),
            None => self.read_queue_status(claim).await.map(|(status, _)| status),
        };
        let status = match status {
            Ok(status) => status,
            // A fan with a hold pays for, reads or cancels it as its owner, which the record
            // store judges: a line that lost its memory keeps no one from their own hold.
            Err(EngineError::QueuePlaceLost) if need == TokenNeed::AdmittedOrUsed => return Ok(claim),
            Err(error) => return Err(error),
        };
        match (status.status, need) {
            (TokenStatus::Admitted, _) | (TokenStatus::Used, TokenNeed::AdmittedOrUsed) => Ok(claim),
            (status, _) => Err(EngineError::TokenNotAdmitted { status }),
        }
    }

    fn check_schedule(claim: QueueClaim, schedule_id: ScheduleId) -> Result<(), EngineError> {
        if claim.schedule_id == schedule_id {
            Ok(())
        } else {
            Err(EngineError::TokenWrongSchedule { token_schedule: claim.schedule_id, requested: schedule_id })
        }
    }

    /// The seat map, for an admitted user.
    pub async fn seat_map(
        &self,
        session: Session,
        token: Option<&str>,
        schedule_id: ScheduleId,
        filter: SeatFilter,
    ) -> Result<Vec<SeatView>, EngineError> {
        let claim = self.authorize(session, token, TokenNeed::Browse).await?;
        Self::check_schedule(claim, schedule_id)?;
        self.timed("seat_map", self.record.seat_map(schedule_id, filter, self.now_ms())).await
    }

    /// Takes a seat for an admitted user, the way the configured hold mode says.
    pub async fn hold(
        &self,
        session: Session,
        token: Option<&str>,
        schedule_id: ScheduleId,
        seat_id: SeatId,
    ) -> Result<Reservation, EngineError> {
        let claim = self.authorize(session, token, TokenNeed::Admitted).await?;
        Self::check_schedule(claim, schedule_id)?;
        let settings = *self.settings.read();
        let request = HoldRequest {
            schedule_id,
            seat_id,
            user_id: claim.user_id,
            hold_ttl_ms: settings.hold_ttl_ms,
            node: self.config.node.clone(),
            seats_per_user_max: settings.seats_per_user_max,
        };
        let reservation = match self.config.hold_mode {
            HoldMode::Atomic => self.timed("try_hold", self.record.try_hold(request, self.now_ms())).await?,
            HoldMode::FencedLock => self.hold_under_lock(request, WriteGuard::Fenced).await?,
            HoldMode::UnfencedLock => self.hold_under_lock(request, WriteGuard::Unfenced).await?,
        };
        self.telemetry.record_hold(self.now_ms());
        Ok(reservation)
    }

    /// Lock, read, check, write, unlock: the lock hold modes. Whether the write is fenced is
    /// the whole difference between safe and unsafe.
    async fn hold_under_lock(
        &self,
        request: HoldRequest,
        guard: fn(crate::domain::FenceToken) -> WriteGuard,
    ) -> Result<Reservation, EngineError> {
        let key = format!("seat:{}:{}", request.schedule_id, request.seat_id);
        let grant = self
            .timed("acquire_lock", self.cache.acquire_lock(key.clone(), self.config.lock_ttl_ms, self.now_ms()))
            .await?
            .ok_or(EngineError::SeatLocked)?;
        let (schedule_id, seat_id) = (request.schedule_id, request.seat_id);
        let context = |now_ms| FaultContext {
            now_ms,
            schedule_id,
            seat_id: Some(seat_id),
            lock_expires_at_ms: Some(grant.expires_at_ms),
        };
        let written = async {
            self.fault_point(FaultPoint::HoldAfterLock, context(self.now_ms())).await;
            let write_guard = guard(grant.fence);
            let read_fence = match write_guard {
                WriteGuard::Fenced(fence) => Some(fence),
                WriteGuard::Unfenced(_) => None,
            };
            let slot = self.timed("seat", self.record.seat(request.schedule_id, request.seat_id, read_fence)).await?;
            if slot.status(self.now_ms()) != SeatStatus::Available {
                return Err(EngineError::SeatTaken);
            }
            self.fault_point(FaultPoint::HoldAfterCheck, context(self.now_ms())).await;
            self.timed("write_hold", self.record.write_hold(request, write_guard, self.now_ms())).await
        };
        let written = tokio::select! {
            biased;
            written = written => written,
            never = self.lock_watchdog(&key, grant.fence) => match never {},
        };
        if let Err(error) = self.timed("release_lock", self.cache.release_lock(key, grant.fence)).await {
            tracing::warn!(%error, "lock release failed; it ends with its TTL");
        }
        written
    }

    /// Keeps the lock on `key` while its holder works: renews it every third of its TTL, so a
    /// slow store call does not lose it. Renews nothing while the node is paused, and gives up
    /// for good once the lock is lost. Never completes: the holder's work ends it.
    async fn lock_watchdog(&self, key: &str, fence: crate::domain::FenceToken) -> std::convert::Infallible {
        let ttl_ms = self.config.lock_ttl_ms;
        let period = Duration::from_millis((ttl_ms / 3).max(1));
        loop {
            tokio::time::sleep(period).await;
            if self.paused_until_us.load(Ordering::Relaxed) > self.clock.monotonic_us() {
                continue;
            }
            match self.timed("renew_lock", self.cache.renew_lock(key.to_owned(), fence, ttl_ms, self.now_ms())).await {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(error) => tracing::warn!(%error, "lock renewal failed; trying again"),
            }
        }
        tracing::warn!(key, "lock lost before its holder finished; the holder's write carries the fence");
        std::future::pending().await
    }

    async fn owned_reservation(
        &self,
        claim: QueueClaim,
        reservation_id: ReservationId,
    ) -> Result<Reservation, EngineError> {
        let reservation = self.timed("reservation", self.record.reservation(reservation_id)).await?;
        if reservation.user_id != claim.user_id {
            return Err(EngineError::NotOwner);
        }
        Ok(reservation)
    }

    /// Pays for a hold with points and confirms it.
    pub async fn confirm(
        &self,
        session: Session,
        token: Option<&str>,
        reservation_id: ReservationId,
        idempotency_key: Option<String>,
    ) -> Result<Reservation, EngineError> {
        let claim = self.authorize(session, token, TokenNeed::AdmittedOrUsed).await?;
        // Only a hook that may pause here needs the seat in its context, which costs a read;
        // the confirm itself checks that the reservation is this user's.
        if self.faults.watches(FaultPoint::ConfirmBeforeCommit) {
            let before = self.owned_reservation(claim, reservation_id).await?;
            let context = FaultContext {
                now_ms: self.now_ms(),
                schedule_id: before.schedule_id,
                seat_id: Some(before.seat_id),
                lock_expires_at_ms: None,
            };
            self.fault_point(FaultPoint::ConfirmBeforeCommit, context).await;
        }
        let now_ms = self.now_ms();
        let confirmed =
            self.timed("confirm", self.record.confirm(reservation_id, claim.user_id, idempotency_key, now_ms)).await?;
        if self.first_confirmation(&confirmed, now_ms) {
            self.telemetry.record_confirmation(now_ms);
        }
        self.recent_tokens.forget(claim.schedule_id, claim.seq);
        match self.timed("mark_used", self.cache.mark_used(claim.schedule_id, claim.seq, self.now_ms())).await {
            Ok(()) | Err(EngineError::TokenNotAdmitted { .. }) => {}
            Err(error) => tracing::warn!(%error, "could not mark the queue token used; it ends with its TTL"),
        }
        Ok(confirmed)
    }

    /// Whether `confirmed`, as a confirm given `now_ms` answered, was confirmed by that call. A
    /// store dates a confirmation with the time it is given, so one dated earlier was there
    /// before; one dated this very millisecond is new unless this node already counted it.
    fn first_confirmation(&self, confirmed: &Reservation, now_ms: u64) -> bool {
        if confirmed.confirmed_at_ms != Some(now_ms) {
            return false;
        }
        let mut counted = self.confirmed_this_ms.lock();
        if counted.0 != now_ms {
            *counted = (now_ms, Vec::new());
        }
        if counted.1.contains(&confirmed.id) {
            return false;
        }
        counted.1.push(confirmed.id);
        true
    }

    /// Cancels one's hold, or one's confirmed reservation with a refund.
    pub async fn cancel(
        &self,
        session: Session,
        token: Option<&str>,
        reservation_id: ReservationId,
    ) -> Result<Reservation, EngineError> {
        let claim = self.authorize(session, token, TokenNeed::AdmittedOrUsed).await?;
        self.owned_reservation(claim, reservation_id).await?;
        self.timed("cancel", self.record.cancel(reservation_id, claim.user_id, self.now_ms())).await
    }

    /// Reads one's reservation.
    pub async fn reservation(
        &self,
        session: Session,
        token: Option<&str>,
        reservation_id: ReservationId,
    ) -> Result<Reservation, EngineError> {
        let claim = self.authorize(session, token, TokenNeed::AdmittedOrUsed).await?;
        self.owned_reservation(claim, reservation_id).await
    }

    /// Moves every known line forward, and wakes the long polls of those who were reached.
    pub async fn tick_admission(&self) -> Result<(), EngineError> {
        let mut schedule_ids: Vec<ScheduleId> = self.on_sale.lock().keys().copied().collect();
        if schedule_ids.is_empty() {
            schedule_ids = self.refresh_on_sale().await?.into_iter().map(|summary| summary.id).collect();
        }
        for schedule_id in schedule_ids {
            let report = self.on_line("admit", schedule_id, || self.cache.admit(schedule_id, self.now_ms())).await?;
            self.telemetry.set_queue(schedule_id, report.waiting, report.active, report.admitted_total);
            let mut lines = self.lines.lock();
            let line = lines.entry(schedule_id).or_default();
            line.last_report = Some(report);
            line.signal.advance(report.head_order_index);
        }
        Ok(())
    }

    /// Expires holds past their time, purges expired idempotency records and forgets stale
    /// guard state.
    pub async fn sweep(&self) -> Result<u32, EngineError> {
        self.guards.sweep();
        self.purge_idempotency_when_due().await;
        let expired =
            self.timed("expire_holds", self.record.expire_holds(self.now_ms(), self.config.sweep_batch_max)).await?;
        let held: u64 =
            self.refresh_on_sale().await?.iter().map(|s| s.seats_total - s.seats_available - s.seats_sold).sum();
        self.telemetry.set_holds_active(held);
        Ok(expired)
    }

    /// Purges expired idempotency records once every [`IDEMPOTENCY_PURGE_INTERVAL_MS`] (the
    /// first an interval after the first sweep), and at every sweep while a full batch shows
    /// that more are left, so the purge keeps up with any rate of new keys.
    async fn purge_idempotency_when_due(&self) {
        let now_ms = self.now_ms();
        let due_ms = self.idempotency_purge_due_ms.load(Ordering::Relaxed);
        if due_ms == 0 || now_ms < due_ms {
            if due_ms == 0 {
                self.idempotency_purge_due_ms.store(now_ms + IDEMPOTENCY_PURGE_INTERVAL_MS, Ordering::Relaxed);
            }
            return;
        }
        match self.timed("purge_idempotency", self.record.purge_idempotency(now_ms, IDEMPOTENCY_PURGE_MAX)).await {
            Ok(purged) if purged >= IDEMPOTENCY_PURGE_MAX => {}
            Ok(_) => self.idempotency_purge_due_ms.store(now_ms + IDEMPOTENCY_PURGE_INTERVAL_MS, Ordering::Relaxed),
            Err(error) => tracing::warn!(%error, "expired idempotency records not purged; the next sweep tries again"),
        }
    }

    /// Runs admission ticks and hold sweeps until the task is dropped.
    pub async fn run_background(self: Arc<Self>) {
        let mut admission = tokio::time::interval(Duration::from_millis(self.config.admission_tick_ms));
        let mut sweep = tokio::time::interval(Duration::from_millis(self.config.sweep_interval_ms));
        admission.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = admission.tick() => {
                    if let Err(error) = self.tick_admission().await {
                        tracing::warn!(%error, "admission tick failed");
                    }
                }
                _ = sweep.tick() => {
                    if let Err(error) = self.sweep().await {
                        tracing::warn!(%error, "hold sweep failed");
                    }
                }
            }
        }
    }

    /// The snapshot's figures kept on this node; `snapshot` adds each line's policy.
    fn node_snapshot(&self) -> Snapshot {
        let now_ms = self.now_ms();
        let settings = *self.settings.read();
        let queues = self
            .lines
            .lock()
            .iter()
            .filter_map(|(&schedule_id, line)| line.last_report.map(|report| (schedule_id, report)))
            .collect::<Vec<_>>();
        Snapshot {
            node: self.config.node.clone(),
            at_ms: now_ms,
            hold_mode: self.config.hold_mode,
            traffic: self.telemetry.traffic(now_ms),
            queues: queues
                .into_iter()
                .map(|(schedule_id, report)| QueueSnapshot {
                    schedule_id,
                    waiting: report.waiting,
                    active: report.active,
                    admitted_total: report.admitted_total,
                    admission: self.config.admission,
                })
                .collect(),
            hold_ttl_s: settings.hold_ttl_ms / 1000,
            rate_limits: self.guards.limits(),
            blocks: self.guards.blocks(),
            user_blocks: self.guards.user_blocks(),
        }
    }

    /// What the ops agent reads: this node's traffic, settings and blocks, and each line's
    /// counts with its current admission policy from the cache store.
    pub async fn snapshot(&self) -> Result<Snapshot, EngineError> {
        let mut snapshot = self.node_snapshot();
        for queue in &mut snapshot.queues {
            let schedule_id = queue.schedule_id;
            queue.admission =
                self.on_line("admission_policy", schedule_id, || self.cache.admission_policy(schedule_id)).await?;
        }
        Ok(snapshot)
    }

    async fn audit(
        &self,
        actor: &str,
        action: &str,
        target: String,
        before: serde_json::Value,
        after: serde_json::Value,
        outcome: &str,
    ) {
        let entry = AuditEntry {
            at_ms: self.now_ms(),
            node: self.config.node.clone(),
            actor: actor.to_owned(),
            action: action.to_owned(),
            target,
            before,
            after,
            outcome: outcome.to_owned(),
        };
        if let Err(error) = self.record.append_audit(entry).await {
            tracing::error!(%error, action, "audit entry could not be written");
        }
    }

    async fn audited<T: Serialize>(
        &self,
        actor: &str,
        action: &str,
        target: String,
        requested: &T,
        change: impl Future<Output = Result<(serde_json::Value, serde_json::Value), EngineError>>,
    ) -> Result<serde_json::Value, EngineError> {
        match change.await {
            Ok((before, after)) => {
                self.audit(actor, action, target, before, after.clone(), "applied").await;
                Ok(after)
            }
            Err(error) => {
                let requested = serde_json::to_value(requested).unwrap_or_default();
                self.audit(actor, action, target, serde_json::Value::Null, requested, &format!("rejected: {error}"))
                    .await;
                Err(error)
            }
        }
    }

    /// Sets a line's admission rate, active maximum and pause.
    pub async fn set_admission(
        &self,
        actor: &str,
        schedule_id: ScheduleId,
        change: AdmissionChange,
    ) -> Result<serde_json::Value, EngineError> {
        self.audited(actor, "set_admission", format!("schedule/{schedule_id}"), &change, async {
            check_bound("rate_per_s", change.rate_per_s, &bounds::ADMISSION_RATE_PER_S)?;
            check_bound("active_max", change.active_max, &bounds::ACTIVE_MAX)?;
            let current =
                self.on_line("admission_policy", schedule_id, || self.cache.admission_policy(schedule_id)).await?;
            let policy = AdmissionPolicy {
                rate_per_s: change.rate_per_s,
                active_max: change.active_max,
                paused: change.paused,
                ..current
            };
            let before =
                self.timed("set_admission_policy", self.cache.set_admission_policy(schedule_id, policy)).await?;
            Ok((json(&before), json(&policy)))
        })
        .await
    }

    /// Sets the per-IP and per-token rate limits of this node.
    pub async fn set_rate_limits(&self, actor: &str, limits: RateLimits) -> Result<serde_json::Value, EngineError> {
        self.audited(actor, "set_rate_limits", "rate-limits".into(), &limits, async {
            check_bound("per_ip_per_s", limits.per_ip_per_s, &bounds::RATE_LIMIT_PER_S)?;
            check_bound("per_token_per_s", limits.per_token_per_s, &bounds::RATE_LIMIT_PER_S)?;
            check_bound("burst", limits.burst, &bounds::RATE_LIMIT_BURST)?;
            let before = self.guards.set_limits(limits);
            self.settings.write().rate_limits = limits;
            Ok((json(&before), json(&limits)))
        })
        .await
    }

    /// Blocks an IP for `ttl_s` seconds on this node.
    pub async fn block(&self, actor: &str, ip: IpAddr, ttl_s: u64) -> Result<serde_json::Value, EngineError> {
        let key = ("ip", serde_json::json!(ip));
        let block =
            |ttl_ms| self.guards.block(ip, ttl_ms).map_err(|full| EngineError::Invalid { reason: full.to_string() });
        self.audited_block(actor, "block_ip", format!("ip/{ip}"), key, ttl_s, block).await
    }

    /// Lifts a block on this node.
    pub async fn unblock(&self, actor: &str, ip: IpAddr) -> Result<serde_json::Value, EngineError> {
        let key = ("ip", serde_json::json!(ip));
        let missing = EngineError::NotFound { entity: "block", id: 0 };
        self.audited_unblock(actor, "unblock_ip", format!("ip/{ip}"), key, || self.guards.unblock(ip), missing).await
    }

    /// Blocks a user for `ttl_s` seconds on this node: every public request their session
    /// names is refused, from whatever address; the others behind their address pass.
    pub async fn block_user(&self, actor: &str, user_id: UserId, ttl_s: u64) -> Result<serde_json::Value, EngineError> {
        let key = ("user_id", serde_json::json!(user_id));
        let block = |ttl_ms| {
            check_bound("user_id", user_id, &bounds::USER_ID)?;
            self.guards.block_user(user_id, ttl_ms).map_err(|full| EngineError::Invalid { reason: full.to_string() })
        };
        self.audited_block(actor, "block_user", format!("user/{user_id}"), key, ttl_s, block).await
    }

    /// Lifts a user's block on this node.
    pub async fn unblock_user(&self, actor: &str, user_id: UserId) -> Result<serde_json::Value, EngineError> {
        let key = ("user_id", serde_json::json!(user_id));
        let missing = EngineError::NotFound { entity: "user block", id: user_id };
        let unblock = || self.guards.unblock_user(user_id);
        self.audited_unblock(actor, "unblock_user", format!("user/{user_id}"), key, unblock, missing).await
    }

    /// Blocks what `key` names (`ip` or `user_id`, and its value) with `block` for `ttl_s`
    /// seconds, audited as `action` on `target`; `block` checks what it names.
    async fn audited_block(
        &self,
        actor: &str,
        action: &str,
        target: String,
        key: (&str, serde_json::Value),
        ttl_s: u64,
        block: impl FnOnce(u64) -> Result<Option<u64>, EngineError>,
    ) -> Result<serde_json::Value, EngineError> {
        let (name, value) = key;
        let requested = serde_json::json!({ (name): value.clone(), "ttl_s": ttl_s });
        self.audited(actor, action, target, &requested, async {
            check_bound("ttl_s", ttl_s, &bounds::BLOCK_TTL_S)?;
            let before = block(ttl_s * 1000)?;
            let until_ms = self.now_ms() + ttl_s * 1000;
            Ok((
                serde_json::json!({ "blocked_until_ms": before }),
                serde_json::json!({ (name): value, "blocked_until_ms": until_ms }),
            ))
        })
        .await
    }

    /// Lifts the block of what `key` names with `unblock` (`missing` if there was none),
    /// audited as `action` on `target`.
    async fn audited_unblock(
        &self,
        actor: &str,
        action: &str,
        target: String,
        key: (&str, serde_json::Value),
        unblock: impl FnOnce() -> Option<u64>,
        missing: EngineError,
    ) -> Result<serde_json::Value, EngineError> {
        let (name, value) = key;
        let requested = serde_json::json!({ (name): value.clone() });
        self.audited(actor, action, target, &requested, async {
            let before = unblock().ok_or(missing)?;
            Ok((
                serde_json::json!({ "blocked_until_ms": before }),
                serde_json::json!({ (name): value, "blocked_until_ms": null }),
            ))
        })
        .await
    }

    /// Sets the TTL of new holds on this node.
    pub async fn set_hold_ttl(&self, actor: &str, ttl_s: u64) -> Result<serde_json::Value, EngineError> {
        let requested = serde_json::json!({ "ttl_s": ttl_s });
        self.audited(actor, "set_hold_ttl", "hold-ttl".into(), &requested, async {
            check_bound("ttl_s", ttl_s, &bounds::HOLD_TTL_S)?;
            let before = std::mem::replace(&mut self.settings.write().hold_ttl_ms, ttl_s * 1000);
            Ok((serde_json::json!({ "ttl_s": before / 1000 }), serde_json::json!({ "ttl_s": ttl_s })))
        })
        .await
    }

    /// Sets the most seats one user may hold or buy per schedule, for new holds on this node.
    pub async fn set_seat_limit(&self, actor: &str, seats_per_user_max: u32) -> Result<serde_json::Value, EngineError> {
        let requested = serde_json::json!({ "seats_per_user_max": seats_per_user_max });
        self.audited(actor, "set_seat_limit", "seat-limit".into(), &requested, async {
            check_bound("seats_per_user_max", seats_per_user_max, &bounds::SEATS_PER_USER_MAX)?;
            let before = std::mem::replace(&mut self.settings.write().seats_per_user_max, seats_per_user_max);
            Ok((serde_json::json!({ "seats_per_user_max": before }), requested.clone()))
        })
        .await
    }

    /// Writes an ops agent's decision to the audit log.
    pub async fn record_decision(&self, actor: &str, decision: &crate::agent::DecisionRecord) {
        let target = format!("decision/{}", decision.observation_digest);
        self.audit(actor, "agent_decision", target, serde_json::Value::Null, json(decision), "recorded").await;
    }

    /// Claims an idempotency key for a request, or says why not.
    pub async fn idempotency_begin(
        &self,
        key: String,
        fingerprint: [u8; 32],
        lease_ms: u64,
    ) -> Result<IdempotencyDecision, EngineError> {
        let ttl_ms = self.config.idempotency_ttl_ms;
        let begin = self.record.idempotency_begin(key, fingerprint, lease_ms, ttl_ms, self.now_ms());
        self.timed("idempotency_begin", begin).await
    }

    /// Stores the final response of a claimed key.
    pub async fn idempotency_complete(
        &self,
        key: String,
        fingerprint: [u8; 32],
        response: StoredResponse,
    ) -> Result<(), EngineError> {
        let ttl_ms = self.config.idempotency_ttl_ms;
        let complete = self.record.idempotency_complete(key, fingerprint, response, ttl_ms, self.now_ms());
        self.timed("idempotency_complete", complete).await
    }

    /// Keeps the claim on idempotency key `key` while its request runs: renews the lease
    /// (`lease_ms`, as claimed) every third of it, so a claim outlives its node by at most a
    /// lease while a slow request keeps it however long it runs. A request that ends within the
    /// first third renews nothing. Renews nothing while the node is paused (a stopped process
    /// could not), tries again after a failed renewal, and gives up for good once the claim is
    /// lost. Never completes: the request's end drops it.
    pub async fn idempotency_watchdog(
        &self,
        key: &str,
        fingerprint: [u8; 32],
        lease_ms: u64,
    ) -> std::convert::Infallible {
        let period = Duration::from_millis((lease_ms / 3).max(1));
        loop {
            tokio::time::sleep(period).await;
            if self.paused_until_us.load(Ordering::Relaxed) > self.clock.monotonic_us() {
                continue;
            }
            let renew = self.record.idempotency_renew(key.to_owned(), fingerprint, lease_ms, self.now_ms());
            match self.timed("idempotency_renew", renew).await {
                Ok(true) => {}
                Ok(false) => break,
                Err(error) => tracing::warn!(%error, "idempotency lease not renewed; trying again"),
            }
        }
        tracing::warn!("idempotency claim lost before its request finished; a retry may run it again");
        std::future::pending().await
    }

    /// Gives a claimed key up so the request can be retried.
    pub async fn idempotency_release(&self, key: String, fingerprint: [u8; 32]) -> Result<(), EngineError> {
        self.timed("idempotency_release", self.record.idempotency_release(key, fingerprint)).await
    }

    /// The newest audit entries.
    pub async fn audit_log(&self, limit: u32) -> Result<Vec<AuditEntry>, EngineError> {
        self.timed("audit", self.record.audit(limit)).await
    }

    /// One part of the state, in the stores' own order, as its records serialize: what a live
    /// run reads after its end to check the history against.
    pub async fn export(&self, part: ExportPart) -> Result<Vec<serde_json::Value>, EngineError> {
        if part == ExportPart::Admissions {
            let admissions = self.timed("export", self.cache.admissions()).await?;
            return Ok(admissions.iter().map(json).collect());
        }
        let dump = self.timed("export", self.record.dump()).await?;
        Ok(match part {
            ExportPart::Schedules => dump.schedules.iter().map(json).collect(),
            ExportPart::Accounts => dump.accounts.iter().map(json).collect(),
            ExportPart::Ledger => dump.ledger.iter().map(json).collect(),
            ExportPart::Reservations => dump.reservations.iter().map(json).collect(),
            ExportPart::Fences => dump.fences.iter().map(json).collect(),
            ExportPart::Outbox => dump.outbox.iter().map(json).collect(),
            ExportPart::Admissions => Vec::new(),
        })
    }
}

/// The parts of the state [`Engine::export`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExportPart {
    Schedules,
    Accounts,
    Ledger,
    Reservations,
    Fences,
    Outbox,
    /// Admissions to the waiting lines, from the cache store.
    Admissions,
}

impl ExportPart {
    pub const ALL: [ExportPart; 7] = [
        ExportPart::Schedules,
        ExportPart::Accounts,
        ExportPart::Ledger,
        ExportPart::Reservations,
        ExportPart::Fences,
        ExportPart::Outbox,
        ExportPart::Admissions,
    ];

    /// The part's name in paths.
    pub fn name(self) -> &'static str {
        match self {
            ExportPart::Schedules => "schedules",
            ExportPart::Accounts => "accounts",
            ExportPart::Ledger => "ledger",
            ExportPart::Reservations => "reservations",
            ExportPart::Fences => "fences",
            ExportPart::Outbox => "outbox",
            ExportPart::Admissions => "admissions",
        }
    }
}

fn json<T: Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or_default()
}
