//! The simulated world: a turmoil simulation with one host per engine node (each serving the
//! engine's real router on simulated sockets), client hosts that multiplex virtual users, and
//! the fault timeline applied between simulation steps.
//!
//! **Invariant:** one seed drives the run. turmoil's network is seeded with it, every virtual
//! user draws from an RNG seeded from it and its index, the stores' RNGs are seeded from it,
//! and the engine reads time only from [`node::SimClock`], i.e. simulated time. Nothing here
//! reads the wall clock except the caller's progress callback, which only displays.

pub mod agent;
pub mod net;
pub mod node;

pub mod store_rpc;
pub mod users;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use anyhow::Context as _;
use parking_lot::Mutex;
use serde::Serialize;
use tcore_engine::clock::ManualClock;
use tcore_engine::config::{
    ADMIN_TOKEN_NAME_DEFAULT, AdminToken, ConnectionLimits, EngineConfig, RateLimits, TrustedProxies,
};
use tcore_engine::domain::AdmissionPolicy;
use tcore_engine::faults::{FaultPoint, NoFaults};
use tcore_engine::sessions::{SessionConfig, SessionKey};
use tcore_engine::store::{CacheStore, MemoryStoreConfig, OutboxRelay, OutboxRelayConfig, RecordStore};
use tcore_engine::{Engine, EngineParts};

use self::agent::{AgentHost, AgentRun};
use self::net::{ENGINE_PORT, HttpClient, RequestLog, SentRequest, SimListener};
use self::node::{ArmedPause, FiredPause, SimClock, SimFaults, Trigger};
use self::store_rpc::{
    DataLossReport, DataLossTicket, FailoverTicket, JournalClock, RemoteStore, RemoteStoreConfig, Replication,
    SemiSync, StoreControl, StoreHostConfig, serve_store,
};
use self::users::SimTransport;
use crate::history::{CheckConfig, History, HistoryRecorder, StoresRead};
use crate::journey::{JourneyPlan, Journeys, UserOutcomes};
use crate::scenario::{self, Fault, Scenario};

/// Wall time the engine believes it is at the start of every run.
pub const EPOCH_MS: u64 = 1_800_000_000_000;
/// How long the world runs on after the timeline, with every fault healed, so that holds
/// expire and retries settle before the final state is read.
pub const DRAIN_AFTER_HOLD_TTL: Duration = Duration::from_secs(5);
/// The port every store host serves its protocol on.
pub const STORE_PORT: u16 = 7000;
/// How far back a store host can fail over (its replication window).
pub const REPLICATION_WINDOW: Duration = Duration::from_secs(30);
/// How often the drain looks for holds still waiting to expire.
const DRAIN_CHECK_EVERY_US: u64 = 1_000_000;
/// How often the progress callback is called, in simulated time.
const PROGRESS_EVERY_US: u64 = 1_000_000;
/// The most passes of the relay after a run: at 500 events a pass, 50 million events.
const RELAY_PASSES_MAX: u32 = 100_000;

/// A fault's time span, for the score and the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultWindow {
    pub index: usize,
    pub kind: &'static str,
    pub start_us: u64,
    pub end_us: u64,
    pub hosts: Vec<String>,
}

/// What a store failover did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoreFailoverOutcome {
    /// The index of the fault in the scenario's `[[faults]]`.
    pub fault: usize,
    pub host: String,
    pub at_us: u64,
    pub writes_replayed: u64,
    pub writes_lost: u64,
    /// Writes younger than `lose_last` kept because the standby had acknowledged them
    /// (semi-sync): at stake, and saved.
    pub writes_kept_by_standby: u64,
    /// Store calls in flight when it ran, whose callers never learn their outcome.
    pub calls_cut_off: u64,
    /// Why the failover did not happen, if it did not.
    pub refused: Option<String>,
}

/// What a store host lost in a `crash` with `lose_data`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoreDataLossOutcome {
    /// The index of the fault in the scenario's `[[faults]]`.
    pub fault: usize,
    pub host: String,
    /// When the host crashed.
    pub at_us: u64,
    /// What the host held when it came back empty; `None` if it never came back.
    pub lost: Option<DataLossReport>,
}

/// What the world hands back.
#[derive(Debug)]
pub struct WorldRun {
    pub store_failovers: Vec<StoreFailoverOutcome>,
    pub store_data_losses: Vec<StoreDataLossOutcome>,
    pub history: History,
    pub outcomes: UserOutcomes,
    pub fault_windows: Vec<FaultWindow>,
    pub fired_pauses: Vec<FiredPause>,
    pub users: u64,
    /// What the ops agent did; `None` without an agent.
    pub agent: Option<AgentRun>,
    /// Every request each client host sent, in order, one list per host (`client-1` first);
    /// empty unless [`RunOptions::log_requests`] asked for it.
    pub requests: Vec<Vec<SentRequest>>,
}

/// How [`run_with`] runs a world beyond what the scenario says.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Keep every request the client hosts send (see [`WorldRun::requests`]). It changes
    /// nothing in the run itself.
    pub log_requests: bool,
}

