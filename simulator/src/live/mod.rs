//! Live runs (`tcore load`): the scenario's fans, with goose as the load engine, against real
//! engine processes over real HTTP, then the same checker and run result as a simulated run.
//!
//! goose's load model is closed (a fixed pool of looping users); a live run is an open model:
//! the arrival times come from the scenario's curves with the seeded expansion a simulated run
//! uses, and each goose user of a pool sized from the curves takes the next arrival ticket,
//! waits for its time and runs that fan's journey ([`crate::journey`]). A journey that starts
//! after its time because every pool user was busy is counted as late, and its first call is
//! measured from the intended time (coordinated omission counted, not hidden).
//!
//! **Invariant:** a live run is not reproducible byte for byte (real clocks, real sockets);
//! its run result says so (`"mode": "live"`, `"reproducible": false`).

pub mod deploy;
pub mod faults;
pub mod proxy;
pub mod transport;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use goose::prelude::*;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use tcore_engine::domain::{Account, Admitted, LedgerEntry, OutboxEvent, Reservation, ReservationStatus, Schedule};
use tcore_engine::store::{AcceptedFence, RecordDump};

use self::deploy::Deployment;
use self::faults::LiveFaults;
use self::transport::{LiveShared, LiveTransport};
use crate::history::HistoryRecorder;
use crate::journey::{JourneyPlan, Journeys, LONG_POLL_S};
use crate::scenario::Scenario;
use crate::world::{DRAIN_AFTER_HOLD_TTL, WorldRun, check_config};

/// How long before the first arrival the pool of goose users is started.
const LAUNCH_LEAD: Duration = Duration::from_secs(2);
/// A journey that starts later than this after its time is late.
const LATE_AFTER_US: u64 = 10_000;
/// The largest pool of goose users.
const POOL_MAX: usize = 50_000;
/// Records per export page.
const EXPORT_PAGE: u32 = 10_000;
/// How long a fan's journey may still take after its patience ran out (its last calls).
const JOURNEY_TAIL_S: f64 = LONG_POLL_S as f64 + 10.0;

/// What a live run hands back: the same [`WorldRun`] a simulated run gives the score, and the
/// figures only a live run has.
#[derive(Debug)]
pub struct LiveRun {
    pub world: WorldRun,
    pub figures: LiveFigures,
}

/// What only a live run measures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LiveFigures {
    /// goose users in the pool.
    pub pool: usize,
    pub arrivals: u64,
    pub journeys_started: u64,
    /// Journeys that started more than 10 ms after their time because the pool was busy.
    pub journeys_late: u64,
    /// How late journeys started, in µs.
    pub lateness_p50_us: u64,
    pub lateness_p99_us: u64,
    pub lateness_max_us: u64,
    /// Stopped before every arrival ran (interrupted).
    pub partial: bool,
    /// Fault steps (kill, restart, stop, continue, link modes) that could not be applied, with
    /// why.
    pub fault_errors: Vec<String>,
    /// What went through each fault proxy, by link (`from → to`).
    pub links: std::collections::BTreeMap<String, self::proxy::ProxyCounts>,
    /// Requests goose counted (its own metrics, fed the journeys' times).
    pub goose_requests: usize,
    pub wall_s: f64,
    pub deployment: String,
}

/// Where a live run is, for a progress display.
#[derive(Debug, Clone, Copy)]
pub struct LiveProgress {
    pub elapsed_s: f64,
    pub duration_s: f64,
    pub started: u64,
    pub late: u64,
    pub requests: u64,
    pub errors: u64,
    pub p99_us: u64,
    /// Fault steps applied so far, of all the timeline's.
    pub fault_steps: u64,
    pub fault_steps_total: u64,
}

/// The arrival tickets, handed out in order.
#[derive(Debug)]
struct Dispatch {
    arrivals: Vec<u64>,
    next: AtomicUsize,
    /// Journeys that began (a ticket taken when the run was stopped is not one).
    begun: AtomicU64,
    late: AtomicU64,
    lateness: Mutex<Histogram<u64>>,
}

impl Dispatch {
    fn take(&self) -> Option<(usize, u64)> {
        let index = self.next.fetch_add(1, Ordering::Relaxed);
        self.arrivals.get(index).map(|&at_us| (index, at_us))
    }

    fn started(&self) -> u64 {
        self.begun.load(Ordering::Relaxed)
    }
}

