//! `PodServices`: one pod's storage and freshness stack, wired, owning its background tasks.
//!
//! ```text
//!   WatchedProcessRegistry(registry) --emit--> PodLink (NOTIFY) ------> other pods
//!            | tick, work hint                                              |
//!            v                                                              v
//!   ProcessChangeHub <-------------- tick --------------------- PodLink (LISTEN)
//!      |          |
//!      v          v
//!   ProcessSubscriptions   ProcessWorkDriver
//! ```
//!
//! On Postgres ([`PodServices::start`]) the registry is a [`PgProcessRegistry`] and the link
//! is NOTIFY/LISTEN; in memory ([`PodServices::in_memory`]) the registry is an
//! [`InMemoryProcessRegistry`] and the link is [`LocalLink`]. The rest is the same, so a pod
//! (its worker, presence, readiness, the HTTP API) runs on either.
//!
//! The services own their background tasks in a [`TaskSet`] (notifier, listener,
//! group-commit flushers, the `await_terminal` poller): [`PodServices::shutdown`] stops them,
//! last started first, and returns when all have ended; dropping the services aborts them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::Pool;
use tokio::sync::Notify;

use crate::budget::TimeBudget;
use crate::error::ProcessError;
use crate::memory::InMemoryProcessRegistry;
use crate::pg::{
    DatabaseTarget, GroupCommitStats, ListenerOptions, ListenerStatus, PgClusterStore, PgListener,
    PgNotifier, PgProcessRegistry, PoolOptions, connect_pool_with,
};
use crate::registry::{ProcessRegistry, RegistryConfig};
use crate::store::ClusterStore;
use crate::tasks::TaskSet;
use crate::watch::{
    LinkCounters, LinkStatus, LocalLink, PodLink, ProcessChangeHub, ProcessEventSink,
    ProcessSubscriptions, ProcessWorkDriver, WatchedProcessRegistry, WorkHint,
};

/// How long a stopping notifier may take to send what was queued.
const NOTIFIER_STOP_GRACE: Duration = Duration::from_secs(2);
/// How long the listener and the poller may take to stop (they hold nothing to hand back).
const QUICK_STOP: Duration = Duration::from_millis(500);

/// Settings of [`PodServices::start`].
#[derive(Clone, Debug)]
pub struct PodServicesOptions {
    /// Connections in the registry's pool.
    pub pool_size: usize,
    /// Pending notices the notifier holds before dropping.
    pub notice_capacity: usize,
    /// Largest payload accepted, in bytes.
    pub max_payload_bytes: usize,
    /// Byte budget of one page of events (see `RegistryConfig::max_page_bytes`).
    pub max_page_bytes: usize,
    /// Listener tuning.
    pub listener: ListenerOptions,
    /// A direct (unpooled) URL for the listener, when the main URL goes through a pooler in
    /// transaction mode, where LISTEN cannot work. `None`: the main URL.
    pub listener_database_url: Option<String>,
    /// The bounds on calls to the store (see [`TimeBudget`]).
    pub budget: TimeBudget,
    /// Connections reserved for lease renewals and releases.
    pub lease_pool_size: usize,
}

impl Default for PodServicesOptions {
    fn default() -> Self {
        Self::for_lease_ttl(Duration::from_secs(15))
    }
}

impl PodServicesOptions {
    /// Defaults whose bounds fit leases of `ttl` ([`TimeBudget::for_lease_ttl`]).
    pub fn for_lease_ttl(ttl: Duration) -> Self {
        Self {
            pool_size: 16,
            notice_capacity: 65_536,
            max_payload_bytes: crate::validate::DEFAULT_MAX_PAYLOAD_BYTES,
            max_page_bytes: crate::validate::DEFAULT_MAX_PAGE_BYTES,
            listener: ListenerOptions::default(),
            listener_database_url: None,
            budget: TimeBudget::for_lease_ttl(ttl),
            lease_pool_size: 2,
        }
    }
}

