//! The pod's HTTP API (JSON under `/v1`), health, readiness and Prometheus metrics.
//!
//! Errors are `{"error": {"code", "message"}}` with stable codes: 400 `invalid_input` /
//! `invalid_json`, 401 `unauthorized`, 404 `not_found`, 408 `timeout` (await), 409 `conflict`,
//! `replay_conflict`, `process_terminal`, `already_terminal`, `lease_lost`, 413
//! `payload_too_large`, 415 `unsupported_media_type`, 503 `unavailable`, 500 `database_error`.

mod batches;
pub mod body;
mod console;
mod console_queues;
mod console_schedules;
mod error;
pub mod guard;
mod metrics;
pub mod openapi;
mod queues;
mod routes;
mod schedules;
pub mod server;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::FutureExt;
use serde_json::json;

pub use error::ApiError;
pub use guard::AccessPolicy;
pub use server::{HttpServer, ServerLimits, ServerStats};

use crate::pg::ListenerStatus;
use crate::pod::WorkerStats;
use crate::pod_services::PodServices;

/// Default request body limit (a batch of events fits; one payload is limited separately).
pub const DEFAULT_MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
/// Default cap on long-lived requests (event streams and awaits) served at once.
pub const DEFAULT_MAX_STREAMS: usize = 256;
/// Default memory budget of request bodies being read and parsed at once (see [`body`]).
pub const DEFAULT_REQUEST_MEMORY_BYTES: usize = 64 * 1024 * 1024;

/// Settings of a pod's HTTP API and its server.
#[derive(Clone, Debug)]
pub struct HttpOptions {
    /// Bearer token required on `/v1` (and the console's sign-in) when set.
    pub token: Option<String>,
    /// The largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Memory for request bodies being read and parsed at once, in bytes (at least
    /// `max_body_bytes`): see [`body`].
    pub request_memory_bytes: usize,
    /// Most event streams and awaits served at once; past it they are answered
    /// `503 too_many_streams`.
    pub max_streams: usize,
    /// Connections, header and body timeouts.
    pub limits: ServerLimits,
    /// Hosts, origins and cookies.
    pub access: AccessPolicy,
    /// Whether the console offers its form that starts a demo process (the demo engines run
    /// on this pod).
    pub demo_form: bool,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            token: None,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            request_memory_bytes: DEFAULT_REQUEST_MEMORY_BYTES,
            max_streams: DEFAULT_MAX_STREAMS,
            limits: ServerLimits::default(),
            access: AccessPolicy::default(),
            demo_form: false,
        }
    }
}

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// The pod's registry and freshness stack.
    pub services: Arc<PodServices>,
    /// The worker's counters, when this pod runs a worker.
    pub worker: Option<Arc<WorkerStats>>,
    /// Bearer token required on `/v1` when set.
    pub token: Option<Arc<str>>,
    /// Permits for long-lived requests (streams, awaits).
    pub streams: Arc<tokio::sync::Semaphore>,
    /// How many permits `streams` started with.
    pub stream_capacity: usize,
    /// Hosts, origins and cookies.
    pub access: Arc<AccessPolicy>,
    /// The server's connection counters.
    pub server: Arc<ServerStats>,
    /// Whether the console offers to start a demo process.
    pub demo_form: bool,
    /// The largest request body, in bytes.
    pub max_body_bytes: usize,
    /// The memory budget of request bodies.
    pub bodies: body::BodyBudget,
}

impl ApiState {
    /// The state of an API over `services` (and the worker's counters, if it runs one).
    pub fn new(
        services: Arc<PodServices>,
        worker: Option<Arc<WorkerStats>>,
        options: &HttpOptions,
    ) -> Self {
        Self {
            services,
            worker,
            token: options.token.as_deref().map(Arc::from),
            streams: Arc::new(tokio::sync::Semaphore::new(options.max_streams)),
            stream_capacity: options.max_streams,
            access: Arc::new(options.access.clone()),
            server: Arc::new(ServerStats::default()),
            demo_form: options.demo_form,
            max_body_bytes: options.max_body_bytes,
            bodies: body::BodyBudget::new(options.request_memory_bytes.max(options.max_body_bytes)),
        }
    }

