//! The ops agent's part of the run result: every action it proposed (`agent_actions`), and
//! its score (`score.agent`).
//!
//! - The *disturbance* starts at the first fault or bot of the scenario.
//! - Time to detect: from the disturbance to the agent's first applied action.
//! - Time to mitigate: from the disturbance to the first second, at or after that action,
//!   that begins [`MITIGATED_SECONDS`] seconds in a row within the agent's bounds, as the users
//!   saw them (see [`seconds_within_bounds`]).
//! - A false alarm is an action applied before any disturbance (or in a run without one).
//! - Harm: legitimate (non-bot) IPs and users (the fans' accounts, not the bots') the agent
//!   blocked, and users refused because of an action (`ip_blocked`, `user_blocked`, or
//!   `rate_limited` once the agent has changed the rate limits).
//! - The agent caused a safety violation when it applied an action in a run that failed a
//!   safety invariant: a conservative verdict; the same seed without an agent tells whether
//!   the violation is the agent's.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde_json::{Value, json};
use tcore_engine::agent::ActionOutcome;
use tcore_engine::agent::tools::ToolName;

use crate::history::{History, OpKind, Outcome};
use crate::scenario::Scenario;
use crate::world::agent::AgentRun;
use crate::world::to_us;

/// How many seconds in a row within bounds count as mitigated.
pub const MITIGATED_SECONDS: u64 = 5;

/// `agent_actions` and `score.agent`.
pub(super) fn agent_result(
    scenario: &Scenario,
    agent: Option<&AgentRun>,
    history: &History,
    safety_passed: bool,
) -> (Value, Value) {
    let policy = scenario.agent.policy.name();
    let decisions = agent.map_or(&[][..], |run| run.decisions.as_slice());
    let mut actions = Vec::new();
    for decision in decisions {
        for action in &decision.actions {
            actions.push((to_us(decision.at_ms), decision, action));
        }
    }
    let agent_actions: Vec<Value> = actions
        .iter()
        .map(|(at_us, decision, action)| {
            json!({
                "at_us": at_us,
                "tool": action.tool.as_str(),
                "args": action.args,
                "outcome": outcome_name(action.outcome),
                "reason": decision.reason,
                "detail": action.detail,
            })
        })
        .collect();
    let count = |outcome| actions.iter().filter(|(_, _, action)| action.outcome == outcome).count();
    let applied: Vec<(u64, &tcore_engine::agent::ActionRecord)> = actions
        .iter()
        .filter(|(_, _, action)| action.outcome == ActionOutcome::Applied)
        .map(|(at_us, _, action)| (*at_us, *action))
        .collect();
    let disturbance_us = disturbance_start_us(scenario);
    let first_relevant_us = disturbance_us.and_then(|start| applied.iter().map(|(at, _)| *at).find(|at| *at >= start));
    let time_to_detect_s = disturbance_us.zip(first_relevant_us).map(|(start, at)| (at - start) as f64 / 1e6);
    let time_to_mitigate_s = disturbance_us.zip(first_relevant_us).and_then(|(start, at)| {
        mitigated_at_us(&seconds_within_bounds(scenario, history), at)
            .map(|mitigated| mitigated.max(at).saturating_sub(start) as f64 / 1e6)
    });
    let false_alarms = applied.iter().filter(|(at, _)| disturbance_us.is_none_or(|start| *at < start)).count();
    let (blocked, turned_away) = harm(scenario, history, &applied);
    let score = json!({
        "policy": policy,
        "decisions": decisions.len(),
        "actions_applied": applied.len(),
        "actions_rejected": count(ActionOutcome::Rejected),
        "actions_failed": count(ActionOutcome::Failed),
        "time_to_detect_s": time_to_detect_s,
        "time_to_mitigate_s": time_to_mitigate_s,
        "false_alarms": false_alarms,
        "harm": { "legitimate_users_blocked": blocked, "legitimate_users_turned_away": turned_away },
        "caused_safety_violation": !applied.is_empty() && !safety_passed,
    });
    (Value::Array(agent_actions), score)
}

fn outcome_name(outcome: ActionOutcome) -> &'static str {
    match outcome {
        ActionOutcome::Applied => "applied",
        ActionOutcome::Rejected => "rejected",
        ActionOutcome::Failed => "failed",
        ActionOutcome::DryRun => "dry-run",
    }
}

