//! A fan's journey, written once over a small HTTP [`Transport`]: the simulated client host and
//! the live load driver each implement the transport, so simulated and live fans cannot drift
//! apart.
//!
//! A user logs in (a session signed with the engine's session secret, as an identity provider
//! would sign it), joins the line, waits with long polls until admitted (or until their patience runs
//! out, or the join or a long poll says the schedule is sold out), asks for the available seats
//! of a section, holds one, pays with an idempotency key, retries with the same key when the
//! outcome is unknown, and sometimes cancels. A user told that the line lost their place
//! (`queue_place_lost`, after the cache store lost its memory) joins again, a few times at
//! most. Every call is recorded in the history with the transport's times.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::history::{Digest, OkResponse, OpId, OpKind, Outcome, ReportedStatus, UnknownReason};
use crate::reply::Reply;
use crate::scenario::{Scenario, SeatChoice, Users};
use tcore_engine::sessions::{SESSION_AUDIENCE_DEFAULT, SESSION_TTL_S_MAX, SessionClaims, sign_hs256};

/// The most hold attempts one user makes before giving up.
const HOLD_ATTEMPTS_MAX: u32 = 6;
/// Available seats asked for per seat map call.
const SEAT_PAGE: u32 = 20;
/// The longest long poll a user asks for.
pub const LONG_POLL_S: u64 = 30;
/// The most times one user joins again after the line lost their place.
const REJOINS_MAX: u32 = 3;
/// The problem code of a place in line the cache store lost.
const PLACE_LOST: &str = "queue_place_lost";

/// A section as users choose it.
#[derive(Debug, Clone)]
pub struct SectionChoice {
    pub name: String,
    pub popularity: f64,
    pub price_points: u64,
}

/// What came back from one HTTP call.
#[derive(Debug, Clone)]
pub struct HttpReply {
    pub status: u16,
    pub body: hyper::body::Bytes,
}

/// Why an HTTP call has no answer: the outcome is unknown to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpFailure {
    /// No answer within the timeout.
    Timeout,
    /// The connection could not be made or broke.
    ConnectionLost,
}

/// One request to send.
#[derive(Debug, Clone)]
pub struct HttpRequest {
    pub method: &'static str,
    pub path: String,
    /// The fan's session, sent as `Authorization: Bearer`.
    pub bearer: Option<String>,
    /// The queue token of a booking call, sent as `X-Queue-Token`.
    pub queue_token: Option<String>,
    pub idempotency_key: Option<String>,
    pub forwarded_for: String,
    pub body: Option<String>,
}

/// What every journey of a run shares: the scenario's users and schedules, the nodes to call,
/// and the secret sessions are signed with.
#[derive(Debug)]
pub struct JourneyPlan {
    pub seed: u64,
    pub nodes: Vec<String>,
    pub users: Users,
    pub schedules: Vec<(u64, Vec<SectionChoice>)>,
    /// The HS256 secret the engine nodes verify sessions with.
    pub session_secret: Vec<u8>,
}

impl JourneyPlan {
    /// The plan of `scenario`'s users, calling `nodes`.
    pub fn of(scenario: &Scenario, nodes: Vec<String>, session_secret: Vec<u8>) -> JourneyPlan {
        let schedules = scenario
            .venue
            .schedules
            .iter()
            .map(|schedule| {
                let sections = schedule
                    .sections
                    .iter()
                    .map(|section| SectionChoice {
                        name: section.name.clone(),
                        popularity: section.popularity,
                        price_points: section.price_points,
                    })
                    .collect();
                (schedule.id, sections)
            })
            .collect();
        JourneyPlan { seed: scenario.seed, nodes, users: scenario.users.clone(), schedules, session_secret }
    }
}

/// What a journey needs from where it runs: a clock, a way to wait, a way to send a request
/// and a place to record it. The simulated client host and the live load driver each
/// implement it; the journey itself is written once, in [`Journeys`].
pub trait Transport {
    /// A request made ready to send.
    type Prepared;

