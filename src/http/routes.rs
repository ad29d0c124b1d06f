//! The `/v1` handlers.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};

use utoipa::{IntoParams, ToSchema};

use super::ApiState;
use super::body::AdmittedBody;
use super::error::{ApiError, ApiQuery, path_id};
use super::openapi::{
    AppendAnswer, Appended, ErrorBody, EventPage, ProcessList, PruneAnswer, SseEvent,
};
use crate::model::{
    AppendOutcome, AppendRequest, Completion, ListCursor, Message, ProcessFilter, ProcessId,
    ProcessRecord, ProcessRegistration, ProcessStatus, StartDecision, TerminalRecord,
};
use crate::pod::cancel_process;

/// Longest `await` a client may ask for.
const MAX_AWAIT: Duration = Duration::from_secs(600);
/// `await` timeout when none is given.
const DEFAULT_AWAIT: Duration = Duration::from_secs(30);

#[utoipa::path(
    post, path = "/v1/processes", tag = "processes",
    request_body = ProcessRegistration,
    responses(
        (status = 201, description = "Registered (or the identical registration, existing). The `Proclog-Start` header says which: `created` or `existing`; with a `start_policy` the body also carries it as `start`", body = ProcessRecord,
            headers(("Proclog-Start" = String, description = "created, existing, deduplicated, running or debounced"))),
        (status = 200, description = "A `start_policy` answered an earlier start's process: `start` (and `Proclog-Start`) is `deduplicated`, `running` (a singleton's) or `debounced`", body = ProcessRecord,
            headers(("Proclog-Start" = String, description = "deduplicated, running or debounced"))),
        (status = 400, description = "Invalid input (`invalid_input`, `invalid_json`, `bad_request`)", body = ErrorBody),
        (status = 401, description = "A bearer token is required (`unauthorized`)", body = ErrorBody),
        (status = 409, description = "Refused by the process's state (`conflict`, `start_refused` for a singleton with `refuse` whose key's process has not ended)", body = ErrorBody),
        (status = 413, description = "Payload or body too large (`payload_too_large`)", body = ErrorBody),
        (status = 415, description = "Not JSON (`unsupported_media_type`)", body = ErrorBody),
        (status = 500, description = "Unexpected failure, logged (`database_error`, `internal_error`)", body = ErrorBody),
        (status = 503, description = "Database unavailable (`unavailable`)", body = ErrorBody)
    )
)]
pub(super) async fn register(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: AdmittedBody,
) -> Result<Response, ApiError> {
    let mut registration: ProcessRegistration = body.parse()?;
    // The request's trace, for the process's runs to continue (an invalid header is
    // ignored, as W3C Trace Context asks).
    if registration.trace_parent.is_none() {
        registration.trace_parent = headers
            .get("traceparent")
            .and_then(|value| value.to_str().ok())
            .map(str::trim)
            .filter(|value| crate::validate::is_traceparent(value))
            .map(str::to_owned);
    }
    let with_policy = registration.start_policy.is_some();
    let started = state.services.registry.start_process(registration).await?;
    let status = match started.decision {
        StartDecision::Created | StartDecision::Existing => StatusCode::CREATED,
        StartDecision::Deduplicated | StartDecision::Running | StartDecision::Debounced => {
            StatusCode::OK
        }
    };
    let header = [(
        axum::http::HeaderName::from_static("proclog-start"),
        axum::http::HeaderValue::from_static(started.decision.as_str()),
    )];
    if !with_policy {
        return Ok((status, header, axum::Json(started.process)).into_response());
    }
    let mut body = serde_json::to_value(&started.process)
        .map_err(|err| ApiError::from(crate::ProcessError::Database(err.to_string())))?;
    body["start"] = json!(started.decision);
    Ok((status, header, axum::Json(body)).into_response())
}

