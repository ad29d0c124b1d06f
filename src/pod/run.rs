//! One run of one claimed process, as an explicit state machine.
//!
//! ```text
//!            Claimed ──(abandon, already started once)──────────────┐
//!               │                                                   │
//!               v                                                   v
//!           Starting ──(pod stopping)──> Releasing ──> Done     Completing ──> Done
//!               │                                                   ^
//!               v                                                   │
//!            Running ──(engine returned / cancel requested /────────┘
//!               │        abandon process drained)
//!               ├──(rerun process drained)──> Releasing
//!               ├──(durable wait, retryable failure)──> Suspending ──> Done(Suspended)
//!               └──(lease lost or unconfirmable)──> Done(LeaseLost)
//! ```
//!
//! `Claimed` also ends a process past its deadline (`Completing` failed) and one whose
//! cancellation was requested while it waited (`Completing` cancelled).
//!
//! Each phase makes at most one kind of write, and every write goes through
//! `retry::retry_write`: transient failures are retried while the lease is surely
//! live, and only `LeaseLost`, terminal and input errors end a retry. The lease is renewed by
//! its own task (`lease::keep_lease`) from the claim until the run is done, so a
//! completion that hits a blip is retried under a lease that stays live.
//!
//! | phase | write (idempotent by) | on `LeaseLost` / no time left | on terminal |
//! |---|---|---|---|
//! | Claimed | read of the log (abandon only) | Done(LeaseLost) | Done(AlreadyEnded) |
//! | Starting | `process.started` (key `proclog:g<gen>:started`) | Done(LeaseLost) | Done(AlreadyEnded) |
//! | Running | engine appends (key `proclog:g<gen>:<n>`) | Done(LeaseLost) | Completing, refused |
//! | Completing | completion (identical repeat returns the record) | Done(LeaseLost) | Done(AlreadyEnded) |
//! | Releasing | release (idempotent) | Done(Released) | Done(Released) |
//! | Suspending | `proclog.suspend_process` (key `proclog:g<gen>:waiting`) | Done(LeaseLost) | Done(AlreadyEnded) |
//!
//! A run whose lease cannot be confirmed stops its engine at the write deadline and drops it at
//! the hard deadline (see [`super::lease`]); it then writes nothing more, and the process is
//! taken over after the TTL.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::FutureExt;
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use chrono::{DateTime, Utc};

use super::durable::{DbClock, Durable, WaitPolicy, random_share};
use super::engine::{EngineResult, RunContext, RunEvents};
use super::lease::{LeaseClock, keep_lease};
use super::retry::retry_write;
use super::worker::Shared;
use crate::error::ProcessError;
use crate::model::{
    AppendRequest, Completion, Disposition, RetryPolicy, RunnableClaim, Suspension, TerminalState,
};
use crate::reserved::{self, STARTED};
use crate::tasks::TaskHandle;

/// Where a run is.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Phase {
    /// Claimed: decide whether to start it or, for an `abandon` process that already started
    /// once, to end it as `abandoned`.
    Claimed,
    /// Writing `process.started`.
    Starting,
    /// The engine runs.
    Running,
    /// Writing the terminal state. `fallback` is set when this completion replaces one the
    /// store refused as input (an oversized output), so it is never replaced twice.
    Completing {
        state: TerminalState,
        output: Value,
        fallback: bool,
    },
    /// Handing the lease back so that another pod continues at once.
    Releasing,
    /// Suspending the process: it waits without a lease until its wake time or a message.
    Suspending(Suspension),
    /// The run is over.
    Done(RunEnd),
}

