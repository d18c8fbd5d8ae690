//! What the agent sees at one decision: the admin snapshots of every node it reached,
//! merged into one compact view of the cluster.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::RateLimits;
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
    pub queues: Vec<QueueView>,
    pub hold_ttl_s: Option<u64>,
    pub rate_limits: Option<RateLimits>,
    /// IPs blocked on at least one node that answered.
    pub blocked: Vec<IpAddr>,
    /// Of those, the ones some node that answered does not block: it restarted, or it was
    /// cut off when the block was sent.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub blocked_partly: Vec<IpAddr>,
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
        let mut talkers: BTreeMap<IpAddr, f64> = BTreeMap::new();
        for talker in snapshots.iter().flat_map(|s| &s.traffic.top_talkers) {
            *talkers.entry(talker.ip).or_default() += talker.requests_per_s;
        }
        let mut talkers: Vec<TalkerView> =
            talkers.into_iter().map(|(ip, requests_per_s)| TalkerView { ip, requests_per_s }).collect();
        talkers.sort_by(|a, b| b.requests_per_s.total_cmp(&a.requests_per_s).then(a.ip.cmp(&b.ip)));
        talkers.truncate(TALKERS_MAX);
        let mut medians: Vec<f64> = snapshots.iter().map(|s| s.traffic.ip_median_requests_per_s).collect();
        medians.sort_by(f64::total_cmp);
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
            ip_median_requests_per_s: medians.get(medians.len() / 2).copied().unwrap_or(0.0),
            talkers,
            queues: queues.into_values().collect(),
            hold_ttl_s: snapshots.iter().map(|s| s.hold_ttl_s).min(),
            rate_limits: snapshots.first().map(|s| s.rate_limits),
            blocked: blocked.into_keys().collect(),
            blocked_partly,
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

    /// The rate of one IP, if it is among the talkers.
    pub fn talker_rate(&self, ip: IpAddr) -> Option<f64> {
        self.talkers.iter().find(|talker| talker.ip == ip).map(|talker| talker.requests_per_s)
    }
}

/// The first 16 hex digits of a digest.
pub(crate) fn hex_prefix(digest: &[u8]) -> String {
    digest.iter().take(8).map(|byte| format!("{byte:02x}")).collect()
}

/// A calm observation of one line, for tests: p99 10 ms, no errors, 1000 IPs at 1 request/s.
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
        talkers: vec![TalkerView { ip: "10.0.0.1".parse().expect("ip"), requests_per_s: 3.0 }],
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
    }
}
