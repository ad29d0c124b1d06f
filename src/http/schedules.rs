//! The `/v1/schedules` handlers: create, list, read, pause, resume, trigger and delete
//! schedules (CONTRACT §10; the work is in [`crate::pod::scheduler`]).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::ApiState;
use super::body::AdmittedBody;
use super::error::{ApiError, ApiQuery};
use super::openapi::ErrorBody;
use crate::error::ProcessError;
use crate::model::ProcessRecord;
use crate::pod::scheduler;
use crate::schedule::{ScheduleRecord, ScheduleSpec};

/// One page of schedules.
#[derive(Serialize, ToSchema)]
pub struct ScheduleList {
    /// The schedules, by id.
    pub schedules: Vec<ScheduleRecord>,
    /// Pass as `after` for the next page; absent on the last.
    pub next_after: Option<String>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ScheduleQuery {
    /// The last id of the previous page.
    after: Option<String>,
    /// Page size: 1 to 1,000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

fn schedule_id(raw: &str) -> Result<String, ApiError> {
    crate::validate::schedule_id(raw)?;
    Ok(raw.to_owned())
}

#[utoipa::path(
    post, path = "/v1/schedules", tag = "schedules",
    request_body = ScheduleSpec,
    responses(
        (status = 201, description = "Created (or the same definition, existing)", body = ScheduleRecord),
        (status = 400, description = "Invalid input: the expression, time zone, kind, limits, or an id defined otherwise (`invalid_input`, `invalid_json`)", body = ErrorBody),
        (status = 401, description = "A bearer token is required (`unauthorized`)", body = ErrorBody),
        (status = 413, description = "Input or body too large (`payload_too_large`)", body = ErrorBody),
        (status = 415, description = "Not JSON (`unsupported_media_type`)", body = ErrorBody),
        (status = 503, description = "Database unavailable (`unavailable`)", body = ErrorBody)
    )
)]
pub(super) async fn create(
    State(state): State<ApiState>,
    body: AdmittedBody,
) -> Result<Response, ApiError> {
    let spec: ScheduleSpec = body.parse()?;
    let services = &state.services;
    let record =
        scheduler::create_schedule(services.cluster.as_ref(), services.registry.as_ref(), &spec)
            .await?;
    Ok((StatusCode::CREATED, axum::Json(record)).into_response())
}

#[utoipa::path(
    get, path = "/v1/schedules", tag = "schedules",
    params(ScheduleQuery),
    responses(
        (status = 200, description = "One page, by id, each with its next and last due time", body = ScheduleList),
        (status = 400, description = "Invalid input (`invalid_input`, `bad_request`)", body = ErrorBody),
        (status = 401, description = "A bearer token is required (`unauthorized`)", body = ErrorBody),
        (status = 503, description = "Database unavailable (`unavailable`)", body = ErrorBody)
    )
)]
pub(super) async fn list(
    State(state): State<ApiState>,
    ApiQuery(query): ApiQuery<ScheduleQuery>,
) -> Result<Response, ApiError> {
    let limit = query.limit.unwrap_or(100);
    if !(1..=crate::store::MAX_SCHEDULE_PAGE).contains(&limit) {
        return Err(ProcessError::InvalidInput(format!(
            "limit must be 1 to {}, got {limit}",
            crate::store::MAX_SCHEDULE_PAGE
        ))
        .into());
    }
    let after = query.after.as_deref().map(schedule_id).transpose()?;
    let schedules = state
        .services
        .cluster
        .list_schedules(after.as_deref(), limit)
        .await?;
    let next_after = (schedules.len() == limit as usize)
        .then(|| schedules.last().map(|s| s.spec.id.clone()))
        .flatten();
    Ok(axum::Json(ScheduleList {
        schedules,
        next_after,
    })
    .into_response())
}