impl Phase {
    fn completing(state: TerminalState, output: Value) -> Self {
        Phase::Completing {
            state,
            output,
            fallback: false,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Phase::Claimed => "claimed",
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Completing { .. } => "completing",
            Phase::Releasing => "releasing",
            Phase::Suspending(_) => "suspending",
            Phase::Done(_) => "done",
        }
    }
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunEnd {
    /// This run wrote the process's terminal state.
    Ended(TerminalState),
    /// The lease was handed back for another pod to continue.
    Released,
    /// The lease was lost, or could not be confirmed in time: this run wrote nothing more.
    LeaseLost,
    /// The process had already ended (or was removed): nothing left to do.
    AlreadyEnded,
    /// The process was suspended: it waits, without a lease, for its wake time or a message.
    Suspended,
}

/// Why a run was asked to stop before its engine returned.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Interrupt {
    /// The lease was lost or could not be confirmed before its write deadline.
    LeaseUnconfirmed,
    /// `process.cancel_requested` was found in the log (its payload).
    CancelRequested(Value),
    /// The pod is stopping and the grace period is over.
    PodStopping,
    /// The engine waits durably for this: suspend the process.
    Suspend(Suspension),
    /// The process's deadline passed.
    Deadline(DateTime<Utc>),
}

/// The pod-wide signals a run obeys.
#[derive(Clone, Default)]
pub(crate) struct PodStop {
    /// The grace period of a drain is over: stop engines, release (or abandon) their runs.
    pub(crate) stopping: CancellationToken,
    /// Engines that ignored `stopping` are dropped.
    pub(crate) hard_stop: CancellationToken,
}

/// The decision after the engine returned or was stopped. `lease_live`: whether the lease is
/// still surely live now.
pub(crate) fn after_engine(
    interrupt: Option<Interrupt>,
    outcome: Option<EngineResult>,
    disposition: Disposition,
    lease_live: bool,
    drained_evidence: impl FnOnce() -> Value,
) -> Phase {
    if !lease_live {
        return Phase::Done(RunEnd::LeaseLost);
    }
    match interrupt {
        None => match outcome {
            Some(Ok(output)) => Phase::completing(TerminalState::Completed, output),
            Some(Err(output)) => Phase::completing(TerminalState::Failed, output),
            // Dropped without a reason: only a hard stop does that, which implies stopping.
            None => Phase::Releasing,
        },
        Some(Interrupt::CancelRequested(request)) => {
            Phase::completing(TerminalState::Cancelled, json!({ "request": request }))
        }
        Some(Interrupt::PodStopping) if disposition == Disposition::Abandon => {
            Phase::completing(TerminalState::Abandoned, drained_evidence())
        }
        Some(Interrupt::PodStopping) => Phase::Releasing,
        Some(Interrupt::LeaseUnconfirmed) => Phase::Done(RunEnd::LeaseLost),
        Some(Interrupt::Suspend(suspension)) => Phase::Suspending(suspension),
        Some(Interrupt::Deadline(deadline)) => {
            Phase::completing(TerminalState::Failed, deadline_exceeded(deadline))
        }
    }
}

/// Largest engine error copied into the `process.waiting` record of a retry.
const MAX_ERROR_IN_WAIT_BYTES: usize = 4096;

/// The output of a process that ended at its deadline.
pub(crate) fn deadline_exceeded(deadline: DateTime<Utc>) -> Value {
    json!({"error": "deadline exceeded", "deadline": deadline})
}

/// The decision after the engine failed with `output` and marked it retryable: wait for the
/// backoff and run again while `policy` allows another run (`retries` were made so far),
/// otherwise fail with the last error and the count.
pub(crate) fn retry_or_fail(
    policy: Option<&RetryPolicy>,
    retries: i32,
    output: Value,
    random: f64,
) -> Phase {
    let retries_made = u32::try_from(retries).unwrap_or(0);
    match policy {
        Some(policy) if retries_made + 1 < policy.max_attempts => {
            let delay = policy.delay(retries_made + 1, random);
            // The error goes into the wait's record only when small: the record must fit the
            // payload limit whatever the engine returned.
            let size = serde_json::to_vec(&output).map_or(usize::MAX, |text| text.len());
            let error = if size <= MAX_ERROR_IN_WAIT_BYTES {
                output
            } else {
                json!({ "bytes": size, "truncated": true })
            };
            Phase::Suspending(Suspension {
                wake_at: None,
                delay: Some(delay),
                topic: None,
                after_seq: 0,
                retry: true,
                reason: json!({
                    "reason": "retry",
                    "retry": retries_made + 1,
                    "delay_ms": u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    "error": error,
                }),
            })
        }
        Some(policy) if policy.max_attempts > 1 => Phase::completing(
            TerminalState::Failed,
            json!({"error": output, "retries": retries_made}),
        ),
        _ => Phase::completing(TerminalState::Failed, output),
    }
}

