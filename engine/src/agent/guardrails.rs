//! The guardrails every proposed action passes before it reaches the admin API: the tools a
//! policy may use, the agent's own bounds (tighter than the engine's), the largest change one
//! decision may make, and evidence for blocks. A rejected action is recorded, never applied.

use std::collections::BTreeSet;
use std::ops::RangeInclusive;

use super::observation::Observation;
use super::tools::{ToolCall, ToolName};

/// The agent's bounds and rates of change.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub admission_rate_per_s: RangeInclusive<f64>,
    pub active_max: RangeInclusive<u32>,
    /// One decision moves an admission rate or active maximum by at most this factor, up or down.
    pub admission_change_factor_max: f64,
    pub rate_limit_per_s: RangeInclusive<u32>,
    pub rate_limit_burst: RangeInclusive<u32>,
    /// One decision moves a rate limit by at most this factor, up or down.
    pub rate_limit_change_factor_max: f64,
    pub block_ttl_s: RangeInclusive<u64>,
    /// The most IPs and users one decision blocks.
    pub blocks_per_decision_max: usize,
    /// An IP (a user) is blocked only if the agent saw it at this many times the median IP's
    /// (user's) rate.
    pub block_evidence_factor: f64,
    /// Hold TTLs the agent may set: never so short that a hold can expire during a payment.
    pub hold_ttl_s: RangeInclusive<u64>,
    /// One decision moves the hold TTL by at most this many seconds.
    pub hold_ttl_change_s_max: u64,
    /// The most actions one decision takes.
    pub actions_per_decision_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            admission_rate_per_s: 1.0..=10_000.0,
            active_max: 10..=100_000,
            admission_change_factor_max: 2.0,
            rate_limit_per_s: 1..=10_000,
            rate_limit_burst: 1..=10_000,
            rate_limit_change_factor_max: 2.0,
            block_ttl_s: 10..=3_600,
            blocks_per_decision_max: 16,
            block_evidence_factor: 5.0,
            hold_ttl_s: 60..=1_800,
            hold_ttl_change_s_max: 120,
            actions_per_decision_max: 32,
        }
    }
}

/// The guardrails of one agent: its policy's allowlist and its limits.
#[derive(Debug, Clone, PartialEq)]
pub struct Guardrails {
    pub allowed: BTreeSet<ToolName>,
    pub limits: Limits,
}

/// What one decision has done so far, for the per-decision limits.
#[derive(Debug, Clone, Default)]
pub struct DecisionBudget {
    actions: usize,
    blocks: usize,
    touched: BTreeSet<String>,
}

impl Guardrails {
    /// Guardrails allowing `allowed`, with the default limits.
    pub fn allowing(allowed: &[ToolName]) -> Self {
        Self { allowed: allowed.iter().copied().collect(), limits: Limits::default() }
    }

    /// Judges `call` against what the agent saw and what this decision did already; on
    /// acceptance the budget counts it. The error says why the call is rejected.
    pub fn check(&self, call: &ToolCall, seen: &Observation, budget: &mut DecisionBudget) -> Result<(), String> {
        let tool = call.tool();
        if !self.allowed.contains(&tool) {
            return Err(format!("`{}` is not allowed for this policy", tool.as_str()));
        }
        if budget.actions >= self.limits.actions_per_decision_max {
            return Err(format!("one decision takes at most {} actions", self.limits.actions_per_decision_max));
        }
        let target = target(call);
        if budget.touched.contains(&target) {
            return Err(format!("{target} was already changed by this decision"));
        }
        self.check_values(call, seen)?;
        if matches!(tool, ToolName::BlockIp | ToolName::BlockUser) {
            if budget.blocks >= self.limits.blocks_per_decision_max {
                return Err(format!(
                    "one decision blocks at most {} IPs and users",
                    self.limits.blocks_per_decision_max
                ));
            }
            budget.blocks += 1;
        }
        budget.actions += 1;
        budget.touched.insert(target);
        Ok(())
    }

