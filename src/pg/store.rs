//! [`PgClusterStore`]: presence, operator views and readiness on Postgres (`proclog.pods`,
//! the view `proclog.pod_status`, `proclog.processes`, `proclog.schema_migrations`).
//!
//! Presence and views run on the pod's request pool under a client-side bound of their own;
//! readiness runs on a pool of one connection of its own, so that a flood of requests holding
//! the request pool cannot make a pod report unready.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use tokio_postgres::types::ToSql;

use super::convert::{db_error, pool_error};
use crate::error::{ProcessError, ProcessResult};
use crate::model::ProcessId;
use crate::queue::{KeyLoad, MAX_LOAD_KEYS, MAX_QUEUES, QueueLimits, QueueRecord, QueueView};
use crate::schedule::{ScheduleRecord, ScheduleSpec};
use crate::store::{
    ClusterStore, HELD_RECHECK, MAX_PODS, MAX_SCHEDULE_PAGE, MAX_SCHEDULES, MAX_SUMMARY_PAGE,
    PodView, PresenceRecord, ProcessQuery, ProcessSummary, ScheduleProgress,
};

/// Bound on a presence write or a view's read, whatever the pool's own settings.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

const UPSERT_PRESENCE: &str = "
    INSERT INTO proclog.pods AS p (pod_id, incarnation, address, version, concurrency, state,
                                   heartbeat_every, stopped_at)
    VALUES ($1, $2, $3, $4, $5, $6, make_interval(secs => $7),
            -- now() when stopped, else NULL. No function inside a CASE or in DO UPDATE SET:
            -- Citus refuses both in a write to a reference table (the times come from the
            -- proposed row's defaults, now(), instead).
            now() + CASE WHEN $6 = 'stopped' THEN interval '0' END)
    ON CONFLICT (pod_id) DO UPDATE
       SET incarnation = EXCLUDED.incarnation,
           address = EXCLUDED.address,
           version = EXCLUDED.version,
           concurrency = EXCLUDED.concurrency,
           -- A heartbeat never takes a stopping pod back to running.
           state = CASE WHEN p.incarnation = EXCLUDED.incarnation
                         AND (p.state = 'stopped'
                              OR p.state = 'draining' AND EXCLUDED.state = 'running')
                        THEN p.state ELSE EXCLUDED.state END,
           started_at = CASE WHEN p.incarnation = EXCLUDED.incarnation THEN p.started_at
                             ELSE EXCLUDED.started_at END,
           heartbeat_at = EXCLUDED.heartbeat_at,
           heartbeat_every = EXCLUDED.heartbeat_every,
           stopped_at = CASE WHEN p.incarnation = EXCLUDED.incarnation
                              AND p.state = 'stopped' THEN p.stopped_at
                             ELSE EXCLUDED.stopped_at END
     -- An old incarnation (a process still stopping while its successor runs under the same
     -- pod id) does not mark the successor draining or stopped.
     WHERE p.incarnation = EXCLUDED.incarnation OR EXCLUDED.state = 'running'";

const PRUNE_PODS: &str = "
    DELETE FROM proclog.pods
     WHERE coalesce(stopped_at, heartbeat_at) < now() - make_interval(secs => $1)
       AND (state = 'stopped' OR heartbeat_at < now() - 3 * heartbeat_every)";

const PODS: &str = "
    SELECT pod_id, status, address, version, concurrency, started_at, heartbeat_at,
           extract(epoch FROM heartbeat_age)::float8 AS heartbeat_age_secs, stopped_at,
           leases_held
      FROM proclog.pod_status
     ORDER BY status IN ('stopped', 'gone'), pod_id
     LIMIT $1";

const STATUS_COUNTS: &str =
    "SELECT status, count(*) AS n FROM proclog.processes GROUP BY status ORDER BY status";

const PROCESS_SUMMARIES: &str = "
    SELECT process_id, kind, status, disposition, attempts,
           CASE WHEN lease_expires_at > now() THEN lease_owner END AS owner,
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
     LIMIT $6";

/// Presence, views and readiness on Postgres. Cheap to clone.
#[derive(Clone)]
pub struct PgClusterStore {
    pool: Pool,
    probe_pool: Pool,
}

impl PgClusterStore {
    /// A store on `pool`, answering readiness on `probe_pool` (one connection of its own is
    /// enough; give it short timeouts).
    pub fn new(pool: Pool, probe_pool: Pool) -> Self {
        Self { pool, probe_pool }
    }

    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> ProcessResult<Vec<tokio_postgres::Row>> {
        let call = async {
            let client = self.pool.get().await.map_err(pool_error)?;
            let statement = client.prepare_cached(sql).await.map_err(db_error)?;
            client.query(&statement, params).await.map_err(db_error)
        };
        tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .unwrap_or_else(|_| {
                Err(ProcessError::Unavailable(format!(
                    "no answer from the database within {CALL_TIMEOUT:?}"
                )))
            })
    }
}

fn get<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a tokio_postgres::Row,
    column: &str,
) -> ProcessResult<T> {
    row.try_get(column).map_err(db_error)
}

