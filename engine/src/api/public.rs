//! The public API: schedules, accounts and sessions, the waiting room, seats, holds and
//! reservations, and the payment provider's top-up webhook.
//!
//! **Invariant:** every handler that acts for a user takes the user from the verified session
//! ([`FanSession`]); no body or path names the acting user. Booking calls carry the queue
//! token in [`QUEUE_TOKEN_HEADER`], and the engine checks it names the same user.

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::idempotency::IDEMPOTENCY_KEY;
use super::{ApiError, ApiJson, ApiPath, ApiQuery, AppState, ClientIp, FanSession, QUEUE_TOKEN_HEADER, respond};
use crate::config::bounds;
use crate::domain::{Account, Reservation, ReservationStatus, ScheduleSummary, SeatStatus, SeatView};
use crate::engine::{Joined, QueuePosition};
use crate::store::SeatFilter;

pub(super) fn routes(state: &AppState) -> Router<AppState> {
    let config = state.engine.config();
    let mut routes = Router::new()
        .route("/v1/schedules", get(list_schedules))
        .route("/v1/users", post(create_user))
        .route("/v1/users/{id}", get(get_user))
        .route("/v1/schedules/{id}/queue", post(join_queue))
        .route("/v1/queue/{token}", get(queue_status))
        .route("/v1/schedules/{id}/seats", get(seat_map))
        .route("/v1/holds", post(hold))
        .route("/v1/reservations/{id}", get(get_reservation))
        .route("/v1/reservations/{id}/confirm", post(confirm))
        .route("/v1/reservations/{id}/cancel", post(cancel));
    if config.sessions.dev_sessions {
        routes = routes.route("/v1/sessions", post(dev_session));
    }
    if config.payment_webhook_secret.is_some() {
        routes = routes.route("/v1/payments/webhook", post(super::webhook::top_up));
    }
    routes
}

/// The public routes that act for no user, and so take no session; every other one needs one.
const SESSIONLESS_ROUTES: [&str; 4] = ["/v1/schedules", "/v1/users", "/v1/sessions", "/v1/payments/webhook"];

/// Whether the public route with this template acts for a user, and so needs a session.
pub(super) fn needs_session(route: &str) -> bool {
    !SESSIONLESS_ROUTES.contains(&route)
}

/// The queue token of a booking call.
fn queue_token(headers: &HeaderMap) -> Option<&str> {
    headers.get(QUEUE_TOKEN_HEADER)?.to_str().ok().map(str::trim)
}

/// A user and their balance.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct UserView {
    id: u64,
    name: String,
    points: u64,
}

impl From<Account> for UserView {
    fn from(account: Account) -> Self {
        Self { id: account.user_id, name: account.name, points: account.balance }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct NewUser {
    /// 1 to 100 characters, none a control character (Unicode category Cc).
    #[schema(min_length = 1, max_length = 100, pattern = r"^[^\x00-\x1f\x7f-\x9f]*$")]
    name: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct DevSessionRequest {
    #[schema(minimum = 1)]
    user_id: u64,
}

/// A session credential: send it as `Authorization: Bearer <session>`.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct SessionView {
    session: String,
    user_id: u64,
    expires_at_s: u64,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct StatusQuery {
    /// Answer when the status changes, or after this many seconds (0 to 30).
    #[param(minimum = 0, maximum = 30, nullable = false)]
    wait_s: Option<u64>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct SeatMapQuery {
    /// Only seats of this section.
    #[param(nullable = false)]
    section: Option<String>,
    /// Only seats with this status.
    #[param(nullable = false)]
    status: Option<SeatStatus>,
    /// At most this many seats.
    #[param(nullable = false)]
    limit: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct SeatMap {
    seats: Vec<SeatView>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct HoldRequestBody {
    #[schema(example = 1)]
    schedule_id: u64,
    #[schema(example = 1)]
    seat_id: u64,
}

/// A fresh hold.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct HoldView {
    reservation_id: u64,
    fence: u64,
    expires_at: u64,
}

/// A reservation as its owner sees it.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ReservationView {
    id: u64,
    schedule_id: u64,
    seat_id: u64,
    user_id: u64,
    status: ReservationStatus,
    fence: u64,
    price: u64,
    paid: u64,
    held_at: u64,
    expires_at: u64,
    confirmed_at: Option<u64>,
}

impl From<Reservation> for ReservationView {
    fn from(r: Reservation) -> Self {
        Self {
            id: r.id,
            schedule_id: r.schedule_id,
            seat_id: r.seat_id,
            user_id: r.user_id,
            status: r.status,
            fence: r.fence.0,
            price: r.price_points,
            paid: r.paid_points,
            held_at: r.held_at_ms,
            expires_at: r.expires_at_ms,
            confirmed_at: r.confirmed_at_ms,
        }
    }
}

/// What is on sale.
#[utoipa::path(get, path = "/v1/schedules", responses((status = 200, body = [ScheduleSummary])))]
pub(super) async fn list_schedules(State(state): State<AppState>) -> Response {
    respond(StatusCode::OK, state.engine.schedules().await.map_err(ApiError::from))
}

/// Opens an account with no points (a limited number per client address and hour).
#[utoipa::path(post, path = "/v1/users", request_body = NewUser,
    responses((status = 201, body = UserView),
        (status = 422, description = "`validation_failed`: the name breaks its rules.", body = super::Problem),
        (status = 429, description = "`rate_limited`: this address opened its accounts for the hour.", body = super::Problem)))]
pub(super) async fn create_user(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    ApiJson(body): ApiJson<NewUser>,
) -> Response {
    if let Err(rejection) = state.engine.guards().check_account_creation(ip) {
        return ApiError::from(rejection).into_response();
    }
    respond(StatusCode::CREATED, state.engine.create_user(body.name).await.map(UserView::from).map_err(ApiError::from))
}

/// Issues a session for an existing user without any proof of identity: served only by an
/// engine started with dev sessions, for development and load tests.
#[utoipa::path(post, path = "/v1/sessions", request_body = DevSessionRequest,
    responses((status = 201, body = SessionView),
        (status = 404, description = "`not_found`: no such user, or this engine issues no dev sessions.", body = super::Problem),
        (status = 422, description = "`validation_failed`: this engine verifies sessions only.", body = super::Problem)))]