#[utoipa::path(
    get, path = "/v1/processes/{id}", tag = "processes",
    params(("id" = ProcessId, Path, description = "Process id: 1 to 128 characters from [A-Za-z0-9._:-]")),
    responses(
        (status = 200, description = "The process", body = ProcessRecord),
        (status = 400, description = "Invalid input (`invalid_input`, `invalid_json`, `bad_request`)", body = ErrorBody),
        (status = 401, description = "A bearer token is required (`unauthorized`)", body = ErrorBody),
        (status = 404, description = "Unknown process (`not_found`)", body = ErrorBody),
        (status = 500, description = "Unexpected failure, logged (`database_error`, `internal_error`)", body = ErrorBody),
        (status = 503, description = "Database unavailable (`unavailable`)", body = ErrorBody)
    )
)]
pub(super) async fn get(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = path_id(&id)?;
    match state.services.registry.get_process(&id).await? {
        Some(record) => Ok(axum::Json(record).into_response()),
        None => Err(crate::ProcessError::NotFound(id).into()),
    }
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ListQuery {
    /// Only processes in this status.
    status: Option<ProcessStatus>,
    /// Only processes of this kind.
    kind: Option<String>,
    /// Only the children of this process.
    parent: Option<String>,
    /// Only processes created at or after this instant (RFC 3339, years 1 to 9999).
    created_after: Option<DateTime<Utc>>,
    /// Only processes created before this instant (RFC 3339, years 1 to 9999).
    created_before: Option<DateTime<Utc>>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Page size: 1 to 1,000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

fn parse_cursor(raw: &str) -> Result<ListCursor, ApiError> {
    let bad = || ApiError::invalid(format!("malformed cursor {raw:?}"));
    let (at, id) = raw.split_once('|').ok_or_else(bad)?;
    Ok(ListCursor {
        created_at: DateTime::parse_from_rfc3339(at)
            .map_err(|_| bad())?
            .with_timezone(&Utc),
        id: ProcessId::new(id).map_err(|_| bad())?,
    })
}

fn format_cursor(cursor: &ListCursor) -> String {
    format!(
        "{}|{}",
        cursor
            .created_at
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        cursor.id
    )
}

#[utoipa::path(
    get, path = "/v1/processes", tag = "processes",
    params(ListQuery),
    responses(
        (status = 200, description = "One page, in (created_at, id) order", body = ProcessList),
        (status = 400, description = "Invalid input (`invalid_input`, `invalid_json`, `bad_request`)", body = ErrorBody),
        (status = 401, description = "A bearer token is required (`unauthorized`)", body = ErrorBody),
        (status = 500, description = "Unexpected failure, logged (`database_error`, `internal_error`)", body = ErrorBody),
        (status = 503, description = "Database unavailable (`unavailable`)", body = ErrorBody)
    )
)]
pub(super) async fn list(
    State(state): State<ApiState>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Response, ApiError> {
    let filter = ProcessFilter {
        status: query.status,
        kind: query.kind,
        parent: query.parent.as_deref().map(query_id).transpose()?,
        created_after: query.created_after,
        created_before: query.created_before,
        after: query.cursor.as_deref().map(parse_cursor).transpose()?,
        limit: query.limit,
    };
    list_page(&state, filter).await
}

async fn list_page(state: &ApiState, filter: ProcessFilter) -> Result<Response, ApiError> {
    let page = state.services.registry.list_processes(filter).await?;
    Ok(axum::Json(json!({
        "processes": page.processes,
        "next_cursor": page.next.as_ref().map(format_cursor),
    }))
    .into_response())
}

fn query_id(raw: &str) -> Result<ProcessId, ApiError> {
    ProcessId::new(raw).map_err(ApiError::from)
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ChildrenQuery {
    /// Only children in this status.
    status: Option<ProcessStatus>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Page size: 1 to 1,000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

#[utoipa::path(
    get, path = "/v1/processes/{id}/children", tag = "processes",
    params(("id" = ProcessId, Path, description = "Process id: 1 to 128 characters from [A-Za-z0-9._:-]"), ChildrenQuery),
    responses(
        (status = 200, description = "One page of the processes it started, oldest first", body = ProcessList),
        (status = 400, description = "Invalid input (`invalid_input`, `invalid_json`, `bad_request`)", body = ErrorBody),
        (status = 401, description = "A bearer token is required (`unauthorized`)", body = ErrorBody),
        (status = 404, description = "Unknown process (`not_found`)", body = ErrorBody),
        (status = 500, description = "Unexpected failure, logged (`database_error`, `internal_error`)", body = ErrorBody),
        (status = 503, description = "Database unavailable (`unavailable`)", body = ErrorBody)
    )
)]
pub(super) async fn children(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<ChildrenQuery>,
) -> Result<Response, ApiError> {
    let id = path_id(&id)?;
    let after = query.cursor.as_deref().map(parse_cursor).transpose()?;
    if after.is_none() && state.services.registry.get_process(&id).await?.is_none() {
        return Err(crate::ProcessError::NotFound(id).into());
    }
    let filter = ProcessFilter {
        status: query.status,
        parent: Some(id),
        after,
        limit: query.limit,
        ..ProcessFilter::default()
    };
    list_page(&state, filter).await
}

/// One event (`{"event_type": ...}`) or a batch (`{"events": [...]}`).
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
pub(super) enum AppendBody {
    Batch { events: Vec<AppendRequest> },
    One(AppendRequest),
}

fn appended(outcome: AppendOutcome) -> Value {
    json!({"event": outcome.event, "replayed": outcome.replayed})
}

#[utoipa::path(
    post, path = "/v1/processes/{id}/events", tag = "events",
    params(("id" = ProcessId, Path, description = "Process id: 1 to 128 characters from [A-Za-z0-9._:-]")),
    request_body = AppendBody,
    responses(
        (status = 201, description = "Appended (`events` for a batch)", body = AppendAnswer),
        (status = 200, description = "Replayed: already stored under these replay keys", body = AppendAnswer),
        (status = 400, description = "Invalid input (`invalid_input`, `invalid_json`, `bad_request`)", body = ErrorBody),
        (status = 401, description = "A bearer token is required (`unauthorized`)", body = ErrorBody),
        (status = 404, description = "Unknown process (`not_found`)", body = ErrorBody),
        (status = 409, description = "Refused by the process's state (`conflict`, `replay_conflict`, `process_terminal`, `already_terminal`, `lease_lost`)", body = ErrorBody),
        (status = 413, description = "Payload or body too large (`payload_too_large`)", body = ErrorBody),
        (status = 415, description = "Not JSON (`unsupported_media_type`)", body = ErrorBody),
        (status = 500, description = "Unexpected failure, logged (`database_error`, `internal_error`)", body = ErrorBody),
        (status = 503, description = "Database unavailable (`unavailable`)", body = ErrorBody)
    )
)]
pub(super) async fn append(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    body: AdmittedBody,
) -> Result<Response, ApiError> {
    let id = path_id(&id)?;
    let body: AppendBody = body
        .parse_expecting("{\"event_type\", \"payload\", \"replay_key\"?} or {\"events\": [...]}")?;
    let registry = &state.services.registry;
    match body {
        AppendBody::One(request) => {
            let outcome = registry.append_event(&id, request).await?;
            let status = if outcome.replayed {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            Ok((status, axum::Json(appended(outcome))).into_response())
        }
        AppendBody::Batch { events } => {
            let outcomes = registry.append_events(&id, events).await?;
            let status = if outcomes.iter().all(|o| o.replayed) {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            let events: Vec<Value> = outcomes.into_iter().map(appended).collect();
            Ok((status, axum::Json(json!({"events": events}))).into_response())
        }
    }
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct EventsQuery {
    /// Events with a seq above this (default 0).
    #[serde(default)]
    #[param(minimum = 0)]
    after: i64,
    /// Most events returned: 1 to 10,000 (default 100).
    #[param(minimum = 1, maximum = 10000)]
    limit: Option<u32>,
}

#[utoipa::path(
    get, path = "/v1/processes/{id}/events", tag = "events",
    params(("id" = ProcessId, Path, description = "Process id: 1 to 128 characters from [A-Za-z0-9._:-]"), EventsQuery),
    responses(
        (status = 200, description = "Events after `after`, ascending, at most `limit` and about the page budget in bytes: read on from `next_after` until a page is empty", body = EventPage),
        (status = 400, description = "Invalid input (`invalid_input`, `invalid_json`, `bad_request`)", body = ErrorBody),
        (status = 401, description = "A bearer token is required (`unauthorized`)", body = ErrorBody),
        (status = 404, description = "Unknown process (`not_found`)", body = ErrorBody),
        (status = 500, description = "Unexpected failure, logged (`database_error`, `internal_error`)", body = ErrorBody),
        (status = 503, description = "Database unavailable (`unavailable`)", body = ErrorBody)
    )
)]
pub(super) async fn events(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<EventsQuery>,
) -> Result<Response, ApiError> {
    let id = path_id(&id)?;
    let events = state
        .services
        .registry
        .events_after(&id, query.after, query.limit.unwrap_or(100))
        .await?;
    let next_after = events.last().map(|event| event.seq);
    Ok(axum::Json(json!({"events": events, "next_after": next_after})).into_response())
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct StreamQuery {
    /// Stream events with a seq above this (default 0).
    #[param(minimum = 0)]
    after: Option<i64>,
}

#[utoipa::path(
    get, path = "/v1/processes/{id}/stream", tag = "events",
    params(("id" = ProcessId, Path, description = "Process id: 1 to 128 characters from [A-Za-z0-9._:-]"), StreamQuery,
        ("Last-Event-ID" = Option<i64>, Header, description = "Resume after this seq (wins over `after`)")),
    responses(
        (status = 200, description = "Server-Sent Events: one per log event (SSE id = seq, event = type, data = the event as JSON), ending after the terminal event", content_type = "text/event-stream", body = SseEvent),
        (status = 204, description = "The process ended at or before the requested seq: nothing will follow"),
        (status = 400, description = "Invalid input (`invalid_input`, `invalid_json`, `bad_request`)", body = ErrorBody),
        (status = 401, description = "A bearer token is required (`unauthorized`)", body = ErrorBody),
        (status = 404, description = "Unknown process (`not_found`)", body = ErrorBody),
        (status = 500, description = "Unexpected failure, logged (`database_error`, `internal_error`)", body = ErrorBody),
        (status = 503, description = "Database unavailable (`unavailable`), or the pod serves as many streams and awaits as it may (`too_many_streams`)", body = ErrorBody)
    )
)]
pub(super) async fn stream(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<StreamQuery>,
) -> Result<Response, ApiError> {
    let id = path_id(&id)?;
    let resume = headers
        .get("last-event-id")
        .map(|value| {
            value
                .to_str()
                .ok()
                .and_then(|v| v.parse::<i64>().ok())
                .ok_or_else(|| ApiError::invalid("Last-Event-ID must be a seq"))
        })
        .transpose()?;
    let after = resume.or(query.after).unwrap_or(0);
    if after < 0 {
        return Err(ApiError::invalid("after must be >= 0"));
    }
    let Some(record) = state.services.registry.get_process(&id).await? else {
        return Err(crate::ProcessError::NotFound(id).into());
    };
    match &record.terminal {
        // Nothing will ever follow: 204 tells an EventSource to stop reconnecting.
        Some(terminal) if after >= terminal.seq => {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        None if after > record.last_seq => {
            return Err(ApiError::invalid(format!(
                "after {after} is beyond the last event of {id} ({})",
                record.last_seq
            )));
        }
        _ => {}
    }
    let permit = state.stream_permit()?;
    Ok(event_stream(&state, id, after, permit).into_response())
}

/// The SSE stream of `id` after `after`: each event with its seq as the SSE id and its type as
/// the SSE event name; it ends after the terminal event.
fn event_stream(
    state: &ApiState,
    id: ProcessId,
    after: i64,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Sse<impl Stream<Item = Result<Event, Infallible>> + use<>> {
    let events = state
        .services
        .subscriptions
        .subscribe(id, after)
        .map(move |item| {
            // The stream holds its slot among the pod's streams until it ends or is dropped.
            let _held = &permit;
            Ok(match item {
                Ok(event) => Event::default()
                    .id(event.seq.to_string())
                    .event(event.event_type.clone())
                    .json_data(&event)
                    .unwrap_or_else(|_| Event::default().event("error")),
                Err(err) => Event::default()
                    .event("error")
                    .data(json!({"code": err.code(), "message": err.to_string()}).to_string()),
            })
        });
    Sse::new(events).keep_alive(KeepAlive::default())
}

#[utoipa::path(
    post, path = "/v1/processes/{id}/complete", tag = "processes",
    params(("id" = ProcessId, Path, description = "Process id: 1 to 128 characters from [A-Za-z0-9._:-]")),
    request_body = Completion,
    responses(
        (status = 200, description = "Ended (or the identical completion, existing)", body = ProcessRecord),
        (status = 400, description = "Invalid input (`invalid_input`, `invalid_json`, `bad_request`)", body = ErrorBody),
        (status = 401, description = "A bearer token is required (`unauthorized`)", body = ErrorBody),
        (status = 404, description = "Unknown process (`not_found`)", body = ErrorBody),
        (status = 409, description = "Refused by the process's state (`conflict`, `replay_conflict`, `process_terminal`, `already_terminal`, `lease_lost`)", body = ErrorBody),
        (status = 413, description = "Payload or body too large (`payload_too_large`)", body = ErrorBody),
        (status = 415, description = "Not JSON (`unsupported_media_type`)", body = ErrorBody),
        (status = 500, description = "Unexpected failure, logged (`database_error`, `internal_error`)", body = ErrorBody),
        (status = 503, description = "Database unavailable (`unavailable`)", body = ErrorBody)
    )
)]
pub(super) async fn complete(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    body: AdmittedBody,
) -> Result<Response, ApiError> {
    let completion: Completion = body.parse()?;
    let id = path_id(&id)?;
    let record = state
        .services
        .registry
        .complete_process(&id, completion)
        .await?;
    Ok(axum::Json(record).into_response())
}

