//! The admin tools the ops agent may call, as data: what a policy proposes, what the
//! guardrails judge and what the admin client sends.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::domain::UserId;

/// The name of one admin tool. There is no tool for the hold mode: it is a correctness
/// setting, fixed at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ToolName {
    SetAdmission,
    SetRateLimits,
    BlockIp,
    UnblockIp,
    BlockUser,
    UnblockUser,
    SetHoldTtl,
}

impl ToolName {
    /// Every tool, in a fixed order.
    pub const ALL: [ToolName; 7] = [
        ToolName::SetAdmission,
        ToolName::SetRateLimits,
        ToolName::BlockIp,
        ToolName::UnblockIp,
        ToolName::BlockUser,
        ToolName::UnblockUser,
        ToolName::SetHoldTtl,
    ];

    /// The tool's name as the admin API, the audit log and the language model see it.
    pub fn as_str(self) -> &'static str {
        match self {
            ToolName::SetAdmission => "set_admission",
            ToolName::SetRateLimits => "set_rate_limits",
            ToolName::BlockIp => "block_ip",
            ToolName::UnblockIp => "unblock_ip",
            ToolName::BlockUser => "block_user",
            ToolName::UnblockUser => "unblock_user",
            ToolName::SetHoldTtl => "set_hold_ttl",
        }
    }

    /// The tool called `name`, if there is one.
    pub fn from_name(name: &str) -> Option<ToolName> {
        ToolName::ALL.into_iter().find(|tool| tool.as_str() == name)
    }

    /// What the tool does, for the language model.
    pub fn description(self) -> &'static str {
        match self {
            ToolName::SetAdmission => {
                "Set a waiting line's admission: users admitted per second, admitted users active at once, and pause."
            }
            ToolName::SetRateLimits => "Set the per-IP and per-token request rate limits (requests per second, burst).",
            ToolName::BlockIp => "Block one client IP for ttl_s seconds.",
            ToolName::UnblockIp => "Lift the block on one client IP.",
            ToolName::BlockUser => {
                "Block one signed-in user for ttl_s seconds, from every IP; the other users of their IP are still served."
            }
            ToolName::UnblockUser => "Lift the block on one user.",
            ToolName::SetHoldTtl => "Set how long new seat holds last before they expire, in seconds.",
        }
    }

    /// The JSON Schema of the tool's arguments.
    pub fn parameters(self) -> Value {
        let object = |properties: Value, required: &[&str]| json!({ "type": "object", "properties": properties, "required": required, "additionalProperties": false });
        match self {
            ToolName::SetAdmission => object(
                json!({
                    "schedule_id": { "type": "integer" },
                    "rate_per_s": { "type": "number" },
                    "active_max": { "type": "integer" },
                    "paused": { "type": "boolean" },
                }),
                &["schedule_id", "rate_per_s", "active_max", "paused"],
            ),
            ToolName::SetRateLimits => object(
                json!({
                    "per_ip_per_s": { "type": "integer" },
                    "per_token_per_s": { "type": "integer" },
                    "burst": { "type": "integer" },
                }),
                &["per_ip_per_s", "per_token_per_s", "burst"],
            ),
            ToolName::BlockIp => {
                object(json!({ "ip": { "type": "string" }, "ttl_s": { "type": "integer" } }), &["ip", "ttl_s"])
            }
            ToolName::UnblockIp => object(json!({ "ip": { "type": "string" } }), &["ip"]),
            ToolName::BlockUser => object(
                json!({ "user_id": { "type": "integer" }, "ttl_s": { "type": "integer" } }),
                &["user_id", "ttl_s"],
            ),
            ToolName::UnblockUser => object(json!({ "user_id": { "type": "integer" } }), &["user_id"]),
            ToolName::SetHoldTtl => object(json!({ "ttl_s": { "type": "integer" } }), &["ttl_s"]),
        }
    }
}

/// One call of an admin tool with its arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "tool", content = "args", rename_all = "snake_case", deny_unknown_fields)]
pub enum ToolCall {
    SetAdmission { schedule_id: u64, rate_per_s: f64, active_max: u32, paused: bool },
    SetRateLimits { per_ip_per_s: u32, per_token_per_s: u32, burst: u32 },
    BlockIp { ip: IpAddr, ttl_s: u64 },
    UnblockIp { ip: IpAddr },
    BlockUser { user_id: UserId, ttl_s: u64 },
    UnblockUser { user_id: UserId },
    SetHoldTtl { ttl_s: u64 },
}

/// A tool call that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ToolCallError {
    #[error("there is no tool `{0}`")]
    UnknownTool(String),
    #[error("the arguments of `{tool}` are malformed: {reason}")]
    MalformedArguments { tool: &'static str, reason: String },
}

impl ToolCall {
    /// The tool this call uses.
    pub fn tool(&self) -> ToolName {
        match self {
            ToolCall::SetAdmission { .. } => ToolName::SetAdmission,
            ToolCall::SetRateLimits { .. } => ToolName::SetRateLimits,
            ToolCall::BlockIp { .. } => ToolName::BlockIp,
            ToolCall::UnblockIp { .. } => ToolName::UnblockIp,
            ToolCall::BlockUser { .. } => ToolName::BlockUser,
            ToolCall::UnblockUser { .. } => ToolName::UnblockUser,
            ToolCall::SetHoldTtl { .. } => ToolName::SetHoldTtl,
        }
    }

    /// The call's arguments as a JSON object.
    pub fn args(&self) -> Value {
        serde_json::to_value(self).map_or(Value::Null, |mut value| value["args"].take())
    }

    /// Reads a call from a tool name and its arguments as JSON text (what a language model
    /// answers). Unknown tools, unknown argument keys and wrong types are refused.
    pub fn parse(name: &str, arguments: &str) -> Result<ToolCall, ToolCallError> {
        let tool =
            ToolName::from_name(name).ok_or_else(|| ToolCallError::UnknownTool(name.chars().take(64).collect()))?;
        let malformed = |reason: String| ToolCallError::MalformedArguments { tool: tool.as_str(), reason };
        let args: Value = serde_json::from_str(arguments).map_err(|error| malformed(error.to_string()))?;
        serde_json::from_value(json!({ "tool": tool.as_str(), "args": args }))
            .map_err(|error| malformed(error.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_round_trips_through_name_and_arguments() {
        let calls = [
            ToolCall::BlockIp { ip: "100.64.0.1".parse().expect("ip"), ttl_s: 60 },
            ToolCall::BlockUser { user_id: 42, ttl_s: 60 },
        ];
        for call in calls {
            let parsed = ToolCall::parse(call.tool().as_str(), &call.args().to_string());
            assert_eq!(parsed, Ok(call));
        }
    }

    #[test]
    fn unknown_tools_unknown_keys_and_wrong_types_are_refused() {
        assert_eq!(ToolCall::parse("set_hold_mode", "{}"), Err(ToolCallError::UnknownTool("set_hold_mode".into())));
        for arguments in [r#"{"ttl_s": 60, "hold_mode": "unfenced-lock"}"#, r#"{"ttl_s": "sixty"}"#, "{ttl_s: 60", "[]"]
        {
            assert!(
                matches!(ToolCall::parse("set_hold_ttl", arguments), Err(ToolCallError::MalformedArguments { .. })),
                "{arguments} was accepted"
            );
        }
    }
}
