//! `proclog pod`: one pod, running processes and serving the API until SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};

use super::{CliResult, LogFormat};
use crate::http::{AccessPolicy, DEFAULT_MAX_BODY_BYTES, HttpOptions, HttpServer, ServerLimits};
use crate::pod::{DemoJournal, Pod, demo_engines_with};
use crate::stack::Proclog;

#[derive(clap::Args, Clone, Debug)]
pub struct PodArgs {
    /// Postgres URL of the shared database.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// A direct (unpooled) Postgres URL for LISTEN, when DATABASE_URL goes through a
    /// transaction-mode pooler.
    #[arg(long, env = "PROCLOG_LISTENER_DATABASE_URL", hide_env_values = true)]
    pub listener_database_url: Option<String>,
    /// A PEM file of the CA(s) that signed the database's certificate, for
    /// sslmode=verify-ca / verify-full (same as `sslrootcert=` in the URL, which wins).
    #[arg(long, env = "PROCLOG_DATABASE_CA_FILE")]
    pub database_ca_file: Option<PathBuf>,
    /// After migrating, give this existing role read-only access to the proclog schema (as
    /// `proclog grant-reader` does).
    #[arg(long, env = "PROCLOG_READER_ROLE")]
    pub reader_role: Option<String>,
    /// Address the HTTP API listens on.
    #[arg(long, env = "PROCLOG_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// This pod's id (lease owner, event writer); default: host name and process id.
    #[arg(long, env = "PROCLOG_POD_ID")]
    pub pod_id: Option<String>,
    /// Most processes run at once by this pod (0: serve the API only, run nothing).
    #[arg(long, env = "PROCLOG_CONCURRENCY", default_value_t = 8)]
    pub concurrency: usize,
    /// Lease TTL in milliseconds; leases are renewed every tenth of it.
    #[arg(long, env = "PROCLOG_LEASE_TTL_MS", default_value_t = 15_000)]
    pub lease_ttl_ms: u64,
    /// Safety poll for new work, in milliseconds (work hints usually arrive first).
    #[arg(long, env = "PROCLOG_POLL_MS", default_value_t = 2_000)]
    pub poll_ms: u64,
    /// On SIGTERM, how long runs may finish before their engines are stopped, in ms.
    #[arg(long, env = "PROCLOG_GRACE_MS", default_value_t = 10_000)]
    pub grace_ms: u64,
    /// After the grace period, how long engines get to return before they are dropped, and
    /// then runs to release their leases before they are aborted, in ms.
    #[arg(long, env = "PROCLOG_HARD_STOP_MS", default_value_t = 3_000)]
    pub hard_stop_ms: u64,
    /// Period of the pod's heartbeat in proclog.pods, in ms (100 to 600000); the console
    /// shows a pod as gone after three periods without one.
    #[arg(long, env = "PROCLOG_HEARTBEAT_MS", default_value_t = 5_000)]
    pub heartbeat_ms: u64,
    /// Durable waits (timers) up to this long, in ms, are slept in the run; longer ones
    /// suspend the process, giving its lease and slot back.
    #[arg(long, env = "PROCLOG_SUSPEND_AFTER_MS", default_value_t = 2_000)]
    pub suspend_after_ms: u64,
    /// How long to keep trying to reach and migrate the database at start, in ms.
    #[arg(long, env = "PROCLOG_STARTUP_TIMEOUT_MS", default_value_t = 60_000)]
    pub startup_timeout_ms: u64,
    /// Record the demo engines' effects in this file (JSON lines), for crash and chaos tests.
    #[arg(long, env = "PROCLOG_DEMO_JOURNAL")]
    pub demo_journal: Option<PathBuf>,
    /// Bearer token required on /v1 and by the console. Required when listening on an
    /// address other than loopback (see --insecure-no-token).
    #[arg(long, env = "PROCLOG_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Serve the API without a token on an address other than loopback: anyone who can reach
    /// the port can then read, write, cancel and prune every process.
    #[arg(long, env = "PROCLOG_INSECURE_NO_TOKEN", value_parser = clap::builder::BoolishValueParser::new(), default_value_t = false)]
    pub insecure_no_token: bool,
    /// Run the demo engines (steps, sleep, fail) and offer the console's demo form.
    #[arg(long, env = "PROCLOG_DEMO_ENGINES", value_parser = clap::builder::BoolishValueParser::new(), default_value_t = false)]
    pub demo_engines: bool,
    /// Host names the API answers to besides IP addresses, localhost and this machine's
    /// name, comma-separated (`*`: any; `.example.com`: any name under it). Others get 403
    /// (DNS rebinding).
    #[arg(long, env = "PROCLOG_ALLOWED_HOSTS", default_value = "")]
    pub allowed_hosts: String,
    /// Origins whose browser pages may write to the API (CORS), comma-separated, e.g.
    /// https://app.example.com. Writes from other origins get 403.
    #[arg(long, env = "PROCLOG_ALLOWED_ORIGINS", default_value = "")]
    pub allowed_origins: String,
    /// Mark the console's cookie Secure (also done for requests forwarded as https).
    #[arg(long, env = "PROCLOG_SECURE_COOKIES", value_parser = clap::builder::BoolishValueParser::new(), default_value_t = false)]
    pub secure_cookies: bool,
    /// Most HTTP connections open at once (lowered to fit the file limit); at the cap the
    /// oldest idle connection is closed for a new one.
    #[arg(long, env = "PROCLOG_MAX_CONNECTIONS", default_value_t = 1_000)]
    pub max_connections: usize,
    /// How long a connection may take to send a request head, and stay idle between
    /// requests, in ms.
    #[arg(long, env = "PROCLOG_HEADER_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_timeout_ms: u64,
    /// How long a request body may take to arrive, in ms (then 408).
    #[arg(long, env = "PROCLOG_BODY_TIMEOUT_MS", default_value_t = 30_000)]
    pub body_timeout_ms: u64,
    /// Most event streams and awaits served at once (then 503 too_many_streams).
    #[arg(long, env = "PROCLOG_MAX_STREAMS", default_value_t = crate::http::DEFAULT_MAX_STREAMS)]
    pub max_streams: usize,
    /// Largest event payload, process input or output, in bytes.
    #[arg(long, env = "PROCLOG_MAX_PAYLOAD_BYTES", default_value_t = crate::validate::DEFAULT_MAX_PAYLOAD_BYTES)]
    pub max_payload_bytes: usize,
    /// Byte budget of one page of events (API pages, streams, the console): a page stops once
    /// its payloads reach it (always at least one event).
    #[arg(long, env = "PROCLOG_MAX_PAGE_BYTES", default_value_t = crate::validate::DEFAULT_MAX_PAGE_BYTES)]
    pub max_page_bytes: usize,
    /// Largest HTTP request body, in bytes.
    #[arg(long, env = "PROCLOG_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// Memory for request bodies being read and parsed at once, in bytes (at least
    /// --max-body-bytes): a body whose parse would take more alone is refused (413), others
    /// wait for room (503 busy after 5 s).
    #[arg(long, env = "PROCLOG_REQUEST_MEMORY_BYTES", default_value_t = crate::http::DEFAULT_REQUEST_MEMORY_BYTES)]
    pub request_memory_bytes: usize,
    /// Connections in the pod's pool.
    #[arg(long, env = "PROCLOG_POOL_SIZE", default_value_t = 16)]
    pub pool_size: usize,
    /// Log format.
    #[arg(long, env = "PROCLOG_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Export traces (a span per run, per executed step and per wait) to this OTLP/HTTP
    /// collector, e.g. http://collector:4318; off when unset.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

/// Longest duration a pod setting in milliseconds may name (one day).
const MAX_SETTING_MS: u64 = 24 * 60 * 60 * 1000;

/// Checks every setting before anything starts, so a pod never runs (and reports ready) with a
/// setting that makes its work fail.
fn check_settings(args: &PodArgs, pod_id: &str) -> Result<(), String> {
    use crate::validate;
    validate::pod_id(pod_id).map_err(|err| err.to_string())?;
    validate::lease_ttl(Duration::from_millis(args.lease_ttl_ms)).map_err(|err| err.to_string())?;
    if args.concurrency > validate::MAX_CONCURRENCY {
        return Err(format!(
            "--concurrency must be 0 to {}, got {}",
            validate::MAX_CONCURRENCY,
            args.concurrency
        ));
    }
    for (flag, ms, min) in [
        ("--poll-ms", args.poll_ms, 1),
        ("--grace-ms", args.grace_ms, 0),
        ("--hard-stop-ms", args.hard_stop_ms, 0),
        ("--startup-timeout-ms", args.startup_timeout_ms, 0),
        ("--heartbeat-ms", args.heartbeat_ms, 100),
        ("--suspend-after-ms", args.suspend_after_ms, 0),
        ("--header-timeout-ms", args.header_timeout_ms, 100),
        ("--body-timeout-ms", args.body_timeout_ms, 100),
    ] {
        if !(min..=MAX_SETTING_MS).contains(&ms) {
            return Err(format!(
                "{flag} must be {min} to {MAX_SETTING_MS}, got {ms}"
            ));
        }
    }
    if !(1..=validate::MAX_BATCH_BYTES).contains(&args.max_payload_bytes) {
        return Err(format!(
            "--max-payload-bytes must be 1 to {}, got {}",
            validate::MAX_BATCH_BYTES,
            args.max_payload_bytes
        ));
    }
    if !(1024..=1 << 30).contains(&args.max_body_bytes) {
        return Err(format!(
            "--max-body-bytes must be 1024 to {}, got {}",
            1u64 << 30,
            args.max_body_bytes
        ));
    }
    for (flag, value, max) in [
        ("--max-connections", args.max_connections, 1_000_000),
        ("--max-streams", args.max_streams, 100_000),
        (
            "--max-page-bytes",
            args.max_page_bytes,
            validate::MAX_BATCH_BYTES,
        ),
        ("--request-memory-bytes", args.request_memory_bytes, 1 << 34),
    ] {
        if !(1..=max).contains(&value) {
            return Err(format!("{flag} must be 1 to {max}, got {value}"));
        }
    }
    if non_empty(&args.api_token).is_none()
        && !args.listen.ip().is_loopback()
        && !args.insecure_no_token
    {
        return Err(format!(
            "refusing to serve the API on {} without a token: set PROCLOG_API_TOKEN (e.g. `openssl rand -hex 32`), listen on 127.0.0.1, or pass --insecure-no-token to let anyone who reaches the port read, write, cancel and prune every process",
            args.listen
        ));
    }
    if !(1..=1000).contains(&args.pool_size) {
        return Err(format!(
            "--pool-size must be 1 to 1000, got {}",
            args.pool_size
        ));
    }
    Ok(())
}

pub async fn run(args: PodArgs) -> CliResult {
    let telemetry = match non_empty(&args.otlp_endpoint) {
        Some(endpoint) => Some(
            crate::telemetry::Telemetry::otlp(&endpoint, std::time::Duration::from_secs(5))
                .map_err(|err| format!("bad setting: {err}"))?,
        ),
        None => None,
    };
    super::logging::init_logging_with(args.log_format, telemetry.as_ref());
    let result = run_pod(args).await;
    if let Some(telemetry) = telemetry {
        tokio::task::spawn_blocking(move || telemetry.shutdown())
            .await
            .ok();
    }
    result
}

async fn run_pod(args: PodArgs) -> CliResult {
    // An empty variable (`PROCLOG_POD_ID=` in a compose file) means "not set".
    let pod_id = non_empty(&args.pod_id).unwrap_or_else(crate::stack::default_pod_id);
    check_settings(&args, &pod_id).map_err(|err| format!("bad setting: {err}"))?;
    if let Some(role) = non_empty(&args.reader_role) {
        crate::pg::roles::check_role_name(&role).map_err(|err| format!("bad setting: {err}"))?;
    }
    let database_url = super::with_ca_file(&args.database_url, args.database_ca_file.as_deref())?;
    if let Some(warning) = crate::pg::DatabaseTarget::parse(&database_url)
        .ok()
        .and_then(|target| target.transport_warning())
    {
        tracing::warn!(pod = %pod_id, "{warning}");
    }
    let mut stack = Proclog::builder(&database_url)
        .pod_id(&pod_id)
        .lease_ttl(Duration::from_millis(args.lease_ttl_ms))
        .pool_size(args.pool_size)
        .max_payload_bytes(args.max_payload_bytes)
        .max_page_bytes(args.max_page_bytes)
        .startup_timeout(Duration::from_millis(args.startup_timeout_ms));
    if let Some(url) = non_empty(&args.listener_database_url) {
        stack = stack
            .listener_database_url(super::with_ca_file(&url, args.database_ca_file.as_deref())?);
    }
    let stack = stack.start().await?;
    if let Some(role) = non_empty(&args.reader_role) {
        let pool = stack.pool().ok_or("a reader role needs a Postgres stack")?;
        crate::pg::grant_reader(pool, &role).await?;
        tracing::info!(%role, "reader role can read the proclog schema");
    }
    let journal = match &args.demo_journal {
        Some(path) => Some(Arc::new(DemoJournal::open(path, &pod_id)?)),
        None => None,
    };
    let mut access = AccessPolicy::from_lists(&args.allowed_hosts, &args.allowed_origins);
    access.secure_cookies = args.secure_cookies;
    let http = HttpOptions {
        token: non_empty(&args.api_token),
        max_body_bytes: args.max_body_bytes,
        request_memory_bytes: args.request_memory_bytes,
        max_streams: args.max_streams,
        limits: ServerLimits {
            max_connections: args.max_connections,
            header_read_timeout: Duration::from_millis(args.header_timeout_ms),
            body_read_timeout: Duration::from_millis(args.body_timeout_ms),
            ..ServerLimits::default()
        },
        access,
        demo_form: args.demo_engines,
    };
    if http.token.is_none() {
        tracing::warn!(listen = %args.listen, "the API has no token: anyone who can reach this address can read and write every process");
    }
    let mut pod = Pod::builder(&stack)
        .concurrency(args.concurrency)
        .poll_interval(Duration::from_millis(args.poll_ms))
        .grace(Duration::from_millis(args.grace_ms))
        .hard_stop_margin(Duration::from_millis(args.hard_stop_ms))
        .heartbeat_every(Duration::from_millis(args.heartbeat_ms))
        .suspend_after(Duration::from_millis(args.suspend_after_ms));
    if args.demo_engines {
        pod = pod.engines(demo_engines_with(journal));
    }
    let pod = pod.start().await?;
    let http = match HttpServer::start(&stack, Some(&pod), args.listen, http).await {
        Ok(http) => http,
        Err(err) => {
            pod.shutdown().await;
            stack.shutdown().await;
            return Err(err.into());
        }
    };

    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = terminate.recv() => tracing::info!(pod = %pod_id, "SIGTERM: draining"),
        _ = interrupt.recv() => tracing::info!(pod = %pod_id, "SIGINT: draining"),
    }
    // The pod drains first while its API still answers; then the API closes.
    pod.shutdown().await;
    http.shutdown().await;
    stack.shutdown().await;
    tracing::info!(pod = %pod_id, "stopped");
    Ok(())
}

/// `Some` non-empty value, else `None`.
fn non_empty(value: &Option<String>) -> Option<String> {
    value.as_ref().filter(|value| !value.is_empty()).cloned()
}
