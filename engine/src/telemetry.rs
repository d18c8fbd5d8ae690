//! What the engine measures about itself: Prometheus metrics for `/metrics`, and a rolling
//! per-second window for the admin snapshot the ops agent reads.
//!
//! **Invariant:** all durations are measured on the engine's [`Clock`](crate::clock::Clock),
//! so in the simulator they are simulated time; memory is bounded (a fixed window of
//! seconds, a capped number of IPs and of verified users per second, a capped number of
//! addresses per user).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;

use hdrhistogram::Histogram as Hdr;
use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::Serialize;
use utoipa::ToSchema;

use crate::domain::UserId;

/// Seconds the snapshot looks back over.
pub const WINDOW_S: u64 = 10;
/// Distinct IPs counted per second; beyond it requests are counted as overflow.
pub const IPS_PER_SECOND_MAX: usize = 20_000;
/// Top talkers listed in a snapshot.
pub const TOP_TALKERS_MAX: usize = 10;
/// Distinct verified users counted per second; beyond it their requests are counted as overflow.
pub const USERS_PER_SECOND_MAX: usize = 20_000;
/// Top users listed in a snapshot.
pub const TOP_USERS_MAX: usize = 10;
/// Addresses remembered per user and second, and per user over the window: enough to tell one
/// address from many, never a list a user can grow.
pub const USER_IPS_MAX: usize = 16;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    route: String,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScheduleLabel {
    schedule: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreOpLabel {
    op: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
}

/// What the server counts about its connections (handles on the node's metrics).
#[derive(Debug, Clone, Default)]
pub struct ConnectionMetrics {
    /// Connections open now.
    pub open: Gauge,
    /// Connections refused because the maximum was open.
    pub refused: Counter,
    /// Connections closed for being idle (or for starting no request in time).
    pub idle_closed: Counter,
}

/// One engine node's measurements.
#[derive(Debug)]
pub struct Telemetry {
    registry: Registry,
    http_requests: Family<HttpLabels, Counter>,
    http_latency: HistogramFamily<RouteLabel>,
    rejections: Family<ReasonLabel, Counter>,
    store_latency: HistogramFamily<StoreOpLabel>,
    confirmations: Counter,
    holds_granted: Counter,
    holds_active: Gauge,
    queue_waiting: Family<ScheduleLabel, Gauge>,
    queue_active: Family<ScheduleLabel, Gauge>,
    queue_admitted: Family<ScheduleLabel, Gauge>,
    connections: ConnectionMetrics,
    /// The metrics of each route and store call, taken from their families once: a request
    /// then finds them by name, without building (and allocating) a label set to look up.
    handles: Mutex<Handles>,
    window: Mutex<Window>,
}

/// Metrics already taken from their families. Each is a handle on the metric the family
/// holds (prometheus' metrics are shared on clone), so `/metrics` shows what they count.
#[derive(Debug, Default)]
struct Handles {
    routes: BTreeMap<String, RouteHandles>,
    store_ops: BTreeMap<&'static str, Histogram>,
}

#[derive(Debug)]
struct RouteHandles {
    latency: Histogram,
    /// By status; a route answers with a handful of them.
    requests: Vec<(u16, Counter)>,
}

#[derive(Debug, Default)]
struct Window {
    buckets: VecDeque<Bucket>,
    /// Histograms of buckets that left the window, emptied, for the next ones: a bucket a
    /// second would otherwise allocate (and the OS zero) a histogram per route each second.
    spare: Vec<Hdr<u64>>,
}

#[derive(Debug)]
struct Bucket {
    second: u64,
    routes: BTreeMap<String, RouteWindow>,
    ips: HashMap<IpAddr, IpCount>,
    ips_overflow: u64,
    users: HashMap<UserId, UserCount>,
    users_overflow: u64,
    store_latency: Hdr<u64>,
    confirmations: u64,
    holds: u64,
}

/// One address's requests in one second.
#[derive(Debug, Default, Clone, Copy)]
struct IpCount {
    requests: u32,
    /// Of those, the ones without a verified session.
    sessionless: u32,
}

/// One verified user's requests in one second, and where they came from.
#[derive(Debug)]
struct UserCount {
    requests: u32,
    addresses: Addresses,
}

/// The distinct addresses of one user, at most [`USER_IPS_MAX`]. The first is kept inline:
/// almost every user has one, and a second each would otherwise cost an allocation.
#[derive(Debug, Clone)]
struct Addresses {
    first: IpAddr,
    others: Vec<IpAddr>,
}

impl Addresses {
    fn new(first: IpAddr) -> Self {
        Self { first, others: Vec::new() }
    }

    fn insert(&mut self, ip: IpAddr) {
        if ip != self.first && !self.others.contains(&ip) && self.others.len() + 1 < USER_IPS_MAX {
            self.others.push(ip);
        }
    }

    fn iter(&self) -> impl Iterator<Item = IpAddr> + '_ {
        std::iter::once(self.first).chain(self.others.iter().copied())
    }
}

