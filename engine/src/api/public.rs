//! The public API: schedules, users and points, the waiting room, seats, holds and
//! reservations.

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::idempotency::IDEMPOTENCY_KEY;
use super::{ApiError, ApiJson, ApiPath, ApiQuery, AppState, bearer, respond};
use crate::config::bounds;
use crate::domain::{Account, Reservation, ReservationStatus, ScheduleSummary, SeatStatus, SeatView};
use crate::engine::{Joined, QueuePosition};
use crate::store::SeatFilter;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/schedules", get(list_schedules))
        .route("/v1/users", post(create_user))
        .route("/v1/users/{id}", get(get_user))
        .route("/v1/users/{id}/points", post(charge_points))
        .route("/v1/schedules/{id}/queue", post(join_queue))
        .route("/v1/queue/{token}", get(queue_status))
        .route("/v1/schedules/{id}/seats", get(seat_map))
        .route("/v1/holds", post(hold))
        .route("/v1/reservations/{id}", get(get_reservation))
        .route("/v1/reservations/{id}/confirm", post(confirm))
        .route("/v1/reservations/{id}/cancel", post(cancel))
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
    name: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct PointsCharge {
    amount: u64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct JoinRequest {
    user_id: u64,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub(super) struct StatusQuery {
    /// Answer when the status changes, or after this many seconds (0 to 30).
    wait_s: Option<u64>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub(super) struct SeatMapQuery {
    /// Only seats of this section.
    section: Option<String>,
    /// Only seats with this status.
    status: Option<SeatStatus>,
    /// At most this many seats.
    limit: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct SeatMap {
    seats: Vec<SeatView>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct HoldRequestBody {
    schedule_id: u64,
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

/// Opens an account with no points.
#[utoipa::path(post, path = "/v1/users", request_body = NewUser,
    responses((status = 201, body = UserView), (status = 422, body = super::Problem)))]
pub(super) async fn create_user(State(state): State<AppState>, ApiJson(body): ApiJson<NewUser>) -> Response {
    respond(StatusCode::CREATED, state.engine.create_user(body.name).await.map(UserView::from).map_err(ApiError::from))
}

/// A user and their balance.
#[utoipa::path(get, path = "/v1/users/{id}", params(("id" = u64, Path)),
    responses((status = 200, body = UserView), (status = 404, body = super::Problem)))]
pub(super) async fn get_user(State(state): State<AppState>, ApiPath(id): ApiPath<u64>) -> Response {
    respond(StatusCode::OK, state.engine.user(id).await.map(UserView::from).map_err(ApiError::from))
}

/// Adds points; needs an `Idempotency-Key`, and adds once per key.
#[utoipa::path(post, path = "/v1/users/{id}/points", params(("id" = u64, Path)), request_body = PointsCharge,
    responses((status = 200, body = UserView), (status = 400, body = super::Problem), (status = 422, body = super::Problem)))]
pub(super) async fn charge_points(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<u64>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<PointsCharge>,
) -> Response {
    let result = async {
        let key = headers.get(IDEMPOTENCY_KEY).and_then(|value| value.to_str().ok()).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "idempotency_key_required",
                "charging points needs an Idempotency-Key header",
            )
        })?;
        Ok(state.engine.charge_points(id, body.amount, key.to_owned()).await.map(UserView::from)?)
    }
    .await;
    respond(StatusCode::OK, result)
}

/// Joins a schedule's waiting room; the token is signed and names user and schedule.
#[utoipa::path(post, path = "/v1/schedules/{id}/queue", params(("id" = u64, Path)), request_body = JoinRequest,
    responses((status = 201, body = Joined), (status = 404, body = super::Problem)))]
pub(super) async fn join_queue(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<u64>,
    ApiJson(body): ApiJson<JoinRequest>,
) -> Response {
    respond(StatusCode::CREATED, state.engine.join_queue(id, body.user_id).await.map_err(ApiError::from))
}