/// When the first fault or bot starts, in simulated microseconds.
fn disturbance_start_us(scenario: &Scenario) -> Option<u64> {
    let faults = scenario.faults.iter().map(|fault| fault.starts_at_s());
    let bots = scenario.bots.iter().map(|bot| bot.start_s);
    faults.chain(bots).map(|at_s| (at_s.max(0.0) * 1e6) as u64).min()
}

/// Whether each second (by when calls were made) stayed within the agent's bounds: the p99
/// latency of the users' calls (queue polls aside) at most `[agent] latency_p99_ms_max`, and
/// server errors plus calls without an answer at most `error_rate_max` of them.
fn seconds_within_bounds(scenario: &Scenario, history: &History) -> BTreeMap<u64, bool> {
    let mut seconds: BTreeMap<u64, (Vec<u64>, u64, u64)> = BTreeMap::new();
    for operation in history.operations.iter().filter(|operation| !matches!(operation.kind, OpKind::QueueStatus { .. }))
    {
        let (latencies, calls, failed) = seconds.entry(operation.invoke_us / 1_000_000).or_default();
        *calls += 1;
        match (&operation.outcome, operation.complete_us) {
            (Outcome::Unknown { .. }, _) | (_, None) => *failed += 1,
            (Outcome::Fail { http_status, .. }, Some(complete_us)) if *http_status >= 500 => {
                *failed += 1;
                latencies.push(complete_us.saturating_sub(operation.invoke_us));
            }
            (_, Some(complete_us)) => latencies.push(complete_us.saturating_sub(operation.invoke_us)),
        }
    }
    let latency_max_us = (scenario.agent.latency_p99_ms_max * 1000.0) as u64;
    seconds
        .into_iter()
        .map(|(second, (mut latencies, calls, failed))| {
            latencies.sort_unstable();
            let p99 = latencies.get((latencies.len() * 99).div_ceil(100).saturating_sub(1)).copied().unwrap_or(0);
            (second, p99 <= latency_max_us && failed as f64 <= scenario.agent.error_rate_max * calls as f64)
        })
        .collect()
}

/// The start of the first second at or after `from_us` that begins a run of
/// [`MITIGATED_SECONDS`] seconds within bounds; seconds without calls count as within.
/// `None` if the run ends first.
fn mitigated_at_us(within: &BTreeMap<u64, bool>, from_us: u64) -> Option<u64> {
    let last_s = within.keys().next_back().copied()?;
    let mut run_start = None;
    for second in from_us / 1_000_000..=last_s + MITIGATED_SECONDS {
        if within.get(&second).copied().unwrap_or(true) {
            let start = *run_start.get_or_insert(second);
            if second + 1 - start >= MITIGATED_SECONDS {
                return Some(start * 1_000_000);
            }
        } else {
            run_start = None;
        }
    }
    None
}

/// Legitimate IPs and users blocked, and users refused because of an applied action.
fn harm(scenario: &Scenario, history: &History, applied: &[(u64, &tcore_engine::agent::ActionRecord)]) -> (u64, u64) {
    let bots: BTreeSet<IpAddr> =
        scenario.bots.iter().enumerate().flat_map(|(index, bot)| bot.addresses(index)).collect();
    let blocked: BTreeSet<IpAddr> = applied
        .iter()
        .filter(|(_, action)| action.tool == ToolName::BlockIp)
        .filter_map(|(_, action)| action.args["ip"].as_str().and_then(|ip| ip.parse().ok()))
        .filter(|ip| !bots.contains(ip))
        .collect();
    // The fans' accounts come first (1..=users), the bots' after them.
    let fans_blocked: BTreeSet<u64> = applied
        .iter()
        .filter(|(_, action)| action.tool == ToolName::BlockUser)
        .filter_map(|(_, action)| action.args["user_id"].as_u64())
        .filter(|user_id| *user_id <= scenario.users_total())
        .collect();
    let limits_changed_us =
        applied.iter().filter(|(_, action)| action.tool == ToolName::SetRateLimits).map(|(at, _)| *at).min();
    let turned_away: BTreeSet<u64> = history
        .operations
        .iter()
        .filter(|operation| !bots.contains(&operation.ip))
        .filter(|operation| match &operation.outcome {
            Outcome::Fail { code, .. } if code == "ip_blocked" || code == "user_blocked" => true,
            Outcome::Fail { code, .. } if code == "rate_limited" => {
                limits_changed_us.is_some_and(|at| operation.invoke_us >= at)
            }
            _ => false,
        })
        .map(|operation| operation.client)
        .collect();
    ((blocked.len() + fans_blocked.len()) as u64, turned_away.len() as u64)
}
