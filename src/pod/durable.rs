//! Durable execution inside a run (CONTRACT §9): memoized steps, durable timers, receives,
//! and the suspension that lets a long wait give its pod back.
//!
//! A run's *journal* is the part of the process log it replays: `process.step` (a step's
//! stored output), `process.timer` (when a timer is due) and `process.received` (which
//! message the `n`th receive of a topic took). Each entry carries a replay key derived from
//! its name ([`crate::reserved`]), so an entry is written once whatever the number of runs,
//! and a later run (a rerun after a lost owner, a resume after a wait, a retry after a
//! failure) finds it instead of doing the work again. The journal is read once per run, at
//! its first durable call, and only when an earlier run of the process started.
//!
//! A wait that cannot be satisfied soon suspends the process: the run records the wait
//! ([`crate::ProcessRegistry::suspend`]), the engine's future is dropped where it awaits, and
//! the process waits without a lease or a slot until it is due or a message arrives; then a
//! run on any pod replays the journal up to the wait and goes on from there.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::{Notify, OnceCell};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::engine::RunEvents;
use super::retry::retry_write;
use crate::error::{ProcessError, ProcessResult};
use crate::model::{
    AppendRequest, ProcessEvent, ProcessId, ProcessRegistration, RetryPolicy, Suspension,
    TerminalRecord,
};
use crate::reserved;

/// Why a step, timer or receive could not give its answer.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The step's closure failed (every attempt of it, with retries); nothing was stored,
    /// so a later run executes it again. Carries the closure's last error.
    #[error("step {name:?} failed: {error}")]
    Failed {
        /// The step.
        name: String,
        /// What the closure returned last.
        error: Value,
    },
    /// The log could not be read or written: the lease was lost, the process ended, the
    /// database was unreachable for longer than the lease, or an output was refused (too
    /// large). The run is being stopped in the first three cases.
    #[error("step {name:?}: {source}")]
    Store {
        /// The step, timer or topic.
        name: String,
        /// The store's answer.
        #[source]
        source: ProcessError,
    },
    /// A stored output does not decode as the type asked for (the engine changed the type
    /// of a step whose output is in the log).
    #[error("step {name:?}: the stored output does not decode: {reason}")]
    Decode {
        /// The step.
        name: String,
        /// Why.
        reason: String,
    },
    /// A bad name, or a name used twice in one run.
    #[error("{0}")]
    Invalid(String),
    /// The run is being stopped (cancellation, deadline, lost lease, pod stopping) while it
    /// waited; return soon.
    #[error("the run is stopping")]
    Stopped,
}

impl From<StepError> for Value {
    /// The error as an engine's failure output: `{"error": <message>, "step": ...}` (a
    /// closure's own error value is kept as `cause`).
    fn from(err: StepError) -> Value {
        match &err {
            StepError::Failed { name, error } => {
                json!({"error": err.to_string(), "step": name, "cause": error})
            }
            StepError::Store { name, .. } | StepError::Decode { name, .. } => {
                json!({"error": err.to_string(), "step": name})
            }
            StepError::Invalid(_) | StepError::Stopped => json!({"error": err.to_string()}),
        }
    }
}

/// A lower bound of the database clock, kept from the answers of the run's own statements:
/// a claim or an append answered at local instant `l` with database time `d` proves the
/// database clock read at least `d + (now - l)` at local instant `now`. A timer compared
/// against it never fires early, whatever the local clock's offset.
#[derive(Debug)]
pub(crate) struct DbClock {
    base: Mutex<(DateTime<Utc>, Instant)>,
}

