//! The shared cache on Redis: waiting lines on sorted sets, admission, locks with fences for
//! the lock hold modes, the seat gate in front of the record store's atomic hold, and the
//! outbox stream.
//!
//! Every change is one Lua script (loaded once, then run by its SHA; `redis::Script` loads it
//! again when the server answers NOSCRIPT), so it is one atomic step however many engine
//! nodes share the server. The scripts follow `domain::WaitingLine` step for step; only the
//! shuffle of `random-at-open` lines draws from its own seeded generator.
//!
//! **Invariant:** every call is bounded by `call_timeout`; a server that is down or slow makes
//! calls fail with `Unavailable`, never hang, and the connection manager reconnects when it is
//! back. Time is the caller's `now_ms`, as in the memory store.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, Script};

use super::seat_hints::SeatHints;
use super::{AdmitReport, CacheStore, HoldRequest, LockGrant, StoreError};
use crate::domain::{
    AdmissionPolicy, Admitted, FenceToken, IdempotencyRecord, OutboxEvent, QueueOrder, QueueStatus, RateLimit,
    ReservationId, ScheduleId, SeatId, StoredResponse, TokenStatus, TransitionError, UserId,
};

/// Where the Redis store keeps its keys, how long a call may take, and its seed.
#[derive(Debug, Clone)]
pub struct RedisStoreConfig {
    /// Prepended to every key, so that several deployments (or tests) share one server.
    pub prefix: String,
    /// Seeds the shuffle of `random-at-open` lines.
    pub seed: u64,
    /// The most one call may take.
    pub call_timeout: Duration,
    /// The most one connection attempt may take.
    pub connect_timeout: Duration,
    /// Names this process in the seat gate's tokens; unique per process.
    pub instance: String,
    /// The most events kept in the outbox stream (approximately).
    pub outbox_stream_max: u64,
}

impl Default for RedisStoreConfig {
    fn default() -> Self {
        Self {
            prefix: "tcore:".into(),
            seed: 0,
            call_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
            instance: "tcore".into(),
            outbox_stream_max: 1_000_000,
        }
    }
}

/// The Redis cache store.
#[derive(Clone)]
pub struct RedisStore {
    connection: ConnectionManager,
    config: Arc<RedisStoreConfig>,
    scripts: Arc<Scripts>,
    gate_tokens: Arc<AtomicU64>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").field("prefix", &self.config.prefix).finish_non_exhaustive()
    }
}

struct Scripts {
    create_line: Script,
    join: Script,
    queue_status: Script,
    admit: Script,
    mark_used: Script,
    set_policy: Script,
    acquire_lock: Script,
    renew_lock: Script,
    release_lock: Script,
    take_rate: Script,
    gate_take: Script,
    gate_bind: Script,
    gate_release: Script,
    gate_sold: Script,
}

/// Helpers every line script starts with. `KEYS[1]` is the line's base key.
const LINE_LUA: &str = r#"
local base = KEYS[1]
local function int(x) return string.format('%d', x) end
local function entry_key(seq) return base .. ':e:' .. seq end
local function fail(tag, status) return {tag, 0, 0, status or '', 0, 0, 0, ''} end
local function touch(seq, now)
  local seen = tonumber(redis.call('HGET', entry_key(seq), 'last_seen'))
  if now > seen then redis.call('HSET', entry_key(seq), 'last_seen', int(now)) end
end
local function describe_at(seq, now)
  local e = redis.call('HMGET', entry_key(seq), 'user', 'order_index', 'status', 'expires_at')
  local order_index, status, expires = tonumber(e[2]), e[3], e[4] or ''
  if status == 'ADMITTED' and expires ~= '' and tonumber(expires) <= now then status = 'EXPIRED' end
  local position, eta = 0, 0
  if status == 'WAITING' then
    local front = redis.call('ZRANGE', base .. ':waiting', 0, 0, 'WITHSCORES')
    local head = order_index
    if front[2] then head = tonumber(front[2]) end
    position = math.max(order_index - head, 0) + 1
    local m = redis.call('HMGET', base, 'rate_per_s', 'opens_at')
    local rate = math.max(tonumber(m[1]), 0.001)
    local until_open_s = math.ceil(math.max(tonumber(m[2]) - now, 0) / 1000)
    eta = until_open_s + math.ceil(position / rate)
  end
  return {'ok', tonumber(seq), tonumber(e[1]), status, position, eta, order_index, expires}
end
"#;

const CREATE_LINE_LUA: &str = r#"
if redis.call('EXISTS', base) == 1 then return 0 end
redis.call('HSET', base, 'schedule_id', ARGV[1], 'opens_at', ARGV[2], 'order', ARGV[3], 'rate_per_s', ARGV[4],
  'active_max', ARGV[5], 'paused', ARGV[6], 'admitted_ttl', ARGV[7], 'idle_timeout', ARGV[8], 'next_seq', 0,
  'next_order_index', 0, 'shuffled', 0, 'active', 0, 'last_admit', '', 'credit', '0', 'admitted_total', 0)
