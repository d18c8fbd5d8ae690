//! `tcore-engine`: the engine server.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use rand::RngExt;
use tcore_engine::catalogue::{Catalogue, Loaded};
use tcore_engine::clock::SystemClock;
use tcore_engine::config::{
    AdminToken, ConnectionLimits, EngineConfig, HoldMode, IDEMPOTENCY_LEASE_MS_DEFAULT, RateLimits, TrustedProxies,
    connection_defaults,
};
use tcore_engine::domain::{AdmissionPolicy, QueueOrder};
use tcore_engine::faults::NoFaults;
use tcore_engine::sessions::{self, SessionClaims, SessionConfig, SessionKey};
use tcore_engine::store::{
    CacheStore, HOLD_BATCH_MAX_DEFAULT, HOLD_BATCH_WRITERS_DEFAULT, HoldBatchConfig, MariaDbStore, MariaDbStoreConfig,
    MemoryStore, MemoryStoreConfig, OutboxRelay, OutboxRelayConfig, RecordStore, RedisStore, RedisStoreConfig,
};
use tcore_engine::{Engine, EngineParts};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(name = "tcore-engine", version, about = "T-CORE's ticketing engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the HTTP API.
    Serve(Box<ServeArgs>),
    /// Apply the MariaDB schema's pending migrations (creating the database if it is missing).
    Migrate(MigrateArgs),
    /// Run the ops agent against live nodes' admin API.
    Agent(AgentArgs),
    /// Print a session for a user, signed with the HS256 session secret (for scripts and load tests).
    Session(SessionArgs),
}

