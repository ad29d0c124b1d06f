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

use async_trait::async_trait;
use tokio::sync::Notify;

use deadpool_postgres::Pool;

use crate::error::ProcessError;
use crate::pg::{
    ListenerOptions, PgListener, PgNotifier, PgProcessRegistry, client_config, connect_pool,
};
use crate::registry::{ProcessRegistry, RegistryConfig};
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
    /// Listener tuning.
    pub listener: ListenerOptions,
    /// A direct (unpooled) URL for the listener, when the main URL goes through a pooler in
    /// transaction mode, where LISTEN cannot work. `None`: the main URL.
    pub listener_database_url: Option<String>,
}

impl Default for PodServicesOptions {
    fn default() -> Self {
        Self {
            pool_size: 16,
            notice_capacity: 65_536,
            max_payload_bytes: crate::validate::DEFAULT_MAX_PAYLOAD_BYTES,
            listener: ListenerOptions::default(),
            listener_database_url: None,
        }
    }
}

/// One pod's registry, change hub, notifier, listener, subscriptions and work driver.
pub struct PodServices {
    /// The pod id (writer of its events, sender of its notices).
    pub pod_id: String,
    /// The registry pool (the notifier and listener have connections of their own).
    pub pool: Pool,
    /// The watched registry every write of this pod goes through.
    pub registry: Arc<dyn ProcessRegistry>,
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
        let pool = connect_pool(database_url, options.pool_size)?;
        let notifier = PgNotifier::spawn(
            connect_pool(database_url, 1)?,
            pod_id,
            options.notice_capacity,
        );
        let hub = Arc::new(ProcessChangeHub::new());
        let work = Arc::new(Notify::new());
        let appended_events = Arc::new(AtomicU64::new(0));
        let mut listener_config = client_config(
            options
                .listener_database_url
                .as_deref()
                .unwrap_or(database_url),
        )?;
        listener_config.application_name(format!("proclog-listener-{pod_id}"));
        let listener = PgListener::spawn(
            listener_config,
            Arc::clone(&hub),
            Arc::clone(&work),
            pod_id,
            options.listener.clone(),
        );
        let config = RegistryConfig::new(pod_id).with_max_payload_bytes(options.max_payload_bytes);
        let registry: Arc<dyn ProcessRegistry> = Arc::new(
            WatchedProcessRegistry::new(
                PgProcessRegistry::new(pool.clone(), config),
                Arc::clone(&hub),
                Arc::new(CountingSink {
                    count: Arc::clone(&appended_events),
                    inner: sink(&notifier),
                }),
            )
            .with_completion_hint(Arc::new(notifier.clone())),
        );
        let subscriptions = ProcessSubscriptions::new(Arc::clone(&registry), Arc::clone(&hub));
        let driver = ProcessWorkDriver::spawn(Arc::clone(&registry), Arc::clone(&hub));
        Ok(Self {
            pod_id: pod_id.to_owned(),
            pool,
            registry,
            hub,
            notifier,
            listener,
            subscriptions,
            driver,
            work,
            appended_events,
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