impl DbClock {
    pub(crate) fn new(database_time: DateTime<Utc>, local: Instant) -> Self {
        Self {
            base: Mutex::new((database_time, local)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (DateTime<Utc>, Instant)> {
        self.base.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Learns that the database clock read at least `database_time` before `local`.
    pub(crate) fn observe(&self, database_time: DateTime<Utc>, local: Instant) {
        let mut base = self.lock();
        let known = base.0 + delta(local.saturating_duration_since(base.1));
        if database_time > known {
            *base = (database_time, local);
        }
    }

    /// The database clock now, at least.
    pub(crate) fn now(&self) -> DateTime<Utc> {
        let base = self.lock();
        base.0 + delta(base.1.elapsed())
    }
}

fn delta(duration: Duration) -> TimeDelta {
    TimeDelta::from_std(duration).unwrap_or(TimeDelta::MAX)
}

/// What the run does with a wait.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WaitPolicy {
    /// Waits up to this long are slept in the run; longer ones suspend the process.
    pub(crate) suspend_after: Duration,
    /// A join not told of a child's end looks again after this long.
    pub(crate) join_recheck: Duration,
}

/// The durable state of one run, shared by the engine's calls and the run's driver.
pub(crate) struct Durable {
    events: RunEvents,
    /// Whether an earlier run started: only then can a journal exist.
    replays: bool,
    journal: OnceCell<HashMap<String, ProcessEvent>>,
    state: Mutex<RunState>,
    /// Receives run one at a time, so that the `n`th receive of a topic is well defined.
    receiving: tokio::sync::Mutex<()>,
    suspended: Notify,
    clock: DbClock,
    policy: WaitPolicy,
    cancel: CancellationToken,
    retry_policy: Option<RetryPolicy>,
}

#[derive(Default)]
struct RunState {
    steps: HashSet<String>,
    timers: HashSet<String>,
    spawns: HashSet<String>,
    receives: HashMap<String, u64>,
    last_received: HashMap<String, i64>,
    /// Set when the engine asked to suspend; the driver takes it once no durable wait is
    /// still on its way to one (`active` is 0).
    suspension: Option<Suspension>,
    /// Durable waits (sleeps, receives) in progress and not parked in a suspension.
    active: u32,
    /// The wait the engine is sleeping in, if any: a stopping pod suspends it there.
    sleeping: Option<Suspension>,
    retryable: bool,
    /// Steps executed and stored by this run, and steps found stored.
    executed: u64,
    replayed: u64,
}

/// What a run's steps did: for logs and the console.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepCounts {
    /// Steps this run executed and stored.
    pub executed: u64,
    /// Steps this run found stored and did not execute.
    pub replayed: u64,
}

impl Durable {
    pub(crate) fn new(
        events: RunEvents,
        replays: bool,
        clock: DbClock,
        policy: WaitPolicy,
        cancel: CancellationToken,
        retry_policy: Option<RetryPolicy>,
    ) -> Self {
        Self {
            events,
            replays,
            journal: OnceCell::new(),
            state: Mutex::new(RunState::default()),
            receiving: tokio::sync::Mutex::new(()),
            suspended: Notify::new(),
            clock,
            policy,
            cancel,
            retry_policy,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The run's appends.
    pub(crate) fn events(&self) -> &RunEvents {
        &self.events
    }

    fn id(&self) -> &ProcessId {
        &self.events.lease().process_id
    }

    /// The database clock now, at least.
    pub(crate) fn database_now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// The retry policy that applies to this process.
    pub(crate) fn retry_policy(&self) -> Option<&RetryPolicy> {
        self.retry_policy.as_ref()
    }

    /// The suspension the engine asked for, once it asked and every other durable wait it
    /// awaits at the same time has parked too (so that a receive raced against a timer
    /// suspends for both).
    pub(crate) async fn suspension_requested(&self) -> Suspension {
        loop {
            let notified = self.suspended.notified();
            {
                let state = self.state();
                if state.active == 0
                    && let Some(suspension) = state.suspension.clone()
                {
                    return suspension;
                }
            }
            notified.await;
        }
    }

    /// Counts a durable wait in progress until the guard is dropped (returned, parked, or
    /// dropped by the engine).
    fn enter_wait(&self) -> ActiveWait<'_> {
        self.state().active += 1;
        ActiveWait(self)
    }

    /// The wait the engine sleeps in right now (in the run), if any.
    pub(crate) fn sleeping(&self) -> Option<Suspension> {
        self.state().sleeping.clone()
    }

    /// Whether the engine marked its failure retryable.
    pub(crate) fn is_retryable(&self) -> bool {
        self.state().retryable
    }

    pub(crate) fn mark_retryable(&self) {
        self.state().retryable = true;
    }

    /// What the steps of this run did.
    pub(crate) fn step_counts(&self) -> StepCounts {
        let state = self.state();
        StepCounts {
            executed: state.executed,
            replayed: state.replayed,
        }
    }

    /// Reads (and retries, while the lease is live) through the registry.
    async fn read<T, F, Fut>(&self, what: &str, read: F) -> ProcessResult<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = ProcessResult<T>>,
    {
        retry_write(&self.events.clock, &self.events.retries, what, read).await
    }

    /// The journal entry stored under `key`, if any (the journal is read at the first call).
    async fn stored(&self, key: &str) -> ProcessResult<Option<ProcessEvent>> {
        if !self.replays {
            return Ok(None);
        }
        let journal = self
            .journal
            .get_or_try_init(|| async {
                let mut entries = HashMap::new();
                let mut after = 0;
                loop {
                    let page = self
                        .read("journal read", || {
                            self.events.registry.journal(self.id(), after, 1_000)
                        })
                        .await?;
                    let Some(last) = page.last() else { break };
                    after = last.seq;
                    for event in page {
                        if let Some(key) = event.replay_key.clone() {
                            entries.insert(key, event);
                        }
                    }
                }
                Ok::<_, ProcessError>(entries)
            })
            .await?;
        Ok(journal.get(key).cloned())
    }

    /// Appends a journal entry of ours (reserved type, derived key), learning the database
    /// clock from the answer.
    async fn record(
        &self,
        event_type: &str,
        payload: Value,
        key: String,
    ) -> ProcessResult<ProcessEvent> {
        let outcome = self
            .events
            .append_request(AppendRequest::reserved(event_type, payload).with_replay_key(key))
            .await?;
        self.clock
            .observe(outcome.event.occurred_at, Instant::now());
        Ok(outcome.event)
    }

    fn claim_name(
        &self,
        what: &str,
        name: &str,
        used: fn(&mut RunState) -> &mut HashSet<String>,
    ) -> Result<(), StepError> {
        crate::validate::durable_name(what, name)
            .map_err(|err| StepError::Invalid(err.to_string()))?;
        if !used(&mut self.state()).insert(name.to_owned()) {
            return Err(StepError::Invalid(format!(
                "{what} {name:?} is used twice in one run: names must be unique within a process"
            )));
        }
        Ok(())
    }

    pub(crate) async fn step<T, F, Fut>(
        &self,
        name: &str,
        retry: Option<&RetryPolicy>,
        mut body: F,
    ) -> Result<T, StepError>
    where
        T: Serialize + DeserializeOwned + Send,
        F: FnMut() -> Fut + Send,
        Fut: Future<Output = Result<T, Value>> + Send,
    {
        self.claim_name("step name", name, |state| &mut state.steps)?;
        let store = |source| StepError::Store {
            name: name.to_owned(),
            source,
        };
        let key = reserved::step_key(name);
        if let Some(stored) = self.stored(&key).await.map_err(store)? {
            self.state().replayed += 1;
            return serde_json::from_value(stored.payload["output"].clone()).map_err(|err| {
                StepError::Decode {
                    name: name.to_owned(),
                    reason: err.to_string(),
                }
            });
        }
        let attempts = retry.map_or(1, |policy| policy.max_attempts.max(1));
        let mut attempt = 1;
        let span = tracing::info_span!("step", step = name);
        let output = loop {
            match body().instrument(span.clone()).await {
                Ok(output) => break output,
                Err(error) if attempt >= attempts || self.cancel.is_cancelled() => {
                    return Err(StepError::Failed {
                        name: name.to_owned(),
                        error,
                    });
                }
                Err(error) => {
                    let delay = retry.map_or(Duration::ZERO, |policy| {
                        policy.delay(attempt, random_share())
                    });
                    tracing::info!(step = name, attempt, ?delay, %error, "step failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.cancel.cancelled() => {
                            return Err(StepError::Failed { name: name.to_owned(), error });
                        }
                    }
                    attempt += 1;
                }
            }
        };
        let value = serde_json::to_value(&output).map_err(|err| StepError::Decode {
            name: name.to_owned(),
            reason: format!("the output does not serialize: {err}"),
        })?;
        self.record(reserved::STEP, json!({"name": name, "output": value}), key)
            .await
            .map_err(store)?;
        self.state().executed += 1;
        Ok(output)
    }

    /// The due time of timer `key` (stored, or recorded now from `timer`, with `label`'s
    /// fields).
    async fn timer_due(
        &self,
        key: String,
        label: Value,
        timer: TimerSpec,
    ) -> ProcessResult<DateTime<Utc>> {
        let event = match self.stored(&key).await? {
            Some(event) => event,
            None => {
                let mut payload = timer.payload();
                if let (Value::Object(payload), Value::Object(label)) = (&mut payload, label) {
                    payload.extend(label);
                }
                self.record(reserved::TIMER, payload, key).await?
            }
        };
        TimerSpec::due(&event).ok_or_else(|| ProcessError::Undecodable {
            id: self.id().clone(),
            location: format!("event {} payload", event.seq),
            reason: "a timer without `until` or `duration_ms`".into(),
        })
    }

    pub(crate) async fn sleep(&self, name: &str, timer: TimerSpec) -> Result<(), StepError> {
        self.sleep_inner(name, timer)
            .instrument(tracing::info_span!("wait", timer = name))
            .await
    }

    async fn sleep_inner(&self, name: &str, timer: TimerSpec) -> Result<(), StepError> {
        self.claim_name("timer name", name, |state| &mut state.timers)?;
        let active = self.enter_wait();
        let due = self
            .timer_due(reserved::timer_key(name), json!({ "name": name }), timer)
            .await
            .map_err(|source| StepError::Store {
                name: name.to_owned(),
                source,
            })?;
        let wait = Suspension {
            wake_at: Some(due),
            delay: None,
            topic: None,
            after_seq: 0,
            retry: false,
            reason: json!({"reason": "timer", "timer": name}),
        };
        self.wait_until(due, wait, active).await
    }

    /// Waits until `due` on the database clock: in the run when that is soon, otherwise
    /// by suspending the process (this future then never completes: the run drops it).
    async fn wait_until(
        &self,
        due: DateTime<Utc>,
        wait: Suspension,
        active: ActiveWait<'_>,
    ) -> Result<(), StepError> {
        loop {
            let remaining = (due - self.clock.now()).to_std();
            let Ok(remaining) = remaining else {
                return Ok(());
            };
            if remaining.is_zero() {
                return Ok(());
            }
            if remaining > self.policy.suspend_after {
                return self.suspend(wait, active).await;
            }
            self.state().sleeping = Some(wait.clone());
            let slept = tokio::select! {
                _ = tokio::time::sleep(remaining) => true,
                _ = self.cancel.cancelled() => false,
            };
            self.state().sleeping = None;
            if !slept {
                return Err(StepError::Stopped);
            }
        }
    }

    /// The payload of the message stored at `seq`.
    async fn message_at(&self, seq: i64) -> ProcessResult<Value> {
        let id = self.id().clone();
        let page = self
            .read("message read", || {
                self.events.registry.events_after(&id, seq - 1, 1)
            })
            .await?;
        match page.first() {
            Some(event) if event.seq == seq && event.event_type == reserved::MESSAGE => {
                Ok(event.payload["payload"].clone())
            }
            _ => Err(ProcessError::Undecodable {
                id,
                location: format!("event {seq}"),
                reason: "a receipt names a seq that holds no message".into(),
            }),
        }
    }

    /// Asks the run to suspend the process with `wait`; never returns (the run drops the
    /// engine's future), unless the run is stopping. Waits the engine awaits together (a
    /// receive raced against a timer) are merged: the earliest wake time, and the topic.
    async fn suspend(&self, wait: Suspension, active: ActiveWait<'_>) -> Result<(), StepError> {
        {
            let mut state = self.state();
            let merged = match state.suspension.take() {
                None => wait,
                Some(earlier) => match merge(earlier.clone(), wait) {
                    Ok(merged) => merged,
                    Err(err) => {
                        state.suspension = Some(earlier);
                        return Err(err);
                    }
                },
            };
            state.suspension = Some(merged);
        }
        // Parked: the guard's drop counts this wait out and wakes the driver.
        drop(active);
        self.cancel.cancelled().await;
        Err(StepError::Stopped)
    }

    pub(crate) async fn recv(
        &self,
        topic: &str,
        timeout: Option<Duration>,
    ) -> Result<Option<Value>, StepError> {
        self.recv_inner(topic, timeout)
            .instrument(tracing::info_span!("wait", topic = topic))
            .await
    }

    async fn recv_inner(
        &self,
        topic: &str,
        timeout: Option<Duration>,
    ) -> Result<Option<Value>, StepError> {
        crate::validate::durable_name("topic", topic)
            .map_err(|err| StepError::Invalid(err.to_string()))?;
        let store = |source| StepError::Store {
            name: topic.to_owned(),
            source,
        };
        let active = self.enter_wait();
        let _one_at_a_time = self.receiving.lock().await;
        // The `n`th receive of the topic counts only once it has an answer: a receive that
        // fails (and is tried again by the engine) does not skip a number.
        let n = self
            .state()
            .receives
            .get(topic)
            .copied()
            .unwrap_or_default()
            + 1;
        let received = |seq: Option<i64>| {
            let mut state = self.state();
            state.receives.insert(topic.to_owned(), n);
            if let Some(seq) = seq {
                state.last_received.insert(topic.to_owned(), seq);
            }
        };
        let key = reserved::receipt_key(topic, n);
        if let Some(receipt) = self.stored(&key).await.map_err(store)? {
            let Some(seq) = receipt.payload["message_seq"].as_i64() else {
                received(None);
                return Ok(None);
            };
            // The receipt names the message; its payload is read from the message itself.
            let message = self.message_at(seq).await.map_err(store)?;
            received(Some(seq));
            return Ok(Some(message));
        }
        let after = self
            .state()
            .last_received
            .get(topic)
            .copied()
            .unwrap_or_default();
        let due = match timeout {
            Some(timeout) => Some(
                self.timer_due(
                    reserved::receive_timeout_key(topic, n),
                    json!({"topic": topic, "n": n}),
                    TimerSpec::Duration(timeout),
                )
                .await
                .map_err(store)?,
            ),
            None => None,
        };
        let id = self.id().clone();
        let message = self
            .read("message read", || {
                self.events.registry.next_message(&id, topic, after)
            })
            .await
            .map_err(store)?;
        if let Some(message) = message {
            // The receipt holds the message's seq, not its payload: it is small whatever the
            // message's size.
            self.record(
                reserved::RECEIVED,
                json!({"topic": topic, "n": n, "message_seq": message.seq}),
                key,
            )
            .await
            .map_err(store)?;
            received(Some(message.seq));
            return Ok(Some(message.payload["payload"].clone()));
        }
        if let Some(due) = due
            && due <= self.clock.now()
        {
            self.record(
                reserved::RECEIVED,
                json!({"topic": topic, "n": n, "timed_out": true}),
                key,
            )
            .await
            .map_err(store)?;
            received(None);
            return Ok(None);
        }
        // Nothing yet: wait for a message of the topic (or the timeout) without the pod.
        // The suspension itself checks for a message stored in between.
        self.suspend(
            Suspension {
                wake_at: due,
                delay: None,
                topic: Some(topic.to_owned()),
                after_seq: after,
                retry: false,
                reason: json!({"reason": "message", "topic": topic, "n": n}),
            },
            active,
        )
        .await
        .map(|()| None)
    }
}

impl Durable {
    pub(crate) async fn spawn(
        &self,
        name: &str,
        mut registration: ProcessRegistration,
    ) -> Result<ProcessId, StepError> {
        self.claim_name("child name", name, |state| &mut state.spawns)?;
        if registration.start_policy.is_some() {
            // A policy could answer another process than the one the spawn records.
            return Err(StepError::Invalid(format!(
                "child {name:?}: a spawned child cannot carry a start policy"
            )));
        }
        let store = |source| StepError::Store {
            name: name.to_owned(),
            source,
        };
        let key = reserved::spawn_key(name);
        if let Some(stored) = self.stored(&key).await.map_err(store)? {
            return serde_json::from_value(stored.payload["child"].clone()).map_err(|err| {
                StepError::Decode {
                    name: name.to_owned(),
                    reason: err.to_string(),
                }
            });
        }
        let child = registration
            .id
            .clone()
            .unwrap_or_else(|| child_id(self.id(), name));
        registration.id = Some(child.clone());
        registration.parent = Some(self.id().clone());
        // Registration is idempotent by id and content: a run that stopped between this and
        // the record below registers the same child again, which answers the one it made.
        let span = tracing::info_span!("spawn", child = name, child_id = %child);
        self.read("child registration", || {
            self.events.registry.register_process(registration.clone())
        })
        .instrument(span)
        .await
        .map_err(|err| match err {
            ProcessError::InvalidInput(_) | ProcessError::Conflict { .. } => {
                StepError::Invalid(format!("child {name:?}: {err}"))
            }
            err => store(err),
        })?;
        self.record(
            reserved::SPAWNED,
            json!({"name": name, "child": child}),
            key,
        )
        .await
        .map_err(store)?;
        Ok(child)
    }

    pub(crate) async fn join(
        &self,
        children: &[ProcessId],
    ) -> Result<Vec<TerminalRecord>, StepError> {
        self.join_inner(children)
            .instrument(tracing::info_span!("wait", children = children.len()))
            .await
    }

    async fn join_inner(&self, children: &[ProcessId]) -> Result<Vec<TerminalRecord>, StepError> {
        if children.is_empty() || children.len() > MAX_JOINED {
            return Err(StepError::Invalid(format!(
                "a join waits for 1 to {MAX_JOINED} children, not {}",
                children.len()
            )));
        }
        let store = |source| StepError::Store {
            name: "join".to_owned(),
            source,
        };
        let active = self.enter_wait();
        let id = self.id().clone();
        // The parent's last seq is read before the children: a child that ends after the
        // read below tells the parent with a message past it, which wakes the wait at once.
        let seen = self
            .read("process read", || self.events.registry.get_process(&id))
            .await
            .map_err(store)?
            .ok_or_else(|| store(ProcessError::NotFound(id.clone())))?
            .last_seq;
        let states = self
            .read("children read", || {
                self.events.registry.terminal_states(children)
            })
            .await
            .map_err(store)?;
        let mut ended = Vec::with_capacity(children.len());
        let mut waiting = 0;
        for child in children {
            match states.get(child) {
                None => {
                    return Err(StepError::Invalid(format!(
                        "joined process {child} does not exist"
                    )));
                }
                Some(Some(terminal)) => ended.push(terminal.clone()),
                Some(None) => waiting += 1,
            }
        }
        if waiting == 0 {
            return Ok(ended);
        }
        let recheck = TimeDelta::from_std(self.policy.join_recheck).unwrap_or(TimeDelta::MAX);
        self.suspend(
            Suspension {
                wake_at: self.clock.now().checked_add_signed(recheck),
                delay: None,
                topic: Some(reserved::CHILD_TOPIC.to_owned()),
                after_seq: seen,
                retry: false,
                reason: json!({"reason": "children", "waiting": waiting, "of": children.len()}),
            },
            active,
        )
        .await
        .map(|()| Vec::new())
    }
}

/// Most children one join waits for (their outputs are read at each look: at most 100 ×
/// the payload limit).
pub const MAX_JOINED: usize = 100;

/// The id of child `name` of `parent` when the run gives none: `<parent>.<name>`, or, when
/// that is longer than an id may be, a UUID derived from both (the same for every run).
pub(crate) fn child_id(parent: &ProcessId, name: &str) -> ProcessId {
    let plain = format!("{parent}.{name}");
    if let Ok(id) = ProcessId::new(plain.clone()) {
        return id;
    }
    let derived = uuid::Uuid::new_v5(&CHILD_NAMESPACE, plain.as_bytes());
    ProcessId::new(derived.to_string()).expect("a UUID is a valid id")
}

/// The namespace of derived child ids (a fixed random UUID).
const CHILD_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6c0e_4e1f_0d2b_4f7a_9a53_2c1b_8e44_7d10);

/// A durable wait in progress (see [`Durable::suspension_requested`]).
struct ActiveWait<'a>(&'a Durable);