#[derive(Debug, clap::Args)]
struct SessionArgs {
    /// The user the session names.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    user: u64,
    /// The HS256 secret the engine verifies sessions with (at least 32 bytes).
    #[arg(long, env = "TCORE_SESSION_SECRET", hide_env_values = true)]
    session_secret: String,
    /// The audience the engine expects.
    #[arg(long, env = "TCORE_SESSION_AUDIENCE", default_value = sessions::SESSION_AUDIENCE_DEFAULT)]
    session_audience: String,
    /// The issuer, if the engine requires one.
    #[arg(long, env = "TCORE_SESSION_ISSUER")]
    session_issuer: Option<String>,
    /// How long the session lasts, in seconds.
    #[arg(long, default_value_t = sessions::SESSION_TTL_S_DEFAULT, value_parser = clap::value_parser!(u64).range(1..=sessions::SESSION_TTL_S_MAX))]
    ttl_s: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SessionAlgorithm {
    /// HMAC-SHA256 with --session-secret: the engine can also issue sessions.
    Hs256,
    /// Ed25519 with --session-public-key (PEM): verify only.
    Eddsa,
    /// RSA-SHA256 with --session-public-key (PEM): verify only.
    Rs256,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PolicyArg {
    /// Read and record, never act.
    None,
    /// Deterministic thresholds with hysteresis.
    Rules,
    /// A language model behind an OpenAI-compatible endpoint.
    Llm,
    /// Answers recorded in a cassette.
    Replay,
}

#[derive(Debug, clap::Args)]
struct AgentArgs {
    /// Base URL of a node's HTTP API; repeat for every node.
    #[arg(long, env = "TCORE_AGENT_TARGET", value_delimiter = ',', required = true)]
    target: Vec<String>,
    /// The agent's bearer token of the admin API (its secret only); the nodes name the
    /// agent's calls in the audit log by this token's name (by convention `agent`).
    #[arg(long, env = "TCORE_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: String,
    /// How the agent decides.
    #[arg(long, env = "TCORE_AGENT_POLICY", value_enum, default_value = "rules")]
    policy: PolicyArg,
    /// Seconds between decisions.
    #[arg(long, env = "TCORE_AGENT_INTERVAL_S", default_value_t = 5.0)]
    interval_s: f64,
    /// Judge and record actions, but send none.
    #[arg(long, env = "TCORE_AGENT_DRY_RUN")]
    dry_run: bool,
    /// Stop after this many decisions (0: run until interrupted).
    #[arg(long, default_value_t = 0)]
    decisions: u64,
    /// OpenAI-compatible endpoint of the llm policy.
    #[arg(long, env = "TCORE_LLM_BASE_URL", default_value = "https://api.openai.com/v1")]
    llm_base_url: String,
    /// Model of the llm policy.
    #[arg(long, env = "TCORE_LLM_MODEL", default_value = "gpt-4o-mini")]
    llm_model: String,
    /// The environment variable holding the endpoint's API key.
    #[arg(long, default_value = "OPENAI_API_KEY")]
    llm_api_key_env: String,
    /// How long one answer of the model may take, in seconds.
    #[arg(long, env = "TCORE_LLM_TIMEOUT_S", default_value_t = 20.0)]
    llm_timeout_s: f64,
    /// The cassette: replayed by `replay`, recorded into by `llm`.
    #[arg(long, env = "TCORE_AGENT_CASSETTE")]
    cassette: Option<std::path::PathBuf>,
}

#[derive(Debug, clap::Args)]
struct MigrateArgs {
    /// The MariaDB database, `mysql://user:password@host:port/database`.
    #[arg(long, env = "TCORE_DATABASE_URL", default_value = DATABASE_URL_DEFAULT, hide_env_values = true)]
    database_url: String,
}

const DATABASE_URL_DEFAULT: &str = "mysql://root@127.0.0.1:3306/tcore";
const REDIS_URL_DEFAULT: &str = "redis://127.0.0.1:6379";
/// How long a seat hint lives by default: on a map mostly taken, most hold attempts are then
/// refused by the node; a seat opened at another node can be refused for this long.
const SEAT_HINT_MS_DEFAULT: u64 = 1_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StoreKind {
    /// Embedded, single process: nothing to install.
    Memory,
    /// Redis for the waiting room, locks and seat gates; MariaDB as the system of record.
    /// Several engine nodes may share them.
    #[value(name = "redis+mariadb")]
    RedisMariadb,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "TCORE_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Where state lives.
    #[arg(long, env = "TCORE_STORE", value_enum, default_value = "memory")]
    store: StoreKind,
    /// With --store redis+mariadb: the Redis server, `redis://[:password@]host:port[/db]`.
    #[arg(long, env = "TCORE_REDIS_URL", default_value = REDIS_URL_DEFAULT, hide_env_values = true)]
    redis_url: String,
    /// With --store redis+mariadb: the MariaDB database, `mysql://user:password@host:port/database`.
    /// Its schema is migrated at start.
    #[arg(long, env = "TCORE_DATABASE_URL", default_value = DATABASE_URL_DEFAULT, hide_env_values = true)]
    database_url: String,
    /// With --store redis+mariadb: prefix of every Redis key (deployments sharing a server
    /// need different prefixes).
    #[arg(long, env = "TCORE_REDIS_PREFIX", default_value = "tcore:")]
    redis_prefix: String,
    /// A bearer token of the admin API, `NAME=SECRET` (a bare `SECRET` is named `admin`);
    /// repeat for more. The audit log names each call by its token's name. Without one the
    /// admin API is not served.
    #[arg(long = "admin-token", env = "TCORE_ADMIN_TOKENS", value_delimiter = ',', value_parser = AdminToken::parse, hide_env_values = true)]
    admin_tokens: Vec<AdminToken>,
    /// Put the schedules and accounts of this JSON catalogue on sale at start (see
    /// `tcore_engine::catalogue`), unless another node sharing the stores already did.
    #[arg(long, env = "TCORE_CATALOG")]
    catalog: Option<std::path::PathBuf>,
    /// Load a demo concert with this many seats (0: none).
    #[arg(long, env = "TCORE_DEMO_SEATS", default_value_t = 0)]
    demo_seats: u32,
    /// With --demo-seats: how many demo users to create.
    #[arg(long, env = "TCORE_DEMO_USERS", default_value_t = 100)]
    demo_users: u32,
    /// With --demo-seats: the points each demo user starts with.
    #[arg(long, env = "TCORE_DEMO_POINTS", default_value_t = 100_000)]
    demo_points: u64,
    /// This node's name in logs, metrics and the audit log.
    #[arg(long, env = "TCORE_NODE", default_value = "engine-1")]
    node: String,
    /// How a seat is taken.
    #[arg(long, env = "TCORE_HOLD_MODE", value_enum, default_value = "atomic")]
    hold_mode: HoldMode,
    /// Allow the known-unsafe `unfenced-lock` hold mode (it oversells; for testbed runs only).
    #[arg(long, env = "TCORE_ALLOW_UNSAFE_HOLD_MODE")]
    allow_unsafe_hold_mode: bool,
    /// How long a hold lasts before it expires, in seconds.
    #[arg(long, env = "TCORE_HOLD_TTL_S", default_value_t = 300)]
    hold_ttl_s: u64,
    /// TTL of the seat lock in the lock hold modes, in milliseconds.
    #[arg(long, env = "TCORE_LOCK_TTL_MS", default_value_t = 2_000)]
    lock_ttl_ms: u64,
    /// Users admitted from each waiting line per second.
    #[arg(long, env = "TCORE_ADMISSION_RATE", default_value_t = 200.0)]
    admission_rate_per_s: f64,
    /// Admitted users active at once, per line.
    #[arg(long, env = "TCORE_ACTIVE_MAX", default_value_t = 2_000)]
    active_max: u32,
    /// Order of admission.
    #[arg(long, env = "TCORE_QUEUE_ORDER", value_enum, default_value = "fifo")]
    queue_order: QueueOrderArg,
    /// Requests per second allowed per client IP.
    #[arg(long, env = "TCORE_RATE_LIMIT_PER_IP", default_value_t = 50)]
    rate_limit_per_ip: u32,
    /// Requests per second allowed per queue token.
    #[arg(long, env = "TCORE_RATE_LIMIT_PER_TOKEN", default_value_t = 20)]
    rate_limit_per_token: u32,
    /// Burst allowed above the rate limits.
    #[arg(long, env = "TCORE_RATE_LIMIT_BURST", default_value_t = 100)]
    rate_limit_burst: u32,
    /// Transactions writing holds to MariaDB at the same time, per node.
    #[arg(long, env = "TCORE_HOLD_BATCH_WRITERS", default_value_t = HOLD_BATCH_WRITERS_DEFAULT, value_parser = clap::value_parser!(u16).range(1..=64))]
    hold_batch_writers: u16,
    /// The most holds one MariaDB transaction writes (1 writes each hold alone).
    #[arg(long, env = "TCORE_HOLD_BATCH_MAX", default_value_t = HOLD_BATCH_MAX_DEFAULT, value_parser = clap::value_parser!(u16).range(1..=1024))]
    hold_batch_max: u16,
    /// How long a node refuses, without asking Redis, holds on a seat it learned a hold or a
    /// sale closed (never past that hold's expiry). A seat opened at another node can be
    /// refused here for this long; 0 asks Redis every time.
    #[arg(long, env = "TCORE_SEAT_HINT_MS", default_value_t = SEAT_HINT_MS_DEFAULT, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    seat_hint_ms: u64,
    /// Keep the rate-limit counters in the cache store (Redis with `--store redis+mariadb`),
    /// so the limits hold across every node sharing it, at one more store call per request.
    #[arg(long, env = "TCORE_SHARED_RATE_LIMITS")]
    shared_rate_limits: bool,
    /// Secret that signs queue tokens (at least 16 bytes); nodes sharing a store must share
    /// it. Default: a random secret for this process.
    #[arg(long, env = "TCORE_TOKEN_SECRET", hide_env_values = true)]
    token_secret: Option<String>,
    /// How fans' sessions are signed.
    #[arg(long, env = "TCORE_SESSION_ALGORITHM", value_enum, default_value = "hs256")]
    session_algorithm: SessionAlgorithm,
    /// The HS256 session secret (at least 32 bytes); nodes and whoever issues sessions share it.
    /// Default: a random secret for this process (then only dev sessions can be had).
    #[arg(long, env = "TCORE_SESSION_SECRET", hide_env_values = true)]
    session_secret: Option<String>,
    /// With --session-algorithm eddsa or rs256: the identity provider's public key, a PEM file.
    #[arg(long, env = "TCORE_SESSION_PUBLIC_KEY")]
    session_public_key: Option<std::path::PathBuf>,
    /// The `aud` every session must carry.
    #[arg(long, env = "TCORE_SESSION_AUDIENCE", default_value = sessions::SESSION_AUDIENCE_DEFAULT)]
    session_audience: String,
    /// The `iss` every session must carry, if set.
    #[arg(long, env = "TCORE_SESSION_ISSUER")]
    session_issuer: Option<String>,
    /// Serve `POST /v1/sessions`, which hands out a session for any existing user WITHOUT
    /// proof of identity: for development and load tests only.
    #[arg(long, env = "TCORE_DEV_SESSIONS")]
    dev_sessions: bool,
    /// The secret the payment provider signs top-up webhooks with (at least 32 bytes); without
    /// one `POST /v1/payments/webhook` is not served.
    #[arg(long, env = "TCORE_PAYMENT_WEBHOOK_SECRET", hide_env_values = true)]
    payment_webhook_secret: Option<String>,
    /// Accounts one client address may open per hour.
    #[arg(long, env = "TCORE_ACCOUNTS_PER_IP_PER_HOUR", default_value_t = 20)]
    accounts_per_ip_per_hour: u32,
    /// Wrong admin tokens one client address may present within a minute before it is
    /// locked out of the admin API for five minutes.
    #[arg(long, env = "TCORE_ADMIN_AUTH_FAILURES_MAX", default_value_t = tcore_engine::api::admin_auth::FAILURES_MAX)]
    admin_auth_failures_max: u32,
    /// The most seats one user may hold or buy per schedule (an admin call may change it).
    #[arg(long, env = "TCORE_SEATS_PER_USER_MAX", default_value_t = 4)]
    seats_per_user_max: u32,
    /// How long an idempotency key's record is kept, in seconds; after it, the key counts as
    /// never seen and the record is purged.
    #[arg(long, env = "TCORE_IDEMPOTENCY_TTL_S", default_value_t = 86_400)]
    idempotency_ttl_s: u64,
    /// How long a request's claim on its idempotency key lasts without word from it, in
    /// milliseconds (1000 to 30000). The request renews it every third of that while it runs;
    /// once its node dies, a retry with the same key waits at most this long.
    #[arg(long, env = "TCORE_IDEMPOTENCY_LEASE_MS", default_value_t = IDEMPOTENCY_LEASE_MS_DEFAULT)]
    idempotency_lease_ms: u64,
    /// A proxy (address or CIDR range) whose X-Forwarded-For is believed; repeat for more.
    /// From a trusted proxy the client is the rightmost X-Forwarded-For address that is not
    /// a trusted proxy; from anyone else, the connection's peer.
    #[arg(long = "trusted-proxy", env = "TCORE_TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_ip_range)]
    trusted_proxies: Vec<ipnet::IpNet>,
    /// Seconds a client may take to send a request's headers (and to start its first
    /// request); an HTTP/1.1 connection idle this long between requests is closed.
    #[arg(long, env = "TCORE_HEADER_READ_TIMEOUT_S", default_value_t = connection_defaults::HEADER_READ_TIMEOUT_MS / 1000, value_parser = clap::value_parser!(u64).range(1..=3_600))]
    header_read_timeout_s: u64,
    /// Seconds a client may take to send a request's body; then it is answered 408.
    #[arg(long, env = "TCORE_BODY_READ_TIMEOUT_S", default_value_t = connection_defaults::BODY_READ_TIMEOUT_MS / 1000, value_parser = clap::value_parser!(u64).range(1..=3_600))]
    body_read_timeout_s: u64,
    /// Seconds a connection may stay open with no request in flight (HTTP/2 connections are
    /// also pinged); 0 keeps idle connections open.
    #[arg(long, env = "TCORE_IDLE_TIMEOUT_S", default_value_t = connection_defaults::IDLE_TIMEOUT_MS / 1000, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    idle_timeout_s: u64,
    /// The most client connections open at once; more are answered 503 and closed.
    #[arg(long, env = "TCORE_CONNECTIONS_MAX", default_value_t = connection_defaults::CONNECTIONS_MAX, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    connections_max: u32,
}

/// An address range, `10.0.0.0/8` or `2001:db8::/32`, or one address.
fn parse_ip_range(text: &str) -> Result<ipnet::IpNet, String> {
    text.parse::<ipnet::IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("`{text}` is neither an IP address nor a CIDR range"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum QueueOrderArg {
    Fifo,
    RandomAtOpen,
}

impl ServeArgs {
    fn mariadb_config(&self) -> MariaDbStoreConfig {
        MariaDbStoreConfig {
            hold_batch: HoldBatchConfig {
                workers: usize::from(self.hold_batch_writers),
                holds_max: usize::from(self.hold_batch_max),
            },
            ..MariaDbStoreConfig::default()
        }
    }

    fn session_config(&self) -> anyhow::Result<SessionConfig> {
        let public_key = || -> anyhow::Result<Vec<u8>> {
            let path =
                self.session_public_key.as_ref().context("--session-public-key is needed with this algorithm")?;
            std::fs::read(path).with_context(|| format!("--session-public-key: cannot read {}", path.display()))
        };
        let key = match self.session_algorithm {
            SessionAlgorithm::Hs256 => {
                let secret = match &self.session_secret {
                    Some(secret) => secret.as_bytes().to_vec(),
                    None => {
                        tracing::info!("no --session-secret: using a random one; only dev sessions can be had");
                        random_secret()
                    }
                };
                SessionKey::Hs256 { secret }
            }
            SessionAlgorithm::Eddsa => SessionKey::EdDsa { public_key_pem: public_key()? },
            SessionAlgorithm::Rs256 => SessionKey::Rs256 { public_key_pem: public_key()? },
        };
        Ok(SessionConfig {
            key,
            audience: self.session_audience.clone(),
            issuer: self.session_issuer.clone(),
            dev_sessions: self.dev_sessions,
            ..SessionConfig::default()
        })
    }

    fn engine_config(&self) -> anyhow::Result<EngineConfig> {
        let token_secret = match &self.token_secret {
            Some(secret) => secret.as_bytes().to_vec(),
            None => {
                tracing::info!("no --token-secret: using a random one; nodes sharing a store need the same secret");
                random_secret()
            }
        };
        Ok(EngineConfig {
            node: self.node.clone(),
            hold_mode: self.hold_mode,
            allow_unsafe_hold_mode: self.allow_unsafe_hold_mode,
            lock_ttl_ms: self.lock_ttl_ms,
            hold_ttl_ms: self.hold_ttl_s.saturating_mul(1000),
            queue_order: match self.queue_order {
                QueueOrderArg::Fifo => QueueOrder::Fifo,
                QueueOrderArg::RandomAtOpen => QueueOrder::RandomAtOpen,
            },
            admission: AdmissionPolicy {
                rate_per_s: self.admission_rate_per_s,
                active_max: self.active_max,
                ..AdmissionPolicy::default()
            },
            rate_limits: RateLimits {
                per_ip_per_s: self.rate_limit_per_ip,
                per_token_per_s: self.rate_limit_per_token,
                burst: self.rate_limit_burst,
            },
            rate_limits_shared: self.shared_rate_limits,
            token_secret,
            sessions: self.session_config()?,
            payment_webhook_secret: self.payment_webhook_secret.as_ref().map(|secret| secret.as_bytes().to_vec()),
            accounts_per_ip_per_hour: self.accounts_per_ip_per_hour,
            seats_per_user_max: self.seats_per_user_max,
            idempotency_ttl_ms: self.idempotency_ttl_s.saturating_mul(1000),
            idempotency_lease_ms: self.idempotency_lease_ms,
            admin_tokens: self.admin_tokens.clone(),
            admin_auth_failures_max: self.admin_auth_failures_max,
            trusted_proxies: TrustedProxies::new(self.trusted_proxies.clone()),
            connections: ConnectionLimits {
                header_read_timeout_ms: self.header_read_timeout_s * 1000,
                body_read_timeout_ms: self.body_read_timeout_s * 1000,
                idle_timeout_ms: (self.idle_timeout_s > 0).then_some(self.idle_timeout_s * 1000),
                connections_max: self.connections_max,
            },
            ..EngineConfig::default()
        })
    }
}

fn random_secret() -> Vec<u8> {
    let mut rng = rand::rng();
    (0..32).map(|_| rng.random::<u8>()).collect()
}

// The session is the command's output.
#[allow(clippy::print_stdout)]
fn print_session(args: &SessionArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.session_secret.len() >= sessions::SESSION_SECRET_LEN_MIN,
        "--session-secret must have at least {} bytes",
        sessions::SESSION_SECRET_LEN_MIN
    );
    let now_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).context("the clock")?.as_secs();
    let claims = SessionClaims {
        sub: args.user.to_string(),
        aud: args.session_audience.clone(),
        iat: now_s,
        exp: now_s + args.ttl_s,
        iss: args.session_issuer.clone(),
    };
    println!("{}", sessions::sign_hs256(args.session_secret.as_bytes(), &claims).context("signing the session")?);
    Ok(())
}

/// A serving node is mostly small allocations on a few threads: mimalloc serves them with less
/// contention and fewer system calls than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    match Cli::parse().command {
        Command::Serve(args) => serve(*args).await,
        Command::Agent(args) => agent(args).await,
        Command::Migrate(args) => migrate(&args.database_url, MariaDbStoreConfig::default()).await.map(|_| ()),
        Command::Session(args) => print_session(&args),
    }
}

