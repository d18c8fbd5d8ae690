//! What the agent sees at one decision: the admin snapshots of every node it reached,
//! merged into one compact view of the cluster.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::RateLimits;
use crate::domain::UserId;
use crate::engine::Snapshot;

/// Routes whose latency is a wait the client asked for (long polls), not service time.
const LONG_POLL_ROUTES: [&str; 1] = ["/v1/queue/{token}"];
/// The most talkers an observation lists.
pub const TALKERS_MAX: usize = 20;

/// One client IP's request rate, summed over the nodes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TalkerView {
    pub ip: IpAddr,
    pub requests_per_s: f64,
    /// Of those, the requests without a verified session.
    pub sessionless_requests_per_s: f64,
    /// Distinct verified users behind the address, as the node that saw the most counted them
    /// (a user that reached several nodes is one user).
    pub users: u64,
}

impl TalkerView {
    /// An address without sessions at `requests_per_s`: one client of its own.
    pub fn sessionless(ip: IpAddr, requests_per_s: f64) -> Self {
        Self { ip, requests_per_s, sessionless_requests_per_s: requests_per_s, users: 0 }
    }
}

/// One verified user's request rate, summed over the nodes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UserView {
    pub user_id: UserId,
    pub requests_per_s: f64,
    /// Distinct addresses of the user, as the node that saw the most counted them.
    pub ips: u64,
    /// The address, if every node saw all of the user's requests come from that one.
    pub only_ip: Option<IpAddr>,
}

/// One waiting line and its admission policy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueView {
    pub schedule_id: u64,
    pub waiting: u64,
    pub active: u32,
    pub rate_per_s: f64,
    pub active_max: u32,
    pub paused: bool,
}

/// The cluster as the agent sees it at one moment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Observation {
    pub at_ms: u64,
    /// Nodes whose snapshot was read, by name as they report it.
    pub nodes: Vec<String>,
    /// Nodes the agent could not read (addresses as configured).
    pub nodes_unreachable: Vec<String>,
    pub requests_per_s: f64,
    /// Server errors over all requests.
    pub error_rate: f64,
    /// Refusals (403, 429) over all requests.
    pub rejection_rate: f64,
    /// The worst p99 latency of any route except long polls, over the nodes.
    pub latency_us_p99: u64,
    pub store_latency_us_p99: u64,
    /// The median request rate of one IP: what "normal" looks like.
    pub ip_median_requests_per_s: f64,
    pub talkers: Vec<TalkerView>,
    /// The median request rate of one verified user.
    pub user_median_requests_per_s: f64,
    /// The busiest verified users.
    pub users: Vec<UserView>,
    pub queues: Vec<QueueView>,
    pub hold_ttl_s: Option<u64>,
    pub rate_limits: Option<RateLimits>,
    /// IPs blocked on at least one node that answered.
    pub blocked: Vec<IpAddr>,
    /// Of those, the ones some node that answered does not block: it restarted, or it was
    /// cut off when the block was sent.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub blocked_partly: Vec<IpAddr>,
    /// Users blocked on at least one node that answered.
    pub blocked_users: Vec<UserId>,
    /// Of those, the ones some node that answered does not block.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub blocked_users_partly: Vec<UserId>,
}

