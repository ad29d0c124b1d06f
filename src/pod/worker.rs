//! The pod's worker: claims runnable processes under leases and runs them.
//!
//! One loop claims up to the free concurrency with `claim_runnable` (`FOR UPDATE SKIP
//! LOCKED`), woken by work hints (local registrations, hints from other pods) and by a slow
//! poll. Each claimed process runs in its own task:
//!
//! 1. A process of disposition `abandon` whose owner was lost is completed as `abandoned`
//!    with the evidence (old owner, generation), under the new lease. Otherwise:
//! 2. `process.started {attempt, pod, generation}` is appended under the lease.
//! 3. The engine of its kind runs (an unknown kind fails the process with a clear error),
//!    while the lease is renewed every third of its TTL and the log is watched for
//!    `process.cancel_requested`.
//! 4. The run ends by completing under the lease, or, if the lease was lost, by writing
//!    nothing more, or, if the pod is stopping, by releasing the lease so that another pod
//!    continues at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::engine::{Engines, RunContext, RunEvents};
use crate::backoff::Backoff;
use crate::error::ProcessError;
use crate::model::{
    AppendRequest, Completion, Disposition, Lease, ProcessId, RunnableClaim, TerminalState,
};
use crate::registry::ProcessRegistry;
use crate::watch::ProcessChangeHub;

/// The reserved type of a cancellation request.
pub const CANCEL_REQUESTED: &str = "process.cancel_requested";
/// The reserved type written when a run starts.
pub const STARTED: &str = "process.started";

/// Slack after a lease's expiry before claiming it, for clock granularity.
const LEASE_EXPIRY_MARGIN: Duration = Duration::from_millis(20);

/// Shortest interval between two reads of the cancel watcher (the most a cancellation
/// request waits beyond its notice).
const CANCEL_CHECK_GAP: Duration = Duration::from_millis(200);

/// Settings of a [`Worker`].
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// The pod id (lease owner).
    pub pod_id: String,
    /// Most processes run at once.
    pub concurrency: usize,
    /// Lease TTL; renewed every third of it.
    pub lease_ttl: Duration,
    /// Safety poll for new work when no hint arrives.
    pub poll_interval: Duration,
    /// How long a stopping pod lets its runs finish before releasing them.
    pub grace: Duration,
}

impl WorkerConfig {
    /// Defaults for `pod_id`: 8 at once, 15 s leases, 2 s poll, 10 s grace.
    pub fn new(pod_id: impl Into<String>) -> Self {
        Self {
            pod_id: pod_id.into(),
            concurrency: 8,
            lease_ttl: Duration::from_secs(15),
            poll_interval: Duration::from_secs(2),
            grace: Duration::from_secs(10),
        }
    }
}

/// Counters of a [`Worker`].
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Runs in progress (each holds a lease).
    pub active: AtomicU64,
    /// Runs started.
    pub started: AtomicU64,
    /// Processes taken over from a lost owner (rerun or abandoned).
    pub recoveries: AtomicU64,
    /// Runs that ended by completing the process.
    pub completed: AtomicU64,
    /// Runs stopped because their lease was lost.
    pub leases_lost: AtomicU64,
    /// Runs handed back (lease released) because the pod was stopping.
    pub released: AtomicU64,
}

/// Why a run stopped before its engine finished on its own.
#[derive(Clone, Debug)]
enum StopReason {
    LeaseLost,
    CancelRequested(Value),
    PodStopping,
}

struct Shared {
    registry: Arc<dyn ProcessRegistry>,
    hub: Arc<ProcessChangeHub>,
    engines: Engines,
    config: WorkerConfig,
    stats: Arc<WorkerStats>,
}

/// A running worker. Stop it with [`Worker::shutdown`].
pub struct Worker {
    stop: CancellationToken,
    stats: Arc<WorkerStats>,
    task: tokio::task::JoinHandle<()>,
}

impl Worker {
    /// Starts claiming and running processes. `work` is notified when new work may exist.
    pub fn spawn(
        registry: Arc<dyn ProcessRegistry>,
        hub: Arc<ProcessChangeHub>,
        engines: Engines,
        config: WorkerConfig,
        work: Arc<Notify>,
    ) -> Self {
        let stats = Arc::new(WorkerStats::default());
        let shared = Arc::new(Shared {
            registry,
            hub,
            engines,
            config,
            stats: Arc::clone(&stats),
        });
        let stop = CancellationToken::new();
        let task = tokio::spawn(claim_loop(shared, work, stop.clone()));
        Self { stop, stats, task }
    }

    /// The worker's counters.
    pub fn stats(&self) -> &Arc<WorkerStats> {
        &self.stats
    }