    /// A permit for one long-lived request, or `503 too_many_streams` when all are taken.
    pub(crate) fn stream_permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        Arc::clone(&self.streams).try_acquire_owned().map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_streams",
                "this pod serves as many streams and awaits as it may; retry shortly or ask another pod",
            )
        })
    }
}

/// The whole router: `/v1/...` (behind the optional token), `/healthz`, `/readyz`, `/metrics`.
pub fn router(state: ApiState, max_body_bytes: usize) -> Router {
    let v1 = Router::new()
        .route("/processes", post(routes::register).get(routes::list))
        .route("/processes/{id}", get(routes::get))
        .route("/processes/{id}/children", get(routes::children))
        .route(
            "/processes/{id}/events",
            post(routes::append).get(routes::events),
        )
        .route("/events", post(batches::append_many))
        .route("/processes/{id}/stream", get(routes::stream))
        .route("/processes/{id}/complete", post(routes::complete))
        .route("/processes/{id}/cancel", post(routes::cancel))
        .route("/processes/{id}/messages", post(routes::send_message))
        .route("/processes/{id}/await", get(routes::await_terminal))
        .route("/prune", post(routes::prune))
        .route("/schedules", post(schedules::create).get(schedules::list))
        .route(
            "/schedules/{id}",
            get(schedules::get).delete(schedules::delete),
        )
        .route("/schedules/{id}/pause", post(schedules::pause))
        .route("/schedules/{id}/resume", post(schedules::resume))
        .route("/schedules/{id}/trigger", post(schedules::trigger))
        .route("/queues", get(queues::list))
        .route(
            "/queues/{queue}",
            get(queues::get).put(queues::set).delete(queues::delete),
        )
        .route("/pods", get(routes::pods))
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        // The description of the API is public, also when a token guards the API itself.
        .route("/openapi.json", get(openapi_json));
    let console = Router::new()
        .route("/", get(console::overview))
        .route("/ui/processes/{id}", get(console::process_page))
        .route("/ui/processes/{id}/cancel", post(console::cancel))
        .route("/ui/processes/{id}/messages", post(console::send_message))
        .route("/ui/schedules", get(console_schedules::schedules_page))
        .route("/ui/queues", get(console_queues::queues_page))
        .route(
            "/ui/schedules/{id}/{action}",
            post(console_schedules::schedule_action),
        )
        .route("/ui/demo", post(console::start_demo))
        .route("/ui/logout", post(console::logout))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            console::require_console_token,
        ))
        .route("/ui/login", get(console::login_form).post(console::login))
        .route("/ui/assets/{file}", get(console::asset));
    let access = Arc::clone(&state.access);
    let mut router = Router::new()
        .nest("/v1", v1)
        .merge(console)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics::render))
        // After routing, so each request is recorded under its route's template.
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            metrics::record_http,
        ))
        .fallback(no_route)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::map_response(json_errors))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&access),
            guard::guard,
        ));
    if !access.allowed_origins.is_empty() {
        router = router.layer(guard::cors(&access));
    }
    router
        .layer(middleware::from_fn(catch_panic))
        .with_state(state)
}

/// A handler that panics answers a logged 500 in the JSON error format instead of dropping the
/// connection. (Handlers are written not to panic; this is the net under them.)
async fn catch_panic(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    match AssertUnwindSafe(next.run(request)).catch_unwind().await {
        Ok(response) => response,
        Err(panic) => {
            let cause = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown".into());
            tracing::error!(%method, %path, %cause, "a handler panicked");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "the request failed inside the pod; it is logged",
            )
            .into_response()
        }
    }
}

