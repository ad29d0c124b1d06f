//! [`Pod`]: a host's engines run under leases on a [`Proclog`] stack, with the same claiming,
//! recovery, cancellation and bounded drain as `proclog pod`. The HTTP API is a face a host
//! may add over a pod (`proclog::http::HttpServer`, feature `http`); nothing here knows it.

use std::sync::Arc;
use std::time::Duration;

use super::engine::{Engines, ProcessEngine};
use super::presence::{Presence, PresenceInfo};
use super::worker::{Worker, WorkerConfig, WorkerStats};
use crate::error::ProcessError;
use crate::pod_services::PodServices;
use crate::stack::Proclog;

/// How long a stopping pod waits for its last hints to go out.
const HINT_FLUSH: Duration = Duration::from_secs(2);

/// A running pod: a worker running the host's engines, and its presence.
///
/// Dropped without [`Pod::shutdown`], it stops at once, as a killed pod would: no further
/// claim, renewal or heartbeat; its runs are dropped and their leases expire, and other pods
/// take their processes over.
///
/// ```no_run
/// # async fn demo() -> Result<(), proclog::ProcessError> {
/// use proclog::pod::{EngineResult, Pod, ProcessEngine, RunContext};
/// use proclog::{Proclog, async_trait};
/// use serde_json::json;
///
/// struct SendInvoice;
///
/// #[async_trait]
/// impl ProcessEngine for SendInvoice {
///     async fn run(&self, run: RunContext) -> EngineResult {
///         let order = run.process.input["order"].clone();
///         // An idempotent step: a rerun finds the stored event instead of a second one.
///         run.events
///             .append_with_key("invoice.sent", json!({"order": order}), "invoice-sent")
///             .await
///             .map_err(|err| json!({"error": err.to_string()}))?;
///         Ok(json!({"sent": true}))
///     }
/// }
///
/// let stack = Proclog::builder("postgres://app@db/app").pod_id("billing-1").start().await?;
/// let pod = Pod::builder(&stack)
///     .engine("send-invoice", SendInvoice)
///     .concurrency(8)
///     .start()
///     .await?;
/// // ... until the host stops:
/// pod.shutdown().await;
/// stack.shutdown().await;
/// # Ok(()) }
/// ```
pub struct Pod {
    pod_id: String,
    worker: Option<Worker>,
    /// The scheduler (see [`crate::pod::scheduler`]), unless turned off.
    scheduler: crate::tasks::TaskSet,
    stats: Option<Arc<WorkerStats>>,
    presence: Presence,
    services: Arc<PodServices>,
}

/// Settings of a [`Pod`]; see [`Pod::builder`].
#[must_use = "call start() to run the pod"]
pub struct PodBuilder<'a> {
    stack: &'a Proclog,
    engines: Engines,
    config: WorkerConfig,
    heartbeat_every: Duration,
    address: Option<String>,
    schedule_poll: Option<Duration>,
}

/// Default period of a pod's heartbeat in `proclog.pods`.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);

/// How often at most a pod looks for due schedules made by other pods.
pub const DEFAULT_SCHEDULE_POLL: Duration = Duration::from_secs(1);

impl Pod {
    /// A pod on `stack` with no engines yet, running up to 8 processes at once, with the
    /// stack's pod id and lease TTL and a 10 s drain grace.
    pub fn builder(stack: &Proclog) -> PodBuilder<'_> {
        PodBuilder {
            stack,
            engines: Engines::new(),
            config: WorkerConfig {
                lease_ttl: stack.lease_ttl(),
                ..WorkerConfig::new(stack.pod_id())
            },
            heartbeat_every: DEFAULT_HEARTBEAT,
            address: None,
            schedule_poll: Some(DEFAULT_SCHEDULE_POLL),
        }
    }

    /// The pod id.
    pub fn pod_id(&self) -> &str {
        &self.pod_id
    }

    /// The worker's counters (`None` for a pod of concurrency 0).
    pub fn stats(&self) -> Option<&Arc<WorkerStats>> {
        self.stats.as_ref()
    }

    /// Says where this pod serves its API and console, in its presence (the next heartbeat,
    /// sent at once, carries it). An HTTP face calls it when it starts serving.
    pub fn advertise(&self, address: Option<String>) {
        self.presence.advertise(address);
    }

    /// Stops the pod: no more claims; runs get the grace period, then are stopped (released,
    /// or abandoned for `abandon` processes), bounded whatever the engines do; other pods are
    /// told the released work is available; the pod's presence is marked stopped. Returns
    /// when the worker's and the presence's tasks have ended. An HTTP face over the pod keeps
    /// serving until its own shutdown (after this one).
    pub async fn shutdown(self) {
        self.presence.draining();
        self.scheduler.shutdown().await;
        if let Some(worker) = self.worker {
            worker.shutdown().await;
            self.services.link.work_available();
            self.services.link.flush(HINT_FLUSH).await;
        }
        self.presence.stopped().await;
        tracing::info!(pod = %self.pod_id, "pod stopped");
    }
}