/// The decision after a write of `phase` was refused with `err` (retries already spent).
pub(crate) fn after_refusal(phase: &Phase, err: &ProcessError) -> Phase {
    match err {
        ProcessError::LeaseLost { .. } => Phase::Done(RunEnd::LeaseLost),
        ProcessError::ProcessTerminal { .. }
        | ProcessError::AlreadyTerminal { .. }
        | ProcessError::NotFound(_) => Phase::Done(RunEnd::AlreadyEnded),
        err if err.is_transient() => Phase::Done(RunEnd::LeaseLost),
        // Input refused, or an unexpected database answer: the same write would be refused
        // again, so do not hand the process to another pod to fail the same way.
        err => match phase {
            Phase::Completing {
                fallback: false, ..
            }
            | Phase::Starting
            | Phase::Suspending(_)
            | Phase::Claimed => Phase::Completing {
                state: TerminalState::Failed,
                output: json!({
                    "error": format!("the pod could not record the run's {}: {err}", phase.name()),
                }),
                fallback: true,
            },
            _ => Phase::Done(RunEnd::LeaseLost),
        },
    }
}

/// One attempt of one claimed process.
pub(crate) struct Run {
    shared: Arc<Shared>,
    claim: RunnableClaim,
    clock: LeaseClock,
    pod: PodStop,
    claimed_at: Instant,
    /// Fires when the engine must stop.
    stop: CancellationToken,
    durable: Arc<Durable>,
}

impl Run {
    /// A run of `claim`, whose claim statement was sent at `sent_at`.
    pub(crate) fn new(
        shared: Arc<Shared>,
        claim: RunnableClaim,
        sent_at: Instant,
        pod: PodStop,
    ) -> Self {
        let clock = LeaseClock::new(shared.config.lease_ttl, sent_at);
        let stop = CancellationToken::new();
        // The claim set the lease to expire one TTL after the database's now(): that instant
        // had passed when its answer arrived, before this.
        let claimed_on_database = claim.lease.expires_at
            - chrono::TimeDelta::from_std(shared.config.lease_ttl).unwrap_or_default();
        let process = &claim.process;
        let retry_policy = process
            .retry_policy
            .clone()
            .or_else(|| shared.engines.retry_policy(&process.kind).cloned());
        let events = RunEvents::new(
            Arc::clone(&shared.registry),
            claim.lease.clone(),
            clock.clone(),
            Arc::clone(&shared.stats.write_retries),
        );
        let durable = Arc::new(Durable::new(
            events,
            process.started_at.is_some(),
            DbClock::new(claimed_on_database, Instant::now()),
            WaitPolicy {
                suspend_after: shared.config.suspend_after,
                join_recheck: shared.config.join_recheck,
            },
            stop.clone(),
            retry_policy,
        ));
        Self {
            shared,
            claim,
            clock,
            pod,
            claimed_at: sent_at,
            stop,
            durable,
        }
    }

    /// Drives the run from `Claimed` to `Done`, keeping the lease all along.
    pub(crate) async fn drive(self) -> RunEnd {
        // Owned by the run: however the run ends (even aborted), the keeper stops with it.
        let _keeper = TaskHandle::spawn(
            "lease keeper",
            keep_lease(
                Arc::clone(&self.shared.leases),
                self.claim.lease.clone(),
                self.clock.clone(),
                Arc::clone(&self.shared.stats.write_retries),
            ),
        );
        let mut phase = Phase::Claimed;
        loop {
            tracing::debug!(phase = phase.name(), "run phase");
            phase = match phase {
                Phase::Claimed => self.decide_start().await,
                Phase::Starting => self.write_started().await,
                Phase::Running => self.run_engine().await,
                Phase::Completing {
                    state,
                    output,
                    fallback,
                } => self.complete(state, output, fallback).await,
                Phase::Releasing => self.release().await,
                Phase::Suspending(suspension) => self.suspend(suspension).await,
                Phase::Done(end) => {
                    self.count(end);
                    return end;
                }
            };
        }
    }

