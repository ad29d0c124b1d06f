//! `PgProcessRegistry`: the registry contract on Postgres.
//!
//! Every write is one statement (appends and completions call the schema's plpgsql functions),
//! so a write costs one round trip on a warm pooled connection with a cached prepared
//! statement. Error paths may take a second, diagnostic query. Appends are written by an
//! [`AppendWriter`], alone or in groups by the flushers of [`super::group`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use tokio_postgres::types::ToSql;

use super::append::AppendWriter;
use super::convert::{
    JsonText, PROCESS_COLUMNS, db_error, event_columns, process_columns, process_from_row,
    sized_event_from_row, sized_process_from_row, start_error, terminal_from_row, write_error,
};
use super::db::Db;
use super::group::{GroupCommit, GroupCommitOptions, GroupCommitStats, Pending};
use crate::error::{ProcessError, ProcessResult};
use crate::model::{
    AppendOutcome, AppendRequest, ClaimOutcome, Completion, Lease, ListCursor, LostOwner,
    ProcessEvent, ProcessFilter, ProcessId, ProcessPage, ProcessRecord, ProcessRegistration,
    PruneReport, RunnableClaim, StartDecision, StartOutcome, StartPolicy, Suspension,
    TerminalRecord,
};
use crate::registry::ParentState;
use crate::registry::{ProcessRegistry, RegistryConfig};

mod claim;
mod queues;
use crate::tasks::TaskSet;
use crate::validate;
pub use claim::ClaimStrategy;

/// The Postgres process registry. Cheap to clone: clones share the pool (and the group
/// commit flushers).
#[derive(Clone)]
pub struct PgProcessRegistry {
    db: Db,
    config: RegistryConfig,
    /// `None`: every append is its own statement.
    group: Option<Arc<GroupSlot>>,
    /// How `claim_runnable` takes work; `Detect` follows the tables' layout.
    claims: ClaimStrategy,
    /// Whether `processes` is a Citus distributed table, read once, at the first call that
    /// needs to know.
    distributed: Arc<tokio::sync::OnceCell<bool>>,
    /// Claims so far: alternates whether controlled queues or the rest are served first.
    claim_rounds: Arc<std::sync::atomic::AtomicU64>,
}

/// The group commit of a registry and its clones.
struct GroupSlot {
    options: GroupCommitOptions,
    stats: Arc<GroupCommitStats>,
    state: Mutex<Flushers>,
}

/// Who runs the flushers.
enum Flushers {
    /// Not started: the first append starts them, on the runtime it runs on, and they end
    /// with the last clone of the registry (a registry used on its own).
    NotStarted,
    /// Started by the registry itself, as above; started again if the runtime that ran them
    /// has gone.
    OnTheirOwn(Arc<GroupCommit>),
    /// Started into an owner's [`TaskSet`] (a stack): they end when the owner stops them,
    /// and an append after that is `Unavailable`.
    Owned(Arc<GroupCommit>),
}

/// Appends of at least this many events go out as statements of their own, past group commit:
/// batches of 100 from 4 appenders reach 0.97-1.01 of raw SQL so, 0.65-0.78 through the
/// flushers (BENCHMARKS.md). Not when every append is to go through the group statement
/// ([`GroupCommitOptions::group_single_appends`], for tests). Smaller batches stay grouped: many callers appending a few events
/// each to one hot process still take its row lock once per statement.
const DIRECT_BATCH_EVENTS: usize = 32;

/// How long a group-commit flusher waits for its statement when the registry has no call
/// bound of its own.
const FLUSHER_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopping flusher may take to answer what was queued.
const FLUSHER_STOP_GRACE: Duration = Duration::from_secs(5);

