//! Group commit: appends that arrive while a flusher's statement is in flight are queued and
//! sent together as one statement (`proclog.append_group`), so one commit and one WAL flush
//! carry many appends.
//!
//! - **Routing.** Each process id maps to one of a few flushers (`hash(id) % flushers`), so
//!   one process's appends keep their arrival order and are never in two batches at once.
//! - **No timer.** A flusher takes what is queued when its previous statement has finished:
//!   at low load every batch has one append and goes through the single-append statement, so
//!   latency stays that of a single append.
//! - **Per-caller answers.** Callers are sorted by process id (every batch locks rows in the
//!   same global order: batches cannot deadlock) and each gets its own outcome: its events,
//!   its replayed events, or its own refusal. One caller's refusal never fails the others.
//! - **Errors.** An ERROR answer that is neither transient nor internal means the server
//!   refused the statement and nothing of it committed: each caller is then run alone, to get
//!   its own answer. Anything else (a lost connection, a timeout, FATAL, PANIC, a transient
//!   error) may or may not have committed: every caller gets `Unavailable`, which its replay
//!   key resolves on retry, exactly as for a single append.
//! - **Callers that gave up** (timed out, dropped their future) before their batch was sent
//!   are skipped: nothing is written for them.
//! - **Bounds.** A bounded queue per flusher (callers wait for room) and a maximum batch in
//!   events and bytes.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::append::AppendWriter;
use super::convert::{JsonText, db_error, is_unavailable_state, json_at, terminal_state_detail};
use crate::error::{ProcessError, ProcessResult};
use crate::model::{AppendOutcome, AppendRequest, ProcessEvent, ProcessId};

/// A batch in which no event carries a replay key, as one set-based statement: the same
/// rules as `proclog.append_group` (which handles keyed batches), without its per-caller
/// loop. The process rows are locked in process id order first (so batches cannot deadlock);
/// callers whose process is missing, terminal or whose fence does not hold get one refusal
/// row each; the others' events are inserted at consecutive seqs per process, in caller
/// order, after one `last_seq` bump per process (a data-modifying CTE runs to completion
/// whether or not the final SELECT reads it). Rows have `proclog.append_group`'s shape.
///
/// Every step is linear in the batch: the bump carries its callers along (arrays, unnested
/// after it) instead of being joined back to them, and each event finds its caller by a hash
/// join on the caller's number (`$8`, one per event) instead of slicing the event arrays per
/// caller, so a batch of 1,000 costs ten batches of 100.
const APPEND_GROUP_UNKEYED: &str = "
    WITH callers AS (
        SELECT c.caller::int AS caller, c.process_id, c.token, c.start, c.cnt
          FROM unnest($2::text[], $3::uuid[], $4::int[], $5::int[])
               WITH ORDINALITY AS c(process_id, token, start, cnt, caller)),
    locked AS (
        SELECT p.process_id, p.lease_token, p.lease_expires_at, p.terminal_state
          FROM proclog.processes p
         WHERE p.process_id = ANY ($2::text[])
         ORDER BY p.process_id
           FOR NO KEY UPDATE),
    accepted AS (
        SELECT c.caller, c.process_id, c.token, c.start, c.cnt,
               sum(c.cnt) OVER (PARTITION BY c.process_id ORDER BY c.caller) - c.cnt AS before,
               sum(c.cnt) OVER (PARTITION BY c.process_id) AS total
          FROM callers c JOIN locked l USING (process_id)
         WHERE l.terminal_state IS NULL
           AND proclog.fence_holds(c.token, l.lease_token, l.lease_expires_at)),
    bumped AS (
        UPDATE proclog.processes p
           SET last_seq = p.last_seq + t.total,
               status = CASE WHEN p.status = 'pending' THEN 'running' ELSE p.status END,
               updated_at = now()
          FROM (SELECT process_id, max(total) AS total,
                       array_agg(caller ORDER BY caller) AS callers,
                       array_agg(before ORDER BY caller) AS befores,
                       array_agg(start ORDER BY caller) AS starts,
                       array_agg(cnt ORDER BY caller) AS cnts,
                       array_agg(token IS NULL ORDER BY caller) AS unfenced
                  FROM accepted GROUP BY process_id) t
         WHERE p.process_id = t.process_id
        RETURNING p.process_id, p.last_seq - t.total AS base, p.lease_generation,
                  t.callers, t.befores, t.starts, t.cnts, t.unfenced),
    placed AS (
        SELECT u.caller, b.process_id, u.start, u.cnt,
               b.base + u.before - u.start + 1 AS shift,
               CASE WHEN u.unfenced THEN NULL ELSE b.lease_generation END AS generation
          FROM bumped b
         CROSS JOIN LATERAL unnest(b.callers, b.befores, b.starts, b.cnts, b.unfenced)
               AS u(caller, before, start, cnt, unfenced)),
    inserted AS (
        INSERT INTO proclog.events
               (process_id, seq, event_type, payload, writer, lease_generation)
        SELECT p.process_id, p.shift + e.ord, e.t, e.p, $1, p.generation
          FROM unnest($8::int[], $6::text[], $7::jsonb[]) WITH ORDINALITY AS e(caller, t, p, ord)
          JOIN placed p USING (caller)
        RETURNING 1)
    SELECT p.caller, NULL::text AS refusal, NULL::text AS detail,
           p.shift + g.ord AS seq, NULL::text AS event_type, NULL::jsonb AS payload,
           NULL::text AS replay_key, now() AS occurred_at, p.generation AS lease_generation,
           false AS replayed, $1::text AS writer
      FROM placed p
     CROSS JOIN LATERAL generate_series(p.start::bigint, (p.start + p.cnt - 1)::bigint) AS g(ord)
    UNION ALL
    SELECT c.caller,
           CASE WHEN l.process_id IS NULL THEN 'not_found'
                WHEN l.terminal_state IS NOT NULL THEN 'terminal'
                ELSE 'lease_lost' END,
           l.terminal_state, NULL::bigint, NULL::text, NULL::jsonb, NULL::text,
           NULL::timestamptz, NULL::bigint, NULL::boolean, NULL::text
      FROM callers c LEFT JOIN locked l USING (process_id)
     WHERE NOT EXISTS (SELECT 1 FROM accepted a WHERE a.caller = c.caller)
     ORDER BY 1, 4";

