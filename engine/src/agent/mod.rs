//! The ops agent: every interval it reads the admin snapshot of each node, decides with its
//! policy, passes every proposed action through the guardrails, calls the admin tools, and
//! records the decision (a digest of what it saw, its reason, the actions and their results)
//! in the audit log.
//!
//! **API boundary:** the agent reaches the engine only through the admin API, over an
//! [`AdminTransport`]: real HTTP live ([`http::HttpTransport`]), simulated sockets in the
//! simulator. **Invariant:** the agent reads time only from the [`Clock`] it is given and
//! draws no randomness; no tool touches the hold mode.

pub mod guardrails;
pub mod http;
pub mod llm;
pub mod observation;
pub mod policy;
pub mod rules;
pub mod tools;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use self::guardrails::{DecisionBudget, Guardrails};
use self::observation::Observation;
use self::policy::Policy;
use self::tools::{ToolCall, ToolName};
use crate::clock::Clock;
use crate::engine::Snapshot;

/// The name the agent's own admin token goes by (`--admin-token agent=SECRET` on the nodes):
/// the audit log names every call by the token that made it, so this is the agent's name
/// there.
pub const ACTOR: &str = "agent";
/// The most decisions an agent keeps in memory.
pub const DECISIONS_KEPT_MAX: usize = 100_000;

/// One request to the admin API of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminRequest {
    pub method: &'static str,
    /// The path under the node's address, e.g. `/admin/v1/snapshot`.
    pub path: String,
    pub body: Option<String>,
}

/// A node's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminReply {
    pub status: u16,
    pub body: Vec<u8>,
}

/// How the agent reaches the admin API: sends a request to a node, with the agent's admin
/// token. An `Err` means no answer (the node is unreachable or timed out).
#[async_trait::async_trait(?Send)]
pub trait AdminTransport {
    /// The nodes, as this transport addresses them.
    fn nodes(&self) -> Vec<String>;
    async fn send(&self, node: &str, request: AdminRequest) -> Result<AdminReply, String>;
}

/// What became of one proposed action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ActionOutcome {
    /// Every node it was sent to applied it.
    Applied,
    /// The guardrails refused it: never sent.
    Rejected,
    /// Sent, but a node refused it or did not answer.
    Failed,
    /// Passed the guardrails; not sent, because the agent runs dry.
    DryRun,
}

/// One proposed action and its result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ActionRecord {
    pub tool: ToolName,
    /// The tool's arguments: any JSON value.
    #[schema(value_type = Value)]
    pub args: Value,
    pub outcome: ActionOutcome,
    /// The rejection or the error, if any.
    pub detail: Option<String>,
    /// The call itself, for whoever replays the record; not sent to the audit log.
    #[serde(skip)]
    pub call: Option<ToolCall>,
}

/// One decision: what the agent saw, why it acted, and what came of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DecisionRecord {
    /// When the decision was made, on the agent's clock.
    pub at_ms: u64,
    pub policy: String,
    pub observation_digest: String,
    pub reason: String,
    /// What went wrong in deciding, if anything.
    pub note: Option<String>,
    pub nodes_unreachable: Vec<String>,
    pub actions: Vec<ActionRecord>,
}

/// How the agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AgentOptions {
    /// Judge actions but send none.
    pub dry_run: bool,
}

/// The loop around a policy.
#[derive(Debug)]
pub struct Agent<T, P> {
    transport: T,
    policy: P,
    guardrails: Guardrails,
    clock: Arc<dyn Clock>,
    options: AgentOptions,
}

impl<T: AdminTransport, P: Policy> Agent<T, P> {
    /// An agent with the default guardrails and its policy's allowlist.
    pub fn new(transport: T, policy: P, clock: Arc<dyn Clock>, options: AgentOptions) -> Self {
        let guardrails = Guardrails::allowing(policy.tools());
        Self { transport, policy, guardrails, clock, options }
    }

    /// Replaces the guardrails.
    pub fn with_guardrails(mut self, guardrails: Guardrails) -> Self {
        self.guardrails = guardrails;
        self
    }

    /// Decides every `interval`, handing each decision to `on_decision`, until it says stop.
    pub async fn run(&mut self, interval: Duration, mut on_decision: impl FnMut(&DecisionRecord) -> bool) {
        loop {
            tokio::time::sleep(interval).await;
            let decision = self.decide_once().await;
            if !on_decision(&decision) {
                return;
            }
        }
    }

