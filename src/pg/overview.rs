//! Read-only views for operators (the console and `GET /v1/pods`): pods with their liveness,
//! process counts by status, and a newest-first process list filtered by status, kind and
//! lease owner, with keyset paging. Every query is bounded (limits, indexed predicates).

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use serde::Serialize;

use super::convert::{db_error, pool_error};
use crate::error::ProcessResult;
use crate::model::ProcessId;

/// A pod as `proclog.pod_status` shows it.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
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
    /// When this incarnation started (database clock).
    pub started_at: DateTime<Utc>,
    /// Its last heartbeat (database clock).
    pub heartbeat_at: DateTime<Utc>,
    /// Seconds since its last heartbeat.
    pub heartbeat_age_secs: f64,
    /// When it stopped cleanly.
    pub stopped_at: Option<DateTime<Utc>>,
    /// Live leases it holds: the processes it is running.
    pub leases_held: i64,
}

/// One row of the process list.
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

/// Filters of [`processes`]. Empty strings are no filter.
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
    /// Page size, 1 to 200.
    pub limit: i64,
}

/// Largest page of [`processes`].
pub const MAX_PAGE: i64 = 200;

/// Every pod row, live ones first.
pub async fn pods(pool: &Pool) -> ProcessResult<Vec<PodView>> {
    let client = pool.get().await.map_err(pool_error)?;
    let rows = client
        .query(
            "SELECT pod_id, status, address, version, concurrency, started_at, heartbeat_at,
                    extract(epoch FROM heartbeat_age)::float8, stopped_at, leases_held
               FROM proclog.pod_status
              ORDER BY status IN ('stopped', 'gone'), pod_id
              LIMIT 500",
            &[],
        )
        .await
        .map_err(db_error)?;
    Ok(rows
        .iter()
        .map(|row| PodView {
            pod_id: row.get(0),
            status: row.get(1),
            address: row.get(2),
            version: row.get(3),
            concurrency: row.get(4),
            started_at: row.get(5),
            heartbeat_at: row.get(6),
            heartbeat_age_secs: row.get(7),
            stopped_at: row.get(8),
            leases_held: row.get(9),
        })
        .collect())
}

/// Process counts by status (statuses with none are absent).
pub async fn status_counts(pool: &Pool) -> ProcessResult<Vec<(String, i64)>> {
    let client = pool.get().await.map_err(pool_error)?;
    let rows = client
        .query(
            "SELECT status, count(*) FROM proclog.processes GROUP BY status ORDER BY status",
            &[],
        )
        .await
        .map_err(db_error)?;
    Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
}

/// One page of processes, newest first.
pub async fn processes(pool: &Pool, query: &ProcessQuery) -> ProcessResult<Vec<ProcessSummary>> {
    let limit = query.limit.clamp(1, MAX_PAGE);
    let (before_at, before_id) = match &query.before {
        Some((at, id)) => (Some(*at), Some(id.as_str().to_owned())),
        None => (None, None),
    };
    let client = pool.get().await.map_err(pool_error)?;
    let rows = client
        .query(
            "SELECT process_id, kind, status, disposition, attempts,
                    CASE WHEN lease_expires_at > now() THEN lease_owner END,
                    lease_generation, last_seq, created_at, updated_at
               FROM proclog.processes
              WHERE ($1::text IS NULL OR status = $1)
                AND ($2::text IS NULL OR kind = $2)
                AND ($3::text IS NULL
                     OR (lease_owner = $3 AND lease_expires_at > now()
                         AND terminal_state IS NULL AND disposition <> 'external'
                         AND lease_expires_at IS NOT NULL))
                AND ($4::timestamptz IS NULL OR (created_at, process_id) < ($4, $5::text))
              ORDER BY created_at DESC, process_id DESC
              LIMIT $6",
            &[
                &query.status,
                &query.kind,
                &query.owner,
                &before_at,
                &before_id,
                &limit,
            ],
        )
        .await
        .map_err(db_error)?;
    Ok(rows
        .iter()
        .map(|row| ProcessSummary {
            id: row.get(0),
            kind: row.get(1),
            status: row.get(2),
            disposition: row.get(3),
            attempts: row.get(4),
            owner: row.get(5),
            lease_generation: row.get(6),
            last_seq: row.get(7),
            created_at: row.get(8),
            updated_at: row.get(9),
        })
        .collect())
}