return 1
"#;

const JOIN_LUA: &str = r#"
local user, now = ARGV[1], tonumber(ARGV[2])
if redis.call('EXISTS', base) == 0 then return fail('noline') end
local seq = redis.call('HGET', base .. ':users', user)
if seq then
  local status = redis.call('HGET', entry_key(seq), 'status')
  if status == 'WAITING' or status == 'ADMITTED' then
    touch(seq, now)
    return describe_at(seq, now)
  end
end
seq = redis.call('HINCRBY', base, 'next_seq', 1)
local order_index = redis.call('HINCRBY', base, 'next_order_index', 1) - 1
redis.call('HSET', entry_key(seq), 'user', user, 'joined_at', int(now), 'last_seen', int(now),
  'order_index', int(order_index), 'status', 'WAITING')
redis.call('HSET', base .. ':users', user, seq)
redis.call('ZADD', base .. ':waiting', order_index, seq)
return describe_at(seq, now)
"#;

/// Only a waiting token's last sighting matters (admission skips those idle too long), so only
/// a waiting token is touched: the status of an admitted one, asked for on every booking call,
/// writes nothing.
const QUEUE_STATUS_LUA: &str = r#"
local seq, now = ARGV[1], tonumber(ARGV[2])
if redis.call('EXISTS', base) == 0 then return fail('noline') end
if seq == '0' then return fail('notoken') end
local e = redis.call('HMGET', entry_key(seq), 'status', 'last_seen')
if not e[1] then return fail('notoken') end
if e[1] == 'WAITING' and now > tonumber(e[2]) then redis.call('HSET', entry_key(seq), 'last_seen', int(now)) end
return describe_at(seq, now)
"#;

const MARK_USED_LUA: &str = r#"
local seq, now = ARGV[1], tonumber(ARGV[2])
if redis.call('EXISTS', base) == 0 then return fail('noline') end
if seq == '0' or redis.call('EXISTS', entry_key(seq)) == 0 then return fail('notadmitted', 'EXPIRED') end
local status = describe_at(seq, now)[4]
if status ~= 'ADMITTED' then return fail('notadmitted', status) end
redis.call('HSET', entry_key(seq), 'status', 'USED')
redis.call('ZREM', base .. ':admitted', seq)
local active = tonumber(redis.call('HGET', base, 'active'))
redis.call('HSET', base, 'active', int(math.max(active - 1, 0)))
return describe_at(seq, now)
"#;

/// `KEYS[2]` is the list of every admission; `ARGV`: now, seed of the shuffle.
const ADMIT_LUA: &str = r#"
local now = tonumber(ARGV[1])
if redis.call('EXISTS', base) == 0 then return {-1, 0, 0, 0, 0} end
local m = redis.call('HMGET', base, 'opens_at', 'order', 'rate_per_s', 'active_max', 'paused', 'admitted_ttl',
  'idle_timeout', 'shuffled', 'active', 'last_admit', 'credit', 'admitted_total', 'schedule_id', 'next_order_index')
local opens, order, rate, active_max, paused = tonumber(m[1]), m[2], tonumber(m[3]), tonumber(m[4]), m[5]
local admitted_ttl, idle_timeout, shuffled, active = tonumber(m[6]), tonumber(m[7]), m[8], tonumber(m[9])
local credit, total, schedule_id = tonumber(m[11]), tonumber(m[12]), m[13]
local waiting_key, admitted_key = base .. ':waiting', base .. ':admitted'

for _, seq in ipairs(redis.call('ZRANGEBYSCORE', admitted_key, '-inf', now)) do
  redis.call('ZREM', admitted_key, seq)
  redis.call('HSET', entry_key(seq), 'status', 'EXPIRED')
  active = math.max(active - 1, 0)
end

local function report(admitted_now)
  redis.call('HSET', base, 'active', int(active), 'admitted_total', int(total), 'credit', string.format('%.17g', credit))
  local front = redis.call('ZRANGE', waiting_key, 0, 0, 'WITHSCORES')
  local head = tonumber(m[14])
  if front[2] then head = tonumber(front[2]) end
  return {admitted_now, redis.call('ZCARD', waiting_key), active, total, head}
end

local last_ms = opens
if m[10] ~= '' then last_ms = tonumber(m[10]) end
-- Ticks come from several nodes, each with its own now: the last tick's time never moves back,
-- or the credit since it would be earned twice.
redis.call('HSET', base, 'last_admit', int(math.max(now, last_ms)))
if paused == '1' or now < opens then
  credit = 0
  return report(0)
