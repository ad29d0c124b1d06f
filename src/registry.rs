//! The `ProcessRegistry` trait: the state interface of proclog.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::error::{ProcessError, ProcessResult};
use crate::model::{
    AppendOutcome, AppendRequest, ClaimOutcome, Completion, Lease, Message, ProcessEvent,
    ProcessFilter, ProcessId, ProcessPage, ProcessRecord, ProcessRegistration, PruneReport,
    RunnableClaim, StartDecision, StartOutcome, Suspension, TerminalRecord,
};

/// Events read per page when a default method scans a log.
const SCAN_PAGE: u32 = 1_000;

/// Durable process state: point reads and writes, no waiting, no notification.
///
/// Implementations: [`crate::PgProcessRegistry`] (the product) and
/// [`crate::InMemoryProcessRegistry`] (for tests of the layers above, and as the second witness
/// of the conformance suite). Every refused operation writes nothing.
#[async_trait]
pub trait ProcessRegistry: Send + Sync {
    /// Creates the process as `pending`. Registering an id again with identical kind, input and
    /// disposition returns the existing record, whatever its state; different content is
    /// `Conflict`. Two concurrent registrations of one id create exactly one process and both
    /// succeed. Bad kind: `InvalidInput`; input over the limit: `PayloadTooLarge`.
    /// With a [`ProcessRegistration::start_policy`], the policy decides first (see
    /// [`ProcessRegistry::start_process`], which also says what happened); with a
    /// [`ProcessRegistration::parent`], the parent must exist and not have ended
    /// (`InvalidInput`), unless this is a retried registration of an existing child.
    async fn register_process(
        &self,
        registration: ProcessRegistration,
    ) -> ProcessResult<ProcessRecord>;

    /// [`ProcessRegistry::register_process`], answering what happened: a new process
    /// (`Created`), the same id and content registered before (`Existing`), or what the start
    /// policy decided (`Deduplicated`, `Running`, `Debounced`, each with the earlier start's
    /// process). A singleton policy with `refuse` is `StartRefused` while the key's process
    /// has not ended. Starts of one key are decided one at a time, whatever the number of pods.
    ///
    /// The default answers a registration without a policy as `Created` (or `Existing` when
    /// the id was there before) and refuses a policy (`InvalidInput`): both registries of
    /// proclog implement the policies.
    async fn start_process(
        &self,
        registration: ProcessRegistration,
    ) -> ProcessResult<StartOutcome> {
        if registration.start_policy.is_some() {
            return Err(ProcessError::InvalidInput(
                "this registry does not implement start policies".into(),
            ));
        }
        let existed = match &registration.id {
            Some(id) => self.get_process(id).await?.is_some(),
            None => false,
        };
        let process = self.register_process(registration).await?;
        let decision = if existed {
            StartDecision::Existing
        } else {
            StartDecision::Created
        };
        Ok(StartOutcome { process, decision })
    }

    /// The process, or `None` if no process has this id. A database error is an error.
    async fn get_process(&self, id: &ProcessId) -> ProcessResult<Option<ProcessRecord>>;

    /// The terminal column of each of `ids` that exists (`None` while it has not ended); ids
    /// missing from the answer are unknown. Postgres answers any number of ids in one query,
    /// which is what lets many waiters share one poll.
    async fn terminal_states(
        &self,
        ids: &[ProcessId],
    ) -> ProcessResult<HashMap<ProcessId, Option<TerminalRecord>>> {
        let mut states = HashMap::with_capacity(ids.len());
        for id in ids {
            if let Some(record) = self.get_process(id).await? {
                states.insert(id.clone(), record.terminal);
            }
        }
        Ok(states)
    }

    /// The cancellation request ([`ProcessRecord::cancel_request`]) of each of `ids` that has
    /// one; ids absent from the answer have none (or do not exist). Postgres answers any
    /// number of ids in one query, which is what lets all the runs of a pod share one read.
    async fn cancel_requests(
        &self,
        ids: &[ProcessId],
    ) -> ProcessResult<HashMap<ProcessId, serde_json::Value>> {
        let mut requests = HashMap::new();
        for id in ids {
            if let Some(request) = self
                .get_process(id)
                .await?
                .and_then(|record| record.cancel_request)
            {
                requests.insert(id.clone(), request);
            }
        }
        Ok(requests)
    }

