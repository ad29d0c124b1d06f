//! `PgProcessRegistry`: the registry contract on Postgres.
//!
//! Every write is one statement (appends and completions call the schema's plpgsql functions),
//! so a write costs one round trip on a warm pooled connection with a cached prepared
//! statement. Error paths may take a second, diagnostic query.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_postgres::{Object, Pool};
use tokio_postgres::types::ToSql;

use super::convert::{
    JsonText, PROCESS_COLUMNS, db_error, event_columns, event_from_row, pool_error,
    process_columns, process_from_row, sized_event_from_row, sized_process_from_row,
    terminal_from_row, write_error,
};
use super::group::{GroupCommit, GroupCommitOptions, GroupCommitStats, Pending};
use crate::error::{ProcessError, ProcessResult};
use crate::model::{
    AppendOutcome, AppendRequest, ClaimOutcome, Completion, Lease, ListCursor, LostOwner,
    ProcessEvent, ProcessFilter, ProcessId, ProcessPage, ProcessRecord, ProcessRegistration,
    PruneReport, RunnableClaim, TerminalRecord,
};
use crate::registry::{ProcessRegistry, RegistryConfig};
use crate::validate;

/// The Postgres process registry. Cheap to clone: clones share the pool (and the group
/// commit flushers).
#[derive(Clone)]
pub struct PgProcessRegistry {
    pool: Pool,
    config: RegistryConfig,
    call_timeout: Option<Duration>,
    /// `None`: every append is its own statement.
    group: Option<Arc<GroupSlot>>,
}

/// Group commit of a registry and its clones, started at the first append (so that a
/// registry can be built outside a Tokio runtime).
struct GroupSlot {
    options: GroupCommitOptions,
    stats: Arc<GroupCommitStats>,
    /// The flushers; started again if the runtime that ran them has gone.
    running: Mutex<Option<Arc<GroupCommit>>>,
}

impl GroupSlot {
    fn new(options: GroupCommitOptions) -> Arc<Self> {
        Arc::new(Self {
            options,
            stats: Arc::new(GroupCommitStats::default()),
            running: Mutex::new(None),
        })
    }

    fn flushers(&self, single: impl FnOnce() -> PgProcessRegistry) -> Arc<GroupCommit> {
        let mut running = self
            .running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match running.as_ref() {
            Some(group) if group.is_running() => Arc::clone(group),
            _ => {
                let group = Arc::new(GroupCommit::start(
                    &self.options,
                    single(),
                    Arc::clone(&self.stats),
                ));
                *running = Some(Arc::clone(&group));
                group
            }
        }
    }
}

/// Appends unkeyed events in one statement: the per-process counter is bumped under the
/// process row's lock (only if the process is not terminal and the fence, if any, is the live
/// lease), and the events are inserted at the seqs it yields. Returns nothing when refused.
const APPEND_UNKEYED: &str = "
    WITH p AS (
        UPDATE proclog.processes
           SET last_seq = last_seq + cardinality($4::text[]),
               status = CASE WHEN status = 'pending' THEN 'running' ELSE status END,
               updated_at = now()
         WHERE process_id = $1
           AND terminal_state IS NULL
           AND proclog.fence_holds($3::uuid, lease_token, lease_expires_at)
        RETURNING last_seq, lease_generation)
    INSERT INTO proclog.events
           (process_id, seq, event_type, payload, writer, lease_generation)
    SELECT $1, p.last_seq - cardinality($4::text[]) + r.ord, r.t, r.p, $2,
           CASE WHEN $3::uuid IS NULL THEN NULL ELSE p.lease_generation END
      FROM p, unnest($4::text[], $5::jsonb[]) WITH ORDINALITY AS r(t, p, ord)
    RETURNING seq, occurred_at, lease_generation";

/// One page of a log: at most `$3` events after seq `$2`, taken while the payloads before
/// each (by stored size, which `pg_column_size` reads without decompressing) add up to less
/// than `$4` bytes; the first event always.
const EVENTS_PAGE: &str = concat!(
    "SELECT ",
    event_columns!(),
    " FROM (SELECT e.*, sum(pg_column_size(e.payload)) OVER (ORDER BY e.seq) AS upto
            FROM proclog.events e
           WHERE e.process_id = $1 AND e.seq > $2
           ORDER BY e.seq LIMIT $3) page
     WHERE upto - pg_column_size(payload) < $4
     ORDER BY seq"
);