end

if order == 'random-at-open' and shuffled == '0' then
  redis.call('HSET', base, 'shuffled', 1)
  local early, indexes = {}, {}
  local flat = redis.call('ZRANGE', waiting_key, 0, -1, 'WITHSCORES')
  for i = 1, #flat, 2 do
    if tonumber(redis.call('HGET', entry_key(flat[i]), 'joined_at')) >= opens then break end
    table.insert(early, flat[i])
    table.insert(indexes, tonumber(flat[i + 1]))
  end
  -- Park-Miller minimal standard generator, seeded per line.
  local state = tonumber(ARGV[2]) % 2147483646 + 1
  for i = #early, 2, -1 do
    state = (state * 16807) % 2147483647
    local j = state % i + 1
    early[i], early[j] = early[j], early[i]
  end
  for k, seq in ipairs(early) do
    redis.call('ZADD', waiting_key, indexes[k], seq)
    redis.call('HSET', entry_key(seq), 'order_index', int(indexes[k]))
  end
end

local burst = math.max(rate, 1.0)
local elapsed_s = math.max(now - math.max(last_ms, opens), 0) / 1000
credit = math.min(credit + elapsed_s * rate, burst)
local admitted_now = 0
while credit >= 1 and active < active_max do
  local front = redis.call('ZRANGE', waiting_key, 0, 0)
  if #front == 0 then break end
  local seq = front[1]
  redis.call('ZREM', waiting_key, seq)
  local e = redis.call('HMGET', entry_key(seq), 'last_seen', 'user', 'joined_at')
  if now - tonumber(e[1]) > idle_timeout then
    redis.call('HSET', entry_key(seq), 'status', 'EXPIRED')
  else
    local expires = now + admitted_ttl
    redis.call('HSET', entry_key(seq), 'status', 'ADMITTED', 'admitted_at', int(now), 'expires_at', int(expires))
    redis.call('ZADD', admitted_key, expires, seq)
    active = active + 1
    total = total + 1
    credit = credit - 1
    admitted_now = admitted_now + 1
    redis.call('RPUSH', KEYS[2], schedule_id .. '|' .. seq .. '|' .. e[2] .. '|' .. e[3] .. '|' .. int(now))
  end
end
return report(admitted_now)
"#;

/// `ARGV`: rate, active max, paused, admitted TTL, idle timeout. Returns the policy before.
const SET_POLICY_LUA: &str = r#"
if redis.call('EXISTS', base) == 0 then return {} end
local before = redis.call('HMGET', base, 'rate_per_s', 'active_max', 'paused', 'admitted_ttl', 'idle_timeout')
redis.call('HSET', base, 'rate_per_s', ARGV[1], 'active_max', ARGV[2], 'paused', ARGV[3], 'admitted_ttl', ARGV[4],
  'idle_timeout', ARGV[5])
return before
"#;

/// `ARGV`: TTL, now. The lock's fence grows with every grant and outlives its holders.
const ACQUIRE_LOCK_LUA: &str = r#"
local h = redis.call('HMGET', KEYS[1], 'fence_last', 'holder_fence', 'expires_at')
local now = tonumber(ARGV[2])
if h[2] and tonumber(h[3]) > now then return false end
local fence = (tonumber(h[1]) or 0) + 1
local expires = now + tonumber(ARGV[1])
redis.call('HSET', KEYS[1], 'fence_last', string.format('%d', fence), 'holder_fence', string.format('%d', fence),
  'expires_at', string.format('%d', expires))
return {fence, expires}
"#;

/// `ARGV`: fence, TTL, now. Extends the lock only for its live holder.
const RENEW_LOCK_LUA: &str = r#"
local h = redis.call('HMGET', KEYS[1], 'holder_fence', 'expires_at')
local now = tonumber(ARGV[3])
if h[1] ~= ARGV[1] or tonumber(h[2]) <= now then return false end
local expires = now + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'expires_at', string.format('%d', expires))
return {tonumber(ARGV[1]), expires}
"#;

/// `ARGV`: now (µs), interval (µs), burst. The GCRA of `RateLimit::take`: -1 when the
/// request passes, else the µs to wait.
const TAKE_RATE_LUA: &str = r#"
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + interval
local allowed_from = new_tat - interval * tonumber(ARGV[3])
if allowed_from > now then return allowed_from - now end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.floor((new_tat - now) / 1000) + 1)
return -1
"#;

const RELEASE_LOCK_LUA: &str = r#"
if redis.call('HGET', KEYS[1], 'holder_fence') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'holder_fence', 'expires_at')
end
return 0
"#;

