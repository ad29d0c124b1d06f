//! `ProcessEngine`: what runs a process of a given kind on a pod.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::future::Future;
use std::time::Duration;

use super::durable::{Durable, StepCounts, StepError, TimerSpec};
use super::lease::LeaseClock;
use super::retry::retry_write;
use crate::error::ProcessResult;
use crate::model::{
    AppendOutcome, AppendRequest, Lease, ProcessEvent, ProcessId, ProcessRecord,
    ProcessRegistration, RetryPolicy, TerminalRecord,
};
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
///
/// # Durable execution
///
/// Work that must not be done twice goes in [`RunContext::step`]: its output is stored and
/// every later run of the process gets it back without executing the step. Waits go through
/// [`RunContext::sleep`] and [`RunContext::recv`]: a long one suspends the process, holding no
/// pod, and a later run (on any pod) replays the steps, timers and receipts before it and goes
/// on. So an engine is written as straight-line code from the top, and every run of it
/// replays to where the last one stopped: code outside steps runs again on every run, and
/// must be cheap and deterministic enough to reach the same steps in the same order.
#[async_trait]
pub trait ProcessEngine: Send + Sync {
    /// Runs one attempt of the process.
    async fn run(&self, run: RunContext) -> EngineResult;
}

/// Everything an engine gets for one run.
pub struct RunContext {
    /// The process (input, kind, disposition, retries, ...).
    pub process: ProcessRecord,
    /// 1 for the first run, +1 for every rerun after a lost owner. A resume after a wait
    /// and a retry after a failure keep the attempt (see [`ProcessRecord::retries`]).
    pub attempt: i32,
    /// True when this run resumes the process after a wait or a retry's backoff.
    pub resumed: bool,
    /// Appends to the process log under the run's lease.
    pub events: RunEvents,
    /// Fires when the run must stop.
    pub cancel: CancellationToken,
    pub(crate) durable: Arc<Durable>,
}

impl RunContext {
    /// True while this run surely holds its lease and has not been asked to stop: check it
    /// right before an effect outside the database.
    pub fn is_owner(&self) -> bool {
        !self.cancel.is_cancelled() && self.events.lease_is_live()
    }

    /// A memoized step (CONTRACT §9): the first run that gets here executes `body` and
    /// stores its output in the log (`process.step {name, output}`); every later run of the
    /// process (a rerun after a lost owner, a resume after a wait, a retry after a failure)
    /// gets the stored output back and does not execute `body`.
    ///
    /// Names are unique within a process (a name used twice in a run is `Invalid`); the
    /// output is JSON within the payload limit. A failing `body` stores nothing
    /// ([`StepError::Failed`]): a later run executes it again.
    ///
    /// **When an effect inside `body` can happen twice**: only when the run that executed it
    /// was interrupted after the effect and before its output was stored (the pod died, or
    /// its lease was lost, in between). Check [`RunContext::is_owner`] right before the effect
    /// to rule out a run that has already lost its lease, and give the effect an idempotency
    /// key of the process id and the step name where the other side takes one: then even
    /// that window does the effect once.
    pub async fn step<T, F, Fut>(&self, name: &str, body: F) -> Result<T, StepError>
    where
        T: Serialize + DeserializeOwned + Send,
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = Result<T, Value>> + Send,
    {
        // Without retries the body is called at most once.
        let mut body = Some(body);
        self.durable
            .step(name, None, move || {
                let body = body
                    .take()
                    .expect("a step without retries runs its body once");
                body()
            })
            .await
    }

    /// [`RunContext::step`], executing `body` up to `policy.max_attempts` times in this run,
    /// with the policy's backoff between attempts, until it succeeds.
    pub async fn step_with_retry<T, F, Fut>(
        &self,
        name: &str,
        policy: &RetryPolicy,
        body: F,
    ) -> Result<T, StepError>
    where
        T: Serialize + DeserializeOwned + Send,
        F: FnMut() -> Fut + Send,
        Fut: Future<Output = Result<T, Value>> + Send,
    {
        self.durable.step(name, Some(policy), body).await
    }

    /// A durable timer: returns once `duration` has passed on the database clock since the
    /// first run reached timer `name` (recorded as `process.timer`), never before. A short
    /// remainder (up to the pod's `suspend_after`) is slept in the run; a longer one suspends
    /// the process: its lease and slot are given back, it is `waiting` until due, and a run
    /// on any pod then replays up to here and returns from this call.
    pub async fn sleep(&self, name: &str, duration: Duration) -> Result<(), StepError> {
        let millis = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        crate::validate::duration_millis("sleep", millis, crate::validate::MAX_SCHEDULE_MILLIS)
            .map_err(|err| StepError::Invalid(err.to_string()))?;
        self.durable
            .sleep(name, TimerSpec::Duration(duration))
            .await
    }

    /// [`RunContext::sleep`] until the instant `at` (database clock).
    pub async fn sleep_until(&self, name: &str, at: DateTime<Utc>) -> Result<(), StepError> {
        crate::validate::timestamp("sleep until", at)
            .map_err(|err| StepError::Invalid(err.to_string()))?;
        self.durable.sleep(name, TimerSpec::Until(at)).await
    }

