//! Test support: a real Postgres for the whole test binary, a fresh database per test.
//!
//! `PROCLOG_TEST_DATABASE_URL` (a `postgres://` URL with rights to create databases) names a
//! server to use; otherwise one throwaway cluster is started per test binary with
//! `proclog::testing` (the same helpers hosts use) and dies with it.

#![allow(dead_code)]

use std::sync::Arc;

pub mod pods;
pub mod proxy;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use proclog::pg::GroupCommitOptions;
use proclog::store::ClusterStore;
use proclog::{InMemoryProcessRegistry, PgProcessRegistry, ProcessRegistry, RegistryConfig};

/// Creates an empty database and returns its URL.
pub async fn fresh_database_url() -> String {
    proclog::testing::fresh_database_url()
        .await
        .expect("a fresh test database (is postgresql installed?)")
}

/// A fresh, migrated database and its URL.
pub async fn migrated_database_url() -> String {
    proclog::testing::migrated_database_url()
        .await
        .expect("a migrated test database (is postgresql installed?)")
}

/// Rows and a digest of both tables: equal before and after means nothing was written.
pub async fn table_checksum(url: &str) -> (i64, i64, String) {
    sql_client(url)
        .await
        .query_one(
            "SELECT (SELECT count(*) FROM proclog.processes),
                    (SELECT count(*) FROM proclog.events),
                    md5(coalesce((SELECT string_agg(p::text, ',' ORDER BY process_id)
                                    FROM proclog.processes p), '')
                        || coalesce((SELECT string_agg(e::text, ',' ORDER BY process_id, seq)
                                       FROM proclog.events e), ''))",
            &[],
        )
        .await
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .unwrap()
}

/// A plain connection for checks over SQL, driven in the background.
pub async fn sql_client(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    client
}

/// A store shared by several "pods", each with its own registry handle.
#[async_trait]
pub trait Store: Send + Sync {
    /// A registry for pod `writer` (Postgres: its own connection pool).
    async fn pod_with(&self, config: RegistryConfig) -> Arc<dyn ProcessRegistry>;
    /// The store's clock (the database clock for Postgres).
    async fn now(&self) -> DateTime<Utc>;
    /// A registry for pod `writer` with default settings.
    async fn pod(&self, writer: &str) -> Arc<dyn ProcessRegistry> {
        self.pod_with(RegistryConfig::new(writer)).await
    }
    /// The cluster store over the same data (queues, schedules, views).
    async fn cluster(&self) -> Arc<dyn ClusterStore>;
}

/// A Postgres cluster store over `url`.
fn pg_cluster(url: &str) -> Arc<dyn ClusterStore> {
    let pool = proclog::pg::connect_pool(url, 4).expect("pool");
    let probe = proclog::pg::connect_pool(url, 1).expect("pool");
    Arc::new(proclog::pg::PgClusterStore::new(pool, probe))
}

/// A migrated Postgres database; each pod gets a pool of 8.
pub struct PgStore {
    pub url: String,
}

impl PgStore {
    pub async fn new() -> Self {
        Self {
            url: migrated_database_url().await,
        }
    }
}

#[async_trait]
impl Store for PgStore {
    /// Group commit on, every append through the group statement (even alone), so that
    /// every clause of the contract holds `proclog.append_group` to the rules.
    async fn pod_with(&self, config: RegistryConfig) -> Arc<dyn ProcessRegistry> {
        let pool = proclog::pg::connect_pool(&self.url, 8).expect("pool");
        Arc::new(
            PgProcessRegistry::new(pool, config).with_group_commit(Some(GroupCommitOptions {
                group_single_appends: true,
                ..GroupCommitOptions::default()
            })),
        )
    }

    async fn now(&self) -> DateTime<Utc> {
        database_now(&self.url).await
    }

    async fn cluster(&self) -> Arc<dyn ClusterStore> {
        pg_cluster(&self.url)
    }
}

/// The clock of the database at `url`.
async fn database_now(url: &str) -> DateTime<Utc> {
    sql_client(url)
        .await
        .query_one("SELECT now()", &[])
        .await
        .expect("read the clock")
        .get(0)
}

/// A migrated Postgres database, registries with group commit off (every append a statement
/// of its own) that claim runnable work process by process (`ClaimStrategy::PerProcess`, the
/// strategy of distributed tables); each pod gets a pool of 8.
pub struct UngroupedPgStore {
    inner: PgStore,
}

impl UngroupedPgStore {
    pub async fn new() -> Self {
        Self {
            inner: PgStore::new().await,
        }
    }
}

#[async_trait]
impl Store for UngroupedPgStore {
    async fn pod_with(&self, config: RegistryConfig) -> Arc<dyn ProcessRegistry> {
        let pool = proclog::pg::connect_pool(&self.inner.url, 8).expect("pool");
        Arc::new(
            PgProcessRegistry::new(pool, config)
                .with_group_commit(None)
                .with_claim_strategy(proclog::pg::ClaimStrategy::PerProcess),
        )
    }

