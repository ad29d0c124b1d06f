//! Connection pools for proclog's Postgres access.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};

use super::tls::DatabaseTarget;
use crate::error::ProcessError;

/// Parses a Postgres URL (or key=value string) into a client config with proclog's defaults:
/// application name `proclog` unless one is given, TCP keepalives, a 10 s connect timeout.
/// The TLS settings (`sslmode`, `sslrootcert`) are checked and left out of the config: see
/// [`DatabaseTarget`], which carries them.
pub fn client_config(url: &str) -> Result<tokio_postgres::Config, ProcessError> {
    Ok(DatabaseTarget::parse(url)?.config().clone())
}

/// How a pool waits and how long its statements may run.
///
/// Every pool a pod uses has both bounds set shorter than its lease TTL, so that no call can
/// hold a run past the instant its lease may expire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolOptions {
    /// Most connections open at once.
    pub max_size: usize,
    /// Longest wait for a free connection (or a new one to connect) before `Unavailable`.
    pub wait_timeout: Duration,
    /// Server-side `statement_timeout` of every connection (`None`: the server's setting).
    /// A statement cut by it is `Unavailable` (SQLSTATE 57014), so it is retried like any
    /// transient failure.
    pub statement_timeout: Option<Duration>,
    /// The `application_name` of the connections (how an operator finds them in
    /// `pg_stat_activity`); `None`: the URL's, else `proclog`.
    pub application_name: Option<String>,
}

impl PoolOptions {
    /// `max_size` connections, a 5 s wait and a 5 s statement timeout.
    pub fn new(max_size: usize) -> Self {
        Self {
            max_size,
            wait_timeout: Duration::from_secs(5),
            statement_timeout: Some(Duration::from_secs(5)),
            application_name: None,
        }
    }
}

/// A pool of at most `max_size` connections to `url`, with [`PoolOptions::new`]'s bounds.
///
/// Connections are recycled without a check query (a dead connection surfaces as
/// `Unavailable` on its next use and is then dropped), so a checkout costs no round trip.
pub fn connect_pool(url: &str, max_size: usize) -> Result<Pool, ProcessError> {
    connect_pool_with(url, &PoolOptions::new(max_size))
}

/// A pool to `url` with explicit [`PoolOptions`].
pub fn connect_pool_with(url: &str, options: &PoolOptions) -> Result<Pool, ProcessError> {
    let target = DatabaseTarget::parse(url)?;
    let tls = target.tls();
    let mut config = target.config().clone();
    if let Some(name) = &options.application_name {
        config.application_name(name);
    }
    if let Some(timeout) = options.statement_timeout {
        let setting = format!("-c statement_timeout={}", timeout.as_millis().max(1));
        let combined = match config.get_options() {
            Some(existing) if !existing.is_empty() => format!("{existing} {setting}"),
            _ => setting,
        };
        config.options(&combined);
    }
    let manager = Manager::from_config(
        config,
        tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let connect_timeout = options.wait_timeout.min(Duration::from_secs(10));
    Pool::builder(manager)
        .max_size(options.max_size)
        .runtime(Runtime::Tokio1)
        .create_timeout(Some(connect_timeout))
        .wait_timeout(Some(options.wait_timeout))
        .build()
        .map_err(|err| ProcessError::InvalidInput(format!("bad pool settings: {err}")))
}