    /// Receives the oldest message of `topic` this process has not yet received, waiting for
    /// one (without the pod: the process is suspended until a message of the topic arrives,
    /// which makes it runnable at once) for at most `timeout` (`None`: for ever). `Ok(None)`:
    /// the timeout passed first. The receipt is recorded (`process.received`), so a later
    /// run gets the same message at the same point; each message is received at most once.
    /// Receives of one run are served one at a time, in call order.
    pub async fn recv(
        &self,
        topic: &str,
        timeout: Option<Duration>,
    ) -> Result<Option<Value>, StepError> {
        if let Some(timeout) = timeout {
            let millis = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
            crate::validate::duration_millis(
                "receive timeout",
                millis,
                crate::validate::MAX_SCHEDULE_MILLIS,
            )
            .map_err(|err| StepError::Invalid(err.to_string()))?;
        }
        self.durable.recv(topic, timeout).await
    }

    /// Starts a child process, once per `name` whatever the number of runs (CONTRACT §10):
    /// registers `registration` as a child of this process (its id, when not given, is
    /// derived from this process's id and `name`, so a run that stopped before recording the
    /// spawn registers the same child again, which answers the one already made) and records
    /// `process.spawned {name, child}`; a later run gets the recorded id without registering.
    /// When the child ends, this process's log gets a `process.message` of topic
    /// `process.child` (`{child, state}`); cancelling this process requests cancellation of
    /// its children that have not ended. Refused (`StepError::Invalid`): a bad name, a name
    /// used twice, an invalid registration, or an id already used with other content.
    pub async fn spawn(
        &self,
        name: &str,
        registration: ProcessRegistration,
    ) -> Result<ProcessId, StepError> {
        self.durable.spawn(name, registration).await
    }

    /// Waits until `child` has ended and returns its terminal record. See
    /// [`RunContext::join_all`].
    pub async fn join(&self, child: &ProcessId) -> Result<TerminalRecord, StepError> {
        let mut ended = self.durable.join(std::slice::from_ref(child)).await?;
        ended
            .pop()
            .ok_or_else(|| StepError::Invalid("a join answered nothing".into()))
    }

    /// Waits until every one of `children` (1 to 100 processes, usually spawned by this
    /// run) has ended and returns their terminal records in the same order. The wait holds
    /// no pod when they have not all ended: the process is `waiting` until a child's end
    /// reaches it as a `process.child` message (or, should that message be lost with the pod
    /// that ended the child, until the pod's `join_recheck` period has passed), then a run
    /// replays up to here and looks again. The answer is read from the children's terminal
    /// columns, never from the messages. An unknown id is `StepError::Invalid`.
    pub async fn join_all(&self, children: &[ProcessId]) -> Result<Vec<TerminalRecord>, StepError> {
        self.durable.join(children).await
    }

    /// Marks the failure this run is about to return as retryable and returns `error`
    /// unchanged: `return Err(run.retryable(error))`. With a retry policy (the process's, or
    /// its kind's, see [`Engines::with_retry`]) that allows another run, the process waits
    /// for the backoff and runs again with its steps memoized; after the last run it ends
    /// `failed` with `{"error": <the last error>, "retries": <count>}`.
    pub fn retryable(&self, error: Value) -> Value {
        self.durable.mark_retryable();
        error
    }

    /// The database clock now, at least (a lower bound learned from this run's statements).
    pub fn database_now(&self) -> DateTime<Utc> {
        self.durable.database_now()
    }

    /// What this run's steps did so far: executed and stored, or found stored.
    pub fn steps(&self) -> StepCounts {
        self.durable.step_counts()
    }
}

/// Appends made by an engine, fenced by the run's lease and retried through transient
/// failures (see [`ProcessEngine`]): once the lease is lost, every append is refused with
/// `LeaseLost` and the run is stopped, so a paused or partitioned pod can never write again.
#[derive(Clone)]
pub struct RunEvents {
    pub(crate) registry: Arc<dyn ProcessRegistry>,
    lease: Lease,
    pub(crate) clock: LeaseClock,
    counter: Arc<AtomicU64>,
    pub(crate) retries: Arc<AtomicU64>,
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
                request.with_derived_key(key)
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

/// The engines a pod knows, by kind, with each kind's retry policy.
#[derive(Clone, Default)]
pub struct Engines {
    by_kind: HashMap<String, Arc<dyn ProcessEngine>>,
    retry: HashMap<String, RetryPolicy>,
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

    /// The same engines, retrying the failures an engine of `kind` marks retryable
    /// ([`RunContext::retryable`]) by `policy`, unless a process was registered with its own.
    pub fn with_retry(mut self, kind: &str, policy: RetryPolicy) -> Self {
        self.retry.insert(kind.to_owned(), policy);
        self
    }

    /// Checks every kind's retry policy (as a registration's is checked): a pod refuses to
    /// start with one out of bounds.
    pub fn validate(&self) -> ProcessResult<()> {
        for (kind, policy) in &self.retry {
            crate::validate::retry_policy(policy).map_err(|err| {
                crate::ProcessError::InvalidInput(format!("the retry policy of kind {kind}: {err}"))
            })?;
        }
        Ok(())
    }

    /// The retry policy of `kind`, if it has one.
    pub fn retry_policy(&self, kind: &str) -> Option<&RetryPolicy> {
        self.retry.get(kind)
    }

    /// These engines and those of `other` (which win on a shared kind).
    pub fn merged(mut self, other: Engines) -> Self {
        self.by_kind.extend(other.by_kind);
        self.retry.extend(other.retry);
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
