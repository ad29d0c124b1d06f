//! [`Proclog`]: the one entry point for a host. It connects, migrates, and starts one pod's
//! stack (registry, change hub, NOTIFY forwarding, listener, subscriptions, `await_terminal`),
//! and owns every background task it started until [`Proclog::shutdown`].

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::backoff::Backoff;
use crate::error::ProcessError;
use crate::model::ProcessEvent;
use crate::pg::{MigrationError, PgNotifier};
use crate::pod_services::{PodServices, PodServicesOptions};
use crate::registry::ProcessRegistry;
use crate::watch::{
    BoundedSink, ProcessChangeHub, ProcessEventSink, ProcessSubscriptions, ProcessWorkDriver,
};

/// Events a host's sink may fall behind by before they are dropped (see
/// [`ProclogBuilder::sink`]).
pub const DEFAULT_SINK_QUEUE: usize = 4096;

/// One pod's running stack. Build it with [`Proclog::builder`]; run processes on it with
/// [`crate::pod::Pod`]; stop it with [`Proclog::shutdown`].
///
/// ```no_run
/// # async fn demo() -> Result<(), proclog::ProcessError> {
/// use proclog::{AppendRequest, Proclog, ProcessRegistration};
/// use serde_json::json;
///
/// let stack = Proclog::builder("postgres://app@db/app").pod_id("billing-1").start().await?;
/// let process = stack
///     .registry()
///     .register_process(ProcessRegistration::new("send-invoice", json!({"order": 42})))
///     .await?;
/// stack.registry().append_event(&process.id, AppendRequest::new("note", json!("hi"))).await?;
/// stack.shutdown().await;
/// # Ok(()) }
/// ```
pub struct Proclog {
    services: Arc<PodServices>,
    lease_ttl: Duration,
}

/// Settings of a [`Proclog`] stack; see [`Proclog::builder`].
#[must_use = "call start() to connect"]
pub struct ProclogBuilder {
    database_url: String,
    pod_id: Option<String>,
    lease_ttl: Duration,
    options: PodServicesOptions,
    pool_size: Option<usize>,
    sink: Option<(Arc<dyn ProcessEventSink>, Option<usize>)>,
    migrate: bool,
    startup_timeout: Duration,
}

impl Proclog {
    /// Settings for a stack on the Postgres at `database_url`, with defaults: pod id from the
    /// host name and process id, 15 s leases, a pool of 16, migrations applied at start
    /// (retrying an unreachable database for 60 s), NOTIFY forwarding and LISTEN on the same
    /// URL.
    pub fn builder(database_url: impl Into<String>) -> ProclogBuilder {
        let lease_ttl = Duration::from_secs(15);
        ProclogBuilder {
            database_url: database_url.into(),
            pod_id: None,
            lease_ttl,
            options: PodServicesOptions::for_lease_ttl(lease_ttl),
            pool_size: None,
            sink: None,
            migrate: true,
            startup_timeout: Duration::from_secs(60),
        }
    }

    /// A stack over a registry held in memory, for a host's tests and for running engines
    /// without a database: the same hub, subscriptions, `await_terminal`, presence and
    /// operator views as on Postgres, and nobody else to tell. Its pod id is the registry's
    /// writer; its leases last `lease_ttl`. Call it within a Tokio runtime.
    pub fn in_memory(registry: crate::InMemoryProcessRegistry, lease_ttl: Duration) -> Self {
        Self::over(PodServices::in_memory(registry, None), lease_ttl)
    }

    /// A stack over services wired by the caller (see [`PodServices::with_store`]).
    pub fn over(services: PodServices, lease_ttl: Duration) -> Self {
        Self {
            services: Arc::new(services),
            lease_ttl,
        }
    }

    /// The pod id: lease owner and writer of this stack's events.
    pub fn pod_id(&self) -> &str {
        &self.services.pod_id
    }

    /// The lease TTL pods on this stack run under.
    pub fn lease_ttl(&self) -> Duration {
        self.lease_ttl
    }

    /// The registry every write should go through: Postgres behind the watching decorator
    /// (local ticks, NOTIFY forwarding, the host's sink).
    pub fn registry(&self) -> &Arc<dyn ProcessRegistry> {
        &self.services.registry
    }

    /// Live, gap-free event streams.
    pub fn subscriptions(&self) -> &ProcessSubscriptions {
        &self.services.subscriptions
    }

    /// `await_terminal`.
    pub fn driver(&self) -> &ProcessWorkDriver {
        &self.services.driver
    }

    /// The in-process change hub.
    pub fn hub(&self) -> &Arc<ProcessChangeHub> {
        &self.services.hub
    }