/// How many goose users the pool needs: the most journeys that can be under way at once, that
/// is the most arrivals within one journey's longest span (the fans' patience and the calls
/// after it), from the same seeded arrivals the run replays.
pub fn pool_size(arrivals: &[u64], patience_s: f64) -> usize {
    let span_us = ((patience_s.max(0.0) + JOURNEY_TAIL_S) * 1e6) as u64;
    let mut most = 0;
    let mut first = 0;
    for (last, &at_us) in arrivals.iter().enumerate() {
        while arrivals[first] + span_us < at_us {
            first += 1;
        }
        most = most.max(last + 1 - first);
    }
    most.clamp(1, POOL_MAX)
}

/// Runs `scenario`'s fans against `deployment` and reads back what the engine holds.
pub fn load(
    scenario: &Scenario,
    label: &str,
    deployment: &Deployment,
    progress: &mut dyn FnMut(LiveProgress),
) -> anyhow::Result<LiveRun> {
    let wall = Instant::now();
    let arrivals = scenario.arrival_times_us();
    let users_total = arrivals.len() as u64;
    let pool = pool_size(&arrivals, scenario.users.patience_s);
    let duration_us = scenario.duration_us();
    let drain_us = scenario.engine.hold_ttl_s * 1_000_000 + DRAIN_AFTER_HOLD_TTL.as_micros() as u64;
    let recorder = HistoryRecorder::new(label, scenario.seed, check_config(scenario, 0, duration_us + drain_us));
    let shared = Arc::new(LiveShared::new(recorder, Instant::now() + LAUNCH_LEAD)?);
    let plan = Arc::new(JourneyPlan::of(scenario, deployment.nodes.clone(), deployment.session_secret.clone()));
    let dispatch = Arc::new(Dispatch {
        arrivals,
        next: AtomicUsize::new(0),
        begun: AtomicU64::new(0),
        late: AtomicU64::new(0),
        lateness: Mutex::new(Histogram::new_with_bounds(1, 3_600_000_000, 3)?),
    });

    let faults = LiveFaults::of(scenario);
    if let Some((from, to)) = faults.links().find(|(from, to)| !deployment.has_link(from, to)) {
        anyhow::bail!(
            "the scenario's faults act on the link {from} → {to}, which this run has no proxy on: run it with --spawn"
        );
    }
    if let Some(host) = faults.hosts().find(|host| !deployment.runs(host)) {
        anyhow::bail!(
            "the scenario's faults act on {host}, a process this run did not start: run it with --spawn \
             (the faults of a live run stop and kill processes of its own)"
        );
    }
    let ended = AtomicBool::new(false);
    let fault_steps = AtomicU64::new(0);
    let (goose_requests, applied) = std::thread::scope(|scope| {
        let timeline = scope.spawn(|| faults.run(deployment, &|| shared.now_us(), &ended, &fault_steps));
        let attack = {
            let (shared, plan, dispatch) = (Arc::clone(&shared), Arc::clone(&plan), Arc::clone(&dispatch));
            let host = deployment.nodes.first().cloned().context("no engine node to load")?;
            scope.spawn(move || attack(host, pool, shared, plan, dispatch))
        };
        let duration_s = duration_us as f64 / 1e6;
        while !attack.is_finished() {
            std::thread::sleep(Duration::from_millis(250));
            progress(LiveProgress {
                elapsed_s: shared.now_us() as f64 / 1e6,
                duration_s,
                started: dispatch.started(),
                late: dispatch.late.load(Ordering::Relaxed),
                requests: shared.requests.load(Ordering::Relaxed),
                errors: shared.errors.load(Ordering::Relaxed),
                p99_us: shared.latency.lock().value_at_quantile(0.99),
                fault_steps: fault_steps.load(Ordering::Relaxed),
                fault_steps_total: faults.steps_total(),
            });
        }
        let goose_requests = attack.join().map_err(|_| anyhow::anyhow!("the load driver panicked"));
        // Faults still open are healed before the state is read.
        ended.store(true, Ordering::Relaxed);
        let applied = timeline.join().map_err(|_| anyhow::anyhow!("the fault timeline panicked"))?;
        anyhow::Ok((goose_requests??, applied))
    })?;
    let partial = dispatch.started() < users_total;

    let exporter = Exporter::new(deployment)?;
    exporter.drain(&shared, Duration::from_micros(drain_us))?;
    let (dump, admitted) = exporter.state()?;
    let end_us = shared.now_us();
    let read = crate::history::from_stores(&dump, &admitted, |at_ms| shared.engine_time_us(at_ms))?;
    let shared = Arc::try_unwrap(shared).map_err(|_| anyhow::anyhow!("a journey still runs after the attack"))?;
    let mut history = shared.recorder.into_inner().finish_with(read);
    history.config.end_us = end_us;
    let lateness = dispatch.lateness.lock().clone();
    let figures = LiveFigures {
        pool,
        arrivals: users_total,
        journeys_started: dispatch.started(),
        journeys_late: dispatch.late.load(Ordering::Relaxed),
        lateness_p50_us: lateness.value_at_quantile(0.5),
        lateness_p99_us: lateness.value_at_quantile(0.99),
        lateness_max_us: lateness.max(),
        partial,
        fault_errors: applied.errors,
        links: deployment.link_counts(),
        goose_requests,
        wall_s: wall.elapsed().as_secs_f64(),
        deployment: deployment.description.clone(),
    };
    let world = WorldRun {
        store_failovers: Vec::new(),
        store_data_losses: Vec::new(),
        history,
        outcomes: shared.outcomes.into_inner(),
        fault_windows: applied.windows,
        fired_pauses: Vec::new(),
        users: users_total,
        agent: None,
        requests: Vec::new(),
    };
    Ok(LiveRun { world, figures })
}