    fn check_values(&self, call: &ToolCall, seen: &Observation) -> Result<(), String> {
        let limits = &self.limits;
        match *call {
            ToolCall::SetAdmission { schedule_id, rate_per_s, active_max, paused } => {
                within("rate_per_s", rate_per_s, &limits.admission_rate_per_s)?;
                within("active_max", active_max, &limits.active_max)?;
                if paused {
                    return Err("the agent does not pause a waiting line".into());
                }
                let queue = seen.queue(schedule_id).ok_or(format!("schedule {schedule_id} was not observed"))?;
                step("rate_per_s", queue.rate_per_s, rate_per_s, limits.admission_change_factor_max)?;
                step(
                    "active_max",
                    f64::from(queue.active_max),
                    f64::from(active_max),
                    limits.admission_change_factor_max,
                )
            }
            ToolCall::SetRateLimits { per_ip_per_s, per_token_per_s, burst } => {
                within("per_ip_per_s", per_ip_per_s, &limits.rate_limit_per_s)?;
                within("per_token_per_s", per_token_per_s, &limits.rate_limit_per_s)?;
                within("burst", burst, &limits.rate_limit_burst)?;
                let current = seen.rate_limits.ok_or("the rate limits were not observed")?;
                let factor = limits.rate_limit_change_factor_max;
                step("per_ip_per_s", f64::from(current.per_ip_per_s), f64::from(per_ip_per_s), factor)?;
                step("per_token_per_s", f64::from(current.per_token_per_s), f64::from(per_token_per_s), factor)?;
                step("burst", f64::from(current.burst), f64::from(burst), factor)
            }
            ToolCall::BlockIp { ip, ttl_s } => {
                within("ttl_s", ttl_s, &limits.block_ttl_s)?;
                let norm = seen.ip_median_requests_per_s.max(1.0);
                let threshold = norm * limits.block_evidence_factor;
                match seen.talker(ip).map(|talker| talker.requests_per_s) {
                    Some(rate) if rate >= threshold => Ok(()),
                    Some(rate) => Err(format!(
                        "{ip} was seen at {rate:.1} requests/s, below {threshold:.1} ({} x the median IP)",
                        limits.block_evidence_factor
                    )),
                    None => Err(format!("{ip} is not among the observed top talkers")),
                }
            }
            ToolCall::BlockUser { user_id, ttl_s } => {
                within("ttl_s", ttl_s, &limits.block_ttl_s)?;
                let threshold = seen.user_median_requests_per_s.max(1.0) * limits.block_evidence_factor;
                match seen.user_rate(user_id) {
                    Some(rate) if rate >= threshold => Ok(()),
                    Some(rate) => Err(format!(
                        "user {user_id} was seen at {rate:.1} requests/s, below {threshold:.1} ({} x the median user)",
                        limits.block_evidence_factor
                    )),
                    None => Err(format!("user {user_id} is not among the observed busiest users")),
                }
            }
            ToolCall::UnblockUser { user_id } => {
                if seen.blocked_users.contains(&user_id) {
                    Ok(())
                } else {
                    Err(format!("user {user_id} is not blocked"))
                }
            }
            ToolCall::UnblockIp { ip } => {
                if seen.blocked.contains(&ip) {
                    Ok(())
                } else {
                    Err(format!("{ip} is not blocked"))
                }
            }
            ToolCall::SetHoldTtl { ttl_s } => {
                within("ttl_s", ttl_s, &limits.hold_ttl_s)?;
                let current = seen.hold_ttl_s.ok_or("the hold TTL was not observed")?;
                if current.abs_diff(ttl_s) > limits.hold_ttl_change_s_max {
                    return Err(format!(
                        "hold TTL {current} s -> {ttl_s} s moves more than {} s at once",
                        limits.hold_ttl_change_s_max
                    ));
                }
                Ok(())
            }
        }
    }
}

/// What a call changes, so one decision changes each thing once.
fn target(call: &ToolCall) -> String {
    match call {
        ToolCall::SetAdmission { schedule_id, .. } => format!("schedule/{schedule_id}"),
        ToolCall::SetRateLimits { .. } => "rate-limits".into(),
        ToolCall::BlockIp { ip, .. } | ToolCall::UnblockIp { ip } => format!("ip/{ip}"),
        ToolCall::BlockUser { user_id, .. } | ToolCall::UnblockUser { user_id } => format!("user/{user_id}"),
        ToolCall::SetHoldTtl { .. } => "hold-ttl".into(),
    }
}

fn within<T: PartialOrd + std::fmt::Display>(name: &str, value: T, range: &RangeInclusive<T>) -> Result<(), String> {
    if range.contains(&value) {
        Ok(())
    } else {
        Err(format!("{name} {value} is outside the agent's bounds {}..={}", range.start(), range.end()))
    }
}

