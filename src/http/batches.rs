//! `POST /v1/events`: appends to many processes in one request.
//!
//! A request that breaks a rule of its own (an empty or too long list, a malformed process
//! id, event type or replay key, two appends to one process with different lease fences or
//! one replay key) is refused whole with 400, naming the append, and writes nothing. Otherwise
//! the appends are grouped by process; each process's appends are written together, in
//! request order, all or none (one `append_events` call), and the processes are written
//! concurrently, so that group commit carries them in one statement. Every append then gets
//! its own answer, in request order: what the process's state decided (not found, ended, a
//! lost lease, a replay) for one process never fails another's.

use std::collections::HashMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::ApiState;
use super::body::AdmittedBody;
use super::error::ApiError;
use super::openapi::{ErrorBody, ErrorDetail};
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

/// The rules one append must keep whatever the state of its process; the error names it.
fn check(index: usize, append: &BatchAppend) -> Result<ProcessId, ApiError> {
    let at = |err: crate::error::ProcessError| {
        let mut err = ApiError::from(err);
        err.message = format!("appends[{index}]: {}", err.message);
        err
    };
    let id = ProcessId::new(append.process_id.as_str()).map_err(at)?;
    crate::validate::user_event_type(&append.event.event_type).map_err(at)?;
    if let Some(key) = &append.event.replay_key {
        crate::validate::caller_replay_key(key).map_err(at)?;
    }
    Ok(id)
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
        (status = 200, description = "Every append answered, in request order, each with its own status (a 5xx there may or may not have been written: retry it with its replay key)", body = BatchAnswer),
        (status = 400, description = "Not a batch, empty, more than 1,000 appends, or an append that breaks a rule (`invalid_input`, `invalid_json`, `bad_request`): nothing written", body = ErrorBody),
        (status = 401, description = "A bearer token is required (`unauthorized`)", body = ErrorBody),
        (status = 413, description = "Body too large (`payload_too_large`)", body = ErrorBody),
        (status = 415, description = "Not JSON (`unsupported_media_type`)", body = ErrorBody)
    )
)]
pub(super) async fn append_many(
    State(state): State<ApiState>,
    body: AdmittedBody,
) -> Result<Response, ApiError> {
    let batch: BatchBody = body.parse_expecting(
        "{\"appends\": [{\"process_id\", \"event_type\", \"payload\", \"replay_key\"?}, ...]}",
    )?;
    let count = batch.appends.len();
    if count == 0 || count > MAX_BATCH_APPENDS {
        return Err(ApiError::invalid(format!(
            "a batch carries 1 to {MAX_BATCH_APPENDS} appends, got {count}"
        )));
    }
    // Appends grouped by process, in request order, each with its place in the request.
    let mut groups: Vec<(ProcessId, Vec<usize>, Vec<AppendRequest>)> = Vec::new();
    let mut group_of: HashMap<String, usize> = HashMap::new();
    for (index, append) in batch.appends.into_iter().enumerate() {
        let id = check(index, &append)?;
        let group = *group_of.entry(append.process_id).or_insert_with(|| {
            groups.push((id, Vec::new(), Vec::new()));
            groups.len() - 1
        });
        let (id, slots, requests) = &mut groups[group];
        if let Some(first) = requests.first() {
            if first.fence != append.event.fence {
                return Err(ApiError::invalid(format!(
                    "appends[{index}]: the appends to {id} in one request are written together \
                     and must carry the same lease fence as appends[{}]",
                    slots[0]
                )));
            }
            if let Some(key) = &append.event.replay_key
                && requests.iter().any(|r| r.replay_key.as_ref() == Some(key))
            {
                return Err(ApiError::invalid(format!(
                    "appends[{index}]: replay key {key:?} is given twice for {id} in this request"
                )));
            }
        }
        slots.push(index);
        requests.push(append.event);
    }
    let registry = &state.services.registry;
    let written =
        futures::future::join_all(groups.into_iter().map(|(id, slots, requests)| async move {
            (slots, registry.append_events(&id, requests).await)
        }))
        .await;
    // Every append is in exactly one group: one answer each, put back in request order.
    let mut answered: Vec<(usize, BatchResult)> = Vec::with_capacity(count);
    for (slots, outcome) in written {
        match outcome {
            Ok(outcomes) => {
                answered.extend(slots.into_iter().zip(outcomes).map(|(slot, outcome)| {
                    let status = if outcome.replayed {
                        StatusCode::OK
                    } else {
                        StatusCode::CREATED
                    };
                    let result = BatchResult {
                        status: status.as_u16(),
                        event: Some(outcome.event),
                        replayed: Some(outcome.replayed),
                        error: None,
                    };
                    (slot, result)
                }))
            }
            Err(err) => answered.extend(
                slots
                    .into_iter()
                    .map(|slot| (slot, refused(ApiError::from(err.clone())))),
            ),
        }
    }
    answered.sort_unstable_by_key(|(slot, _)| *slot);
    let results = answered.into_iter().map(|(_, result)| result).collect();
    Ok((StatusCode::OK, axum::Json(BatchAnswer { results })).into_response())
}