/// `ARGV`: now, hold expiry, token. Closes the gate unless a live hold or a sale closed it.
/// Returns 0 when this attempt closed the gate, -1 when a sale closes it, else the expiry of
/// the live hold that closes it.
const GATE_TAKE_LUA: &str = r#"
local g = redis.call('HMGET', KEYS[1], 'sold', 'expires_at')
if g[1] == '1' then return -1 end
if g[2] and tonumber(g[2]) > tonumber(ARGV[1]) then return tonumber(g[2]) end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'token', ARGV[3], 'expires_at', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 0
"#;

/// `ARGV`: token, reservation id.
const GATE_BIND_LUA: &str = r#"
if redis.call('HGET', KEYS[1], 'token') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'reservation', ARGV[2])
end
return 0
"#;

/// `ARGV`: field (`token` or `reservation`), its value. Opens the gate if that still closes it.
const GATE_RELEASE_LUA: &str = r#"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then redis.call('DEL', KEYS[1]) end
return 0
"#;

/// `ARGV`: reservation id.
const GATE_SOLD_LUA: &str = r#"
if redis.call('HGET', KEYS[1], 'reservation') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'sold', '1')
  redis.call('PERSIST', KEYS[1])
end
return 0
"#;

impl Scripts {
    fn new() -> Self {
        let line = |body: &str| Script::new(&format!("{LINE_LUA}{body}"));
        Self {
            create_line: line(CREATE_LINE_LUA),
            join: line(JOIN_LUA),
            queue_status: line(QUEUE_STATUS_LUA),
            admit: line(ADMIT_LUA),
            mark_used: line(MARK_USED_LUA),
            set_policy: line(SET_POLICY_LUA),
            acquire_lock: Script::new(ACQUIRE_LOCK_LUA),
            renew_lock: Script::new(RENEW_LOCK_LUA),
            release_lock: Script::new(RELEASE_LOCK_LUA),
            take_rate: Script::new(TAKE_RATE_LUA),
            gate_take: Script::new(GATE_TAKE_LUA),
            gate_bind: Script::new(GATE_BIND_LUA),
            gate_release: Script::new(GATE_RELEASE_LUA),
            gate_sold: Script::new(GATE_SOLD_LUA),
        }
    }
}

/// What a line script answers about one token: tag, seq, user, status, position, eta, order
/// index, expiry.
type DescribeReply = (String, u64, u64, String, u64, u64, u64, String);

fn token_status(name: &str) -> Result<TokenStatus, StoreError> {
    match name {
        "WAITING" => Ok(TokenStatus::Waiting),
        "ADMITTED" => Ok(TokenStatus::Admitted),
        "USED" => Ok(TokenStatus::Used),
        "EXPIRED" => Ok(TokenStatus::Expired),
        other => Err(StoreError::Unavailable { reason: format!("Redis: unknown token status {other:?}") }),
    }
}

fn order_name(order: QueueOrder) -> &'static str {
    match order {
        QueueOrder::Fifo => "fifo",
        QueueOrder::RandomAtOpen => "random-at-open",
    }
}

fn unavailable(error: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable { reason: format!("Redis: {error}") }
}

fn parse<T: std::str::FromStr>(text: Option<&str>, what: &str) -> Result<T, StoreError> {
    text.and_then(|text| text.parse().ok())
        .ok_or_else(|| StoreError::Unavailable { reason: format!("Redis: unreadable {what}") })
}

/// How long a seat gate key lives past its hold at most, so abandoned gates go away.
const GATE_KEY_TTL_MS: u64 = 24 * 3_600 * 1_000;

impl RedisStore {
    /// A store on `url` (`redis://[:password@]host:port[/db]`); connects on first use and
    /// reconnects after a failure, so a server that is down at start only makes calls fail.
    pub fn connect_lazy(url: &str, config: RedisStoreConfig) -> Result<Self, StoreError> {
        let client = redis::Client::open(url)
            .map_err(|error| StoreError::Invalid { reason: format!("malformed Redis URL: {error}") })?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.call_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let connection = ConnectionManager::new_lazy_with_config(client, manager_config).map_err(unavailable)?;
        Ok(Self {
            connection,
            config: Arc::new(config),
            scripts: Arc::new(Scripts::new()),
            gate_tokens: Arc::new(AtomicU64::new(0)),
        })
    }

    fn line_key(&self, schedule_id: ScheduleId) -> String {
        format!("{}line:{{{schedule_id}}}", self.config.prefix)
    }

    fn admissions_key(&self) -> String {
        format!("{}admissions", self.config.prefix)
    }

    fn gate_key(&self, schedule_id: ScheduleId, seat_id: SeatId) -> String {
        format!("{}gate:{{{schedule_id}}}:{seat_id}", self.config.prefix)
    }

    /// The stream the outbox relay publishes to.
    pub fn outbox_stream_key(&self) -> String {
        format!("{}outbox", self.config.prefix)
    }

