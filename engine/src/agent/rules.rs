//! The `rules` policy: deterministic thresholds with hysteresis.
//!
//! - Overload (p99 latency or error rate over its maximum) on `overload_after` observations in
//!   a row: cut every line's admission rate by `admission_cut_factor`, down to a floor.
//! - Calm (both under `calm_fraction` of their maximum) on `calm_after` observations in a row,
//!   after a cut: raise admission by `admission_raise_factor`, step by step, back to where it
//!   was before the first cut. Between the two bands nothing changes, so the rates do not flap.
//! - An IP at `ip_factor` times the median IP's rate (and at least `ip_rate_min_per_s`) on
//!   `ip_strikes` observations in a row: block it for `block_ttl_s`, again if some node that
//!   answered lacks the block (it restarted, or was cut off when the block was sent).

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::observation::Observation;
use super::policy::{Policy, Proposal};
use super::tools::{ToolCall, ToolName};

/// The thresholds of the rules policy.
#[derive(Debug, Clone, PartialEq)]
pub struct RulesConfig {
    pub latency_us_p99_max: u64,
    pub error_rate_max: f64,
    pub overload_after: u32,
    pub calm_fraction: f64,
    pub calm_after: u32,
    pub admission_cut_factor: f64,
    pub admission_raise_factor: f64,
    pub admission_rate_floor_per_s: f64,
    pub ip_factor: f64,
    pub ip_rate_min_per_s: f64,
    pub ip_strikes: u32,
    pub block_ttl_s: u64,
}

impl Default for RulesConfig {
    fn default() -> Self {
        Self {
            latency_us_p99_max: 500_000,
            error_rate_max: 0.05,
            overload_after: 2,
            calm_fraction: 0.5,
            calm_after: 3,
            admission_cut_factor: 0.5,
            admission_raise_factor: 1.5,
            admission_rate_floor_per_s: 5.0,
            ip_factor: 20.0,
            ip_rate_min_per_s: 50.0,
            ip_strikes: 2,
            block_ttl_s: 120,
        }
    }
}

/// The rules policy and what it remembers between decisions.
#[derive(Debug, Clone)]
pub struct RulesPolicy {
    config: RulesConfig,
    overload_streak: u32,
    calm_streak: u32,
    /// Each line's admission rate before the first cut; empty when nothing is cut.
    rates_before_cut: BTreeMap<u64, f64>,
    ip_strikes: BTreeMap<IpAddr, u32>,
}

/// How the cluster looks against the thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    Overloaded,
    Between,
    Calm,
}

impl RulesPolicy {
    pub const TOOLS: [ToolName; 2] = [ToolName::SetAdmission, ToolName::BlockIp];

    pub fn new(config: RulesConfig) -> Self {
        Self {
            config,
            overload_streak: 0,
            calm_streak: 0,
            rates_before_cut: BTreeMap::new(),
            ip_strikes: BTreeMap::new(),
        }
    }

    fn health(&self, seen: &Observation) -> Health {
        let config = &self.config;
        if seen.latency_us_p99 > config.latency_us_p99_max || seen.error_rate > config.error_rate_max {
            Health::Overloaded
        } else if (seen.latency_us_p99 as f64) < config.latency_us_p99_max as f64 * config.calm_fraction
            && seen.error_rate < config.error_rate_max * config.calm_fraction
        {
            Health::Calm
        } else {
            Health::Between
        }
    }