/// How group commit batches appends. The defaults suit most pods; see `BENCHMARKS.md`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupCommitOptions {
    /// Flushing tasks, each sending one batch at a time on a pooled connection (default 2:
    /// more flushers mean smaller batches and more commits).
    pub flushers: usize,
    /// Most events in one batch (default 1000).
    pub max_batch_events: usize,
    /// Most payload bytes in one batch (default 8 MiB). A single append larger than this
    /// still goes through, alone.
    pub max_batch_bytes: usize,
    /// Appends queued per flusher before callers wait for room (default 4096).
    pub queue_capacity: usize,
    /// Send a batch of one, and an append of 32 events or more, through the group statement
    /// too, instead of a statement of its own (default false: slower; for tests that hold the
    /// group path to every rule of the registry contract).
    pub group_single_appends: bool,
}

impl Default for GroupCommitOptions {
    fn default() -> Self {
        Self {
            flushers: 2,
            max_batch_events: 1000,
            max_batch_bytes: 8 << 20,
            queue_capacity: 4096,
            group_single_appends: false,
        }
    }
}

/// Counters of a registry's group commit.
#[derive(Debug, Default)]
pub struct GroupCommitStats {
    /// Appends (calls) accepted into a flusher's queue.
    pub enqueued: AtomicU64,
    /// Statements sent by the flushers (batches of one included).
    pub batches: AtomicU64,
    /// Appends (calls, not events) that went out in a batch of more than one.
    pub grouped_appends: AtomicU64,
    /// The most appends one batch carried.
    pub largest_batch: AtomicU64,
    /// Batches refused by the database as a whole, whose callers were then run alone.
    pub split_batches: AtomicU64,
}

/// One caller's append, waiting for its batch.
pub(crate) struct Pending {
    pub(crate) id: ProcessId,
    pub(crate) token: Option<Uuid>,
    pub(crate) requests: Vec<AppendRequest>,
    pub(crate) payloads: Vec<JsonText>,
    pub(crate) reply: oneshot::Sender<ProcessResult<Vec<AppendOutcome>>>,
}