/// The bound on a group commit flusher's statements when the registry has no call timeout.
const FLUSHER_CALL_TIMEOUT: Duration = Duration::from_secs(30);

fn ttl_millis(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).expect("validated ttl fits")
}

impl PgProcessRegistry {
    /// A registry over `pool` (whose database must be migrated, see [`crate::pg::migrate()`]).
    ///
    /// Group commit is on, with [`GroupCommitOptions::default`]: see
    /// [`Self::with_group_commit`].
    pub fn new(pool: Pool, config: RegistryConfig) -> Self {
        Self {
            pool,
            config,
            call_timeout: None,
            group: Some(GroupSlot::new(GroupCommitOptions::default())),
        }
    }

    /// The same registry with group commit set by `options`, or off (`None`): then every
    /// append is a statement of its own. With it on, appends that arrive while a statement
    /// is in flight are sent together as one (see [`crate::pg::group`]); every guarantee of
    /// the registry contract holds either way.
    pub fn with_group_commit(mut self, options: Option<GroupCommitOptions>) -> Self {
        self.group = options.map(GroupSlot::new);
        self
    }

    /// Counters of group commit (`None` when it is off).
    pub fn group_commit_stats(&self) -> Option<Arc<GroupCommitStats>> {
        self.group.as_ref().map(|slot| Arc::clone(&slot.stats))
    }

    /// The registry without group commit: what the flushers use for batches of one. Its
    /// calls are always bounded (by the registry's call timeout, else 30 s), so that a
    /// stalled connection cannot hold every process routed to one flusher.
    fn single(&self) -> Self {
        Self {
            group: None,
            call_timeout: Some(self.call_timeout.unwrap_or(FLUSHER_CALL_TIMEOUT)),
            ..self.clone()
        }
    }

    /// One append as a statement of its own.
    pub(crate) async fn append_single(
        &self,
        id: &ProcessId,
        requests: Vec<AppendRequest>,
        payloads: &[JsonText],
    ) -> ProcessResult<Vec<AppendOutcome>> {
        if requests.iter().any(|r| r.replay_key.is_some()) {
            self.append_keyed(id, &requests, payloads).await
        } else {
            self.append_unkeyed(id, requests, payloads).await
        }
    }

    /// [`Self::run`], for the group commit flushers.
    pub(crate) async fn run_statement(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        on_error: impl FnOnce(tokio_postgres::Error) -> ProcessError,
    ) -> ProcessResult<Vec<tokio_postgres::Row>> {
        self.run(sql, params, on_error).await
    }