/// Where a run is, for a progress display.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub sim_us: u64,
    pub total_us: u64,
    pub operations: u64,
}

/// One change the timeline makes to the world at a moment.
#[derive(Debug, Clone)]
enum Action {
    Partition {
        a: Vec<String>,
        b: Vec<String>,
        one_way: bool,
    },
    Repair {
        a: Vec<String>,
        b: Vec<String>,
        one_way: bool,
    },
    Hold {
        a: Vec<String>,
        b: Vec<String>,
    },
    Release {
        a: Vec<String>,
        b: Vec<String>,
    },
    /// Every link of the host is held (a stopped process), then released.
    Pause {
        host: String,
    },
    Resume {
        host: String,
    },
    Latency {
        a: Vec<String>,
        b: Vec<String>,
        latency: Duration,
    },
    Crash {
        fault: usize,
        host: String,
        lose_data: bool,
    },
    Restart {
        host: String,
    },
    Skew {
        host: String,
        skew_ms: i64,
    },
    SlowStore {
        host: String,
        extra: Duration,
    },
    FailOver {
        fault: usize,
        host: String,
        lose_last: Duration,
    },
}

/// Runs `scenario` (already carrying the run's seed and hold mode) and returns its history.
pub fn run(scenario: &Scenario, label: &str, progress: &mut dyn FnMut(Progress)) -> anyhow::Result<WorldRun> {
    run_with(scenario, label, progress, RunOptions::default())
}