impl Pending {
    fn bytes(&self) -> usize {
        self.payloads.iter().map(|p| p.0.len()).sum()
    }

    fn answer(self, result: ProcessResult<Vec<AppendOutcome>>) {
        // A caller that gave up (dropped its future) no longer listens: nothing to do.
        let _ = self.reply.send(result);
    }
}

/// A flusher's task, for its owner to run: it ends when its token fires (after answering
/// what was queued by then) or when every sender is gone.
pub(crate) type FlusherTask = Box<dyn FnOnce(CancellationToken) -> BoxFuture<'static, ()> + Send>;

/// The flushers' queues of one registry (and its clones).
pub(crate) struct GroupCommit {
    queues: Vec<mpsc::Sender<Pending>>,
    stats: Arc<GroupCommitStats>,
}

impl GroupCommit {
    /// The queues and their flushers, which write with `writer` (batches of one, the callers
    /// of a refused batch, and the batch statements on its pool).
    pub(crate) fn new(
        options: &GroupCommitOptions,
        writer: AppendWriter,
        stats: Arc<GroupCommitStats>,
    ) -> (Self, Vec<FlusherTask>) {
        let (queues, tasks) = (0..options.flushers.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::channel(options.queue_capacity.max(1));
                let (writer, options, stats) =
                    (writer.clone(), options.clone(), Arc::clone(&stats));
                let task: FlusherTask = Box::new(move |stop: CancellationToken| {
                    flusher(rx, writer, options, stats, stop).boxed()
                });
                (tx, task)
            })
            .unzip();
        (Self { queues, stats }, tasks)
    }

    /// Whether every flusher is still there (they end with the runtime that started them).
    pub(crate) fn is_running(&self) -> bool {
        self.queues.iter().all(|queue| !queue.is_closed())
    }

    /// Queues an append and waits for its outcome.
    pub(crate) async fn append(
        &self,
        pending: Pending,
        receiver: oneshot::Receiver<ProcessResult<Vec<AppendOutcome>>>,
    ) -> ProcessResult<Vec<AppendOutcome>> {
        let mut hasher = DefaultHasher::new();
        pending.id.as_str().hash(&mut hasher);
        let queue = &self.queues[(hasher.finish() % self.queues.len() as u64) as usize];
        if queue.send(pending).await.is_err() {
            return Err(ProcessError::Unavailable(
                "the group commit flusher has stopped".into(),
            ));
        }
        self.stats.enqueued.fetch_add(1, Ordering::Relaxed);
        receiver.await.unwrap_or_else(|_| {
            Err(ProcessError::Unavailable(
                "the group commit flusher stopped before answering".into(),
            ))
        })
    }
}

async fn flusher(
    mut queue: mpsc::Receiver<Pending>,
    single: AppendWriter,
    options: GroupCommitOptions,
    stats: Arc<GroupCommitStats>,
    stop: CancellationToken,
) {
    let mut held: Option<Pending> = None;
    // Callers in the last batch sent: as many may be about to append again.
    let mut last_batch = 0usize;
    loop {
        let next = match held.take() {
            Some(pending) => Some(pending),
            None => tokio::select! {
                next = queue.recv() => next,
                () = stop.cancelled() => {
                    // Stopping: take no more, answer what is queued, then end.
                    queue.close();
                    queue.recv().await
                }
            },
        };
        let Some(first) = next else { return };
        // A caller that gave up (timed out, dropped its future) is not written for: its
        // append was never sent, so its `Unavailable` was the truth.
        if first.reply.is_closed() {
            continue;
        }
        // Callers just answered are about to append again: let them, while the queue grows.
        if last_batch > 1 {
            gather(&queue, last_batch).await;
        }
        let mut events = first.requests.len();
        let mut bytes = first.bytes();
        let mut batch = vec![first];
        // Everything queued meanwhile, up to the bounds; no waiting for more.
        while events < options.max_batch_events && bytes < options.max_batch_bytes {
            let Ok(next) = queue.try_recv() else { break };
            if next.reply.is_closed() {
                continue;
            }
            let (next_events, next_bytes) = (next.requests.len(), next.bytes());
            if events + next_events > options.max_batch_events
                || bytes + next_bytes > options.max_batch_bytes
            {
                held = Some(next);
                break;
            }
            events += next_events;
            bytes += next_bytes;
            batch.push(next);
        }
        last_batch = batch.len();
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats
            .largest_batch
            .fetch_max(batch.len() as u64, Ordering::Relaxed);
        if batch.len() == 1 && !options.group_single_appends {
            let pending = batch.pop().expect("one pending append");
            alone(&single, pending).await;
            continue;
        }
        if batch.len() > 1 {
            stats
                .grouped_appends
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
        }
        flush(&single, batch, &stats).await;
    }
}