/// Where a token stands; with `wait_s` it answers on a change or after that many seconds.
#[utoipa::path(get, path = "/v1/queue/{token}", params(("token" = String, Path), StatusQuery),
    responses((status = 200, body = QueuePosition), (status = 401, body = super::Problem)))]
pub(super) async fn queue_status(
    State(state): State<AppState>,
    ApiPath(token): ApiPath<String>,
    ApiQuery(query): ApiQuery<StatusQuery>,
) -> Response {
    let result = async {
        let wait_s = query.wait_s.unwrap_or(0);
        if !bounds::QUEUE_WAIT_S.contains(&wait_s) {
            return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "out_of_bounds", "wait_s must be in 0..=30"));
        }
        Ok(state.engine.queue_status(&token, Duration::from_secs(wait_s)).await?)
    }
    .await;
    respond(StatusCode::OK, result)
}

/// The seat map (admitted token required).
#[utoipa::path(get, path = "/v1/schedules/{id}/seats", params(("id" = u64, Path), SeatMapQuery), security(("queue_token" = [])),
    responses((status = 200, body = SeatMap), (status = 403, body = super::Problem)))]
pub(super) async fn seat_map(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<u64>,
    ApiQuery(query): ApiQuery<SeatMapQuery>,
    headers: HeaderMap,
) -> Response {
    let filter = SeatFilter { section: query.section, status: query.status, limit: query.limit };
    let result = state.engine.seat_map(bearer(&headers), id, filter).await.map(|seats| SeatMap { seats });
    respond(StatusCode::OK, result.map_err(ApiError::from))
}

/// Takes a seat (admitted token required).
#[utoipa::path(post, path = "/v1/holds", request_body = HoldRequestBody, security(("queue_token" = [])),
    responses((status = 201, body = HoldView), (status = 409, body = super::Problem), (status = 403, body = super::Problem)))]
pub(super) async fn hold(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<HoldRequestBody>,
) -> Response {
    let result = state.engine.hold(bearer(&headers), body.schedule_id, body.seat_id).await.map(|reservation| {
        HoldView { reservation_id: reservation.id, fence: reservation.fence.0, expires_at: reservation.expires_at_ms }
    });
    respond(StatusCode::CREATED, result.map_err(ApiError::from))
}

/// Pays for a hold with points and confirms it.
#[utoipa::path(post, path = "/v1/reservations/{id}/confirm", params(("id" = u64, Path)), security(("queue_token" = [])),
    responses((status = 200, body = ReservationView), (status = 402, body = super::Problem), (status = 410, body = super::Problem)))]
pub(super) async fn confirm(State(state): State<AppState>, ApiPath(id): ApiPath<u64>, headers: HeaderMap) -> Response {
    let key = headers.get(IDEMPOTENCY_KEY).and_then(|value| value.to_str().ok()).map(str::to_owned);
    let result = state.engine.confirm(bearer(&headers), id, key).await.map(ReservationView::from);
    respond(StatusCode::OK, result.map_err(ApiError::from))
}

/// Cancels a hold, or a confirmed reservation with a refund.
#[utoipa::path(post, path = "/v1/reservations/{id}/cancel", params(("id" = u64, Path)), security(("queue_token" = [])),
    responses((status = 200, body = ReservationView), (status = 409, body = super::Problem)))]
pub(super) async fn cancel(State(state): State<AppState>, ApiPath(id): ApiPath<u64>, headers: HeaderMap) -> Response {
    let result = state.engine.cancel(bearer(&headers), id).await.map(ReservationView::from);
    respond(StatusCode::OK, result.map_err(ApiError::from))
}

/// Reads one's reservation.
#[utoipa::path(get, path = "/v1/reservations/{id}", params(("id" = u64, Path)), security(("queue_token" = [])),
    responses((status = 200, body = ReservationView), (status = 404, body = super::Problem)))]
pub(super) async fn get_reservation(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<u64>,
    headers: HeaderMap,
) -> Response {
    let result = state.engine.reservation(bearer(&headers), id).await.map(ReservationView::from);
    respond(StatusCode::OK, result.map_err(ApiError::from))
}