#[derive(Debug)]
struct RouteWindow {
    requests: u64,
    errors: u64,
    rejections: u64,
    latency: Hdr<u64>,
}

fn hdr() -> Hdr<u64> {
    Hdr::new_with_bounds(1, 600_000_000, 2).unwrap_or_else(|_| unreachable!("static bounds are valid"))
}

impl Bucket {
    fn new(second: u64, store_latency: Hdr<u64>) -> Self {
        Self {
            second,
            routes: BTreeMap::new(),
            ips: HashMap::new(),
            ips_overflow: 0,
            users: HashMap::new(),
            users_overflow: 0,
            store_latency,
            confirmations: 0,
            holds: 0,
        }
    }
}

impl Window {
    fn bucket(&mut self, now_ms: u64) -> &mut Bucket {
        self.bucket_and_spare(now_ms).0
    }

    /// The bucket of `now_ms`'s second, and the spare histograms.
    fn bucket_and_spare(&mut self, now_ms: u64) -> (&mut Bucket, &mut Vec<Hdr<u64>>) {
        let second = now_ms / 1000;
        if self.buckets.back().is_none_or(|bucket| bucket.second < second) {
            let store_latency = spare_or_new(&mut self.spare);
            self.buckets.push_back(Bucket::new(second, store_latency));
        }
        while self.buckets.len() as u64 > WINDOW_S + 1 {
            let Some(gone) = self.buckets.pop_front() else { break };
            let histograms = std::iter::once(gone.store_latency).chain(gone.routes.into_values().map(|r| r.latency));
            for mut histogram in histograms {
                histogram.reset();
                self.spare.push(histogram);
            }
        }
        let index = self.buckets.len() - 1;
        (&mut self.buckets[index], &mut self.spare)
    }
}

/// The value under `name`, inserted with `make` if absent: `BTreeMap::entry` would allocate
/// the key on every call, and almost every call finds it.
fn entry_by_name<'a, V>(map: &'a mut BTreeMap<String, V>, name: &str, make: impl FnOnce() -> V) -> &'a mut V {
    if !map.contains_key(name) {
        map.insert(name.to_owned(), make());
    }
    map.get_mut(name).unwrap_or_else(|| unreachable!("inserted above"))
}

fn spare_or_new(spare: &mut Vec<Hdr<u64>>) -> Hdr<u64> {
    spare.pop().unwrap_or_else(hdr)
}

/// A route's figures over the window.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, ToSchema)]
pub struct RouteSnapshot {
    pub route: String,
    pub requests_per_s: f64,
    pub error_rate: f64,
    pub rejection_rate: f64,
    pub latency_us_p50: u64,
    pub latency_us_p99: u64,
}

/// One client IP's request rate over the window.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, ToSchema)]
pub struct Talker {
    #[schema(value_type = String)]
    pub ip: IpAddr,
    pub requests_per_s: f64,
    /// Of those, the requests without a verified session.
    #[serde(default)]
    pub sessionless_requests_per_s: f64,
    /// Distinct verified users seen from this address: many mean a shared address (a
    /// carrier's NAT, a venue's Wi-Fi), whose users are better judged one by one.
    #[serde(default)]
    pub users: u64,
}