/// Most times a flusher yields while its queue grows (see [`gather`]).
const MAX_GATHER_YIELDS: usize = 8;

/// Lets the tasks that are ready to run (callers answered by the last statement, about to
/// append again) do so before a batch is taken: yields while the queue keeps growing, until
/// it holds as many appends as the last batch had callers, at most [`MAX_GATHER_YIELDS`]
/// times. Without it a flusher takes the first caller back alone and the rest wait for the
/// next statement, so batches alternate between one and many. Only after a batch of several
/// (a lone caller is not made to wait for company: a yield costs a pass of the scheduler);
/// no timer.
async fn gather(queue: &mpsc::Receiver<Pending>, expected: usize) {
    let mut seen = queue.len();
    for _ in 0..MAX_GATHER_YIELDS {
        if seen + 1 >= expected {
            return;
        }
        tokio::task::yield_now().await;
        let now = queue.len();
        if now == seen {
            return;
        }
        seen = now;
    }
}

/// Runs one append as a statement of its own and answers its caller.
async fn alone(single: &AppendWriter, pending: Pending) {
    if pending.reply.is_closed() {
        return;
    }
    let Pending {
        id,
        requests,
        payloads,
        reply,
        ..
    } = pending;
    let result = single.single(&id, requests, &payloads).await;
    let _ = reply.send(result);
}

/// Sends a batch of several appends as one statement and answers each caller.
async fn flush(single: &AppendWriter, mut batch: Vec<Pending>, stats: &GroupCommitStats) {
    // One global lock order (process id), stable so one process's appends keep their order.
    batch.sort_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
    let ids: Vec<&str> = batch.iter().map(|p| p.id.as_str()).collect();
    let tokens: Vec<Option<Uuid>> = batch.iter().map(|p| p.token).collect();
    let mut starts = Vec::with_capacity(batch.len());
    let mut counts = Vec::with_capacity(batch.len());
    let mut types = Vec::new();
    let mut payloads = Vec::new();
    let mut keys = Vec::new();
    let mut event_callers = Vec::new();
    let mut next = 1i32;
    for (caller, pending) in (1i32..).zip(&batch) {
        let count = i32::try_from(pending.requests.len()).unwrap_or(i32::MAX);
        starts.push(next);
        counts.push(count);
        next = next.saturating_add(count);
        event_callers.extend(std::iter::repeat_n(caller, pending.requests.len()));
        for (request, payload) in pending.requests.iter().zip(&pending.payloads) {
            types.push(request.event_type.as_str());
            payloads.push(payload);
            keys.push(request.replay_key.as_deref());
        }
    }
    let keyed = keys.iter().any(Option::is_some);
    // Whether the server refused the statement as a whole, certainly without committing any
    // of it: an ERROR that is not transient and not internal. (FATAL and PANIC end the
    // session or the server, possibly after the commit record reached the WAL; transient
    // errors would only fail again, one caller at a time.)
    let mut refused_whole = false;
    let on_error = |err: tokio_postgres::Error| {
        if let Some(db) = err.as_db_error() {
            let code = db.code().code();
            refused_whole =
                db.severity() == "ERROR" && !is_unavailable_state(code) && !code.starts_with("XX");
        }
        db_error(err)
    };
    let writer = &single.writer;
    let rows = if keyed {
        single
            .db
            .run(
                "SELECT caller, refusal, detail, seq, event_type, payload, replay_key,
                        occurred_at, lease_generation, replayed, writer
                   FROM proclog.append_group($1, $2, $3, $4, $5, $6, $7, $8)",
                &[
                    writer, &ids, &tokens, &starts, &counts, &types, &payloads, &keys,
                ],
                on_error,
            )
            .await
    } else {
        single
            .db
            .run(
                APPEND_GROUP_UNKEYED,
                &[
                    writer,
                    &ids,
                    &tokens,
                    &starts,
                    &counts,
                    &types,
                    &payloads,
                    &event_callers,
                ],
                on_error,
            )
            .await
    };

    let rows = match rows {
        Ok(rows) => rows,
        Err(_) if refused_whole => {
            // The database refused the statement: nothing of it committed. Each caller gets
            // its own answer from a statement of its own.
            stats.split_batches.fetch_add(1, Ordering::Relaxed);
            for pending in batch {
                alone(single, pending).await;
            }
            return;
        }
        Err(err) => {
            // The batch may or may not have committed: like any ambiguous write, retry it
            // with its replay key.
            for pending in batch {
                pending.answer(Err(err.clone()));
            }
            return;
        }
    };
    let mut by_caller: Vec<Vec<&tokio_postgres::Row>> = vec![Vec::new(); batch.len()];
    for row in &rows {
        let caller: i32 = row.try_get("caller").unwrap_or_default();
        if let Some(slot) = usize::try_from(caller - 1)
            .ok()
            .and_then(|index| by_caller.get_mut(index))
        {
            slot.push(row);
        }
    }
    for (pending, rows) in batch.into_iter().zip(by_caller) {
        let Pending {
            id,
            requests,
            reply,
            ..
        } = pending;
        let _ = reply.send(outcome(&id, requests, &rows, single));
    }
}