/// One pod's registry, cluster store, change hub, link, subscriptions and work driver.
pub struct PodServices {
    /// The pod id (writer of its events, sender of its notices).
    pub pod_id: String,
    /// The watched registry every write of this pod goes through: it ticks the hub, tells
    /// the link, and gives the work hint after a registration of runnable work or a release.
    pub registry: Arc<dyn ProcessRegistry>,
    /// The registry lease renewals and releases go through: on Postgres its own small pool
    /// with short timeouts (application name `proclog-leases-<pod>`), so a saturated request
    /// pool or a stalled connection cannot starve lease keeping.
    pub leases: Arc<dyn ProcessRegistry>,
    /// Presence, operator views and readiness.
    pub cluster: Arc<dyn ClusterStore>,
    /// The pod's change hub.
    pub hub: Arc<ProcessChangeHub>,
    /// How hints reach the other pods and theirs reach this one.
    pub link: Arc<dyn PodLink>,
    /// Live subscriptions.
    pub subscriptions: ProcessSubscriptions,
    /// `await_terminal`.
    pub driver: ProcessWorkDriver,
    /// Notified when runnable processes may exist (the work hint, hints from other pods,
    /// reconnects): the worker waits on it.
    pub work: Arc<Notify>,
    /// Events appended through this pod.
    pub appended_events: Arc<AtomicU64>,
    /// How long appends through this pod's registry took (a batch counts once).
    pub append_latency: crate::metrics::LatencyHistogram,
    /// HTTP request durations of this pod's API.
    pub http_requests: crate::metrics::HttpHistograms,
    /// Calls of the event sinks (and completion hints) that panicked, contained.
    pub sink_panics: Arc<AtomicU64>,
    /// Group commit's counters (Postgres with group commit on).
    pub group_commit: Option<Arc<GroupCommitStats>>,
    /// The dropped events and the panics of a host's bounded sink, once adopted.
    host_sink: Mutex<Option<(Arc<AtomicU64>, Arc<AtomicU64>)>>,
    pool: Option<Pool>,
    tasks: Mutex<Option<TaskSet>>,
}

/// Counts events on their way to the real sink.
struct CountingSink {
    count: Arc<AtomicU64>,
    inner: Arc<dyn ProcessEventSink>,
}

#[async_trait]
impl ProcessEventSink for CountingSink {
    async fn emit(&self, event: &crate::model::ProcessEvent) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.inner.emit(event).await;
    }
}

/// The work hint: wakes this pod's worker and tells the other pods.
struct WakeWorkers {
    local: Arc<Notify>,
    link: Arc<dyn PodLink>,
}

impl WorkHint for WakeWorkers {
    fn work_available(&self) {
        self.local.notify_one();
        self.link.work_available();
    }
}

/// The link of a pod on Postgres: NOTIFY out, LISTEN in.
struct PgLink {
    notifier: PgNotifier,
    listener: PgListener,
}

#[async_trait]
impl PodLink for PgLink {
    fn work_available(&self) {
        self.notifier.work_available();
    }

    async fn flush(&self, timeout: Duration) {
        self.notifier.flush(timeout).await;
    }

    fn status_updates(&self) -> tokio::sync::watch::Receiver<LinkStatus> {
        self.listener.status_updates()
    }

    fn counters(&self) -> LinkCounters {
        let notifier = self.notifier.stats();
        let listener = self.listener.stats();
        LinkCounters {
            sent: notifier.sent.load(Ordering::Relaxed),
            dropped: notifier.dropped.load(Ordering::Relaxed),
            batches: notifier.batches.load(Ordering::Relaxed),
            payloads: notifier.payloads.load(Ordering::Relaxed),
            received: listener.notices.load(Ordering::Relaxed),
            reconnects: listener.reconnects.load(Ordering::Relaxed),
            sessions: listener.sessions.load(Ordering::Relaxed),
            notice_latency: listener.notice_latency.clone(),
        }
    }
}

/// What both kinds of storage give the common wiring.
struct Storage {
    registry: Arc<dyn ProcessRegistry>,
    leases: Arc<dyn ProcessRegistry>,
    cluster: Arc<dyn ClusterStore>,
    link: Arc<dyn PodLink>,
    sink: Arc<dyn ProcessEventSink>,
    completion_hint: Arc<dyn crate::watch::CompletionHint>,
    group_commit: Option<Arc<GroupCommitStats>>,
    pool: Option<Pool>,
}

impl PodServices {
    /// Connects to `database_url` (already migrated) as pod `pod_id` and starts the notifier,
    /// the listener, the group-commit flushers and the work driver.
    ///
    /// Connections are named for `pg_stat_activity`: `proclog-<pod>` (registry pool),
    /// `proclog-leases-<pod>`, `proclog-probe-<pod>`, `proclog-notify-<pod>` and
    /// `proclog-listener-<pod>`.
    pub fn start(
        database_url: &str,
        pod_id: &str,
        options: PodServicesOptions,
    ) -> Result<Self, ProcessError> {
        Self::start_with_sink(database_url, pod_id, options, |notifier| {
            Arc::new(notifier.clone())
        })
    }

