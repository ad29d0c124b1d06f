//! Helpers for testing a host's own engines and wiring against a real Postgres, the way
//! proclog's own tests do.
//!
//! - [`fresh_database_url`] / [`migrated_database_url`]: a new database for one test, on one
//!   throwaway cluster shared by the whole test binary (started on first use, removed when
//!   the binary exits), or on the server named by `PROCLOG_TEST_DATABASE_URL` (a URL with the
//!   right to create databases).
//! - [`LocalPostgres`]: a cluster of the test's own, which it can stop, start again and crash
//!   ([`LocalPostgres::restart_immediate`]) to exercise recovery paths.
//! - [`LocalCitus`]: a Citus coordinator and workers of the test's own (when the extension is
//!   installed: [`LocalCitus::available`]).
//! - [`citus_database_url`] / [`migrated_citus_database_url`]: a new database for one test on
//!   one Citus cluster (a coordinator and two workers) shared by the whole test binary, so a
//!   suite written for Postgres runs unchanged on distributed tables.
//!
//! ```no_run
//! # async fn demo() -> Result<(), proclog::ProcessError> {
//! use proclog::{Proclog, testing};
//!
//! let url = testing::migrated_database_url().await?;
//! let stack = Proclog::builder(url).pod_id("test-pod").start().await?;
//! // ... register processes, run a `Pod` with the engine under test, assert over SQL ...
//! stack.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! The cluster needs the PostgreSQL server binaries (`initdb`, `postgres`); as root it runs as
//! an unprivileged user (see [`crate::local_pg`]).

use std::sync::OnceLock;

pub use crate::local_citus::LocalCitus;
pub use crate::local_pg::{LocalPostgres, LocalPostgresOptions};
pub use harness::{EngineHarness, Fault, HarnessReport};

mod harness;

use crate::error::ProcessError;

enum Server {
    External(String),
    Local(LocalPostgres),
}

static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();

/// The admin URL of the shared server: `PROCLOG_TEST_DATABASE_URL`, or the throwaway cluster
/// of this test binary (with `pg_stat_statements` loaded, so tests can count statements).
pub fn shared_admin_url() -> Result<String, ProcessError> {
    let server = SERVER.get_or_init(|| match std::env::var("PROCLOG_TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => Ok(Server::External(url)),
        _ => LocalPostgres::start(&LocalPostgresOptions {
            settings: vec![(
                "shared_preload_libraries".into(),
                "pg_stat_statements".into(),
            )],
            ..LocalPostgresOptions::default()
        })
        .map(Server::Local)
        .map_err(|err| {
            format!("cannot start a throwaway Postgres (is postgresql installed?): {err}")
        }),
    });
    match server {
        Ok(Server::External(url)) => Ok(url.clone()),
        Ok(Server::Local(pg)) => Ok(pg.url("postgres")),
        Err(err) => Err(ProcessError::Unavailable(err.clone())),
    }
}

/// `url` with its database replaced by `database`.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    format!("{base}/{database}{query}")
}

/// Creates an empty database on the server of `admin_url` and returns its URL.
pub async fn create_database(admin_url: &str) -> Result<String, ProcessError> {
    let name = format!("proclog_test_{}", uuid::Uuid::new_v4().simple());
    let pool = crate::pg::connect_pool(admin_url, 1)?;
    let client = pool
        .get()
        .await
        .map_err(|err| ProcessError::Unavailable(err.to_string()))?;
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .map_err(|err| ProcessError::Database(err.to_string()))?;
    Ok(with_database(admin_url, &name))
}

/// A new, empty database on the shared server.
pub async fn fresh_database_url() -> Result<String, ProcessError> {
    create_database(&shared_admin_url()?).await
}

/// A new database on the shared server, with proclog's schema.
pub async fn migrated_database_url() -> Result<String, ProcessError> {
    migrate_database(fresh_database_url().await?).await
}

static CITUS: tokio::sync::OnceCell<Result<LocalCitus, String>> =
    tokio::sync::OnceCell::const_new();

/// Workers of the shared Citus cluster.
pub const SHARED_CITUS_WORKERS: usize = 2;

/// A new, empty database on the Citus cluster of this test binary (a coordinator and
/// [`SHARED_CITUS_WORKERS`] workers on loopback, started on first use, removed when the binary
/// exits): the database exists on every node, with the extension and the workers added, and
/// the URL names the coordinator. `Unavailable` when the `citus` extension is not installed
/// ([`LocalCitus::available`]).
pub async fn citus_database_url() -> Result<String, ProcessError> {
    let cluster = CITUS
        .get_or_init(|| async {
            if !LocalCitus::available() {
                return Err("the citus extension is not installed".to_owned());
            }
            LocalCitus::start(SHARED_CITUS_WORKERS, &LocalPostgresOptions::default())
                .await
                .map_err(|err| format!("cannot start a throwaway Citus cluster: {err}"))
        })
        .await;
    let cluster = cluster
        .as_ref()
        .map_err(|err| ProcessError::Unavailable(err.clone()))?;
    let name = format!("proclog_test_{}", uuid::Uuid::new_v4().simple());
    cluster
        .create_database(&name)
        .await
        .map_err(|err| ProcessError::Unavailable(err.to_string()))
}

/// A new database on the shared Citus cluster with proclog's schema, its tables distributed.
pub async fn migrated_citus_database_url() -> Result<String, ProcessError> {
    migrate_database(citus_database_url().await?).await
}

async fn migrate_database(url: String) -> Result<String, ProcessError> {
    let pool = crate::pg::connect_pool(&url, 1)?;
    crate::pg::migrate(&pool).await.map_err(|err| match err {
        crate::pg::MigrationError::Database(err) => err,
        other => ProcessError::Database(other.to_string()),
    })?;
    Ok(url)
}