impl GroupSlot {
    fn new(options: GroupCommitOptions) -> Arc<Self> {
        Arc::new(Self {
            options,
            stats: Arc::new(GroupCommitStats::default()),
            state: Mutex::new(Flushers::NotStarted),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Flushers> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The running flushers, started now if they run on their own and are not running.
    fn flushers(&self, writer: impl FnOnce() -> AppendWriter) -> ProcessResult<Arc<GroupCommit>> {
        let mut state = self.lock();
        match &*state {
            Flushers::Owned(group) => Ok(Arc::clone(group)),
            Flushers::OnTheirOwn(group) if group.is_running() => Ok(Arc::clone(group)),
            _ => {
                let (group, tasks) =
                    GroupCommit::new(&self.options, writer(), Arc::clone(&self.stats));
                for task in tasks {
                    tokio::spawn(task(tokio_util::sync::CancellationToken::new()));
                }
                let group = Arc::new(group);
                *state = Flushers::OnTheirOwn(Arc::clone(&group));
                Ok(group)
            }
        }
    }
}

fn ttl_millis(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).expect("validated ttl fits")
}

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

/// [`EVENTS_PAGE`] of the journal: only events whose type is in `$5`.
const JOURNAL_PAGE: &str = concat!(
    "SELECT ",
    event_columns!(),
    " FROM (SELECT e.*, sum(pg_column_size(e.payload)) OVER (ORDER BY e.seq) AS upto
            FROM proclog.events e
           WHERE e.process_id = $1 AND e.seq > $2 AND e.event_type = ANY ($5)
           ORDER BY e.seq LIMIT $3) page
     WHERE upto - pg_column_size(payload) < $4
     ORDER BY seq"
);

/// The most processes one prune batch deletes.
const PRUNE_BATCH_PROCESSES: i64 = 1_000;
/// The most events one prune transaction deletes: a batch takes processes while their logs
/// add up to no more; a longer log is deleted in slices of this size.
const PRUNE_BATCH_EVENTS: i64 = 50_000;

impl PgProcessRegistry {
    /// After a child is inserted: if its parent was asked to stop since the mark
    /// that let the child in, the cancellation that ran meanwhile may have listed the
    /// children before this one existed; the child gets the parent's request itself (the
    /// same request the cancellation passes on, written once). Returns whether it did.
    async fn recheck_parent(&self, child: &ProcessId, parent: &ProcessId) -> ProcessResult<bool> {
        let stopping = self
            .get_process(parent)
            .await?
            .is_some_and(|record| record.cancel_request.is_some());
        if !stopping {
            return Ok(false);
        }
        let canceller = format!("canceller:{}", self.config.writer);
        let request = crate::registry::parent_cancel_request(parent);
        match crate::registry::request_cancellation(self, child, &canceller, request).await {
            Ok(_) | Err(ProcessError::ProcessTerminal { .. }) => Ok(true),
            Err(err) => Err(err),
        }
    }

    /// The answer to a registration whose id exists (possibly inserted concurrently and
    /// committed since: this reads with a new snapshot): the existing process when the
    /// content is the same, else `Conflict`.
    async fn existing_start(
        &self,
        id: &ProcessId,
        registration: &ProcessRegistration,
    ) -> ProcessResult<StartOutcome> {
        let existing = self.get_process(id).await?.ok_or_else(|| {
            ProcessError::Database(format!("process {id} vanished during registration"))
        })?;
        if crate::registry::same_registration(&existing, registration) {
            Ok(StartOutcome {
                process: existing,
                decision: StartDecision::Existing,
            })
        } else {
            Err(ProcessError::Conflict { id: id.clone() })
        }
    }