    fn count(&self, end: RunEnd) {
        let stats = &self.shared.stats;
        stats.record_end(end);
        match end {
            RunEnd::Ended(state) => {
                stats.completed.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%state, "process ended");
            }
            RunEnd::Released => {
                stats.released.fetch_add(1, Ordering::Relaxed);
                tracing::info!("pod stopping: lease released for another pod to continue");
            }
            RunEnd::LeaseLost => {
                stats.leases_lost.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    "lease lost or unconfirmable: the run stopped and wrote nothing more"
                );
            }
            RunEnd::AlreadyEnded => tracing::info!("the process had already ended"),
            RunEnd::Suspended => {
                stats.suspended.fetch_add(1, Ordering::Relaxed);
                tracing::info!("the process waits without a pod");
            }
        }
    }

    /// `Claimed`: an `abandon` process runs at most once. If a `process.started` is already in
    /// its log (an earlier run began: its owner was lost, drained or failed after starting),
    /// it ends as `abandoned` with the evidence; otherwise it starts.
    async fn decide_start(&self) -> Phase {
        let process = &self.claim.process;
        let lost = &self.claim.lost_owner;
        if let Some(lost) = lost {
            self.shared.stats.recoveries.fetch_add(1, Ordering::Relaxed);
            // Both expiries are on the database clock and one TTL after their last renewal.
            if let Ok(gap) = (self.claim.lease.expires_at - lost.expired_at).to_std() {
                self.shared.stats.takeover.observe(gap);
            }
            tracing::info!(
                lost_owner = %lost.owner,
                lost_generation = lost.generation,
                disposition = %process.disposition,
                "recovering a process whose owner was lost"
            );
        }
        if let Some(deadline) = process.deadline
            && deadline <= self.durable.database_now()
        {
            return Phase::completing(TerminalState::Failed, deadline_exceeded(deadline));
        }
        if process.disposition == Disposition::External {
            // Claimed for its deadline only, which it turns out not to have passed.
            return Phase::Releasing;
        }
        if let Some(request) = &process.cancel_request {
            return Phase::completing(TerminalState::Cancelled, json!({ "request": request }));
        }
        if self.claim.resumed
            || process.disposition != Disposition::Abandon
            || process.attempts <= 1
        {
            return Phase::Starting;
        }
        // The row records the first start (schema version 8): the claim read it.
        match process.started_at {
            None => Phase::Starting,
            Some(_) => {
                let evidence = match lost {
                    Some(lost) => json!({
                        "reason": "owner lost",
                        "lost_owner": lost.owner,
                        "lost_generation": lost.generation,
                        "lease_expired_at": lost.expired_at,
                        "detected_by": self.shared.config.pod_id,
                    }),
                    None => json!({
                        "reason": "interrupted",
                        "detail": "an earlier run started and handed the process back",
                        "previous_attempts": process.attempts - 1,
                        "detected_by": self.shared.config.pod_id,
                    }),
                };
                Phase::completing(TerminalState::Abandoned, evidence)
            }
        }
    }

    fn events(&self) -> RunEvents {
        self.durable.events().clone()
    }

    /// `Starting`: `process.started {attempt, pod, generation, recovered_from}`.
    async fn write_started(&self) -> Phase {
        if self.pod.stopping.is_cancelled() {
            return Phase::Releasing;
        }
        let lease = &self.claim.lease;
        let started = json!({
            "attempt": self.claim.process.attempts,
            "resumed": self.claim.resumed,
            "retries": self.claim.process.retries,
            "pod": self.shared.config.pod_id,
            "generation": lease.generation,
            "recovered_from": self.claim.lost_owner.as_ref().map(|lost| json!({
                "owner": lost.owner, "generation": lost.generation,
            })),
        });
        let request = AppendRequest::reserved(STARTED, started)
            .with_replay_key(reserved::started_key(lease.generation));
        match self.events().append_request(request).await {
            Ok(_) => {
                self.shared.stats.started.fetch_add(1, Ordering::Relaxed);
                self.shared
                    .stats
                    .claim_to_start
                    .observe(self.claimed_at.elapsed());
                tracing::info!(kind = %self.claim.process.kind, "run started");
                Phase::Running
            }
            Err(err) => {
                tracing::warn!(error = %err, "could not record the start");
                after_refusal(&Phase::Starting, &err)
            }
        }
    }

    /// `Running`: the engine runs until it returns, or until it is stopped (cancellation
    /// requested, lease unconfirmable, pod stopping) and returns or is dropped.
    async fn run_engine(&self) -> Phase {
        let process = &self.claim.process;
        let Some(engine) = self.shared.engines.get(&process.kind) else {
            return Phase::completing(
                TerminalState::Failed,
                json!({
                    "error": format!("no engine for kind {:?} on pod {}", process.kind, self.shared.config.pod_id),
                    "known_kinds": self.shared.engines.kinds(),
                }),
            );
        };
        let stop = self.stop.clone();
        let context = RunContext {
            process: process.clone(),
            attempt: process.attempts,
            resumed: self.claim.resumed,
            events: self.events(),
            cancel: stop.clone(),
            durable: Arc::clone(&self.durable),
        };
        // A panicking engine fails its process (its decision, however clumsy), instead of
        // killing the run and leaving the process to be rerun after every lease expiry.
        let engine_run = std::panic::AssertUnwindSafe(engine.run(context))
            .catch_unwind()
            .map(|finished| finished.unwrap_or_else(|panic| Err(engine_panicked(&panic))));
        let cancel_watch = self.shared.cancels.requested(&process.id);
        let suspension = self.durable.suspension_requested();
        // The deadline, on a lower bound of the database clock: it never fires early.
        let deadline = process.deadline;
        let until_deadline = deadline.map(|at| {
            (at - self.durable.database_now())
                .to_std()
                .unwrap_or_default()
        });
        let deadline_passed = async {
            match until_deadline {
                Some(wait) => tokio::time::sleep(wait).await,
                None => std::future::pending().await,
            }
        };
        // After its deadline an engine gets a quarter of the TTL to return, then it is
        // dropped: the process ends within one TTL of its deadline.
        let deadline_grace = tokio::time::sleep(self.shared.config.lease_ttl / 4);
        tokio::pin!(
            engine_run,
            cancel_watch,
            suspension,
            deadline_passed,
            deadline_grace
        );
        let mut interrupt = None;
        let outcome = loop {
            tokio::select! {
                biased;
                // The hard deadline is checked first: an engine that is always ready must
                // not keep a run alive past the point where its lease may have expired.
                _ = self.clock.hard_deadline_passed() => break None,
                outcome = &mut engine_run => break Some(outcome),
                _ = self.pod.hard_stop.cancelled() => {
                    interrupt.get_or_insert(Interrupt::PodStopping);
                    break None;
                }
                wait = &mut suspension, if interrupt.is_none() => {
                    interrupt = Some(Interrupt::Suspend(wait));
                    break None;
                }
                _ = self.clock.write_deadline_passed(), if interrupt.is_none() => {
                    interrupt = Some(Interrupt::LeaseUnconfirmed);
                }
                request = &mut cancel_watch, if interrupt.is_none() => {
                    interrupt = Some(Interrupt::CancelRequested(request));
                }
                _ = &mut deadline_passed, if interrupt.is_none() => {
                    interrupt = deadline.map(Interrupt::Deadline);
                    deadline_grace
                        .as_mut()
                        .reset(Instant::now() + self.shared.config.lease_ttl / 4);
                }
                _ = &mut deadline_grace, if matches!(interrupt, Some(Interrupt::Deadline(_))) => {
                    break None;
                }
                _ = self.pod.stopping.cancelled(), if interrupt.is_none() => {
                    // An engine asleep in a durable wait is suspended there rather than
                    // handed back or abandoned: the wait goes on without a pod.
                    if let Some(wait) = self.durable.sleeping() {
                        interrupt = Some(Interrupt::Suspend(wait));
                        break None;
                    }
                    interrupt = Some(Interrupt::PodStopping);
                }
            }
            tracing::info!(?interrupt, "stopping the engine");
            stop.cancel();
        };
        if matches!(interrupt, Some(Interrupt::Suspend(_))) {
            stop.cancel();
        }
        if outcome.is_none() && !matches!(interrupt, Some(Interrupt::Suspend(_))) {
            tracing::warn!("the engine did not return in time: dropped");
        }
        // The watch reads behind the row (it coalesces ticks, and a notice can be lost): an
        // engine may return after a request was written but before the watch saw it. One last
        // read settles it: a request on the row now is one made before the engine's answer
        // was written, and it wins; one written after this read came after the engine's work.
        if interrupt.is_none()
            && outcome.is_some()
            && let Some(request) = self.cancel_request_now().await
        {
            tracing::info!("a cancellation came in as the engine returned: it wins");
            interrupt = Some(Interrupt::CancelRequested(request));
        }
        let lease = &self.claim.lease;
        let failed_retryably =
            interrupt.is_none() && matches!(outcome, Some(Err(_))) && self.durable.is_retryable();
        let phase = after_engine(
            interrupt,
            outcome,
            process.disposition,
            self.clock.is_live(),
            || {
                json!({
                    "reason": "pod stopping",
                    "pod": self.shared.config.pod_id,
                    "generation": lease.generation,
                    "attempt": process.attempts,
                })
            },
        );
        let steps = self.durable.step_counts();
        if steps.executed + steps.replayed > 0 {
            tracing::info!(
                executed = steps.executed,
                replayed = steps.replayed,
                "steps of this run"
            );
        }
        match phase {
            Phase::Completing {
                state: TerminalState::Failed,
                output,
                fallback: false,
            } if failed_retryably => retry_or_fail(
                self.durable.retry_policy(),
                process.retries,
                output,
                random_share(),
            ),
            phase => phase,
        }
    }

    /// The process's cancellation request as the row holds it now (one read, retried briefly
    /// while the lease is surely live; if the row cannot be read, the engine's answer stands:
    /// the completion that follows needs the database too).
    async fn cancel_request_now(&self) -> Option<Value> {
        let id = &self.claim.process.id;
        let mut failures = 0;
        while self.clock.is_live() {
            match self
                .shared
                .registry
                .cancel_requests(std::slice::from_ref(id))
                .await
            {
                Ok(mut requests) => return requests.remove(id),
                Err(err) => {
                    failures += 1;
                    tracing::debug!(error = %err, "last cancel check failed");
                    if failures >= 3 {
                        return None;
                    }
                    tokio::time::sleep(super::cancel_watch::ROUND_GAP).await;
                }
            }
        }
        None
    }

    /// `Completing`: retried until stored, refused, or the lease is provably lost.
    async fn complete(&self, state: TerminalState, output: Value, fallback: bool) -> Phase {
        let lease = &self.claim.lease;
        let completion = Completion::new(state, output.clone()).fenced(lease);
        let result = retry_write(
            &self.clock,
            &self.shared.stats.write_retries,
            "completion",
            || {
                self.shared
                    .registry
                    .complete_process(&lease.process_id, completion.clone())
            },
        )
        .await;
        match result {
            Ok(_) => Phase::Done(RunEnd::Ended(state)),
            Err(err) => {
                tracing::warn!(error = %err, %state, "could not complete the process");
                after_refusal(
                    &Phase::Completing {
                        state,
                        output,
                        fallback,
                    },
                    &err,
                )
            }
        }
    }

    /// `Suspending`: records the wait and gives the lease back, in one statement retried
    /// until stored (it is idempotent by the run's key), refused, or the lease is lost.
    async fn suspend(&self, suspension: Suspension) -> Phase {
        let lease = &self.claim.lease;
        let result = retry_write(
            &self.clock,
            &self.shared.stats.write_retries,
            "suspension",
            || self.shared.registry.suspend(lease, suspension.clone()),
        )
        .await;
        match result {
            Ok(_) => Phase::Done(RunEnd::Suspended),
            Err(err) => {
                tracing::warn!(error = %err, "could not suspend the process");
                after_refusal(&Phase::Suspending(suspension), &err)
            }
        }
    }

    /// `Releasing`: hands the lease back (idempotent); if that cannot be done in time, the
    /// lease simply expires.
    async fn release(&self) -> Phase {
        let lease = &self.claim.lease;
        let released = retry_write(
            &self.clock,
            &self.shared.stats.write_retries,
            "release",
            || self.shared.leases.release(lease),
        )
        .await;
        if let Err(err) = released {
            tracing::warn!(error = %err, "could not release the lease; it will expire");
        }
        Phase::Done(RunEnd::Released)
    }
}