    fn admission(&mut self, seen: &Observation, reasons: &mut Vec<String>, calls: &mut Vec<ToolCall>) {
        let config = self.config.clone();
        match self.health(seen) {
            Health::Overloaded => {
                self.calm_streak = 0;
                self.overload_streak += 1;
                if self.overload_streak < config.overload_after {
                    return;
                }
                self.overload_streak = 0;
                for queue in &seen.queues {
                    let rate = (queue.rate_per_s * config.admission_cut_factor).max(config.admission_rate_floor_per_s);
                    if rate < queue.rate_per_s {
                        self.rates_before_cut.entry(queue.schedule_id).or_insert(queue.rate_per_s);
                        calls.push(admission(queue.schedule_id, rate, queue.active_max));
                    }
                }
                reasons.push(format!(
                    "overloaded: p99 {} us (max {}), error rate {:.3} (max {}); admission cut",
                    seen.latency_us_p99, config.latency_us_p99_max, seen.error_rate, config.error_rate_max
                ));
            }
            Health::Calm => {
                self.overload_streak = 0;
                if self.rates_before_cut.is_empty() {
                    return;
                }
                self.calm_streak += 1;
                if self.calm_streak < config.calm_after {
                    return;
                }
                self.calm_streak = 0;
                for queue in &seen.queues {
                    let Some(&target) = self.rates_before_cut.get(&queue.schedule_id) else { continue };
                    let rate = (queue.rate_per_s * config.admission_raise_factor).min(target);
                    if rate >= target {
                        self.rates_before_cut.remove(&queue.schedule_id);
                    }
                    if rate > queue.rate_per_s {
                        calls.push(admission(queue.schedule_id, rate, queue.active_max));
                    }
                }
                reasons.push("recovered: admission raised a step".into());
            }
            Health::Between => {
                self.overload_streak = 0;
                self.calm_streak = 0;
            }
        }
    }

    fn abusers(&mut self, seen: &Observation, reasons: &mut Vec<String>, calls: &mut Vec<ToolCall>) {
        let config = &self.config;
        let threshold = (seen.ip_median_requests_per_s * config.ip_factor).max(config.ip_rate_min_per_s);
        let mut strikes = BTreeMap::new();
        for talker in seen.talkers.iter().filter(|talker| talker.requests_per_s >= threshold) {
            let count = self.ip_strikes.get(&talker.ip).copied().unwrap_or(0) + 1;
            let partly = seen.blocked_partly.contains(&talker.ip);
            if count >= config.ip_strikes && (partly || !seen.blocked.contains(&talker.ip)) {
                calls.push(ToolCall::BlockIp { ip: talker.ip, ttl_s: config.block_ttl_s });
                reasons.push(format!(
                    "{} at {:.0} requests/s (threshold {threshold:.0}, median IP {:.1}); blocked{}",
                    talker.ip,
                    talker.requests_per_s,
                    seen.ip_median_requests_per_s,
                    if partly { " on every node (some had no block)" } else { "" }
                ));
            }
            strikes.insert(talker.ip, count);
        }
        self.ip_strikes = strikes;
    }
}

fn admission(schedule_id: u64, rate_per_s: f64, active_max: u32) -> ToolCall {
    ToolCall::SetAdmission { schedule_id, rate_per_s: (rate_per_s * 100.0).round() / 100.0, active_max, paused: false }
}

