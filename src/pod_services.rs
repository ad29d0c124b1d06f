//! `PodServices`: the registry and freshness stack of one pod, wired together.
//!
//! ```text
//!   WatchedProcessRegistry(PgProcessRegistry) --emit--> PgNotifier --NOTIFY--> Postgres
//!            | tick                                                              |
//!            v                                                                   v
//!   ProcessChangeHub <----------------- tick ----------------------------- PgListener
//!      |          |
//!      v          v
//!   ProcessSubscriptions   ProcessWorkDriver
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

use deadpool_postgres::Pool;

use crate::error::ProcessError;
use crate::pg::{
    DatabaseTarget, ListenerOptions, PgClusterStore, PgListener, PgNotifier, PgProcessRegistry,
    PoolOptions, connect_pool_with,
};
use crate::registry::{ProcessRegistry, RegistryConfig};
use crate::store::ClusterStore;
use crate::watch::{
    ProcessChangeHub, ProcessEventSink, ProcessSubscriptions, ProcessWorkDriver,
    WatchedProcessRegistry,
};

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
    /// Longest wait for a connection of the registry pool, and the server-side
    /// `statement_timeout` of its connections. Keep it under the lease TTL.
    pub statement_timeout: Duration,
    /// Connections reserved for lease renewals and releases.
    pub lease_pool_size: usize,
    /// Bound on each renewal or release round trip (wait, statement and client-side): keep it
    /// well under a third of the lease TTL, so a stalled attempt leaves time for another.
    pub lease_call_timeout: Duration,
}

impl Default for PodServicesOptions {
    fn default() -> Self {
        Self::for_lease_ttl(Duration::from_secs(15))
    }
}

impl PodServicesOptions {
    /// Defaults whose timeouts fit leases of `ttl`: statements and pool waits at most half the
    /// TTL (5 s at most), lease calls a sixth of it (between 100 ms and 2 s).
    pub fn for_lease_ttl(ttl: Duration) -> Self {
        Self {
            pool_size: 16,
            notice_capacity: 65_536,
            max_payload_bytes: crate::validate::DEFAULT_MAX_PAYLOAD_BYTES,
            max_page_bytes: crate::validate::DEFAULT_MAX_PAGE_BYTES,
            listener: ListenerOptions::default(),
            listener_database_url: None,
            statement_timeout: (ttl / 2).min(Duration::from_secs(5)),
            lease_pool_size: 2,
            lease_call_timeout: (ttl / 6).clamp(Duration::from_millis(100), Duration::from_secs(2)),
        }
    }
}

