//! JSON errors with stable codes, and the extractors that produce them for bad requests.

use axum::extract::FromRequestParts;
use axum::extract::rejection::QueryRejection;
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::error::ProcessError;
use crate::model::ProcessId;
use crate::watch::AwaitError;

/// An API error: status, stable code, message. Rendered as
/// `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// Human-readable explanation.
    pub message: String,
}

impl ApiError {
    /// An error of `status` with `code`.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400 `invalid_input`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_input", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, code = self.code, message = %self.message, "answering a server error");
        }
        let body = json!({"error": {"code": self.code, "message": self.message}});
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<ProcessError> for ApiError {
    fn from(err: ProcessError) -> Self {
        let status = match &err {
            ProcessError::NotFound(_)
            | ProcessError::ScheduleNotFound(_)
            | ProcessError::QueueNotFound(_) => StatusCode::NOT_FOUND,
            ProcessError::Conflict { .. }
            | ProcessError::ReplayConflict { .. }
            | ProcessError::ProcessTerminal { .. }
            | ProcessError::AlreadyTerminal { .. }
            | ProcessError::StartRefused { .. }
            | ProcessError::LeaseLost { .. } => StatusCode::CONFLICT,
            ProcessError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProcessError::InvalidInput(_) => StatusCode::BAD_REQUEST,
            ProcessError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProcessError::Database(_) | ProcessError::Undecodable { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        Self::new(status, err.code(), err.to_string())
    }
}

impl From<AwaitError> for ApiError {
    fn from(err: AwaitError) -> Self {
        match err {
            AwaitError::NotFound(id) => ProcessError::NotFound(id).into(),
            AwaitError::Timeout { .. } => {
                Self::new(StatusCode::REQUEST_TIMEOUT, "timeout", err.to_string())
            }
            AwaitError::Unavailable { .. } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                err.to_string(),
            ),
            AwaitError::Stopped => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                err.to_string(),
            ),
        }
    }
}

/// `axum::extract::Query` whose rejections are [`ApiError`]s.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Self(q.0))
            .map_err(|rejection: QueryRejection| ApiError::invalid(rejection.body_text()))
    }
}

/// `415 unsupported_media_type` unless the request says its body is JSON
/// (`application/json`, or a `+json` type), as `axum::Json` requires.
pub fn require_json(headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
    let json = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .map(|mime| mime.trim().to_ascii_lowercase())
        .is_some_and(|mime| {
            mime == "application/json"
                || (mime.starts_with("application/") && mime.ends_with("+json"))
        });
    if json {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "expected Content-Type: application/json",
        ))
    }
}

/// Parses a process id from a path segment.
pub fn path_id(raw: &str) -> Result<ProcessId, ApiError> {
    ProcessId::new(raw).map_err(ApiError::from)
}