/// One verified user's request rate over the window.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, ToSchema)]
pub struct UserTalker {
    pub user_id: UserId,
    pub requests_per_s: f64,
    /// Distinct addresses the user's requests came from (counted up to 16).
    pub ips: u64,
    /// The address, if all of them came from one.
    #[schema(value_type = Option<String>)]
    pub only_ip: Option<IpAddr>,
}

/// The traffic part of the admin snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, ToSchema)]
pub struct TrafficSnapshot {
    pub window_s: u64,
    pub requests_per_s: f64,
    pub error_rate: f64,
    pub rejection_rate: f64,
    pub latency_us_p50: u64,
    pub latency_us_p99: u64,
    pub confirmations_per_s: f64,
    pub holds_per_s: f64,
    pub routes: Vec<RouteSnapshot>,
    pub top_talkers: Vec<Talker>,
    /// The median request rate of the IPs seen: what "normal" looks like.
    pub ip_median_requests_per_s: f64,
    pub distinct_ips: u64,
    /// The busiest users with a verified session.
    #[serde(default)]
    pub top_users: Vec<UserTalker>,
    /// The median request rate of the verified users seen.
    #[serde(default)]
    pub user_median_requests_per_s: f64,
    #[serde(default)]
    pub distinct_users: u64,
    pub store_latency_us_p50: u64,
    pub store_latency_us_p99: u64,
}

/// Was a response an error of the server, or a refusal of the client?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Served,
    Rejected,
    Failed,
}

impl Verdict {
    /// Classifies a status code.
    pub fn of_status(status: u16) -> Verdict {
        match status {
            500..=599 => Verdict::Failed,
            403 | 429 => Verdict::Rejected,
            _ => Verdict::Served,
        }
    }
}

impl Telemetry {
    /// Metrics for the node called `node`.
    pub fn new(node: &str) -> Self {
        let mut registry =
            Registry::with_prefix_and_labels("tcore", [("node".into(), node.to_owned().into())].into_iter());
        let http_requests = Family::<HttpLabels, Counter>::default();
        let http_latency = HistogramFamily::<RouteLabel>::new_with_constructor(latency_histogram);
        let rejections = Family::<ReasonLabel, Counter>::default();
        let store_latency = HistogramFamily::<StoreOpLabel>::new_with_constructor(latency_histogram);
        let confirmations = Counter::default();
        let holds_granted = Counter::default();
        let holds_active = Gauge::default();
        let queue_waiting = Family::<ScheduleLabel, Gauge>::default();
        let queue_active = Family::<ScheduleLabel, Gauge>::default();
        let queue_admitted = Family::<ScheduleLabel, Gauge>::default();
        registry.register("http_requests", "HTTP requests by route and status", http_requests.clone());
        registry.register("http_request_duration_seconds", "HTTP request latency by route", http_latency.clone());
        registry.register("rejections", "Requests refused, by reason", rejections.clone());
        registry.register("store_call_duration_seconds", "Store call latency by operation", store_latency.clone());
        registry.register("confirmations", "Reservations confirmed by this node", confirmations.clone());
        registry.register("holds_granted", "Holds granted by this node", holds_granted.clone());
        registry.register("holds_active", "Holds not yet confirmed, cancelled or expired", holds_active.clone());
        registry.register("queue_waiting", "Users waiting in line", queue_waiting.clone());
        registry.register("queue_active", "Admitted users not yet done", queue_active.clone());
        registry.register("queue_admitted", "Users admitted so far", queue_admitted.clone());
        let connections = ConnectionMetrics::default();
        registry.register("connections_open", "Client connections open", connections.open.clone());
        registry.register(
            "connections_refused",
            "Client connections refused at the maximum",
            connections.refused.clone(),
        );
        registry.register(
            "connections_idle_closed",
            "Client connections closed for idling",
            connections.idle_closed.clone(),
        );
        Self {
            registry,
            http_requests,
            http_latency,
            rejections,
            store_latency,
            confirmations,
            holds_granted,
            holds_active,
            queue_waiting,
            queue_active,
            queue_admitted,
            connections,
            handles: Mutex::new(Handles::default()),
            window: Mutex::new(Window::default()),
        }
    }