    /// Microseconds since the run's start.
    fn now_us(&self) -> u64;
    /// Milliseconds since the Unix epoch, as the engine's clock reads them (for sessions).
    fn wall_ms(&self) -> u64;
    fn sleep(&self, duration: Duration) -> impl Future<Output = ()>;
    /// Makes `request` ready for `node`: what may be done before the send is done here, so
    /// that the future of a request in flight stays small.
    fn prepare(&self, node: &str, request: HttpRequest) -> Self::Prepared;
    fn send(
        &self,
        node: &str,
        request: Self::Prepared,
        timeout: Duration,
    ) -> impl Future<Output = Result<HttpReply, HttpFailure>>;
    /// Records the start of a call.
    fn invoke(&self, user: u64, ip: IpAddr, kind: OpKind, key: Option<String>) -> OpId;
    /// Records how a call ended.
    fn complete(&self, op: OpId, outcome: Outcome);
    /// Records how a journey ended.
    fn ended(&self, how: &'static str);
}

/// Journeys over one transport.
#[derive(Debug)]
pub struct Journeys<T> {
    pub transport: T,
    pub plan: Arc<JourneyPlan>,
}

/// Every way a journey can end, as the score counts them (`score.journeys`).
pub const JOURNEY_ENDINGS: [&str; 9] = [
    "bought",
    "bought-then-cancelled",
    "join-failed",
    "sold-out-while-waiting",
    "no-seat",
    "gave-up-waiting",
    "place-lost",
    "payment-refused",
    "payment-unknown",
];

/// How users' journeys ended, and what bots got, for the score.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct UserOutcomes {
    pub journeys_ended: BTreeMap<String, u64>,
    pub bot_requests: u64,
    pub bot_dropped: u64,
    pub bot_answers: BTreeMap<String, u64>,
}

impl UserOutcomes {
    pub fn ended(&mut self, how: &str) {
        *self.journeys_ended.entry(how.to_owned()).or_default() += 1;
    }
}

/// The answer to one recorded call. A reply is boxed: an answer is kept while a user backs
/// off, so its size is part of every waiting user's journey.
enum Answer {
    Ok(Box<Reply>),
    Refused { status: u16, code: String },
    Unknown,
}

/// One virtual user.
struct VirtualUser {
    /// The user's index; the engine's user id is one more.
    index: u64,
    ip: IpAddr,
    /// `ip` as its requests carry it, written once: formatting an address costs more than
    /// copying its text.
    ip_text: String,
    /// The session every call of the journey carries.
    session: String,
    node_cursor: usize,
    rng: StdRng,
}

/// The address a user's requests come from, as the engine's guards see it.
pub fn user_ip(index: u64) -> IpAddr {
    let index = index + 1;
    IpAddr::V4(Ipv4Addr::new(10, ((index >> 16) & 0xff) as u8, ((index >> 8) & 0xff) as u8, (index & 0xff) as u8))
}

impl<T: Transport> Journeys<T> {
    /// Runs the journey of user `index` (engine user id `index + 1`) arriving now.
    pub async fn journey(&self, index: u64) {
        let ip = user_ip(index);
        let mut user = VirtualUser {
            index,
            ip,
            ip_text: ip.to_string(),
            session: self.log_in(index + 1),
            node_cursor: (index as usize) % self.plan.nodes.len().max(1),
            rng: StdRng::seed_from_u64(self.plan.seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        };
        let how = self.run_journey(&mut user).await;
        self.transport.ended(how);
    }

    async fn run_journey(&self, user: &mut VirtualUser) -> &'static str {
        let deadline_us = self.transport.now_us() + (self.plan.users.patience_s * 1e6) as u64;
        let (schedule_id, sections) = self.pick_schedule(user);
        let mut rejoins = 0;
        let (token, reservation_id) = loop {
            let Some(joined) = self.join(user, schedule_id).await else { return "join-failed" };
            if joined.sold_out {
                // The join already says that nothing is left: no long poll to learn it again.
                return "sold-out-while-waiting";
            }
            let token = joined.token;
            match self.wait_for_admission(user, &token, deadline_us).await {
                Waited::Admitted => match self.take_a_seat(user, &token, schedule_id, &sections).await {
                    Seat::Held(reservation_id) => break (token, reservation_id),
                    Seat::None => return "no-seat",
                    Seat::PlaceLost => {}
                },
                Waited::SoldOut => return "sold-out-while-waiting",
                Waited::GaveUp => return "gave-up-waiting",
                Waited::PlaceLost => {}
            }
            // The line lost the user's place: they join again while their patience lasts.
            if rejoins >= REJOINS_MAX || self.transport.now_us() >= deadline_us {
                return "place-lost";
            }
            rejoins += 1;
        };
        match self.pay(user, &token, reservation_id).await {
            PayOutcome::Paid => {}
            PayOutcome::Refused => return "payment-refused",
            PayOutcome::Unknown => return "payment-unknown",
        }
        if user.rng.random_bool(self.plan.users.cancel_probability.clamp(0.0, 1.0)) {
            let path = format!("/v1/reservations/{reservation_id}/cancel");
            let key = format!("cancel-{}-{reservation_id}", user.index);
            self.call(user, OpKind::Cancel { reservation_id }, "POST", path, Some(&token), Some(key), None).await;
            return "bought-then-cancelled";
        }
        "bought"
    }