/// [`run`], with options.
pub fn run_with(
    scenario: &Scenario,
    label: &str,
    progress: &mut dyn FnMut(Progress),
    options: RunOptions,
) -> anyhow::Result<WorldRun> {
    let seed = scenario.seed;
    let arrivals = scenario.arrival_times_us();
    let users_total = arrivals.len() as u64;
    let failovers = |host: &str| {
        let count =
            scenario.faults.iter().filter(|fault| matches!(fault, Fault::StoreFailover(f) if f.host == host)).count();
        u32::try_from(count).unwrap_or(u32::MAX)
    };
    let store_host = |seed: u64, host: &str, replication: Replication| {
        StoreControl::new(StoreHostConfig {
            // A store host judges admission and locks by its own, unskewed clock. It keeps the
            // whole outbox: no relay runs during a simulated run (one pass drains it at the
            // end), and the checker reads every event.
            store: MemoryStoreConfig {
                seed,
                cache_clock: Some(Arc::new(SimClock::new(EPOCH_MS, Arc::new(AtomicI64::new(0))))),
                ..MemoryStoreConfig::default()
            }
            .keeping_the_whole_outbox(),
            replication_window: REPLICATION_WINDOW,
            failovers_max: failovers(host),
            replication,
            clock: JournalClock::Simulation,
        })
    };
    let record = store_host(seed, scenario::STORE_RECORD_HOST, record_replication(scenario, seed));
    // The cache store replicates asynchronously, as a cache server does: its failover may lose
    // holds' locks and places in line, which the fences and the system of record answer for.
    let cache = store_host(seed.rotate_left(17), scenario::STORE_CACHE_HOST, Replication::Async);
    let stores: BTreeMap<String, StoreControl> = [
        (scenario::STORE_RECORD_HOST.to_owned(), record.clone()),
        (scenario::STORE_CACHE_HOST.to_owned(), cache.clone()),
    ]
    .into();
    let config = engine_config(scenario, seed);
    setup_stores(scenario, &config, &record, &cache, users_total)?;

    let duration_us = scenario.duration_us();
    let drain_us = scenario.engine.hold_ttl_s * 1_000_000 + DRAIN_AFTER_HOLD_TTL.as_micros() as u64;
    let hosts = scenario.hosts();
    let timeline = timeline(scenario, &hosts);
    let heal_us = timeline.iter().map(|(at_us, _)| *at_us).max().unwrap_or(0).min(duration_us);

    let latency = &scenario.network.latency_ms;
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .simulation_duration(run_length(scenario))
        .tick_duration(Duration::from_millis(scenario.network.tick_ms))
        .min_message_latency(Duration::from_micros((latency.min * 1000.0) as u64))
        .max_message_latency(Duration::from_micros((latency.max * 1000.0) as u64))
        .tcp_capacity(1 << 16)
        .build();

    for (host, control) in &stores {
        let control = control.clone();
        sim.host(host.as_str(), move || {
            let control = control.clone();
            async move {
                let listener = turmoil::net::TcpListener::bind((IpAddr::V4(Ipv4Addr::UNSPECIFIED), STORE_PORT)).await?;
                serve_store(listener, control).await;
                Ok(())
            }
        });
    }
    // The store's own service time: the midpoint of the scenario's store latency, on top of
    // the network's. A slow-store fault adds to it.
    // Store links get the scenario's store latency once turmoil has created them (on their
    // first message); until then they have the network's.
    let mut store_links_pending: Vec<(String, String)> = engine_hosts_of(scenario)
        .into_iter()
        .flat_map(|engine| stores.keys().map(move |store| (engine.clone(), store.clone())))
        .collect();
    let store_link_latency = store_service(scenario);

    let fired = Arc::new(Mutex::new(Vec::new()));
    let mut skews = BTreeMap::new();
    let engine_hosts: Vec<String> = (1..=scenario.engine.nodes).map(scenario::engine_host).collect();
    let config = EngineConfig { trusted_proxies: client_addresses(&sim, scenario, &engine_hosts), ..config };
    for host in &engine_hosts {
        let skew = Arc::new(AtomicI64::new(0));
        skews.insert(host.clone(), Arc::clone(&skew));
        let armed = armed_pauses(scenario, host);
        let (config, fired) = (EngineConfig { node: host.clone(), ..config.clone() }, Arc::clone(&fired));
        let host_name = host.clone();
        sim.host(host.as_str(), move || {
            let remote = |store: &'static str| {
                Arc::new(RemoteStore::new(RemoteStoreConfig::default(), move || {
                    turmoil::net::TcpStream::connect((store, STORE_PORT))
                }))
            };
            let engine = Engine::new(EngineParts {
                config: config.clone(),
                clock: Arc::new(SimClock::on_host(EPOCH_MS, Arc::clone(&skew))),
                record: remote(scenario::STORE_RECORD_HOST) as Arc<dyn RecordStore>,
                cache: remote(scenario::STORE_CACHE_HOST) as Arc<dyn CacheStore>,
                faults: Arc::new(SimFaults::new(host_name.clone(), armed.clone(), Arc::clone(&fired))),
            });
            async move {
                let engine = engine?;
                let listener =
                    turmoil::net::TcpListener::bind((IpAddr::V4(Ipv4Addr::UNSPECIFIED), ENGINE_PORT)).await?;
                tcore_engine::server::serve(SimListener(listener), engine, std::future::pending()).await?;
                Ok(())
            }
        });
    }

    let recorder = Rc::new(RefCell::new(
        HistoryRecorder::new(label, seed, check_config(scenario, heal_us, duration_us + drain_us))
            .expecting(expected_operations(scenario, users_total)),
    ));
    let outcomes = Rc::new(RefCell::new(UserOutcomes::default()));
    let agent_log = match scenario.agent.policy {
        scenario::AgentPolicy::None => None,
        _ => {
            let host = AgentHost::prepare(scenario).with_context(|| format!("{label}: [agent]"))?;
            let log = host.log.clone();
            host.install(&mut sim, scenario, engine_hosts.clone(), Rc::clone(&recorder), duration_us);
            Some(log)
        }
    };
    let plan = Arc::new(JourneyPlan::of(scenario, engine_hosts.clone(), session_secret(seed)));
    let clients = scenario.clients.max(1);
    let arrivals = Rc::new(arrivals);
    let request_logs: Vec<RequestLog> =
        (0..if options.log_requests { clients } else { 0 }).map(|_| RequestLog::default()).collect();
    for client in 1..=clients {
        let http = match request_logs.get(client as usize - 1) {
            Some(log) => HttpClient::logging(Rc::clone(log)),
            None => HttpClient::default(),
        };
        let context = Rc::new(Journeys {
            transport: SimTransport { http, recorder: Rc::clone(&recorder), outcomes: Rc::clone(&outcomes) },
            plan: Arc::clone(&plan),
        });
        let arrivals = Rc::clone(&arrivals);
        let first_accounts = bot_first_accounts(scenario, users_total);
        let bots: Vec<(scenario::Bot, IpAddr, f64, u64, u64, u64)> = scenario
            .bots
            .iter()
            .enumerate()
            .flat_map(|(bot_index, bot)| {
                let addresses = bot.addresses(bot_index);
                let per_ip = bot.rate_per_s / addresses.len().max(1) as f64;
                let first_account = first_accounts[bot_index];
                addresses
                    .into_iter()
                    .enumerate()
                    .filter(move |(ip_index, _)| (*ip_index as u32) % clients == client - 1)
                    .map(move |(_, ip)| {
                        let (start_us, end_us) = ((bot.start_s * 1e6) as u64, (bot.end_s * 1e6) as u64);
                        (bot.clone(), ip, per_ip, start_us, end_us, first_account)
                    })
            })
            .collect();
        sim.client(scenario::client_host(client).as_str(), async move {
            let running = Rc::new(Running::default());
            for (bot, ip, rate, start_us, end_us, first_account) in bots {
                let context = Rc::clone(&context);
                running.spawn(async move {
                    sleep_until_us(start_us).await;
                    context.bot(bot, ip, rate, end_us, first_account).await;
                });
            }
            for (index, &arrival_us) in arrivals.iter().enumerate() {
                if (index as u32) % clients != client - 1 {
                    continue;
                }
                sleep_until_us(arrival_us).await;
                let context = Rc::clone(&context);
                running.spawn(async move { context.journey(index as u64).await });
            }
            let all = running.all_ended();
            let _ =
                tokio::time::timeout(Duration::from_micros(duration_us.saturating_sub(node::sim_now_us())), all).await;
            Ok(())
        });
    }

    let total_us = duration_us + drain_us;
    let mut next_action = 0;
    let mut next_progress_us = 0;
    let mut failover_tickets = Vec::new();
    let mut data_loss_tickets = Vec::new();
    let mut healed = false;
    let mut healed_at_us = 0;
    let mut next_drain_check_us = 0;
    loop {
        let clients_done = sim.step().map_err(|error| anyhow::anyhow!("simulation failed: {error}"))?;
        let now_us = u64::try_from(sim.elapsed().as_micros()).unwrap_or(u64::MAX);
        while next_action < timeline.len() && timeline[next_action].0 <= now_us {
            match apply(&mut sim, &timeline[next_action].1, &skews, &stores) {
                Some(Ticket::FailOver(fault, host, ticket)) => failover_tickets.push((fault, host, ticket)),
                Some(Ticket::DataLoss(fault, host, ticket)) => data_loss_tickets.push((fault, host, now_us, ticket)),
                None => {}
            }
            next_action += 1;
        }
        if now_us >= next_progress_us {
            next_progress_us = now_us + PROGRESS_EVERY_US;
            if !store_links_pending.is_empty() {
                let mut existing = Vec::new();
                sim.links(|links| existing.extend(links.map(|link| link.pair())));
                store_links_pending.retain(|(engine, store)| {
                    let pair = (sim.lookup(engine.as_str()), sim.lookup(store.as_str()));
                    let exists = existing.iter().any(|&(a, b)| (a, b) == pair || (b, a) == pair);
                    if exists {
                        sim.set_link_latency(engine.as_str(), store.as_str(), store_link_latency);
                    }
                    !exists
                });
            }
            progress(Progress { sim_us: now_us, total_us, operations: recorder.borrow().operations_invoked() });
        }
        if (clients_done || now_us >= duration_us) && !healed {
            heal_all(&mut sim, &timeline[..next_action], &skews, &stores);
            healed = true;
            healed_at_us = now_us;
        }
        if healed && now_us >= next_drain_check_us {
            next_drain_check_us = now_us + DRAIN_CHECK_EVERY_US;
            // The drain ends early once no hold is left to expire and retries have settled.
            let settled = now_us >= healed_at_us + DRAIN_AFTER_HOLD_TTL.as_micros() as u64;
            if now_us >= healed_at_us + drain_us || (settled && !holds_pending(&record)?) {
                break;
            }
        }
    }
    let end_us = u64::try_from(sim.elapsed().as_micros()).unwrap_or(u64::MAX);
    drop(sim);
    let store_failovers = failover_tickets
        .into_iter()
        .map(|(fault, host, mut ticket)| match ticket.try_outcome() {
            Some(Ok(report)) => StoreFailoverOutcome {
                fault,
                host,
                at_us: u64::try_from(report.at.as_micros()).unwrap_or(u64::MAX),
                writes_replayed: report.writes_replayed as u64,
                writes_lost: report.writes_lost as u64,
                writes_kept_by_standby: report.writes_kept_by_standby as u64,
                calls_cut_off: report.calls_cut_off,
                refused: None,
            },
            Some(Err(error)) => StoreFailoverOutcome {
                fault,
                host,
                at_us: 0,
                writes_replayed: 0,
                writes_lost: 0,
                writes_kept_by_standby: 0,
                calls_cut_off: 0,
                refused: Some(error.to_string()),
            },
            None => StoreFailoverOutcome {
                fault,
                host,
                at_us: 0,
                writes_replayed: 0,
                writes_lost: 0,
                writes_kept_by_standby: 0,
                calls_cut_off: 0,
                refused: Some("did not run before the end".into()),
            },
        })
        .collect();
    relay_outbox(&record)?;
    let store_data_losses = data_loss_tickets
        .into_iter()
        .map(|(fault, host, at_us, mut ticket)| StoreDataLossOutcome { fault, host, at_us, lost: ticket.try_outcome() })
        .collect();
    let recorder = Rc::try_unwrap(recorder).map_err(|_| anyhow::anyhow!("the recorder is still shared"))?.into_inner();
    let mut history = recorder.finish_with(read_final_state(&record, &cache)?);
    history.config.end_us = end_us;
    let outcomes = outcomes.borrow().clone();
    let fired_pauses = fired.lock().clone();
    Ok(WorldRun {
        history,
        outcomes,
        fault_windows: fault_windows(scenario, &hosts),
        fired_pauses,
        store_failovers,
        store_data_losses,
        users: users_total,
        agent: agent_log.map(|log| log.finish(scenario.agent.policy)),
        requests: request_logs.into_iter().map(|log| log.take()).collect(),
    })
}