    /// Runs one Redis call within the call timeout.
    async fn bounded<T>(&self, call: impl Future<Output = redis::RedisResult<T>>) -> Result<T, StoreError> {
        match tokio::time::timeout(self.config.call_timeout, call).await {
            Ok(result) => result.map_err(unavailable),
            Err(_) => Err(StoreError::Unavailable {
                reason: format!("Redis did not answer within {} ms", self.config.call_timeout.as_millis()),
            }),
        }
    }

    async fn run<T: FromRedisValue>(&self, invocation: redis::ScriptInvocation<'_>) -> Result<T, StoreError> {
        let mut connection = self.connection.clone();
        self.bounded(async move { invocation.invoke_async(&mut connection).await }).await
    }

    fn describe(reply: DescribeReply, schedule_id: ScheduleId, seq: u64) -> Result<QueueStatus, StoreError> {
        let (tag, seq_found, user_id, status, position, eta_s, order_index, expires) = reply;
        match tag.as_str() {
            "ok" => Ok(QueueStatus {
                seq: seq_found,
                user_id,
                status: token_status(&status)?,
                position,
                eta_s,
                order_index,
                expires_at_ms: if expires.is_empty() { None } else { Some(parse(Some(&expires), "expiry")?) },
            }),
            "noline" => Err(StoreError::NotFound { entity: "schedule", id: schedule_id }),
            "notoken" => Err(StoreError::NotFound { entity: "queue token", id: seq }),
            "notadmitted" => Err(TransitionError::TokenNotAdmitted { status: token_status(&status)? }.into()),
            other => Err(StoreError::Unavailable { reason: format!("Redis: unexpected reply {other:?}") }),
        }
    }

    /// Publishes outbox events to the stream, in order; returns how many were added.
    pub async fn publish_outbox(&self, events: &[OutboxEvent]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for event in events {
            pipe.cmd("XADD")
                .arg(self.outbox_stream_key())
                .arg("MAXLEN")
                .arg("~")
                .arg(self.config.outbox_stream_max)
                .arg("*")
                .arg("id")
                .arg(event.id)
                .arg("kind")
                .arg(super::outbox_kind_name(event.kind))
                .arg("reservation_id")
                .arg(event.reservation_id.map_or_else(String::new, |id| id.to_string()))
                .arg("user_id")
                .arg(event.user_id)
                .arg("at_ms")
                .arg(event.at_ms)
                .ignore();
        }
        let mut connection = self.connection.clone();
        self.bounded(async move { pipe.query_async::<()>(&mut connection).await }).await
    }

    /// The seat gate on this server.
    pub fn seat_gate(&self) -> SeatGate {
        SeatGate { redis: self.clone(), hints: None }
    }

    /// The cache of completed idempotency records on this server.
    pub fn idempotency_cache(&self) -> IdempotencyCache {
        IdempotencyCache { redis: self.clone() }
    }
}