#[async_trait::async_trait(?Send)]
impl Policy for RulesPolicy {
    fn name(&self) -> &'static str {
        "rules"
    }

    fn tools(&self) -> &[ToolName] {
        &Self::TOOLS
    }

    async fn decide(&mut self, seen: &Observation) -> Proposal {
        let (mut reasons, mut calls) = (Vec::new(), Vec::new());
        self.admission(seen, &mut reasons, &mut calls);
        self.abusers(seen, &mut reasons, &mut calls);
        let reason = if reasons.is_empty() {
            format!(
                "no rule fired: p99 {} us, error rate {:.3}, busiest IP {:.0} requests/s",
                seen.latency_us_p99,
                seen.error_rate,
                seen.talkers.first().map_or(0.0, |talker| talker.requests_per_s)
            )
        } else {
            reasons.join("; ")
        };
        Proposal { reason, calls, note: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::observation::{TalkerView, calm};

    fn decide(policy: &mut RulesPolicy, seen: &Observation) -> Vec<ToolCall> {
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        runtime.block_on(policy.decide(seen)).calls
    }

    fn with_p99(latency_us_p99: u64) -> Observation {
        Observation { latency_us_p99, ..calm() }
    }

    fn rate_of(calls: &[ToolCall]) -> Option<f64> {
        calls.iter().find_map(|call| match call {
            ToolCall::SetAdmission { rate_per_s, .. } => Some(*rate_per_s),
            _ => None,
        })
    }

    #[test]
    fn a_calm_cluster_gets_no_action() {
        let mut policy = RulesPolicy::new(RulesConfig::default());
        for _ in 0..20 {
            assert_eq!(decide(&mut policy, &calm()), Vec::new());
        }
    }

    #[test]
    fn overload_cuts_admission_after_two_observations_in_a_row() {
        let mut policy = RulesPolicy::new(RulesConfig::default());
        assert_eq!(decide(&mut policy, &with_p99(900_000)), Vec::new(), "one slow observation is not enough");
        assert_eq!(rate_of(&decide(&mut policy, &with_p99(900_000))), Some(50.0));
        let errors = Observation { error_rate: 0.2, ..calm() };
        let mut policy = RulesPolicy::new(RulesConfig::default());
        decide(&mut policy, &errors);
        assert_eq!(rate_of(&decide(&mut policy, &errors)), Some(50.0), "errors count as overload too");
    }

    #[test]
    fn recovery_raises_admission_step_by_step_back_to_where_it_was() {
        let mut policy = RulesPolicy::new(RulesConfig::default());
        decide(&mut policy, &with_p99(900_000));
        assert_eq!(rate_of(&decide(&mut policy, &with_p99(900_000))), Some(50.0));
        let mut seen = calm();
        seen.queues[0].rate_per_s = 50.0;
        let mut rates = Vec::new();
        for _ in 0..12 {
            if let Some(rate) = rate_of(&decide(&mut policy, &seen)) {
                seen.queues[0].rate_per_s = rate;
                rates.push(rate);
            }
        }
        assert_eq!(rates, vec![75.0, 100.0], "raised every third calm observation, never above the original");
    }

    #[test]
    fn latency_oscillating_around_the_maximum_does_not_flap() {
        let mut policy = RulesPolicy::new(RulesConfig::default());
        let mut actions = 0;
        for round in 0..30 {
            // Over the maximum, then just under it: never two overloads in a row, never calm.
            let p99 = if round % 2 == 0 { 520_000 } else { 480_000 };
            actions += decide(&mut policy, &with_p99(p99)).len();
        }
        assert_eq!(actions, 0);
        // After a cut, latency between the bands neither raises nor cuts again.
        decide(&mut policy, &with_p99(900_000));
        assert_eq!(decide(&mut policy, &with_p99(900_000)).len(), 1);
        let mut between = with_p99(400_000);
        between.queues[0].rate_per_s = 50.0;
        for _ in 0..10 {
            assert_eq!(decide(&mut policy, &between), Vec::new());
        }
    }

    #[test]
    fn an_ip_far_above_the_norm_is_blocked_on_its_second_strike() {
        let bot: IpAddr = "100.64.0.1".parse().expect("ip");
        let mut seen = calm();
        seen.talkers.push(TalkerView { ip: bot, requests_per_s: 400.0 });
        let mut policy = RulesPolicy::new(RulesConfig::default());
        assert_eq!(decide(&mut policy, &seen), Vec::new(), "one strike");
        assert_eq!(decide(&mut policy, &seen), vec![ToolCall::BlockIp { ip: bot, ttl_s: 120 }]);
        seen.blocked.push(bot);
        assert_eq!(decide(&mut policy, &seen), Vec::new(), "already blocked");
        seen.blocked_partly.push(bot);
        assert_eq!(
            decide(&mut policy, &seen),
            vec![ToolCall::BlockIp { ip: bot, ttl_s: 120 }],
            "blocked again where a node lacks the block"
        );
        // A strike, a normal observation, a strike: not twice in a row.
        let mut policy = RulesPolicy::new(RulesConfig::default());
        let mut busy = calm();
        busy.talkers.push(TalkerView { ip: bot, requests_per_s: 400.0 });
        decide(&mut policy, &busy);
        decide(&mut policy, &calm());
        assert_eq!(decide(&mut policy, &busy), Vec::new());
    }

    #[test]
    fn a_busy_user_under_the_threshold_is_not_blocked() {
        let mut seen = calm();
        // 19 x the median and above the floor: under the factor of 20.
        seen.ip_median_requests_per_s = 3.0;
        seen.talkers.push(TalkerView { ip: "10.0.0.9".parse().expect("ip"), requests_per_s: 57.0 });
        let mut policy = RulesPolicy::new(RulesConfig::default());
        for _ in 0..5 {
            assert_eq!(decide(&mut policy, &seen), Vec::new());
        }
    }
}
