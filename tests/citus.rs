//! proclog on a local Citus cluster (a coordinator and two workers on loopback, started by
//! the test): `proclog migrate` distributes the tables, and every call on one process runs on
//! one shard; claims, group commit, notices and pods work on them.
//!
//! These tests need the `citus` extension installed for the PostgreSQL server binaries;
//! `.ci/run` builds it from the vendored source and sets `PROCLOG_CITUS=required`, under
//! which a missing extension fails the test instead of skipping it.

mod common;

use common::citus_installed;
use proclog::pg::{connect_pool, migrate};
use proclog::testing::{LocalCitus, LocalPostgresOptions};
use proclog::{
    AppendRequest, Completion, PgProcessRegistry, ProcessError, ProcessId, ProcessRegistration,
    ProcessRegistry, RegistryConfig, TerminalState,
};
use serde_json::json;

/// A coordinator and two workers with the server `settings`, migrated (so the tables are
/// distributed), its URL and a pool of `size` connections to it.
async fn migrated_cluster(
    settings: &[(&str, &str)],
    size: usize,
) -> (LocalCitus, String, deadpool_postgres::Pool) {
    let options = LocalPostgresOptions {
        settings: settings
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect(),
        ..LocalPostgresOptions::default()
    };
    let cluster = LocalCitus::start(2, &options).await.unwrap();
    let url = cluster.url();
    let pool = connect_pool(&url, size).unwrap();
    migrate(&pool).await.unwrap();
    (cluster, url, pool)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_distributes_the_tables_and_a_process_lives_on_the_cluster() {
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

    // proclog's migrations distribute processes and events, co-located; a second run finds
    // them so.
    let report = migrate(&pool).await.expect("the migrations run on Citus");
    assert!(!report.applied.is_empty());
    assert!(report.citus.coordinator && report.citus.distributed);
    assert_eq!(
        report.citus.distributed_now,
        vec!["proclog.processes", "proclog.events", "proclog.pods"]
    );
    let again = migrate(&pool).await.unwrap();
    assert!(again.applied.is_empty() && again.citus.distributed);
    assert!(again.citus.distributed_now.is_empty());
    let client = pool.get().await.unwrap();
    let colocated: i64 = client
        .query_one(
            "SELECT count(DISTINCT colocation_id) FROM citus_tables
              WHERE table_name IN ('proclog.processes'::regclass, 'proclog.events'::regclass)
                AND citus_table_type = 'distributed' AND distribution_column = 'process_id'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(colocated, 1, "distributed by process_id, co-located");
    drop(client);
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

    // The row rules fire on the shards: a hand-written UPDATE breaking one is refused by name.
    let client = connect_pool(&url, 1).unwrap().get().await.unwrap();
    let refused = client
        .execute(
            "UPDATE proclog.processes SET last_seq = 1 WHERE process_id = $1",
            &[&record.id.as_str()],
        )
        .await
        .expect_err("last_seq never decreases");
    assert!(
        refused
            .to_string()
            .contains("processes_last_seq_never_decreases")
            || refused
                .as_db_error()
                .is_some_and(|db| db.message().contains("processes_last_seq_never_decreases")),
        "{refused:?}"
    );
    // A prune takes the process and its log from the shards.
    let report = registry
        .prune_terminal_processes(chrono::Utc::now() + chrono::TimeDelta::hours(1))
        .await
        .unwrap();
    assert_eq!((report.processes, report.events), (1, 2));
    assert!(registry.get_process(&record.id).await.unwrap().is_none());
    let left: i64 = client
        .query_one(
            "SELECT count(*) FROM proclog.events WHERE process_id = $1",
            &[&record.id.as_str()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    drop(client);
    cluster.stop().unwrap();
}

/// With `processes` and `events` distributed, a process's life runs through its shards: the
/// row rules and the state triggers fire there (schema version 10 lets them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_lives_on_its_shards_when_the_tables_are_distributed() {
    if !citus_installed() {
        return;
    }
    let (cluster, _url, pool) = migrated_cluster(&[], 4).await;
    let registry = PgProcessRegistry::new(pool.clone(), RegistryConfig::new("citus-pod"));
    for n in 0..8 {
        let record = registry
            .register_process(ProcessRegistration::new("citus-dist", json!({"n": n})))
            .await
            .unwrap();
        registry
            .append_event(&record.id, AppendRequest::new("test.one", json!(1)))
            .await
            .unwrap();
        registry
            .append_events(
                &record.id,
                vec![
                    AppendRequest::new("test.batch", json!(2)),
                    AppendRequest::new("test.batch", json!(3)).with_replay_key("k3"),
                ],
            )
            .await
            .unwrap();
        let replay = registry
            .append_event(
                &record.id,
                AppendRequest::new("test.batch", json!(3)).with_replay_key("k3"),
            )
            .await
            .unwrap();
        assert!(replay.replayed);
        let done = registry
            .complete_process(
                &record.id,
                Completion::new(TerminalState::Completed, json!(n)),
            )
            .await
            .unwrap();
        assert_eq!(done.last_seq, 4);
        let seqs: Vec<i64> = registry
            .events_after(&record.id, 0, 10)
            .await
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, vec![1, 2, 3, 4]);
    }
    // The rows are on the workers' shards, not on the coordinator.
    let client = pool.get().await.unwrap();
    let placed: i64 = client
        .query_one(
            "SELECT count(DISTINCT nodeport) FROM citus_shards
              WHERE table_name = 'proclog.processes'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(placed, 2, "the shards of processes are on both workers");
    drop(client);
    cluster.stop().unwrap();
}

/// Statements run by the coordinator since the last reset, by kind: (single-shard,
/// multi-shard), from `citus_stat_counters` (`citus.enable_stat_counters`).
async fn executions(client: &deadpool_postgres::Object) -> (i64, i64) {
    let row = client
        .query_one(
            "SELECT query_execution_single_shard, query_execution_multi_shard
               FROM citus_stat_counters WHERE name = current_database()",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// Every call on the run path of one process runs on one shard (CONTRACT §11): counted by
/// Citus itself, call by call, on distributed tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_on_one_process_runs_on_one_shard() {
    use proclog::{ClaimOutcome, Message, Suspension};
    if !citus_installed() {
        return;
    }
    let (cluster, _url, pool) = migrated_cluster(&[("citus.enable_stat_counters", "on")], 4).await;
    let registry = PgProcessRegistry::new(pool.clone(), RegistryConfig::new("citus-pod"));
    let counters = pool.get().await.unwrap();
    let ttl = std::time::Duration::from_secs(30);

    let mut calls: Vec<(&str, (i64, i64))> = Vec::new();
    macro_rules! counted {
        ($name:expr, $call:expr) => {{
            counters
                .batch_execute("SELECT citus_stat_counters_reset()")
                .await
                .unwrap();
            let value = $call.await.unwrap();
            calls.push(($name, executions(&counters).await));
            value
        }};
    }

    let record = counted!(
        "register",
        registry.register_process(ProcessRegistration::new("citus-one", json!({"n": 1})))
    );
    let id = record.id.clone();
    counted!("get", registry.get_process(&id));
    let lease = match counted!(
        "claim (chosen process)",
        registry.claim(&id, "citus-pod", ttl)
    ) {
        ClaimOutcome::Acquired(lease) => lease,
        other => panic!("{other:?}"),
    };
    let lease = counted!("renew", registry.renew(&lease, ttl));
    counted!(
        "append (fenced)",
        registry.append_event(&id, AppendRequest::new("test.one", json!(1)).fenced(&lease))
    );
    counted!(
        "append batch (keyed)",
        registry.append_events(
            &id,
            vec![
                AppendRequest::new("test.two", json!(2)).with_replay_key("k2"),
                AppendRequest::new("test.three", json!(3)),
            ],
        )
    );
    counted!(
        "append (replayed key)",
        registry.append_event(
            &id,
            AppendRequest::new("test.two", json!(2)).with_replay_key("k2")
        )
    );
    counted!("events after", registry.events_after(&id, 0, 100));
    counted!(
        "suspend",
        registry.suspend(
            &lease,
            Suspension {
                wake_at: None,
                delay: None,
                topic: Some("go".into()),
                after_seq: 0,
                retry: false,
                reason: json!({"why": "test"}),
            },
        )
    );
    counted!(
        "send message",
        registry.send_message(&id, Message::new("go", json!({"x": 1})))
    );
    counted!("next message", registry.next_message(&id, "go", 0));
    counted!("journal", registry.journal(&id, 0, 100));
    let lease = match counted!("claim again", registry.claim(&id, "citus-pod", ttl)) {
        ClaimOutcome::Acquired(lease) => lease,
        other => panic!("{other:?}"),
    };
    counted!("release", registry.release(&lease));
    counted!(
        "cancel (request, claim, complete)",
        proclog::pod::cancel_process(&registry, &id, "citus-pod", json!("stop"), None)
    );

    let report: Vec<String> = calls
        .iter()
        .map(|(name, (single, multi))| {
            format!("{name}: {single} single-shard, {multi} multi-shard")
        })
        .collect();
    eprintln!("{}", report.join("\n"));
    for (name, (single, multi)) in &calls {
        assert_eq!(
            *multi,
            0,
            "{name} ran a multi-shard statement:\n{}",
            report.join("\n")
        );
        assert!(
            *single >= 1,
            "{name} ran on no shard:\n{}",
            report.join("\n")
        );
    }

    // The calls whose statements write under the process row's lock are functions Citus
    // delegates whole to the worker of the process's shard: distributed by their first
    // argument, co-located with the tables; the plan of the append is one task that is
    // the function's call, not a pull of rows to the coordinator between two statements.
    for function in proclog::pg::citus::DELEGATED_FUNCTIONS {
        let colocated: bool = counters
            .query_one(
                "SELECT o.distribution_argument_index = 0
                        AND o.colocationid = (SELECT colocationid FROM pg_dist_partition
                                               WHERE logicalrelid = 'proclog.processes'::regclass)
                   FROM pg_dist_object o
                  WHERE o.classid = 'pg_proc'::regclass AND o.objid = $1::text::regprocedure",
                &[function],
            )
            .await
            .unwrap()
            .get(0);
        assert!(colocated, "{function} is delegated by its process id");
    }
    let plan: Vec<String> = counters
        .query(
            "EXPLAIN SELECT seq FROM proclog.append_unkeyed($1, 'w', NULL, ARRAY['t'], ARRAY['1'::jsonb])",
            &[&id.as_str()],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let plan = plan.join("\n");
    assert!(
        plan.contains("Task Count: 1") && plan.contains("Function Scan on append_unkeyed"),
        "the append runs whole on one worker:\n{plan}"
    );
    assert!(!plan.contains("pull to coordinator"), "{plan}");
    drop(counters);
    cluster.stop().unwrap();
}

/// LISTEN/NOTIFY go through the coordinator: on distributed tables, events appended through
/// pod A's stack reach a subscriber on pod B promptly (woken by notices, the safety poll an
/// hour long), exactly once and in order, the terminal event last.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn notices_through_the_coordinator_reach_another_pods_subscriber() {
    use futures::StreamExt;
    use proclog::pg::ListenerStatus;
    use proclog::pod_services::{PodServices, PodServicesOptions};
    if !citus_installed() {
        return;
    }
    let (cluster, url, _pool) = migrated_cluster(&[], 1).await;
    let a = PodServices::start(&url, "pod-a", PodServicesOptions::default()).unwrap();
    let b = PodServices::start(&url, "pod-b", PodServicesOptions::default()).unwrap();
    assert_eq!(a.listener_ready().await, ListenerStatus::Listening);
    assert_eq!(b.listener_ready().await, ListenerStatus::Listening);
    let subscriptions = b
        .subscriptions
        .clone()
        .with_safety_poll(std::time::Duration::from_secs(3600));
    let id = a
        .registry
        .register_process(ProcessRegistration::new("citus-notify", json!(null)))
        .await
        .unwrap()
        .id;
    let subscriber = tokio::spawn(
        subscriptions
            .subscribe(id.clone(), 0)
            .map(|item| item.expect("subscription item"))
            .collect::<Vec<_>>(),
    );
    for n in 1..=20 {
        a.registry
            .append_event(&id, AppendRequest::new("step", json!({"n": n})))
            .await
            .unwrap();
    }
    a.registry
        .complete_process(&id, Completion::new(TerminalState::Completed, json!("ok")))
        .await
        .unwrap();
    let events = subscriber.await.unwrap();
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=21).collect::<Vec<_>>());
    assert!(events.last().unwrap().is_terminal());
    assert!(b.link.counters().received > 0, "woken by notices");
    a.shutdown().await;
    b.shutdown().await;
    cluster.stop().unwrap();
}

/// Appends two events and makes one step, then ends with its input.
struct TwoEventsAndAStep;

#[proclog::async_trait]
impl proclog::pod::ProcessEngine for TwoEventsAndAStep {
    async fn run(&self, run: proclog::pod::RunContext) -> proclog::pod::EngineResult {
        for (event_type, n) in [("work.one", 1), ("work.two", 2)] {
            run.events
                .append(event_type, json!(n))
                .await
                .map_err(|err| json!({"error": err.to_string()}))?;
        }
        let done: serde_json::Value = run.step("finish", || async { Ok(json!("done")) }).await?;
        Ok(json!({"input": run.process.input, "step": done}))
    }
}

/// Two pods run processes on distributed tables: claims go process by process (detected),
/// each process runs once (attempt 1), its log dense and written by one pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_pods_run_processes_on_distributed_tables() {
    use proclog::pod::Pod;
    use proclog::{ProcessId, Proclog};
    if !citus_installed() {
        return;
    }
    let (cluster, url, _pool) = migrated_cluster(&[], 1).await;
    let mut stacks = Vec::new();
    let mut pods = Vec::new();
    for name in ["pod-a", "pod-b"] {
        let stack = Proclog::builder(url.clone())
            .pod_id(name)
            .start()
            .await
            .unwrap();
        let pod = Pod::builder(&stack)
            .engine("citus-work", TwoEventsAndAStep)
            .concurrency(4)
            .start()
            .await
            .unwrap();
        stacks.push(stack);
        pods.push(pod);
    }
    let registry = stacks[0].registry().clone();
    let mut ids: Vec<ProcessId> = Vec::new();
    for n in 0..40 {
        ids.push(
            registry
                .register_process(ProcessRegistration::new("citus-work", json!(n)))
                .await
                .unwrap()
                .id,
        );
    }
    for id in &ids {
        let terminal = stacks[1]
            .driver()
            .await_terminal(id, std::time::Duration::from_secs(60))
            .await
            .unwrap_or_else(|err| panic!("{id}: {err:?}"));
        assert_eq!(terminal.state, TerminalState::Completed, "{id}");
    }
    // The operator's views work on the cluster: the pods (a reference table joined with the
    // distributed processes) and a page of processes.
    let pods_seen = stacks[0].cluster().pods().await.unwrap();
    let mut names: Vec<&str> = pods_seen.iter().map(|p| p.pod_id.as_str()).collect();
    names.sort();
    assert_eq!(names, vec!["pod-a", "pod-b"]);
    assert!(
        pods_seen.iter().all(|p| p.status == "running"),
        "{pods_seen:?}"
    );
    let page = registry
        .list_processes(proclog::ProcessFilter {
            limit: Some(10),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.processes.len(), 10);
    let mut writers = std::collections::HashSet::new();
    for id in &ids {
        let record = registry.get_process(id).await.unwrap().unwrap();
        assert_eq!(record.attempts, 1, "{id} ran once");
        let events = registry.events_after(id, 0, 100).await.unwrap();
        let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>(), "{id}");
        let owners: std::collections::HashSet<&str> =
            events.iter().map(|e| e.writer.as_str()).collect();
        assert_eq!(owners.len(), 1, "{id} was written by one pod: {owners:?}");
        writers.extend(owners.into_iter().map(str::to_owned));
    }
    for pod in pods {
        pod.shutdown().await;
    }
    for stack in stacks {
        stack.shutdown().await;
    }
    eprintln!("pods that ran processes: {writers:?}");
    cluster.stop().unwrap();
}

/// Concurrent appends on distributed tables: group commit, which would make a statement
/// span shards, steps aside (every append goes alone, on its process's shard); keyed and
/// unkeyed appends of many processes at once leave every log dense and every key once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_on_distributed_tables_keep_every_log_dense() {
    if !citus_installed() {
        return;
    }
    let (cluster, _url, pool) = migrated_cluster(&[], 16).await;
    let registry = std::sync::Arc::new(PgProcessRegistry::new(
        pool,
        RegistryConfig::new("citus-group"),
    ));
    let mut ids = Vec::new();
    for n in 0..16 {
        ids.push(
            registry
                .register_process(ProcessRegistration::new("citus-group", json!(n)))
                .await
                .unwrap()
                .id,
        );
    }
    let mut appenders = Vec::new();
    for (n, id) in ids.iter().enumerate() {
        let (registry, id) = (registry.clone(), id.clone());
        appenders.push(tokio::spawn(async move {
            for i in 0..25 {
                let mut request = AppendRequest::new("test.group", json!(i));
                if n % 2 == 0 {
                    request = request.with_replay_key(format!("k{i}"));
                }
                registry.append_event(&id, request).await.unwrap();
            }
        }));
    }
    for appender in appenders {
        appender.await.unwrap();
    }
    let stats = registry
        .group_commit_stats()
        .expect("group commit is configured");
    assert_eq!(
        stats.batches.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "no group statement on distributed tables: {stats:?}"
    );
    for id in &ids {
        let seqs: Vec<i64> = registry
            .events_after(id, 0, 100)
            .await
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, (1..=25).collect::<Vec<_>>(), "{id}");
    }
    // Messages and cancellations at once: their events fire the state trigger on the shards.
    let mut senders = Vec::new();
    for id in &ids {
        let (registry, id) = (registry.clone(), id.clone());
        senders.push(tokio::spawn(async move {
            registry
                .send_message(&id, proclog::Message::new("go", json!(1)))
                .await
                .unwrap();
            proclog::pod::cancel_process(&*registry, &id, "citus-group", json!("stop"), None)
                .await
                .unwrap()
        }));
    }
    for sender in senders {
        let record = sender.await.unwrap();
        assert_eq!(
            record.status,
            proclog::ProcessStatus::Cancelled,
            "{}",
            record.id
        );
        assert_eq!(
            record.cancel_request,
            Some(json!({"reason": "stop", "by": "citus-group"})),
            "the trigger recorded the request on the row"
        );
    }
    eprintln!("group commit: {stats:?}");
    cluster.stop().unwrap();
}