    /// Processes matching `filter`, in `(created_at, id)` order, one page at a time.
    async fn list_processes(&self, filter: ProcessFilter) -> ProcessResult<ProcessPage>;

    /// Appends one event with the next seq: a batch of one, see
    /// [`ProcessRegistry::append_events`].
    async fn append_event(
        &self,
        id: &ProcessId,
        request: AppendRequest,
    ) -> ProcessResult<AppendOutcome> {
        let mut outcomes = self.append_events(id, vec![request]).await?;
        Ok(outcomes.remove(0))
    }

    /// Appends events all or nothing, with consecutive seqs allocated in the append's
    /// transaction (dense from 1, never duplicated, under any concurrency).
    ///
    /// Refusals: unknown process `NotFound`; reserved or malformed type, empty batch, repeated
    /// key or mixed fences `InvalidInput`; payload over the limit `PayloadTooLarge`; terminal
    /// process `ProcessTerminal`; fence not the current live lease `LeaseLost`.
    ///
    /// Replay: a batch in which some request carries a replay key already stored for this
    /// process is a retry. It returns the stored events marked `replayed` when every request of
    /// the batch carries a key stored with the same `(event_type, payload)`; otherwise it is
    /// `ReplayConflict`. A replay is answered even when the process has since become terminal
    /// or the lease has since been lost: it reports what was written, it writes nothing.
    async fn append_events(
        &self,
        id: &ProcessId,
        requests: Vec<AppendRequest>,
    ) -> ProcessResult<Vec<AppendOutcome>>;

    /// Events with `seq > after_seq`, ascending, at most `limit` (1 to 10,000), and bounded in
    /// bytes: events are added while the payloads before them add up to less than
    /// [`RegistryConfig::max_page_bytes`], so a page holds at least one event (when any
    /// follows) and exceeds the budget by at most one. A page may thus hold fewer than `limit`
    /// events while more follow: read on from the last seq until a page comes back empty.
    /// Unknown process: `NotFound`, never an empty list.
    async fn events_after(
        &self,
        id: &ProcessId,
        after_seq: i64,
        limit: u32,
    ) -> ProcessResult<Vec<ProcessEvent>>;

    /// In one transaction: appends the terminal event `process.<state>` with the output as its
    /// payload, fills the terminal column and releases the lease. Completing a terminal process
    /// again with the same state and output returns its record; anything else on a terminal
    /// process is `AlreadyTerminal`. A fence that is not the current live lease is `LeaseLost`.
    async fn complete_process(
        &self,
        id: &ProcessId,
        completion: Completion,
    ) -> ProcessResult<ProcessRecord>;

    /// Grants a lease to `owner` for `ttl` (database clock) if none is live, with a generation
    /// one above the last ever granted; otherwise `Busy`. Terminal process: `ProcessTerminal`.
    /// This is a host's own claim (and a canceller's): it is not held to a start or wake time,
    /// and a `waiting` process claimed this way keeps its wake time and awaited topic.
    async fn claim(
        &self,
        id: &ProcessId,
        owner: &str,
        ttl: Duration,
    ) -> ProcessResult<ClaimOutcome>;

    /// Extends a live lease to now + `ttl` (database clock), never moving its expiry earlier:
    /// a delayed renewal that commits after a later one cannot shorten the lease. Expired,
    /// released or superseded: `LeaseLost`.
    async fn renew(&self, lease: &Lease, ttl: Duration) -> ProcessResult<Lease>;

    /// Releases the lease if it is still the recorded one; otherwise does nothing. Idempotent.
    /// A process claimed with [`ProcessRegistry::claim`] while it was `waiting` is `waiting`
    /// again after the release (its wait goes on).
    async fn release(&self, lease: &Lease) -> ProcessResult<()>;

