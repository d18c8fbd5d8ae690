//! The stores a contract test runs against: the memory store, or Redis and MariaDB with a
//! database and a key prefix of the test's own, so that tests running at once never meet.
//!
//! When a server does not answer, the test prints `skipped: <reason>` and passes, unless
//! `TCORE_REQUIRE_SERVICES=1` (as CI sets it): then it fails, naming the server.

use std::sync::Arc;
use std::time::Duration;

use rand::RngExt;
use sqlx::migrate::MigrateDatabase;
use tcore_engine::store::{
    CacheStore, MariaDbStore, MariaDbStoreConfig, MemoryStore, MemoryStoreConfig, RecordStore, RedisStore,
    RedisStoreConfig,
};

/// MariaDB's server, without a database (the tests create theirs).
pub fn mariadb_server_url() -> String {
    std::env::var("TCORE_TEST_MARIADB_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
}

/// The Redis server.
pub fn redis_url() -> String {
    std::env::var("TCORE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

const SERVER_ANSWER_MAX: Duration = Duration::from_secs(5);

/// Both store roles of one backend, and what it takes to clean up after it.
pub struct Stores {
    pub backend: &'static str,
    pub record: Arc<dyn RecordStore>,
    pub cache: Arc<dyn CacheStore>,
    pub redis: Option<RedisStore>,
    pub mariadb: Option<MariaDbStore>,
    pub database_url: Option<String>,
    pub redis_prefix: Option<String>,
    _cleanup: Option<Cleanup>,
}

impl Stores {
    /// The embedded store in both roles.
    pub fn memory() -> Self {
        let store = Arc::new(MemoryStore::new(MemoryStoreConfig { seed: 7, ..MemoryStoreConfig::default() }));
        Self {
            backend: "memory",
            record: store.clone(),
            cache: store,
            redis: None,
            mariadb: None,
            database_url: None,
            redis_prefix: None,
            _cleanup: None,
        }
    }

    /// Redis and MariaDB with a fresh database and key prefix; `None` when a server is down
    /// and the test may be skipped.
    pub async fn redis_mariadb() -> Option<Self> {
        let suffix: u64 = rand::rng().random();
        let name = format!("tcore_t_{suffix:016x}");
        let database_url = format!("{}/{name}", mariadb_server_url());
        let prefix = format!("{name}:");
        let cleanup = Cleanup { database_url: database_url.clone(), redis_prefix: prefix.clone() };
        let created = tokio::time::timeout(SERVER_ANSWER_MAX, sqlx::MySql::create_database(&database_url)).await;
        match created {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                return unavailable(&format!("MariaDB at {} does not answer: {error}", mariadb_server_url()));
            }
            Err(_) => return unavailable(&format!("MariaDB at {} does not answer in time", mariadb_server_url())),
        }
        let redis = RedisStore::connect_lazy(
            &redis_url(),
            RedisStoreConfig { prefix: prefix.clone(), seed: 7, instance: name.clone(), ..RedisStoreConfig::default() },
        )
        .expect("the Redis URL is well formed");
        if let Err(error) = redis.ping().await {
            drop(cleanup);
            return unavailable(&format!("Redis at {} does not answer: {error}", redis_url()));
        }
        // Few connections per test: many tests run at once against one server.
        let config = MariaDbStoreConfig { connections_max: 8, ..MariaDbStoreConfig::default() };
        let mariadb = MariaDbStore::connect_lazy(&database_url, config)
            .expect("the MariaDB URL is well formed")
            .with_seat_gate(redis.seat_gate())
            .with_idempotency_cache(redis.idempotency_cache());
        mariadb.migrate().await.expect("the schema migrates on a fresh database");
        Some(Self {
            backend: "redis+mariadb",
            record: Arc::new(mariadb.clone()),
            cache: Arc::new(redis.clone()),
            redis: Some(redis),
            mariadb: Some(mariadb),
            database_url: Some(database_url),
            redis_prefix: Some(prefix),
            _cleanup: Some(cleanup),
        })
    }
}

fn unavailable<T>(reason: &str) -> Option<T> {
    if std::env::var("TCORE_REQUIRE_SERVICES").is_ok_and(|value| value == "1") {
        panic!("TCORE_REQUIRE_SERVICES=1, but {reason}");
    }
    eprintln!("skipped: {reason} (set TCORE_REQUIRE_SERVICES=1 to make this a failure)");
    None
}

/// Drops the test's database and deletes its Redis keys, even when the test panicked.
struct Cleanup {
    database_url: String,
    redis_prefix: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (database_url, prefix) = (self.database_url.clone(), self.redis_prefix.clone());
        // A runtime of its own: the test's runtime may be the one shutting down.
        let cleaning = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            runtime.block_on(async move {
                let _ = tokio::time::timeout(SERVER_ANSWER_MAX, sqlx::MySql::drop_database(&database_url)).await;
                let _ = tokio::time::timeout(SERVER_ANSWER_MAX, delete_keys(&prefix)).await;
            });
        });
        let _ = cleaning.join();
    }
}

/// Deletes every Redis key under `prefix`, as a Redis restarted empty would have lost them.
pub async fn delete_keys(prefix: &str) -> redis::RedisResult<()> {
    let client = redis::Client::open(redis_url())?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1_000)
            .query_async(&mut connection)
            .await?;
        if !keys.is_empty() {
            redis::cmd("DEL").arg(&keys).query_async::<()>(&mut connection).await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// Runs one test body against every backend: `contract!(async fn name(stores) { ... })`
/// makes `name::memory` and `name::redis_mariadb`.
#[macro_export]
macro_rules! contract {
    ($(#[$meta:meta])* async fn $name:ident($stores:ident) $body:block) => {
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn body($stores: $crate::services::Stores) $body

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                body($crate::services::Stores::memory()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis_mariadb() {
                if let Some(stores) = $crate::services::Stores::redis_mariadb().await {
                    body(stores).await;
                }
            }
        }
    };
}

/// A TCP proxy in front of a server, which a test can cut (every connection closed, new ones
/// refused) and restore: the server "goes down" without touching the real one.
#[derive(Debug)]
pub struct CutProxy {
    pub port: u16,
    open: Arc<std::sync::atomic::AtomicBool>,
    connections: Arc<parking_lot::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl CutProxy {
    /// A proxy on a free local port to `upstream` (`host:port`).
    pub async fn start(upstream: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind a local port");
        let port = listener.local_addr().expect("local address").port();
        let open = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let connections = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let (accept_open, accept_connections) = (Arc::clone(&open), Arc::clone(&connections));
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !accept_open.load(std::sync::atomic::Ordering::SeqCst) {
                    continue;
                }
                let upstream = upstream.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                accept_connections.lock().push(task.abort_handle());
            }
        });
        Self { port, open, connections, accept }
    }

    /// Closes every connection and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        for connection in self.connections.lock().drain(..) {
            connection.abort();
        }
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}