#[async_trait]
impl CacheStore for RedisStore {
    async fn ping(&self) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        self.bounded(async move { redis::cmd("PING").query_async::<String>(&mut connection).await }).await.map(|_| ())
    }

    async fn create_line(
        &self,
        schedule_id: ScheduleId,
        opens_at_ms: u64,
        order: QueueOrder,
        policy: AdmissionPolicy,
    ) -> Result<(), StoreError> {
        let mut invocation = self.scripts.create_line.key(self.line_key(schedule_id));
        invocation
            .arg(schedule_id)
            .arg(opens_at_ms)
            .arg(order_name(order))
            .arg(policy.rate_per_s.to_string())
            .arg(policy.active_max)
            .arg(u8::from(policy.paused))
            .arg(policy.admitted_ttl_ms)
            .arg(policy.waiting_idle_timeout_ms);
        self.run::<u8>(invocation).await.map(|_| ())
    }

    async fn join(&self, schedule_id: ScheduleId, user_id: UserId, now_ms: u64) -> Result<QueueStatus, StoreError> {
        let mut invocation = self.scripts.join.key(self.line_key(schedule_id));
        invocation.arg(user_id).arg(now_ms);
        Self::describe(self.run(invocation).await?, schedule_id, 0)
    }

    async fn queue_status(&self, schedule_id: ScheduleId, seq: u64, now_ms: u64) -> Result<QueueStatus, StoreError> {
        let mut invocation = self.scripts.queue_status.key(self.line_key(schedule_id));
        invocation.arg(seq).arg(now_ms);
        Self::describe(self.run(invocation).await?, schedule_id, seq)
    }

    async fn admit(&self, schedule_id: ScheduleId, now_ms: u64) -> Result<AdmitReport, StoreError> {
        let mut invocation = self.scripts.admit.key(self.line_key(schedule_id));
        invocation.key(self.admissions_key()).arg(now_ms).arg(self.config.seed.wrapping_add(schedule_id) % (1 << 62));
        let (admitted_now, waiting, active, admitted_total, head_order_index): (i64, u64, u32, u64, u64) =
            self.run(invocation).await?;
        if admitted_now < 0 {
            return Err(StoreError::NotFound { entity: "schedule", id: schedule_id });
        }
        Ok(AdmitReport {
            admitted_now: u32::try_from(admitted_now).unwrap_or(u32::MAX),
            waiting,
            active,
            admitted_total,
            head_order_index,
        })
    }

    async fn mark_used(&self, schedule_id: ScheduleId, seq: u64, now_ms: u64) -> Result<(), StoreError> {
        let mut invocation = self.scripts.mark_used.key(self.line_key(schedule_id));
        invocation.arg(seq).arg(now_ms);
        Self::describe(self.run(invocation).await?, schedule_id, seq).map(|_| ())
    }

    async fn admission_policy(&self, schedule_id: ScheduleId) -> Result<AdmissionPolicy, StoreError> {
        let mut connection = self.connection.clone();
        let key = self.line_key(schedule_id);
        let fields: Vec<Option<String>> = self
            .bounded(async move {
                redis::cmd("HMGET")
                    .arg(key)
                    .arg(&["rate_per_s", "active_max", "paused", "admitted_ttl", "idle_timeout"])
                    .query_async(&mut connection)
                    .await
            })
            .await?;
        policy_from(&fields).ok_or(StoreError::NotFound { entity: "schedule", id: schedule_id })?
    }

    async fn set_admission_policy(
        &self,
        schedule_id: ScheduleId,
        policy: AdmissionPolicy,
    ) -> Result<AdmissionPolicy, StoreError> {
        let mut invocation = self.scripts.set_policy.key(self.line_key(schedule_id));
        invocation
            .arg(policy.rate_per_s.to_string())
            .arg(policy.active_max)
            .arg(u8::from(policy.paused))
            .arg(policy.admitted_ttl_ms)
            .arg(policy.waiting_idle_timeout_ms);
        let before: Vec<Option<String>> = self.run(invocation).await?;
        policy_from(&before).ok_or(StoreError::NotFound { entity: "schedule", id: schedule_id })?
    }

    async fn admissions(&self) -> Result<Vec<Admitted>, StoreError> {
        let mut connection = self.connection.clone();
        let key = self.admissions_key();
        let rows: Vec<String> = self
            .bounded(async move { redis::cmd("LRANGE").arg(key).arg(0).arg(-1).query_async(&mut connection).await })
            .await?;
        rows.iter()
            .map(|row| {
                let fields: Vec<&str> = row.split('|').collect();
                let field = |index: usize| parse::<u64>(fields.get(index).copied(), "admission");
                Ok(Admitted {
                    schedule_id: field(0)?,
                    seq: field(1)?,
                    user_id: field(2)?,
                    joined_at_ms: field(3)?,
                    admitted_at_ms: field(4)?,
                })
            })
            .collect()
    }

    async fn acquire_lock(&self, key: String, ttl_ms: u64, now_ms: u64) -> Result<Option<LockGrant>, StoreError> {
        let mut invocation = self.scripts.acquire_lock.key(format!("{}lock:{key}", self.config.prefix));
        invocation.arg(ttl_ms).arg(now_ms);
        let grant: Option<(u64, u64)> = self.run(invocation).await?;
        Ok(grant.map(|(fence, expires_at_ms)| LockGrant { fence: FenceToken(fence), expires_at_ms }))
    }

    async fn renew_lock(
        &self,
        key: String,
        fence: FenceToken,
        ttl_ms: u64,
        now_ms: u64,
    ) -> Result<Option<LockGrant>, StoreError> {
        let mut invocation = self.scripts.renew_lock.key(format!("{}lock:{key}", self.config.prefix));
        invocation.arg(fence.0).arg(ttl_ms).arg(now_ms);
        let grant: Option<(u64, u64)> = self.run(invocation).await?;
        Ok(grant.map(|(fence, expires_at_ms)| LockGrant { fence: FenceToken(fence), expires_at_ms }))
    }

    async fn release_lock(&self, key: String, fence: FenceToken) -> Result<(), StoreError> {
        let mut invocation = self.scripts.release_lock.key(format!("{}lock:{key}", self.config.prefix));
        invocation.arg(fence.0);
        self.run::<u8>(invocation).await.map(|_| ())
    }

    async fn take_rate(&self, key: String, limit: RateLimit, now_ms: u64) -> Result<Option<u64>, StoreError> {
        let mut invocation = self.scripts.take_rate.key(format!("{}rate:{key}", self.config.prefix));
        invocation.arg(now_ms.saturating_mul(1_000)).arg(limit.interval_us()).arg(limit.burst.max(1));
        let wait_us: i64 = self.run(invocation).await?;
        Ok(u64::try_from(wait_us).ok().map(|wait_us| wait_us.div_ceil(1_000)))
    }
}

