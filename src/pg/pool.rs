//! Connection pools for proclog's Postgres access.

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use crate::error::ProcessError;

/// Parses a Postgres URL (or key=value string) into a client config with proclog's defaults:
/// application name `proclog` unless one is given, TCP keepalives, a 10 s connect timeout.
pub fn client_config(url: &str) -> Result<tokio_postgres::Config, ProcessError> {
    let mut config = tokio_postgres::Config::from_str(url)
        .map_err(|err| ProcessError::InvalidInput(format!("bad database url: {err}")))?;
    if config.get_application_name().is_none() {
        config.application_name("proclog");
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    config.keepalives(true);
    config.keepalives_idle(Duration::from_secs(30));
    Ok(config)
}

/// A pool of at most `max_size` connections to `url`.
///
/// Connections are recycled without a check query (a dead connection surfaces as
/// `Unavailable` on its next use and is then dropped), so a checkout costs no round trip.
pub fn connect_pool(url: &str, max_size: usize) -> Result<Pool, ProcessError> {
    let manager = Manager::from_config(
        client_config(url)?,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(max_size)
        .runtime(Runtime::Tokio1)
        .create_timeout(Some(Duration::from_secs(10)))
        .wait_timeout(Some(Duration::from_secs(30)))
        .build()
        .map_err(|err| ProcessError::InvalidInput(format!("bad pool settings: {err}")))
}
