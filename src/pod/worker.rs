//! The pod's worker: claims runnable processes under leases and runs them.
//!
//! One loop claims up to the free concurrency with `claim_runnable` (`FOR UPDATE SKIP
//! LOCKED`), woken by work hints (local registrations, hints from other pods), by the next
//! lease expiry and by a slow poll. Each claimed process is one `run::Run`, a state
//! machine that starts it, runs its engine under a lease kept by a task of its own, and ends
//! it (see that module for the phases and the retry rule of each write).
//!
//! Stopping (SIGTERM) is bounded: no more claims; runs get the grace period to finish; then
//! engines are asked to stop and their runs release (`rerun`) or abandon (`abandon`) their
//! processes; engines that ignore that are dropped after [`WorkerConfig::hard_stop_margin`];
//! runs still writing after a further [`WorkerConfig::hard_stop_margin`] are aborted, and
//! their leases expire.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::cancel_watch::CancelWatch;
use super::engine::Engines;
use super::run::{PodStop, Run};
use crate::backoff::Backoff;
use crate::model::RunnableClaim;
use crate::registry::ProcessRegistry;
use crate::tasks::TaskHandle;
use crate::watch::ProcessChangeHub;

pub use crate::reserved::{CANCEL_REQUESTED, STARTED};

/// Slack after a lease's expiry before claiming it, for clock granularity.
const LEASE_EXPIRY_MARGIN: Duration = Duration::from_millis(20);

/// Settings of a [`Worker`].
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// The pod id (lease owner).
    pub pod_id: String,
    /// Most processes run at once.
    pub concurrency: usize,
    /// Lease TTL; renewed every tenth of it.
    pub lease_ttl: Duration,
    /// Safety poll for new work when no hint arrives.
    pub poll_interval: Duration,
    /// How long a stopping pod lets its runs finish before stopping their engines.
    pub grace: Duration,
    /// After the grace period: how long engines get to return before they are dropped, and
    /// then how long runs get to release or abandon before they are aborted. A stop takes at
    /// most `grace + 2 * hard_stop_margin`.
    pub hard_stop_margin: Duration,
    /// Durable waits (timers) up to this long are slept in the run; longer ones suspend the
    /// process, giving its lease and slot back (CONTRACT §9).
    pub suspend_after: Duration,
    /// A run waiting for children ([`crate::RunContext::join`]) is woken when a child ends
    /// (its parent gets a message); it also looks again this long after it began to wait,
    /// in case the writer of a child's end was lost before it sent the message.
    pub join_recheck: Duration,
}