/// Every non-2xx answer is `{"error": {"code", "message"}}`: answers made by the framework
/// (a wrong method, a malformed path, a body over the limit) are rewritten into that format,
/// keeping their status and headers (`Allow` on 405).
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| {
            // JSON, or a console page that explains the error itself.
            value.as_bytes().starts_with(b"application/json")
                || value.as_bytes().starts_with(b"text/html")
        });
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let detail = axum::body::to_bytes(body, 4096)
        .await
        .ok()
        .map(|bytes| String::from_utf8_lossy(&bytes).trim().to_owned())
        .filter(|text| !text.is_empty());
    let (code, default) = match status {
        StatusCode::METHOD_NOT_ALLOWED => {
            ("method_not_allowed", "method not allowed on this endpoint")
        }
        StatusCode::PAYLOAD_TOO_LARGE => ("payload_too_large", "request body exceeds the limit"),
        StatusCode::NOT_FOUND => ("no_route", "no such endpoint"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => {
            ("unsupported_media_type", "unsupported content type")
        }
        s if s.is_server_error() => ("internal_error", "the request failed inside the pod"),
        _ => ("bad_request", "malformed request"),
    };
    let message = detail.unwrap_or_else(|| default.to_owned());
    if status.is_server_error() {
        tracing::error!(%status, %message, "answering a server error");
    }
    let rewritten = ApiError::new(status, code, message).into_response();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    let (_, body) = rewritten.into_parts();
    Response::from_parts(parts, body)
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
        // The scheme is case-insensitive (RFC 9110 §11.1).
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim_start().as_bytes().to_vec());
        let mut authorized = given.is_some_and(|given| same_secret(&given, expected.as_bytes()));
        // The console's session cookie opens reads only (its pages stream events with it):
        // a write must carry the token itself.
        if !authorized && matches!(*request.method(), axum::http::Method::GET) {
            authorized = console::cookie_token(request.headers())
                .is_some_and(|given| console::session_valid(expected, &given));
        }
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

async fn openapi_json() -> impl IntoResponse {
    axum::Json(openapi::document())
}

/// How long `/readyz` waits for the database before answering 503.
pub const READINESS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Liveness: the process serves requests. Never touches the database, so an orchestrator
/// never restarts a pod for the database's fault.
#[utoipa::path(
    get, path = "/healthz", tag = "health",
    responses((status = 200, description = "The pod serves requests", body = Object, example = json!({"status": "ok"})))
)]
async fn healthz() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

/// Ready when the database answers within [`READINESS_TIMEOUT`], its schema is the one this
/// binary knows, and the listener is listening (or has knowingly fallen back to polling).
/// Answers 503 within that bound whatever the database does (down, stalled, blackholed).
#[utoipa::path(
    get, path = "/readyz", tag = "health",
    responses(
        (status = 200, description = "Ready", body = openapi::Readiness),
        (status = 503, description = "Not ready: the body says why", body = openapi::Readiness)
    )
)]
async fn readyz(State(state): State<ApiState>) -> Response {
    let schema = tokio::time::timeout(READINESS_TIMEOUT, state.services.cluster.schema_version())
        .await
        .unwrap_or_else(|_| {
            Err(crate::ProcessError::Unavailable(format!(
                "no answer from the database within {READINESS_TIMEOUT:?}"
            )))
        });
    let listener = state.services.link.status();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves `router` on a free loopback port; returns its base URL.
    async fn serve(router: Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(axum::serve(listener, router).into_future());
        base
    }

    async fn boom() -> &'static str {
        let bug: Vec<&'static str> = Vec::new();
        bug[std::hint::black_box(0)]
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_a_json_500_and_the_server_lives_on() {
        let router = Router::new()
            .route("/boom", get(boom))
            .route("/fine", get(|| async { "ok" }))
            .layer(middleware::map_response(json_errors))
            .layer(middleware::from_fn(catch_panic));
        let base = serve(router).await;
        let client = reqwest::Client::new();
        let response = client.get(format!("{base}/boom")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "internal_error");
        let fine = client.get(format!("{base}/fine")).send().await.unwrap();
        assert_eq!(fine.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn framework_answers_are_rewritten_into_the_error_format() {
        let router = Router::new()
            .route("/only-get", get(|| async { "ok" }))
            .route(
                "/plain",
                get(|| async { (StatusCode::BAD_REQUEST, "plain text refusal") }),
            )
            .layer(middleware::map_response(json_errors));
        let base = serve(router).await;
        let client = reqwest::Client::new();
        let response = client
            .post(format!("{base}/only-get"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()["allow"], "GET,HEAD");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "method_not_allowed");
        let response = client.get(format!("{base}/plain")).send().await.unwrap();
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "bad_request");
        assert_eq!(body["error"]["message"], "plain text refusal");
    }
}
