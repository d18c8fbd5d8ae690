//! The admin API under `/admin/v1`, behind named bearer tokens: the snapshot the ops agent
//! reads, and the bounded tools it may call. Every call is audited under its token's name.

use std::net::IpAddr;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use super::admin_auth::Refusal;
use super::{ApiError, ApiJson, ApiPath, ApiQuery, AppState, bearer, respond};
use crate::agent::DecisionRecord;
use crate::config::RateLimits;
use crate::engine::{AdmissionChange, ExportPart, Snapshot};
use crate::store::AuditEntry;

/// The most audit entries one call returns.
const AUDIT_PAGE_MAX: u32 = 1_000;
/// The most records one export page holds.
const EXPORT_PAGE_MAX: u32 = 10_000;

pub(super) fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/snapshot", get(snapshot))
        .route("/schedules/{id}/admission", put(set_admission))
        .route("/rate-limits", put(set_rate_limits))
        .route("/blocks", post(block))
        .route("/blocks/{ip}", delete(unblock))
        .route("/user-blocks", post(block_user))
        .route("/user-blocks/{user_id}", delete(unblock_user))
        .route("/hold-ttl", put(set_hold_ttl))
        .route("/users/{id}/points", post(top_up))
        .route("/seat-limit", put(set_seat_limit))
        .route("/audit", get(audit))
        .route("/export/{part}", get(export))
        .route("/decisions", post(record_decision))
        .route_layer(middleware::from_fn_with_state(state, authenticate))
}

/// 401 without a bearer token, 403 with a wrong one, 429 from an IP locked out after too many
/// wrong ones (see [`super::admin_auth`]); the token's name becomes the call's [`Actor`].
async fn authenticate(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let ip = super::gateway::client_ip(&state, &request);
    let refusal = match state.admin_auth.authenticate(ip, bearer(request.headers())) {
        Ok(name) => {
            let actor = Actor(name.to_owned());
            request.extensions_mut().insert(actor);
            return next.run(request).await;
        }
        Err(refusal) => refusal,
    };
    let error = match refusal {
        Refusal::Missing => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "admin_unauthorized",
            "the admin API needs `Authorization: Bearer <admin token>`",
        ),
        Refusal::Wrong => ApiError::new(StatusCode::FORBIDDEN, "admin_forbidden", "the admin token is wrong"),
        Refusal::Locked { retry_after_s } => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "admin_auth_locked",
            "too many wrong admin tokens from this address; try again later",
        )
        .retry_after(retry_after_s),
    };
    state.engine.telemetry().record_rejection(error.code);
    let mut response = error.into_response();
    if refusal == Refusal::Missing {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    }
    response
}

/// Who makes an admin call, as the audit log names it: the name of the admin token that
/// authenticated it. No header can name anyone else.
#[derive(Debug, Clone)]
pub(super) struct Actor(String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Actor {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, Self::Rejection> {
        // Every admin route is behind `authenticate`, which puts the actor there.
        parts
            .extensions
            .get::<Actor>()
            .cloned()
            .ok_or_else(|| ApiError::internal("an admin route ran without authentication"))
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct BlockRequest {
    #[schema(value_type = String)]
    ip: IpAddr,
    #[schema(minimum = 1, maximum = 86_400)]
    ttl_s: u64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct UserBlockRequest {
    /// The user, as their sessions name them.
    #[schema(minimum = 1)]
    user_id: u64,
    #[schema(minimum = 1, maximum = 86_400)]
    ttl_s: u64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct HoldTtl {
    #[schema(minimum = 10, maximum = 3_600)]
    ttl_s: u64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct TopUp {
    #[schema(minimum = 1, maximum = 10_000_000)]
    amount: u64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct SeatLimit {
    /// The most seats one user may hold or buy per schedule.
    #[schema(minimum = 1, maximum = 100)]
    seats_per_user_max: u32,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct AuditQuery {
    /// How many of the newest entries (at most 1000).
    #[param(minimum = 1, maximum = 1000, nullable = false)]
    limit: Option<u32>,
}

/// Rates, latencies, error rates, lines, top talkers and users, blocks and store latency of
/// this node.
#[utoipa::path(get, path = "/admin/v1/snapshot", security(("admin_token" = [])), responses((status = 200, body = Snapshot)))]
pub(super) async fn snapshot(State(state): State<AppState>) -> Response {
    respond(StatusCode::OK, state.engine.snapshot().await.map_err(ApiError::from))
}

/// Sets a line's admission rate, active maximum and pause.
#[utoipa::path(put, path = "/admin/v1/schedules/{id}/admission", params(("id" = u64, Path)), request_body = AdmissionChange,
    security(("admin_token" = [])), responses((status = 200, description = "The line's admission policy after the change.", body = Object),
        (status = 404, description = "`not_found`: no such schedule.", body = super::Problem),
        (status = 422, description = "`out_of_bounds`: a value beyond its bounds.", body = super::Problem)))]
pub(super) async fn set_admission(
    State(state): State<AppState>,
    Actor(actor): Actor,
    ApiPath(id): ApiPath<u64>,
    ApiJson(change): ApiJson<AdmissionChange>,
) -> Response {
    respond(StatusCode::OK, state.engine.set_admission(&actor, id, change).await.map_err(ApiError::from))
}

/// Sets the per-IP and per-token rate limits.
#[utoipa::path(put, path = "/admin/v1/rate-limits", request_body = RateLimits,
    security(("admin_token" = [])), responses((status = 200, description = "The limits after the change.", body = Object),
        (status = 422, description = "`out_of_bounds`: a value beyond its bounds.", body = super::Problem)))]
pub(super) async fn set_rate_limits(
    State(state): State<AppState>,
    Actor(actor): Actor,
    ApiJson(limits): ApiJson<RateLimits>,
) -> Response {
    respond(StatusCode::OK, state.engine.set_rate_limits(&actor, limits).await.map_err(ApiError::from))
}

/// Blocks an IP for a while.
#[utoipa::path(post, path = "/admin/v1/blocks", request_body = BlockRequest,
    security(("admin_token" = [])), responses((status = 200, description = "The address and when its block ends.", body = Object),
        (status = 422, description = "`out_of_bounds`: a TTL beyond its bounds; `validation_failed`: the blocklist is full.", body = super::Problem)))]
pub(super) async fn block(
    State(state): State<AppState>,
    Actor(actor): Actor,
    ApiJson(body): ApiJson<BlockRequest>,
) -> Response {
    // One address, one form: the audit log and the answer name the one the guards key by.
    let ip = body.ip.to_canonical();
    respond(StatusCode::OK, state.engine.block(&actor, ip, body.ttl_s).await.map_err(ApiError::from))
}

/// Lifts a block.
#[utoipa::path(delete, path = "/admin/v1/blocks/{ip}", params(("ip" = String, Path, description = "An IPv4 or IPv6 address.")),
    security(("admin_token" = [])), responses((status = 200, description = "The address, no longer blocked.", body = Object),
        (status = 404, description = "`not_found`: the address is not blocked.", body = super::Problem)))]