    /// Records one HTTP request from `ip`, by `user` if it carried a verified session.
    pub fn record_request(
        &self,
        route: &str,
        status: u16,
        latency_us: u64,
        ip: IpAddr,
        user: Option<UserId>,
        now_ms: u64,
    ) {
        {
            let mut handles = self.handles.lock();
            let handles = entry_by_name(&mut handles.routes, route, || RouteHandles {
                latency: self.http_latency.get_or_create(&RouteLabel { route: route.to_owned() }).clone(),
                requests: Vec::new(),
            });
            handles.latency.observe(latency_us as f64 / 1e6);
            match handles.requests.iter().find(|(known, _)| *known == status) {
                Some((_, counter)) => {
                    counter.inc();
                }
                None => {
                    let counter =
                        self.http_requests.get_or_create(&HttpLabels { route: route.to_owned(), status }).clone();
                    counter.inc();
                    handles.requests.push((status, counter));
                }
            }
        }
        let verdict = Verdict::of_status(status);
        let mut window = self.window.lock();
        let (bucket, spare) = window.bucket_and_spare(now_ms);
        let route_window = entry_by_name(&mut bucket.routes, route, || RouteWindow {
            requests: 0,
            errors: 0,
            rejections: 0,
            latency: spare_or_new(spare),
        });
        route_window.requests += 1;
        route_window.errors += u64::from(verdict == Verdict::Failed);
        route_window.rejections += u64::from(verdict == Verdict::Rejected);
        route_window.latency.saturating_record(latency_us.max(1));
        let sessionless = u32::from(user.is_none());
        if let Some(count) = bucket.ips.get_mut(&ip) {
            count.requests += 1;
            count.sessionless += sessionless;
        } else if bucket.ips.len() < IPS_PER_SECOND_MAX {
            bucket.ips.insert(ip, IpCount { requests: 1, sessionless });
        } else {
            bucket.ips_overflow += 1;
        }
        let Some(user) = user else { return };
        if let Some(count) = bucket.users.get_mut(&user) {
            count.requests += 1;
            count.addresses.insert(ip);
        } else if bucket.users.len() < USERS_PER_SECOND_MAX {
            bucket.users.insert(user, UserCount { requests: 1, addresses: Addresses::new(ip) });
        } else {
            bucket.users_overflow += 1;
        }
    }

    /// The connection metrics, for the server to count into.
    pub fn connection_metrics(&self) -> ConnectionMetrics {
        self.connections.clone()
    }

    /// Records a refusal with its stable reason code.
    pub fn record_rejection(&self, reason: &str) {
        self.rejections.get_or_create(&ReasonLabel { reason: reason.to_owned() }).inc();
    }

    /// Records how long a store call took.
    pub fn record_store_call(&self, op: &'static str, latency_us: u64, now_ms: u64) {
        self.handles
            .lock()
            .store_ops
            .entry(op)
            .or_insert_with(|| self.store_latency.get_or_create(&StoreOpLabel { op: op.to_owned() }).clone())
            .observe(latency_us as f64 / 1e6);
        self.window.lock().bucket(now_ms).store_latency.saturating_record(latency_us.max(1));
    }

    /// Records a granted hold.
    pub fn record_hold(&self, now_ms: u64) {
        self.holds_granted.inc();
        self.window.lock().bucket(now_ms).holds += 1;
    }

    /// Records a confirmation.
    pub fn record_confirmation(&self, now_ms: u64) {
        self.confirmations.inc();
        self.window.lock().bucket(now_ms).confirmations += 1;
    }

    /// Publishes a waiting line's counts.
    pub fn set_queue(&self, schedule_id: u64, waiting: u64, active: u32, admitted_total: u64) {
        let label = ScheduleLabel { schedule: schedule_id.to_string() };
        self.queue_waiting.get_or_create(&label).set(i64::try_from(waiting).unwrap_or(i64::MAX));
        self.queue_active.get_or_create(&label).set(i64::from(active));
        self.queue_admitted.get_or_create(&label).set(i64::try_from(admitted_total).unwrap_or(i64::MAX));
    }

