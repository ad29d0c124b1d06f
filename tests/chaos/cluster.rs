//! The cluster of a round: a throwaway Postgres (or a Citus coordinator and two workers), the
//! proxy and the three pods; their start, their return to readiness after each fault, their
//! logs, and plain SQL access to it.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use proclog::local_pg::{LocalPostgres, LocalPostgresOptions, SUPERUSER};
use proclog::testing::LocalCitus;
use tokio::time::Instant;

use crate::common::pods::{PodProcess, free_port};
use crate::common::proxy::TcpProxy;
use crate::schedule::{FaultKind, FaultRecord, now_ns};
use crate::settings::{POD_FLAGS, POD_NAMES, PROXIED, READY_LIMIT, SQL_LIMIT, seed_tag};
use crate::violation::Violation;

/// The database of a round.
pub(crate) enum Database {
    /// One Postgres server.
    Postgres(LocalPostgres),
    /// A Citus coordinator (the pods' server) and two workers.
    Citus(LocalCitus),
}

impl Database {
    /// Starts the database of `backend`.
    async fn start(backend: Backend) -> Self {
        let options = LocalPostgresOptions::default();
        match backend {
            Backend::Postgres => Database::Postgres(
                tokio::task::block_in_place(|| LocalPostgres::start(&options))
                    .expect("start a throwaway Postgres (is postgresql installed?)"),
            ),
            Backend::Citus => Database::Citus(
                LocalCitus::start(2, &options)
                    .await
                    .expect("start a throwaway Citus cluster"),
            ),
        }
    }

    /// The server the pods connect to (the coordinator on Citus).
    pub(crate) fn server(&self) -> &LocalPostgres {
        match self {
            Database::Postgres(pg) => pg,
            Database::Citus(citus) => citus.coordinator(),
        }
    }

    /// The server the pods connect to, to crash it.
    pub(crate) fn server_mut(&mut self) -> &mut LocalPostgres {
        match self {
            Database::Postgres(pg) => pg,
            Database::Citus(citus) => citus.coordinator_mut(),
        }
    }

    /// The Citus workers (none on plain Postgres).
    pub(crate) fn workers_mut(&mut self) -> &mut [LocalPostgres] {
        match self {
            Database::Postgres(_) => &mut [],
            Database::Citus(citus) => citus.workers_mut(),
        }
    }

    /// Every server's log, by a file name to keep it under.
    fn logs(&self) -> Vec<(String, std::path::PathBuf)> {
        let mut logs = vec![(
            "postgres.log".to_owned(),
            self.server().dir().join("postgres.log"),
        )];
        if let Database::Citus(citus) = self {
            for (index, worker) in citus.workers().iter().enumerate() {
                logs.push((
                    format!("worker-{index}.log"),
                    worker.dir().join("postgres.log"),
                ));
            }
        }
        logs
    }
}

/// Which database a round runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Backend {
    Postgres,
    Citus,
}

/// The database, the proxy and the three pods of one round.
pub(crate) struct Cluster {
    pub(crate) db: Database,
    pub(crate) proxy: TcpProxy,
    pub(crate) pods: Vec<PodProcess>,
    http: reqwest::Client,
    /// When every pod was last seen running and ready.
    healthy_since_ns: i64,
}

impl Cluster {
    /// Starts and migrates the database of `backend` (on Citus the migration distributes
    /// the tables), the proxy and the pods, whose journals go to `dir`.
    pub(crate) async fn start(dir: &Path, backend: Backend) -> Self {
        let db = Database::start(backend).await;
        let pg = db.server();
        let direct = pg.url("postgres");
        let pool = proclog::pg::connect_pool(&direct, 1).expect("pool");
        proclog::pg::migrate(&pool).await.expect("migrate");
        drop(pool);
        let proxy = TcpProxy::start(SocketAddr::from(([127, 0, 0, 1], pg.port()))).await;
        let proxied = format!("postgres://{SUPERUSER}@127.0.0.1:{}/postgres", proxy.port());
        // Every (re)start runs this copy: a rebuild of the crate during the round (another
        // build on the machine) must not mix binaries, let alone schema versions.
        let binary = dir.join("proclog");
        std::fs::copy(env!("CARGO_BIN_EXE_proclog"), &binary).expect("copy the pod binary");
        let mut pods = Vec::new();
        for (index, name) in POD_NAMES.iter().enumerate() {
            let url = if index == PROXIED { &proxied } else { &direct };
            let journal = dir.join(format!("{name}.journal"));
            let journal = journal.to_str().expect("UTF-8 temp dir");
            let mut flags = POD_FLAGS.to_vec();
            flags.extend(["--demo-journal", journal]);
            pods.push(PodProcess::start_binary(&binary, url, name, free_port(), &flags).await);
        }
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("HTTP client");
        Self {
            db,
            proxy,
            pods,
            http,
            healthy_since_ns: now_ns(),
        }
    }