    /// Claims up to `limit` runnable processes for pod `owner`: non-terminal, without a live
    /// lease, and either past their deadline (any disposition: the run only fails them;
    /// earliest deadline first), or not `external` and runnable now, in the order they became
    /// runnable (their wake time when they had one, else their creation; first come, first
    /// served). Each gets a new lease (next generation), becomes `running` with its
    /// wake time and awaited topic cleared, and has `attempts` incremented, unless it was
    /// `waiting` after a run of its own ([`RunnableClaim::resumed`]: a resume is no rerun).
    /// Processes being claimed by another pod at the same instant are skipped, never waited
    /// for. A process whose previous lease expired without release reports that owner in
    /// `lost_owner`. A claimed process whose stored row cannot be read back (written by hand
    /// over SQL, see [`crate::ProcessError::Undecodable`]) is not returned: it is completed
    /// `failed` with the reason (`{"error", "reason": "undecodable"}`), and the rest of the
    /// batch is.
    async fn claim_runnable(
        &self,
        owner: &str,
        ttl: Duration,
        limit: u32,
    ) -> ProcessResult<Vec<RunnableClaim>>;

    /// How long until claimable work may next appear, on the database clock: the earliest
    /// of a live lease of a runnable process expiring, a wake time (start, timer, backoff,
    /// receive timeout) and a deadline of a process without a live lease; `None` when there
    /// is none. Pods sleep until then, so the work of a dead pod is taken over, and a timer
    /// fires, as soon as it may.
    async fn next_wake(&self) -> ProcessResult<Option<Duration>>;

    /// Suspends the process under `lease` (CONTRACT §9): in one transaction, appends
    /// `process.waiting` (the reason, the wake time, the topic), makes it `waiting` with its
    /// wake time and awaited topic, counts a failure retry if `retry`, and releases the lease.
    /// The wake time is `wake_at`, else now + `delay` (database clock), else never (a message
    /// of `topic` alone wakes it); it is now when a message of `topic` after `after_seq` is
    /// already stored, or a cancellation was requested. Retried after a lost answer, a
    /// suspension that committed returns the row. Refusals: `NotFound`, `ProcessTerminal`,
    /// `LeaseLost`; a bad topic or delay `InvalidInput`.
    async fn suspend(&self, lease: &Lease, suspension: Suspension) -> ProcessResult<ProcessRecord>;

    /// Sends `message` to a non-terminal process: appends `process.message {topic,
    /// payload}` (unfenced), which makes a process waiting for `topic` runnable at once.
    /// Idempotent by its replay key (stored as `proclog:msg:<key>`). Refusals: `NotFound`,
    /// `ProcessTerminal`, `InvalidInput` (topic, key), `PayloadTooLarge`.
    async fn send_message(&self, id: &ProcessId, message: Message) -> ProcessResult<AppendOutcome> {
        self.append_event(id, message_request(&message, self.payload_limit())?)
            .await
    }

    /// The journal of a run: events of the types a run replays ([`crate::reserved::JOURNAL`]:
    /// steps, timers, receipts) with `seq > after_seq`, ascending, at most `limit`. Unknown
    /// process: `NotFound`.
    async fn journal(
        &self,
        id: &ProcessId,
        after_seq: i64,
        limit: u32,
    ) -> ProcessResult<Vec<ProcessEvent>> {
        let mut found = Vec::new();
        let mut after = after_seq;
        loop {
            let page = self.events_after(id, after, SCAN_PAGE).await?;
            let Some(last) = page.last() else {
                return Ok(found);
            };
            after = last.seq;
            for event in page {
                if crate::reserved::JOURNAL.contains(&event.event_type.as_str()) {
                    found.push(event);
                    if found.len() >= limit as usize {
                        return Ok(found);
                    }
                }
            }
        }
    }

    /// The oldest message of `topic` stored after seq `after_seq`, if any. Unknown process:
    /// `NotFound`.
    async fn next_message(
        &self,
        id: &ProcessId,
        topic: &str,
        after_seq: i64,
    ) -> ProcessResult<Option<ProcessEvent>> {
        let mut after = after_seq;
        loop {
            let page = self.events_after(id, after, SCAN_PAGE).await?;
            let Some(last) = page.last() else {
                return Ok(None);
            };
            after = last.seq;
            if let Some(message) = page.into_iter().find(|event| is_message_of(event, topic)) {
                return Ok(Some(message));
            }
        }
    }