/// The journeys and bots a client host runs. Each runs detached, so a journey that has ended
/// frees its memory at once: a `JoinHandle` kept until the end of the run would hold every
/// ended journey's task, a hundred thousand of them in a large spike.
#[derive(Debug, Default)]
struct Running {
    count: Cell<u64>,
    ended: tokio::sync::Notify,
}

impl Running {
    fn spawn(self: &Rc<Self>, work: impl Future<Output = ()> + 'static) {
        self.count.set(self.count.get() + 1);
        // Counts the end even if the work panics. The work is boxed: an async block that moved
        // it in would keep room for it twice.
        let ends = EndsOnDrop(Rc::clone(self));
        let work = Box::pin(work);
        drop(tokio::task::spawn_local(async move {
            let _ends = ends;
            work.await;
        }));
    }

    /// Resolves once everything spawned has ended.
    async fn all_ended(&self) {
        while self.count.get() > 0 {
            self.ended.notified().await;
        }
    }
}

struct EndsOnDrop(Rc<Running>);

impl Drop for EndsOnDrop {
    fn drop(&mut self) {
        let left = self.0.count.get().saturating_sub(1);
        self.0.count.set(left);
        if left == 0 {
            self.0.ended.notify_one();
        }
    }
}

/// The calls a user makes, on average: under three in the shipped scenarios (a join, one or two
/// long polls, and, for the few who get in, seat maps, holds and confirmations). Four leaves room.
const OPERATIONS_PER_USER_EXPECTED: u64 = 4;