/// A store refusing an option's value, as the error that names the option.
fn option_error(option: &str, error: tcore_engine::store::StoreError) -> anyhow::Error {
    match error {
        tcore_engine::store::StoreError::Invalid { reason } => anyhow::anyhow!("{option}: {reason}"),
        other => anyhow::anyhow!("{option}: {other}"),
    }
}

/// Creates the database if it is missing and applies pending migrations.
async fn migrate(database_url: &str, config: MariaDbStoreConfig) -> anyhow::Result<MariaDbStore> {
    use sqlx::migrate::MigrateDatabase;
    let store =
        MariaDbStore::connect_lazy(database_url, config).map_err(|error| option_error("--database-url", error))?;
    let exists = sqlx::MySql::database_exists(database_url).await.context("--database-url: cannot reach MariaDB")?;
    if !exists {
        sqlx::MySql::create_database(database_url).await.context("--database-url: cannot create the database")?;
    }
    store.migrate().await.context("--database-url: applying the schema's migrations")?;
    tracing::info!("schema migrated");
    Ok(store)
}

/// What a node's stores are: both roles, and the outbox relay (to the Redis stream, or to the
/// log when there is none).
struct Stores {
    record: Arc<dyn RecordStore>,
    cache: Arc<dyn CacheStore>,
    relay: Option<OutboxRelay>,
}

