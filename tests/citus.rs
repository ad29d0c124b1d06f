//! proclog on a local Citus cluster (a coordinator and two workers on loopback, started by
//! the test): the cluster the harness gives, and what proclog does on it.
//!
//! These tests need the `citus` extension installed for the PostgreSQL server binaries;
//! `.ci/run` builds it from the vendored source and sets `PROCLOG_CITUS=required`, under
//! which a missing extension fails the test instead of skipping it.

use proclog::pg::{connect_pool, migrate};
use proclog::testing::{LocalCitus, LocalPostgresOptions};
use proclog::{
    AppendRequest, Completion, PgProcessRegistry, ProcessRegistration, ProcessRegistry,
    RegistryConfig, TerminalState,
};
use serde_json::json;

/// Whether the Citus tests can run here; says why not when they cannot.
fn citus_installed() -> bool {
    if LocalCitus::available() {
        return true;
    }
    assert!(
        std::env::var("PROCLOG_CITUS").as_deref() != Ok("required"),
        "PROCLOG_CITUS=required but the citus extension is not installed"
    );
    eprintln!("skipped: the citus extension is not installed (see .ci/run)");
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_cluster_has_its_workers_and_takes_proclog_over_tls() {
    if !citus_installed() {
        return;
    }
    let cluster = LocalCitus::start(2, &LocalPostgresOptions::default())
        .await
        .expect("a coordinator and two workers start");
    assert_eq!(cluster.workers().len(), 2);

    // The default sslmode (prefer) reaches the coordinator over TLS: `CREATE EXTENSION
    // citus` turned it on with a self-signed X.509 version 1 certificate.
    let url = cluster.url();
    let pool = connect_pool(&url, 2).unwrap();
    let client = pool.get().await.unwrap();
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl, "the default sslmode encrypts the connection to Citus");
    let workers: i64 = client
        .query_one("SELECT count(*) FROM citus_get_active_worker_nodes()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(workers, 2, "both workers are active nodes");
    drop(client);

    // proclog's migrations and a process's whole life run through the coordinator.
    let report = migrate(&pool).await.expect("the migrations run on Citus");
    assert!(!report.applied.is_empty());
    let registry = PgProcessRegistry::new(pool, RegistryConfig::new("citus-pod"));
    let record = registry
        .register_process(ProcessRegistration::new("citus-smoke", json!({"n": 1})))
        .await
        .unwrap();
    let appended = registry
        .append_event(&record.id, AppendRequest::new("test.step", json!({"i": 1})))
        .await
        .unwrap();
    assert_eq!(appended.event.seq, 1);
    let done = registry
        .complete_process(
            &record.id,
            Completion::new(TerminalState::Completed, json!("ok")),
        )
        .await
        .unwrap();
    assert_eq!(done.last_seq, 2);
    let events = registry.events_after(&record.id, 0, 10).await.unwrap();
    assert_eq!(
        events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![1, 2],
        "a dense log"
    );
    cluster.stop().unwrap();
}
