//! `POST /v1/events`: appends to many processes in one request.
//!
//! The appends of one request are grouped by process; each process's appends are written
//! together, in request order, all or none (one `append_events` call), and the processes are
//! written concurrently, so that group commit carries them in one statement. Every append gets
//! its own answer, in request order: one process's refusal never fails another's.

use std::collections::HashMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::ApiState;
use super::body::AdmittedBody;
use super::error::ApiError;
#[allow(unused_imports)] // named by the OpenAPI annotation
use super::openapi::ErrorBody;
use super::openapi::ErrorDetail;
use crate::model::{AppendRequest, ProcessEvent, ProcessId};

/// Most appends one request may carry.
pub const MAX_BATCH_APPENDS: usize = 1000;

/// Appends to one or more processes.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct BatchBody {
    /// 1 to 1,000 appends; several may name one process (written together, in this order).
    appends: Vec<BatchAppend>,
}

/// One append of a batch: the process and the event.
#[derive(Deserialize, ToSchema)]
pub(super) struct BatchAppend {
    /// The process: 1 to 128 characters from `[A-Za-z0-9._:-]`.
    process_id: String,
    /// The event, as for `POST /v1/processes/{id}/events`.
    #[serde(flatten)]
    event: AppendRequest,
}

/// The answer to one append of a batch: its status, and the event or the error.
#[derive(Serialize, ToSchema)]
pub struct BatchResult {
    /// As a single append would have answered: 201 appended, 200 replayed, 4xx/5xx refused.
    pub status: u16,
    /// The event as stored (when appended or replayed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<ProcessEvent>,
    /// True when it was already stored under its replay key (when appended or replayed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replayed: Option<bool>,
    /// Why it was refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
}

/// The answers to a batch, in request order.
#[derive(Serialize, ToSchema)]
pub struct BatchAnswer {
    /// One per append, in request order.
    pub results: Vec<BatchResult>,
}

fn refused(error: ApiError) -> BatchResult {
    if error.status.is_server_error() {
        tracing::error!(status = %error.status, code = error.code, message = %error.message, "answering an append of a batch with a server error");
    }
    BatchResult {
        status: error.status.as_u16(),
        event: None,
        replayed: None,
        error: Some(ErrorDetail {
            code: error.code.to_owned(),
            message: error.message,
        }),
    }
}

#[utoipa::path(
    post, path = "/v1/events", tag = "events",
    request_body = BatchBody,
    responses(
        (status = 200, description = "Every append answered, in request order, each with its own status", body = BatchAnswer),
        (status = 400, description = "Not a batch, or empty, or more than 1,000 appends (`invalid_input`, `invalid_json`, `bad_request`)", body = ErrorBody),
        (status = 401, description = "A bearer token is required (`unauthorized`)", body = ErrorBody),
        (status = 413, description = "Body too large (`payload_too_large`)", body = ErrorBody),
        (status = 415, description = "Not JSON (`unsupported_media_type`)", body = ErrorBody)
    )
)]
pub(super) async fn append_many(
    State(state): State<ApiState>,
    body: AdmittedBody,
) -> Result<Response, ApiError> {
    super::body::require_object(&body.bytes)?;
    let batch: BatchBody = serde_json::from_slice(&body.bytes).map_err(|err| {
        if err.is_data() {
            ApiError::invalid(format!(
                "expected {{\"appends\": [{{\"process_id\", \"event_type\", \"payload\", \"replay_key\"?}}, ...]}}: {err}"
            ))
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", err.to_string())
        }
    })?;
    let count = batch.appends.len();
    if count == 0 || count > MAX_BATCH_APPENDS {
        return Err(ApiError::invalid(format!(
            "a batch carries 1 to {MAX_BATCH_APPENDS} appends, got {count}"
        )));
    }
    // Each append's answer slot; appends grouped by process, in request order.
    let mut results: Vec<Option<BatchResult>> = (0..count).map(|_| None).collect();
    let mut groups: Vec<(ProcessId, Vec<usize>, Vec<AppendRequest>)> = Vec::new();
    let mut group_of: HashMap<String, usize> = HashMap::new();
    for (index, append) in batch.appends.into_iter().enumerate() {
        let id = match ProcessId::new(append.process_id.as_str()) {
            Ok(id) => id,
            Err(err) => {
                results[index] = Some(refused(err.into()));
                continue;
            }
        };
        let group = *group_of.entry(append.process_id).or_insert_with(|| {
            groups.push((id, Vec::new(), Vec::new()));
            groups.len() - 1
        });
        groups[group].1.push(index);
        groups[group].2.push(append.event);
    }
    let registry = &state.services.registry;
    let written =
        futures::future::join_all(groups.into_iter().map(|(id, slots, requests)| async move {
            (slots, registry.append_events(&id, requests).await)
        }))
        .await;
    for (slots, outcome) in written {
        match outcome {
            Ok(outcomes) => {
                for (slot, outcome) in slots.into_iter().zip(outcomes) {
                    results[slot] = Some(BatchResult {
                        status: if outcome.replayed {
                            StatusCode::OK.as_u16()
                        } else {
                            StatusCode::CREATED.as_u16()
                        },
                        event: Some(outcome.event),
                        replayed: Some(outcome.replayed),
                        error: None,
                    });
                }
            }
            Err(err) => {
                for slot in slots {
                    results[slot] = Some(refused(ApiError::from(err.clone())));
                }
            }
        }
    }
    let results = results
        .into_iter()
        .map(|result| {
            result.unwrap_or_else(|| {
                refused(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_error",
                    "no answer for this append",
                ))
            })
        })
        .collect();
    Ok((StatusCode::OK, axum::Json(BatchAnswer { results })).into_response())
}
