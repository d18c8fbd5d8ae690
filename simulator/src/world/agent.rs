//! The ops agent's host in the simulated world: the engine's own agent loop, reaching every
//! node's admin API over simulated sockets (so a partition can cut it off), on simulated time.
//!
//! The `llm` policy asks its model on a thread of its own and waits for the answer, so the
//! simulation stands still meanwhile: the answer takes no simulated time, and a replay from
//! the recorded cassette gives the same run.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use async_openai::types::chat::{CreateChatCompletionRequest, CreateChatCompletionResponse};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tcore_engine::agent::llm::{Cassette, ChatModel, LlmPolicy, OpenAiModel, Recording, Replaying};
use tcore_engine::agent::policy::{NoPolicy, Policy};
use tcore_engine::agent::rules::{RulesConfig, RulesPolicy};
use tcore_engine::agent::tools::ToolCall;
use tcore_engine::agent::{
    ActionOutcome, AdminReply, AdminRequest, AdminTransport, Agent, AgentOptions, DecisionRecord,
};

use super::net::ENGINE_PORT;
use super::node::{SimClock, sim_now_us};
use super::{EPOCH_MS, to_us};
use crate::history::{AdmissionChange, HistoryRecorder, HoldTtlChange};
use crate::scenario::{AgentPolicy, Scenario};

/// The agent's admin token on every simulated engine node, named [`tcore_engine::agent::ACTOR`] there, so that the
/// audit log names the agent's calls `agent`.
pub const ADMIN_TOKEN: &str = "tcore-simulation-admin";
/// The other admin token of every simulated engine node: an operator's, which the agent does
/// not hold.
pub const OPERATOR_TOKEN: &str = "tcore-simulation-operator";
/// How long the agent waits for one admin call.
const ADMIN_CALL_TIMEOUT: Duration = Duration::from_secs(1);

/// What the agent did during a run.
#[derive(Debug, Clone, Default)]
pub struct AgentRun {
    pub policy: String,
    pub decisions: Vec<DecisionRecord>,
    /// The answers the `llm` policy got, for its cassette.
    pub cassette: Option<Cassette>,
}

/// The agent's shared state on its host: the decisions so far, and the cassette being recorded.
#[derive(Debug, Clone)]
pub struct AgentLog {
    run: Rc<RefCell<AgentRun>>,
    recording: Rc<RefCell<Cassette>>,
}

impl AgentLog {
    /// What the agent did, once the simulation is over.
    pub fn finish(&self, policy: AgentPolicy) -> AgentRun {
        let mut run = self.run.borrow().clone();
        if policy == AgentPolicy::Llm {
            run.cassette = Some(self.recording.borrow().clone());
        }
        run
    }
}

/// The admin API of the engine nodes over simulated sockets, one connection per call.
#[derive(Debug, Clone)]
struct SimTransport {
    nodes: Vec<String>,
}

impl SimTransport {
    async fn send_unbounded(node: &str, request: AdminRequest) -> Result<AdminReply, String> {
        let stream = turmoil::net::TcpStream::connect((node, ENGINE_PORT)).await.map_err(|error| error.to_string())?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|error| error.to_string())?;
        tokio::task::spawn_local(async move {
            let _ = connection.await;
        });
        let mut builder = hyper::Request::builder()
            .method(request.method)
            .uri(request.path)
            .header("host", node)
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"));
        if request.body.is_some() {
            builder = builder.header("content-type", "application/json");
        }
        let request = builder
            .body(Full::new(Bytes::from(request.body.unwrap_or_default())))
            .map_err(|error| error.to_string())?;
        let response = sender.send_request(request).await.map_err(|error| error.to_string())?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.map_err(|error| error.to_string())?.to_bytes();
        Ok(AdminReply { status, body: body.to_vec() })
    }
}

#[async_trait::async_trait(?Send)]
impl AdminTransport for SimTransport {
    fn nodes(&self) -> Vec<String> {
        self.nodes.clone()
    }

    async fn send(&self, node: &str, request: AdminRequest) -> Result<AdminReply, String> {
        match tokio::time::timeout(ADMIN_CALL_TIMEOUT, Self::send_unbounded(node, request)).await {
            Ok(result) => result,
            Err(_) => Err("no answer within 1 s".into()),
        }
    }
}

/// A model asked on a thread of its own, outside the simulation: the host waits for the
/// answer, so no simulated time passes.
#[derive(Debug)]
struct OutsideModel {
    model: OpenAiModel,
    runtime: Arc<tokio::runtime::Runtime>,
}

#[async_trait::async_trait(?Send)]
impl ChatModel for OutsideModel {
    async fn complete(&self, request: &CreateChatCompletionRequest) -> Result<CreateChatCompletionResponse, String> {
        let (model, request, runtime) = (self.model.clone(), request.clone(), Arc::clone(&self.runtime));
        std::thread::spawn(move || runtime.block_on(model.complete_send(request)))
            .join()
            .unwrap_or_else(|_| Err("the model thread failed".into()))
    }
}