    /// A session for `user_id` from now on the transport's clock, lasting the longest a
    /// session may: an identity provider's login, done where the fan is.
    pub fn log_in(&self, user_id: u64) -> String {
        let iat = self.transport.wall_ms() / 1_000;
        let claims = SessionClaims {
            sub: user_id.to_string(),
            aud: SESSION_AUDIENCE_DEFAULT.into(),
            iat,
            exp: iat + SESSION_TTL_S_MAX,
            iss: None,
        };
        sign_hs256(&self.plan.session_secret, &claims).unwrap_or_default()
    }

    fn pick_schedule(&self, user: &mut VirtualUser) -> (u64, Vec<SectionChoice>) {
        let index = user.rng.random_range(0..self.plan.schedules.len().max(1));
        self.plan.schedules.get(index).cloned().unwrap_or((1, Vec::new()))
    }

    async fn backoff(&self, user: &mut VirtualUser) {
        let range = &self.plan.users.poll_interval_ms;
        let wait_ms = if range.max > range.min { user.rng.random_range(range.min..range.max) } else { range.min };
        self.transport.sleep(Duration::from_micros((wait_ms * 1000.0) as u64)).await;
    }

    async fn join(&self, user: &mut VirtualUser, schedule_id: u64) -> Option<Joined> {
        for _ in 0..=self.plan.users.retries_max {
            let path = format!("/v1/schedules/{schedule_id}/queue");
            // No Idempotency-Key: joining is idempotent by user (a user keeps their place), so
            // a retried join needs none, and the key's two store round trips would be waste.
            match self.call(user, OpKind::JoinQueue { schedule_id }, "POST", path, None, None, None).await {
                Answer::Ok(reply) => {
                    let sold_out = reply.sold_out;
                    return reply.token.map(|token| Joined { token, sold_out });
                }
                Answer::Refused { status, .. } if !retryable(status) => return None,
                _ => self.backoff(user).await,
            }
        }
        None
    }

    async fn wait_for_admission(&self, user: &mut VirtualUser, token: &str, deadline_us: u64) -> Waited {
        loop {
            let now_us = self.transport.now_us();
            if now_us >= deadline_us {
                return Waited::GaveUp;
            }
            let wait_s = ((deadline_us - now_us) / 1_000_000).clamp(1, LONG_POLL_S);
            let path = format!("/v1/queue/{token}?wait_s={wait_s}");
            let kind = OpKind::QueueStatus { token: token.to_owned() };
            match self
                .call_with_timeout(user, kind, "GET", path, None, None, None, Duration::from_secs(wait_s + 5))
                .await
            {
                Answer::Ok(reply) => match reply.status.as_deref() {
                    Some("ADMITTED") => return Waited::Admitted,
                    Some("WAITING") if reply.sold_out => return Waited::SoldOut,
                    Some("WAITING") => {}
                    _ => return Waited::GaveUp,
                },
                Answer::Refused { code, .. } if code == PLACE_LOST => return Waited::PlaceLost,
                Answer::Refused { status, .. } if !retryable(status) => return Waited::GaveUp,
                _ => self.backoff(user).await,
            }
        }
    }

    async fn take_a_seat(
        &self,
        user: &mut VirtualUser,
        token: &str,
        schedule_id: u64,
        sections: &[SectionChoice],
    ) -> Seat {
        let mut sold_out: Vec<bool> = vec![false; sections.len()];
        let mut attempts = 0;
        while attempts < HOLD_ATTEMPTS_MAX {
            let Some(section) = self.choose_section(user, sections, &sold_out) else { return Seat::None };
            let path = format!(
                "/v1/schedules/{schedule_id}/seats?status=AVAILABLE&limit={SEAT_PAGE}&section={}",
                sections[section].name
            );
            let seats =
                match self.call(user, OpKind::SeatMap { schedule_id }, "GET", path, Some(token), None, None).await {
                    Answer::Ok(reply) => reply.seat_ids,
                    Answer::Refused { code, .. } if code == PLACE_LOST => return Seat::PlaceLost,
                    Answer::Refused { status, .. } if !retryable(status) => return Seat::None,
                    _ => {
                        attempts += 1;
                        self.backoff(user).await;
                        continue;
                    }
                };
            if seats.is_empty() {
                sold_out[section] = true;
                continue;
            }
            let seat_id = match self.plan.users.seat_choice {
                SeatChoice::BestAvailable => seats[0],
                SeatChoice::PopularSection | SeatChoice::Random => seats[user.rng.random_range(0..seats.len())],
            };
            attempts += 1;
            match self.hold(user, token, schedule_id, seat_id, attempts).await {
                HoldOutcome::Held(reservation_id) => return Seat::Held(reservation_id),
                HoldOutcome::Taken => {}
                HoldOutcome::PlaceLost => return Seat::PlaceLost,
                HoldOutcome::GiveUp => return Seat::None,
            }
        }
        Seat::None
    }