    /// Publishes the number of live holds.
    pub fn set_holds_active(&self, holds_active: u64) {
        self.holds_active.set(i64::try_from(holds_active).unwrap_or(i64::MAX));
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            tracing::error!("metrics encoding failed");
        }
        text
    }

    /// The traffic figures over the last [`WINDOW_S`] whole seconds before `now_ms`.
    pub fn traffic(&self, now_ms: u64) -> TrafficSnapshot {
        let now_s = now_ms / 1000;
        let window = self.window.lock();
        let recent: Vec<&Bucket> =
            window.buckets.iter().filter(|bucket| bucket.second < now_s && bucket.second + WINDOW_S >= now_s).collect();
        let window_s = WINDOW_S as f64;
        let mut routes: BTreeMap<&str, (u64, u64, u64, Hdr<u64>)> = BTreeMap::new();
        let mut all_latency = hdr();
        let mut store_latency = hdr();
        let mut ips: BTreeMap<IpAddr, IpTotal> = BTreeMap::new();
        let mut users: BTreeMap<UserId, (u64, Addresses)> = BTreeMap::new();
        let (mut confirmations, mut holds) = (0, 0);
        for bucket in &recent {
            for (route, figures) in &bucket.routes {
                let entry = routes.entry(route.as_str()).or_insert_with(|| (0, 0, 0, hdr()));
                entry.0 += figures.requests;
                entry.1 += figures.errors;
                entry.2 += figures.rejections;
                entry.3.add(&figures.latency).unwrap_or_else(|_| unreachable!("same bounds"));
                all_latency.add(&figures.latency).unwrap_or_else(|_| unreachable!("same bounds"));
            }
            for (&ip, &count) in &bucket.ips {
                let total = ips.entry(ip).or_default();
                total.requests += u64::from(count.requests);
                total.sessionless += u64::from(count.sessionless);
            }
            for (&user, count) in &bucket.users {
                let (requests, addresses) = users.entry(user).or_insert_with(|| (0, count.addresses.clone()));
                *requests += u64::from(count.requests);
                count.addresses.iter().for_each(|ip| addresses.insert(ip));
            }
            store_latency.add(&bucket.store_latency).unwrap_or_else(|_| unreachable!("same bounds"));
            confirmations += bucket.confirmations;
            holds += bucket.holds;
        }
        let total: u64 = routes.values().map(|figures| figures.0).sum();
        let errors: u64 = routes.values().map(|figures| figures.1).sum();
        let rejections: u64 = routes.values().map(|figures| figures.2).sum();
        let distinct_ips = ips.len() as u64;
        let ip_median = median(ips.values().map(|total| total.requests));
        let mut talkers: Vec<(IpAddr, IpTotal)> = ips.into_iter().collect();
        talkers.sort_by(|a, b| b.1.requests.cmp(&a.1.requests).then(a.0.cmp(&b.0)));
        talkers.truncate(TOP_TALKERS_MAX);
        // How many users each top talker carries: one pass over the users' addresses.
        let mut users_behind: BTreeMap<IpAddr, u64> = talkers.iter().map(|(ip, _)| (*ip, 0)).collect();
        for (_, addresses) in users.values() {
            for ip in addresses.iter() {
                if let Some(count) = users_behind.get_mut(&ip) {
                    *count += 1;
                }
            }
        }
        let distinct_users = users.len() as u64;
        let user_median = median(users.values().map(|(requests, _)| *requests));
        let mut top_users: Vec<(UserId, u64, &Addresses)> =
            users.iter().map(|(&user, (requests, addresses))| (user, *requests, addresses)).collect();
        top_users.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        top_users.truncate(TOP_USERS_MAX);
        TrafficSnapshot {
            window_s: WINDOW_S,
            requests_per_s: total as f64 / window_s,
            error_rate: ratio(errors, total),
            rejection_rate: ratio(rejections, total),
            latency_us_p50: quantile(&all_latency, 0.5),
            latency_us_p99: quantile(&all_latency, 0.99),
            confirmations_per_s: confirmations as f64 / window_s,
            holds_per_s: holds as f64 / window_s,
            routes: routes
                .into_iter()
                .map(|(route, (requests, errors, rejections, latency))| RouteSnapshot {
                    route: route.to_owned(),
                    requests_per_s: requests as f64 / window_s,
                    error_rate: ratio(errors, requests),
                    rejection_rate: ratio(rejections, requests),
                    latency_us_p50: quantile(&latency, 0.5),
                    latency_us_p99: quantile(&latency, 0.99),
                })
                .collect(),
            distinct_ips,
            top_talkers: talkers
                .into_iter()
                .map(|(ip, total)| Talker {
                    ip,
                    requests_per_s: total.requests as f64 / window_s,
                    sessionless_requests_per_s: total.sessionless as f64 / window_s,
                    users: users_behind.get(&ip).copied().unwrap_or(0),
                })
                .collect(),
            ip_median_requests_per_s: ip_median as f64 / window_s,
            top_users: top_users
                .into_iter()
                .map(|(user_id, requests, addresses)| UserTalker {
                    user_id,
                    requests_per_s: requests as f64 / window_s,
                    ips: addresses.iter().count() as u64,
                    only_ip: addresses.others.is_empty().then_some(addresses.first),
                })
                .collect(),
            user_median_requests_per_s: user_median as f64 / window_s,
            distinct_users,
            store_latency_us_p50: quantile(&store_latency, 0.5),
            store_latency_us_p99: quantile(&store_latency, 0.99),
        }
    }
}