/// `proclog up --citus-workers 1`: a coordinator, a worker and a pod, ready and serving;
/// Ctrl-C stops all of it cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_with_citus_workers_starts_serves_and_stops() {
    use std::io::{BufRead, BufReader, Read, Write};
    if !citus_installed() {
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_proclog"))
        .args(["up", "--citus-workers", "1", "--pods", "1"])
        .args(["--base-port", &port.to_string()])
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut banner = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let ready = line == "ready";
        banner.push(line);
        if ready {
            break;
        }
    }
    let banner = banner.join("\n");
    assert!(banner.contains("ready"), "{banner}");
    assert!(
        banner.contains("distributed by process_id")
            && banner.contains("Citus coordinator with 1 workers"),
        "{banner}"
    );
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert_eq!(rest.last().map(String::as_str), Some("stopped"), "{rest:?}");
}

/// Online growth: a third worker joins and the shards are rebalanced onto it while
/// appenders write and end their processes (each outcome decided by the test, a new process
/// after every one) and a pod runs `steps` processes. Every acknowledged append is in its log,
/// every log dense, every process ends as decided (the pod's: completed by their first run);
/// the longest append (the write pause a move causes) is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shards_move_to_a_new_worker_under_load_and_lose_nothing() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    if !citus_installed() {
        return;
    }
    // Non-blocking shard moves replicate logically; 8 shards keep the moves few.
    let (mut cluster, url, pool) =
        migrated_cluster(&[("wal_level", "logical"), ("citus.shard_count", "8")], 16).await;
    let registry = Arc::new(PgProcessRegistry::new(
        pool.clone(),
        RegistryConfig::new("citus-grow"),
    ));
    let pod = common::pods::PodProcess::start(
        &url,
        "pod-grow",
        &[
            "--lease-ttl-ms",
            "5000",
            "--poll-ms",
            "200",
            "--concurrency",
            "4",
        ],
    )
    .await;
    let mut run_by_pod = Vec::new();
    for n in 0..24 {
        run_by_pod.push(
            registry
                .register_process(ProcessRegistration::new(
                    "steps",
                    json!({"steps": 8, "delay_ms": 100, "n": n}),
                ))
                .await
                .unwrap()
                .id,
        );
    }
    let mut ids = Vec::new();
    for task in 0..8 {
        ids.push(register_retried(&registry, format!("grow-{task}-0")).await);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (acked, acked_count) = tokio::sync::watch::channel(0u64);
    let acked = Arc::new(acked);
    let mut appenders = Vec::new();
    for (task, first) in ids.clone().into_iter().enumerate() {
        let (registry, stop, acked) = (registry.clone(), stop.clone(), acked.clone());
        appenders.push(tokio::spawn(async move {
            // (process, acknowledged seqs, decided completion)
            let mut processes: Vec<(ProcessId, Vec<i64>, Completion)> = Vec::new();
            let mut id = first;
            let mut acknowledged = Vec::new();
            let mut longest = std::time::Duration::ZERO;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let began = std::time::Instant::now();
                // A transient failure during a move is retried with the same key: once.
                let request =
                    AppendRequest::new("test.grow", json!(i)).with_replay_key(format!("grow-{i}"));
                match registry.append_event(&id, request).await {
                    Ok(outcome) => {
                        acknowledged.push(outcome.event.seq);
                        acked.send_modify(|count| *count += 1);
                        longest = longest.max(began.elapsed());
                        i += 1;
                    }
                    Err(ProcessError::Unavailable(_)) => continue,
                    Err(err) => panic!("{id}: {err}"),
                }
                if i.is_multiple_of(25) {
                    let completion = decided(processes.len());
                    end_as_decided(&registry, &id, &completion).await;
                    processes.push((id, std::mem::take(&mut acknowledged), completion));
                    id = register_retried(&registry, format!("grow-{task}-{}", processes.len()))
                        .await;
                }
            }
            let completion = decided(processes.len());
            end_as_decided(&registry, &id, &completion).await;
            processes.push((id, acknowledged, completion));
            (processes, longest)
        }));
    }
    // Every appender is writing before the worker joins, and goes on after the moves.
    let acked_at_least = |count: u64| {
        let mut acked_count = acked_count.clone();
        async move {
            acked_count.wait_for(|acked| *acked >= count).await.unwrap();
        }
    };
    acked_at_least(200).await;
    let third = cluster.add_worker().await.unwrap();
    let third_port = i32::from(cluster.workers()[third].port());
    let client = pool.get().await.unwrap();
    // The moves take longer than the pool's statement timeout.
    client
        .batch_execute("SET statement_timeout = 0; SELECT rebalance_table_shards()")
        .await
        .unwrap();
    let moved: i64 = client
        .query_one(
            "SELECT count(*) FROM citus_shards
              WHERE table_name = 'proclog.events'::regclass AND nodeport = $1",
            &[&third_port],
        )
        .await
        .unwrap()
        .get(0);
    assert!(moved > 0, "shards of events moved to the new worker");
    let after_moves = *acked_count.borrow();
    acked_at_least(after_moves + 200).await;
    stop.store(true, Ordering::Relaxed);
    let mut pause = std::time::Duration::ZERO;
    let (mut total, mut ended) = (0, 0);
    for appender in appenders {
        let (processes, longest) = appender.await.unwrap();
        pause = pause.max(longest);
        for (id, acknowledged, completion) in processes {
            total += acknowledged.len();
            ended += 1;
            let events = registry.events_after(&id, 0, 10_000).await.unwrap();
            let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
            assert_eq!(
                seqs,
                (1..=seqs.len() as i64).collect::<Vec<_>>(),
                "{id} is dense"
            );
            for seq in &acknowledged {
                assert!(
                    seqs.contains(seq),
                    "{id}: acknowledged seq {seq} is in the log"
                );
            }
            assert_eq!(
                seqs.len(),
                acknowledged.len() + 1,
                "{id}: every stored event was acknowledged once, then the terminal one"
            );
            let terminal = registry.get_process(&id).await.unwrap().unwrap().terminal;
            let terminal = terminal.map(|t| (t.state, t.output));
            assert_eq!(
                terminal,
                Some((completion.state, completion.output)),
                "{id} ended as decided"
            );
        }
    }
    // The pod's processes: each completed, by its first run (no lease was lost to a move).
    let client_check = pool.get().await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    loop {
        let open: i64 = client_check
            .query_one(
                "SELECT count(*) FROM proclog.processes WHERE kind = 'steps' AND terminal_state IS NULL",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if open == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{open} steps processes still running"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    for id in &run_by_pod {
        let terminal = registry
            .get_process(id)
            .await
            .unwrap()
            .unwrap()
            .terminal
            .unwrap();
        assert_eq!(terminal.state, TerminalState::Completed, "{id}");
        assert_eq!(terminal.output["attempt"], json!(1), "{id}: one run");
    }
    drop(client_check);
    drop(pod);
    eprintln!(
        "rebalanced {moved} shards of events onto a third worker under {total} appends ending {ended} processes as decided, with {} steps processes run by a pod; longest append {pause:?}",
        run_by_pod.len()
    );
    drop(client);
    cluster.stop().unwrap();
}