    fn choose_section(&self, user: &mut VirtualUser, sections: &[SectionChoice], sold_out: &[bool]) -> Option<usize> {
        let open: Vec<usize> = (0..sections.len()).filter(|&index| !sold_out[index]).collect();
        if open.is_empty() {
            return None;
        }
        match self.plan.users.seat_choice {
            SeatChoice::BestAvailable => {
                open.into_iter().max_by_key(|&index| (sections[index].price_points, usize::MAX - index))
            }
            SeatChoice::Random => Some(open[user.rng.random_range(0..open.len())]),
            SeatChoice::PopularSection => {
                let total: f64 = open.iter().map(|&index| sections[index].popularity).sum();
                let mut draw = user.rng.random_range(0.0..total.max(f64::MIN_POSITIVE));
                for &index in &open {
                    draw -= sections[index].popularity;
                    if draw < 0.0 {
                        return Some(index);
                    }
                }
                open.last().copied()
            }
        }
    }

    async fn hold(
        &self,
        user: &mut VirtualUser,
        token: &str,
        schedule_id: u64,
        seat_id: u64,
        attempt: u32,
    ) -> HoldOutcome {
        let key = format!("hold-{}-{attempt}", user.index);
        for _ in 0..=self.plan.users.retries_max {
            let body = format!("{{\"schedule_id\":{schedule_id},\"seat_id\":{seat_id}}}");
            let kind = OpKind::Hold { schedule_id, seat_id };
            match self.call(user, kind, "POST", "/v1/holds".into(), Some(token), Some(key.clone()), Some(body)).await {
                Answer::Ok(reply) => {
                    return reply.reservation_id.map_or(HoldOutcome::GiveUp, HoldOutcome::Held);
                }
                Answer::Refused { code, .. }
                    if code == "seat_taken" || code == "seat_locked" || code == "stale_fence" =>
                {
                    return HoldOutcome::Taken;
                }
                Answer::Refused { code, .. } if code == PLACE_LOST => return HoldOutcome::PlaceLost,
                Answer::Refused { status, .. } if !retryable(status) => return HoldOutcome::GiveUp,
                _ => self.backoff(user).await,
            }
        }
        HoldOutcome::GiveUp
    }

    async fn pay(&self, user: &mut VirtualUser, token: &str, reservation_id: u64) -> PayOutcome {
        let key = format!("pay-{}-{reservation_id}", user.index);
        let mut unknown = false;
        for _ in 0..=self.plan.users.retries_max {
            let path = format!("/v1/reservations/{reservation_id}/confirm");
            match self
                .call(user, OpKind::Confirm { reservation_id }, "POST", path, Some(token), Some(key.clone()), None)
                .await
            {
                Answer::Ok(_) => return PayOutcome::Paid,
                Answer::Refused { status, .. } if !retryable(status) => {
                    return if unknown { PayOutcome::Unknown } else { PayOutcome::Refused };
                }
                Answer::Refused { .. } | Answer::Unknown => {
                    unknown = true;
                    self.backoff(user).await;
                }
            }
        }
        PayOutcome::Unknown
    }

    /// [`Self::call_with_timeout`] with the scenario's request timeout.
    #[allow(clippy::too_many_arguments)]
    async fn call(
        &self,
        user: &mut VirtualUser,
        kind: OpKind,
        method: &'static str,
        path: String,
        queue_token: Option<&str>,
        key: Option<String>,
        body: Option<String>,
    ) -> Answer {
        let timeout = Duration::from_millis(self.plan.users.request_timeout_ms);
        self.call_with_timeout(user, kind, method, path, queue_token, key, body, timeout).await
    }

