//! The simulated client host's side of a journey: the [`Transport`] over turmoil's network
//! and the simulated clock, and the bots, which hammer the queue and the seat map from a few
//! addresses, open loop.

use std::cell::RefCell;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::Duration;

use super::net::{BuiltRequest, HttpClient};
use super::node::sim_now_us;
use crate::history::{HistoryRecorder, OpId, OpKind, Outcome};
use crate::journey::{HttpFailure, HttpReply, HttpRequest, Journeys, Transport, UserOutcomes};
use crate::scenario::{Bot, BotTarget};

/// Requests one bot address keeps in flight at most; beyond, its requests are dropped.
const BOT_IN_FLIGHT_MAX: u32 = 64;

/// A client host's transport: its HTTP/2 client, the run's history and the users' outcomes.
#[derive(Debug)]
pub struct SimTransport {
    pub http: HttpClient,
    pub recorder: Rc<RefCell<HistoryRecorder>>,
    pub outcomes: Rc<RefCell<UserOutcomes>>,
}

impl Transport for SimTransport {
    type Prepared = Result<BuiltRequest, HttpFailure>;

    fn now_us(&self) -> u64 {
        sim_now_us()
    }

    fn wall_ms(&self) -> u64 {
        super::EPOCH_MS + sim_now_us() / 1_000
    }

    fn sleep(&self, duration: Duration) -> impl Future<Output = ()> {
        tokio::time::sleep(duration)
    }

    fn prepare(&self, node: &str, request: HttpRequest) -> Self::Prepared {
        self.http.prepare(node, request)
    }

    fn send(
        &self,
        node: &str,
        request: Self::Prepared,
        timeout: Duration,
    ) -> impl Future<Output = Result<HttpReply, HttpFailure>> {
        self.http.send_built(node, request, timeout)
    }

    fn invoke(&self, user: u64, ip: IpAddr, kind: OpKind, key: Option<String>) -> OpId {
        self.recorder.borrow_mut().invoke(user, ip, kind, key, sim_now_us())
    }

    fn complete(&self, op: OpId, outcome: Outcome) {
        self.recorder.borrow_mut().complete(op, outcome, sim_now_us());
    }

    fn ended(&self, how: &'static str) {
        self.outcomes.borrow_mut().ended(how);
    }
}

impl Journeys<SimTransport> {
    /// Runs one bot address from `start` to `end`, open loop, taking turns with the sessions
    /// of the bot's accounts (user ids from `first_account`), if it has any.
    pub async fn bot(self: Rc<Self>, bot: Bot, ip: IpAddr, rate_per_s: f64, end_us: u64, first_account: u64) {
        let interval = Duration::from_micros((1e6 / rate_per_s.max(0.001)) as u64);
        let sessions: Vec<String> =
            (0..u64::from(bot.accounts)).map(|index| self.log_in(first_account + index)).collect();
        let in_flight = Rc::new(RefCell::new(0_u32));
        let mut sequence = 0_u64;
        let schedule_id = self.plan.schedules.first().map_or(1, |(id, _)| *id);
        while sim_now_us() < end_us {
            sequence += 1;
            if *in_flight.borrow() >= BOT_IN_FLIGHT_MAX {
                self.transport.outcomes.borrow_mut().bot_dropped += 1;
            } else {
                let target = bot.targets[(sequence as usize) % bot.targets.len().max(1)];
                let session = (!sessions.is_empty()).then(|| sessions[(sequence as usize) % sessions.len()].clone());
                let request = bot_request(target, schedule_id, sequence, ip, session);
                let node = self.plan.nodes[(sequence as usize) % self.plan.nodes.len()].clone();
                let (context, in_flight) = (Rc::clone(&self), Rc::clone(&in_flight));
                *in_flight.borrow_mut() += 1;
                self.transport.outcomes.borrow_mut().bot_requests += 1;
                tokio::task::spawn_local(async move {
                    let answer = match context.transport.http.send(&node, request, Duration::from_secs(5)).await {
                        Ok(reply) => reply.status.to_string(),
                        Err(_) => "unknown".to_owned(),
                    };
                    *context.transport.outcomes.borrow_mut().bot_answers.entry(answer).or_default() += 1;
                    *in_flight.borrow_mut() -= 1;
                });
            }
            tokio::time::sleep(interval).await;
        }
    }
}

fn bot_request(target: BotTarget, schedule_id: u64, sequence: u64, ip: IpAddr, session: Option<String>) -> HttpRequest {
    let (method, path, body) = match target {
        BotTarget::QueueJoin => ("POST", format!("/v1/schedules/{schedule_id}/queue"), None),
        BotTarget::SeatMap => ("GET", format!("/v1/schedules/{schedule_id}/seats?limit=100"), None),
        BotTarget::QueueStatus => ("GET", format!("/v1/queue/v2.{schedule_id}.1.{sequence}.0.forged"), None),
    };
    HttpRequest {
        method,
        path,
        bearer: session,
        queue_token: None,
        idempotency_key: None,
        forwarded_for: ip.to_string(),
        body,
    }
}