/// The policy the scenario asks for.
fn policy(
    scenario: &Scenario,
    log: &AgentLog,
    runtime: Option<&Arc<tokio::runtime::Runtime>>,
    replay: Option<&Cassette>,
) -> Box<dyn Policy> {
    let agent = &scenario.agent;
    match (agent.policy, runtime, replay) {
        (AgentPolicy::Rules, _, _) => Box::new(RulesPolicy::new(RulesConfig {
            latency_us_p99_max: (agent.latency_p99_ms_max * 1000.0) as u64,
            error_rate_max: agent.error_rate_max,
            ..RulesConfig::default()
        })),
        (AgentPolicy::Llm, Some(runtime), _) => {
            let key = std::env::var(&agent.api_key_env).unwrap_or_default();
            let model = OpenAiModel::new(&agent.base_url, &key, Duration::from_secs_f64(agent.timeout_s));
            let outside = OutsideModel { model, runtime: Arc::clone(runtime) };
            let recording = Recording { model: outside, cassette: Rc::clone(&log.recording) };
            Box::new(LlmPolicy::new("llm", recording, &agent.model))
        }
        (AgentPolicy::Replay, _, Some(cassette)) => {
            Box::new(LlmPolicy::new("replay", Replaying { cassette: cassette.clone() }, &agent.model))
        }
        _ => Box::new(NoPolicy),
    }
}

/// What the world needs to run an agent host.
#[derive(Debug)]
pub struct AgentHost {
    pub log: AgentLog,
    runtime: Option<Arc<tokio::runtime::Runtime>>,
    replay: Option<Cassette>,
}

impl AgentHost {
    /// Prepares the agent of `scenario`: reads the cassette to replay, or starts the runtime
    /// the `llm` policy asks its model on.
    pub fn prepare(scenario: &Scenario) -> anyhow::Result<AgentHost> {
        let agent = &scenario.agent;
        let cassette_path = || {
            agent
                .cassette
                .as_deref()
                .map(std::path::Path::new)
                .ok_or_else(|| anyhow::anyhow!("[agent] needs a cassette"))
        };
        let replay = match agent.policy {
            AgentPolicy::Replay => Some(Cassette::load(cassette_path()?).map_err(anyhow::Error::msg)?),
            _ => None,
        };
        let runtime = match agent.policy {
            AgentPolicy::Llm => {
                Some(Arc::new(tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?))
            }
            _ => None,
        };
        let log = AgentLog {
            run: Rc::new(RefCell::new(AgentRun { policy: agent.policy.name().to_owned(), ..AgentRun::default() })),
            recording: Rc::new(RefCell::new(Cassette::default())),
        };
        Ok(AgentHost { log, runtime, replay })
    }

    /// Puts the agent on its host, deciding until `until_us`; admission and hold TTL changes
    /// it applies go into the history for the checker.
    pub fn install(
        self,
        sim: &mut turmoil::Sim<'_>,
        scenario: &Scenario,
        nodes: Vec<String>,
        recorder: Rc<RefCell<HistoryRecorder>>,
        until_us: u64,
    ) {
        let scenario = Rc::new(scenario.clone());
        let interval = Duration::from_secs_f64(scenario.agent.interval_s);
        let initial_rate = scenario.engine.admission.rate_per_s;
        sim.host(crate::scenario::AGENT_HOST, move || {
            let policy = policy(&scenario, &self.log, self.runtime.as_ref(), self.replay.as_ref());
            let (log, recorder, nodes) = (self.log.clone(), Rc::clone(&recorder), nodes.clone());
            async move {
                let clock = Arc::new(SimClock::new(EPOCH_MS, Arc::new(AtomicI64::new(0))));
                let mut agent = Agent::new(SimTransport { nodes }, policy, clock, AgentOptions::default());
                let mut rates: BTreeMap<u64, f64> = BTreeMap::new();
                agent
                    .run(interval, |decision| {
                        record_changes(decision, &mut rates, initial_rate, &mut recorder.borrow_mut());
                        log.run.borrow_mut().decisions.push(decision.clone());
                        sim_now_us() < until_us
                    })
                    .await;
                Ok(())
            }
        });
    }
}

/// Puts the admission and hold TTL changes a decision applied into the history. A raise
/// counts from when the agent looked (before it was applied), a cut from now (after): the
/// checker is never stricter than the engine was entitled to be.
fn record_changes(
    decision: &DecisionRecord,
    rates: &mut BTreeMap<u64, f64>,
    initial_rate: f64,
    recorder: &mut HistoryRecorder,
) {
    let (seen_us, now_us) = (to_us(decision.at_ms), sim_now_us());
    for action in decision.actions.iter().filter(|action| action.outcome == ActionOutcome::Applied) {
        match action.call {
            Some(ToolCall::SetAdmission { schedule_id, rate_per_s, paused, .. }) => {
                let before = rates.insert(schedule_id, rate_per_s).unwrap_or(initial_rate);
                let at_us = if rate_per_s > before { seen_us } else { now_us };
                let burst = rate_per_s.max(1.0).ceil() as u64;
                recorder.admission_change(AdmissionChange { at_us, schedule_id, rate_per_s, burst, paused });
            }
            Some(ToolCall::SetHoldTtl { ttl_s }) => {
                recorder.hold_ttl_change(HoldTtlChange { at_us: seen_us, hold_ttl_us: ttl_s * 1_000_000 });
            }
            _ => {}
        }
    }
}