    /// The registry's connection pool (`None` for a stack in memory).
    pub fn pool(&self) -> Option<&crate::Pool> {
        self.services.pool()
    }

    /// Presence, operator views and readiness.
    pub fn cluster(&self) -> &Arc<dyn crate::store::ClusterStore> {
        &self.services.cluster
    }

    /// How many calls of an event sink (yours included) or completion hint panicked; each
    /// was contained, and its write stood.
    pub fn sink_panics(&self) -> u64 {
        self.services.sink_panic_count()
    }

    /// How many events your sink was not told of because its queue was full
    /// ([`ProclogBuilder::sink`]).
    pub fn sink_dropped(&self) -> u64 {
        self.services.sink_dropped_count()
    }

    /// Group commit's counters (`None` in memory, or with group commit off).
    pub fn group_commit_stats(&self) -> Option<&Arc<crate::pg::GroupCommitStats>> {
        self.services.group_commit.as_ref()
    }

    /// The wiring underneath (registry, hub, link, store), for what the accessors above do
    /// not cover (e.g. the HTTP API's state).
    pub fn services(&self) -> &Arc<PodServices> {
        &self.services
    }

    /// Waits until the listener is listening (or knowingly polling).
    pub async fn listener_ready(&self) -> crate::pg::ListenerStatus {
        self.services.listener_ready().await
    }

    /// Stops the stack's background tasks, in order: the `await_terminal` poller, the
    /// group-commit flushers (after answering the appends queued), the listener, and the
    /// notifier (after sending the notices queued, at most 2 s). Returns when all have
    /// ended. Stop the pods running on it first ([`crate::pod::Pod::shutdown`]).
    ///
    /// Dropped without it, the stack's tasks are aborted once nothing uses its services (a
    /// pod or an HTTP face on it keeps them).
    pub async fn shutdown(self) {
        self.services.shutdown().await;
        tracing::info!(pod = %self.services.pod_id, "stack stopped");
    }
}

impl ProclogBuilder {
    /// The pod id (1 to 118 printable characters); default: host name and process id.
    pub fn pod_id(mut self, pod_id: impl Into<String>) -> Self {
        self.pod_id = Some(pod_id.into());
        self
    }

    /// The lease TTL of runs (default 15 s). Pool waits and statement timeouts are derived
    /// from it so that no call outlives a lease.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        let keep = self.options.clone();
        self.lease_ttl = ttl;
        self.options = PodServicesOptions {
            notice_capacity: keep.notice_capacity,
            max_payload_bytes: keep.max_payload_bytes,
            max_page_bytes: keep.max_page_bytes,
            listener: keep.listener,
            listener_database_url: keep.listener_database_url,
            ..PodServicesOptions::for_lease_ttl(ttl)
        };
        self
    }

    /// Connections in the registry pool (default 16).
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = Some(size);
        self
    }

    /// A direct (unpooled) URL for LISTEN, when the main URL goes through a transaction-mode
    /// pooler.
    pub fn listener_database_url(mut self, url: impl Into<String>) -> Self {
        self.options.listener_database_url = Some(url.into());
        self
    }

    /// The byte budget of one page of events read (default 1 MiB; see
    /// [`crate::RegistryConfig::max_page_bytes`]).
    pub fn max_page_bytes(mut self, budget: usize) -> Self {
        self.options.max_page_bytes = budget;
        self
    }

    /// The largest payload, input or output accepted, in bytes (default 256 KiB).
    pub fn max_payload_bytes(mut self, limit: usize) -> Self {
        self.options.max_payload_bytes = limit;
        self
    }

    /// A sink of the host's, told of every committed append (after the NOTIFY forwarding),
    /// behind a bounded queue of [`DEFAULT_SINK_QUEUE`] events ([`BoundedSink`]): it can never
    /// slow an append; when it falls that far behind, events are dropped and counted
    /// ([`Proclog::sink_dropped`]). Its events arrive in order, from a task of the stack's.
    pub fn sink(self, sink: Arc<dyn ProcessEventSink>) -> Self {
        self.sink_bounded(sink, DEFAULT_SINK_QUEUE)
    }

    /// [`ProclogBuilder::sink`] with a queue of `capacity` events.
    pub fn sink_bounded(mut self, sink: Arc<dyn ProcessEventSink>, capacity: usize) -> Self {
        self.sink = Some((sink, Some(capacity)));
        self
    }

    /// A sink of the host's, awaited inline on every append (see [`ProcessEventSink`] for
    /// its contract: it must return fast, or it slows every append by its time).
    pub fn inline_sink(mut self, sink: Arc<dyn ProcessEventSink>) -> Self {
        self.sink = Some((sink, None));
        self
    }

    /// Whether to apply pending migrations at start (default true).
    pub fn migrate(mut self, migrate: bool) -> Self {
        self.migrate = migrate;
        self
    }

    /// How long start keeps retrying a database that cannot be reached (default 60 s).
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    /// Connects (retrying an unreachable database until the startup timeout), migrates, and
    /// starts the stack's background tasks.
    pub async fn start(self) -> Result<Proclog, ProcessError> {
        let pod_id = self.pod_id.clone().unwrap_or_else(default_pod_id);
        crate::validate::pod_id(&pod_id)?;
        crate::validate::lease_ttl(self.lease_ttl)?;
        if self.migrate {
            migrate_when_reachable(&self.database_url, &pod_id, self.startup_timeout).await?;
        }
        let mut options = self.options;
        if let Some(size) = self.pool_size {
            options.pool_size = size;
        }
        let mut delivery = None;
        let host_sink = self.sink.map(|(sink, queue)| match queue {
            None => sink,
            Some(capacity) => {
                let (bounded, deliver) = BoundedSink::start(sink, capacity);
                delivery = Some((bounded.counters(), deliver));
                Arc::new(bounded) as Arc<dyn ProcessEventSink>
            }
        });
        let services = PodServices::start_with_sink(
            &self.database_url,
            &pod_id,
            options,
            move |notifier: &PgNotifier| -> Arc<dyn ProcessEventSink> {
                let forwarding: Arc<dyn ProcessEventSink> = Arc::new(notifier.clone());
                match host_sink {
                    None => forwarding,
                    Some(host) => Arc::new(Fanout(vec![forwarding, host])),
                }
            },
        )?;
        if let Some(((dropped, panics), deliver)) = delivery {
            services.adopt_host_sink(dropped, panics, deliver);
        }
        Ok(Proclog {
            services: Arc::new(services),
            lease_ttl: self.lease_ttl,
        })
    }
}