#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CancelBody {
    #[serde(default)]
    reason: Value,
    /// Makes a retried request idempotent: the first stored request is found, not repeated.
    #[serde(default)]
    replay_key: Option<String>,
}

#[utoipa::path(
    post, path = "/v1/processes/{id}/cancel", tag = "processes",
    params(("id" = ProcessId, Path, description = "Process id: 1 to 128 characters from [A-Za-z0-9._:-]")),
    request_body(content = Option<CancelBody>, description = "Optional: a reason and a replay key. `Content-Type: application/json` is required, also with an empty body"),
    responses(
        (status = 200, description = "Requested; the process as it is now (cancelled at once when nobody runs it)", body = ProcessRecord),
        (status = 400, description = "Invalid input (`invalid_input`, `invalid_json`, `bad_request`)", body = ErrorBody),
        (status = 401, description = "A bearer token is required (`unauthorized`)", body = ErrorBody),
        (status = 404, description = "Unknown process (`not_found`)", body = ErrorBody),
        (status = 409, description = "Refused by the process's state (`conflict`, `replay_conflict`, `process_terminal`, `already_terminal`, `lease_lost`)", body = ErrorBody),
        (status = 413, description = "Payload or body too large (`payload_too_large`)", body = ErrorBody),
        (status = 415, description = "Not JSON (`unsupported_media_type`)", body = ErrorBody),
        (status = 500, description = "Unexpected failure, logged (`database_error`, `internal_error`)", body = ErrorBody),
        (status = 503, description = "Database unavailable (`unavailable`)", body = ErrorBody)
    )
)]
pub(super) async fn cancel(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    body: AdmittedBody,
) -> Result<Response, ApiError> {
    let id = path_id(&id)?;
    // Like every write, only JSON (AdmittedBody requires it), which an HTML form on another
    // site cannot send; an empty body is a cancel without a reason.
    let body = if body.bytes.is_empty() {
        CancelBody::default()
    } else {
        body.parse::<CancelBody>()?
    };
    let record = cancel_process(
        state.services.registry.as_ref(),
        &id,
        &state.services.pod_id,
        body.reason,
        body.replay_key.as_deref(),
    )
    .await?;
    Ok(axum::Json(record).into_response())
}