/// About how many calls a run will record: enough that the history is rarely copied to grow.
fn expected_operations(scenario: &Scenario, users: u64) -> usize {
    let bots: f64 = scenario.bots.iter().map(|bot| bot.rate_per_s * (bot.end_s - bot.start_s).max(0.0)).sum();
    let expected = users.saturating_mul(OPERATIONS_PER_USER_EXPECTED).saturating_add(bots as u64);
    usize::try_from(expected).unwrap_or(usize::MAX)
}

async fn sleep_until_us(at_us: u64) {
    let now_us = node::sim_now_us();
    if at_us > now_us {
        tokio::time::sleep(Duration::from_micros(at_us - now_us)).await;
    }
}

/// How long a run may last in simulated time: its timeline, the drain after it, and a minute.
fn run_length(scenario: &Scenario) -> Duration {
    let drain = Duration::from_secs(scenario.engine.hold_ttl_s) + DRAIN_AFTER_HOLD_TTL;
    Duration::from_micros(scenario.duration_us()) + drain + Duration::from_secs(60)
}

/// The client hosts' addresses: the proxies the engine nodes trust, since the virtual users'
/// own addresses reach the nodes in their `X-Forwarded-For`. turmoil gives a host its address
/// at the first lookup of its name; these lookups follow the order the hosts are registered
/// in (engines, the agent, clients), so every host has the address it would have had.
fn client_addresses(sim: &turmoil::Sim<'_>, scenario: &Scenario, engine_hosts: &[String]) -> TrustedProxies {
    for host in engine_hosts {
        sim.lookup(host.as_str());
    }
    if scenario.agent.policy != scenario::AgentPolicy::None {
        sim.lookup(scenario::AGENT_HOST);
    }
    TrustedProxies::new((1..=scenario.clients.max(1)).map(|client| sim.lookup(scenario::client_host(client))))
}

fn engine_config(scenario: &Scenario, seed: u64) -> EngineConfig {
    let engine = &scenario.engine;
    let hold_mode = engine.hold_mode;
    EngineConfig {
        hold_mode,
        allow_unsafe_hold_mode: hold_mode.is_unsafe(),
        lock_ttl_ms: engine.lock_ttl_ms,
        hold_ttl_ms: engine.hold_ttl_s * 1000,
        seats_per_user_max: engine.seats_per_user_max,
        queue_order: engine.admission.order,
        admission: AdmissionPolicy {
            rate_per_s: engine.admission.rate_per_s,
            active_max: engine.admission.active_max,
            admitted_ttl_ms: engine.admission.admitted_ttl_s * 1000,
            ..AdmissionPolicy::default()
        },
        rate_limits: engine.rate_limits.as_ref().map_or(
            RateLimits { per_ip_per_s: 100_000, per_token_per_s: 100_000, burst: 100_000 },
            |limits| RateLimits {
                per_ip_per_s: limits.per_ip_per_s,
                per_token_per_s: limits.per_token_per_s,
                burst: limits.burst,
            },
        ),
        token_secret: format!("tcore-simulation-secret-{seed:016x}").into_bytes(),
        sessions: SessionConfig { key: SessionKey::Hs256 { secret: session_secret(seed) }, ..SessionConfig::default() },
        admin_tokens: vec![
            AdminToken { name: tcore_engine::agent::ACTOR.into(), secret: agent::ADMIN_TOKEN.into() },
            AdminToken { name: ADMIN_TOKEN_NAME_DEFAULT.into(), secret: agent::OPERATOR_TOKEN.into() },
        ],
        connections: ConnectionLimits {
            // An answer before a body is in makes HTTP/2 reset the stream, and h2 forgets a
            // reset stream after a second of wall-clock time: a run could not replay one.
            body_read_timeout_ms: run_length(scenario).as_millis() as u64,
            // The client hosts keep one connection per node for the whole run, idle at times.
            idle_timeout_ms: None,
            ..ConnectionLimits::default()
        },
        ..EngineConfig::default()
    }
}

/// The user id of each bot's first account: the record store numbers accounts from 1 in the
/// order they are opened, users first, then each bot's accounts in `[[bots]]` order.
fn bot_first_accounts(scenario: &Scenario, users: u64) -> Vec<u64> {
    let mut next = users + 1;
    scenario
        .bots
        .iter()
        .map(|bot| {
            let first = next;
            next += u64::from(bot.accounts);
            first
        })
        .collect()
}