/// The goose attack: `pool` users, each taking arrival tickets until none is left. Returns how
/// many requests goose counted.
fn attack(
    host: String,
    pool: usize,
    shared: Arc<LiveShared>,
    plan: Arc<JourneyPlan>,
    dispatch: Arc<Dispatch>,
) -> anyhow::Result<usize> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("the load runtime")?;
    runtime.block_on(async move {
        // A stop of an earlier run in this process is not this run's.
        goose::reset_killswitch();
        let stopped = watch_for_stop();
        let journeys: TransactionFunction = Arc::new(move |user: &mut GooseUser| {
            let (shared, plan, dispatch) = (Arc::clone(&shared), Arc::clone(&plan), Arc::clone(&dispatch));
            let mut stopped = stopped.clone();
            Box::pin(async move {
                while let Some((index, intended_us)) = dispatch.take() {
                    // Until the intended instant itself: before the run's start (the pool
                    // starts first) the run's clock reads 0, so a sleep for the difference
                    // would start the journey early.
                    if !wait_until(shared.started + Duration::from_micros(intended_us), &mut stopped).await {
                        break;
                    }
                    dispatch.begun.fetch_add(1, Ordering::Relaxed);
                    let lateness_us = shared.now_us().saturating_sub(intended_us);
                    let _ = dispatch.lateness.lock().record(lateness_us.max(1));
                    if lateness_us > LATE_AFTER_US {
                        dispatch.late.fetch_add(1, Ordering::Relaxed);
                    }
                    let fan = Journeys {
                        transport: LiveTransport::new(Arc::clone(&shared), user.client.clone(), intended_us),
                        plan: Arc::clone(&plan),
                    };
                    fan.journey(index as u64).await;
                    let steps = std::mem::take(&mut *fan.transport.steps.lock());
                    for step in steps {
                        let success = step.status.is_some_and(|status| status < 500);
                        let _ = user
                            .record_custom_request_duration(
                                step.method,
                                step.name,
                                step.duration,
                                success,
                                step.status,
                                None,
                            )
                            .await;
                    }
                }
                Ok(())
            })
        });
        let fans =
            goose::goose::Scenario::new("fans").register_transaction(Transaction::new(journeys).set_name("journeys"));
        let mut configuration = goose::config::GooseConfiguration::default();
        configuration.host = Some(host);
        configuration.users = Some(pool);
        // The whole pool starts within the launch lead, before the first arrival.
        configuration.increase_rate = Some(format!("{}", (pool as f64 / LAUNCH_LEAD.as_secs_f64()).ceil().max(1.0)));
        configuration.iterations = Some(1);
        configuration.quiet = 1;
        configuration.no_print_metrics = true;
        configuration.no_error_summary = true;
        // The attack ends once every pool user has run out of tickets (one iteration each).
        let client =
            goose::client::GooseClientBuilder::new().without_cookies().timeout(Duration::from_secs(LONG_POLL_S + 15));
        let goose_error = |error: GooseError| anyhow::anyhow!("goose: {error:?}");
        let metrics = GooseAttack::initialize_with_config(configuration)
            .map_err(goose_error)?
            .register_scenario(fans)
            .set_client_builder_without_cookies(client)
            .map_err(goose_error)?
            .execute()
            .await
            .map_err(goose_error)?;
        Ok(metrics.requests.values().map(|request| request.success_count + request.fail_count).sum())
    })
}