fn policy_from(fields: &[Option<String>]) -> Option<Result<AdmissionPolicy, StoreError>> {
    if fields.len() != 5 || fields.iter().any(Option::is_none) {
        return None;
    }
    let field = |index: usize| fields[index].as_deref();
    let policy = (|| {
        Ok(AdmissionPolicy {
            rate_per_s: parse(field(0), "admission rate")?,
            active_max: parse(field(1), "active max")?,
            paused: field(2) == Some("1"),
            admitted_ttl_ms: parse(field(3), "admitted TTL")?,
            waiting_idle_timeout_ms: parse(field(4), "idle timeout")?,
        })
    })();
    Some(policy)
}

/// A fast, shared check in front of the record store's atomic hold: one Lua script closes a
/// seat's gate for the length of a hold, so that of many attempts on one seat only the first
/// reaches the database. The record store stays the judge: a gate left open (lost, expired
/// early) only lets an attempt through to be refused there; a gate left closed by a hold that
/// did not happen is opened again at once, or at the latest when that hold would have expired.
///
/// With [`SeatGate::with_hints`], each node also keeps what it learned of closed seats for a
/// short while ([`SeatHints`]) and refuses attempts on them without a call: on a map mostly
/// taken, most attempts then cost no Redis round trip here.
#[derive(Debug, Clone)]
pub struct SeatGate {
    redis: RedisStore,
    hints: Option<Arc<SeatHints>>,
}

/// A closed gate, to be bound to the hold's reservation or opened again.
#[derive(Debug, Clone)]
pub struct GatePass {
    key: String,
    token: String,
    schedule_id: ScheduleId,
    seat_id: SeatId,
    closed_at_ms: u64,
    hold_ends_ms: u64,
}

impl SeatGate {
    /// The SHA1 the gate's Lua script runs by (`EVALSHA`), for tools that drive it directly.
    pub fn take_script_hash(&self) -> &str {
        self.redis.scripts.gate_take.get_hash()
    }

    /// The same gate, refusing without a call the seats this node learned were closed, for at
    /// most `lifetime` after it learned it (never past the closing hold's expiry). A zero
    /// `lifetime` keeps no hints.
    pub fn with_hints(mut self, lifetime: Duration) -> Self {
        self.hints = (!lifetime.is_zero()).then(|| Arc::new(SeatHints::new(lifetime)));
        self
    }

    /// Closes the seat's gate for this hold; `None` if a live hold or a sale already closed it.
    pub async fn take(&self, request: &HoldRequest, now_ms: u64) -> Result<Option<GatePass>, StoreError> {
        let (schedule_id, seat_id) = (request.schedule_id, request.seat_id);
        if let Some(hints) = &self.hints
            && hints.is_closed(schedule_id, seat_id, now_ms)
        {
            return Ok(None);
        }
        let number = self.redis.gate_tokens.fetch_add(1, Ordering::Relaxed);
        let pass = GatePass {
            key: self.redis.gate_key(schedule_id, seat_id),
            token: format!("{}:{number}", self.redis.config.instance),
            schedule_id,
            seat_id,
            closed_at_ms: now_ms,
            hold_ends_ms: now_ms.saturating_add(request.hold_ttl_ms),
        };
        let mut invocation = self.redis.scripts.gate_take.key(&pass.key);
        invocation
            .arg(now_ms)
            .arg(pass.hold_ends_ms)
            .arg(&pass.token)
            .arg(request.hold_ttl_ms.saturating_add(GATE_KEY_TTL_MS));
        let closed_by: i64 = self.redis.run(invocation).await?;
        if closed_by == 0 {
            return Ok(Some(pass));
        }
        if let Some(hints) = &self.hints {
            let hold_ends_ms = u64::try_from(closed_by).ok();
            hints.closed(schedule_id, seat_id, now_ms, hold_ends_ms);
        }
        Ok(None)
    }

    /// The hold was written as `reservation_id`.
    pub async fn bind(&self, pass: &GatePass, reservation_id: ReservationId) -> Result<(), StoreError> {
        if let Some(hints) = &self.hints {
            hints.closed(pass.schedule_id, pass.seat_id, pass.closed_at_ms, Some(pass.hold_ends_ms));
        }
        let mut invocation = self.redis.scripts.gate_bind.key(&pass.key);
        invocation.arg(&pass.token).arg(reservation_id);
        self.redis.run::<u8>(invocation).await.map(|_| ())
    }