pub(super) async fn dev_session(State(state): State<AppState>, ApiJson(body): ApiJson<DevSessionRequest>) -> Response {
    let result = state.engine.dev_session(body.user_id).await.map(|(session, granted)| SessionView {
        session,
        user_id: granted.user_id,
        expires_at_s: granted.expires_at_s,
    });
    respond(StatusCode::CREATED, result.map_err(ApiError::from))
}

/// The session user's own account and balance.
#[utoipa::path(get, path = "/v1/users/{id}", params(("id" = u64, Path)), security(("session" = [])),
    responses((status = 200, body = UserView),
        (status = 403, description = "`not_your_account`: the session is another user's.", body = super::Problem),
        (status = 404, description = "`not_found`: no such user.", body = super::Problem)))]
pub(super) async fn get_user(
    State(state): State<AppState>,
    FanSession(session): FanSession,
    ApiPath(id): ApiPath<u64>,
) -> Response {
    respond(StatusCode::OK, state.engine.user(session, id).await.map(UserView::from).map_err(ApiError::from))
}

/// Joins a schedule's waiting room as the session's user; the token is signed, names user and
/// schedule, and joining again returns the same place.
#[utoipa::path(post, path = "/v1/schedules/{id}/queue", params(("id" = u64, Path)), security(("session" = [])),
    responses((status = 201, body = Joined), (status = 404, description = "`not_found`: no such schedule.", body = super::Problem)))]
pub(super) async fn join_queue(
    State(state): State<AppState>,
    FanSession(session): FanSession,
    ApiPath(id): ApiPath<u64>,
) -> Response {
    respond(StatusCode::CREATED, state.engine.join_queue(session, id).await.map_err(ApiError::from))
}

/// Where a token stands; with `wait_s` it answers on a change or after that many seconds.
#[utoipa::path(get, path = "/v1/queue/{token}", params(("token" = String, Path), StatusQuery), security(("session" = [])),
    responses((status = 200, body = QueuePosition),
        (status = 401, description = "`token_invalid`: not a token this engine signed.", body = super::Problem),
        (status = 403, description = "`token_not_yours`: the token is another user's.", body = super::Problem),
        (status = 410, description = "`queue_place_lost`: the line lost this place; join again.", body = super::Problem),
        (status = 422, description = "`out_of_bounds`: `wait_s` is beyond 30.", body = super::Problem)))]
pub(super) async fn queue_status(
    State(state): State<AppState>,
    FanSession(session): FanSession,
    ApiPath(token): ApiPath<String>,
    ApiQuery(query): ApiQuery<StatusQuery>,
) -> Response {
    let result = async {
        let wait_s = query.wait_s.unwrap_or(0);
        if !bounds::QUEUE_WAIT_S.contains(&wait_s) {
            return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "out_of_bounds", "wait_s must be in 0..=30"));
        }
        Ok(state.engine.queue_status(session, &token, Duration::from_secs(wait_s)).await?)
    }
    .await;
    respond(StatusCode::OK, result)
}

/// The seat map (admitted token required).
#[utoipa::path(get, path = "/v1/schedules/{id}/seats", params(("id" = u64, Path), SeatMapQuery), security(("session" = [], "queue_token" = [])),
    responses((status = 200, body = SeatMap),
        (status = 403, description = "The queue token does not let its user browse this schedule.", body = super::Problem),
        (status = 410, description = "`queue_place_lost`: the line lost this place; join again.", body = super::Problem)))]
