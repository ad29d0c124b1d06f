//! `ProcessEngine`: what runs a process of a given kind on a pod.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::lease::LeaseClock;
use super::retry::retry_write;
use crate::error::ProcessResult;
use crate::model::{AppendOutcome, AppendRequest, Lease, ProcessEvent, ProcessRecord};
use crate::registry::ProcessRegistry;

/// How a run ended: `Ok(output)` completes the process, `Err(output)` fails it.
pub type EngineResult = Result<Value, Value>;

/// Runs processes of one kind on a pod.
///
/// # What a run may do
///
/// A run gets a [`RunContext`]: the process (its input), the attempt number, [`RunEvents`] to
/// append to the log under the run's lease, and a cancellation token. Its result decides the
/// process's terminal state: `Ok(output)` completes it, `Err(output)` fails it. The pod writes
/// that completion, retrying until it is stored or the lease is provably lost. A run that
/// panics fails its process with `{"error": "the engine panicked: <message>", "panicked":
/// true}` (a bug is a decision too: it is not rerun after every lease expiry).
///
/// # Errors from the store
///
/// Appends retry transient database failures themselves, for as long as the lease is surely
/// live. So an engine sees an error from [`RunEvents`] only when the store is really gone for
/// longer than the lease (`Unavailable`), the lease was lost (`LeaseLost`), the process ended
/// meanwhile (`ProcessTerminal`), or its own input was refused (`InvalidInput`,
/// `PayloadTooLarge`). In the first three cases the run is being stopped and whatever the
/// engine returns is ignored, so returning the error is fine: a process ends `failed` only
/// because its engine decided so, never because of a blip.
///
/// # Stopping
///
/// `cancel` fires when the run must stop: cancellation requested, the pod draining past its
/// grace period, or the lease no longer confirmable. The engine should return soon after; if
/// it does not, the pod drops the run's future before the lease can expire on the database
/// clock (and at the end of a drain), so two engines never run one process at once. What the
/// engine returns after `cancel` fired is ignored in favour of the reason for the stop.
///
/// # Side effects outside the database
///
/// A process is run again (attempt + 1) when its owner is lost, so effects outside proclog
/// must be idempotent across attempts. Right before such an effect, check
/// [`RunContext::is_owner`] (a synchronous check that also holds for a pod that was paused
/// and has just resumed), and key the effect by something stable: the process id plus your own
/// step name. Appends can carry your own replay keys ([`RunEvents::append_with_key`]) so that a
/// rerun does not duplicate a step's event; appends without a key get one derived from the
/// lease generation and a per-run counter, which makes the pod's own retries exactly-once.
#[async_trait]
pub trait ProcessEngine: Send + Sync {
    /// Runs one attempt of the process.
    async fn run(&self, run: RunContext) -> EngineResult;
}

/// Everything an engine gets for one attempt.
pub struct RunContext {
    /// The process (input, kind, disposition, ...).
    pub process: ProcessRecord,
    /// 1 for the first run, +1 for every rerun after a lost owner.
    pub attempt: i32,
    /// Appends to the process log under the run's lease.
    pub events: RunEvents,
    /// Fires when the run must stop.
    pub cancel: CancellationToken,
}

impl RunContext {
    /// True while this run surely holds its lease and has not been asked to stop: check it
    /// right before an effect outside the database.
    pub fn is_owner(&self) -> bool {
        !self.cancel.is_cancelled() && self.events.lease_is_live()
    }
}

/// Appends made by an engine, fenced by the run's lease and retried through transient
/// failures (see [`ProcessEngine`]): once the lease is lost, every append is refused with
/// `LeaseLost` and the run is stopped, so a paused or partitioned pod can never write again.
#[derive(Clone)]
pub struct RunEvents {
    registry: Arc<dyn ProcessRegistry>,
    lease: Lease,
    clock: LeaseClock,
    counter: Arc<AtomicU64>,
    retries: Arc<AtomicU64>,
}

impl RunEvents {
    pub(crate) fn new(
        registry: Arc<dyn ProcessRegistry>,
        lease: Lease,
        clock: LeaseClock,
        retries: Arc<AtomicU64>,
    ) -> Self {
        Self {
            registry,
            lease,
            clock,
            counter: Arc::new(AtomicU64::new(0)),
            retries,
        }
    }

    /// Appends one event under the lease, with a replay key of the run's own (so a retry after
    /// a lost answer stores it once).
    pub async fn append(&self, event_type: &str, payload: Value) -> ProcessResult<ProcessEvent> {
        self.append_request(AppendRequest::new(event_type, payload))
            .await
            .map(|outcome| outcome.event)
    }

    /// Appends one event under the lease with the engine's own replay key: a rerun that
    /// appends the same key and content gets the stored event back instead of a second one.
    /// The outcome says which: `replayed` is true when the event was already stored (by an
    /// earlier run, or an earlier try of this one), so an engine can tell a step it already
    /// did. Other content under a stored key is `ReplayConflict`.
    pub async fn append_with_key(
        &self,
        event_type: &str,
        payload: Value,
        replay_key: &str,
    ) -> ProcessResult<AppendOutcome> {
        self.append_request(AppendRequest::new(event_type, payload).with_replay_key(replay_key))
            .await
    }

    pub(crate) async fn append_request(
        &self,
        request: AppendRequest,
    ) -> ProcessResult<AppendOutcome> {
        let request = match request.replay_key {
            Some(_) => request,
            None => {
                let n = self.counter.fetch_add(1, Ordering::Relaxed) + 1;
                let key = crate::reserved::run_append_key(self.lease.generation, n);
                request.with_replay_key(key)
            }
        }
        .fenced(&self.lease);
        let id = &self.lease.process_id;
        retry_write(&self.clock, &self.retries, "append", || {
            self.registry.append_event(id, request.clone())
        })
        .await
    }

    /// The lease the run writes under.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// True while the lease is surely live (see [`RunContext::is_owner`]).
    pub fn lease_is_live(&self) -> bool {
        self.clock.is_live()
    }
}

/// The engines a pod knows, by kind.
#[derive(Clone, Default)]
pub struct Engines {
    by_kind: HashMap<String, Arc<dyn ProcessEngine>>,
}

impl Engines {
    /// No engines.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the engine of `kind`.
    pub fn with(mut self, kind: &str, engine: impl ProcessEngine + 'static) -> Self {
        self.by_kind.insert(kind.to_owned(), Arc::new(engine));
        self
    }

    /// These engines and those of `other` (which win on a shared kind).
    pub fn merged(mut self, other: Engines) -> Self {
        self.by_kind.extend(other.by_kind);
        self
    }

    /// The engine of `kind`, if any.
    pub fn get(&self, kind: &str) -> Option<Arc<dyn ProcessEngine>> {
        self.by_kind.get(kind).cloned()
    }

    /// The kinds known, sorted.
    pub fn kinds(&self) -> Vec<String> {
        let mut kinds: Vec<String> = self.by_kind.keys().cloned().collect();
        kinds.sort();
        kinds
    }
}