/// How often the attack looks whether it was stopped (Ctrl-C trips goose's killswitch).
const STOP_CHECK: Duration = Duration::from_millis(100);

/// A flag that turns true once the run is stopped, from one task that watches goose's
/// killswitch (so that thousands of waiting journeys do not each poll it).
fn watch_for_stop() -> tokio::sync::watch::Receiver<bool> {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        while !goose::is_killswitch_triggered() {
            tokio::time::sleep(STOP_CHECK).await;
        }
        let _ = stop.send(true);
    });
    stopped
}

/// Waits until `at`, or until the run is stopped; returns whether `at` came. A journey under
/// way when the run is stopped goes on to its end.
async fn wait_until(at: Instant, stopped: &mut tokio::sync::watch::Receiver<bool>) -> bool {
    tokio::select! {
        () = tokio::time::sleep_until(at.into()) => true,
        _ = stopped.wait_for(|stopped| *stopped) => false,
    }
}

/// Reads the engine's state through the admin API's export, page by page.
struct Exporter {
    client: reqwest::blocking::Client,
    node: String,
    admin_token: String,
}

/// One export page as the admin API answers it.
#[derive(serde::Deserialize)]
struct Page<T> {
    items: Vec<T>,
    next: Option<u64>,
}

impl Exporter {
    fn new(deployment: &Deployment) -> anyhow::Result<Exporter> {
        Ok(Exporter {
            client: reqwest::blocking::Client::builder().timeout(Duration::from_secs(120)).build()?,
            node: deployment.nodes.first().cloned().context("no engine node to read")?,
            admin_token: deployment.admin_token.clone(),
        })
    }

    fn part<T: DeserializeOwned>(&self, part: &str) -> anyhow::Result<Vec<T>> {
        let mut items = Vec::new();
        let mut after = 0;
        loop {
            let url = format!("{}/admin/v1/export/{part}?after={after}&limit={EXPORT_PAGE}", self.node);
            let response = self
                .client
                .get(&url)
                .bearer_auth(&self.admin_token)
                .send()
                .with_context(|| format!("reading {url}"))?;
            let status = response.status();
            anyhow::ensure!(status.is_success(), "{url} answered {status}: {}", response.text().unwrap_or_default());
            let page: Page<T> = response.json().with_context(|| format!("reading {url}"))?;
            items.extend(page.items);
            match page.next {
                Some(next) => after = next,
                None => return Ok(items),
            }
        }
    }

    /// Waits until no hold is left to expire (the sweeper's work after the last fan), or the
    /// drain's length has passed.
    fn drain(&self, shared: &LiveShared, longest: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + longest;
        let settled = Instant::now() + DRAIN_AFTER_HOLD_TTL.min(longest);
        loop {
            let held = self
                .part::<Reservation>("reservations")?
                .iter()
                .any(|reservation| reservation.status == ReservationStatus::Held);
            let now = Instant::now();
            if now >= deadline || (!held && now >= settled) {
                tracing::debug!(at_us = shared.now_us(), held, "drained");
                return Ok(());
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    fn state(&self) -> anyhow::Result<(RecordDump, Vec<Admitted>)> {
        let dump = RecordDump {
            schedules: self.part::<Schedule>("schedules")?,
            accounts: self.part::<Account>("accounts")?,
            ledger: self.part::<LedgerEntry>("ledger")?,
            reservations: self.part::<Reservation>("reservations")?,
            fences: self.part::<AcceptedFence>("fences")?,
            outbox: self.part::<OutboxEvent>("outbox")?,
        };
        Ok((dump, self.part::<Admitted>("admissions")?))
    }
}

#[cfg(test)]
mod tests {
    use super::pool_size;

    #[test]
    fn the_pool_holds_the_most_journeys_under_way_at_once() {
        // Three arrivals within one span, a fourth long after.
        let arrivals = [0, 1_000_000, 2_000_000, 500_000_000];
        assert_eq!(pool_size(&arrivals, 10.0), 3);
        assert_eq!(pool_size(&[], 10.0), 1);
        // With no patience, journeys still take their last calls' span.
        let spread: Vec<u64> = (0..100).map(|second| second * 1_000_000).collect();
        assert_eq!(pool_size(&spread, 0.0), 41);
    }
}
