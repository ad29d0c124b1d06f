//! The cluster of a round: a throwaway Postgres, the proxy and the three pods; their start,
//! their return to readiness after each fault, their logs, and plain SQL access to it.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use proclog::local_pg::{LocalPostgres, LocalPostgresOptions, SUPERUSER};
use tokio::time::Instant;

use crate::common::pods::{PodProcess, free_port};
use crate::common::proxy::TcpProxy;
use crate::schedule::{FaultKind, FaultRecord, now_ns};
use crate::settings::{POD_FLAGS, POD_NAMES, PROXIED, READY_LIMIT, SQL_LIMIT, seed_tag};
use crate::violation::Violation;

/// Postgres, the proxy and the three pods of one round.
pub(crate) struct Cluster {
    pub(crate) pg: LocalPostgres,
    pub(crate) proxy: TcpProxy,
    pub(crate) pods: Vec<PodProcess>,
    http: reqwest::Client,
    /// When every pod was last seen running and ready.
    healthy_since_ns: i64,
}

impl Cluster {
    /// Starts and migrates a throwaway Postgres, the proxy and the pods, whose journals go to
    /// `dir`.
    pub(crate) async fn start(dir: &Path) -> Self {
        let pg =
            tokio::task::block_in_place(|| LocalPostgres::start(&LocalPostgresOptions::default()))
                .expect("start a throwaway Postgres (is postgresql installed?)");
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
            pg,
            proxy,
            pods,
            http,
            healthy_since_ns: now_ns(),
        }
    }

    pub(crate) fn direct_url(&self) -> String {
        self.pg.url("postgres")
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

    /// Copies the pods' logs and the Postgres log into `dir` (kept after a failure).
    pub(crate) fn keep_logs(&self, dir: &Path) {
        for pod in &self.pods {
            let _ = std::fs::copy(&pod.log, dir.join(format!("{}.log", pod.name)));
        }
        let _ = std::fs::copy(self.pg.dir().join("postgres.log"), dir.join("postgres.log"));
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