    /// The largest payload this registry accepts, in bytes (checked before a write).
    fn payload_limit(&self) -> usize {
        crate::validate::DEFAULT_MAX_PAYLOAD_BYTES
    }

    /// Deletes terminal processes completed before `cutoff`, with their events and leases.
    /// Never touches a non-terminal process. Idempotent. Postgres deletes in bounded batches
    /// (up to 1,000 processes and 50,000 events; a longer log in slices from its end, then
    /// its row), each its own short transaction, so no statement meets the statement
    /// timeout, holds vacuum back for long or writes one burst of WAL, whatever the history.
    /// Rows locked by someone else at that instant (a late append being refused, a repeated
    /// completion) are skipped and left for the next prune. A prune interrupted between
    /// batches has deleted part of what it would; running it again finishes the job.
    async fn prune_terminal_processes(&self, cutoff: DateTime<Utc>) -> ProcessResult<PruneReport>;
}

/// A shared registry is a registry: every call goes to the one it points to (so decorators
/// such as [`crate::WatchedProcessRegistry`] can wrap a registry that is also used directly).
#[async_trait]
impl<T: ProcessRegistry + ?Sized> ProcessRegistry for std::sync::Arc<T> {
    async fn register_process(
        &self,
        registration: ProcessRegistration,
    ) -> ProcessResult<ProcessRecord> {
        (**self).register_process(registration).await
    }

    async fn start_process(
        &self,
        registration: ProcessRegistration,
    ) -> ProcessResult<StartOutcome> {
        (**self).start_process(registration).await
    }

    async fn get_process(&self, id: &ProcessId) -> ProcessResult<Option<ProcessRecord>> {
        (**self).get_process(id).await
    }

    async fn terminal_states(
        &self,
        ids: &[ProcessId],
    ) -> ProcessResult<HashMap<ProcessId, Option<TerminalRecord>>> {
        (**self).terminal_states(ids).await
    }

    async fn cancel_requests(
        &self,
        ids: &[ProcessId],
    ) -> ProcessResult<HashMap<ProcessId, serde_json::Value>> {
        (**self).cancel_requests(ids).await
    }

    async fn list_processes(&self, filter: ProcessFilter) -> ProcessResult<ProcessPage> {
        (**self).list_processes(filter).await
    }

    async fn append_event(
        &self,
        id: &ProcessId,
        request: AppendRequest,
    ) -> ProcessResult<AppendOutcome> {
        (**self).append_event(id, request).await
    }

    async fn append_events(
        &self,
        id: &ProcessId,
        requests: Vec<AppendRequest>,
    ) -> ProcessResult<Vec<AppendOutcome>> {
        (**self).append_events(id, requests).await
    }

    async fn events_after(
        &self,
        id: &ProcessId,
        after_seq: i64,
        limit: u32,
    ) -> ProcessResult<Vec<ProcessEvent>> {
        (**self).events_after(id, after_seq, limit).await
    }

    async fn complete_process(
        &self,
        id: &ProcessId,
        completion: Completion,
    ) -> ProcessResult<ProcessRecord> {
        (**self).complete_process(id, completion).await
    }

    async fn claim(
        &self,
        id: &ProcessId,
        owner: &str,
        ttl: Duration,
    ) -> ProcessResult<ClaimOutcome> {
        (**self).claim(id, owner, ttl).await
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> ProcessResult<Lease> {
        (**self).renew(lease, ttl).await
    }

    async fn release(&self, lease: &Lease) -> ProcessResult<()> {
        (**self).release(lease).await
    }

    async fn claim_runnable(
        &self,
        owner: &str,
        ttl: Duration,
        limit: u32,
    ) -> ProcessResult<Vec<RunnableClaim>> {
        (**self).claim_runnable(owner, ttl, limit).await
    }

    async fn next_wake(&self) -> ProcessResult<Option<Duration>> {
        (**self).next_wake().await
    }

    async fn suspend(&self, lease: &Lease, suspension: Suspension) -> ProcessResult<ProcessRecord> {
        (**self).suspend(lease, suspension).await
    }

    async fn send_message(&self, id: &ProcessId, message: Message) -> ProcessResult<AppendOutcome> {
        (**self).send_message(id, message).await
    }

    async fn journal(
        &self,
        id: &ProcessId,
        after_seq: i64,
        limit: u32,
    ) -> ProcessResult<Vec<ProcessEvent>> {
        (**self).journal(id, after_seq, limit).await
    }

    async fn next_message(
        &self,
        id: &ProcessId,
        topic: &str,
        after_seq: i64,
    ) -> ProcessResult<Option<ProcessEvent>> {
        (**self).next_message(id, topic, after_seq).await
    }

    fn payload_limit(&self) -> usize {
        (**self).payload_limit()
    }

    async fn prune_terminal_processes(&self, cutoff: DateTime<Utc>) -> ProcessResult<PruneReport> {
        (**self).prune_terminal_processes(cutoff).await
    }
}

/// The append that stores `message` (checked against `payload_limit`).
/// What a child's registration found of its parent.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ParentState {
    /// The parent has ended.
    pub(crate) ended: bool,
    /// The parent was asked to stop (a cancellation request).
    pub(crate) cancelling: bool,
}