    /// The backend the round runs on.
    pub(crate) fn backend(&self) -> Backend {
        match self.db {
            Database::Postgres(_) => Backend::Postgres,
            Database::Citus(_) => Backend::Citus,
        }
    }

    pub(crate) fn direct_url(&self) -> String {
        self.db.server().url("postgres")
    }

    pub(crate) fn pod_urls(&self) -> Vec<String> {
        self.pods.iter().map(|pod| pod.url.clone()).collect()
    }

    /// After a fault: every pod must be running and ready again without help. A pod that
    /// exited or stays unready is a violation; it is restarted (and logged as a disruptive
    /// fault) so that the round goes on.
    pub(crate) async fn recover(
        &mut self,
        violations: &mut Vec<Violation>,
        log: &mut Vec<FaultRecord>,
    ) {
        let fault = log.last().map(FaultRecord::describe).unwrap_or_default();
        for index in 0..self.pods.len() {
            let name = self.pods[index].name.clone();
            let kind = if !self.pods[index].is_running() {
                violations.push(Violation::new(
                    "pod exited unexpectedly",
                    &name,
                    format!("found exited after fault {fault}"),
                ));
                FaultKind::UnexpectedExit
            } else if let Err(last) = self.wait_ready(index).await {
                violations.push(Violation::new(
                    "pod not ready again after fault",
                    &name,
                    format!("not ready {READY_LIMIT:?} after fault {fault}; /readyz: {last}"),
                ));
                FaultKind::UnreadyRestart
            } else {
                continue;
            };
            // It may have failed at any instant since it was last seen healthy.
            let mut record = FaultRecord::begin(kind, Some(&name));
            record.start_ns = self.healthy_since_ns;
            self.pods[index].restart().await;
            log.push(record.end());
        }
        self.healthy_since_ns = now_ns();
    }

    /// Polls the pod's `/readyz` until it answers 2xx; after [`READY_LIMIT`], the last
    /// answer.
    async fn wait_ready(&self, index: usize) -> Result<(), String> {
        let url = format!("{}/readyz", self.pods[index].url);
        let deadline = Instant::now() + READY_LIMIT;
        loop {
            let request = self.http.get(&url).timeout(Duration::from_secs(2));
            let last = match request.send().await {
                Ok(response) if response.status().is_success() => return Ok(()),
                Ok(response) => {
                    let status = response.status();
                    format!("{status} {}", response.text().await.unwrap_or_default())
                }
                Err(err) => err.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(last);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Copies the pods' logs and the servers' logs into `dir` (kept after a failure).
    pub(crate) fn keep_logs(&self, dir: &Path) {
        for pod in &self.pods {
            let _ = std::fs::copy(&pod.log, dir.join(format!("{}.log", pod.name)));
        }
        for (name, log) in self.db.logs() {
            let _ = std::fs::copy(log, dir.join(name));
        }
    }
}

/// A plain SQL connection to the chaos cluster, retried while Postgres restarts.
pub(crate) async fn sql_connect(url: &str) -> tokio_postgres::Client {
    let deadline = Instant::now() + SQL_LIMIT;
    loop {
        match tokio_postgres::connect(url, tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                return client;
            }
            Err(err) => {
                assert!(
                    Instant::now() < deadline,
                    "[{}] cannot reach the chaos cluster over SQL: {err}",
                    seed_tag()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