    /// [`PodServices::start`] with the sink built from the notifier by `sink` (e.g. a wrapper
    /// that counts or filters notices, or that also feeds a host's sink).
    pub fn start_with_sink(
        database_url: &str,
        pod_id: &str,
        options: PodServicesOptions,
        sink: impl FnOnce(&PgNotifier) -> Arc<dyn ProcessEventSink>,
    ) -> Result<Self, ProcessError> {
        crate::validate::pod_id(pod_id)?;
        let budget = options.budget;
        let named = |name: String, size: usize, timeout: Duration| PoolOptions {
            max_size: size,
            wait_timeout: timeout,
            statement_timeout: Some(timeout),
            application_name: Some(name),
        };
        let pool = connect_pool_with(
            database_url,
            &named(
                format!("proclog-{pod_id}"),
                options.pool_size,
                budget.statement,
            ),
        )?;
        let lease_pool = connect_pool_with(
            database_url,
            &named(
                format!("proclog-leases-{pod_id}"),
                options.lease_pool_size,
                budget.lease_call,
            ),
        )?;
        let probe_pool = connect_pool_with(
            database_url,
            &named(format!("proclog-probe-{pod_id}"), 1, Duration::from_secs(1)),
        )?;
        let mut tasks = TaskSet::new();
        let (notifier, send) = PgNotifier::start(
            connect_pool_with(
                database_url,
                &named(format!("proclog-notify-{pod_id}"), 1, budget.statement),
            )?,
            pod_id,
            options.notice_capacity,
        );
        tasks.spawn("notifier", NOTIFIER_STOP_GRACE, send);
        let hub = Arc::new(ProcessChangeHub::new());
        let work = Arc::new(Notify::new());
        let mut listener_target = DatabaseTarget::parse(
            options
                .listener_database_url
                .as_deref()
                .unwrap_or(database_url),
        )?;
        listener_target
            .config_mut()
            .application_name(format!("proclog-listener-{pod_id}"));
        let (listener, listen) = PgListener::start(
            listener_target,
            Arc::clone(&hub),
            Arc::clone(&work),
            pod_id,
            options.listener.clone(),
        );
        tasks.spawn("listener", QUICK_STOP, listen);
        let config = RegistryConfig::new(pod_id)
            .with_max_payload_bytes(options.max_payload_bytes)
            .with_max_page_bytes(options.max_page_bytes);
        let leases: Arc<dyn ProcessRegistry> = Arc::new(
            PgProcessRegistry::new(lease_pool, config.clone())
                .with_group_commit(None)
                .with_call_timeout(budget.lease_call),
        );
        let registry = PgProcessRegistry::new(pool.clone(), config).with_call_timeout(budget.call);
        registry.start_group_commit(&mut tasks);
        let storage = Storage {
            group_commit: registry.group_commit_stats(),
            registry: Arc::new(registry),
            leases,
            cluster: Arc::new(PgClusterStore::new(pool.clone(), probe_pool)),
            sink: sink(&notifier),
            completion_hint: Arc::new(notifier.clone()),
            link: Arc::new(PgLink { notifier, listener }),
            pool: Some(pool),
        };
        Ok(Self::wire(pod_id, storage, hub, work, tasks))
    }

    /// A pod's services over a registry held in memory (`registry`, or another handle on the
    /// same store: [`InMemoryProcessRegistry::share`]), with no other pod to tell: for a
    /// host's tests, and for running a pod without a database.
    pub fn in_memory(
        registry: InMemoryProcessRegistry,
        sink: Option<Arc<dyn ProcessEventSink>>,
    ) -> Self {
        let pod_id = registry.config().writer.clone();
        let registry = Arc::new(registry);
        Self::with_store(
            &pod_id,
            Arc::clone(&registry) as Arc<dyn ProcessRegistry>,
            registry,
            sink,
        )
    }

    /// A pod's services over a registry and a cluster store of the caller's (e.g. a registry
    /// wrapped to inject faults, as [`crate::testing::EngineHarness`] does), with no other
    /// pod to tell ([`LocalLink`]). The registry's writer should be `pod_id`.
    pub fn with_store(
        pod_id: &str,
        registry: Arc<dyn ProcessRegistry>,
        cluster: Arc<dyn ClusterStore>,
        sink: Option<Arc<dyn ProcessEventSink>>,
    ) -> Self {
        let storage = Storage {
            leases: Arc::clone(&registry),
            registry,
            cluster,
            link: Arc::new(LocalLink::default()),
            sink: sink.unwrap_or_else(|| Arc::new(crate::watch::NoopSink)),
            completion_hint: Arc::new(crate::watch::NoopSink),
            group_commit: None,
            pool: None,
        };
        Self::wire(
            pod_id,
            storage,
            Arc::new(ProcessChangeHub::new()),
            Arc::new(Notify::new()),
            TaskSet::new(),
        )
    }

