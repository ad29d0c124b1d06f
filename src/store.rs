//! [`ClusterStore`]: what pods and operators read and write about the cluster, beside each
//! process's own state ([`crate::ProcessRegistry`]): which pods exist (presence), the
//! operator's views (pods, counts, the newest processes), readiness, and schedules.
//!
//! With the registry it is the one seam through which proclog talks to storage: nothing in
//! `pod/` or `http/` sends SQL or sees a connection pool. [`crate::pg::PgClusterStore`] is the
//! product; [`crate::InMemoryProcessRegistry`] implements it too, so a pod's worker, presence
//! and readiness run on it in tests.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::error::ProcessResult;
use crate::model::ProcessId;
use crate::queue::{QueueLimits, QueueRecord, QueueView};
use crate::schedule::{ScheduleRecord, ScheduleSpec};

/// What a pod says of itself in its heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresenceRecord {
    /// The pod id.
    pub pod_id: String,
    /// This pod process; a restart under the same pod id is a new incarnation.
    pub incarnation: uuid::Uuid,
    /// Where it serves its API and console, as it reports it.
    pub address: Option<String>,
    /// Its proclog version.
    pub version: String,
    /// Most processes it runs at once.
    pub concurrency: i32,
    /// Its state now.
    pub state: PresenceState,
    /// Its heartbeat period; its row is `gone` after three without one.
    pub heartbeat_every: Duration,
}

/// A pod's own view of its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PresenceState {
    /// Claiming and running processes.
    Running,
    /// Stopping: no new claims, runs finishing or being handed back.
    Draining,
    /// Stopped cleanly.
    Stopped,
}

impl PresenceState {
    /// The state as stored (`running`, `draining`, `stopped`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Draining => "draining",
            Self::Stopped => "stopped",
        }
    }
}

/// A pod as operators see it, with its liveness computed now.
#[derive(Clone, Debug, Serialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct PodView {
    /// The pod id.
    pub pod_id: String,
    /// `running`, `draining`, `stopped` or `gone` (no heartbeat for three periods).
    pub status: String,
    /// Where it serves its API, as it reports it.
    pub address: Option<String>,
    /// Its proclog version.
    pub version: String,
    /// Most processes it runs at once.
    pub concurrency: i32,
    /// When this incarnation started (the store's clock).
    pub started_at: DateTime<Utc>,
    /// Its last heartbeat (the store's clock).
    pub heartbeat_at: DateTime<Utc>,
    /// Seconds since its last heartbeat.
    pub heartbeat_age_secs: f64,
    /// When it stopped cleanly.
    pub stopped_at: Option<DateTime<Utc>>,
    /// Live leases it holds: the processes it is running.
    pub leases_held: i64,
}

/// One row of the operator's process list.
#[derive(Clone, Debug, Serialize)]
pub struct ProcessSummary {
    /// The process id.
    pub id: String,
    /// Its kind.
    pub kind: String,
    /// Its status.
    pub status: String,
    /// `rerun`, `abandon` or `external`.
    pub disposition: String,
    /// Runs started.
    pub attempts: i32,
    /// The lease owner while a lease is live.
    pub owner: Option<String>,
    /// Generation of the latest lease.
    pub lease_generation: i64,
    /// seq of its last event.
    pub last_seq: i64,
    /// Registration time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// Filters of [`ClusterStore::process_summaries`].
#[derive(Clone, Debug, Default)]
pub struct ProcessQuery {
    /// Only this status.
    pub status: Option<String>,
    /// Only this kind.
    pub kind: Option<String>,
    /// Only processes whose live lease this pod holds.
    pub owner: Option<String>,
    /// Only processes older than this one (keyset cursor: created_at, id).
    pub before: Option<(DateTime<Utc>, ProcessId)>,
    /// Page size, 1 to [`MAX_SUMMARY_PAGE`].
    pub limit: i64,
}

/// Largest page of [`ClusterStore::process_summaries`].
pub const MAX_SUMMARY_PAGE: i64 = 200;
/// Most pod rows [`ClusterStore::pods`] returns.
pub const MAX_PODS: usize = 500;
/// Rows of pods stopped or gone for this long are pruned by the running pods.
pub const PRUNE_PODS_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);

/// Presence, operator views and readiness. Every call is a point read or write, bounded.
#[async_trait]
pub trait ClusterStore: Send + Sync {
    /// Upserts the pod's row and heartbeats it on the store's clock. Within one incarnation a
    /// heartbeat never takes a draining or stopped row back to running; an older incarnation
    /// never marks its successor draining or stopped; a new incarnation starts afresh.
    async fn record_presence(&self, presence: &PresenceRecord) -> ProcessResult<()>;

    /// Deletes the rows of pods stopped, or gone, for longer than `older_than`; returns how
    /// many.
    async fn prune_pods(&self, older_than: Duration) -> ProcessResult<u64>;

    /// Every pod row (at most [`MAX_PODS`]), live ones first, with its status as of now:
    /// `gone` once its heartbeat is three periods old.
    async fn pods(&self) -> ProcessResult<Vec<PodView>>;