/// The secret the engine nodes of a run verify sessions with, and its fans sign them with.
fn session_secret(seed: u64) -> Vec<u8> {
    format!("tcore-simulation-session-secret-{seed:016x}").into_bytes()
}

/// Puts the venue on sale and registers every user with their points, before the run starts.
fn setup_stores(
    scenario: &Scenario,
    config: &EngineConfig,
    record: &StoreControl,
    cache: &StoreControl,
    users: u64,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("setup runtime")?;
    runtime.block_on(async {
        let engine = Engine::new(EngineParts {
            config: config.clone(),
            clock: Arc::new(ManualClock::starting_at_ms(EPOCH_MS)),
            record: Arc::new(record.clone()) as Arc<dyn RecordStore>,
            cache: Arc::new(cache.clone()) as Arc<dyn CacheStore>,
            faults: Arc::new(NoFaults),
        })?;
        // The clock reads the epoch: schedules open at the epoch plus their `opens_at_s`.
        scenario.catalogue(users).load_into(&engine).await?;
        anyhow::Ok(())
    })
}

pub(crate) fn check_config(scenario: &Scenario, heal_us: u64, end_us: u64) -> CheckConfig {
    CheckConfig {
        hold_ttl_us: scenario.engine.hold_ttl_s * 1_000_000,
        hold_expiry_grace_us: 3_000_000,
        admission_rate_per_s: scenario.engine.admission.rate_per_s,
        admission_burst: scenario.engine.admission.rate_per_s.max(1.0).ceil() as u64,
        heal_us,
        end_us,
    }
}

fn us(at_s: f64) -> u64 {
    (at_s.max(0.0) * 1e6) as u64
}

fn armed_pauses(scenario: &Scenario, host: &str) -> Vec<ArmedPause> {
    scenario
        .faults
        .iter()
        .enumerate()
        .filter_map(|(fault_index, fault)| match fault {
            Fault::PauseAt(pause) if pause.host == host => {
                FaultPoint::from_name(&pause.point).map(|point| ArmedPause {
                    trigger: Trigger::Point(point),
                    from_us: us(pause.at_s),
                    pause: Duration::from_millis(pause.pause_ms),
                    times_left: pause.times,
                    fault_index,
                })
            }
            Fault::OnEvent(event) if event.host == host => Some(ArmedPause {
                trigger: Trigger::LockTtlBelow { threshold_ms: event.threshold_ms },
                from_us: us(event.at_s),
                pause: Duration::from_millis(event.action.pause_ms),
                times_left: event.times,
                fault_index,
            }),
            _ => None,
        })
        .collect()
}

/// The timeline's network and host actions, in time order (ties keep the file's order).
fn timeline(scenario: &Scenario, hosts: &[String]) -> Vec<(u64, Action)> {
    let mut actions = Vec::new();
    for (index, fault) in scenario.faults.iter().enumerate() {
        match fault {
            Fault::Partition(p) => {
                let (a, b) = (p.a.resolve(hosts), p.b.resolve(hosts));
                actions.push((us(p.at_s), Action::Partition { a: a.clone(), b: b.clone(), one_way: p.one_way }));
                actions.push((us(p.heal_at_s), Action::Repair { a, b, one_way: p.one_way }));
            }
            Fault::HoldLink(h) => {
                let (a, b) = (h.a.resolve(hosts), h.b.resolve(hosts));
                actions.push((us(h.at_s), Action::Hold { a: a.clone(), b: b.clone() }));
                actions.push((us(h.release_at_s), Action::Release { a, b }));
            }
            Fault::Latency(l) => {
                let (a, b) = (l.a.resolve(hosts), l.b.resolve(hosts));
                let normal = (scenario.network.latency_ms.min + scenario.network.latency_ms.max) / 2.0;
                actions.push((
                    us(l.at_s),
                    Action::Latency {
                        a: a.clone(),
                        b: b.clone(),
                        latency: Duration::from_micros((l.latency_ms * 1000.0) as u64),
                    },
                ));
                actions.push((
                    us(l.until_s),
                    Action::Latency { a, b, latency: Duration::from_micros((normal * 1000.0) as u64) },
                ));
            }
            Fault::Crash(c) => {
                actions
                    .push((us(c.at_s), Action::Crash { fault: index, host: c.host.clone(), lose_data: c.lose_data }));
                if let Some(restart_at_s) = c.restart_at_s {
                    actions.push((us(restart_at_s), Action::Restart { host: c.host.clone() }));
                }
            }
            Fault::Pause(pause) => {
                // A stopped process answers nothing and sends nothing; what reached it waits in
                // its sockets until it goes on.
                actions.push((us(pause.at_s), Action::Pause { host: pause.host.clone() }));
                actions.push((us(pause.resume_at_s()), Action::Resume { host: pause.host.clone() }));
            }
            Fault::ClockSkew(s) => {
                actions.push((us(s.at_s), Action::Skew { host: s.host.clone(), skew_ms: s.skew_ms }))
            }
            Fault::SlowStore(slow) => {
                actions.push((
                    us(slow.at_s),
                    Action::SlowStore { host: slow.host.clone(), extra: Duration::from_millis(slow.extra_ms) },
                ));
                actions.push((us(slow.until_s), Action::SlowStore { host: slow.host.clone(), extra: Duration::ZERO }));
            }
            Fault::StoreFailover(failover) => actions.push((
                us(failover.at_s),
                Action::FailOver {
                    fault: index,
                    host: failover.host.clone(),
                    lose_last: Duration::from_millis(failover.lose_last_ms),
                },
            )),
            Fault::PauseAt(_) | Fault::OnEvent(_) => {}
        }
    }
    actions.sort_by_key(|(at_us, _)| *at_us);
    actions
}