    /// Reads, decides, acts and records once.
    pub async fn decide_once(&mut self) -> DecisionRecord {
        let (seen, reached) = self.observe().await;
        let proposal = self.policy.decide(&seen).await;
        let mut budget = DecisionBudget::default();
        let mut actions = Vec::with_capacity(proposal.calls.len());
        for call in proposal.calls {
            let (outcome, detail) = match self.guardrails.check(&call, &seen, &mut budget) {
                Err(why) => (ActionOutcome::Rejected, Some(why)),
                Ok(()) if self.options.dry_run => (ActionOutcome::DryRun, None),
                Ok(()) => self.apply(&call, &reached).await,
            };
            actions.push(ActionRecord { tool: call.tool(), args: call.args(), outcome, detail, call: Some(call) });
        }
        let decision = DecisionRecord {
            at_ms: seen.at_ms,
            policy: self.policy.name().to_owned(),
            observation_digest: seen.digest(),
            reason: proposal.reason,
            note: proposal.note,
            nodes_unreachable: seen.nodes_unreachable.clone(),
            actions,
        };
        self.record(&decision, &reached).await;
        decision
    }

    /// Reads every node's snapshot; returns the merged view and the nodes that answered.
    async fn observe(&self) -> (Observation, Vec<String>) {
        let (mut snapshots, mut reached, mut unreachable) = (Vec::new(), Vec::new(), Vec::new());
        for node in self.transport.nodes() {
            let request = AdminRequest { method: "GET", path: "/admin/v1/snapshot".into(), body: None };
            let snapshot = match self.transport.send(&node, request).await {
                Ok(reply) if reply.status == 200 => serde_json::from_slice::<Snapshot>(&reply.body).ok(),
                _ => None,
            };
            match snapshot {
                Some(snapshot) => {
                    snapshots.push(snapshot);
                    reached.push(node);
                }
                None => unreachable.push(node),
            }
        }
        (Observation::merge(self.clock.now_ms(), &snapshots, unreachable), reached)
    }

    /// Sends an accepted call: an admission change (kept by the shared store) to the first
    /// node that answers, anything else (kept per node) to every node reached.
    async fn apply(&self, call: &ToolCall, reached: &[String]) -> (ActionOutcome, Option<String>) {
        if reached.is_empty() {
            return (ActionOutcome::Failed, Some("no node answered".into()));
        }
        let request = admin_request(call);
        let mut errors = Vec::new();
        for node in reached {
            match self.transport.send(node, request.clone()).await {
                Ok(reply) if reply.status == 200 => {
                    if matches!(call, ToolCall::SetAdmission { .. }) {
                        return (ActionOutcome::Applied, None);
                    }
                }
                Ok(reply) => errors.push(format!("{node}: {} {}", reply.status, problem_detail(&reply.body))),
                Err(error) => errors.push(format!("{node}: {error}")),
            }
        }
        if errors.is_empty() {
            (ActionOutcome::Applied, None)
        } else {
            (ActionOutcome::Failed, Some(errors.join("; ")))
        }
    }

    /// Writes the decision to the audit log through the first node that takes it.
    async fn record(&self, decision: &DecisionRecord, reached: &[String]) {
        let Ok(body) = serde_json::to_string(decision) else { return };
        for node in reached {
            let request = AdminRequest { method: "POST", path: "/admin/v1/decisions".into(), body: Some(body.clone()) };
            if matches!(self.transport.send(node, request).await, Ok(reply) if reply.status == 200) {
                return;
            }
        }
        tracing::warn!(reason = %decision.reason, "the decision could not be written to the audit log");
    }
}

/// The admin API request of one tool call.
pub fn admin_request(call: &ToolCall) -> AdminRequest {
    let args = call.args();
    let (method, path, body) = match call {
        ToolCall::SetAdmission { schedule_id, rate_per_s, active_max, paused } => (
            "PUT",
            format!("/admin/v1/schedules/{schedule_id}/admission"),
            Some(serde_json::json!({ "rate_per_s": rate_per_s, "active_max": active_max, "paused": paused })),
        ),
        ToolCall::SetRateLimits { .. } => ("PUT", "/admin/v1/rate-limits".into(), Some(args)),
        ToolCall::BlockIp { .. } => ("POST", "/admin/v1/blocks".into(), Some(args)),
        ToolCall::UnblockIp { ip } => ("DELETE", format!("/admin/v1/blocks/{ip}"), None),
        ToolCall::BlockUser { .. } => ("POST", "/admin/v1/user-blocks".into(), Some(args)),
        ToolCall::UnblockUser { user_id } => ("DELETE", format!("/admin/v1/user-blocks/{user_id}"), None),
        ToolCall::SetHoldTtl { .. } => ("PUT", "/admin/v1/hold-ttl".into(), Some(args)),
    };
    AdminRequest { method, path, body: body.map(|body| body.to_string()) }
}

/// The `detail` of a problem response, or the start of whatever came back.
fn problem_detail(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|value| value["detail"].as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned())
}
