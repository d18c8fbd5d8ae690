//! How a policy plugs into the loop.

use super::observation::Observation;
use super::tools::{ToolCall, ToolName};

/// What a policy proposes at one decision. The guardrails judge each call.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Proposal {
    /// Why, in a sentence.
    pub reason: String,
    pub calls: Vec<ToolCall>,
    /// What went wrong in deciding, if anything (a timeout, a refusal, a malformed answer).
    pub note: Option<String>,
}

/// A way of deciding. Not `Send`: the simulator runs it on a single-threaded host.
#[async_trait::async_trait(?Send)]
pub trait Policy {
    /// The policy's name, as on the command line and in run results.
    fn name(&self) -> &'static str;
    /// The tools this policy may use: its allowlist.
    fn tools(&self) -> &[ToolName];
    /// Decides on what was seen.
    async fn decide(&mut self, seen: &Observation) -> Proposal;
}

/// The `none` policy: reads and records, never acts.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoPolicy;

#[async_trait::async_trait(?Send)]
impl Policy for NoPolicy {
    fn name(&self) -> &'static str {
        "none"
    }

    fn tools(&self) -> &[ToolName] {
        &[]
    }

    async fn decide(&mut self, _seen: &Observation) -> Proposal {
        Proposal { reason: "policy none: no action".into(), calls: Vec::new(), note: None }
    }
}

#[async_trait::async_trait(?Send)]
impl<P: Policy + ?Sized> Policy for Box<P> {
    fn name(&self) -> &'static str {
        (**self).name()
    }

    fn tools(&self) -> &[ToolName] {
        (**self).tools()
    }

    async fn decide(&mut self, seen: &Observation) -> Proposal {
        (**self).decide(seen).await
    }
}