    /// The hold was not written: open the gate again.
    pub async fn release(&self, pass: &GatePass) -> Result<(), StoreError> {
        let mut invocation = self.redis.scripts.gate_release.key(&pass.key);
        invocation.arg("token").arg(&pass.token);
        self.redis.run::<u8>(invocation).await.map(|_| ())
    }

    /// The hold `reservation_id` was paid for at `now_ms`: the gate stays closed.
    pub async fn sold(
        &self,
        schedule_id: ScheduleId,
        seat_id: SeatId,
        reservation_id: ReservationId,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        if let Some(hints) = &self.hints {
            hints.closed(schedule_id, seat_id, now_ms, None);
        }
        let mut invocation = self.redis.scripts.gate_sold.key(self.redis.gate_key(schedule_id, seat_id));
        invocation.arg(reservation_id);
        self.redis.run::<u8>(invocation).await.map(|_| ())
    }

    /// The reservation `reservation_id` was cancelled: open the gate if it still closes it.
    pub async fn freed(
        &self,
        schedule_id: ScheduleId,
        seat_id: SeatId,
        reservation_id: ReservationId,
    ) -> Result<(), StoreError> {
        if let Some(hints) = &self.hints {
            hints.opened(schedule_id, seat_id);
        }
        let mut invocation = self.redis.scripts.gate_release.key(self.redis.gate_key(schedule_id, seat_id));
        invocation.arg("reservation").arg(reservation_id);
        self.redis.run::<u8>(invocation).await.map(|_| ())
    }

    /// How many seats this node holds hints for (0 without hints).
    pub fn hints_kept(&self) -> usize {
        self.hints.as_ref().map_or(0, |hints| hints.len())
    }
}

/// Completed idempotency records, cached in front of the record store: a replay is answered
/// from Redis without a database round trip. A completed record never changes until it
/// expires, so the cache cannot go stale: it keeps the record's expiry, answers nothing for an
/// expired record (the caller asks the record store, which claims the key anew), and lets Redis
/// drop the entry by then. A record it lost (evicted, expired, server restarted) is read from
/// the record store again.
#[derive(Debug, Clone)]
pub struct IdempotencyCache {
    redis: RedisStore,
}

/// Fingerprint, status, content type, body and expiry of a cached record, each missing if not
/// cached.
type CachedIdempotencyFields = (Option<Vec<u8>>, Option<u16>, Option<String>, Option<Vec<u8>>, Option<u64>);

/// How long a completed idempotency record stays cached at most.
const IDEMPOTENCY_CACHE_TTL_MS: u64 = 24 * 3_600 * 1_000;

impl IdempotencyCache {
    fn key(&self, key: &str) -> String {
        format!("{}idem:{key}", self.redis.config.prefix)
    }

    /// The completed record of `key`, if cached (its `completed_at_ms` is not kept: 0).
    pub async fn get(&self, key: &str) -> Result<Option<IdempotencyRecord>, StoreError> {
        let mut connection = self.redis.connection.clone();
        let cache_key = self.key(key);
        let fields: CachedIdempotencyFields = self
            .redis
            .bounded(async move {
                redis::cmd("HMGET")
                    .arg(cache_key)
                    .arg(&["fingerprint", "status", "content_type", "body", "expires_at_ms"])
                    .query_async(&mut connection)
                    .await
            })
            .await?;
        let (Some(fingerprint), Some(status), Some(content_type), Some(body), Some(expires_at_ms)) = fields else {
            return Ok(None);
        };
        let Ok(fingerprint) = <[u8; 32]>::try_from(fingerprint) else { return Ok(None) };
        let response = StoredResponse { status, content_type, body };
        Ok(Some(IdempotencyRecord::Completed { fingerprint, response, completed_at_ms: 0, expires_at_ms }))
    }

    /// Caches the completed record of `key`, which expires at `expires_at_ms`.
    pub async fn put(
        &self,
        key: &str,
        fingerprint: &[u8; 32],
        response: &StoredResponse,
        expires_at_ms: u64,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let ttl_ms = expires_at_ms.saturating_sub(now_ms).clamp(1, IDEMPOTENCY_CACHE_TTL_MS);
        let cache_key = self.key(key);
        let mut pipe = redis::pipe();
        pipe.cmd("HSET")
            .arg(&cache_key)
            .arg("fingerprint")
            .arg(&fingerprint[..])
            .arg("status")
            .arg(response.status)
            .arg("content_type")
            .arg(&response.content_type)
            .arg("body")
            .arg(&response.body)
            .arg("expires_at_ms")
            .arg(expires_at_ms)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&cache_key)
            .arg(ttl_ms)
            .ignore();
        let mut connection = self.redis.connection.clone();
        self.redis.bounded(async move { pipe.query_async::<()>(&mut connection).await }).await
    }
}