impl PodBuilder<'_> {
    /// Runs processes of `kind` with `engine`.
    pub fn engine(mut self, kind: &str, engine: impl ProcessEngine + 'static) -> Self {
        self.engines = self.engines.with(kind, engine);
        self
    }

    /// Adds every engine of `engines` (e.g. [`crate::pod::demo_engines`]).
    pub fn engines(mut self, engines: Engines) -> Self {
        self.engines = self.engines.merged(engines);
        self
    }

    /// Most processes run at once (0: run nothing, e.g. an API-only pod; at most 1000).
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.config.concurrency = concurrency;
        self
    }

    /// The safety poll for new work when no hint arrives (default 2 s).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.config.poll_interval = interval;
        self
    }

    /// How long a stopping pod lets runs finish before stopping them (default 10 s).
    pub fn grace(mut self, grace: Duration) -> Self {
        self.config.grace = grace;
        self
    }

    /// After the grace period, how long engines get to return before they are dropped, and
    /// then runs to release before they are aborted (default 3 s).
    pub fn hard_stop_margin(mut self, margin: Duration) -> Self {
        self.config.hard_stop_margin = margin;
        self
    }

    /// Durable waits up to this long are slept in the run; longer ones suspend the process,
    /// giving its lease and slot back (default 2 s).
    pub fn suspend_after(mut self, threshold: Duration) -> Self {
        self.config.suspend_after = threshold;
        self
    }

    /// How long a run waiting for its children waits before it looks at them again without
    /// being told that one ended (default 10 min; at least 10 ms). See
    /// [`crate::pod::WorkerConfig::join_recheck`].
    pub fn join_recheck(mut self, period: Duration) -> Self {
        self.config.join_recheck = period.max(Duration::from_millis(10));
        self
    }

    /// The period of the pod's heartbeat in `proclog.pods` (default 5 s, 100 ms to 10 min).
    /// Other pods and the console call it `gone` after three periods without one.
    pub fn heartbeat_every(mut self, period: Duration) -> Self {
        self.heartbeat_every = period;
        self
    }

    /// Whether the pod produces the processes of due schedules, and how often at most it
    /// looks for schedules made elsewhere (default: yes, every second; `None`: no). Every
    /// pod may: they share the work through short claims, and a due time makes one process.
    pub fn schedules(mut self, poll: Option<Duration>) -> Self {
        self.schedule_poll = poll.map(|poll| poll.max(Duration::from_millis(10)));
        self
    }

    /// Where the pod serves its API and console, for its presence (see [`Pod::advertise`]).
    pub fn advertise(mut self, address: impl Into<String>) -> Self {
        self.address = Some(address.into());
        self
    }

    /// Starts the worker (unless the concurrency is 0) and registers the pod's presence.
    pub async fn start(self) -> Result<Pod, ProcessError> {
        if self.config.concurrency > crate::validate::MAX_CONCURRENCY {
            return Err(ProcessError::InvalidInput(format!(
                "concurrency must be 0 to {}, got {}",
                crate::validate::MAX_CONCURRENCY,
                self.config.concurrency
            )));
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(600)).contains(&self.heartbeat_every)
        {
            return Err(ProcessError::InvalidInput(format!(
                "the heartbeat period must be 100 ms to 10 min, got {:?}",
                self.heartbeat_every
            )));
        }
        self.engines.validate()?;
        let services = Arc::clone(self.stack.services());
        let worker = (self.config.concurrency > 0).then(|| {
            Worker::spawn_with_leases(
                Arc::clone(&services.registry),
                Arc::clone(&services.leases),
                Arc::clone(&services.hub),
                self.engines,
                self.config.clone(),
                Arc::clone(&services.work),
            )
        });
        let stats = worker.as_ref().map(|w| Arc::clone(w.stats()));
        let mut scheduler = crate::tasks::TaskSet::new();
        if let Some(poll) = self.schedule_poll {
            let (store, registry) = (
                Arc::clone(&services.cluster),
                Arc::clone(&services.registry),
            );
            let owner = services.pod_id.clone();
            scheduler.spawn("scheduler", Duration::from_secs(1), move |stop| {
                super::scheduler::run(store, registry, owner, poll, stop)
            });
        }
        let presence = Presence::start(
            Arc::clone(&services.cluster),
            PresenceInfo {
                pod_id: services.pod_id.clone(),
                address: self.address,
                concurrency: self.config.concurrency,
                heartbeat_every: self.heartbeat_every,
            },
        )
        .await;
        Ok(Pod {
            pod_id: services.pod_id.clone(),
            worker,
            scheduler,
            stats,
            presence,
            services,
        })
    }
}
