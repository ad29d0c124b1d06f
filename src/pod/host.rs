//! [`Pod`]: a host's engines run under leases on a [`Proclog`] stack, with the same claiming,
//! recovery, cancellation and bounded drain as `proclog pod`, and optionally the HTTP API.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::engine::{Engines, ProcessEngine};
use super::worker::{Worker, WorkerConfig, WorkerStats};
use crate::error::ProcessError;
use crate::http::{ApiState, HttpOptions, router};
use crate::stack::Proclog;

/// How long a stopping pod waits for its last hints to go out.
const HINT_FLUSH: Duration = Duration::from_secs(2);

/// A running pod: a worker running the host's engines and, if asked, the HTTP API.
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
///     .serve_http("127.0.0.1:8080".parse().unwrap())
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
    stats: Option<Arc<WorkerStats>>,
    http: Option<HttpServer>,
    presence: Option<super::presence::Presence>,
    stack: Arc<crate::pod_services::PodServices>,
}

struct HttpServer {
    address: SocketAddr,
    stats: Arc<crate::http::ServerStats>,
    stop: tokio::sync::oneshot::Sender<()>,
    /// Ends within the server's close grace once stopped (see [`crate::http::server::serve`]).
    task: tokio::task::JoinHandle<()>,
}

/// Settings of a [`Pod`]; see [`Pod::builder`].
#[must_use = "call start() to run the pod"]
pub struct PodBuilder<'a> {
    stack: &'a Proclog,
    engines: Engines,
    config: WorkerConfig,
    http: Option<SocketAddr>,
    http_options: HttpOptions,
    heartbeat_every: Duration,
}

/// Default period of a pod's heartbeat in `proclog.pods`.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);

impl Pod {
    /// A pod on `stack` with no engines yet, running up to 8 processes at once, with the
    /// stack's pod id and lease TTL, a 10 s drain grace and no HTTP API.
    pub fn builder(stack: &Proclog) -> PodBuilder<'_> {
        PodBuilder {
            stack,
            engines: Engines::new(),
            config: WorkerConfig {
                lease_ttl: stack.lease_ttl(),
                ..WorkerConfig::new(stack.pod_id())
            },
            http: None,
            http_options: HttpOptions::default(),
            heartbeat_every: DEFAULT_HEARTBEAT,
        }
    }

    /// The address the HTTP API listens on, when it was asked for.
    pub fn http_address(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(|http| http.address)
    }

    /// The HTTP server's connection counters, when it serves HTTP.
    pub fn http_stats(&self) -> Option<&Arc<crate::http::ServerStats>> {
        self.http.as_ref().map(|http| &http.stats)
    }

    /// The worker's counters (`None` for a pod of concurrency 0).
    pub fn stats(&self) -> Option<&Arc<WorkerStats>> {
        self.stats.as_ref()
    }

    /// Stops the pod: no more claims; runs get the grace period, then are stopped (released,
    /// or abandoned for `abandon` processes), bounded whatever the engines do; other pods are
    /// told the released work is available; then the HTTP API closes.
    pub async fn shutdown(self) {
        if let Some(presence) = &self.presence {
            presence.draining();
        }
        if let Some(worker) = self.worker {
            worker.shutdown().await;
            self.stack.notifier.work_available();
            self.stack.notifier.flush(HINT_FLUSH).await;
        }
        if let Some(http) = self.http {
            let _ = http.stop.send(());
            let _ = http.task.await;
        }
        if let Some(presence) = self.presence {
            presence.stopped().await;
        }
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

    /// Also serves the HTTP API (`/v1`, `/healthz`, `/readyz`, `/metrics`) on `address`
    /// (port 0: any free port; see [`Pod::http_address`]).
    pub fn serve_http(mut self, address: SocketAddr) -> Self {
        self.http = Some(address);
        self
    }

    /// Requires `Authorization: Bearer <token>` on `/v1`.
    pub fn api_token(mut self, token: impl Into<String>) -> Self {
        self.http_options.token = Some(token.into());
        self
    }

    /// The largest HTTP request body, in bytes (default 8 MiB).
    pub fn max_body_bytes(mut self, limit: usize) -> Self {
        self.http_options.max_body_bytes = limit;
        self
    }

    /// Every setting of the HTTP API at once (token, body and stream caps, connection limits,
    /// allowed hosts and origins); see [`HttpOptions`].
    pub fn http_options(mut self, options: HttpOptions) -> Self {
        self.http_options = options;
        self
    }

    /// The period of the pod's heartbeat in `proclog.pods` (default 5 s, 100 ms to 10 min).
    /// Other pods and the console call it `gone` after three periods without one.
    pub fn heartbeat_every(mut self, period: Duration) -> Self {
        self.heartbeat_every = period;
        self
    }

    /// Starts the worker (unless the concurrency is 0) and the HTTP API (if asked for), and
    /// registers the pod in `proclog.pods`.
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
        let http = match self.http {
            None => None,
            Some(address) => {
                let mut options = self.http_options.clone();
                options.limits.max_connections =
                    crate::http::server::raise_file_limit(options.limits.max_connections);
                let state = ApiState::new(Arc::clone(&services), stats.clone(), &options);
                let listener = tokio::net::TcpListener::bind(address)
                    .await
                    .map_err(|err| {
                        ProcessError::InvalidInput(format!("cannot listen on {address}: {err}"))
                    })?;
                let address = listener.local_addr().map_err(|err| {
                    ProcessError::InvalidInput(format!("cannot listen on {address}: {err}"))
                })?;
                let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                let server_stats = Arc::clone(&state.server);
                let server_stats_handle = Arc::clone(&state.server);
                let task = tokio::spawn(crate::http::server::serve(
                    listener,
                    router(state, options.max_body_bytes),
                    options.limits.clone(),
                    server_stats,
                    async {
                        let _ = stopped.await;
                    },
                ));
                tracing::info!(pod = %services.pod_id, %address, "serving the API");
                Some(HttpServer {
                    address,
                    stats: server_stats_handle,
                    stop,
                    task,
                })
            }
        };
        let presence = super::presence::Presence::start(
            Arc::clone(&services.cluster),
            super::presence::PresenceInfo {
                pod_id: services.pod_id.clone(),
                address: http.as_ref().map(|http| advertised(http.address)),
                concurrency: self.config.concurrency,
                heartbeat_every: self.heartbeat_every,
            },
        )
        .await;
        Ok(Pod {
            pod_id: services.pod_id.clone(),
            worker,
            stats,
            http,
            presence: Some(presence),
            stack: services,
        })
    }
}

/// The address a pod reports in `proclog.pods`: its listen address, with the host name in
/// place of an unspecified IP (`0.0.0.0:8080` in a container reads `<hostname>:8080`).
fn advertised(address: SocketAddr) -> String {
    if !address.ip().is_unspecified() {
        return address.to_string();
    }
    match std::fs::read_to_string("/proc/sys/kernel/hostname") {
        Ok(host) if !host.trim().is_empty() => format!("{}:{}", host.trim(), address.port()),
        _ => address.to_string(),
    }
}