/// One pod's registry, change hub, notifier, listener, subscriptions and work driver.
pub struct PodServices {
    /// The pod id (writer of its events, sender of its notices).
    pub pod_id: String,
    /// The registry pool (the notifier and listener have connections of their own).
    pub pool: Pool,
    /// Presence, operator views and readiness (readiness on one connection of its own,
    /// `proclog-probe-<pod>`, 1 s bounds, so that a flood of requests holding the registry
    /// pool cannot make the pod report unready).
    pub cluster: Arc<dyn ClusterStore>,
    /// The watched registry every write of this pod goes through.
    pub registry: Arc<dyn ProcessRegistry>,
    /// The registry lease renewals and releases go through: its own small pool with short
    /// timeouts (application name `proclog-leases-<pod>`), so a saturated request pool or a
    /// stalled connection cannot starve lease keeping.
    pub leases: Arc<dyn ProcessRegistry>,
    /// The pod's change hub.
    pub hub: Arc<ProcessChangeHub>,
    /// The NOTIFY-forwarding sink.
    pub notifier: PgNotifier,
    /// The LISTEN connection.
    pub listener: PgListener,
    /// Live subscriptions.
    pub subscriptions: ProcessSubscriptions,
    /// `await_terminal`.
    pub driver: ProcessWorkDriver,
    /// Notified when runnable processes may exist (work hints from other pods, reconnects).
    pub work: Arc<Notify>,
    /// Events appended through this pod.
    pub appended_events: Arc<AtomicU64>,
    /// How long appends through this pod's registry took (a batch counts once).
    pub append_latency: crate::metrics::LatencyHistogram,
    /// HTTP request durations of this pod's API.
    pub http_requests: crate::metrics::HttpHistograms,
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

impl PodServices {
    /// Connects to `database_url` (already migrated) as pod `pod_id` and starts the notifier,
    /// the listener and the work driver.
    ///
    /// Connections are named for `pg_stat_activity`: `proclog-<pod>` (registry pool),
    /// `proclog-leases-<pod>`, `proclog-notify-<pod>` and `proclog-listener-<pod>`.
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
    /// that counts or filters notices).
    pub fn start_with_sink(
        database_url: &str,
        pod_id: &str,
        options: PodServicesOptions,
        sink: impl FnOnce(&PgNotifier) -> Arc<dyn ProcessEventSink>,
    ) -> Result<Self, ProcessError> {
        crate::validate::pod_id(pod_id)?;
        let named = |name: String, size: usize, timeout: Duration| PoolOptions {
            max_size: size,
            wait_timeout: timeout,
            statement_timeout: Some(timeout),
            application_name: Some(name),
        };
        let statements = options.statement_timeout;
        let pool = connect_pool_with(
            database_url,
            &named(format!("proclog-{pod_id}"), options.pool_size, statements),
        )?;
        let lease_pool = connect_pool_with(
            database_url,
            &named(
                format!("proclog-leases-{pod_id}"),
                options.lease_pool_size,
                options.lease_call_timeout,
            ),
        )?;
        let probe_pool = connect_pool_with(
            database_url,
            &named(format!("proclog-probe-{pod_id}"), 1, Duration::from_secs(1)),
        )?;
        let notifier = PgNotifier::spawn(
            connect_pool_with(
                database_url,
                &named(format!("proclog-notify-{pod_id}"), 1, statements),
            )?,
            pod_id,
            options.notice_capacity,
        );
        let hub = Arc::new(ProcessChangeHub::new());
        let work = Arc::new(Notify::new());
        let appended_events = Arc::new(AtomicU64::new(0));
        let append_latency = crate::metrics::LatencyHistogram::default();
        let mut listener_target = DatabaseTarget::parse(
            options
                .listener_database_url
                .as_deref()
                .unwrap_or(database_url),
        )?;
        listener_target
            .config_mut()
            .application_name(format!("proclog-listener-{pod_id}"));
        let listener = PgListener::spawn(
            listener_target,
            Arc::clone(&hub),
            Arc::clone(&work),
            pod_id,
            options.listener.clone(),
        );
        let config = RegistryConfig::new(pod_id)
            .with_max_payload_bytes(options.max_payload_bytes)
            .with_max_page_bytes(options.max_page_bytes);
        let leases: Arc<dyn ProcessRegistry> = Arc::new(
            PgProcessRegistry::new(lease_pool, config.clone())
                .with_call_timeout(options.lease_call_timeout),
        );
        // The client-side bound ends calls the server's statement_timeout cannot (a stalled
        // network); it leaves the server its own timeout first.
        let registry: Arc<dyn ProcessRegistry> = Arc::new(
            WatchedProcessRegistry::new(
                PgProcessRegistry::new(pool.clone(), config)
                    .with_call_timeout(statements + statements / 2),
                Arc::clone(&hub),
                Arc::new(CountingSink {
                    count: Arc::clone(&appended_events),
                    inner: sink(&notifier),
                }),
            )
            .with_completion_hint(Arc::new(notifier.clone()))
            .with_append_latency(append_latency.clone()),
        );
        let subscriptions = ProcessSubscriptions::new(Arc::clone(&registry), Arc::clone(&hub));
        let driver = ProcessWorkDriver::spawn(Arc::clone(&registry), Arc::clone(&hub));
        Ok(Self {
            pod_id: pod_id.to_owned(),
            cluster: Arc::new(PgClusterStore::new(pool.clone(), probe_pool)),
            pool,
            registry,
            leases,
            hub,
            notifier,
            listener,
            subscriptions,
            driver,
            work,
            appended_events,
            append_latency,
            http_requests: crate::metrics::HttpHistograms::default(),
        })
    }

    /// Waits until the listener is listening (or has fallen back to polling).
    pub async fn listener_ready(&self) -> crate::pg::ListenerStatus {
        let mut updates = self.listener.status_updates();
        let status = updates
            .wait_for(|s| {
                matches!(
                    s,
                    crate::pg::ListenerStatus::Listening
                        | crate::pg::ListenerStatus::Polling { .. }
                )
            })
            .await
            .map(|s| s.clone());
        status.unwrap_or(crate::pg::ListenerStatus::Reconnecting)
    }
}