    /// Sends one request to the user's current node with the user's session (and the queue
    /// token, for a booking call), records it, and moves the user to the next node when the
    /// answer is unknown or the node is unavailable.
    #[allow(clippy::too_many_arguments)]
    fn call_with_timeout<'a>(
        &'a self,
        user: &'a mut VirtualUser,
        kind: OpKind,
        method: &'static str,
        path: String,
        queue_token: Option<&'a str>,
        key: Option<String>,
        body: Option<String>,
        timeout: Duration,
    ) -> impl Future<Output = Answer> + 'a {
        // Everything up to the send happens here, so the future keeps only what it needs after.
        let node = self.plan.nodes[user.node_cursor % self.plan.nodes.len()].clone();
        let keyed = key.is_some();
        let op_id = self.transport.invoke(user.index, user.ip, kind, key.clone());
        let request = self.transport.prepare(
            &node,
            HttpRequest {
                method,
                path,
                bearer: Some(user.session.clone()),
                queue_token: queue_token.map(str::to_owned),
                idempotency_key: key,
                forwarded_for: user.ip_text.clone(),
                body,
            },
        );
        async move {
            let result = self.transport.send(&node, request, timeout).await;
            let (outcome, answer) = match result {
                Ok(http) if (200..300).contains(&http.status) => {
                    let reply = Reply::parse(&http.body);
                    let digest = keyed.then(|| Digest::of(&http.body));
                    (Outcome::Ok(ok_response(http.status, digest, &reply)), Answer::Ok(Box::new(reply)))
                }
                Ok(reply) => {
                    let code = Reply::parse(&reply.body).code.unwrap_or_else(|| "unknown".to_owned());
                    let digest = (keyed && stored_for_replay(reply.status, &code)).then(|| Digest::of(&reply.body));
                    let outcome = Outcome::Fail { http_status: reply.status, code: code.clone(), digest };
                    (outcome, Answer::Refused { status: reply.status, code })
                }
                Err(failure) => {
                    let reason = match failure {
                        HttpFailure::Timeout => UnknownReason::Timeout,
                        HttpFailure::ConnectionLost => UnknownReason::ConnectionLost,
                    };
                    (Outcome::Unknown { reason }, Answer::Unknown)
                }
            };
            if matches!(answer, Answer::Unknown) || matches!(&answer, Answer::Refused { status: 503, .. }) {
                user.node_cursor += 1;
            }
            self.transport.complete(op_id, outcome);
            answer
        }
    }
}

/// A place in line, as the join answered it.
struct Joined {
    token: String,
    sold_out: bool,
}

enum Waited {
    Admitted,
    SoldOut,
    GaveUp,
    /// The line lost the user's place.
    PlaceLost,
}

/// How looking for a seat ended.
enum Seat {
    Held(u64),
    None,
    /// The line lost the user's place (and with it their admission).
    PlaceLost,
}

enum HoldOutcome {
    Held(u64),
    Taken,
    GiveUp,
    PlaceLost,
}

enum PayOutcome {
    Paid,
    Refused,
    Unknown,
}

/// Whether a refusal is worth retrying after a pause.
fn retryable(status: u16) -> bool {
    status == 429 || status >= 500 || status == 409
}

/// Whether the engine stored this refusal for replay under its idempotency key.
fn stored_for_replay(status: u16, code: &str) -> bool {
    status < 500
        && status != 429
        && !matches!(code, "ip_blocked" | "idempotency_in_progress" | "idempotency_key_reused")
}

fn ok_response(http_status: u16, digest: Option<Digest>, reply: &Reply) -> OkResponse {
    let status = reply.status.as_deref().and_then(|status| match status {
        "HELD" => Some(ReportedStatus::Held),
        "CONFIRMED" => Some(ReportedStatus::Confirmed),
        "EXPIRED" => Some(ReportedStatus::Expired),
        "CANCELLED" => Some(ReportedStatus::Cancelled),
        "WAITING" => Some(ReportedStatus::Waiting),
        "ADMITTED" => Some(ReportedStatus::Admitted),
        "USED" => Some(ReportedStatus::Used),
        _ => None,
    });
    OkResponse {
        http_status,
        digest,
        reservation_id: reply.reservation_id.or_else(|| reply.status.as_ref().and(reply.id)),
        fence: reply.fence,
        status,
        user_id: reply.user_id,
        points: reply.points,
        token: reply.token.clone(),
    }
}
