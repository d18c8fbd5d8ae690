//! Where a live run's engine runs: nodes `tcore load --spawn` starts itself (one on the
//! embedded memory store, or the scenario's nodes on Redis + MariaDB, each run on a fresh
//! database and key prefix), or nodes that already run (`--target`).

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;

use crate::scenario::{AdmissionOrder, Scenario, StoreKind};

/// How long a spawned node may take to answer `/readyz` (migrations and the catalogue's
/// accounts come first on the first node).
const READY_WITHIN: Duration = Duration::from_secs(120);
/// How long a node may take to stop once asked to.
const STOP_WITHIN: Duration = Duration::from_secs(10);
/// The admin token's name in the nodes' audit logs.
const ADMIN_TOKEN_NAME: &str = "tcore-load";

/// The engine nodes of a live run.
#[derive(Debug)]
pub struct Deployment {
    /// Each node's base URL, `http://host:port`.
    pub nodes: Vec<String>,
    pub admin_token: String,
    /// The HS256 secret fans' sessions are signed with.
    pub session_secret: Vec<u8>,
    /// What was started, to stop at the end; empty for `--target`.
    processes: Vec<Child>,
    /// What the deployment is, for the run result.
    pub description: String,
}

/// How `--spawn` starts the nodes.
#[derive(Debug, Clone)]
pub struct SpawnOptions {
    pub engine_bin: PathBuf,
    /// Where the nodes' logs and the catalogue go.
    pub dir: PathBuf,
    pub redis_url: String,
    /// The MariaDB server, without a database: each run makes its own.
    pub mariadb_url: String,
}

impl Deployment {
    /// Nodes that already run; their admin token and session secret come from the operator.
    pub fn target(nodes: Vec<String>, admin_token: String, session_secret: Vec<u8>) -> Deployment {
        let description = format!("{} target node(s)", nodes.len());
        let nodes = nodes.into_iter().map(|node| node.trim_end_matches('/').to_owned()).collect();
        Deployment { nodes, admin_token, session_secret, processes: Vec::new(), description }
    }

    /// Starts the scenario's nodes and waits until each is ready.
    pub fn spawn(scenario: &Scenario, options: &SpawnOptions, users: u64) -> anyhow::Result<Deployment> {
        anyhow::ensure!(
            options.engine_bin.is_file(),
            "the engine binary {} does not exist: build it (`cargo build --bin tcore-engine`) or give --engine-bin",
            options.engine_bin.display()
        );
        std::fs::create_dir_all(&options.dir).with_context(|| format!("creating {}", options.dir.display()))?;
        let catalogue_path = options.dir.join("catalogue.json");
        std::fs::write(&catalogue_path, serde_json::to_vec_pretty(&scenario.catalogue(users))?)
            .with_context(|| format!("writing {}", catalogue_path.display()))?;
        let run_id = run_id();
        let admin_token = format!("{ADMIN_TOKEN_NAME}={}", secret(&run_id, "admin"));
        let session_secret = secret(&run_id, "session");
        let token_secret = secret(&run_id, "token");
        let (nodes_count, store, description) = match scenario.engine.store {
            StoreKind::Memory => {
                (1, Vec::new(), "1 spawned node on the embedded memory store (it cannot be shared)".to_owned())
            }
            StoreKind::RedisMariadb => {
                let database = format!("tcore_live_{run_id}");
                let database_url = format!("{}/{database}", options.mariadb_url.trim_end_matches('/'));
                let store = vec![
                    ("TCORE_STORE", "redis+mariadb".to_owned()),
                    ("TCORE_REDIS_URL", options.redis_url.clone()),
                    ("TCORE_REDIS_PREFIX", format!("tcore-live:{run_id}:")),
                    ("TCORE_DATABASE_URL", database_url),
                ];
                let description = format!(
                    "{} spawned node(s) on Redis + MariaDB (database {database}, key prefix tcore-live:{run_id}:)",
                    scenario.engine.nodes
                );
                (scenario.engine.nodes.max(1), store, description)
            }
        };
        let mut deployment = Deployment {
            nodes: Vec::new(),
            admin_token: admin_token.split_once('=').map(|(_, secret)| secret.to_owned()).unwrap_or_default(),
            session_secret: session_secret.clone().into_bytes(),
            processes: Vec::new(),
            description,
        };
        for index in 1..=nodes_count {
            let port = free_port()?;
            let node = format!("engine-{index}");
            let log = File::create(options.dir.join(format!("{node}.log")))?;
            let mut command = Command::new(&options.engine_bin);
            command
                .arg("serve")
                .env("TCORE_LISTEN", format!("127.0.0.1:{port}"))
                .env("TCORE_NODE", &node)
                .env("TCORE_CATALOG", &catalogue_path)
                .env("TCORE_ADMIN_TOKENS", &admin_token)
                .env("TCORE_SESSION_SECRET", &session_secret)
                .env("TCORE_TOKEN_SECRET", &token_secret)
                // Fans' addresses come in `X-Forwarded-For` from the load driver on loopback.
                .env("TCORE_TRUSTED_PROXIES", "127.0.0.1/32")
                .env("RUST_LOG", std::env::var("TCORE_ENGINE_LOG").unwrap_or_else(|_| "warn".into()))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            for (key, value) in engine_settings(scenario).into_iter().chain(store.iter().cloned()) {
                command.env(key, value);
            }
            let child = command.spawn().with_context(|| format!("starting {}", options.engine_bin.display()))?;
            deployment.processes.push(child);
            let base = format!("http://127.0.0.1:{port}");
            // The first node loads the catalogue (and migrates the database) before it serves;
            // the others then find it there.
            deployment.wait_ready(&base, &options.dir.join(format!("{node}.log")))?;
            deployment.nodes.push(base);
        }
        Ok(deployment)
    }