    /// The same registry with a client-side bound on every statement's round trip: past it
    /// the call is `Unavailable` and its connection is discarded, not returned to the pool.
    ///
    /// The server's `statement_timeout` cannot end a call whose packets never reach the
    /// server (a stalled network, a blackholed route); this bound can. A write cut by it may
    /// or may not have committed, like any `Unavailable` write: retry it with its replay key.
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = Some(timeout);
        self
    }

    /// The pool this registry uses.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The config this registry was built with.
    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    async fn client(&self) -> ProcessResult<Object> {
        self.pool.get().await.map_err(pool_error)
    }

    /// Runs `sql` as a cached prepared statement (one round trip once warm), mapping a
    /// database error with `on_error` and a pool failure to `Unavailable`.
    async fn run(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        on_error: impl FnOnce(tokio_postgres::Error) -> ProcessError,
    ) -> ProcessResult<Vec<tokio_postgres::Row>> {
        let client = self.client().await?;
        let call = async {
            let statement = client.prepare_cached(sql).await.map_err(db_error)?;
            client.query(&statement, params).await.map_err(on_error)
        };
        let Some(limit) = self.call_timeout else {
            return call.await;
        };
        match tokio::time::timeout(limit, call).await {
            Ok(result) => result,
            Err(_) => {
                // The connection may still carry the unanswered call: never reuse it.
                drop(Object::take(client));
                Err(ProcessError::Unavailable(format!(
                    "no answer from the database within {limit:?}"
                )))
            }
        }
    }

    /// Runs `sql` and decodes its rows one at a time with `decode` (which also gives each
    /// row's size in bytes), stopping once the rows taken reach `budget` bytes: a page held
    /// to a byte budget in memory even when the statement's own cut (by stored, possibly
    /// compressed sizes) lets more through. Rows not taken are discarded as they arrive.
    /// Returns the rows taken and whether any were left.
    async fn query_page<T>(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        budget: usize,
        mut decode: impl FnMut(&tokio_postgres::Row) -> ProcessResult<(T, usize)>,
    ) -> ProcessResult<(Vec<T>, bool)> {
        let client = self.client().await?;
        let call = async {
            let statement = client.prepare_cached(sql).await.map_err(db_error)?;
            let rows = client
                .query_raw(&statement, params.iter().copied())
                .await
                .map_err(db_error)?;
            futures::pin_mut!(rows);
            let mut taken = Vec::new();
            let mut bytes = 0usize;
            while let Some(row) = futures::TryStreamExt::try_next(&mut rows)
                .await
                .map_err(db_error)?
            {
                if bytes >= budget {
                    return Ok((taken, true));
                }
                let (item, size) = decode(&row)?;
                bytes = bytes.saturating_add(size);
                taken.push(item);
            }
            Ok((taken, false))
        };
        let Some(limit) = self.call_timeout else {
            return call.await;
        };
        match tokio::time::timeout(limit, call).await {
            Ok(result) => result,
            Err(_) => {
                drop(Object::take(client));
                Err(ProcessError::Unavailable(format!(
                    "no answer from the database within {limit:?}"
                )))
            }
        }
    }

    /// [`Self::run`] for statements whose errors carry no process-specific meaning.
    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> ProcessResult<Vec<tokio_postgres::Row>> {
        self.run(sql, params, db_error).await
    }

    /// The common case: one plain SQL statement. It returns only what the database decided
    /// (seq, time, generation); the events are rebuilt from the requests. When it writes
    /// nothing, a second, diagnostic round trip says why (not found, terminal, lease lost).
    async fn append_unkeyed(
        &self,
        id: &ProcessId,
        requests: Vec<AppendRequest>,
        payloads: &[JsonText],
    ) -> ProcessResult<Vec<AppendOutcome>> {
        let token = requests[0].fence.map(|fence| fence.token);
        let types: Vec<&str> = requests.iter().map(|r| r.event_type.as_str()).collect();
        let mut rows = self
            .query(
                APPEND_UNKEYED,
                &[&id.as_str(), &self.config.writer, &token, &types, &payloads],
            )
            .await?;
        if rows.len() != requests.len() {
            self.run("SELECT proclog.refuse_write($1)", &[&id.as_str()], |err| {
                write_error(id, err)
            })
            .await?;
            return Err(ProcessError::Database(format!(
                "append to {id} wrote {} of {} events and no reason was found",
                rows.len(),
                requests.len()
            )));
        }
        rows.sort_by_key(|row| row.get::<_, i64>(0));
        requests
            .into_iter()
            .zip(&rows)
            .map(|(request, row)| {
                Ok(AppendOutcome {
                    event: ProcessEvent {
                        process_id: id.clone(),
                        seq: row.try_get(0).map_err(db_error)?,
                        event_type: request.event_type,
                        payload: request.payload,
                        replay_key: None,
                        occurred_at: row.try_get(1).map_err(db_error)?,
                        writer: self.config.writer.clone(),
                        lease_generation: row.try_get(2).map_err(db_error)?,
                    },
                    replayed: false,
                })
            })
            .collect()
    }

    /// Batches with replay keys are decided under the process row lock by the schema's
    /// `proclog.append_events` function; replays come back in request order.
    async fn append_keyed(
        &self,
        id: &ProcessId,
        requests: &[AppendRequest],
        payloads: &[JsonText],
    ) -> ProcessResult<Vec<AppendOutcome>> {
        let token = requests[0].fence.map(|fence| fence.token);
        let types: Vec<&str> = requests.iter().map(|r| r.event_type.as_str()).collect();
        let keys: Vec<Option<&str>> = requests.iter().map(|r| r.replay_key.as_deref()).collect();
        let rows = self
            .run(
                "SELECT seq, event_type, payload, replay_key, occurred_at, writer,
                        lease_generation, replayed
                   FROM proclog.append_events($1, $2, $3, $4, $5, $6)",
                &[
                    &id.as_str(),
                    &self.config.writer,
                    &token,
                    &types,
                    &payloads,
                    &keys,
                ],
                |err| write_error(id, err),
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(AppendOutcome {
                    event: event_from_row(id, row)?,
                    replayed: row.try_get(7).map_err(db_error)?,
                })
            })
            .collect()
    }

    /// A claimed process whose row cannot be read back (written by hand over SQL) can never
    /// run: it is completed `failed` with the reason, under the lease just granted, so that
    /// it is neither handed to an engine nor claimed again and again. Only this process is
    /// affected; the rest of the batch runs. If the completion cannot be written now, the
    /// lease lapses and a later claim tries again.
    async fn fail_unreadable(
        &self,
        row: &tokio_postgres::Row,
        token: uuid::Uuid,
        owner: &str,
        err: ProcessError,
    ) {
        let ProcessError::Undecodable { id, .. } = &err else {
            return;
        };
        tracing::error!(process_id = %id, error = %err, "a claimed process cannot be read back: failing it");
        let generation: i64 = row.try_get(9).unwrap_or_default();
        let fence = Lease {
            process_id: id.clone(),
            owner: owner.to_owned(),
            token,
            generation,
            expires_at: Utc::now(),
        };
        let completion = Completion::new(
            crate::model::TerminalState::Failed,
            serde_json::json!({"error": err.to_string(), "reason": "undecodable"}),
        )
        .fenced(&fence);
        match self.complete_process(id, completion).await {
            // The answer holds the same unreadable row; the completion is written.
            Ok(_) | Err(ProcessError::Undecodable { .. }) => {}
            Err(failed) => {
                tracing::warn!(process_id = %id, error = %failed, "cannot fail the unreadable process yet; its lease will lapse");
            }
        }
    }

    async fn exists(&self, id: &ProcessId) -> ProcessResult<bool> {
        let rows = self
            .query(
                "SELECT 1 FROM proclog.processes WHERE process_id = $1",
                &[&id.as_str()],
            )
            .await?;
        Ok(!rows.is_empty())
    }
}

