//! The pod's HTTP API (JSON under `/v1`), health, readiness and Prometheus metrics.
//!
//! Errors are `{"error": {"code", "message"}}` with stable codes: 400 `invalid_input` /
//! `invalid_json`, 401 `unauthorized`, 404 `not_found`, 408 `timeout` (await), 409 `conflict`,
//! `replay_conflict`, `process_terminal`, `already_terminal`, `lease_lost`, 413
//! `payload_too_large`, 415 `unsupported_media_type`, 503 `unavailable`, 500 `database_error`.

mod error;
mod metrics;
mod routes;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

pub use error::ApiError;

use crate::pg::ListenerStatus;
use crate::pod::WorkerStats;
use crate::pod_services::PodServices;

/// Default request body limit (a batch of events fits; one payload is limited separately).
pub const DEFAULT_MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// The pod's registry and freshness stack.
    pub services: Arc<PodServices>,
    /// The worker's counters, when this pod runs a worker.
    pub worker: Option<Arc<WorkerStats>>,
    /// Bearer token required on `/v1` when set.
    pub token: Option<Arc<str>>,
}

/// The whole router: `/v1/...` (behind the optional token), `/healthz`, `/readyz`, `/metrics`.
pub fn router(state: ApiState, max_body_bytes: usize) -> Router {
    let v1 = Router::new()
        .route("/processes", post(routes::register).get(routes::list))
        .route("/processes/{id}", get(routes::get))
        .route(
            "/processes/{id}/events",
            post(routes::append).get(routes::events),
        )
        .route("/processes/{id}/stream", get(routes::stream))
        .route("/processes/{id}/complete", post(routes::complete))
        .route("/processes/{id}/cancel", post(routes::cancel))
        .route("/processes/{id}/await", get(routes::await_terminal))
        .route("/prune", post(routes::prune))
        .layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .nest("/v1", v1)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics::render))
        .fallback(no_route)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from timings.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn require_token(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    if let Some(expected) = &state.token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        let authorized =
            given.is_some_and(|given| same_secret(given.as_bytes(), expected.as_bytes()));
        if !authorized {
            let mut response = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid bearer token is required",
            )
            .into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("static"));
            return response;
        }
    }
    next.run(request).await
}

async fn no_route() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no_route", "no such endpoint")
}

/// How long `/readyz` waits for the database before answering 503.
pub const READINESS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Liveness: the process serves requests. Never touches the database, so an orchestrator
/// never restarts a pod for the database's fault.
async fn healthz() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

/// Ready when the database answers within [`READINESS_TIMEOUT`], its schema is the one this
/// binary knows, and the listener is listening (or has knowingly fallen back to polling).
/// Answers 503 within that bound whatever the database does (down, stalled, blackholed).
async fn readyz(State(state): State<ApiState>) -> Response {
    let schema = tokio::time::timeout(
        READINESS_TIMEOUT,
        crate::pg::migrate::schema_version(&state.services.pool),
    )
    .await
    .unwrap_or_else(|_| {
        Err(crate::ProcessError::Unavailable(format!(
            "no answer from the database within {READINESS_TIMEOUT:?}"
        )))
    });
    let listener = state.services.listener.status();
    let latest = crate::pg::migrate::latest_version();
    let database_ok = matches!(schema, Ok(v) if v == latest);
    let listener_ok = matches!(
        listener,
        ListenerStatus::Listening | ListenerStatus::Polling { .. }
    );
    let body = json!({
        "ready": database_ok && listener_ok,
        "pod": state.services.pod_id,
        "database": match &schema {
            Ok(v) if *v == latest => json!({"ok": true, "schema_version": v}),
            Ok(v) => json!({"ok": false, "schema_version": v, "expected": latest}),
            Err(err) => json!({"ok": false, "error": err.to_string()}),
        },
        "listener": format!("{listener:?}"),
    });
    let status = if database_ok && listener_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}