/// One address's requests over the window.
#[derive(Debug, Default, Clone, Copy)]
struct IpTotal {
    requests: u64,
    sessionless: u64,
}

/// The median of `counts`, 0 for none.
fn median(counts: impl Iterator<Item = u64>) -> u64 {
    let mut counts: Vec<u64> = counts.collect();
    counts.sort_unstable();
    counts.get(counts.len() / 2).copied().unwrap_or(0)
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 { 0.0 } else { part as f64 / whole as f64 }
}

fn quantile(histogram: &Hdr<u64>, q: f64) -> u64 {
    if histogram.is_empty() { 0 } else { histogram.value_at_quantile(q) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn the_window_reports_rates_errors_and_top_talkers_over_whole_seconds() {
        let telemetry = Telemetry::new("engine-1");
        for i in 0..90 {
            telemetry.record_request("/v1/holds", 201, 1_000, A, None, 10_000 + i);
        }
        for i in 0..10 {
            telemetry.record_request("/v1/holds", 503, 9_000, B, None, 10_100 + i);
        }
        telemetry.record_request("/v1/holds", 201, 5, A, None, 12_500);
        let traffic = telemetry.traffic(12_000);
        assert_eq!(traffic.requests_per_s, 10.0);
        assert_eq!(traffic.error_rate, 0.1);
        assert_eq!(traffic.top_talkers[0].ip, A);
        assert_eq!(traffic.top_talkers[0].requests_per_s, 9.0);
        assert!(traffic.latency_us_p99 >= 8_900, "p99 sees the slow failures: {}", traffic.latency_us_p99);
    }

    #[test]
    fn the_window_reports_top_users_their_addresses_and_the_users_behind_each_address() {
        let telemetry = Telemetry::new("engine-1");
        let shared = IpAddr::V4(std::net::Ipv4Addr::new(100, 64, 0, 1));
        for second in 0..WINDOW_S {
            let now_ms = 1_000 + second * 1_000;
            // Ten fans behind one carrier address at 1 request/s, and one of them flooding.
            for fan in 1..=10 {
                telemetry.record_request("/v1/queue/{token}", 200, 100, shared, Some(fan), now_ms);
            }
            for _ in 0..50 {
                telemetry.record_request("/v1/schedules/{id}/queue", 429, 100, shared, Some(10), now_ms);
            }
            // One user from twenty addresses, and a client without a session.
            for host in 0..20_u8 {
                let ip = IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, host));
                telemetry.record_request("/v1/schedules/{id}/queue", 429, 100, ip, Some(77), now_ms);
            }
            for _ in 0..30 {
                telemetry.record_request("/v1/schedules", 200, 100, A, None, now_ms);
            }
        }
        let traffic = telemetry.traffic(1_000 + WINDOW_S * 1_000);
        let users: Vec<(u64, f64, u64)> =
            traffic.top_users.iter().map(|user| (user.user_id, user.requests_per_s, user.ips)).collect();
        assert_eq!(users[..2], [(10, 51.0, 1), (77, 20.0, USER_IPS_MAX as u64)]);
        assert_eq!((traffic.top_users[0].only_ip, traffic.top_users[1].only_ip), (Some(shared), None));
        assert_eq!(users.len(), TOP_USERS_MAX);
        assert_eq!(traffic.distinct_users, 11);
        assert_eq!(traffic.user_median_requests_per_s, 1.0);
        let talker = |ip: IpAddr| traffic.top_talkers.iter().find(|talker| talker.ip == ip).expect("a top talker");
        assert_eq!((talker(shared).requests_per_s, talker(shared).users), (60.0, 10));
        assert_eq!(talker(shared).sessionless_requests_per_s, 0.0);
        assert_eq!((talker(A).sessionless_requests_per_s, talker(A).users), (30.0, 0));
    }

    #[test]
    fn users_counted_per_second_are_bounded() {
        let telemetry = Telemetry::new("engine-1");
        let extra = 100;
        for user in 0..(USERS_PER_SECOND_MAX + extra) as u64 {
            telemetry.record_request("/v1/queue/{token}", 200, 100, A, Some(user), 1_000);
        }
        let window = telemetry.window.lock();
        let bucket = window.buckets.back().expect("a bucket");
        assert_eq!(bucket.users.len(), USERS_PER_SECOND_MAX);
        assert_eq!(bucket.users_overflow, extra as u64);
        assert_eq!(bucket.ips[&A].requests as usize, USERS_PER_SECOND_MAX + extra, "the address counts them all");
        drop(window);
        assert_eq!(telemetry.traffic(2_000).distinct_users, USERS_PER_SECOND_MAX as u64);
    }

    /// The histograms of seconds that left the window are used again, empty: nothing of an
    /// old second shows in a new one.
    #[test]
    fn a_second_that_left_the_window_leaves_nothing_behind() {
        let telemetry = Telemetry::new("engine-1");
        for i in 0..50 {
            telemetry.record_request("/v1/holds", 503, 900_000, B, None, 1_000 + i);
            telemetry.record_store_call("try_hold", 700_000, 1_000 + i);
        }
        let late_s = 2 + WINDOW_S * 3;
        for second in 2..=late_s {
            telemetry.record_request("/v1/holds", 201, 1_000, A, None, second * 1_000);
            telemetry.record_store_call("try_hold", 500, second * 1_000);
        }
        let traffic = telemetry.traffic((late_s + 1) * 1_000);
        assert_eq!(traffic.requests_per_s, 1.0);
        assert_eq!(traffic.error_rate, 0.0);
        assert!(traffic.latency_us_p99 < 2_000, "{}", traffic.latency_us_p99);
        assert!(traffic.store_latency_us_p99 < 1_000, "{}", traffic.store_latency_us_p99);
        assert_eq!(traffic.routes.len(), 1);
        assert!(traffic.routes[0].latency_us_p99 < 2_000, "{:?}", traffic.routes[0]);
        assert_eq!(traffic.top_talkers.len(), 1, "{:?}", traffic.top_talkers);
    }

    #[test]
    fn metrics_text_names_routes_and_reasons() {
        let telemetry = Telemetry::new("engine-1");
        telemetry.record_request("/v1/holds", 409, 100, A, None, 1_000);
        telemetry.record_rejection("seat_taken");
        // Counted again through the handles kept after the first request of each kind.
        telemetry.record_request("/v1/holds", 201, 100, A, None, 1_000);
        telemetry.record_request("/v1/holds", 201, 100, A, None, 2_000);
        telemetry.record_store_call("try_hold", 50, 1_000);
        telemetry.record_store_call("try_hold", 70, 1_000);
        let text = telemetry.encode();
        for line in [
            "tcore_http_requests_total{node=\"engine-1\",route=\"/v1/holds\",status=\"409\"} 1",
            "tcore_http_requests_total{node=\"engine-1\",route=\"/v1/holds\",status=\"201\"} 2",
            "tcore_http_request_duration_seconds_count{node=\"engine-1\",route=\"/v1/holds\"} 3",
            "tcore_store_call_duration_seconds_count{node=\"engine-1\",op=\"try_hold\"} 2",
            "tcore_rejections_total{node=\"engine-1\",reason=\"seat_taken\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }
}