#[async_trait]
impl ProcessRegistry for PgProcessRegistry {
    async fn register_process(
        &self,
        registration: ProcessRegistration,
    ) -> ProcessResult<ProcessRecord> {
        let input = validate::registration(&registration, self.config.max_payload_bytes)?;
        let id = registration.id.clone().unwrap_or_else(ProcessId::generate);
        let inserted = self
            .query(
                concat!(
                    "INSERT INTO proclog.processes (process_id, kind, input, disposition)
                     VALUES ($1, $2, $3, $4)
                     ON CONFLICT (process_id) DO NOTHING
                     RETURNING ",
                    process_columns!()
                ),
                &[
                    &id.as_str(),
                    &registration.kind,
                    &JsonText(input),
                    &registration.disposition.as_str(),
                ],
            )
            .await?;
        if let Some(row) = inserted.first() {
            return process_from_row(row);
        }
        // The id exists (possibly inserted concurrently and committed since): this statement
        // takes a new snapshot and sees it.
        let existing = self.get_process(&id).await?.ok_or_else(|| {
            ProcessError::Database(format!("process {id} vanished during registration"))
        })?;
        if existing.kind == registration.kind
            && crate::model::json_equal(&existing.input, &registration.input)
            && existing.disposition == registration.disposition
        {
            Ok(existing)
        } else {
            Err(ProcessError::Conflict { id })
        }
    }

    async fn get_process(&self, id: &ProcessId) -> ProcessResult<Option<ProcessRecord>> {
        let rows = self
            .query(
                concat!(
                    "SELECT ",
                    process_columns!(),
                    " FROM proclog.processes WHERE process_id = $1"
                ),
                &[&id.as_str()],
            )
            .await?;
        rows.first().map(process_from_row).transpose()
    }

    async fn terminal_states(
        &self,
        ids: &[ProcessId],
    ) -> ProcessResult<HashMap<ProcessId, Option<TerminalRecord>>> {
        let texts: Vec<&str> = ids.iter().map(ProcessId::as_str).collect();
        let rows = self
            .query(
                "SELECT process_id, terminal_state, terminal_seq, output, completed_at
                   FROM proclog.processes WHERE process_id = ANY ($1)",
                &[&texts],
            )
            .await?;
        rows.iter().map(terminal_from_row).collect()
    }