#[async_trait]
impl ClusterStore for PgClusterStore {
    async fn record_presence(&self, presence: &PresenceRecord) -> ProcessResult<()> {
        self.query(
            UPSERT_PRESENCE,
            &[
                &presence.pod_id,
                &presence.incarnation,
                &presence.address,
                &presence.version,
                &presence.concurrency,
                &presence.state.as_str(),
                &presence.heartbeat_every.as_secs_f64(),
            ],
        )
        .await
        .map(|_| ())
    }

    async fn prune_pods(&self, older_than: Duration) -> ProcessResult<u64> {
        let secs = older_than.as_secs_f64();
        let call = async {
            let client = self.pool.get().await.map_err(pool_error)?;
            client.execute(PRUNE_PODS, &[&secs]).await.map_err(db_error)
        };
        tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| ProcessError::Unavailable("pruning pod rows timed out".into()))?
    }

    async fn pods(&self) -> ProcessResult<Vec<PodView>> {
        let limit = MAX_PODS as i64;
        self.query(PODS, &[&limit])
            .await?
            .iter()
            .map(|row| {
                Ok(PodView {
                    pod_id: get(row, "pod_id")?,
                    status: get(row, "status")?,
                    address: get(row, "address")?,
                    version: get(row, "version")?,
                    concurrency: get(row, "concurrency")?,
                    started_at: get(row, "started_at")?,
                    heartbeat_at: get(row, "heartbeat_at")?,
                    heartbeat_age_secs: get(row, "heartbeat_age_secs")?,
                    stopped_at: get(row, "stopped_at")?,
                    leases_held: get(row, "leases_held")?,
                })
            })
            .collect()
    }

    async fn status_counts(&self) -> ProcessResult<Vec<(String, i64)>> {
        self.query(STATUS_COUNTS, &[])
            .await?
            .iter()
            .map(|row| Ok((get(row, "status")?, get(row, "n")?)))
            .collect()
    }

    async fn process_summaries(&self, query: &ProcessQuery) -> ProcessResult<Vec<ProcessSummary>> {
        let limit = query.limit.clamp(1, MAX_SUMMARY_PAGE);
        let (before_at, before_id) = match &query.before {
            Some((at, id)) => (Some(*at), Some(id.as_str().to_owned())),
            None => (None, None),
        };
        self.query(
            PROCESS_SUMMARIES,
            &[
                &query.status,
                &query.kind,
                &query.owner,
                &before_at,
                &before_id,
                &limit,
            ],
        )
        .await?
        .iter()
        .map(|row| {
            Ok(ProcessSummary {
                id: get(row, "process_id")?,
                kind: get(row, "kind")?,
                status: get(row, "status")?,
                disposition: get(row, "disposition")?,
                attempts: get(row, "attempts")?,
                owner: get(row, "owner")?,
                lease_generation: get(row, "lease_generation")?,
                last_seq: get(row, "last_seq")?,
                created_at: get(row, "created_at")?,
                updated_at: get(row, "updated_at")?,
            })
        })
        .collect()
    }

    async fn schema_version(&self) -> ProcessResult<i32> {
        super::migrate::schema_version(&self.probe_pool).await
    }

    async fn create_schedule(
        &self,
        spec: &ScheduleSpec,
        first_due: Option<DateTime<Utc>>,
    ) -> ProcessResult<ScheduleRecord> {
        let limit = i32::try_from(spec.catch_up_limit).unwrap_or(i32::MAX);
        let inserted = self
            .query(
                &format!(
                    "INSERT INTO proclog.schedules
                            (schedule_id, cron, time_zone, kind, input, disposition, overlap,
                             catch_up, catch_up_limit, next_due_at, missed_after_ms, queue)
                     SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $13
                      WHERE (SELECT count(*) FROM proclog.schedules) < $12
                     ON CONFLICT (schedule_id) DO NOTHING
                     RETURNING {SCHEDULE_COLUMNS}"
                ),
                &[
                    &spec.id,
                    &spec.cron,
                    &spec.time_zone,
                    &spec.kind,
                    &spec.input,
                    &spec.disposition.as_str(),
                    &spec.overlap.as_str(),
                    &spec.catch_up.as_str(),
                    &limit,
                    &first_due,
                    &i64::try_from(spec.missed_after_ms).unwrap_or(i64::MAX),
                    &(MAX_SCHEDULES as i64),
                    &spec.queue,
                ],
            )
            .await?;
        if let Some(row) = inserted.first() {
            return schedule_from_row(row);
        }
        match self.get_schedule(&spec.id).await? {
            Some(existing) if crate::schedule::same_spec(&existing.spec, spec) => Ok(existing),
            Some(_) => Err(ProcessError::InvalidInput(format!(
                "schedule {} exists with another definition: delete it first",
                spec.id
            ))),
            None => Err(ProcessError::InvalidInput(format!(
                "there are {MAX_SCHEDULES} schedules already, the most a store keeps"
            ))),
        }
    }

    async fn get_schedule(&self, id: &str) -> ProcessResult<Option<ScheduleRecord>> {
        let rows = self
            .query(
                &format!("SELECT {SCHEDULE_COLUMNS} FROM proclog.schedules WHERE schedule_id = $1"),
                &[&id],
            )
            .await?;
        rows.first().map(schedule_from_row).transpose()
    }

    async fn list_schedules(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> ProcessResult<Vec<ScheduleRecord>> {
        let limit = i64::from(limit.clamp(1, MAX_SCHEDULE_PAGE));
        let rows = self
            .query(
                &format!(
                    "SELECT {SCHEDULE_COLUMNS} FROM proclog.schedules
                      WHERE $1::text IS NULL OR schedule_id > $1
                      ORDER BY schedule_id LIMIT $2"
                ),
                &[&after, &limit],
            )
            .await?;
        rows.iter().map(schedule_from_row).collect()
    }

    async fn delete_schedule(&self, id: &str) -> ProcessResult<bool> {
        let rows = self
            .query(
                "DELETE FROM proclog.schedules WHERE schedule_id = $1 RETURNING schedule_id",
                &[&id],
            )
            .await?;
        Ok(!rows.is_empty())
    }

    async fn pause_schedule(
        &self,
        id: &str,
        paused: bool,
        next_due: Option<DateTime<Utc>>,
    ) -> ProcessResult<Option<ScheduleRecord>> {
        // A resume of a schedule that is not paused changes nothing (its progress stands).
        let rows = self
            .query(
                &format!(
                    "UPDATE proclog.schedules
                        SET paused = $2,
                            next_due_at = CASE WHEN paused AND NOT $2 THEN $3 ELSE next_due_at END,
                            held = held AND NOT $2 AND NOT paused,
                            claimed_by = NULL, claimed_until = NULL, updated_at = now()
                      WHERE schedule_id = $1
                  RETURNING {SCHEDULE_COLUMNS}"
                ),
                &[&id, &paused, &next_due],
            )
            .await?;
        rows.first().map(schedule_from_row).transpose()
    }

    async fn claim_due_schedules(
        &self,
        owner: &str,
        ttl: Duration,
        limit: u32,
    ) -> ProcessResult<(Vec<ScheduleRecord>, DateTime<Utc>)> {
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let limit = i64::from(limit.clamp(1, MAX_SCHEDULE_PAGE));
        let rows = self
            .query(
                &format!(
                    "WITH due AS (
                         SELECT schedule_id AS due_id FROM proclog.schedules
                          WHERE NOT paused AND next_due_at <= now()
                            AND (claimed_until IS NULL OR claimed_until <= now())
                          ORDER BY next_due_at
                          LIMIT $3
                            FOR UPDATE SKIP LOCKED)
                     UPDATE proclog.schedules s
                        SET claimed_by = $1,
                            claimed_until = now() + $2::bigint * interval '1 millisecond'
                       FROM due
                      WHERE s.schedule_id = due.due_id
                  RETURNING {SCHEDULE_COLUMNS}, now() AS store_now"
                ),
                &[&owner, &ttl_ms, &limit],
            )
            .await?;
        let now = match rows.first() {
            Some(row) => row.try_get("store_now").map_err(db_error)?,
            None => self
                .query("SELECT now() AS store_now", &[])
                .await?
                .first()
                .ok_or_else(|| ProcessError::Database("now() returned no row".into()))?
                .try_get("store_now")
                .map_err(db_error)?,
        };
        let schedules = rows
            .iter()
            .map(schedule_from_row)
            .collect::<ProcessResult<Vec<_>>>()?;
        Ok((schedules, now))
    }

    async fn advance_schedule(
        &self,
        id: &str,
        owner: &str,
        expected: Option<DateTime<Utc>>,
        progress: &ScheduleProgress,
    ) -> ProcessResult<bool> {
        let (last_due, last_process) = match &progress.last {
            Some((due, process)) => (Some(*due), Some(process.as_str())),
            None => (None, None),
        };
        let rows = self
            .query(
                "UPDATE proclog.schedules
                    SET next_due_at = $4,
                        skipped = skipped + $5,
                        last_due_at = coalesce($6, last_due_at),
                        last_process_id = coalesce($7, last_process_id),
                        held = $8,
                        claimed_by = NULL,
                        claimed_until = CASE WHEN $8
                                             THEN now() + $9::bigint * interval '1 millisecond'
                                        END,
                        updated_at = now()
                  WHERE schedule_id = $1 AND claimed_by = $2 AND NOT paused
                    AND next_due_at IS NOT DISTINCT FROM $3
              RETURNING schedule_id",
                &[
                    &id,
                    &owner,
                    &expected,
                    &progress.next_due_at,
                    &progress.skipped,
                    &last_due,
                    &last_process,
                    &progress.held,
                    &(HELD_RECHECK.as_millis() as i64),
                ],
            )
            .await?;
        Ok(!rows.is_empty())
    }

    async fn next_schedule_due(&self) -> ProcessResult<Option<DateTime<Utc>>> {
        let rows = self
            .query(
                "SELECT min(greatest(next_due_at, claimed_until)) AS due
                   FROM proclog.schedules WHERE NOT paused AND next_due_at IS NOT NULL",
                &[],
            )
            .await?;
        match rows.first() {
            Some(row) => row.try_get("due").map_err(db_error),
            None => Ok(None),
        }
    }

    async fn set_queue(&self, queue: &str, limits: &QueueLimits) -> ProcessResult<QueueRecord> {
        crate::queue::queue_name(queue)?;
        limits.validate()?;
        let document = serde_json::to_value(limits)
            .map_err(|err| ProcessError::InvalidInput(format!("queue limits: {err}")))?;
        let most = MAX_QUEUES as i64;
        let rows = self
            .query(
                "INSERT INTO proclog.queues AS q (queue, limits)
                 SELECT $1, $2
                  WHERE EXISTS (SELECT 1 FROM proclog.queues WHERE queue = $1)
                     OR (SELECT count(*) FROM proclog.queues) < $3
                 ON CONFLICT (queue) DO UPDATE
                    SET limits = EXCLUDED.limits, updated_at = EXCLUDED.updated_at
                 RETURNING queue, limits, cursor_key, updated_at",
                &[&queue, &document, &most],
            )
            .await?;
        match rows.first() {
            Some(row) => queue_from_row(row),
            None => Err(ProcessError::InvalidInput(format!(
                "at most {MAX_QUEUES} queues may have limits: remove one first"
            ))),
        }
    }

    async fn get_queue(&self, queue: &str) -> ProcessResult<Option<QueueView>> {
        let rows = self
            .query(
                "SELECT queue, limits, cursor_key, updated_at FROM proclog.queues
                  WHERE queue = $1",
                &[&queue],
            )
            .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let record = queue_from_row(row)?;
        // The database's clock, as a parameter: Citus takes no now() inside an aggregate's
        // filter on a distributed table.
        let at: DateTime<Utc> = self
            .query("SELECT now()", &[])
            .await?
            .first()
            .map(|row| row.get(0))
            .ok_or_else(|| ProcessError::Database("now() returned no row".into()))?;
        let rows = self
            .query(
                "SELECT concurrency_key,
                        count(*) FILTER (WHERE lease_expires_at > $2) AS running,
                        count(*) FILTER (WHERE (lease_expires_at IS NULL OR lease_expires_at <= $2)
                                           AND (deadline <= $2
                                                OR (disposition <> 'external'
                                                    AND coalesce(wake_at, created_at) <= $2)))
                            AS ready
                   FROM proclog.processes
                  WHERE coalesce(queue, kind) = $1 AND terminal_state IS NULL
                  GROUP BY concurrency_key",
                &[&queue, &at],
            )
            .await?;
        let mut keys: Vec<KeyLoad> = rows
            .iter()
            .map(|row| KeyLoad {
                key: row.get("concurrency_key"),
                running: row.get::<_, i64>("running") as u64,
                ready: row.get::<_, i64>("ready") as u64,
            })
            .filter(|load| load.running + load.ready > 0)
            .collect();
        crate::queue::sort_load(&mut keys);
        keys.truncate(MAX_LOAD_KEYS);
        Ok(Some(QueueView { record, keys }))
    }

    async fn list_queues(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> ProcessResult<Vec<QueueRecord>> {
        crate::queue::page_limit(limit)?;
        self.query(
            "SELECT queue, limits, cursor_key, updated_at FROM proclog.queues
              WHERE queue > coalesce($1, '') COLLATE \"C\"
              ORDER BY queue COLLATE \"C\" LIMIT $2",
            &[&after, &i64::from(limit)],
        )
        .await?
        .iter()
        .map(queue_from_row)
        .collect()
    }

    async fn delete_queue(&self, queue: &str) -> ProcessResult<bool> {
        let rows = self
            .query(
                "DELETE FROM proclog.queues WHERE queue = $1 RETURNING queue",
                &[&queue],
            )
            .await?;
        self.query(
            "DELETE FROM proclog.queue_starts WHERE queue = $1",
            &[&queue],
        )
        .await?;
        Ok(!rows.is_empty())
    }
}