pub(super) async fn seat_map(
    State(state): State<AppState>,
    FanSession(session): FanSession,
    ApiPath(id): ApiPath<u64>,
    ApiQuery(query): ApiQuery<SeatMapQuery>,
    headers: HeaderMap,
) -> Response {
    let filter = SeatFilter { section: query.section, status: query.status, limit: query.limit };
    let result = state.engine.seat_map(session, queue_token(&headers), id, filter).await.map(|seats| SeatMap { seats });
    respond(StatusCode::OK, result.map_err(ApiError::from))
}

/// Takes a seat (admitted token required).
#[utoipa::path(post, path = "/v1/holds", request_body = HoldRequestBody, security(("session" = [], "queue_token" = [])),
    responses((status = 201, body = HoldView),
        (status = 403, description = "The queue token does not let its user hold on this schedule.", body = super::Problem),
        (status = 410, description = "`queue_place_lost`: the line lost this place; join again.", body = super::Problem),
        (status = 404, description = "`not_found`: no such seat.", body = super::Problem),
        (status = 409, description = "`seat_taken`, `seat_locked` (with `Retry-After`), `seat_limit_reached`: the seat cannot be had.", body = super::Problem)))]
pub(super) async fn hold(
    State(state): State<AppState>,
    FanSession(session): FanSession,
    headers: HeaderMap,
    ApiJson(body): ApiJson<HoldRequestBody>,
) -> Response {
    let result =
        state.engine.hold(session, queue_token(&headers), body.schedule_id, body.seat_id).await.map(|reservation| {
            HoldView {
                reservation_id: reservation.id,
                fence: reservation.fence.0,
                expires_at: reservation.expires_at_ms,
            }
        });
    respond(StatusCode::CREATED, result.map_err(ApiError::from))
}

/// Pays for a hold with points and confirms it.
#[utoipa::path(post, path = "/v1/reservations/{id}/confirm", params(("id" = u64, Path)), security(("session" = [], "queue_token" = [])),
    responses((status = 200, body = ReservationView),
        (status = 402, description = "`insufficient_points`: the balance does not cover the price.", body = super::Problem),
        (status = 403, description = "`not_owner`: the reservation is another user's.", body = super::Problem),
        (status = 404, description = "`not_found`: no such reservation.", body = super::Problem),
        (status = 409, description = "`stale_fence`, `not_held`, `already_final`: the hold cannot be paid.", body = super::Problem),
        (status = 410, description = "`hold_expired`: the hold ran out before the payment.", body = super::Problem)))]
pub(super) async fn confirm(
    State(state): State<AppState>,
    FanSession(session): FanSession,
    ApiPath(id): ApiPath<u64>,
    headers: HeaderMap,
) -> Response {
    let key = headers.get(IDEMPOTENCY_KEY).and_then(|value| value.to_str().ok()).map(str::to_owned);
    let result = state.engine.confirm(session, queue_token(&headers), id, key).await.map(ReservationView::from);
    respond(StatusCode::OK, result.map_err(ApiError::from))
}

/// Cancels a hold, or a confirmed reservation with a refund.
#[utoipa::path(post, path = "/v1/reservations/{id}/cancel", params(("id" = u64, Path)), security(("session" = [], "queue_token" = [])),
    responses((status = 200, body = ReservationView),
        (status = 403, description = "`not_owner`: the reservation is another user's.", body = super::Problem),
        (status = 404, description = "`not_found`: no such reservation.", body = super::Problem),
        (status = 409, description = "`already_final`: cancelled already.", body = super::Problem)))]
pub(super) async fn cancel(
    State(state): State<AppState>,
    FanSession(session): FanSession,
    ApiPath(id): ApiPath<u64>,
    headers: HeaderMap,
) -> Response {
    let result = state.engine.cancel(session, queue_token(&headers), id).await.map(ReservationView::from);
    respond(StatusCode::OK, result.map_err(ApiError::from))
}

/// Reads one's reservation.
#[utoipa::path(get, path = "/v1/reservations/{id}", params(("id" = u64, Path)), security(("session" = [], "queue_token" = [])),
    responses((status = 200, body = ReservationView),
        (status = 403, description = "`not_owner`: the reservation is another user's.", body = super::Problem),
        (status = 404, description = "`not_found`: no such reservation.", body = super::Problem)))]
pub(super) async fn get_reservation(
    State(state): State<AppState>,
    FanSession(session): FanSession,
    ApiPath(id): ApiPath<u64>,
    headers: HeaderMap,
) -> Response {
    let result = state.engine.reservation(session, queue_token(&headers), id).await.map(ReservationView::from);
    respond(StatusCode::OK, result.map_err(ApiError::from))
}