    async fn list_processes(&self, filter: ProcessFilter) -> ProcessResult<ProcessPage> {
        let limit = validate::list_filter(&filter)?;
        let status = filter.status.map(|s| s.as_str());
        let cursor_id = filter.after.as_ref().map(|c| c.id.as_str().to_owned());
        let cursor_at = filter.after.as_ref().map(|c| c.created_at);
        let fetch = i64::from(limit) + 1;
        let mut conditions = Vec::new();
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
        if let Some(status) = &status {
            params.push(status);
            conditions.push(format!("status = ${}", params.len()));
        }
        if let Some(kind) = &filter.kind {
            params.push(kind);
            conditions.push(format!("kind = ${}", params.len()));
        }
        if let Some(after) = &filter.created_after {
            params.push(after);
            conditions.push(format!("created_at >= ${}", params.len()));
        }
        if let Some(before) = &filter.created_before {
            params.push(before);
            conditions.push(format!("created_at < ${}", params.len()));
        }
        if let (Some(at), Some(id)) = (&cursor_at, &cursor_id) {
            params.push(at);
            params.push(id);
            conditions.push(format!(
                "(created_at, process_id) > (${}, ${})",
                params.len() - 1,
                params.len()
            ));
        }
        params.push(&fetch);
        let budget = i64::try_from(self.config.max_page_bytes).unwrap_or(i64::MAX);
        params.push(&budget);
        let where_clause = if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        };
        // Held to the page budget like events_after: by stored sizes here, by sizes as read
        // in query_page.
        let sql = format!(
            "WITH page AS (
                 SELECT p.*,
                        sum(pg_column_size(p.input) + coalesce(pg_column_size(p.output), 0))
                            OVER (ORDER BY created_at, process_id) AS upto
                   FROM proclog.processes p {where_clause}
                  ORDER BY created_at, process_id LIMIT ${})
             SELECT {PROCESS_COLUMNS}, (SELECT count(*) FROM page) AS found FROM page
              WHERE upto - pg_column_size(input) - coalesce(pg_column_size(output), 0) < ${}
              ORDER BY created_at, process_id",
            params.len() - 1,
            params.len()
        );
        let mut found = 0i64;
        let (mut processes, cut) = self
            .query_page(&sql, &params, self.config.max_page_bytes, |row| {
                found = row.try_get(16).map_err(db_error)?;
                sized_process_from_row(row)
            })
            .await?;
        // More follow when the statement found more than a page, or a budget cut it short
        // (here, or in the statement: then it returned fewer rows than it found).
        let has_more = processes.len() > limit as usize
            || cut
            || usize::try_from(found).unwrap_or(usize::MAX) > processes.len();
        processes.truncate(limit as usize);
        let next = has_more.then(|| {
            let last = processes.last().expect("a full page is not empty");
            ListCursor {
                created_at: last.created_at,
                id: last.id.clone(),
            }
        });
        Ok(ProcessPage { processes, next })
    }

    async fn append_events(
        &self,
        id: &ProcessId,
        requests: Vec<AppendRequest>,
    ) -> ProcessResult<Vec<AppendOutcome>> {
        let payloads = validate::append_batch(
            &self.config.writer,
            &requests,
            self.config.max_payload_bytes,
        )?;
        let payloads: Vec<JsonText> = payloads.into_iter().map(JsonText).collect();
        let Some(slot) = &self.group else {
            return self.append_single(id, requests, &payloads).await;
        };
        let group = slot.flushers(|| self.single());
        let (reply, answer) = tokio::sync::oneshot::channel();
        let pending = Pending {
            id: id.clone(),
            token: requests[0].fence.map(|fence| fence.token),
            requests,
            payloads,
            reply,
        };
        let appended = group.append(pending, answer);
        match self.call_timeout {
            // The flusher's statement has the call bound; this one also covers some wait in
            // the queue. An append given up on before its batch is sent is never written;
            // one given up on during its batch may still commit: retry it with its replay key.
            Some(limit) => {
                let bound = limit + limit / 2;
                tokio::time::timeout(bound, appended)
                    .await
                    .unwrap_or_else(|_| {
                        Err(ProcessError::Unavailable(format!(
                            "no answer from the database within {bound:?}"
                        )))
                    })
            }
            None => appended.await,
        }
    }

    async fn events_after(
        &self,
        id: &ProcessId,
        after_seq: i64,
        limit: u32,
    ) -> ProcessResult<Vec<ProcessEvent>> {
        validate::events_after(after_seq, limit)?;
        let budget = i64::try_from(self.config.max_page_bytes).unwrap_or(i64::MAX);
        let (events, _) = self
            .query_page(
                EVENTS_PAGE,
                &[&id.as_str(), &after_seq, &i64::from(limit), &budget],
                self.config.max_page_bytes,
                |row| sized_event_from_row(id, row),
            )
            .await?;
        if events.is_empty() && !self.exists(id).await? {
            return Err(ProcessError::NotFound(id.clone()));
        }
        Ok(events)
    }

    async fn complete_process(
        &self,
        id: &ProcessId,
        completion: Completion,
    ) -> ProcessResult<ProcessRecord> {
        let output = validate::completion(
            &self.config.writer,
            &completion,
            self.config.max_payload_bytes,
        )?;
        let token = completion.fence.map(|fence| fence.token);
        let rows = self
            .run(
                concat!(
                    "SELECT ",
                    process_columns!(),
                    " FROM proclog.complete_process($1, $2, $3, $4, $5)"
                ),
                &[
                    &id.as_str(),
                    &self.config.writer,
                    &token,
                    &completion.state.as_str(),
                    &JsonText(output),
                ],
                |err| write_error(id, err),
            )
            .await?;
        let row = rows
            .first()
            .ok_or_else(|| ProcessError::Database("complete_process returned no row".into()))?;
        process_from_row(row)
    }

    async fn claim(
        &self,
        id: &ProcessId,
        owner: &str,
        ttl: Duration,
    ) -> ProcessResult<ClaimOutcome> {
        validate::claim(owner, ttl)?;
        // The UPDATE grants the lease if none is live. When it matches nothing, the row says
        // why; if the lease was released in between, the claim is simply tried again.
        loop {
            let rows = self
                .query(
                    "UPDATE proclog.processes
                        SET lease_owner = $2,
                            lease_token = gen_random_uuid(),
                            lease_generation = lease_generation + 1,
                            lease_expires_at = now() + $3::bigint * interval '1 millisecond',
                            status = CASE WHEN status = 'pending' THEN 'running' ELSE status END,
                            updated_at = now()
                      WHERE process_id = $1
                        AND terminal_state IS NULL
                        AND (lease_expires_at IS NULL OR lease_expires_at <= now())
                  RETURNING lease_token, lease_generation, lease_expires_at",
                    &[&id.as_str(), &owner, &ttl_millis(ttl)],
                )
                .await?;
            if let Some(row) = rows.first() {
                return Ok(ClaimOutcome::Acquired(Lease {
                    process_id: id.clone(),
                    owner: owner.to_owned(),
                    token: row.get(0),
                    generation: row.get(1),
                    expires_at: row.get(2),
                }));
            }
            let record = self
                .get_process(id)
                .await?
                .ok_or_else(|| ProcessError::NotFound(id.clone()))?;
            if let Some(terminal) = record.terminal {
                return Err(ProcessError::ProcessTerminal {
                    id: id.clone(),
                    state: terminal.state,
                });
            }
            if let Some(held) = record.lease {
                return Ok(ClaimOutcome::Busy {
                    holder: held.owner,
                    expires_at: held.expires_at,
                });
            }
        }
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> ProcessResult<Lease> {
        validate::lease_ttl(ttl)?;
        let rows = self
            .query(
                "UPDATE proclog.processes
                    SET lease_expires_at = greatest(lease_expires_at,
                            now() + $3::bigint * interval '1 millisecond')
                  WHERE process_id = $1
                    AND proclog.fence_holds($2::uuid, lease_token, lease_expires_at)
              RETURNING lease_expires_at",
                &[&lease.process_id.as_str(), &lease.token, &ttl_millis(ttl)],
            )
            .await?;
        match rows.first() {
            Some(row) => Ok(Lease {
                expires_at: row.get(0),
                ..lease.clone()
            }),
            None if self.exists(&lease.process_id).await? => Err(ProcessError::LeaseLost {
                id: lease.process_id.clone(),
            }),
            None => Err(ProcessError::NotFound(lease.process_id.clone())),
        }
    }

    async fn release(&self, lease: &Lease) -> ProcessResult<()> {
        self.query(
            "UPDATE proclog.processes
                SET lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL
              WHERE process_id = $1 AND lease_token = $2",
            &[&lease.process_id.as_str(), &lease.token],
        )
        .await?;
        Ok(())
    }

    async fn claim_runnable(
        &self,
        owner: &str,
        ttl: Duration,
        limit: u32,
    ) -> ProcessResult<Vec<RunnableClaim>> {
        validate::claim_runnable(owner, ttl, limit)?;
        let rows = self
            .query(
                concat!(
                    "WITH candidates AS (
                         SELECT process_id AS candidate_id, lease_owner AS old_owner,
                                lease_generation AS old_generation,
                                lease_expires_at AS old_expires_at
                           FROM proclog.processes
                          WHERE terminal_state IS NULL AND disposition <> 'external'
                            AND (lease_expires_at IS NULL OR lease_expires_at <= now())
                          ORDER BY created_at, process_id
                          LIMIT $3
                            FOR UPDATE SKIP LOCKED)
                     UPDATE proclog.processes
                        SET lease_owner = $1,
                            lease_token = gen_random_uuid(),
                            lease_generation = lease_generation + 1,
                            lease_expires_at = now() + $2::bigint * interval '1 millisecond',
                            status = 'running',
                            attempts = attempts + 1,
                            updated_at = now()
                       FROM candidates
                      WHERE process_id = candidate_id
                  RETURNING ",
                    process_columns!(),
                    ", lease_token, old_owner, old_generation,
                            old_expires_at"
                ),
                &[&owner, &ttl_millis(ttl), &i64::from(limit)],
            )
            .await?;
        let mut claims = Vec::with_capacity(rows.len());
        for row in &rows {
            let token: uuid::Uuid = row.try_get(16).map_err(db_error)?;
            match process_from_row(row) {
                Ok(process) => {
                    let lease_info = process.lease.clone().ok_or_else(|| {
                        ProcessError::Database("claimed process has no lease".into())
                    })?;
                    let old_owner: Option<String> = row.try_get(17).map_err(db_error)?;
                    let lost_owner = match old_owner {
                        Some(owner) => Some(LostOwner {
                            owner,
                            generation: row.try_get(18).map_err(db_error)?,
                            expired_at: row.try_get(19).map_err(db_error)?,
                        }),
                        None => None,
                    };
                    claims.push(RunnableClaim {
                        lease: Lease {
                            process_id: process.id.clone(),
                            owner: lease_info.owner,
                            token,
                            generation: lease_info.generation,
                            expires_at: lease_info.expires_at,
                        },
                        process,
                        lost_owner,
                    });
                }
                Err(err @ ProcessError::Undecodable { .. }) => {
                    self.fail_unreadable(row, token, owner, err).await;
                }
                Err(err) => return Err(err),
            }
        }
        claims.sort_by(|a, b| {
            (a.process.created_at, &a.process.id).cmp(&(b.process.created_at, &b.process.id))
        });
        Ok(claims)
    }

    async fn next_lease_expiry(&self) -> ProcessResult<Option<Duration>> {
        let rows = self
            .query(
                "SELECT (extract(epoch FROM min(lease_expires_at) - now()) * 1000)::bigint
                   FROM proclog.processes
                  WHERE terminal_state IS NULL AND disposition <> 'external'
                    AND lease_expires_at IS NOT NULL AND lease_expires_at > now()",
                &[],
            )
            .await?;
        let millis: Option<i64> = rows.first().and_then(|row| row.get(0));
        Ok(millis.map(|ms| Duration::from_millis(ms.max(0) as u64)))
    }

    async fn prune_terminal_processes(&self, cutoff: DateTime<Utc>) -> ProcessResult<PruneReport> {
        validate::timestamp("prune cutoff", cutoff)?;
        // Events go with their process (the trigger processes_delete_events); a log is dense from 1, so a
        // process's event count is its last_seq.
        let rows = self
            .query(
                "WITH pruned AS (
                     DELETE FROM proclog.processes
                      WHERE terminal_state IS NOT NULL AND completed_at < $1
                  RETURNING last_seq)
                 SELECT count(*), coalesce(sum(last_seq), 0)::bigint FROM pruned",
                &[&cutoff],
            )
            .await?;
        let row = rows
            .first()
            .ok_or_else(|| ProcessError::Database("prune returned no row".into()))?;
        let processes: i64 = row.get(0);
        let events: i64 = row.get(1);
        Ok(PruneReport {
            processes: processes as u64,
            events: events as u64,
        })
    }
}