fn step(name: &str, from: f64, to: f64, factor_max: f64) -> Result<(), String> {
    let (low, high) = (from / factor_max, from * factor_max);
    if to + 1e-9 < low || to > high + 1e-9 {
        Err(format!("{name} {from} -> {to} changes by more than a factor {factor_max} at once"))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::observation::{TalkerView, UserView, calm};

    fn check(call: ToolCall, seen: &Observation) -> Result<(), String> {
        Guardrails::allowing(&ToolName::ALL).check(&call, seen, &mut DecisionBudget::default())
    }

    fn bot_seen() -> Observation {
        let mut seen = calm();
        seen.talkers.push(TalkerView::sessionless("100.64.0.1".parse().expect("ip"), 400.0));
        seen
    }

    /// A carrier address shared by 40 fans, one of whom (user 7) floods at 300 requests/s.
    fn shared_seen() -> Observation {
        let mut seen = calm();
        let ip = "100.64.0.2".parse().expect("ip");
        seen.talkers.push(TalkerView { ip, requests_per_s: 340.0, sessionless_requests_per_s: 0.0, users: 41 });
        seen.users.insert(0, UserView { user_id: 7, requests_per_s: 300.0, ips: 1, only_ip: Some(ip) });
        seen
    }

    #[test]
    fn a_tool_outside_the_allowlist_is_rejected() {
        let guardrails = Guardrails::allowing(&[ToolName::BlockIp]);
        let call = ToolCall::SetHoldTtl { ttl_s: 300 };
        let error = guardrails.check(&call, &calm(), &mut DecisionBudget::default()).expect_err("not allowed");
        assert_eq!(error, "`set_hold_ttl` is not allowed for this policy");
    }

    #[test]
    fn values_out_of_the_agents_bounds_are_rejected() {
        let seen = calm();
        let admission =
            |rate_per_s, active_max, paused| ToolCall::SetAdmission { schedule_id: 1, rate_per_s, active_max, paused };
        assert!(check(admission(0.5, 500, false), &seen).is_err(), "rate below the bound");
        assert!(check(admission(100.0, 5, false), &seen).is_err(), "active max below the bound");
        assert!(check(admission(100.0, 500, true), &seen).is_err(), "pausing a line");
        assert!(check(ToolCall::SetHoldTtl { ttl_s: 30 }, &seen).is_err(), "a hold TTL that can expire mid-payment");
        assert!(
            check(ToolCall::BlockIp { ip: "100.64.0.1".parse().expect("ip"), ttl_s: 86_400 }, &bot_seen()).is_err()
        );
        assert_eq!(check(admission(60.0, 500, false), &seen), Ok(()));
        assert_eq!(check(ToolCall::SetHoldTtl { ttl_s: 360 }, &seen), Ok(()));
    }

    #[test]
    fn changes_larger_than_a_step_are_rejected() {
        let seen = calm();
        let admission =
            |rate_per_s| ToolCall::SetAdmission { schedule_id: 1, rate_per_s, active_max: 500, paused: false };
        assert!(check(admission(49.0), &seen).is_err(), "more than halved");
        assert!(check(admission(201.0), &seen).is_err(), "more than doubled");
        assert_eq!(check(admission(50.0), &seen), Ok(()));
        assert!(check(ToolCall::SetHoldTtl { ttl_s: 60 }, &seen).is_err(), "300 s to 60 s at once");
        let limits = ToolCall::SetRateLimits { per_ip_per_s: 5, per_token_per_s: 10, burst: 40 };
        assert!(check(limits, &seen).is_err(), "per-IP limit cut to a quarter");
        assert!(check(admission(60.0).clone(), &Observation { queues: Vec::new(), ..calm() }).is_err(), "unseen line");
    }

    #[test]
    fn a_block_needs_evidence_in_the_observation() {
        let seen = bot_seen();
        let block = |ip: &str| ToolCall::BlockIp { ip: ip.parse().expect("ip"), ttl_s: 60 };
        assert_eq!(check(block("100.64.0.1"), &seen), Ok(()));
        assert!(check(block("10.0.0.1"), &seen).is_err(), "a user at 3 requests/s");
        assert!(check(block("10.9.9.9"), &seen).is_err(), "an IP never seen");
        assert!(check(ToolCall::UnblockIp { ip: "10.0.0.1".parse().expect("ip") }, &seen).is_err(), "not blocked");
    }

    #[test]
    fn a_user_block_needs_evidence_in_the_observation() {
        let seen = shared_seen();
        assert_eq!(check(ToolCall::BlockUser { user_id: 7, ttl_s: 60 }, &seen), Ok(()));
        assert!(check(ToolCall::BlockUser { user_id: 1, ttl_s: 60 }, &seen).is_err(), "a fan at 3 requests/s");
        assert!(check(ToolCall::BlockUser { user_id: 99, ttl_s: 60 }, &seen).is_err(), "a user never seen");
        assert!(check(ToolCall::BlockUser { user_id: 7, ttl_s: 86_400 }, &seen).is_err(), "beyond the TTL bound");
        assert!(check(ToolCall::UnblockUser { user_id: 7 }, &seen).is_err(), "not blocked");
        let mut blocked = shared_seen();
        blocked.blocked_users.push(7);
        assert_eq!(check(ToolCall::UnblockUser { user_id: 7 }, &blocked), Ok(()));
    }

    #[test]
    fn one_decision_blocks_a_bounded_number_of_ips_and_changes_each_thing_once() {
        let mut seen = calm();
        seen.talkers = (1..=40)
            .map(|host| TalkerView::sessionless(format!("100.64.0.{host}").parse().expect("ip"), 400.0))
            .collect();
        let guardrails = Guardrails::allowing(&ToolName::ALL);
        let mut budget = DecisionBudget::default();
        let accepted = seen
            .talkers
            .iter()
            .filter(|talker| {
                guardrails.check(&ToolCall::BlockIp { ip: talker.ip, ttl_s: 60 }, &seen, &mut budget).is_ok()
            })
            .count();
        assert_eq!(accepted, guardrails.limits.blocks_per_decision_max);
        let mut budget = DecisionBudget::default();
        let admission = ToolCall::SetAdmission { schedule_id: 1, rate_per_s: 50.0, active_max: 500, paused: false };
        assert_eq!(guardrails.check(&admission, &calm(), &mut budget), Ok(()));
        assert!(guardrails.check(&admission, &calm(), &mut budget).is_err(), "the same line twice");
    }
}