pub(super) async fn unblock(
    State(state): State<AppState>,
    Actor(actor): Actor,
    ApiPath(ip): ApiPath<IpAddr>,
) -> Response {
    respond(StatusCode::OK, state.engine.unblock(&actor, ip.to_canonical()).await.map_err(ApiError::from))
}

/// Blocks a user for a while: every public request their session names is refused (403
/// `user_blocked`), from whatever address; the others behind their address are served.
#[utoipa::path(post, path = "/admin/v1/user-blocks", request_body = UserBlockRequest,
    security(("admin_token" = [])), responses((status = 200, description = "The user and when their block ends.", body = Object),
        (status = 422, description = "`out_of_bounds`: a TTL beyond its bounds; `validation_failed`: the user blocklist is full.", body = super::Problem)))]
pub(super) async fn block_user(
    State(state): State<AppState>,
    Actor(actor): Actor,
    ApiJson(body): ApiJson<UserBlockRequest>,
) -> Response {
    respond(StatusCode::OK, state.engine.block_user(&actor, body.user_id, body.ttl_s).await.map_err(ApiError::from))
}

/// Lifts a user's block.
#[utoipa::path(delete, path = "/admin/v1/user-blocks/{user_id}", params(("user_id" = u64, Path)),
    security(("admin_token" = [])), responses((status = 200, description = "The user, no longer blocked.", body = Object),
        (status = 404, description = "`not_found`: the user is not blocked.", body = super::Problem)))]
pub(super) async fn unblock_user(
    State(state): State<AppState>,
    Actor(actor): Actor,
    ApiPath(user_id): ApiPath<u64>,
) -> Response {
    respond(StatusCode::OK, state.engine.unblock_user(&actor, user_id).await.map_err(ApiError::from))
}

/// Sets the TTL of new holds.
#[utoipa::path(put, path = "/admin/v1/hold-ttl", request_body = HoldTtl,
    security(("admin_token" = [])), responses((status = 200, description = "The TTL after the change.", body = Object),
        (status = 422, description = "`out_of_bounds`: a TTL beyond its bounds.", body = super::Problem)))]
pub(super) async fn set_hold_ttl(
    State(state): State<AppState>,
    Actor(actor): Actor,
    ApiJson(body): ApiJson<HoldTtl>,
) -> Response {
    respond(StatusCode::OK, state.engine.set_hold_ttl(&actor, body.ttl_s).await.map_err(ApiError::from))
}

/// Adds points to an account (a refund by hand, a goodwill credit); needs an
/// `Idempotency-Key`, and adds once per key.
#[utoipa::path(post, path = "/admin/v1/users/{id}/points", params(("id" = u64, Path)), request_body = TopUp,
    security(("admin_token" = [])),
    responses((status = 200, body = super::public::UserView),
        (status = 400, description = "`idempotency_key_required`: no usable Idempotency-Key.", body = super::Problem),
        (status = 404, description = "`not_found`: no such user.", body = super::Problem),
        (status = 409, description = "`top_up_key_reused`: this Idempotency-Key added points to another account.", body = super::Problem),
        (status = 422, description = "`out_of_bounds`: an amount beyond its bounds; `invalid_amount`: the balance would overflow.", body = super::Problem)))]