    /// Stops claiming, lets runs finish within the grace period, releases the leases of those
    /// still running, and returns when every run has ended.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn claim_loop(shared: Arc<Shared>, work: Arc<Notify>, stop: CancellationToken) {
    let config = &shared.config;
    let mut runs = JoinSet::new();
    let pod_stopping = CancellationToken::new();
    let mut retry = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        if stop.is_cancelled() {
            break;
        }
        let free = config.concurrency.saturating_sub(runs.len());
        let mut pause = config.poll_interval;
        if free > 0 {
            match shared
                .registry
                .claim_runnable(&config.pod_id, config.lease_ttl, free as u32)
                .await
            {
                Ok(claims) => {
                    retry.reset();
                    let claimed_all = claims.len() == free;
                    for claim in claims {
                        runs.spawn(run(Arc::clone(&shared), claim, pod_stopping.clone()));
                    }
                    // When every slot was filled there may be more: the pod is full now and
                    // claims again as soon as a run ends. Otherwise, wake when the next lease
                    // may lapse (its owner may be dead).
                    if !claimed_all
                        && let Ok(Some(expiry)) = shared.registry.next_lease_expiry().await
                    {
                        pause = pause.min(expiry + LEASE_EXPIRY_MARGIN);
                    }
                }
                Err(err) => {
                    tracing::warn!(pod = %config.pod_id, error = %err, "claiming failed");
                    pause = retry.next_delay();
                }
            }
        }
        let full = runs.len() >= config.concurrency;
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = work.notified(), if !full => {}
            _ = tokio::time::sleep(pause), if !full => {}
            Some(_) = runs.join_next(), if !runs.is_empty() => {}
        }
    }
    // Graceful stop: no more claims; runs get the grace period, then hand their leases back.
    tracing::info!(pod = %config.pod_id, running = runs.len(), "stopping: draining runs");
    let drained = tokio::time::timeout(config.grace, async {
        while runs.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        pod_stopping.cancel();
        while runs.join_next().await.is_some() {}
    }
}

/// One attempt of one claimed process.
async fn run(shared: Arc<Shared>, claim: RunnableClaim, pod_stopping: CancellationToken) {
    let span = tracing::info_span!(
        "run",
        process_id = %claim.process.id,
        pod = %shared.config.pod_id,
        attempt = claim.process.attempts,
        generation = claim.lease.generation,
    );
    shared.stats.active.fetch_add(1, Ordering::Relaxed);
    run_attempt(&shared, claim, pod_stopping)
        .instrument(span)
        .await;
    shared.stats.active.fetch_sub(1, Ordering::Relaxed);
}

async fn run_attempt(shared: &Arc<Shared>, claim: RunnableClaim, pod_stopping: CancellationToken) {
    let RunnableClaim {
        lease,
        process,
        lost_owner,
    } = claim;
    let registry = &shared.registry;
    if let Some(lost) = &lost_owner {
        shared.stats.recoveries.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            lost_owner = %lost.owner,
            lost_generation = lost.generation,
            disposition = %process.disposition,
            "recovering a process whose owner was lost"
        );
        if process.disposition == Disposition::Abandon {
            let evidence = json!({
                "reason": "owner lost",
                "lost_owner": lost.owner,
                "lost_generation": lost.generation,
                "lease_expired_at": lost.expired_at,
                "detected_by": shared.config.pod_id,
            });
            complete(shared, &lease, TerminalState::Abandoned, evidence).await;
            return;
        }
    }

    let stop = CancellationToken::new();
    let reason: Arc<OnceLock<StopReason>> = Arc::new(OnceLock::new());
    let lease_lost = CancellationToken::new();
    let events = RunEvents::new(Arc::clone(registry), lease.clone(), lease_lost.clone());
    let started = json!({
        "attempt": process.attempts,
        "pod": shared.config.pod_id,
        "generation": lease.generation,
        "recovered_from": lost_owner.as_ref().map(|lost| json!({
            "owner": lost.owner, "generation": lost.generation,
        })),
    });
    if let Err(err) = events
        .append_request(AppendRequest::reserved(STARTED, started))
        .await
    {
        tracing::warn!(error = %err, "could not record the start; giving the run up");
        if !matches!(
            err,
            ProcessError::LeaseLost { .. } | ProcessError::ProcessTerminal { .. }
        ) {
            let _ = registry.release(&lease).await;
        }
        return;
    }
    shared.stats.started.fetch_add(1, Ordering::Relaxed);
    tracing::info!(kind = %process.kind, "run started");

    // Dropping this set aborts the helpers.
    let mut guards = JoinSet::new();
    guards.spawn(keep_lease(
        Arc::clone(shared),
        lease.clone(),
        Arc::clone(&reason),
        stop.clone(),
        lease_lost.clone(),
    ));
    guards.spawn(watch_for_cancel(
        Arc::clone(shared),
        process.id.clone(),
        Arc::clone(&reason),
        stop.clone(),
    ));
    guards.spawn(forward_stop(
        [
            (lease_lost, StopReason::LeaseLost),
            (pod_stopping, StopReason::PodStopping),
        ],
        Arc::clone(&reason),
        stop.clone(),
    ));

    let outcome = match shared.engines.get(&process.kind) {
        None => Err(json!({
            "error": format!("no engine for kind {:?} on pod {}", process.kind, shared.config.pod_id),
            "known_kinds": shared.engines.kinds(),
        })),
        Some(engine) => {
            let context = RunContext {
                process: process.clone(),
                attempt: process.attempts,
                events,
                cancel: stop.clone(),
            };
            engine.run(context).await
        }
    };
    stop.cancel();
    drop(guards); // aborts the lease keeper, the cancel watcher and the forwarder

    match reason.get().cloned() {
        None => {
            let (state, output) = match outcome {
                Ok(output) => (TerminalState::Completed, output),
                Err(output) => (TerminalState::Failed, output),
            };
            complete(shared, &lease, state, output).await;
        }
        Some(StopReason::CancelRequested(request)) => {
            complete(
                shared,
                &lease,
                TerminalState::Cancelled,
                json!({"request": request}),
            )
            .await;
        }
        Some(StopReason::LeaseLost) => {
            shared.stats.leases_lost.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("lease lost: the run stops and writes nothing more");
        }
        Some(StopReason::PodStopping) => {
            if let Err(err) = registry.release(&lease).await {
                tracing::warn!(error = %err, "could not release the lease; it will expire");
            }
            shared.stats.released.fetch_add(1, Ordering::Relaxed);
            tracing::info!("pod stopping: lease released for another pod to continue");
        }
    }
}