    /// The common wiring: the watching decorator (ticks, sink, completion and work hints),
    /// subscriptions, and the work driver (the last task started, the first stopped).
    fn wire(
        pod_id: &str,
        storage: Storage,
        hub: Arc<ProcessChangeHub>,
        work: Arc<Notify>,
        mut tasks: TaskSet,
    ) -> Self {
        let appended_events = Arc::new(AtomicU64::new(0));
        let append_latency = crate::metrics::LatencyHistogram::default();
        let wake: Arc<dyn WorkHint> = Arc::new(WakeWorkers {
            local: Arc::clone(&work),
            link: Arc::clone(&storage.link),
        });
        let watched = WatchedProcessRegistry::new(
            storage.registry,
            Arc::clone(&hub),
            Arc::new(CountingSink {
                count: Arc::clone(&appended_events),
                inner: storage.sink,
            }),
        )
        .with_completion_hint(storage.completion_hint)
        .with_work_hint(Arc::clone(&wake))
        .with_append_latency(append_latency.clone());
        let sink_panics = watched.sink_panic_counter();
        let registry: Arc<dyn ProcessRegistry> = Arc::new(watched);
        // Releases go through the lease path: they wake workers too.
        let leases: Arc<dyn ProcessRegistry> = Arc::new(
            WatchedProcessRegistry::new(
                storage.leases,
                Arc::clone(&hub),
                Arc::new(crate::watch::NoopSink),
            )
            .with_work_hint(wake),
        );
        let subscriptions = ProcessSubscriptions::new(Arc::clone(&registry), Arc::clone(&hub));
        let (driver, poll) = ProcessWorkDriver::start(Arc::clone(&registry), Arc::clone(&hub));
        tasks.spawn("await poller", QUICK_STOP, poll);
        Self {
            pod_id: pod_id.to_owned(),
            registry,
            leases,
            cluster: storage.cluster,
            hub,
            link: storage.link,
            subscriptions,
            driver,
            work,
            appended_events,
            append_latency,
            http_requests: crate::metrics::HttpHistograms::default(),
            sink_panics,
            group_commit: storage.group_commit,
            host_sink: Mutex::new(None),
            pool: storage.pool,
            tasks: Mutex::new(Some(tasks)),
        }
    }

    /// Takes over the delivery task of a host's bounded sink (stopped first at shutdown,
    /// after delivering what was queued) and its counters.
    pub(crate) fn adopt_host_sink(
        &self,
        dropped: Arc<AtomicU64>,
        panics: Arc<AtomicU64>,
        deliver: impl FnOnce(
            tokio_util::sync::CancellationToken,
        ) -> futures::future::BoxFuture<'static, ()>,
    ) {
        if let Some(tasks) = self
            .tasks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .as_mut()
        {
            tasks.spawn("host sink", NOTIFIER_STOP_GRACE, deliver);
        }
        *self
            .host_sink
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some((dropped, panics));
    }

    fn host_sink_counts(&self) -> (u64, u64) {
        self.host_sink
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .as_ref()
            .map_or((0, 0), |(dropped, panics)| {
                (
                    dropped.load(Ordering::Relaxed),
                    panics.load(Ordering::Relaxed),
                )
            })
    }

    /// Panics of the event sinks and completion hints (a host's bounded sink included),
    /// each contained.
    pub fn sink_panic_count(&self) -> u64 {
        self.sink_panics.load(Ordering::Relaxed) + self.host_sink_counts().1
    }

    /// Events a host's bounded sink was not told of because its queue was full.
    pub fn sink_dropped_count(&self) -> u64 {
        self.host_sink_counts().0
    }

    /// The registry's connection pool (`None` in memory).
    pub fn pool(&self) -> Option<&Pool> {
        self.pool.as_ref()
    }

    /// Waits until the link is listening (or has knowingly fallen back to polling).
    pub async fn listener_ready(&self) -> ListenerStatus {
        self.link.ready().await
    }

    /// The names of the background tasks still owned (empty once shut down).
    pub fn task_names(&self) -> Vec<&'static str> {
        self.tasks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .as_ref()
            .map(TaskSet::names)
            .unwrap_or_default()
    }

    /// Stops every background task, the last started first: the work driver (waiters get
    /// `Stopped`), the group-commit flushers (after answering what was queued), the listener,
    /// the notifier (after sending what was queued). Returns when all have ended. Stop the
    /// pods running on these services first. Calling it again does nothing.
    pub async fn shutdown(&self) {
        let tasks = self
            .tasks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(tasks) = tasks {
            tasks.shutdown().await;
        }
    }
}