#[utoipa::path(
    post, path = "/v1/processes/{id}/messages", tag = "processes",
    params(("id" = ProcessId, Path, description = "Process id: 1 to 128 characters from [A-Za-z0-9._:-]")),
    request_body = Message,
    responses(
        (status = 201, description = "Stored as `process.message {topic, payload}`; a process waiting for the topic is runnable at once", body = Appended),
        (status = 200, description = "Replayed: a message with this replay key is stored", body = Appended),
        (status = 400, description = "Invalid input (`invalid_input`, `invalid_json`, `bad_request`)", body = ErrorBody),
        (status = 401, description = "A bearer token is required (`unauthorized`)", body = ErrorBody),
        (status = 404, description = "Unknown process (`not_found`)", body = ErrorBody),
        (status = 409, description = "The process has ended (`process_terminal`), or the key holds another message (`replay_conflict`)", body = ErrorBody),
        (status = 413, description = "Payload or body too large (`payload_too_large`)", body = ErrorBody),
        (status = 415, description = "Not JSON (`unsupported_media_type`)", body = ErrorBody),
        (status = 500, description = "Unexpected failure, logged (`database_error`, `internal_error`)", body = ErrorBody),
        (status = 503, description = "Database unavailable (`unavailable`)", body = ErrorBody)
    )
)]
pub(super) async fn send_message(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    body: AdmittedBody,
) -> Result<Response, ApiError> {
    let id = path_id(&id)?;
    let message: Message = body.parse()?;
    let outcome = state.services.registry.send_message(&id, message).await?;
    let status = if outcome.replayed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, axum::Json(appended(outcome))).into_response())
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct AwaitQuery {
    /// How long to wait: 0 to 600,000 ms (default 30,000).
    #[param(minimum = 0, maximum = 600000)]
    timeout_ms: Option<u64>,
}