fn apply(
    sim: &mut turmoil::Sim<'_>,
    action: &Action,
    skews: &BTreeMap<String, Arc<AtomicI64>>,
    stores: &BTreeMap<String, StoreControl>,
) -> Option<Ticket> {
    match action {
        Action::Partition { a, b, one_way } => {
            for_pairs(a, b, |x, y| if *one_way { sim.partition_oneway(x, y) } else { sim.partition(x, y) });
        }
        Action::Repair { a, b, one_way } => {
            for_pairs(a, b, |x, y| if *one_way { sim.repair_oneway(x, y) } else { sim.repair(x, y) });
        }
        Action::Hold { a, b } => for_pairs(a, b, |x, y| sim.hold(x, y)),
        Action::Release { a, b } => for_pairs(a, b, |x, y| sim.release(x, y)),
        Action::Latency { a, b, latency } => for_pairs(a, b, |x, y| sim.set_link_latency(x, y, *latency)),
        Action::Pause { host } => links_of(sim, host).into_iter().for_each(|(a, b)| sim.hold(a, b)),
        Action::Resume { host } => links_of(sim, host).into_iter().for_each(|(a, b)| sim.release(a, b)),
        Action::Crash { fault, host, lose_data } => {
            if sim.is_host_running(host.as_str()) {
                sim.crash(host.as_str());
                // The loss runs on the store host when it comes back, before it answers anyone.
                if let Some(store) = stores.get(host).filter(|_| *lose_data) {
                    return Some(Ticket::DataLoss(*fault, host.clone(), store.lose_data()));
                }
            }
        }
        Action::Restart { host } => sim.bounce(host.as_str()),
        Action::Skew { host, skew_ms } => {
            if let Some(skew) = skews.get(host) {
                skew.store(*skew_ms, std::sync::atomic::Ordering::Relaxed);
            }
        }
        Action::SlowStore { host, extra } => {
            if let Some(store) = stores.get(host) {
                store.set_extra_latency(*extra);
            }
        }
        Action::FailOver { fault, host, lose_last } => {
            if let Some(store) = stores.get(host) {
                // The failover runs on the store host; its report is read after the run.
                return Some(Ticket::FailOver(*fault, host.clone(), store.fail_over(*lose_last)));
            }
        }
    }
    None
}

/// What a fault asked a store host to do, for its outcome after the run: the fault's index and
/// the host.
enum Ticket {
    FailOver(usize, String, FailoverTicket),
    DataLoss(usize, String, DataLossTicket),
}

/// The links `host` has (turmoil makes a link at a pair's first message), in the network's
/// order.
fn links_of(sim: &turmoil::Sim<'_>, host: &str) -> Vec<(std::net::IpAddr, std::net::IpAddr)> {
    let address = sim.lookup(host);
    let mut pairs = Vec::new();
    sim.links(|links| {
        pairs.extend(links.map(|link| link.pair()).filter(|(a, b)| *a == address || *b == address));
    });
    pairs
}

fn for_pairs(a: &[String], b: &[String], mut f: impl FnMut(&str, &str)) {
    for x in a {
        for y in b {
            if x != y {
                f(x, y);
            }
        }
    }
}

fn engine_hosts_of(scenario: &Scenario) -> Vec<String> {
    (1..=scenario.engine.nodes).map(scenario::engine_host).collect()
}

/// How the system of record replicates: semi-synchronously, each leg of the round trip to its
/// standby drawn from the scenario's store latency (the standby sits beside the primary, as
/// far from it as the engine nodes are), or asynchronously (known unsafe).
fn record_replication(scenario: &Scenario, seed: u64) -> Replication {
    match scenario.engine.record_replication {
        scenario::RecordReplication::Async => Replication::Async,
        scenario::RecordReplication::SemiSync => {
            let latency = &scenario.network.store_latency_ms;
            let micros = |ms: f64| Duration::from_micros((ms * 1000.0) as u64);
            Replication::SemiSync(SemiSync { leg_latency: micros(latency.min)..=micros(latency.max), seed })
        }
    }
}

/// The latency of a link between an engine node and a store host: the midpoint of the
/// scenario's store latency.
fn store_service(scenario: &Scenario) -> Duration {
    let latency = &scenario.network.store_latency_ms;
    Duration::from_micros(((latency.min + latency.max) / 2.0 * 1000.0) as u64)
}

