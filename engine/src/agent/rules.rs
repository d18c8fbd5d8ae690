//! The `rules` policy: deterministic thresholds with hysteresis.
//!
//! - Overload (p99 latency or error rate over its maximum) on `overload_after` observations in
//!   a row: cut every line's admission rate by `admission_cut_factor`, down to a floor.
//! - Calm (both under `calm_fraction` of their maximum) on `calm_after` observations in a row,
//!   after a cut: raise admission by `admission_raise_factor`, step by step, back to where it
//!   was before the first cut. Between the two bands nothing changes, so the rates do not flap.
//! - An IP at `ip_factor` times the median IP's rate (and at least `ip_rate_min_per_s`) on
//!   `ip_strikes` observations in a row: block it for `block_ttl_s`, again if some node that
//!   answered lacks the block (it restarted, or was cut off when the block was sent). Unless
//!   the address is shared (a carrier's NAT, a venue's Wi-Fi): without the abusive users whose
//!   only address it is, at least `shared_ip_users_min` verified users remain and they average
//!   at most `shared_ip_user_factor` times the median user's rate. Then its abusive users are
//!   blocked (next rule) and the address is not; a sessionless flood, or a farm of accounts
//!   each a few times busier than a fan, still blocks it.
//! - A verified user at `user_factor` times the median user's rate (and at least
//!   `user_rate_min_per_s`) on `user_strikes` observations in a row, from one address or
//!   many: block the user for `block_ttl_s`, the same way; the others behind their address
//!   keep being served.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::domain::UserId;

use super::observation::{Observation, TalkerView};
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
    pub shared_ip_users_min: u64,
    pub shared_ip_user_factor: f64,
    pub user_factor: f64,
    pub user_rate_min_per_s: f64,
    pub user_strikes: u32,
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
            shared_ip_users_min: 5,
            shared_ip_user_factor: 3.0,
            user_factor: 20.0,
            user_rate_min_per_s: 20.0,
            user_strikes: 2,
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
    user_strikes: BTreeMap<UserId, u32>,
}

/// How the cluster looks against the thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    Overloaded,
    Between,
    Calm,
}

impl RulesPolicy {
    pub const TOOLS: [ToolName; 3] = [ToolName::SetAdmission, ToolName::BlockIp, ToolName::BlockUser];