#[utoipa::path(
    get, path = "/v1/schedules/{id}", tag = "schedules",
    params(("id" = String, Path, description = "Schedule id: 1 to 64 characters from [A-Za-z0-9._:-]")),
    responses(
        (status = 200, description = "The schedule", body = ScheduleRecord),
        (status = 400, description = "Invalid id (`invalid_input`)", body = ErrorBody),
        (status = 401, description = "A bearer token is required (`unauthorized`)", body = ErrorBody),
        (status = 404, description = "Unknown schedule (`not_found`)", body = ErrorBody),
        (status = 503, description = "Database unavailable (`unavailable`)", body = ErrorBody)
    )
)]
pub(super) async fn get(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = schedule_id(&id)?;
    match state.services.cluster.get_schedule(&id).await? {
        Some(record) => Ok(axum::Json(record).into_response()),
        None => Err(ProcessError::ScheduleNotFound(id).into()),
    }
}

#[utoipa::path(
    delete, path = "/v1/schedules/{id}", tag = "schedules",
    params(("id" = String, Path, description = "Schedule id")),
    responses(
        (status = 200, description = "Deleted (the processes it started stay): `{\"deleted\": id}`"),
        (status = 400, description = "Invalid id (`invalid_input`)", body = ErrorBody),
        (status = 401, description = "A bearer token is required (`unauthorized`)", body = ErrorBody),
        (status = 404, description = "Unknown schedule (`not_found`)", body = ErrorBody),
        (status = 503, description = "Database unavailable (`unavailable`)", body = ErrorBody)
    )
)]
pub(super) async fn delete(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = schedule_id(&id)?;
    if state.services.cluster.delete_schedule(&id).await? {
        Ok(axum::Json(serde_json::json!({ "deleted": id })).into_response())
    } else {
        Err(ProcessError::ScheduleNotFound(id).into())
    }
}

async fn set_paused(state: &ApiState, id: &str, paused: bool) -> Result<Response, ApiError> {
    let id = schedule_id(id)?;
    let record = scheduler::pause_schedule(state.services.cluster.as_ref(), &id, paused).await?;
    Ok(axum::Json(record).into_response())
}

#[utoipa::path(
    post, path = "/v1/schedules/{id}/pause", tag = "schedules",
    params(("id" = String, Path, description = "Schedule id")),
    responses(
        (status = 200, description = "Paused: its due times make nothing until it is resumed", body = ScheduleRecord),
        (status = 404, description = "Unknown schedule (`not_found`)", body = ErrorBody),
        (status = 415, description = "Not JSON (`unsupported_media_type`): send an empty JSON body", body = ErrorBody),
        (status = 503, description = "Database unavailable (`unavailable`)", body = ErrorBody)
    )
)]
pub(super) async fn pause(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    _body: AdmittedBody,
) -> Result<Response, ApiError> {
    set_paused(&state, &id, true).await
}

#[utoipa::path(
    post, path = "/v1/schedules/{id}/resume", tag = "schedules",
    params(("id" = String, Path, description = "Schedule id")),
    responses(
        (status = 200, description = "Resumed from the first due time after now (those that passed while paused are skipped)", body = ScheduleRecord),
        (status = 404, description = "Unknown schedule (`not_found`)", body = ErrorBody),
        (status = 415, description = "Not JSON (`unsupported_media_type`): send an empty JSON body", body = ErrorBody),
        (status = 503, description = "Database unavailable (`unavailable`)", body = ErrorBody)
    )
)]
pub(super) async fn resume(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    _body: AdmittedBody,
) -> Result<Response, ApiError> {
    set_paused(&state, &id, false).await
}

#[utoipa::path(
    post, path = "/v1/schedules/{id}/trigger", tag = "schedules",
    params(("id" = String, Path, description = "Schedule id")),
    responses(
        (status = 201, description = "A process of the schedule, started now (`<schedule>.manual.<time>`)", body = ProcessRecord),
        (status = 404, description = "Unknown schedule (`not_found`)", body = ErrorBody),
        (status = 415, description = "Not JSON (`unsupported_media_type`): send an empty JSON body", body = ErrorBody),
        (status = 503, description = "Database unavailable (`unavailable`)", body = ErrorBody)
    )
)]
pub(super) async fn trigger(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    _body: AdmittedBody,
) -> Result<Response, ApiError> {
    let id = schedule_id(&id)?;
    let services = &state.services;
    let record: ProcessRecord =
        scheduler::trigger_schedule(services.cluster.as_ref(), services.registry.as_ref(), &id)
            .await?;
    Ok((StatusCode::CREATED, axum::Json(record)).into_response())
}