/// One caller's answer from its rows of `proclog.append_group`.
fn outcome(
    id: &ProcessId,
    requests: Vec<AppendRequest>,
    rows: &[&tokio_postgres::Row],
    writer: &AppendWriter,
) -> ProcessResult<Vec<AppendOutcome>> {
    if let Some(row) = rows.first() {
        let refusal: Option<String> = row.try_get("refusal").map_err(db_error)?;
        if let Some(refusal) = refusal {
            let detail: Option<String> = row.try_get("detail").map_err(db_error)?;
            return Err(match refusal.as_str() {
                "not_found" => ProcessError::NotFound(id.clone()),
                "terminal" => ProcessError::ProcessTerminal {
                    id: id.clone(),
                    state: terminal_state_detail(detail.as_deref())?,
                },
                "lease_lost" => ProcessError::LeaseLost { id: id.clone() },
                "replay_conflict" => ProcessError::ReplayConflict {
                    id: id.clone(),
                    replay_key: detail.unwrap_or_default(),
                },
                other => {
                    ProcessError::Database(format!("append to {id}: unknown refusal {other:?}"))
                }
            });
        }
    }
    if rows.len() != requests.len() {
        return Err(ProcessError::Database(format!(
            "append to {id} answered {} of {} events",
            rows.len(),
            requests.len()
        )));
    }
    rows.iter()
        .zip(requests)
        .map(|(row, request)| {
            let replayed: bool = row.try_get("replayed").map_err(db_error)?;
            let event = if replayed {
                let seq: i64 = row.try_get("seq").map_err(db_error)?;
                ProcessEvent {
                    process_id: id.clone(),
                    seq,
                    event_type: row.try_get("event_type").map_err(db_error)?,
                    payload: json_at(row, "payload", id, || format!("event {seq} payload"))?,
                    replay_key: row.try_get("replay_key").map_err(db_error)?,
                    occurred_at: row.try_get("occurred_at").map_err(db_error)?,
                    writer: row.try_get("writer").map_err(db_error)?,
                    lease_generation: row.try_get("lease_generation").map_err(db_error)?,
                }
            } else {
                writer.stored(id, request, row)?
            };
            Ok(AppendOutcome { event, replayed })
        })
        .collect()
}