async fn stores(args: &ServeArgs) -> anyhow::Result<Stores> {
    let seed: u64 = rand::rng().random();
    match args.store {
        StoreKind::Memory => {
            let store = Arc::new(MemoryStore::new(MemoryStoreConfig { seed, ..MemoryStoreConfig::default() }));
            // No stream to publish to: the relay drains the outbox to the log, so it stays bounded.
            let relay = OutboxRelay::to_log(store.clone(), OutboxRelayConfig::default());
            Ok(Stores { record: store.clone(), cache: store, relay: Some(relay) })
        }
        StoreKind::RedisMariadb => {
            let redis = RedisStore::connect_lazy(
                &args.redis_url,
                RedisStoreConfig {
                    prefix: args.redis_prefix.clone(),
                    seed,
                    instance: format!("{}-{seed:016x}", args.node),
                    ..RedisStoreConfig::default()
                },
            )
            .map_err(|error| option_error("--redis-url", error))?;
            let record: Arc<dyn RecordStore> = Arc::new(
                migrate(&args.database_url, args.mariadb_config())
                    .await?
                    .with_seat_gate(redis.seat_gate().with_hints(Duration::from_millis(args.seat_hint_ms)))
                    .with_idempotency_cache(redis.idempotency_cache()),
            );
            let relay = OutboxRelay::new(Arc::clone(&record), redis.clone(), OutboxRelayConfig::default());
            Ok(Stores { record, cache: Arc::new(redis), relay: Some(relay) })
        }
    }
}