/// The output of a process whose engine panicked.
fn engine_panicked(panic: &Box<dyn std::any::Any + Send>) -> Value {
    let message = panic
        .downcast_ref::<&str>()
        .map(|text| (*text).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned());
    tracing::error!(%message, "the engine panicked; the process fails");
    json!({"error": format!("the engine panicked: {message}"), "panicked": true})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ProcessId;

    fn evidence() -> Value {
        json!({"reason": "pod stopping"})
    }

    #[test]
    fn an_engine_decides_completed_or_failed() {
        let done = after_engine(None, Some(Ok(json!(1))), Disposition::Rerun, true, evidence);
        assert_eq!(done, Phase::completing(TerminalState::Completed, json!(1)));
        let failed = after_engine(
            None,
            Some(Err(json!(2))),
            Disposition::Abandon,
            true,
            evidence,
        );
        assert_eq!(failed, Phase::completing(TerminalState::Failed, json!(2)));
    }

    #[test]
    fn a_lease_not_surely_live_writes_nothing_whatever_the_engine_said() {
        for interrupt in [
            None,
            Some(Interrupt::PodStopping),
            Some(Interrupt::CancelRequested(json!({}))),
            Some(Interrupt::LeaseUnconfirmed),
        ] {
            let phase = after_engine(
                interrupt,
                Some(Ok(json!(1))),
                Disposition::Rerun,
                false,
                evidence,
            );
            assert_eq!(phase, Phase::Done(RunEnd::LeaseLost));
        }
        let unconfirmed = after_engine(
            Some(Interrupt::LeaseUnconfirmed),
            Some(Err(json!("database unavailable"))),
            Disposition::Rerun,
            true,
            evidence,
        );
        assert_eq!(unconfirmed, Phase::Done(RunEnd::LeaseLost));
    }

    #[test]
    fn a_cancel_request_wins_over_the_engines_answer() {
        let phase = after_engine(
            Some(Interrupt::CancelRequested(json!({"by": "x"}))),
            Some(Err(json!({"error": "cancelled"}))),
            Disposition::Rerun,
            true,
            evidence,
        );
        assert_eq!(
            phase,
            Phase::completing(TerminalState::Cancelled, json!({"request": {"by": "x"}}))
        );
    }

    #[test]
    fn a_drain_releases_rerun_processes_and_abandons_abandon_processes() {
        let rerun = after_engine(
            Some(Interrupt::PodStopping),
            None,
            Disposition::Rerun,
            true,
            evidence,
        );
        assert_eq!(rerun, Phase::Releasing);
        let abandon = after_engine(
            Some(Interrupt::PodStopping),
            Some(Err(json!("cancelled"))),
            Disposition::Abandon,
            true,
            evidence,
        );
        assert_eq!(
            abandon,
            Phase::completing(TerminalState::Abandoned, evidence())
        );
    }

    #[test]
    fn refusals_end_the_run_without_handing_a_failure_around() {
        let id = ProcessId::new("p").unwrap();
        let completing = Phase::completing(TerminalState::Completed, json!(1));
        assert_eq!(
            after_refusal(&completing, &ProcessError::LeaseLost { id: id.clone() }),
            Phase::Done(RunEnd::LeaseLost)
        );
        assert_eq!(
            after_refusal(&completing, &ProcessError::Unavailable("down".into())),
            Phase::Done(RunEnd::LeaseLost)
        );
        assert_eq!(
            after_refusal(
                &Phase::Starting,
                &ProcessError::ProcessTerminal {
                    id: id.clone(),
                    state: TerminalState::Cancelled
                }
            ),
            Phase::Done(RunEnd::AlreadyEnded)
        );
        let too_large = ProcessError::PayloadTooLarge { size: 10, limit: 1 };
        let fallback = after_refusal(&completing, &too_large);
        assert!(matches!(
            fallback,
            Phase::Completing {
                state: TerminalState::Failed,
                fallback: true,
                ..
            }
        ));
        assert_eq!(
            after_refusal(&fallback, &too_large),
            Phase::Done(RunEnd::LeaseLost)
        );
    }
}
