//! Where a live run's engine runs: nodes `tcore load --spawn` starts itself (one on the
//! embedded memory store, or the scenario's nodes on Redis + MariaDB, each run on a fresh
//! database and key prefix), or nodes that already run (`--target`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use parking_lot::Mutex;

use super::faults::{Link, LiveFaults, faulted_links};
use super::proxy::{FaultProxy, LinkMode, ProxyCounts};
use crate::scenario::{AdmissionOrder, Scenario, StoreKind};
use crate::scenario::{STORE_CACHE_HOST, STORE_RECORD_HOST};

/// How long a spawned node may take to answer `/readyz` (migrations and the catalogue's
/// accounts come first on the first node), or the run's own Redis server to answer `PING`.
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
    /// What was started, to stop at the end and for the fault timeline to kill, restart,
    /// stop and continue; empty for `--target`.
    processes: Mutex<Vec<Process>>,
    /// What the deployment is, for the run result.
    pub description: String,
    /// The fault proxies, when faults act on links.
    proxies: Option<Proxies>,
}

/// A process a spawned deployment runs: an engine node, or the run's own Redis server.
#[derive(Debug)]
struct Process {
    /// The scenario's name for its host: `engine-N` or `store-cache`.
    host: String,
    spec: ProcessSpec,
    /// `None` while it is down (killed by a `crash` fault).
    child: Option<Child>,
}

/// How to start a process, again after a crash: the same program, arguments, environment and
/// port; its output goes on at the end of the same log.
#[derive(Debug, Clone)]
struct ProcessSpec {
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    ready: Readiness,
}

/// How to tell that a process is ready.
#[derive(Debug, Clone)]
enum Readiness {
    /// An engine node: `GET {base}/readyz` answers 2xx.
    Http(String),
    /// A Redis server: `PING` on this port answers `+PONG`.
    RedisPing(u16),
}

