//! The OpenAPI 3.1 description of the HTTP API, generated from the handlers' annotations and
//! the model's types, served at `/v1/openapi.json`.

use serde::Serialize;
use serde_json::Value;
use utoipa::{OpenApi, ToSchema};

use super::routes;
use crate::model::{
    AppendOutcome, AppendRequest, Completion, Disposition, LeaseFence, LeaseInfo, ProcessEvent,
    ProcessId, ProcessRecord, ProcessRegistration, ProcessStatus, PruneReport, TerminalRecord,
    TerminalState,
};

/// Every non-2xx answer: `{"error": {"code", "message"}}`.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// A stable code and a human explanation.
#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: see the README's table of codes.
    pub code: String,
    /// For people.
    pub message: String,
}

/// One page of a listing.
#[derive(Serialize, ToSchema)]
pub struct ProcessList {
    /// The processes of this page.
    pub processes: Vec<ProcessRecord>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// Events of a log, ascending.
#[derive(Serialize, ToSchema)]
pub struct EventPage {
    /// The events: at most `limit`, and about the pod's page budget in bytes
    /// (`PROCLOG_MAX_PAGE_BYTES`), so possibly fewer while more follow.
    pub events: Vec<ProcessEvent>,
    /// The seq to read on from (`after=`): the last seq of this page; `null` when the page is
    /// empty (nothing after `after` yet).
    pub next_after: Option<i64>,
}

/// The answer to one append.
#[derive(Serialize, ToSchema)]
pub struct Appended {
    /// The event as stored.
    pub event: ProcessEvent,
    /// True when it was already stored under its replay key (nothing new was written).
    pub replayed: bool,
}

/// The answer to a batch.
#[derive(Serialize, ToSchema)]
pub struct AppendedBatch {
    /// One answer per event, in seq order.
    pub events: Vec<Appended>,
}

/// One event's answer, or a batch's.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum AppendAnswer {
    /// `{"event": ..., "replayed": ...}`.
    One(Appended),
    /// `{"events": [...]}`.
    Batch(AppendedBatch),
}

/// One Server-Sent Event of `/v1/processes/{id}/stream`.
#[derive(Serialize, ToSchema)]
pub struct SseEvent {
    /// The event's seq (resume with `Last-Event-ID`).
    pub id: String,
    /// The event's type (`step`, `process.started`, `process.completed`, ...), or `error`.
    pub event: String,
    /// The event as JSON (a `ProcessEvent`), or for `error` an `ErrorDetail`.
    pub data: String,
}

/// What a prune deleted.
#[derive(Serialize, ToSchema)]
pub struct PruneAnswer {
    /// Processes that ended before this instant were deleted.
    pub cutoff: chrono::DateTime<chrono::Utc>,
    /// How many.
    pub pruned: PruneReport,
}

/// `/readyz`'s body.
#[derive(Serialize, ToSchema)]
pub struct Readiness {
    /// Whether the pod is ready.
    pub ready: bool,
    /// The pod id.
    pub pod: String,
    /// The database check: `{ok, schema_version}` or `{ok: false, error}`.
    pub database: Value,
    /// The listener's state.
    pub listener: String,
}

/// proclog's HTTP API.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "proclog",
        description = "Durable process-event logs on Postgres: register processes, append events \
                       with dense per-process seqs, stream them, and wait for terminal states. \
                       Every non-2xx answer is `{\"error\": {\"code\", \"message\"}}`. With a \
                       token configured, `/v1` requires `Authorization: Bearer <token>`."
    ),
    paths(
        routes::register,
        routes::list,
        routes::get,
        routes::children,
        super::schedules::create,
        super::schedules::list,
        super::schedules::get,
        super::schedules::delete,
        super::schedules::pause,
        super::schedules::resume,
        super::schedules::trigger,
        super::queues::list,
        super::queues::get,
        super::queues::set,
        super::queues::delete,
        routes::append,
        super::batches::append_many,
        routes::events,
        routes::stream,
        routes::complete,
        routes::cancel,
        routes::send_message,
        routes::await_terminal,
        routes::prune,
        routes::pods,
        super::healthz,
        super::readyz,
    ),
    components(schemas(
        routes::PodList,
        crate::store::PodView,
        ErrorBody,
        ErrorDetail,
        ProcessList,
        EventPage,
        Appended,
        AppendedBatch,
        AppendAnswer,
        super::batches::BatchBody,
        super::batches::BatchAppend,
        super::batches::BatchAnswer,
        super::batches::BatchResult,
        PruneAnswer,
        SseEvent,
        Readiness,
        ProcessId,
        ProcessRecord,
        ProcessEvent,
        ProcessRegistration,
        crate::model::RetryPolicy,
        crate::model::StartPolicy,
        crate::model::StartDecision,
        crate::schedule::ScheduleSpec,
        crate::schedule::ScheduleRecord,
        crate::schedule::OverlapPolicy,
        crate::schedule::CatchUpPolicy,
        super::schedules::ScheduleList,
        super::queues::QueueList,
        crate::queue::QueueLimits,
        crate::queue::Limits,
        crate::queue::RateLimit,
        crate::queue::QueueRecord,
        crate::queue::QueueView,
        crate::queue::KeyLoad,
        crate::model::Message,
        ProcessStatus,
        TerminalState,
        TerminalRecord,
        Disposition,
        LeaseInfo,
        LeaseFence,
        AppendRequest,
        AppendOutcome,
        Completion,
        PruneReport,
    )),
    tags(
        (name = "processes", description = "Register, read, end and wait for processes"),
        (name = "events", description = "Append to and read a process's log"),
        (name = "schedules", description = "Cron schedules: one process per due time"),
        (name = "queues", description = "Queue limits: concurrency, per pod and rate, per queue and per key"),
        (name = "health", description = "Liveness and readiness"),
    )
)]
pub struct ApiDoc;

/// The document, as served.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}