pub(super) async fn top_up(
    State(state): State<AppState>,
    Actor(actor): Actor,
    ApiPath(id): ApiPath<u64>,
    headers: axum::http::HeaderMap,
    ApiJson(body): ApiJson<TopUp>,
) -> Response {
    let key = headers.get(super::idempotency::IDEMPOTENCY_KEY).and_then(|value| value.to_str().ok());
    let Some(key) = key.filter(|key| super::idempotency::is_valid_key(key.as_bytes())) else {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "idempotency_key_required",
            "a top-up needs an Idempotency-Key header of 1 to 255 characters",
        )
        .into_response();
    };
    let result = state.engine.top_up(&actor, id, body.amount, format!("admin:{key}")).await;
    respond(StatusCode::OK, result.map(super::public::UserView::from).map_err(ApiError::from))
}

/// Sets the most seats one user may hold or buy per schedule, for new holds on this node.
#[utoipa::path(put, path = "/admin/v1/seat-limit", request_body = SeatLimit,
    security(("admin_token" = [])), responses((status = 200, description = "The cap after the change.", body = Object),
        (status = 422, description = "`out_of_bounds`: a cap beyond its bounds.", body = super::Problem)))]
pub(super) async fn set_seat_limit(
    State(state): State<AppState>,
    Actor(actor): Actor,
    ApiJson(body): ApiJson<SeatLimit>,
) -> Response {
    respond(StatusCode::OK, state.engine.set_seat_limit(&actor, body.seats_per_user_max).await.map_err(ApiError::from))
}

/// The audit log: when, what, value before and after.
#[utoipa::path(get, path = "/admin/v1/audit", params(AuditQuery),
    security(("admin_token" = [])), responses((status = 200, body = [AuditEntry]),
        (status = 422, description = "`out_of_bounds`: a limit beyond 1000.", body = super::Problem)))]
pub(super) async fn audit(State(state): State<AppState>, ApiQuery(query): ApiQuery<AuditQuery>) -> Response {
    let limit = query.limit.unwrap_or(100);
    if !(1..=AUDIT_PAGE_MAX).contains(&limit) {
        return ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "out_of_bounds", "limit must be in 1..=1000")
            .into_response();
    }
    respond(StatusCode::OK, state.engine.audit_log(limit).await.map_err(ApiError::from))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct ExportQuery {
    /// How many records to skip: 0, then the `next` of the page before.
    #[param(minimum = 0, nullable = false)]
    after: Option<u64>,
    /// How many records one page holds (at most 10000).
    #[param(minimum = 1, maximum = 10000, nullable = false)]
    limit: Option<u32>,
}

/// One page of an export.
#[derive(Debug, serde::Serialize, ToSchema)]
pub(super) struct ExportPage {
    part: ExportPart,
    /// The records, as the stores keep them.
    #[schema(value_type = Vec<Object>)]
    items: Vec<serde_json::Value>,
    /// The `after` of the next page; absent on the last.
    #[schema(minimum = 1)]
    next: Option<u64>,
}

/// One part of the state (the system of record's schedules, accounts, ledger, reservations,
/// accepted fences and outbox, or the cache store's admissions), page by page: read-only, for
/// checking a run against what its clients were told.
#[utoipa::path(get, path = "/admin/v1/export/{part}", params(("part" = ExportPart, Path), ExportQuery),
    security(("admin_token" = [])), responses((status = 200, body = ExportPage),
        (status = 422, description = "`out_of_bounds`: a limit beyond 10000.", body = super::Problem)))]
pub(super) async fn export(
    State(state): State<AppState>,
    ApiPath(part): ApiPath<ExportPart>,
    ApiQuery(query): ApiQuery<ExportQuery>,
) -> Response {
    let limit = query.limit.unwrap_or(1_000);
    if !(1..=EXPORT_PAGE_MAX).contains(&limit) {
        return ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "out_of_bounds", "limit must be in 1..=10000")
            .into_response();
    }
    let after = usize::try_from(query.after.unwrap_or(0)).unwrap_or(usize::MAX);
    let page = state.engine.export(part).await.map(|records| {
        let end = after.saturating_add(limit as usize);
        let next = (end < records.len()).then_some(end as u64);
        let items = records.into_iter().skip(after).take(limit as usize).collect();
        ExportPage { part, items, next }
    });
    respond(StatusCode::OK, page.map_err(ApiError::from))
}

/// Writes an ops agent's decision (what it saw, why, what it did) to the audit log.
#[utoipa::path(post, path = "/admin/v1/decisions", request_body = crate::agent::DecisionRecord,
    security(("admin_token" = [])), responses((status = 200, description = "`{\"recorded\": true}`", body = Object)))]
pub(super) async fn record_decision(
    State(state): State<AppState>,
    Actor(actor): Actor,
    ApiJson(decision): ApiJson<DecisionRecord>,
) -> Response {
    state.engine.record_decision(&actor, &decision).await;
    (StatusCode::OK, axum::Json(serde_json::json!({ "recorded": true }))).into_response()
}