/// The outcome the rebalance test decides for its `n`th process of a task.
fn decided(n: usize) -> Completion {
    let state = [
        TerminalState::Completed,
        TerminalState::Failed,
        TerminalState::Cancelled,
    ][n % 3];
    Completion::new(state, json!({"decided": n}))
}

/// Ends `id` with `completion`, retried while the database is unavailable (an identical
/// completion is idempotent).
async fn end_as_decided(registry: &PgProcessRegistry, id: &ProcessId, completion: &Completion) {
    loop {
        match registry.complete_process(id, completion.clone()).await {
            Ok(_) => return,
            Err(ProcessError::Unavailable(_)) => continue,
            Err(err) => panic!("{id}: {err}"),
        }
    }
}

/// Registers process `id`, retried while the database is unavailable (an identical
/// registration is idempotent).
async fn register_retried(registry: &PgProcessRegistry, id: String) -> ProcessId {
    let id = ProcessId::new(id).unwrap();
    loop {
        // External: the test runs it, no pod claims it.
        let registration = ProcessRegistration::new("citus-grow", json!(null))
            .with_id(id.clone())
            .with_disposition(proclog::Disposition::External);
        match registry.register_process(registration).await {
            Ok(record) => return record.id,
            Err(ProcessError::Unavailable(_)) => continue,
            Err(err) => panic!("{id}: {err}"),
        }
    }
}