/// Undoes whatever the timeline left broken, so the final state is read from a healed world.
fn heal_all(
    sim: &mut turmoil::Sim<'_>,
    applied: &[(u64, Action)],
    skews: &BTreeMap<String, Arc<AtomicI64>>,
    stores: &BTreeMap<String, StoreControl>,
) {
    for (_, action) in applied {
        match action {
            Action::Partition { a, b, one_way } => {
                apply(sim, &Action::Repair { a: a.clone(), b: b.clone(), one_way: *one_way }, skews, stores);
            }
            Action::Hold { a, b } => {
                apply(sim, &Action::Release { a: a.clone(), b: b.clone() }, skews, stores);
            }
            Action::Pause { host } => {
                apply(sim, &Action::Resume { host: host.clone() }, skews, stores);
            }
            Action::SlowStore { host, .. } => {
                apply(sim, &Action::SlowStore { host: host.clone(), extra: Duration::ZERO }, skews, stores);
            }
            Action::Crash { host, .. } if !sim.is_host_running(host.as_str()) => sim.bounce(host.as_str()),
            _ => {}
        }
    }
}

fn fault_windows(scenario: &Scenario, hosts: &[String]) -> Vec<FaultWindow> {
    scenario
        .faults
        .iter()
        .enumerate()
        .map(|(index, fault)| {
            let start_us = us(fault.starts_at_s());
            let end_us = fault.ends_at_s().map_or(start_us, us);
            let touched = match fault {
                Fault::Partition(p) => [p.a.resolve(hosts), p.b.resolve(hosts)].concat(),
                Fault::HoldLink(h) => [h.a.resolve(hosts), h.b.resolve(hosts)].concat(),
                Fault::Latency(l) => [l.a.resolve(hosts), l.b.resolve(hosts)].concat(),
                Fault::Crash(c) => vec![c.host.clone()],
                Fault::Pause(p) => vec![p.host.clone()],
                Fault::PauseAt(p) => vec![p.host.clone()],
                Fault::OnEvent(e) => vec![e.host.clone()],
                Fault::ClockSkew(s) => vec![s.host.clone()],
                Fault::StoreFailover(f) => vec![f.host.clone()],
                Fault::SlowStore(s) => vec![s.host.clone()],
            };
            FaultWindow { index, kind: fault.kind(), start_us, end_us, hosts: touched }
        })
        .collect()
}

pub(crate) fn to_us(at_ms: u64) -> u64 {
    at_ms.saturating_sub(EPOCH_MS).saturating_mul(1000)
}

/// Publishes the record store's whole outbox once the run is over, with the engine's own relay
/// (to the log, as a node without a stream does), pass after pass until one finds nothing. No
/// relay runs during a simulated run: its store calls would change every run's timing. So "relayed at least once" means here that every event the
/// store wrote can be drained through `outbox_pending` and comes out marked sent, not that a
/// relay kept up under the run's faults.
fn relay_outbox(record: &StoreControl) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().build().context("relay runtime")?;
    let relay = OutboxRelay::to_log(Arc::new(record.clone()), OutboxRelayConfig::default());
    for _ in 0..RELAY_PASSES_MAX {
        if runtime.block_on(relay.relay_once())? == 0 {
            return Ok(());
        }
    }
    anyhow::bail!("the outbox relay had not drained the outbox after {RELAY_PASSES_MAX} passes")
}

/// Whether any reservation is still HELD (and so has a hold left to expire).
fn holds_pending(record: &StoreControl) -> anyhow::Result<bool> {
    let runtime = tokio::runtime::Builder::new_current_thread().build().context("drain runtime")?;
    let dump = runtime.block_on(RecordStore::dump(record))?;
    Ok(dump.reservations.iter().any(|reservation| reservation.status == tcore_engine::domain::ReservationStatus::Held))
}

fn read_final_state(record: &StoreControl, cache: &StoreControl) -> anyhow::Result<StoresRead> {
    let runtime = tokio::runtime::Builder::new_current_thread().build().context("final state runtime")?;
    let (dump, admitted) =
        runtime.block_on(async { anyhow::Ok((RecordStore::dump(record).await?, cache.admissions().await?)) })?;
    crate::history::from_stores(&dump, &admitted, to_us)
}

#[cfg(test)]
mod tests {
    use std::rc::Rc;
    use std::time::Duration;

    use super::Running;

    fn local_runtime() -> (tokio::runtime::Runtime, tokio::task::LocalSet) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build();
        (runtime.expect("a current-thread runtime"), tokio::task::LocalSet::new())
    }

    #[test]
    fn all_ended_waits_for_the_last_one_even_after_a_panic() {
        let (runtime, local) = local_runtime();
        local.block_on(&runtime, async {
            let running = Rc::new(Running::default());
            let finished = Rc::new(std::cell::Cell::new(0));
            for delay_ms in [30, 10, 20] {
                let finished = Rc::clone(&finished);
                running.spawn(async move {
                    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                    finished.set(finished.get() + 1);
                });
            }
            running.spawn(async { panic!("a journey that fails") });
            running.all_ended().await;
            assert_eq!(finished.get(), 3);
            assert_eq!(running.count.get(), 0);
        });
    }
}