    /// The claims of the rows a claim statement returned (the process's columns, then
    /// `lease_token`, `old_owner`, `old_generation`, `old_expires_at`, `resumed`), in order of
    /// registration. A row that cannot be read back is failed with the reason, not returned.
    async fn claims_from_rows(
        &self,
        rows: &[tokio_postgres::Row],
        owner: &str,
    ) -> ProcessResult<Vec<RunnableClaim>> {
        let mut claims = Vec::with_capacity(rows.len());
        for row in rows {
            let token: uuid::Uuid = row.try_get("lease_token").map_err(db_error)?;
            match process_from_row(row) {
                Ok(process) => {
                    let lease_info = process.lease.clone().ok_or_else(|| {
                        ProcessError::Database("claimed process has no lease".into())
                    })?;
                    let old_owner: Option<String> = row.try_get("old_owner").map_err(db_error)?;
                    let lost_owner = match old_owner {
                        Some(owner) => Some(LostOwner {
                            owner,
                            generation: row.try_get("old_generation").map_err(db_error)?,
                            expired_at: row.try_get("old_expires_at").map_err(db_error)?,
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
                        resumed: row.try_get("resumed").map_err(db_error)?,
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

    /// Prunes the oldest terminal process completed before `until` when its log is longer
    /// than a prune batch: its events in slices of `PRUNE_BATCH_EVENTS` from the end (so
    /// what remains is a dense prefix), each slice its own transaction, then its row.
    /// Returns what it deleted, or `None` when there is no such process (none left, or the
    /// oldest fits a batch: it is locked by someone else, and the prune stops there).
    /// Deletes the start keys of pruned processes (their policies have nothing left to
    /// guard: a start of the key is then decided as if it were new).
    async fn forget_start_keys(&self, ids: &[String]) -> ProcessResult<()> {
        if !ids.is_empty() {
            self.query(
                "DELETE FROM proclog.start_keys WHERE process_id = ANY($1)",
                &[&ids],
            )
            .await?;
        }
        Ok(())
    }

    /// Deletes the de-duplication keys whose window has passed, in batches.
    async fn forget_expired_start_keys(&self) -> ProcessResult<()> {
        loop {
            let rows = self
                .query(
                    "WITH expired AS (
                         SELECT kind, start_key FROM proclog.start_keys
                          WHERE expires_at < now()
                          LIMIT $1
                            FOR UPDATE SKIP LOCKED),
                     forgotten AS (
                         DELETE FROM proclog.start_keys k USING expired e
                          WHERE k.kind = e.kind AND k.start_key = e.start_key
                      RETURNING 1)
                     SELECT count(*) AS forgotten FROM forgotten",
                    &[&PRUNE_BATCH_PROCESSES],
                )
                .await?;
            let forgotten: i64 = rows
                .first()
                .map(|row| row.try_get("forgotten"))
                .transpose()
                .map_err(db_error)?
                .unwrap_or_default();
            if forgotten < PRUNE_BATCH_PROCESSES {
                return Ok(());
            }
        }
    }

    async fn prune_long_log(&self, until: DateTime<Utc>) -> ProcessResult<Option<PruneReport>> {
        let rows = self
            .query(
                &format!(
                    "SELECT process_id, last_seq FROM proclog.processes
                      WHERE terminal_state IS NOT NULL AND completed_at < $1
                      ORDER BY completed_at, process_id
                      LIMIT 1
                      {}",
                    if self.distributed().await {
                        ""
                    } else {
                        "FOR UPDATE SKIP LOCKED"
                    }
                ),
                &[&until],
            )
            .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let id: String = row.try_get("process_id").map_err(db_error)?;
        let last_seq: i64 = row.try_get("last_seq").map_err(db_error)?;
        if last_seq <= PRUNE_BATCH_EVENTS {
            return Ok(None);
        }
        let mut above = last_seq;
        while above > 0 {
            above = (above - PRUNE_BATCH_EVENTS).max(0);
            self.query(
                "DELETE FROM proclog.events e
                  WHERE e.process_id = $1 AND e.seq > $2
                    AND EXISTS (SELECT 1 FROM proclog.processes p
                                 WHERE p.process_id = $1 AND p.terminal_state IS NOT NULL)",
                &[&id, &above],
            )
            .await?;
        }
        let deleted = self
            .query(
                "DELETE FROM proclog.processes WHERE process_id = $1 AND terminal_state IS NOT NULL
                 RETURNING last_seq",
                &[&id],
            )
            .await?;
        self.forget_start_keys(std::slice::from_ref(&id)).await?;
        // Another prune may have deleted the row in between: then it counted it.
        Ok(Some(PruneReport {
            processes: deleted.len() as u64,
            events: if deleted.is_empty() {
                0
            } else {
                last_seq as u64
            },
        }))
    }

    /// A registry over `pool` (whose database must be migrated, see [`crate::pg::migrate()`]).
    ///
    /// Group commit is on, with [`GroupCommitOptions::default`]: see
    /// [`Self::with_group_commit`]. Its flushers start with the first append, unless an owner
    /// starts them first ([`Self::start_group_commit`]).
    pub fn new(pool: Pool, config: RegistryConfig) -> Self {
        Self {
            db: Db::new(pool),
            config,
            group: Some(GroupSlot::new(GroupCommitOptions::default())),
            claims: ClaimStrategy::Detect,
            distributed: Arc::new(tokio::sync::OnceCell::new()),
            claim_rounds: Arc::default(),
        }
    }

    /// The same registry with `claim_runnable` taking work as `strategy` says, instead of
    /// the strategy detected at the first claim ([`ClaimStrategy::Detect`], the default).
    pub fn with_claim_strategy(mut self, strategy: ClaimStrategy) -> Self {
        self.claims = strategy;
        self
    }

    /// The same registry with group commit set by `options`, or off (`None`): then every
    /// append is a statement of its own. With it on, appends that arrive while a statement
    /// is in flight are sent together as one (see [`crate::pg::group`]); every guarantee of
    /// the registry contract holds either way.
    pub fn with_group_commit(mut self, options: Option<GroupCommitOptions>) -> Self {
        self.group = options.map(GroupSlot::new);
        self
    }

    /// Starts the group commit flushers now, as tasks of `tasks` (a stack's): they stop when
    /// the set is shut down (answering what was queued) and are not started again; appends
    /// after that are `Unavailable`. Does nothing when group commit is off or its flushers
    /// were started already.
    pub fn start_group_commit(&self, tasks: &mut TaskSet) {
        let Some(slot) = &self.group else { return };
        let mut state = slot.lock();
        if !matches!(*state, Flushers::NotStarted) {
            return;
        }
        let (group, flushers) = GroupCommit::new(
            &slot.options,
            self.flusher_writer(),
            Arc::clone(&slot.stats),
        );
        for flusher in flushers {
            tasks.spawn("group commit flusher", FLUSHER_STOP_GRACE, flusher);
        }
        *state = Flushers::Owned(Arc::new(group));
    }

    /// Counters of group commit (`None` when it is off).
    pub fn group_commit_stats(&self) -> Option<Arc<GroupCommitStats>> {
        self.group.as_ref().map(|slot| Arc::clone(&slot.stats))
    }

    /// The writer of single appends (`distributed`: the tables are distributed on Citus).
    fn writer(&self, distributed: bool) -> AppendWriter {
        AppendWriter {
            db: self.db.clone(),
            writer: self.config.writer.clone(),
            delegated: distributed,
        }
    }

    /// The flushers' writer: its calls are always bounded (by the registry's call timeout,
    /// else 30 s), so that a stalled connection cannot hold every process routed to one
    /// flusher.
    fn flusher_writer(&self) -> AppendWriter {
        AppendWriter {
            db: self
                .db
                .clone()
                .with_call_timeout(Some(self.db.call_timeout().unwrap_or(FLUSHER_CALL_TIMEOUT))),
            writer: self.config.writer.clone(),
            delegated: false,
        }
    }

    /// The same registry with a client-side bound on every statement's round trip: past it
    /// the call is `Unavailable` and its connection is discarded, not returned to the pool. A
    /// grouped append is held to the same bound, its wait in the queue included.
    ///
    /// The server's `statement_timeout` cannot end a call whose packets never reach the
    /// server (a stalled network, a blackholed route); this bound can. A write cut by it may
    /// or may not have committed, like any `Unavailable` write: retry it with its replay key.
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.db = self.db.with_call_timeout(Some(timeout));
        self
    }

    /// The pool this registry uses.
    pub fn pool(&self) -> &Pool {
        self.db.pool()
    }

    /// The config this registry was built with.
    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    /// [`Db::run`].
    async fn run(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        on_error: impl FnOnce(tokio_postgres::Error) -> ProcessError,
    ) -> ProcessResult<Vec<tokio_postgres::Row>> {
        self.db.run(sql, params, on_error).await
    }

    /// [`Db::query`].
    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> ProcessResult<Vec<tokio_postgres::Row>> {
        self.db.query(sql, params).await
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
        let generation: i64 = row.try_get("lease_generation").unwrap_or_default();
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
        self.start_process(registration)
            .await
            .map(|started| started.process)
    }

    async fn start_process(
        &self,
        registration: ProcessRegistration,
    ) -> ProcessResult<StartOutcome> {
        let input = validate::registration(&registration, self.config.max_payload_bytes)?;
        let id = registration.id.clone().unwrap_or_else(ProcessId::generate);
        let millis = |ms: Option<u64>| ms.map(|ms| i64::try_from(ms).expect("validated bound"));
        let retry_policy = registration
            .retry
            .as_ref()
            .map(|policy| serde_json::to_vec(policy).map(JsonText))
            .transpose()
            .map_err(|err| ProcessError::InvalidInput(format!("retry policy: {err}")))?;
        if let Some(parent) = &registration.parent {
            // Marked before the child exists: a cancellation that finds the mark unset has
            // no child to pass itself on to.
            let marked = self
                .query(
                    "UPDATE proclog.processes SET has_children = true
                      WHERE process_id = $1 AND terminal_state IS NULL
                        AND cancel_request IS NULL AND NOT has_children
                  RETURNING process_id",
                    &[&parent.as_str()],
                )
                .await?;
            let found = if marked.is_empty() {
                self.get_process(parent).await?
            } else {
                None
            };
            let marked_before = found.as_ref().is_some_and(|record| {
                record.has_children && record.terminal.is_none() && record.cancel_request.is_none()
            });
            if marked.is_empty() && !marked_before {
                let state = found.map(|record| ParentState {
                    ended: record.terminal.is_some(),
                    cancelling: record.cancel_request.is_some(),
                });
                // A retried registration of a child made before its parent ended (or was
                // asked to stop) is still answered; if the parent was asked to stop, the
                // child gets the request it may have missed (written once).
                if state.is_some()
                    && let Some(existing) = self.get_process(&id).await?
                    && existing.parent.as_ref() == Some(parent)
                {
                    let started = self.existing_start(&id, &registration).await?;
                    if state.is_some_and(|state| state.cancelling)
                        && started.process.terminal.is_none()
                        && self.recheck_parent(&id, parent).await?
                    {
                        let process = self.get_process(&id).await?.unwrap_or(started.process);
                        return Ok(StartOutcome { process, ..started });
                    }
                    return Ok(started);
                }
                crate::registry::check_parent(&id, parent, state)?;
                // Registered since the mark was tried (or unreadable then): refuse rather
                // than start a child that a cancellation could miss.
                return Err(ProcessError::Unavailable(format!(
                    "parent process {parent} changed during the registration; try again"
                )));
            }
        }
        let parent = registration.parent.as_ref().map(ProcessId::as_str);
        let (input, start_in, timeout) = (
            JsonText(input),
            millis(registration.start_in_ms),
            millis(registration.timeout_ms),
        );
        let concurrency_key = registration.concurrency_key.clone().unwrap_or_default();
        // The registration's columns, in the order of the INSERT below and of the first
        // arguments of proclog.start_process (the last three are its last).
        let columns: [&(dyn ToSql + Sync); 14] = [
            &id.as_str(),
            &registration.kind,
            &input,
            &registration.disposition.as_str(),
            &registration.start_at,
            &start_in,
            &registration.deadline,
            &timeout,
            &retry_policy,
            &registration.trace_parent,
            &parent,
            &registration.queue,
            &concurrency_key,
            &registration.priority,
        ];
        if let Some(policy) = &registration.start_policy {
            let window = i64::try_from(policy.window_ms()).expect("validated bound");
            let refuse = matches!(policy, StartPolicy::Singleton { refuse: true, .. });
            let (name, key) = (policy.name(), policy.key());
            let mut params = columns[..11].to_vec();
            params.extend([&name as &(dyn ToSql + Sync), &key, &window, &refuse]);
            params.extend_from_slice(&columns[11..]);
            let rows = self
                .run(
                    "SELECT decision, started_id FROM proclog.start_process(
                         $1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10, $11, $12, $13, $14, $15,
                         $16, $17, $18)",
                    &params,
                    |err| start_error(policy.key(), err),
                )
                .await?;
            let row = rows
                .first()
                .ok_or_else(|| ProcessError::Database("start_process returned no row".into()))?;
            let decision: String = row.try_get("decision").map_err(db_error)?;
            let started: String = row.try_get("started_id").map_err(db_error)?;
            let started = ProcessId::new(started)
                .map_err(|err| ProcessError::Database(format!("start_process: {err}")))?;
            let decision = match decision.as_str() {
                "created" => StartDecision::Created,
                "deduplicated" => StartDecision::Deduplicated,
                "running" => StartDecision::Running,
                "debounced" => StartDecision::Debounced,
                // The id exists: a retried start, or a clash the content comparison decides.
                "existing" | "id_taken" => {
                    return self.existing_start(&id, &registration).await;
                }
                other => {
                    return Err(ProcessError::Database(format!(
                        "start_process answered {other:?}"
                    )));
                }
            };
            if decision == StartDecision::Created
                && let Some(parent) = &registration.parent
            {
                self.recheck_parent(&started, parent).await?;
            }
            let process = self.get_process(&started).await?.ok_or_else(|| {
                ProcessError::Database(format!("process {started} vanished during its start"))
            })?;
            return Ok(StartOutcome { process, decision });
        }
        let inserted = self
            .query(
                concat!(
                    "INSERT INTO proclog.processes
                            (process_id, kind, input, disposition, wake_at, deadline, retry_policy,
                             trace_parent, parent_id, queue, concurrency_key, priority)
                     VALUES ($1, $2, $3, $4,
                             coalesce($5::timestamptz,
                                      now() + $6::bigint * interval '1 millisecond'),
                             coalesce($7::timestamptz,
                                      now() + $8::bigint * interval '1 millisecond'),
                             $9::jsonb, $10, $11, $12, $13, $14)
                     ON CONFLICT (process_id) DO NOTHING
                     RETURNING ",
                    process_columns!()
                ),
                &columns,
            )
            .await?;
        if let Some(row) = inserted.first() {
            let mut process = process_from_row(row)?;
            if let Some(parent) = &registration.parent
                && self.recheck_parent(&id, parent).await?
            {
                process = self.get_process(&id).await?.unwrap_or(process);
            }
            return Ok(StartOutcome {
                process,
                decision: StartDecision::Created,
            });
        }
        self.existing_start(&id, &registration).await
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

    async fn cancel_requests(
        &self,
        ids: &[ProcessId],
    ) -> ProcessResult<HashMap<ProcessId, serde_json::Value>> {
        let texts: Vec<&str> = ids.iter().map(ProcessId::as_str).collect();
        let rows = self
            .query(
                "SELECT process_id, cancel_request FROM proclog.processes
                  WHERE process_id = ANY ($1) AND cancel_request IS NOT NULL",
                &[&texts],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let id: String = row.try_get("process_id").map_err(db_error)?;
                let id = ProcessId::new(id).map_err(|err| {
                    ProcessError::Database(format!("unexpected process id: {err}"))
                })?;
                let request = super::convert::json_at(row, "cancel_request", &id, || {
                    "cancel_request".into()
                })?;
                Ok((id, request))
            })
            .collect()
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
        let parent = filter.parent.as_ref().map(|id| id.as_str().to_owned());
        if let Some(parent) = &parent {
            params.push(parent);
            conditions.push(format!("parent_id = ${}", params.len()));
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
        // in query_page. The running size is summed over the page only, after the LIMIT: on
        // distributed tables the ORDER BY ... LIMIT then runs on every shard (each returns at
        // most a page), where a window over the whole table pulled every row to the
        // coordinator (435 ms against 91 ms for 100,000 processes on 32 shards).
        let sql = format!(
            "WITH top AS (
                 SELECT p.* FROM proclog.processes p {where_clause}
                  ORDER BY created_at, process_id LIMIT ${}),
             page AS (
                 SELECT top.*,
                        sum(pg_column_size(top.input) + coalesce(pg_column_size(top.output), 0))
                            OVER (ORDER BY created_at, process_id) AS upto
                   FROM top)
             SELECT {PROCESS_COLUMNS}, (SELECT count(*) FROM page) AS found FROM page
              WHERE upto - pg_column_size(input) - coalesce(pg_column_size(output), 0) < ${}
              ORDER BY created_at, process_id",
            params.len() - 1,
            params.len()
        );
        let mut found = 0i64;
        let (mut processes, cut) = self
            .db
            .query_page(&sql, &params, self.config.max_page_bytes, |row| {
                found = row.try_get("found").map_err(db_error)?;
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
        // On distributed tables a group statement would span shards: every append goes
        // alone, on its process's shard.
        let distributed = self.distributed().await;
        let slot = match &self.group {
            // A batch this large already shares its commit among its events; a flusher would
            // only add a hop and a turn behind other batches.
            Some(slot)
                if !distributed
                    && (requests.len() < DIRECT_BATCH_EVENTS
                        || slot.options.group_single_appends) =>
            {
                slot
            }
            _ => {
                return self
                    .writer(distributed)
                    .single(id, requests, &payloads)
                    .await;
            }
        };
        let group = slot.flushers(|| self.flusher_writer())?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        let pending = Pending {
            id: id.clone(),
            token: requests[0].fence.map(|fence| fence.token),
            requests,
            payloads,
            reply,
        };
        let appended = group.append(pending, answer);
        match self.db.call_timeout() {
            // The call bound covers the wait in the queue and the batch's statement alike. An
            // append given up on before its batch is sent is never written; one given up on
            // during its batch may still commit: retry it with its replay key.
            Some(limit) => tokio::time::timeout(limit, appended)
                .await
                .unwrap_or_else(|_| {
                    Err(ProcessError::Unavailable(format!(
                        "no answer from the database within {limit:?}"
                    )))
                }),
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
            .db
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
        let record = process_from_row(row)?;
        crate::registry::tell_parent(self, &record).await;
        Ok(record)
    }

    async fn claim(
        &self,
        id: &ProcessId,
        owner: &str,
        ttl: Duration,
    ) -> ProcessResult<ClaimOutcome> {
        validate::claim(owner, ttl)?;
        // The UPDATE grants the lease if none is live. When it matches nothing, the row says
        // why; if the lease was released in between, the claim is simply tried again. The
        // token is made here, not by gen_random_uuid(): Citus refuses a volatile function in
        // an UPDATE of a distributed table.
        loop {
            let token = uuid::Uuid::new_v4();
            let rows = self
                .query(
                    "UPDATE proclog.processes
                        SET lease_owner = $2,
                            lease_token = $4,
                            lease_generation = lease_generation + 1,
                            lease_expires_at = now() + $3::bigint * interval '1 millisecond',
                            status = CASE WHEN status IN ('pending', 'waiting') THEN 'running'
                                          ELSE status END,
                            updated_at = now()
                      WHERE process_id = $1
                        AND terminal_state IS NULL
                        AND (lease_expires_at IS NULL OR lease_expires_at <= now())
                  RETURNING lease_token, lease_generation, lease_expires_at",
                    &[&id.as_str(), &owner, &ttl_millis(ttl), &token],
                )
                .await?;
            if let Some(row) = rows.first() {
                return Ok(ClaimOutcome::Acquired(Lease {
                    process_id: id.clone(),
                    owner: owner.to_owned(),
                    token: row.try_get("lease_token").map_err(db_error)?,
                    generation: row.try_get("lease_generation").map_err(db_error)?,
                    expires_at: row.try_get("lease_expires_at").map_err(db_error)?,
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
                expires_at: row.try_get("lease_expires_at").map_err(db_error)?,
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
                SET lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL,
                    status = CASE WHEN status = 'running' AND wake_at IS NOT NULL
                                  THEN 'waiting' ELSE status END
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
        let controlled = self.controlled_queues().await?;
        let round = self
            .claim_rounds
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Controlled queues and the rest take turns at being served first. What one part
        // claimed is answered even when the other fails (a lost answer would strand it until
        // its lease lapses); the call fails only when nothing was claimed and a part failed.
        let controlled_first = round % 2 == 1;
        let mut rows = Vec::new();
        let mut failure = None;
        for controlled_part in [controlled_first, !controlled_first] {
            let free = limit - rows.len() as u32;
            if free == 0 {
                break;
            }
            let part = if controlled_part {
                if controlled.is_empty() {
                    continue;
                }
                self.claim_controlled(owner, ttl, free, round / 2).await
            } else {
                self.claim_uncontrolled(owner, ttl, free, &controlled).await
            };
            match part {
                Ok(more) => rows.extend(more),
                Err(err) => {
                    tracing::debug!(error = %err, controlled = controlled_part, "a part of a claim failed");
                    failure.get_or_insert(err);
                }
            }
        }
        if let Some(err) = failure
            && rows.is_empty()
        {
            return Err(err);
        }
        self.claims_from_rows(&rows, owner).await
    }

    async fn next_wake(&self) -> ProcessResult<Option<Duration>> {
        // Each term is the head of one partial index; a term whose process a live lease
        // holds is left to that lease's expiry (its owner acts on it).
        let rows = self
            .query(
                "SELECT (extract(epoch FROM least(
                     (SELECT min(lease_expires_at) FROM proclog.processes
                       WHERE terminal_state IS NULL AND disposition <> 'external'
                         AND lease_expires_at IS NOT NULL AND lease_expires_at > now()),
                     (SELECT min(coalesce(wake_at, created_at)) FROM proclog.processes
                       WHERE terminal_state IS NULL AND disposition <> 'external'
                         AND coalesce(wake_at, created_at) > now()
                         AND coalesce(wake_at, created_at) < 'infinity'
                         AND (lease_expires_at IS NULL OR lease_expires_at <= now())),
                     (SELECT min(deadline) FROM proclog.processes
                       WHERE terminal_state IS NULL AND deadline IS NOT NULL
                         AND (lease_expires_at IS NULL OR lease_expires_at <= now())))
                     - now()) * 1000)::bigint AS millis",
                &[],
            )
            .await?;
        let millis: Option<i64> = match rows.first() {
            Some(row) => row.try_get("millis").map_err(db_error)?,
            None => None,
        };
        Ok(millis.map(|ms| Duration::from_millis(ms.max(0) as u64)))
    }

    async fn suspend(&self, lease: &Lease, suspension: Suspension) -> ProcessResult<ProcessRecord> {
        let checked = validate::suspension(&suspension, self.config.max_payload_bytes)?;
        let id = &lease.process_id;
        let delay_ms = suspension
            .delay
            .map(|delay| i64::try_from(delay.as_millis()).expect("validated bound"));
        let rows = self
            .run(
                concat!(
                    "SELECT ",
                    process_columns!(),
                    " FROM proclog.suspend_process($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
                ),
                &[
                    &id.as_str(),
                    &self.config.writer,
                    &lease.token,
                    &crate::reserved::waiting_key(lease.generation),
                    &suspension.wake_at,
                    &delay_ms,
                    &suspension.topic,
                    &suspension.after_seq,
                    &suspension.retry,
                    &JsonText(checked),
                ],
                |err| write_error(id, err),
            )
            .await?;
        let row = rows
            .first()
            .ok_or_else(|| ProcessError::Database("suspend_process returned no row".into()))?;
        process_from_row(row)
    }

    async fn journal(
        &self,
        id: &ProcessId,
        after_seq: i64,
        limit: u32,
    ) -> ProcessResult<Vec<ProcessEvent>> {
        validate::events_after(after_seq, limit)?;
        let budget = i64::try_from(self.config.max_page_bytes).unwrap_or(i64::MAX);
        let types: Vec<&str> = crate::reserved::JOURNAL.to_vec();
        let (events, _) = self
            .db
            .query_page(
                JOURNAL_PAGE,
                &[&id.as_str(), &after_seq, &i64::from(limit), &budget, &types],
                self.config.max_page_bytes,
                |row| sized_event_from_row(id, row),
            )
            .await?;
        if events.is_empty() && !self.exists(id).await? {
            return Err(ProcessError::NotFound(id.clone()));
        }
        Ok(events)
    }

    async fn next_message(
        &self,
        id: &ProcessId,
        topic: &str,
        after_seq: i64,
    ) -> ProcessResult<Option<ProcessEvent>> {
        let rows = self
            .query(
                concat!(
                    "SELECT ",
                    event_columns!(),
                    " FROM proclog.events
                     WHERE process_id = $1 AND seq > $2 AND event_type = $3
                       AND payload ->> 'topic' = $4
                     ORDER BY seq LIMIT 1"
                ),
                &[&id.as_str(), &after_seq, &crate::reserved::MESSAGE, &topic],
            )
            .await?;
        match rows.first() {
            Some(row) => Ok(Some(super::convert::event_from_row(id, row)?)),
            None if self.exists(id).await? => Ok(None),
            None => Err(ProcessError::NotFound(id.clone())),
        }
    }

    fn payload_limit(&self) -> usize {
        self.config.max_payload_bytes
    }

    async fn prune_terminal_processes(&self, cutoff: DateTime<Utc>) -> ProcessResult<PruneReport> {
        validate::timestamp("prune cutoff", cutoff)?;
        // In batches, each its own short transaction (up to PRUNE_BATCH_PROCESSES processes
        // whose logs add up to PRUNE_BATCH_EVENTS events at most), so that no statement runs
        // into the statement timeout, holds vacuum back for long or writes one burst of WAL.
        // A log longer than a batch is deleted in slices from its end, then its row. Rows
        // locked by someone else at that instant are skipped. The cutoff is held to the
        // database clock of the first batch: completions during the prune are not chased.
        // Events go with their process (the trigger processes_delete_events); a log is dense
        // from 1, so a process's event count is its last_seq.
        let mut report = PruneReport {
            processes: 0,
            events: 0,
        };
        // On distributed tables rows of several shards cannot be locked in one statement:
        // the scan takes no lock (a terminal row changes no more; a DELETE meeting a row
        // held by someone waits for it instead of skipping it).
        let lock = if self.distributed().await {
            ""
        } else {
            "FOR UPDATE SKIP LOCKED"
        };
        let batch = format!(
            "WITH candidates AS (
                         SELECT process_id, last_seq, completed_at
                           FROM proclog.processes
                          WHERE terminal_state IS NOT NULL
                            AND completed_at < least($1::timestamptz, coalesce($4, now()))
                          ORDER BY completed_at, process_id
                          LIMIT $2::bigint
                          {lock}),
                     batch AS (
                         SELECT process_id FROM (
                             SELECT process_id,
                                    (sum(last_seq) OVER (ORDER BY completed_at, process_id))::bigint
                                        AS events_through
                               FROM candidates) c
                          WHERE events_through <= $3::bigint),
                     pruned AS (
                         DELETE FROM proclog.processes
                          WHERE process_id IN (SELECT process_id FROM batch)
                      RETURNING process_id, last_seq)
                     SELECT count(*) AS processes, coalesce(sum(last_seq), 0)::bigint AS events,
                            coalesce(array_agg(process_id), '{{}}') AS ids,
                            least($1::timestamptz, coalesce($4, now())) AS until
                       FROM pruned"
        );
        let mut until: Option<DateTime<Utc>> = None;
        loop {
            let rows = self
                .query(
                    &batch,
                    &[&cutoff, &PRUNE_BATCH_PROCESSES, &PRUNE_BATCH_EVENTS, &until],
                )
                .await?;
            let row = rows
                .first()
                .ok_or_else(|| ProcessError::Database("prune returned no row".into()))?;
            let processes: i64 = row.try_get("processes").map_err(db_error)?;
            let events: i64 = row.try_get("events").map_err(db_error)?;
            let pinned: DateTime<Utc> = row.try_get("until").map_err(db_error)?;
            let ids: Vec<String> = row.try_get("ids").map_err(db_error)?;
            self.forget_start_keys(&ids).await?;
            until = Some(pinned);
            report.processes += processes as u64;
            report.events += events as u64;
            if processes > 0 {
                continue;
            }
            // Nothing fitted a batch: done, or the oldest candidate's log alone is too long.
            match self.prune_long_log(pinned).await? {
                Some(long) => {
                    report.processes += long.processes;
                    report.events += long.events;
                }
                None => {
                    self.forget_expired_start_keys().await?;
                    return Ok(report);
                }
            }
        }
    }
}