// Each decision goes to stdout as one JSON line: that is the command's output.
#[allow(clippy::print_stdout)]
async fn agent(args: AgentArgs) -> anyhow::Result<()> {
    use std::cell::RefCell;
    use std::rc::Rc;

    use tcore_engine::agent::llm::{Cassette, LlmPolicy, OpenAiModel, Recording, Replaying};
    use tcore_engine::agent::policy::{NoPolicy, Policy};
    use tcore_engine::agent::rules::{RulesConfig, RulesPolicy};
    use tcore_engine::agent::{Agent, AgentOptions, http::HttpTransport};

    anyhow::ensure!(
        args.interval_s.is_finite() && (0.1..=3_600.0).contains(&args.interval_s),
        "--interval-s must be in 0.1..=3600"
    );
    anyhow::ensure!(
        args.llm_timeout_s.is_finite() && (0.1..=600.0).contains(&args.llm_timeout_s),
        "--llm-timeout-s must be in 0.1..=600"
    );
    let transport =
        HttpTransport::new(args.target.clone(), args.admin_token.clone(), std::time::Duration::from_secs(5));
    let options = AgentOptions { dry_run: args.dry_run };
    let model = || {
        let key = std::env::var(&args.llm_api_key_env).unwrap_or_default();
        OpenAiModel::new(&args.llm_base_url, &key, std::time::Duration::from_secs_f64(args.llm_timeout_s))
    };
    let recorded = Rc::new(RefCell::new(Cassette::default()));
    let policy: Box<dyn Policy> = match args.policy {
        PolicyArg::None => Box::new(NoPolicy),
        PolicyArg::Rules => Box::new(RulesPolicy::new(RulesConfig::default())),
        PolicyArg::Llm => Box::new(LlmPolicy::new(
            "llm",
            Recording { model: model(), cassette: Rc::clone(&recorded) },
            &args.llm_model,
        )),
        PolicyArg::Replay => {
            let path = args.cassette.as_deref().context("--policy replay needs --cassette")?;
            let cassette = Cassette::load(path).map_err(anyhow::Error::msg)?;
            Box::new(LlmPolicy::new("replay", Replaying { cassette }, &args.llm_model))
        }
    };
    let mut agent = Agent::new(transport, policy, Arc::new(SystemClock::new()), options);
    let interval = std::time::Duration::from_secs_f64(args.interval_s);
    let mut made = 0_u64;
    let run = agent.run(interval, |decision| {
        made += 1;
        println!("{}", serde_json::to_string(decision).unwrap_or_default());
        if args.policy == PolicyArg::Llm
            && let Some(path) = &args.cassette
            && let Err(error) = recorded.borrow().save(path)
        {
            tracing::error!(%error, "the cassette could not be written");
        }
        args.decisions == 0 || made < args.decisions
    });
    tokio::select! {
        biased;
        () = shutdown_signal() => {},
        () = run => {},
    }
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.engine_config()?;
    let stores = stores(&args).await?;
    let admin_enabled = !config.admin_tokens.is_empty();
    let engine = Engine::new(EngineParts {
        config,
        clock: Arc::new(SystemClock::new()),
        record: stores.record,
        cache: stores.cache,
        faults: Arc::new(NoFaults),
    })
    .context("refusing to start")?;
    if let Some(relay) = stores.relay {
        tokio::spawn(relay.run());
    }
    if let Some(path) = &args.catalog {
        let catalogue = Catalogue::read(path)?;
        match catalogue.load_into(&engine).await.with_context(|| format!("loading {}", path.display()))? {
            Loaded::Loaded { schedules, accounts } => tracing::info!(schedules, accounts, "catalogue loaded"),
            Loaded::AlreadyThere => tracing::info!("catalogue already loaded by another node"),
        }
    }
    if args.demo_seats > 0 {
        load_demo(&engine, &args).await?;
    }
    if !admin_enabled {
        tracing::warn!("no --admin-token: the admin API is not served");
    }
    if engine.config().hold_mode.is_unsafe() {
        tracing::warn!(
            "hold mode unfenced-lock is KNOWN UNSAFE: it oversells when a lock holder pauses past the lock TTL"
        );
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", args.listen))?;
    tracing::info!(listen = %args.listen, node = %engine.config().node, hold_mode = engine.config().hold_mode.name(), "serving");
    tcore_engine::server::serve(listener, engine, shutdown_signal()).await.context("server failed")?;
    tracing::info!("stopped");
    Ok(())
}

async fn load_demo(engine: &Arc<Engine>, args: &ServeArgs) -> anyhow::Result<()> {
    match engine.load_demo(args.demo_seats).await {
        Ok(()) => {}
        // Another node sharing the stores loaded it first.
        Err(tcore_engine::EngineError::Invalid { reason }) if reason.contains("exists") => {
            tracing::info!("demo concert already loaded by another node");
        }
        Err(error) => return Err(error).context("loading the demo concert"),
    }
    for index in 0..args.demo_users {
        engine.open_account(format!("demo-{index}"), args.demo_points).await.context("creating demo users")?;
    }
    tracing::info!(
        seats = args.demo_seats,
        users = args.demo_users,
        points = args.demo_points,
        "demo concert loaded as schedule 1"
    );
    Ok(())
}

async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
    tracing::info!("shutting down: finishing requests in flight");
}