/// Whether `id` may be registered as a child of `parent` (`None`: unknown): only a parent
/// other than itself that has not ended and was not asked to stop takes children.
pub(crate) fn check_parent(
    id: &ProcessId,
    parent: &ProcessId,
    state: Option<ParentState>,
) -> ProcessResult<()> {
    let refuse = |why: &str| {
        Err(ProcessError::InvalidInput(format!(
            "parent process {parent} {why}"
        )))
    };
    match state {
        _ if parent == id => Err(ProcessError::InvalidInput(format!(
            "process {id} cannot be its own parent"
        ))),
        None => refuse("does not exist"),
        Some(ParentState { ended: true, .. }) => refuse("has ended: it can start no more children"),
        Some(ParentState {
            cancelling: true, ..
        }) => refuse("is being cancelled: it can start no more children"),
        Some(_) => Ok(()),
    }
}

/// The cancellation request a parent's cancellation passes on to each of its children:
/// `process.cancel_requested {reason: {parent, reason}, by: "parent:<id>"}`, key
/// `proclog:parent-cancelled:<parent>`. Its content depends on the parent alone, so two pods
/// passing it on (or a retried request) write it once.
pub(crate) fn parent_cancel_request(parent: &ProcessId) -> AppendRequest {
    AppendRequest::reserved(
        crate::reserved::CANCEL_REQUESTED,
        serde_json::json!({
            "reason": {"parent": parent, "reason": "the parent was cancelled"},
            "by": format!("parent:{parent}"),
        }),
    )
    .with_replay_key(format!("proclog:parent-cancelled:{parent}"))
}

/// Lease TTL of the short claim a canceller takes to complete an unowned process.
const CANCELLER_TTL: Duration = Duration::from_secs(30);