    fn wait_ready(&mut self, base: &str, log: &Path) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_WITHIN;
        let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(2)).build()?;
        loop {
            if let Some(child) = self.processes.last_mut()
                && let Some(status) = child.try_wait()?
            {
                let tail = std::fs::read_to_string(log).unwrap_or_default();
                let tail: Vec<&str> = tail.lines().rev().take(5).collect();
                anyhow::bail!(
                    "the engine at {base} exited ({status}) before it was ready; its log {} ends:\n{}\n\
                     (with redis+mariadb, start Redis and MariaDB first: `bash .ci/run` shows how)",
                    log.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            if client.get(format!("{base}/readyz")).send().is_ok_and(|response| response.status().is_success()) {
                return Ok(());
            }
            anyhow::ensure!(Instant::now() < deadline, "the engine at {base} was not ready within {READY_WITHIN:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops what was started: SIGTERM, then SIGKILL after a while.
    pub fn stop(&mut self) {
        for child in &mut self.processes {
            terminate(child);
        }
        let deadline = Instant::now() + STOP_WITHIN;
        for child in &mut self.processes {
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.processes.clear();
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(target_os = "linux")]
fn terminate(child: &Child) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
}

#[cfg(not(target_os = "linux"))]
fn terminate(child: &mut Child) {
    let _ = child.kill();
}

/// The scenario's engine settings, as the engine reads them from its environment.
fn engine_settings(scenario: &Scenario) -> Vec<(&'static str, String)> {
    let engine = &scenario.engine;
    let mut settings = vec![
        ("TCORE_HOLD_MODE", engine.hold_mode.name().to_owned()),
        ("TCORE_HOLD_TTL_S", engine.hold_ttl_s.to_string()),
        ("TCORE_LOCK_TTL_MS", engine.lock_ttl_ms.to_string()),
        ("TCORE_SEATS_PER_USER_MAX", engine.seats_per_user_max.to_string()),
        ("TCORE_ADMISSION_RATE", engine.admission.rate_per_s.to_string()),
        ("TCORE_ACTIVE_MAX", engine.admission.active_max.to_string()),
        ("TCORE_QUEUE_ORDER", queue_order(engine.admission.order).to_owned()),
    ];
    if engine.hold_mode.is_unsafe() {
        settings.push(("TCORE_ALLOW_UNSAFE_HOLD_MODE", "true".to_owned()));
    }
    // Without limits in the scenario, as in a simulated run: limits high enough never to bite.
    let (per_ip, per_token, burst) = engine
        .rate_limits
        .as_ref()
        .map_or((100_000, 100_000, 100_000), |limits| (limits.per_ip_per_s, limits.per_token_per_s, limits.burst));
    settings.push(("TCORE_RATE_LIMIT_PER_IP", per_ip.to_string()));
    settings.push(("TCORE_RATE_LIMIT_PER_TOKEN", per_token.to_string()));
    settings.push(("TCORE_RATE_LIMIT_BURST", burst.to_string()));
    settings
}

/// A queue order as the engine's command line names it.
fn queue_order(order: AdmissionOrder) -> &'static str {
    match order {
        AdmissionOrder::Fifo => "fifo",
        AdmissionOrder::RandomAtOpen => "random-at-open",
    }
}

/// A name for this run's database and key prefix: unique on this machine.
fn run_id() -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    format!("{}_{}", now.as_millis(), std::process::id())
}

/// A secret of this run (at least 32 bytes), not guessable from outside the machine.
fn secret(run_id: &str, purpose: &str) -> String {
    use rand::RngExt;
    let random: u128 = rand::rng().random();
    format!("tcore-load-{purpose}-{run_id}-{random:032x}")
}

/// A loopback port free right now.
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}