impl Observation {
    /// Merges the snapshots read at `at_ms`; `unreachable` names the nodes that did not answer.
    pub fn merge(at_ms: u64, snapshots: &[Snapshot], unreachable: Vec<String>) -> Observation {
        let requests_per_s: f64 = snapshots.iter().map(|s| s.traffic.requests_per_s).sum();
        let weighted = |rate: fn(&Snapshot) -> f64| {
            if requests_per_s <= 0.0 {
                return 0.0;
            }
            snapshots.iter().map(|s| rate(s) * s.traffic.requests_per_s).sum::<f64>() / requests_per_s
        };
        let mut talkers: BTreeMap<IpAddr, TalkerView> = BTreeMap::new();
        for talker in snapshots.iter().flat_map(|s| &s.traffic.top_talkers) {
            let view = talkers.entry(talker.ip).or_insert_with(|| TalkerView::sessionless(talker.ip, 0.0));
            view.requests_per_s += talker.requests_per_s;
            view.sessionless_requests_per_s += talker.sessionless_requests_per_s;
            view.users = view.users.max(talker.users);
        }
        let mut talkers: Vec<TalkerView> = talkers.into_values().collect();
        talkers.sort_by(|a, b| b.requests_per_s.total_cmp(&a.requests_per_s).then(a.ip.cmp(&b.ip)));
        talkers.truncate(TALKERS_MAX);
        let mut users: BTreeMap<UserId, UserView> = BTreeMap::new();
        for user in snapshots.iter().flat_map(|s| &s.traffic.top_users) {
            let view = users.entry(user.user_id).or_insert(UserView {
                user_id: user.user_id,
                requests_per_s: 0.0,
                ips: 0,
                only_ip: user.only_ip,
            });
            if view.only_ip != user.only_ip {
                view.only_ip = None;
            }
            view.requests_per_s += user.requests_per_s;
            view.ips = view.ips.max(user.ips);
        }
        let mut users: Vec<UserView> = users.into_values().collect();
        users.sort_by(|a, b| b.requests_per_s.total_cmp(&a.requests_per_s).then(a.user_id.cmp(&b.user_id)));
        users.truncate(TALKERS_MAX);
        let median_of = |rate: fn(&Snapshot) -> f64| {
            let mut medians: Vec<f64> = snapshots.iter().map(rate).collect();
            medians.sort_by(f64::total_cmp);
            medians.get(medians.len() / 2).copied().unwrap_or(0.0)
        };
        let mut queues: BTreeMap<u64, QueueView> = BTreeMap::new();
        for queue in snapshots.iter().flat_map(|s| &s.queues) {
            let view = queues.entry(queue.schedule_id).or_insert(QueueView {
                schedule_id: queue.schedule_id,
                waiting: 0,
                active: 0,
                rate_per_s: queue.admission.rate_per_s,
                active_max: queue.admission.active_max,
                paused: queue.admission.paused,
            });
            view.waiting = view.waiting.max(queue.waiting);
            view.active = view.active.max(queue.active);
        }
        let mut blocked: BTreeMap<IpAddr, usize> = BTreeMap::new();
        for block in snapshots.iter().flat_map(|s| &s.blocks) {
            *blocked.entry(block.ip).or_default() += 1;
        }
        let blocked_partly = blocked.iter().filter(|(_, nodes)| **nodes < snapshots.len()).map(|(ip, _)| *ip).collect();
        let mut blocked_users: BTreeMap<UserId, usize> = BTreeMap::new();
        for block in snapshots.iter().flat_map(|s| &s.user_blocks) {
            *blocked_users.entry(block.user_id).or_default() += 1;
        }
        let blocked_users_partly =
            blocked_users.iter().filter(|(_, nodes)| **nodes < snapshots.len()).map(|(user, _)| *user).collect();
        Observation {
            at_ms,
            nodes: snapshots.iter().map(|s| s.node.clone()).collect(),
            nodes_unreachable: unreachable,
            requests_per_s,
            error_rate: weighted(|s| s.traffic.error_rate),
            rejection_rate: weighted(|s| s.traffic.rejection_rate),
            latency_us_p99: snapshots
                .iter()
                .flat_map(|s| &s.traffic.routes)
                .filter(|route| !LONG_POLL_ROUTES.contains(&route.route.as_str()))
                .map(|route| route.latency_us_p99)
                .max()
                .unwrap_or(0),
            store_latency_us_p99: snapshots.iter().map(|s| s.traffic.store_latency_us_p99).max().unwrap_or(0),
            ip_median_requests_per_s: median_of(|s| s.traffic.ip_median_requests_per_s),
            talkers,
            user_median_requests_per_s: median_of(|s| s.traffic.user_median_requests_per_s),
            users,
            queues: queues.into_values().collect(),
            hold_ttl_s: snapshots.iter().map(|s| s.hold_ttl_s).min(),
            rate_limits: snapshots.first().map(|s| s.rate_limits),
            blocked: blocked.into_keys().collect(),
            blocked_partly,
            blocked_users: blocked_users.into_keys().collect(),
            blocked_users_partly,
        }
    }

    /// The observation as compact JSON: what a language model is shown.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// A short digest of what was seen, for the decision record.
    pub fn digest(&self) -> String {
        hex_prefix(&Sha256::digest(self.to_json().as_bytes()))
    }

    /// The admission policy of a line, if the agent saw it.
    pub fn queue(&self, schedule_id: u64) -> Option<&QueueView> {
        self.queues.iter().find(|queue| queue.schedule_id == schedule_id)
    }

    /// One IP's figures, if it is among the talkers.
    pub fn talker(&self, ip: IpAddr) -> Option<&TalkerView> {
        self.talkers.iter().find(|talker| talker.ip == ip)
    }

    /// The rate of one user, if they are among the busiest users.
    pub fn user_rate(&self, user_id: UserId) -> Option<f64> {
        self.users.iter().find(|user| user.user_id == user_id).map(|user| user.requests_per_s)
    }
}

/// The first 16 hex digits of a digest.
pub(crate) fn hex_prefix(digest: &[u8]) -> String {
    digest.iter().take(8).map(|byte| format!("{byte:02x}")).collect()
}

/// A calm observation of one line, for tests: p99 10 ms, no errors, 1000 IPs at 1 request/s,
/// each a user at 1 request/s.
#[cfg(test)]
pub(crate) fn calm() -> Observation {
    Observation {
        at_ms: 0,
        nodes: vec!["engine-1".into()],
        nodes_unreachable: Vec::new(),
        requests_per_s: 1_000.0,
        error_rate: 0.0,
        rejection_rate: 0.0,
        latency_us_p99: 10_000,
        store_latency_us_p99: 1_000,
        ip_median_requests_per_s: 1.0,
        talkers: vec![TalkerView {
            ip: "10.0.0.1".parse().expect("ip"),
            requests_per_s: 3.0,
            sessionless_requests_per_s: 0.0,
            users: 1,
        }],
        user_median_requests_per_s: 1.0,
        users: vec![UserView { user_id: 1, requests_per_s: 3.0, ips: 1, only_ip: "10.0.0.1".parse().ok() }],
        queues: vec![QueueView {
            schedule_id: 1,
            waiting: 100,
            active: 50,
            rate_per_s: 100.0,
            active_max: 500,
            paused: false,
        }],
        hold_ttl_s: Some(300),
        rate_limits: Some(RateLimits { per_ip_per_s: 20, per_token_per_s: 10, burst: 40 }),
        blocked: Vec::new(),
        blocked_partly: Vec::new(),
        blocked_users: Vec::new(),
        blocked_users_partly: Vec::new(),
    }
}