/// Calls each sink in turn.
struct Fanout(Vec<Arc<dyn ProcessEventSink>>);

#[async_trait]
impl ProcessEventSink for Fanout {
    async fn emit(&self, event: &ProcessEvent) {
        for sink in &self.0 {
            sink.emit(event).await;
        }
    }
}

/// The host name and process id.
pub(crate) fn default_pod_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "pod".into());
    format!("{host}-{}", std::process::id())
}

/// Connects and migrates, retrying while the database is unreachable (not up yet, restarting)
/// until `timeout` has passed; each failed attempt is logged. A schema newer than this binary,
/// a bad URL or any other refusal ends the start at once.
pub(crate) async fn migrate_when_reachable(
    database_url: &str,
    pod_id: &str,
    timeout: Duration,
) -> Result<(), ProcessError> {
    let deadline = tokio::time::Instant::now()
        .checked_add(timeout)
        .ok_or_else(|| ProcessError::InvalidInput("startup timeout too large".into()))?;
    let pool = crate::pg::connect_pool(database_url, 1)?;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let mut attempt: u64 = 0;
    loop {
        attempt += 1;
        match crate::pg::migrate(&pool).await {
            Ok(migrated) => {
                tracing::info!(pod = %pod_id, schema = migrated.version, "database ready");
                return Ok(());
            }
            Err(MigrationError::Database(err)) if err.is_transient() => {
                let pause = backoff.next_delay();
                if tokio::time::Instant::now() + pause >= deadline {
                    return Err(ProcessError::Unavailable(format!(
                        "database not reachable after {attempt} attempts in {timeout:?}: {err}"
                    )));
                }
                tracing::warn!(pod = %pod_id, attempt, error = %err, retry_in = ?pause, "database not reachable yet");
                tokio::time::sleep(pause).await;
            }
            // A pod's role may not migrate: the owner's `proclog migrate` may be on its way
            // (a compose service, a Kubernetes job), so wait for it as for the database.
            Err(err @ MigrationError::NotOwner { .. }) => {
                let pause = backoff.next_delay();
                if tokio::time::Instant::now() + pause >= deadline {
                    return Err(ProcessError::InvalidInput(format!(
                        "{err} (waited {timeout:?})"
                    )));
                }
                tracing::warn!(pod = %pod_id, attempt, error = %err, retry_in = ?pause, "waiting for the schema's owner to migrate");
                tokio::time::sleep(pause).await;
            }
            Err(MigrationError::Database(err)) => return Err(err),
            Err(err @ MigrationError::SchemaTooNew { .. }) => {
                return Err(ProcessError::InvalidInput(err.to_string()));
            }
        }
    }
}