/// Writes the cancellation request `append` (a `process.cancel_requested`) to `id` and, when
/// nobody runs it (no live lease: pending, `external`, or its owner lost), claims it as
/// `canceller` and completes it `cancelled` with `{request}` at once; otherwise its owner
/// acts on the request. Returns the process as it is after.
pub(crate) async fn request_cancellation(
    registry: &(dyn ProcessRegistry + '_),
    id: &ProcessId,
    canceller: &str,
    append: AppendRequest,
) -> ProcessResult<ProcessRecord> {
    crate::validate::owner(canceller)?;
    let stored = registry.append_event(id, append).await?;
    // A replay carries the first try's request: complete with exactly that content.
    let request = stored.event.payload;
    match registry.claim(id, canceller, CANCELLER_TTL).await {
        Ok(ClaimOutcome::Acquired(lease)) => {
            let completion = Completion::new(
                crate::model::TerminalState::Cancelled,
                serde_json::json!({ "request": request }),
            )
            .fenced(&lease);
            let completed = registry.complete_process(id, completion).await;
            if completed.is_err() {
                // Hand the process back at once rather than holding it for the canceller's
                // TTL; the request stays in the log, so the next owner cancels it.
                let _ = registry.release(&lease).await;
            }
            return completed;
        }
        // Owned: the owner acts on the request. Ended meanwhile: nothing left to do.
        Ok(ClaimOutcome::Busy { .. }) | Err(ProcessError::ProcessTerminal { .. }) => {}
        Err(err) => return Err(err),
    }
    registry
        .get_process(id)
        .await?
        .ok_or_else(|| ProcessError::NotFound(id.clone()))
}

/// Tells the parent of `child` (just ended) that it ended: a `process.message` of topic
/// [`crate::reserved::CHILD_TOPIC`], `{child, state}`, idempotent by the child's id, which
/// makes a parent waiting in a join runnable. Best effort: the child's end stands whatever
/// happens here (a parent that ended meanwhile wants nothing; a failure is logged, and a
/// joining parent reads its children's terminal columns when it wakes to look again).
pub(crate) async fn tell_parent(registry: &(dyn ProcessRegistry + '_), child: &ProcessRecord) {
    let (Some(parent), Some(terminal)) = (&child.parent, &child.terminal) else {
        return;
    };
    let request = AppendRequest::reserved(
        crate::reserved::MESSAGE,
        serde_json::json!({
            "topic": crate::reserved::CHILD_TOPIC,
            "payload": {"child": child.id, "state": terminal.state},
        }),
    )
    .with_replay_key(crate::reserved::child_ended_key(child.id.as_str()));
    match registry.append_event(parent, request).await {
        Ok(_) | Err(ProcessError::ProcessTerminal { .. }) | Err(ProcessError::NotFound(_)) => {}
        Err(err) => tracing::warn!(
            process_id = %child.id, parent = %parent, error = %err,
            "could not tell the parent that its child ended; a join looks again later"
        ),
    }
}

/// Whether `existing` is what `registration` registers: the same kind, input (by JSON
/// value), disposition, retry policy, parent, queue, concurrency key and priority. A start
/// policy is not content.
pub(crate) fn same_registration(
    existing: &ProcessRecord,
    registration: &ProcessRegistration,
) -> bool {
    existing.kind == registration.kind
        && crate::model::json_equal(&existing.input, &registration.input)
        && existing.disposition == registration.disposition
        && existing.retry_policy == registration.retry
        && existing.parent == registration.parent
        && existing.queue == *registration.queue.as_ref().unwrap_or(&registration.kind)
        && existing.concurrency_key == registration.concurrency_key
        && existing.priority == registration.priority
}

pub(crate) fn message_request(
    message: &Message,
    payload_limit: usize,
) -> ProcessResult<AppendRequest> {
    crate::validate::message(message, payload_limit)?;
    let mut request = AppendRequest::reserved(
        crate::reserved::MESSAGE,
        serde_json::json!({"topic": message.topic, "payload": message.payload}),
    );
    if let Some(key) = &message.replay_key {
        request = request.with_replay_key(crate::reserved::message_key(key));
    }
    Ok(request)
}

/// Whether `event` is a message of `topic`.
pub(crate) fn is_message_of(event: &ProcessEvent, topic: &str) -> bool {
    event.event_type == crate::reserved::MESSAGE
        && event
            .payload
            .get("topic")
            .and_then(serde_json::Value::as_str)
            == Some(topic)
}

/// Settings shared by every registry implementation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryConfig {
    /// The writer recorded on every event this registry appends (the pod id).
    pub writer: String,
    /// Largest payload, input or output accepted, serialized, in bytes.
    pub max_payload_bytes: usize,
    /// Byte budget of one `events_after` page (payloads, serialized): a read holds about this
    /// much at most, whatever `limit` says.
    pub max_page_bytes: usize,
}

impl RegistryConfig {
    /// A config for `writer` with the default payload limit (256 KiB) and page budget
    /// (1 MiB).
    pub fn new(writer: impl Into<String>) -> Self {
        Self {
            writer: writer.into(),
            max_payload_bytes: crate::validate::DEFAULT_MAX_PAYLOAD_BYTES,
            max_page_bytes: crate::validate::DEFAULT_MAX_PAGE_BYTES,
        }
    }

    /// The same config with another page budget (see [`RegistryConfig::max_page_bytes`]).
    pub fn with_max_page_bytes(mut self, budget: usize) -> Self {
        self.max_page_bytes = budget;
        self
    }

    /// The same config with another payload limit.
    pub fn with_max_payload_bytes(mut self, limit: usize) -> Self {
        self.max_payload_bytes = limit;
        self
    }
}