/// The columns [`schedule_from_row`] reads.
const SCHEDULE_COLUMNS: &str = "schedule_id, cron, time_zone, kind, input, disposition, overlap, \
     catch_up, catch_up_limit, missed_after_ms, queue, paused, held, next_due_at, last_due_at, last_process_id, skipped, \
     created_at";

fn schedule_from_row(row: &tokio_postgres::Row) -> ProcessResult<ScheduleRecord> {
    let text = |name: &str| -> ProcessResult<String> { row.try_get(name).map_err(db_error) };
    fn parse<T: serde::de::DeserializeOwned>(name: &str, value: String) -> ProcessResult<T> {
        serde_json::from_value(serde_json::Value::String(value.clone()))
            .map_err(|_| ProcessError::Database(format!("schedule row holds {name} {value:?}")))
    }
    let last_process: Option<String> = row.try_get("last_process_id").map_err(db_error)?;
    let limit: i32 = row.try_get("catch_up_limit").map_err(db_error)?;
    Ok(ScheduleRecord {
        spec: ScheduleSpec {
            id: text("schedule_id")?,
            cron: text("cron")?,
            time_zone: text("time_zone")?,
            kind: text("kind")?,
            input: row.try_get("input").map_err(db_error)?,
            disposition: parse("disposition", text("disposition")?)?,
            overlap: parse("overlap", text("overlap")?)?,
            catch_up: parse("catch_up", text("catch_up")?)?,
            catch_up_limit: u32::try_from(limit).unwrap_or_default(),
            missed_after_ms: u64::try_from(
                row.try_get::<_, i64>("missed_after_ms").map_err(db_error)?,
            )
            .unwrap_or_default(),
            queue: row.try_get("queue").map_err(db_error)?,
        },
        paused: row.try_get("paused").map_err(db_error)?,
        next_due_at: row.try_get("next_due_at").map_err(db_error)?,
        last_due_at: row.try_get("last_due_at").map_err(db_error)?,
        last_process_id: last_process
            .map(|id| ProcessId::new(id).map_err(|err| ProcessError::Database(err.to_string())))
            .transpose()?,
        skipped: row.try_get("skipped").map_err(db_error)?,
        held: row.try_get("held").map_err(db_error)?,
        created_at: row.try_get("created_at").map_err(db_error)?,
    })
}

/// A row of `proclog.queues` (its limits as the library wrote them; a document written by
/// hand that cannot be read is an error naming the queue).
fn queue_from_row(row: &tokio_postgres::Row) -> ProcessResult<QueueRecord> {
    let queue: String = row.try_get("queue").map_err(db_error)?;
    let limits: serde_json::Value = row.try_get("limits").map_err(db_error)?;
    let limits = serde_json::from_value(limits).map_err(|err| {
        ProcessError::Database(format!("the limits of queue {queue} cannot be read: {err}"))
    })?;
    Ok(QueueRecord {
        queue,
        limits,
        cursor_key: row.try_get("cursor_key").map_err(db_error)?,
        updated_at: row.try_get("updated_at").map_err(db_error)?,
    })
}