    async fn now(&self) -> DateTime<Utc> {
        self.inner.now().await
    }

    async fn cluster(&self) -> Arc<dyn ClusterStore> {
        pg_cluster(&self.inner.url)
    }
}

/// Whether the Citus backend can run here: the extension is installed. Without it a test
/// says it is skipped, unless `PROCLOG_CITUS=required` (set by `.ci/run`), which fails it.
pub fn citus_installed() -> bool {
    if proclog::testing::LocalCitus::available() {
        return true;
    }
    assert!(
        std::env::var("PROCLOG_CITUS").as_deref() != Ok("required"),
        "PROCLOG_CITUS=required but the citus extension is not installed"
    );
    eprintln!("skipped: the citus extension is not installed (see .ci/run)");
    false
}

/// A migrated database on the binary's shared Citus cluster (a coordinator and two
/// workers): `processes` and `events` distributed by process id. Each pod gets the default
/// registry (the layout detected: claims process by process, group commit stepping aside)
/// with a pool of 8 whose statements may run 60 s: 24 writers on one process queue on its
/// row on one worker, which shares the two cores with the other servers and the rest of the
/// suite, and the default 5 s cut some appends as `Unavailable` there (a transient answer the
/// contract allows, which the concurrency cases do not retry). `None` when Citus is not
/// installed (see [`citus_installed`]).
pub struct CitusStore {
    pub url: String,
}

impl CitusStore {
    pub async fn new() -> Option<Self> {
        if !citus_installed() {
            return None;
        }
        let url = proclog::testing::migrated_citus_database_url()
            .await
            .expect("a migrated database on the shared Citus cluster");
        Some(Self { url })
    }
}

#[async_trait]
impl Store for CitusStore {
    async fn pod_with(&self, config: RegistryConfig) -> Arc<dyn ProcessRegistry> {
        let options = proclog::pg::PoolOptions {
            statement_timeout: Some(std::time::Duration::from_secs(60)),
            ..proclog::pg::PoolOptions::new(8)
        };
        let pool = proclog::pg::connect_pool_with(&self.url, &options).expect("pool");
        Arc::new(PgProcessRegistry::new(pool, config))
    }

    async fn now(&self) -> DateTime<Utc> {
        database_now(&self.url).await
    }

    async fn cluster(&self) -> Arc<dyn ClusterStore> {
        pg_cluster(&self.url)
    }
}

/// Postgres behind `WatchedProcessRegistry` with a real NOTIFY sink and completion hint.
pub struct WatchedPgStore {
    inner: PgStore,
}

impl WatchedPgStore {
    pub async fn new() -> Self {
        Self {
            inner: PgStore::new().await,
        }
    }
}

#[async_trait]
impl Store for WatchedPgStore {
    async fn pod_with(&self, config: RegistryConfig) -> Arc<dyn ProcessRegistry> {
        let pool = proclog::pg::connect_pool(&self.inner.url, 8).expect("pool");
        let notifier = proclog::pg::PgNotifier::spawn(
            proclog::pg::connect_pool(&self.inner.url, 1).expect("pool"),
            config.writer.clone(),
            1024,
        );
        Arc::new(
            proclog::WatchedProcessRegistry::new(
                PgProcessRegistry::new(pool, config),
                Arc::new(proclog::ProcessChangeHub::new()),
                Arc::new(notifier.clone()),
            )
            .with_completion_hint(Arc::new(notifier)),
        )
    }

    async fn now(&self) -> DateTime<Utc> {
        self.inner.now().await
    }

    async fn cluster(&self) -> Arc<dyn ClusterStore> {
        pg_cluster(&self.inner.url)
    }
}

/// The in-memory registry; every pod shares its map.
pub struct MemStore {
    root: InMemoryProcessRegistry,
}

impl MemStore {
    pub fn new() -> Self {
        Self {
            root: InMemoryProcessRegistry::new(RegistryConfig::new("root")),
        }
    }
}

#[async_trait]
impl Store for MemStore {
    async fn pod_with(&self, config: RegistryConfig) -> Arc<dyn ProcessRegistry> {
        Arc::new(self.root.share(config))
    }

    async fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    async fn cluster(&self) -> Arc<dyn ClusterStore> {
        Arc::new(self.root.share(RegistryConfig::new("cluster")))
    }
}

/// The whole log of `id`.
#[allow(dead_code)]
pub async fn log_of(
    registry: &dyn proclog::ProcessRegistry,
    id: &proclog::ProcessId,
) -> Vec<proclog::ProcessEvent> {
    let mut events: Vec<proclog::ProcessEvent> = Vec::new();
    loop {
        let after = events.last().map_or(0, |event| event.seq);
        let page = registry
            .events_after(id, after, 1000)
            .await
            .expect("read log");
        if page.is_empty() {
            return events;
        }
        events.extend(page);
    }
}