async fn complete(shared: &Shared, lease: &Lease, state: TerminalState, output: Value) {
    let completion = Completion::new(state, output).fenced(lease);
    match shared
        .registry
        .complete_process(&lease.process_id, completion)
        .await
    {
        Ok(_) => {
            shared.stats.completed.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%state, "process ended");
        }
        Err(ProcessError::LeaseLost { .. }) => {
            shared.stats.leases_lost.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("lease lost before completion: nothing written");
        }
        Err(err) => tracing::error!(error = %err, "could not complete the process"),
    }
}

/// Renews the lease every third of its TTL; on `LeaseLost`, or when renewals keep failing
/// past the expiry, stops the run.
async fn keep_lease(
    shared: Arc<Shared>,
    mut lease: Lease,
    reason: Arc<OnceLock<StopReason>>,
    stop: CancellationToken,
    lease_lost: CancellationToken,
) {
    let ttl = shared.config.lease_ttl;
    let every = ttl / 3;
    let mut valid_until = tokio::time::Instant::now() + ttl;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match shared.registry.renew(&lease, ttl).await {
            Ok(renewed) => {
                lease = renewed;
                valid_until = tokio::time::Instant::now() + ttl;
            }
            Err(ProcessError::LeaseLost { .. } | ProcessError::NotFound(_)) => {
                let _ = reason.set(StopReason::LeaseLost);
                lease_lost.cancel();
                return;
            }
            Err(err) => {
                tracing::warn!(error = %err, "lease renewal failed; retrying");
                if tokio::time::Instant::now() >= valid_until {
                    let _ = reason.set(StopReason::LeaseLost);
                    lease_lost.cancel();
                    return;
                }
            }
        }
    }
}

/// Watches the log for `process.cancel_requested` (including one written before this run
/// started, e.g. to a lost owner), woken by hub ticks, with a slow poll as the safety net.
async fn watch_for_cancel(
    shared: Arc<Shared>,
    id: ProcessId,
    reason: Arc<OnceLock<StopReason>>,
    stop: CancellationToken,
) {
    let mut watcher = shared.hub.watch(&id);
    let mut after = 0;
    loop {
        match shared.registry.events_after(&id, after, 1000).await {
            Ok(events) if !events.is_empty() => {
                if let Some(request) = events.iter().find(|e| e.event_type == CANCEL_REQUESTED) {
                    let _ = reason.set(StopReason::CancelRequested(request.payload.clone()));
                    stop.cancel();
                    return;
                }
                after = events.last().map_or(after, |e| e.seq);
                continue;
            }
            Ok(_) => {}
            Err(err) => tracing::debug!(error = %err, "cancel watch read failed"),
        }
        let caught_up = tokio::time::Instant::now();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = watcher.changed() => {}
            _ = tokio::time::sleep(shared.config.poll_interval) => {}
        }
        // The engine's own appends tick the hub too: coalesce them, so that a run costs at
        // most a few reads per second here however fast it writes.
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(caught_up + CANCEL_CHECK_GAP) => {}
        }
    }
}

/// Turns the first of `sources` to fire into the stop reason.
async fn forward_stop<const N: usize>(
    sources: [(CancellationToken, StopReason); N],
    reason: Arc<OnceLock<StopReason>>,
    stop: CancellationToken,
) {
    let waits = sources.into_iter().map(|(token, why)| {
        Box::pin(async move {
            token.cancelled().await;
            why
        })
    });
    tokio::select! {
        _ = stop.cancelled() => {}
        (why, _, _) = futures::future::select_all(waits) => {
            let _ = reason.set(why);
            stop.cancel();
        }
    }
}