#[utoipa::path(
    get, path = "/v1/processes/{id}/await", tag = "processes",
    params(("id" = ProcessId, Path, description = "Process id: 1 to 128 characters from [A-Za-z0-9._:-]"), AwaitQuery),
    responses(
        (status = 200, description = "The terminal column, once set", body = TerminalRecord),
        (status = 400, description = "Invalid input (`invalid_input`, `invalid_json`, `bad_request`)", body = ErrorBody),
        (status = 401, description = "A bearer token is required (`unauthorized`)", body = ErrorBody),
        (status = 404, description = "Unknown process (`not_found`)", body = ErrorBody),
        (status = 408, description = "The process did not end in time (`timeout`)", body = ErrorBody),
        (status = 500, description = "Unexpected failure, logged (`database_error`, `internal_error`)", body = ErrorBody),
        (status = 503, description = "Database unavailable (`unavailable`), or the pod serves as many streams and awaits as it may (`too_many_streams`)", body = ErrorBody)
    )
)]
pub(super) async fn await_terminal(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<AwaitQuery>,
) -> Result<Response, ApiError> {
    let id = path_id(&id)?;
    let timeout = query
        .timeout_ms
        .map_or(DEFAULT_AWAIT, Duration::from_millis);
    if timeout > MAX_AWAIT {
        return Err(ApiError::invalid(format!(
            "timeout_ms must be at most {}",
            MAX_AWAIT.as_millis()
        )));
    }
    let _permit = state.stream_permit()?;
    let terminal = state.services.driver.await_terminal(&id, timeout).await?;
    Ok(axum::Json(terminal).into_response())
}