impl WorkerConfig {
    /// Defaults for `pod_id`: 8 at once, 15 s leases, 2 s poll, 10 s grace, 3 s margin,
    /// waits over 2 s suspended, joins looked at again every 10 min.
    pub fn new(pod_id: impl Into<String>) -> Self {
        Self {
            pod_id: pod_id.into(),
            concurrency: 8,
            lease_ttl: Duration::from_secs(15),
            poll_interval: Duration::from_secs(2),
            grace: Duration::from_secs(10),
            hard_stop_margin: Duration::from_secs(3),
            suspend_after: Duration::from_secs(2),
            join_recheck: Duration::from_secs(600),
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
    /// Time from sending the claim to the run's `process.started` being written.
    pub claim_to_start: crate::metrics::LatencyHistogram,
    /// For takeovers: time from the lost owner's last renewal (its lease's expiry minus the
    /// TTL, database clock) to this pod's claim; an upper bound of kill-to-takeover, over by
    /// at most one renewal period.
    pub takeover: crate::metrics::LatencyHistogram,
    /// Runs that ended by completing the process.
    pub completed: AtomicU64,
    /// Runs stopped because their lease was lost.
    pub leases_lost: AtomicU64,
    /// Runs handed back (lease released) because the pod was stopping.
    pub released: AtomicU64,
    /// Runs that suspended their process (a durable wait, a retry's backoff).
    pub suspended: AtomicU64,
    /// Writes (starts, appends, completions, renewals, releases) tried again after a
    /// transient failure.
    pub write_retries: Arc<AtomicU64>,
    /// How the latest runs ended (at most [`RECENT_ENDS`], oldest first).
    recent_ends: std::sync::Mutex<std::collections::VecDeque<super::run::RunEnd>>,
}

/// How many run ends [`WorkerStats::ends`] keeps.
pub const RECENT_ENDS: usize = 64;

impl WorkerStats {
    /// How the latest runs ended, oldest first (at most [`RECENT_ENDS`]).
    pub fn ends(&self) -> Vec<super::run::RunEnd> {
        self.recent_ends
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect()
    }

    pub(crate) fn record_end(&self, end: super::run::RunEnd) {
        let mut ends = self.recent_ends.lock().unwrap_or_else(|p| p.into_inner());
        if ends.len() == RECENT_ENDS {
            ends.pop_front();
        }
        ends.push_back(end);
    }
}

/// What every run of a worker shares.
pub(crate) struct Shared {
    /// Appends, completions, reads.
    pub(crate) registry: Arc<dyn ProcessRegistry>,
    /// Renewals and releases: a path of their own, so a busy request pool cannot starve them.
    pub(crate) leases: Arc<dyn ProcessRegistry>,
    /// The cancellation requests of this worker's runs, read for all at once.
    pub(crate) cancels: CancelWatch,
    pub(crate) engines: Engines,
    pub(crate) config: WorkerConfig,
    pub(crate) stats: Arc<WorkerStats>,
}

/// A running worker. Stop it with [`Worker::shutdown`]; dropped without it, the worker stops
/// at once: its claim loop and every run (with its lease keeper) are aborted, writing nothing
/// more, and their leases expire.
pub struct Worker {
    stop: CancellationToken,
    stats: Arc<WorkerStats>,
    task: TaskHandle,
}

impl Worker {
    /// Starts claiming and running processes. `work` is notified when new work may exist.
    /// Leases are renewed through `registry` too; see [`Worker::spawn_with_leases`].
    pub fn spawn(
        registry: Arc<dyn ProcessRegistry>,
        hub: Arc<ProcessChangeHub>,
        engines: Engines,
        config: WorkerConfig,
        work: Arc<Notify>,
    ) -> Self {
        let leases = Arc::clone(&registry);
        Self::spawn_with_leases(registry, leases, hub, engines, config, work)
    }

    /// [`Worker::spawn`] with leases renewed and released through `leases`: a registry on a
    /// small pool of its own with timeouts well under the TTL, so that lease keeping cannot
    /// be starved by a saturated request pool.
    pub fn spawn_with_leases(
        registry: Arc<dyn ProcessRegistry>,
        leases: Arc<dyn ProcessRegistry>,
        hub: Arc<ProcessChangeHub>,
        engines: Engines,
        config: WorkerConfig,
        work: Arc<Notify>,
    ) -> Self {
        let stats = Arc::new(WorkerStats::default());
        let (cancels, cancel_watch) = CancelWatch::start(
            Arc::clone(&registry),
            Arc::clone(&hub),
            config.poll_interval,
        );
        let shared = Arc::new(Shared {
            registry,
            leases,
            cancels,
            engines,
            config,
            stats: Arc::clone(&stats),
        });
        let stop = CancellationToken::new();
        let loop_stop = stop.clone();
        let task = TaskHandle::spawn("worker", async move {
            // The claim loop owns the cancel watch: it stops when the loop (and its drain)
            // is over, or is aborted with it.
            let _cancel_watch = cancel_watch;
            claim_loop(shared, work, loop_stop).await;
        });
        Self { stop, stats, task }
    }

    /// The worker's counters.
    pub fn stats(&self) -> &Arc<WorkerStats> {
        &self.stats
    }

    /// Stops claiming, lets runs finish within the grace period, then stops the rest (see the
    /// module doc); returns within `grace + 2 * hard_stop_margin`.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.task.join().await;
    }
}

async fn claim_loop(shared: Arc<Shared>, work: Arc<Notify>, stop: CancellationToken) {
    let config = &shared.config;
    let mut runs = JoinSet::new();
    let pod_stop = PodStop::default();
    let mut retry = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        if stop.is_cancelled() {
            break;
        }
        let free = config.concurrency.saturating_sub(runs.len());
        let mut pause = config.poll_interval;
        if free > 0 {
            let sent_at = Instant::now();
            match shared
                .registry
                .claim_runnable(&config.pod_id, config.lease_ttl, free as u32)
                .await
            {
                Ok(claims) => {
                    retry.reset();
                    let claimed_all = claims.len() == free;
                    for claim in claims {
                        let run = Run::new(
                            Arc::clone(&shared),
                            claim.clone(),
                            sent_at,
                            pod_stop.clone(),
                        );
                        runs.spawn(run_task(Arc::clone(&shared), claim, run));
                    }
                    // When every slot was filled there may be more: the pod is full now and
                    // claims again as soon as a run ends. Otherwise, wake when the next lease
                    // may lapse (its owner may be dead).
                    if !claimed_all && let Ok(Some(expiry)) = shared.registry.next_wake().await {
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
    drain(config, runs, pod_stop).await;
}

/// Graceful stop: no more claims; runs get the grace period; then engines are stopped, then
/// dropped, then runs still writing are aborted. Bounded whatever the engines or the database do.
async fn drain(config: &WorkerConfig, mut runs: JoinSet<()>, pod_stop: PodStop) {
    tracing::info!(pod = %config.pod_id, running = runs.len(), "stopping: draining runs");
    if all_ended(&mut runs, config.grace).await {
        return;
    }
    tracing::info!(pod = %config.pod_id, running = runs.len(), "grace period over: stopping engines");
    pod_stop.stopping.cancel();
    if all_ended(&mut runs, config.hard_stop_margin).await {
        return;
    }
    tracing::warn!(pod = %config.pod_id, running = runs.len(), "engines ignored the stop: dropping them");
    pod_stop.hard_stop.cancel();
    if all_ended(&mut runs, config.hard_stop_margin).await {
        return;
    }
    tracing::warn!(pod = %config.pod_id, running = runs.len(), "runs still writing: aborted, their leases will expire");
    runs.abort_all();
    while runs.join_next().await.is_some() {}
}

/// Waits up to `limit` for every run to end; true if they all did.
async fn all_ended(runs: &mut JoinSet<()>, limit: Duration) -> bool {
    let wait = async { while runs.join_next().await.is_some() {} };
    tokio::time::timeout(limit, wait).await.is_ok()
}

/// One attempt of one claimed process, in its span.
async fn run_task(shared: Arc<Shared>, claim: RunnableClaim, run: Run) {
    let span = tracing::info_span!(
        "run",
        kind = %claim.process.kind,
        resumed = claim.resumed,
        process_id = %claim.process.id,
        pod = %shared.config.pod_id,
        attempt = claim.process.attempts,
        generation = claim.lease.generation,
    );
    #[cfg(feature = "otlp")]
    crate::telemetry::continue_trace(&span, claim.process.trace_parent.as_deref());
    shared.stats.active.fetch_add(1, Ordering::Relaxed);
    let _active = ActiveGuard(&shared.stats);
    run.drive().instrument(span).await;
}

/// Counts a run as active for as long as it exists (also when aborted).
struct ActiveGuard<'a>(&'a WorkerStats);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}