impl ProcessSpec {
    fn start(&self) -> anyhow::Result<Child> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let mut command = Command::new(&self.program);
        command.args(&self.args).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        // A process group of its own: a Ctrl-C at the terminal stops the load, which then reads
        // the state back from the nodes, rather than killing the nodes with it.
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        for (key, value) in &self.env {
            command.env(key, value);
        }
        command.spawn().with_context(|| format!("starting {}", self.program.display()))
    }

    /// Waits until the process is ready; fails with its log's tail if it exits first.
    fn wait_ready(&self, child: &mut Child) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_WITHIN;
        let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(2)).build()?;
        loop {
            if let Some(status) = child.try_wait()? {
                let tail = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<&str> = tail.lines().rev().take(5).collect();
                anyhow::bail!(
                    "{} exited ({status}) before it was ready; its log {} ends:\n{}\n\
                     (with redis+mariadb, start Redis and MariaDB first: `bash .ci/run` shows how)",
                    self.program.display(),
                    self.log.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            let ready = match &self.ready {
                Readiness::Http(base) => {
                    client.get(format!("{base}/readyz")).send().is_ok_and(|response| response.status().is_success())
                }
                Readiness::RedisPing(port) => redis_pongs(*port),
            };
            if ready {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} was not ready within {READY_WITHIN:?} (log: {})",
                self.program.display(),
                self.log.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Whether the Redis server on `port` answers `PING`.
fn redis_pongs(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut answer = [0_u8; 7];
    stream.write_all(b"PING\r\n").is_ok() && stream.read_exact(&mut answer).is_ok() && answer == *b"+PONG\r\n"
}

/// How `--spawn` starts the nodes.
#[derive(Debug, Clone)]
pub struct SpawnOptions {
    pub engine_bin: PathBuf,
    /// Where the nodes' logs and the catalogue go.
    pub dir: PathBuf,
    /// With redis+mariadb: the Redis server, unless the scenario has faults on `store-cache`:
    /// then the run starts a Redis server of its own (`redis_server_bin`), which it may kill
    /// and stop.
    pub redis_url: String,
    pub redis_server_bin: PathBuf,
    /// The MariaDB server, without a database: each run makes its own.
    pub mariadb_url: String,
}

impl Deployment {
    /// Nodes that already run; their admin token and session secret come from the operator.
    pub fn target(nodes: Vec<String>, admin_token: String, session_secret: Vec<u8>) -> Deployment {
        let description = format!("{} target node(s)", nodes.len());
        let nodes = nodes.into_iter().map(|node| node.trim_end_matches('/').to_owned()).collect();
        Deployment { nodes, admin_token, session_secret, processes: Mutex::new(Vec::new()), description, proxies: None }
    }

    /// Starts the scenario's nodes (and, for faults on `store-cache`, a Redis server of the
    /// run's own) and waits until each is ready.
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
        let mut deployment = Deployment {
            nodes: Vec::new(),
            admin_token: admin_token.split_once('=').map(|(_, secret)| secret.to_owned()).unwrap_or_default(),
            session_secret: session_secret.clone().into_bytes(),
            processes: Mutex::new(Vec::new()),
            description: String::new(),
            proxies: None,
        };
        let (nodes_count, store) = match scenario.engine.store {
            StoreKind::Memory => {
                deployment.description = "1 spawned node on the embedded memory store (it cannot be shared)".to_owned();
                (1, Vec::new())
            }
            StoreKind::RedisMariadb => {
                // The faults that stop or kill the cache store need a Redis server of the run's own.
                let redis_url = if LiveFaults::of(scenario).hosts().any(|host| host == STORE_CACHE_HOST) {
                    let port = free_port()?;
                    deployment.start(
                        STORE_CACHE_HOST,
                        ProcessSpec {
                            program: options.redis_server_bin.clone(),
                            args: redis_server_args(port, &options.dir),
                            env: Vec::new(),
                            log: options.dir.join(format!("{STORE_CACHE_HOST}.log")),
                            ready: Readiness::RedisPing(port),
                        },
                    )?;
                    format!("redis://127.0.0.1:{port}")
                } else {
                    options.redis_url.clone()
                };
                let database = format!("tcore_live_{run_id}");
                let database_url = format!("{}/{database}", options.mariadb_url.trim_end_matches('/'));
                deployment.description = format!(
                    "{} spawned node(s) on Redis {redis_url} + MariaDB (database {database}, key prefix tcore-live:{run_id}:)",
                    scenario.engine.nodes
                );
                let store = vec![
                    ("TCORE_STORE", "redis+mariadb".to_owned()),
                    ("TCORE_REDIS_URL", redis_url),
                    ("TCORE_REDIS_PREFIX", format!("tcore-live:{run_id}:")),
                    ("TCORE_DATABASE_URL", database_url),
                ];
                (scenario.engine.nodes.max(1), store)
            }
        };
        let links = faulted_links(scenario);
        if !links.is_empty() {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("fault-proxy")
                .enable_all()
                .build()
                .context("the fault proxies' runtime")?;
            deployment.proxies = Some(Proxies { runtime, links: BTreeMap::new() });
        }
        for index in 1..=nodes_count {
            let port = free_port()?;
            let host = format!("engine-{index}");
            let base = format!("http://127.0.0.1:{port}");
            // The links faults act on go through a proxy each.
            let store: Vec<(&str, String)> = store
                .iter()
                .map(|(key, value)| {
                    let to = match *key {
                        "TCORE_REDIS_URL" => STORE_CACHE_HOST,
                        "TCORE_DATABASE_URL" => STORE_RECORD_HOST,
                        _ => return Ok((*key, value.clone())),
                    };
                    Ok((*key, deployment.proxied_url(&links, (&host, to), value)?))
                })
                .collect::<anyhow::Result<_>>()?;
            let mut env: Vec<(String, String)> = vec![
                ("TCORE_LISTEN".into(), format!("127.0.0.1:{port}")),
                ("TCORE_NODE".into(), host.clone()),
                ("TCORE_CATALOG".into(), catalogue_path.display().to_string()),
                ("TCORE_ADMIN_TOKENS".into(), admin_token.clone()),
                ("TCORE_SESSION_SECRET".into(), session_secret.clone()),
                ("TCORE_TOKEN_SECRET".into(), token_secret.clone()),
                // Fans' addresses come in `X-Forwarded-For` from the load driver on loopback.
                ("TCORE_TRUSTED_PROXIES".into(), "127.0.0.1/32".into()),
                ("RUST_LOG".into(), std::env::var("TCORE_ENGINE_LOG").unwrap_or_else(|_| "warn".into())),
            ];
            env.extend(
                engine_settings(scenario).into_iter().chain(store.iter().cloned()).map(|(k, v)| (k.to_owned(), v)),
            );
            // The first node loads the catalogue (and migrates the database) before it serves;
            // the others then find it there.
            deployment.start(
                &host,
                ProcessSpec {
                    program: options.engine_bin.clone(),
                    args: vec!["serve".into()],
                    env,
                    log: options.dir.join(format!("{host}.log")),
                    ready: Readiness::Http(base.clone()),
                },
            )?;
            let url = deployment.proxied_url(&links, (DRIVER, &host), &base)?;
            deployment.nodes.push(url);
        }
        Ok(deployment)
    }

    /// `url` with its host and port replaced by those of a new proxy for `link`, if a fault
    /// acts on that link; `url` as it is otherwise.
    fn proxied_url(&mut self, links: &BTreeSet<Link>, link: (&str, &str), url: &str) -> anyhow::Result<String> {
        let key = (link_end(link.0).to_owned(), link.1.to_owned());
        let faulted = links.iter().any(|(from, to)| (link_end(from), to.as_str()) == (key.0.as_str(), link.1));
        let Some(proxies) = self.proxies.as_mut().filter(|_| faulted) else { return Ok(url.to_owned()) };
        let mut parsed = reqwest::Url::parse(url).with_context(|| format!("reading the URL {url}"))?;
        let upstream = parsed
            .socket_addrs(|| None)
            .with_context(|| format!("resolving {url}"))?
            .into_iter()
            .next()
            .with_context(|| format!("no address for {url}"))?;
        let proxy = {
            let _runtime = proxies.runtime.enter();
            FaultProxy::start(upstream).with_context(|| format!("a fault proxy for {} → {}", link.0, link.1))?
        };
        parsed.set_ip_host(proxy.local_addr().ip()).map_err(|()| anyhow::anyhow!("cannot proxy {url}"))?;
        parsed.set_port(Some(proxy.local_addr().port())).map_err(|()| anyhow::anyhow!("cannot proxy {url}"))?;
        proxies.links.insert(key, proxy);
        // A base URL keeps no trailing slash.
        Ok(parsed.as_str().trim_end_matches('/').to_owned())
    }

    /// Whether a fault proxy sits on `from` → `to`.
    pub fn has_link(&self, from: &str, to: &str) -> bool {
        self.proxies
            .as_ref()
            .is_some_and(|proxies| proxies.links.contains_key(&(link_end(from).to_owned(), to.to_owned())))
    }

    /// Sets the mode of the proxy on `from` → `to`.
    pub fn set_link(&self, from: &str, to: &str, mode: LinkMode) -> anyhow::Result<()> {
        let proxy = self
            .proxies
            .as_ref()
            .and_then(|proxies| proxies.links.get(&(link_end(from).to_owned(), to.to_owned())))
            .with_context(|| format!("no fault proxy on {from} → {to}"))?;
        proxy.set(mode);
        Ok(())
    }

    /// What went through each fault proxy, by link.
    pub fn link_counts(&self) -> BTreeMap<String, ProxyCounts> {
        self.proxies
            .iter()
            .flat_map(|proxies| &proxies.links)
            .map(|((from, to), proxy)| (format!("{from} → {to}"), proxy.counts()))
            .collect()
    }

    /// Starts a process for `host` and waits until it is ready.
    fn start(&self, host: &str, spec: ProcessSpec) -> anyhow::Result<()> {
        let mut child = spec.start()?;
        let ready = spec.wait_ready(&mut child);
        self.processes.lock().push(Process { host: host.to_owned(), spec, child: Some(child) });
        ready
    }

    /// Whether this deployment runs `host`'s process (it can crash and pause it).
    pub fn runs(&self, host: &str) -> bool {
        self.processes.lock().iter().any(|process| process.host == host)
    }

    /// Kills `host`'s process at once (SIGKILL), as a crash does.
    pub fn kill(&self, host: &str) -> anyhow::Result<()> {
        let mut processes = self.processes.lock();
        let process = find(&mut processes, host)?;
        if let Some(mut child) = process.child.take() {
            child.kill().with_context(|| format!("killing {host}"))?;
            child.wait().with_context(|| format!("reaping {host}"))?;
        }
        Ok(())
    }

    /// Starts `host`'s process again after a crash, on the same port, and waits until it is
    /// ready. A process that runs is left alone.
    pub fn restart(&self, host: &str) -> anyhow::Result<()> {
        let spec = {
            let mut processes = self.processes.lock();
            let process = find(&mut processes, host)?;
            if process.child.is_some() {
                return Ok(());
            }
            process.spec.clone()
        };
        let mut child = spec.start()?;
        let ready = spec.wait_ready(&mut child);
        find(&mut self.processes.lock(), host)?.child = Some(child);
        ready
    }

    /// Stops (`SIGSTOP`) or continues (`SIGCONT`) `host`'s process.
    pub fn pause(&self, host: &str, stopped: bool) -> anyhow::Result<()> {
        let mut processes = self.processes.lock();
        let process = find(&mut processes, host)?;
        let child = process.child.as_ref().with_context(|| format!("{host} is down"))?;
        signal(child, if stopped { ProcessSignal::Stop } else { ProcessSignal::Continue })
            .with_context(|| format!("signalling {host}"))
    }

    /// Stops what was started: SIGTERM, then SIGKILL after a while.
    pub fn stop(&mut self) {
        let mut processes = std::mem::take(&mut *self.processes.lock());
        for child in processes.iter().filter_map(|process| process.child.as_ref()) {
            // A stopped process would not act on SIGTERM.
            let _ = signal(child, ProcessSignal::Continue);
            let _ = signal(child, ProcessSignal::Terminate);
        }
        let deadline = Instant::now() + STOP_WITHIN;
        for child in processes.iter_mut().filter_map(|process| process.child.as_mut()) {
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Every `client-*` host of a scenario is the one load driver of a live run.
const DRIVER: &str = "client-*";

/// The name a link end has among a deployment's proxies.
fn link_end(host: &str) -> &str {
    if host.starts_with("client-") { DRIVER } else { host }
}

/// The fault proxies on a deployment's links, and the runtime they run on.
#[derive(Debug)]
struct Proxies {
    runtime: tokio::runtime::Runtime,
    links: BTreeMap<Link, FaultProxy>,
}

fn find<'a>(processes: &'a mut [Process], host: &str) -> anyhow::Result<&'a mut Process> {
    processes
        .iter_mut()
        .find(|process| process.host == host)
        .with_context(|| format!("no process of {host} was started"))
}

/// A Redis server that keeps nothing on disk, as the engine's cache store is run: restarted,
/// it comes back empty.
fn redis_server_args(port: u16, dir: &Path) -> Vec<String> {
    [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        &dir.display().to_string(),
    ]
    .into_iter()
    .map(str::to_owned)
    .collect()
}

#[derive(Debug, Clone, Copy)]
enum ProcessSignal {
    Stop,
    Continue,
    Terminate,
}

#[cfg(target_os = "linux")]
fn signal(child: &Child, which: ProcessSignal) -> anyhow::Result<()> {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let pid = i32::try_from(child.id())?;
    let signal = match which {
        ProcessSignal::Stop => Signal::SIGSTOP,
        ProcessSignal::Continue => Signal::SIGCONT,
        ProcessSignal::Terminate => Signal::SIGTERM,
    };
    kill(Pid::from_raw(pid), signal)?;
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn signal(_child: &Child, which: ProcessSignal) -> anyhow::Result<()> {
    anyhow::bail!("{which:?}: process signals are only sent on Linux")
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