impl Drop for ActiveWait<'_> {
    fn drop(&mut self) {
        let mut state = self.0.state();
        state.active = state.active.saturating_sub(1);
        drop(state);
        self.0.suspended.notify_one();
    }
}

/// Two waits awaited at once, as one: woken by the earlier time or by the topic. Two
/// receives of different topics at once cannot be one wait.
fn merge(a: Suspension, b: Suspension) -> Result<Suspension, StepError> {
    let topic = match (&a.topic, &b.topic) {
        (Some(x), Some(y)) if x != y => {
            return Err(StepError::Invalid(format!(
                "a run can wait for one topic at a time, not {x:?} and {y:?} at once"
            )));
        }
        (Some(_), _) => a.topic.clone(),
        _ => b.topic.clone(),
    };
    let after_seq = if a.topic.is_some() {
        a.after_seq
    } else {
        b.after_seq
    };
    let wake_at = match (a.wake_at, b.wake_at) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    };
    Ok(Suspension {
        wake_at,
        delay: None,
        topic,
        after_seq,
        retry: false,
        reason: json!({"reason": "waits", "waits": [a.reason, b.reason]}),
    })
}

/// A timer as recorded: a duration from its record, or an instant.
#[derive(Clone, Copy, Debug)]
pub(crate) enum TimerSpec {
    Duration(Duration),
    Until(DateTime<Utc>),
}

impl TimerSpec {
    fn payload(&self) -> Value {
        match self {
            TimerSpec::Duration(duration) => {
                json!({"duration_ms": u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)})
            }
            TimerSpec::Until(at) => json!({ "until": at }),
        }
    }

    /// When the timer recorded as `event` is due.
    fn due(event: &ProcessEvent) -> Option<DateTime<Utc>> {
        if let Some(until) = event.payload.get("until") {
            return serde_json::from_value(until.clone()).ok();
        }
        let millis = event.payload.get("duration_ms")?.as_u64()?;
        event
            .occurred_at
            .checked_add_signed(TimeDelta::milliseconds(i64::try_from(millis).ok()?))
    }
}

/// A number in `[0, 1)` for jitter.
pub(crate) fn random_share() -> f64 {
    // The low 53 bits of a v4 UUID are random (its version and variant bits are higher).
    (uuid::Uuid::new_v4().as_u128() & ((1u128 << 53) - 1)) as f64 / (1u64 << 53) as f64
}