/// Exactly one of the two.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct PruneBody {
    /// Prune processes completed before this instant...
    before: Option<DateTime<Utc>>,
    /// ...or more than this many seconds ago.
    older_than_secs: Option<u64>,
}

/// The cutoff `secs` seconds before now, refused (never wrapped or clamped) when it would fall
/// outside the instants proclog accepts.
fn older_than(secs: u64) -> Result<DateTime<Utc>, ApiError> {
    let too_large = || {
        ApiError::invalid(format!(
            "older_than_secs {secs} reaches before {}",
            crate::validate::MIN_TIMESTAMP
        ))
    };
    let age = i64::try_from(secs)
        .ok()
        .and_then(chrono::TimeDelta::try_seconds)
        .ok_or_else(too_large)?;
    let cutoff = Utc::now().checked_sub_signed(age).ok_or_else(too_large)?;
    crate::validate::timestamp("the cutoff", cutoff).map_err(|_| too_large())?;
    Ok(cutoff)
}

#[utoipa::path(
    post, path = "/v1/prune", tag = "processes",
    request_body = PruneBody,
    responses(
        (status = 200, description = "What was deleted", body = PruneAnswer),
        (status = 400, description = "Invalid input (`invalid_input`, `invalid_json`, `bad_request`)", body = ErrorBody),
        (status = 401, description = "A bearer token is required (`unauthorized`)", body = ErrorBody),
        (status = 415, description = "Not JSON (`unsupported_media_type`)", body = ErrorBody),
        (status = 500, description = "Unexpected failure, logged (`database_error`, `internal_error`)", body = ErrorBody),
        (status = 503, description = "Database unavailable (`unavailable`)", body = ErrorBody)
    )
)]
pub(super) async fn prune(
    State(state): State<ApiState>,
    body: AdmittedBody,
) -> Result<Response, ApiError> {
    let body: PruneBody = body.parse()?;
    let cutoff = match (body.before, body.older_than_secs) {
        (Some(before), None) => before,
        (None, Some(secs)) => older_than(secs)?,
        _ => {
            return Err(ApiError::invalid(
                "give exactly one of \"before\" (RFC 3339) or \"older_than_secs\"",
            ));
        }
    };
    let report = state
        .services
        .registry
        .prune_terminal_processes(cutoff)
        .await?;
    Ok(axum::Json(json!({"cutoff": cutoff, "pruned": report})).into_response())
}

/// The pods of this database, with their liveness.
#[derive(serde::Serialize, ToSchema)]
pub(crate) struct PodList {
    /// Live pods first, then stopped and gone ones.
    pods: Vec<crate::store::PodView>,
}

#[utoipa::path(
    get, path = "/v1/pods", tag = "pods",
    responses(
        (status = 200, description = "Every pod row: `running`, `draining`, `stopped` or `gone` (no heartbeat for three periods), with heartbeat age and live leases held", body = PodList),
        (status = 400, description = "Invalid input (`invalid_input`, `invalid_json`, `bad_request`)", body = ErrorBody),
        (status = 401, description = "A bearer token is required (`unauthorized`)", body = ErrorBody),
        (status = 500, description = "Unexpected failure, logged (`database_error`, `internal_error`)", body = ErrorBody),
        (status = 503, description = "Database unavailable (`unavailable`)", body = ErrorBody)
    )
)]
pub(super) async fn pods(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let pods = state.services.cluster.pods().await?;
    Ok(axum::Json(PodList { pods }).into_response())
}