    /// Process counts by status (statuses with none are absent).
    async fn status_counts(&self) -> ProcessResult<Vec<(String, i64)>>;

    /// One page of processes, newest first.
    async fn process_summaries(&self, query: &ProcessQuery) -> ProcessResult<Vec<ProcessSummary>>;

    /// The schema version the store holds (readiness compares it with what this binary
    /// knows); `Unavailable` when the store does not answer.
    async fn schema_version(&self) -> ProcessResult<i32>;

    /// Creates a schedule whose first due time is `first_due` (the caller checked `spec`,
    /// see [`ScheduleSpec::validate`]). Creating an id again with the same spec returns the
    /// schedule as it is; another spec is `InvalidInput` (delete it first), and so is a new
    /// schedule beyond [`MAX_SCHEDULES`].
    async fn create_schedule(
        &self,
        spec: &ScheduleSpec,
        first_due: Option<DateTime<Utc>>,
    ) -> ProcessResult<ScheduleRecord>;

    /// The schedule, or `None`.
    async fn get_schedule(&self, id: &str) -> ProcessResult<Option<ScheduleRecord>>;

    /// Schedules by id, after `after`, at most `limit` (1 to [`MAX_SCHEDULE_PAGE`]).
    async fn list_schedules(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> ProcessResult<Vec<ScheduleRecord>>;

    /// Deletes the schedule (its processes stay); false when there was none.
    async fn delete_schedule(&self, id: &str) -> ProcessResult<bool>;

    /// Pauses the schedule, or resumes it with `next_due` as its next due time (the due
    /// times that passed while it was paused are skipped). `None` when there is none.
    async fn pause_schedule(
        &self,
        id: &str,
        paused: bool,
        next_due: Option<DateTime<Utc>>,
    ) -> ProcessResult<Option<ScheduleRecord>>;

    /// Claims, for `ttl`, up to `limit` schedules that are due and not claimed by another
    /// live claim, in due order; answers them with the store's clock.
    async fn claim_due_schedules(
        &self,
        owner: &str,
        ttl: Duration,
        limit: u32,
    ) -> ProcessResult<(Vec<ScheduleRecord>, DateTime<Utc>)>;

    /// Records a tick of schedule `id`, claimed by `owner`, whose next due time was
    /// `expected`: sets the progress and ends the claim. False (nothing written) when the row
    /// moved on meanwhile (deleted, paused, or produced by another claim).
    async fn advance_schedule(
        &self,
        id: &str,
        owner: &str,
        expected: Option<DateTime<Utc>>,
        progress: &ScheduleProgress,
    ) -> ProcessResult<bool>;

    /// The earliest instant a schedule that is not paused needs a pod: its next due time, or
    /// the end of its claim when that is later (held, or being produced by another pod).
    async fn next_schedule_due(&self) -> ProcessResult<Option<DateTime<Utc>>>;

    /// Sets a queue's limits (see [`crate::queue`]): the queue becomes controlled, or its
    /// limits are replaced; claims that begin afterwards follow them (work running already
    /// goes on). `InvalidInput` for a bad name or limits ([`QueueLimits::validate`]), and for
    /// a new queue beyond [`crate::queue::MAX_QUEUES`].
    async fn set_queue(&self, queue: &str, limits: &QueueLimits) -> ProcessResult<QueueRecord>;

    /// The controlled queue with its load (its busiest keys), or `None`.
    async fn get_queue(&self, queue: &str) -> ProcessResult<Option<QueueView>>;

    /// Controlled queues by name, after `after`, at most `limit` (1 to
    /// [`crate::queue::MAX_QUEUE_PAGE`]).
    async fn list_queues(&self, after: Option<&str>, limit: u32)
    -> ProcessResult<Vec<QueueRecord>>;

    /// Removes a queue's limits: its work is claimed as any other queue's again. False when
    /// it had none.
    async fn delete_queue(&self, queue: &str) -> ProcessResult<bool>;
}

/// Largest page of [`ClusterStore::list_schedules`] (at most 200 × 16 KiB of inputs).
pub const MAX_SCHEDULE_PAGE: u32 = 200;

/// Most schedules a store keeps: each costs every pod a look per due time.
pub const MAX_SCHEDULES: usize = 10_000;

/// What a tick of a schedule did ([`ClusterStore::advance_schedule`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduleProgress {
    /// The next due time not produced yet.
    pub next_due_at: Option<DateTime<Utc>>,
    /// Due times skipped by this tick.
    pub skipped: i64,
    /// The latest due time this tick produced a process for, and that process.
    pub last: Option<(DateTime<Utc>, ProcessId)>,
    /// `next_due_at` waits for the previous process (`queue_one`): the row is looked at
    /// again after [`HELD_RECHECK`], not at once.
    pub held: bool,
}

/// How long a due time held by `queue_one` waits before a pod looks at it again.
pub const HELD_RECHECK: Duration = Duration::from_secs(1);
