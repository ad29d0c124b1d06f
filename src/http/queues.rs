//! The `/v1/queues` handlers: list, read (with the load of its keys), set and remove a
//! queue's limits, at run time (CONTRACT §10; the rules are in [`crate::queue`]).

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::ApiState;
use super::body::AdmittedBody;
use super::error::{ApiError, ApiQuery};
use super::openapi::ErrorBody;
use crate::error::ProcessError;
use crate::queue::{QueueLimits, QueueRecord, QueueView};

/// One page of the controlled queues.
#[derive(Serialize, ToSchema)]
pub struct QueueList {
    /// Queues with limits, by name.
    pub queues: Vec<QueueRecord>,
    /// Pass as `after` for the next page; absent on the last.
    pub next_after: Option<String>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct QueueQuery {
    /// The last name of the previous page.
    after: Option<String>,
    /// Page size: 1 to 100 (default 100).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<u32>,
}

fn queue_name(raw: &str) -> Result<String, ApiError> {
    crate::queue::queue_name(raw)?;
    Ok(raw.to_owned())
}

#[utoipa::path(
    get, path = "/v1/queues", tag = "queues",
    params(QueueQuery),
    responses(
        (status = 200, description = "One page of the queues with limits, by name", body = QueueList),
        (status = 400, description = "Invalid input (`invalid_input`, `bad_request`)", body = ErrorBody),
        (status = 401, description = "A bearer token is required (`unauthorized`)", body = ErrorBody),
        (status = 503, description = "Database unavailable (`unavailable`)", body = ErrorBody)
    )
)]
pub(super) async fn list(
    State(state): State<ApiState>,
    ApiQuery(query): ApiQuery<QueueQuery>,
) -> Result<Response, ApiError> {
    let limit = query.limit.unwrap_or(crate::queue::MAX_QUEUE_PAGE);
    crate::queue::page_limit(limit)?;
    let after = query.after.as_deref().map(queue_name).transpose()?;
    let queues = state
        .services
        .cluster
        .list_queues(after.as_deref(), limit)
        .await?;
    let next_after = (queues.len() == limit as usize)
        .then(|| queues.last().map(|queue| queue.queue.clone()))
        .flatten();
    Ok(axum::Json(QueueList { queues, next_after }).into_response())
}

#[utoipa::path(
    get, path = "/v1/queues/{queue}", tag = "queues",
    params(("queue" = String, Path, description = "Queue name: 1 to 128 characters from [A-Za-z0-9._:-]")),
    responses(
        (status = 200, description = "The queue's limits and its busiest keys (running and ready counts, at most 200 keys)", body = QueueView),
        (status = 400, description = "Invalid name (`invalid_input`)", body = ErrorBody),
        (status = 401, description = "A bearer token is required (`unauthorized`)", body = ErrorBody),
        (status = 404, description = "The queue has no limits (`not_found`)", body = ErrorBody),
        (status = 503, description = "Database unavailable (`unavailable`)", body = ErrorBody)
    )
)]
pub(super) async fn get(
    State(state): State<ApiState>,
    Path(queue): Path<String>,
) -> Result<Response, ApiError> {
    let queue = queue_name(&queue)?;
    match state.services.cluster.get_queue(&queue).await? {
        Some(view) => Ok(axum::Json(view).into_response()),
        None => Err(ProcessError::QueueNotFound(queue).into()),
    }
}

#[utoipa::path(
    put, path = "/v1/queues/{queue}", tag = "queues",
    params(("queue" = String, Path, description = "Queue name")),
    request_body = QueueLimits,
    responses(
        (status = 200, description = "Set: claims that begin from now follow these limits", body = QueueRecord),
        (status = 400, description = "Invalid limits or name, or a 1,001st queue (`invalid_input`, `invalid_json`)", body = ErrorBody),
        (status = 401, description = "A bearer token is required (`unauthorized`)", body = ErrorBody),
        (status = 413, description = "Body too large (`payload_too_large`)", body = ErrorBody),
        (status = 415, description = "Not JSON (`unsupported_media_type`)", body = ErrorBody),
        (status = 503, description = "Database unavailable (`unavailable`)", body = ErrorBody)
    )
)]
pub(super) async fn set(
    State(state): State<ApiState>,
    Path(queue): Path<String>,
    body: AdmittedBody,
) -> Result<Response, ApiError> {
    let queue = queue_name(&queue)?;
    let limits: QueueLimits = body.parse()?;
    let record = state.services.cluster.set_queue(&queue, &limits).await?;
    Ok(axum::Json(record).into_response())
}

#[utoipa::path(
    delete, path = "/v1/queues/{queue}", tag = "queues",
    params(("queue" = String, Path, description = "Queue name")),
    responses(
        (status = 200, description = "Limits removed (its work is claimed as any other's): `{\"deleted\": queue}`"),
        (status = 400, description = "Invalid name (`invalid_input`)", body = ErrorBody),
        (status = 401, description = "A bearer token is required (`unauthorized`)", body = ErrorBody),
        (status = 404, description = "The queue has no limits (`not_found`)", body = ErrorBody),
        (status = 503, description = "Database unavailable (`unavailable`)", body = ErrorBody)
    )
)]
pub(super) async fn delete(
    State(state): State<ApiState>,
    Path(queue): Path<String>,
) -> Result<Response, ApiError> {
    let queue = queue_name(&queue)?;
    if state.services.cluster.delete_queue(&queue).await? {
        Ok(axum::Json(serde_json::json!({ "deleted": queue })).into_response())
    } else {
        Err(ProcessError::QueueNotFound(queue).into())
    }
}