    pub fn new(config: RulesConfig) -> Self {
        Self {
            config,
            overload_streak: 0,
            calm_streak: 0,
            rates_before_cut: BTreeMap::new(),
            ip_strikes: BTreeMap::new(),
            user_strikes: BTreeMap::new(),
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

    fn abusive_ips(&mut self, seen: &Observation, reasons: &mut Vec<String>, calls: &mut Vec<ToolCall>) {
        let config = &self.config;
        let threshold = (seen.ip_median_requests_per_s * config.ip_factor).max(config.ip_rate_min_per_s);
        let mut strikes = BTreeMap::new();
        for talker in seen.talkers.iter().filter(|talker| talker.requests_per_s >= threshold) {
            let count = self.ip_strikes.get(&talker.ip).copied().unwrap_or(0) + 1;
            strikes.insert(talker.ip, count);
            if let Some((users, rate_per_user)) = self.shared(talker, seen) {
                if count == config.ip_strikes {
                    reasons.push(format!(
                        "{} at {:.0} requests/s is shared by {} users ({users} of them at {rate_per_user:.1} \
                         requests/s each on average, median user {:.1}); its users are judged one by one, the \
                         address is not blocked",
                        talker.ip, talker.requests_per_s, talker.users, seen.user_median_requests_per_s
                    ));
                }
                continue;
            }
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
        }
        self.ip_strikes = strikes;
    }

    /// The rate at which a user is abusive.
    fn user_threshold(&self, seen: &Observation) -> f64 {
        (seen.user_median_requests_per_s * self.config.user_factor).max(self.config.user_rate_min_per_s)
    }

    /// Whether `talker` is an address shared by normal users: if so, how many remain without
    /// its abusive users (those at the user threshold whose only address it is) and their
    /// average rate.
    fn shared(&self, talker: &TalkerView, seen: &Observation) -> Option<(u64, f64)> {
        let threshold = self.user_threshold(seen);
        let abusive =
            seen.users.iter().filter(|user| user.requests_per_s >= threshold && user.only_ip == Some(talker.ip));
        let (abusive_count, abusive_rate) =
            abusive.fold((0, 0.0), |(count, rate), user| (count + 1, rate + user.requests_per_s));
        let users = talker.users.saturating_sub(abusive_count);
        if users < self.config.shared_ip_users_min {
            return None;
        }
        let rate_per_user = (talker.requests_per_s - abusive_rate).max(0.0) / users as f64;
        (rate_per_user <= seen.user_median_requests_per_s * self.config.shared_ip_user_factor)
            .then_some((users, rate_per_user))
    }

    fn abusive_users(&mut self, seen: &Observation, reasons: &mut Vec<String>, calls: &mut Vec<ToolCall>) {
        let threshold = self.user_threshold(seen);
        let config = &self.config;
        let mut strikes = BTreeMap::new();
        for user in seen.users.iter().filter(|user| user.requests_per_s >= threshold) {
            let count = self.user_strikes.get(&user.user_id).copied().unwrap_or(0) + 1;
            strikes.insert(user.user_id, count);
            let partly = seen.blocked_users_partly.contains(&user.user_id);
            if count >= config.user_strikes && (partly || !seen.blocked_users.contains(&user.user_id)) {
                calls.push(ToolCall::BlockUser { user_id: user.user_id, ttl_s: config.block_ttl_s });
                reasons.push(format!(
                    "user {} at {:.0} requests/s from {} address(es) (threshold {threshold:.0}, median user {:.1}); \
                     blocked{}",
                    user.user_id,
                    user.requests_per_s,
                    user.ips,
                    seen.user_median_requests_per_s,
                    if partly { " on every node (some had no block)" } else { "" }
                ));
            }
        }
        self.user_strikes = strikes;
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
        self.abusive_ips(seen, &mut reasons, &mut calls);
        self.abusive_users(seen, &mut reasons, &mut calls);
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
    use crate::agent::observation::{TalkerView, UserView, calm};

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
        seen.talkers.push(TalkerView::sessionless(bot, 400.0));
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
        busy.talkers.push(TalkerView::sessionless(bot, 400.0));
        decide(&mut policy, &busy);
        decide(&mut policy, &calm());
        assert_eq!(decide(&mut policy, &busy), Vec::new());
    }

    #[test]
    fn a_busy_user_under_the_threshold_is_not_blocked() {
        let mut seen = calm();
        // 19 x the median and above the floor: under the factor of 20.
        seen.ip_median_requests_per_s = 3.0;
        seen.talkers.push(TalkerView::sessionless("10.0.0.9".parse().expect("ip"), 57.0));
        let mut policy = RulesPolicy::new(RulesConfig::default());
        for _ in 0..5 {
            assert_eq!(decide(&mut policy, &seen), Vec::new());
        }
    }

    /// A carrier address: 40 fans at 1 request/s each, and user 7 flooding at 300 requests/s.
    fn behind_a_shared_address() -> (Observation, IpAddr) {
        let shared: IpAddr = "100.64.0.2".parse().expect("ip");
        let mut seen = calm();
        let talker = TalkerView { ip: shared, requests_per_s: 340.0, sessionless_requests_per_s: 0.0, users: 41 };
        seen.talkers.insert(0, talker);
        seen.users.insert(0, UserView { user_id: 7, requests_per_s: 300.0, ips: 1, only_ip: Some(shared) });
        (seen, shared)
    }

    #[test]
    fn a_flooding_user_behind_a_shared_address_is_blocked_and_the_address_is_not() {
        let (mut seen, _) = behind_a_shared_address();
        let mut policy = RulesPolicy::new(RulesConfig::default());
        assert_eq!(decide(&mut policy, &seen), Vec::new(), "one strike");
        assert_eq!(decide(&mut policy, &seen), vec![ToolCall::BlockUser { user_id: 7, ttl_s: 120 }]);
        seen.blocked_users.push(7);
        assert_eq!(decide(&mut policy, &seen), Vec::new(), "already blocked");
        seen.blocked_users_partly.push(7);
        assert_eq!(decide(&mut policy, &seen), vec![ToolCall::BlockUser { user_id: 7, ttl_s: 120 }], "a node lacks it");
    }

    #[test]
    fn a_shared_address_flooded_without_sessions_or_by_a_farm_of_accounts_is_blocked() {
        let (mut sessionless, shared) = behind_a_shared_address();
        sessionless.users.remove(0);
        sessionless.talkers[0].users = 40;
        sessionless.talkers[0].sessionless_requests_per_s = 300.0;
        // A hundred accounts at 8 requests/s each: no one of them abusive, all of them busy.
        let (mut farm, _) = behind_a_shared_address();
        farm.users.remove(0);
        farm.talkers[0] = TalkerView { ip: shared, requests_per_s: 800.0, sessionless_requests_per_s: 0.0, users: 100 };
        for seen in [sessionless, farm] {
            let mut policy = RulesPolicy::new(RulesConfig::default());
            decide(&mut policy, &seen);
            assert_eq!(decide(&mut policy, &seen), vec![ToolCall::BlockIp { ip: shared, ttl_s: 120 }], "{seen:?}");
        }
    }

    #[test]
    fn a_user_flooding_from_many_addresses_is_blocked() {
        let mut seen = calm();
        // 200 addresses at 1.5 requests/s each: no address stands out, the user does.
        seen.users.insert(0, UserView { user_id: 9, requests_per_s: 300.0, ips: 16, only_ip: None });
        let mut policy = RulesPolicy::new(RulesConfig::default());
        decide(&mut policy, &seen);
        assert_eq!(decide(&mut policy, &seen), vec![ToolCall::BlockUser { user_id: 9, ttl_s: 120 }]);
    }

    #[test]
    fn a_busy_user_under_the_user_threshold_is_not_blocked() {
        let mut seen = calm();
        // 19 x the median user and above the floor: under the factor of 20.
        seen.user_median_requests_per_s = 2.0;
        seen.users.insert(0, UserView { user_id: 9, requests_per_s: 38.0, ips: 1, only_ip: "10.0.0.9".parse().ok() });
        let mut policy = RulesPolicy::new(RulesConfig::default());
        for _ in 0..5 {
            assert_eq!(decide(&mut policy, &seen), Vec::new());
        }
    }
}