/// Least privilege on Citus: roles made on the coordinator reach the workers, and the
/// grants `proclog migrate --writer-role/--reader-role` give work there too. A writer
/// registers, appends (plain and keyed: calls delegated to a worker, run there as the
/// writer), claims, suspends, is sent a message and completes; a reader reads everything and
/// writes nothing, through the delegated functions or around them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_and_reader_roles_work_on_every_node() {
    use proclog::{ClaimOutcome, Message, Suspension};
    if !citus_installed() {
        return;
    }
    let (cluster, url, pool) = migrated_cluster(&[], 2).await;
    pool.get()
        .await
        .unwrap()
        .batch_execute("CREATE ROLE proclog_pod LOGIN; CREATE ROLE proclog_ro LOGIN")
        .await
        .unwrap();
    proclog::pg::grant_writer(&pool, "proclog_pod")
        .await
        .unwrap();
    proclog::pg::grant_reader(&pool, "proclog_ro")
        .await
        .unwrap();
    let as_role = |role: &str| {
        let url = url.replacen("://proclog@", &format!("://{role}@"), 1);
        assert_ne!(url, cluster.url(), "the URL names the role");
        PgProcessRegistry::new(connect_pool(&url, 2).unwrap(), RegistryConfig::new("pod"))
    };
    let writer = as_role("proclog_pod");
    let id = writer
        .register_process(ProcessRegistration::new("citus-roles", json!(1)))
        .await
        .unwrap()
        .id;
    writer
        .append_event(&id, AppendRequest::new("test.plain", json!(1)))
        .await
        .unwrap();
    writer
        .append_event(
            &id,
            AppendRequest::new("test.keyed", json!(2)).with_replay_key("k"),
        )
        .await
        .unwrap();
    let ttl = std::time::Duration::from_secs(30);
    let ClaimOutcome::Acquired(lease) = writer.claim(&id, "pod", ttl).await.unwrap() else {
        panic!("the writer claims");
    };
    writer
        .suspend(
            &lease,
            Suspension {
                wake_at: None,
                delay: None,
                topic: Some("go".into()),
                after_seq: 0,
                retry: false,
                reason: json!(null),
            },
        )
        .await
        .unwrap();
    writer
        .send_message(&id, Message::new("go", json!(3)))
        .await
        .unwrap();
    assert_eq!(
        writer.claim_runnable("pod", ttl, 10).await.unwrap().len(),
        1
    );

    // On every node, only the writer may execute the delegated functions (the workers'
    // copies included: PUBLIC has no EXECUTE there).
    let admin = pool.get().await.unwrap();
    for function in proclog::pg::citus::DELEGATED_FUNCTIONS {
        for (role, expected) in [("proclog_pod", "t"), ("proclog_ro", "f")] {
            let answers: Vec<String> = admin
                .query(
                    "SELECT result FROM run_command_on_workers(
                         format('SELECT has_function_privilege(%L, %L, ''EXECUTE'')', $1::text, $2::text))",
                    &[&role, function],
                )
                .await
                .unwrap()
                .iter()
                .map(|row| row.get(0))
                .collect();
            assert_eq!(
                answers,
                vec![expected; 2],
                "{role} EXECUTE {function} on the workers"
            );
        }
    }
    drop(admin);
    let reader = as_role("proclog_ro");
    let before = reader.events_after(&id, 0, 100).await.unwrap();
    assert_eq!(
        before.len(),
        writer.get_process(&id).await.unwrap().unwrap().last_seq as usize
    );
    assert!(
        reader
            .append_event(&id, AppendRequest::new("test.no", json!(0)))
            .await
            .is_err()
    );
    assert!(
        reader
            .append_event(
                &id,
                AppendRequest::new("test.no", json!(0)).with_replay_key("r")
            )
            .await
            .is_err()
    );
    assert!(
        reader
            .complete_process(&id, Completion::new(TerminalState::Failed, json!(0)))
            .await
            .is_err()
    );
    assert!(
        reader
            .register_process(ProcessRegistration::new("citus-roles", json!(0)))
            .await
            .is_err()
    );
    assert_eq!(reader.events_after(&id, 0, 100).await.unwrap(), before);

    let done = writer
        .complete_process(&id, Completion::new(TerminalState::Completed, json!("ok")))
        .await
        .unwrap();
    assert_eq!(done.terminal.unwrap().state, TerminalState::Completed);
    cluster.stop().unwrap();
}
