//! CONTRACT §6 in process: engines, unknown kinds, failures, cancellation, `external`
//! processes. A `Worker` over `PodServices` stands for a pod.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::migrated_database_url;
use proclog::pod::{Worker, WorkerConfig, cancel_process, demo_engines};
use proclog::pod_services::{PodServices, PodServicesOptions};
use proclog::{
    Disposition, ProcessError, ProcessId, ProcessRegistration, ProcessStatus, TerminalState,
};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(120);

struct Pod {
    services: Arc<PodServices>,
    worker: Option<Worker>,
}

async fn pod(url: &str, name: &str, run_work: bool) -> Pod {
    let services = Arc::new(
        PodServices::start(url, name, PodServicesOptions::default()).expect("pod services"),
    );
    services.listener_ready().await;
    let worker = run_work.then(|| {
        Worker::spawn(
            Arc::clone(&services.registry),
            Arc::clone(&services.hub),
            demo_engines(),
            WorkerConfig {
                lease_ttl: Duration::from_secs(30),
                poll_interval: Duration::from_millis(100),
                ..WorkerConfig::new(name)
            },
            Arc::clone(&services.work),
        )
    });
    Pod { services, worker }
}

async fn start(
    pod: &Pod,
    kind: &str,
    input: serde_json::Value,
    disposition: Disposition,
) -> ProcessId {
    let id = pod
        .services
        .registry
        .register_process(ProcessRegistration::new(kind, input).with_disposition(disposition))
        .await
        .unwrap()
        .id;
    pod.services.work.notify_one();
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn engines_complete_fail_and_unknown_kinds_fail_clearly() {
    let url = migrated_database_url().await;
    let pod = pod(&url, "pod-a", true).await;
    let steps = start(
        &pod,
        "steps",
        json!({"steps": 3, "delay_ms": 1}),
        Disposition::Rerun,
    )
    .await;
    let failing = start(
        &pod,
        "fail",
        json!({"message": "no luck"}),
        Disposition::Rerun,
    )
    .await;
    let unknown = start(&pod, "no-such-engine", json!({}), Disposition::Rerun).await;
    let driver = &pod.services.driver;

    let done = driver.await_terminal(&steps, WAIT).await.unwrap();
    assert_eq!(done.state, TerminalState::Completed);
    assert_eq!(done.output, json!({"steps": 3, "attempt": 1}));
    let log = pod
        .services
        .registry
        .events_after(&steps, 0, 100)
        .await
        .unwrap();
    let types: Vec<&str> = log.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(
        types,
        [
            "process.started",
            "step",
            "step",
            "step",
            "process.completed"
        ]
    );
    assert_eq!(log[0].payload["attempt"], json!(1));
    assert_eq!(log[0].payload["pod"], json!("pod-a"));
    assert_eq!(log[0].payload["generation"], json!(1));
    assert!(
        log.iter().all(|e| e.lease_generation == Some(1)),
        "all fenced"
    );
    // The row records the first start (what an `abandon` process's next claim reads).
    let record = pod
        .services
        .registry
        .get_process(&steps)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.started_at, Some(log[0].occurred_at));

    let failed = driver.await_terminal(&failing, WAIT).await.unwrap();
    assert_eq!(failed.state, TerminalState::Failed);
    assert_eq!(failed.output, json!({"error": "no luck"}));

    let unknown_end = driver.await_terminal(&unknown, WAIT).await.unwrap();
    assert_eq!(unknown_end.state, TerminalState::Failed);
    let message = unknown_end.output["error"].as_str().unwrap();
    assert!(
        message.contains("no engine for kind \"no-such-engine\""),
        "{message}"
    );
    // It failed once; it does not loop.
    let record = pod
        .services
        .registry
        .get_process(&unknown)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.attempts, 1);

    let stats = Arc::clone(pod.worker.as_ref().unwrap().stats());
    pod.worker.unwrap().shutdown().await;
    assert_eq!(
        stats.completed.load(std::sync::atomic::Ordering::Relaxed),
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelling_a_running_process_from_another_pod_stops_its_owner() {
    let url = migrated_database_url().await;
    let owner = pod(&url, "pod-owner", true).await;
    let api = pod(&url, "pod-api", false).await;
    let id = start(
        &owner,
        "steps",
        json!({"steps": 10000, "delay_ms": 20}),
        Disposition::Rerun,
    )
    .await;
    // Wait until it runs.
    let mut stream = api.services.subscriptions.subscribe(id.clone(), 0);
    use futures::StreamExt;
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.event_type, "process.started");

    // Owned by a live lease: the canceller cannot end it itself; the owner acts on the request
    // (possibly before this call even returns).
    cancel_process(
        api.services.registry.as_ref(),
        &id,
        "pod-api",
        json!("changed my mind"),
        None,
    )
    .await
    .unwrap();
    let end = api.services.driver.await_terminal(&id, WAIT).await.unwrap();
    assert_eq!(end.state, TerminalState::Cancelled);
    assert_eq!(end.output["request"]["reason"], json!("changed my mind"));
    assert_eq!(end.output["request"]["by"], json!("pod-api"));
    let log = api
        .services
        .registry
        .events_after(&id, 0, 10_000)
        .await
        .unwrap();
    let last = log.last().unwrap();
    assert_eq!(
        (last.event_type.as_str(), last.writer.as_str()),
        ("process.cancelled", "pod-owner")
    );
    assert!(
        log.iter()
            .any(|e| e.event_type == "process.cancel_requested")
    );
    owner.worker.unwrap().shutdown().await;
}

/// An engine whose process is cancelled (by another pod's API) while it finishes: it asks for
/// the cancellation itself, then answers at once, before the run's watch can have seen the
/// request.
struct CancelledAsItReturns {
    api: Arc<dyn proclog::ProcessRegistry>,
}

#[proclog::async_trait]
impl proclog::pod::ProcessEngine for CancelledAsItReturns {
    async fn run(&self, run: proclog::pod::RunContext) -> proclog::pod::EngineResult {
        cancel_process(
            self.api.as_ref(),
            &run.process.id,
            "pod-api",
            json!("just in time"),
            None,
        )
        .await
        .map_err(|err| json!({"error": err.to_string()}))?;
        Ok(json!("finished anyway"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_written_before_the_engine_answers_wins() {
    let url = migrated_database_url().await;
    let api = pod(&url, "pod-api", false).await;
    let owner = Arc::new(
        PodServices::start(&url, "pod-owner", PodServicesOptions::default()).expect("services"),
    );
    let worker = Worker::spawn(
        Arc::clone(&owner.registry),
        Arc::clone(&owner.hub),
        proclog::pod::Engines::new().with(
            "cancelled-as-it-returns",
            CancelledAsItReturns {
                api: Arc::clone(&api.services.registry),
            },
        ),
        WorkerConfig {
            lease_ttl: Duration::from_secs(30),
            poll_interval: Duration::from_millis(100),
            ..WorkerConfig::new("pod-owner")
        },
        Arc::clone(&owner.work),
    );
    let mut ids = Vec::new();
    for _ in 0..5 {
        let id = owner
            .registry
            .register_process(ProcessRegistration::new(
                "cancelled-as-it-returns",
                json!(null),
            ))
            .await
            .unwrap()
            .id;
        owner.work.notify_one();
        ids.push(id);
    }
    for id in &ids {
        let end = api.services.driver.await_terminal(id, WAIT).await.unwrap();
        assert_eq!(
            (end.state, end.output["request"]["reason"].clone()),
            (TerminalState::Cancelled, json!("just in time")),
            "{id}: the request was in the log before the engine answered"
        );
    }
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelling_a_process_nobody_runs_ends_it_at_once() {
    let url = migrated_database_url().await;
    let api = pod(&url, "pod-api", false).await;
    for disposition in [Disposition::Rerun, Disposition::External] {
        let id = start(&api, "steps", json!({}), disposition).await;
        let record = cancel_process(
            api.services.registry.as_ref(),
            &id,
            "pod-api",
            json!(null),
            None,
        )
        .await
        .unwrap();
        assert_eq!(record.status, ProcessStatus::Cancelled);
        let log = api
            .services
            .registry
            .events_after(&id, 0, 100)
            .await
            .unwrap();
        let types: Vec<&str> = log.iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(types, ["process.cancel_requested", "process.cancelled"]);
        // Nothing left to cancel now.
        let again = cancel_process(
            api.services.registry.as_ref(),
            &id,
            "pod-api",
            json!(null),
            None,
        )
        .await;
        assert!(
            matches!(again, Err(ProcessError::ProcessTerminal { .. })),
            "{again:?}"
        );
    }
    let missing = cancel_process(
        api.services.registry.as_ref(),
        &ProcessId::new("missing").unwrap(),
        "pod-api",
        json!(null),
        None,
    )
    .await;
    assert!(
        matches!(missing, Err(ProcessError::NotFound(_))),
        "{missing:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn external_processes_are_never_run_by_pods() {
    let url = migrated_database_url().await;
    let pod = pod(&url, "pod-a", true).await;
    let external = start(
        &pod,
        "steps",
        json!({"steps": 1, "delay_ms": 1}),
        Disposition::External,
    )
    .await;
    // A later runnable process gets run: the worker has looked at the queue since.
    let marker = start(
        &pod,
        "steps",
        json!({"steps": 1, "delay_ms": 1}),
        Disposition::Rerun,
    )
    .await;
    pod.services
        .driver
        .await_terminal(&marker, WAIT)
        .await
        .unwrap();
    let record = pod
        .services
        .registry
        .get_process(&external)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (record.status, record.attempts),
        (ProcessStatus::Pending, 0)
    );
    // API clients drive it.
    pod.services
        .registry
        .append_event(&external, proclog::AppendRequest::new("step", json!(1)))
        .await
        .unwrap();
    pod.services
        .registry
        .complete_process(
            &external,
            proclog::Completion::new(TerminalState::Completed, json!("by hand")),
        )
        .await
        .unwrap();
    let end = pod
        .services
        .driver
        .await_terminal(&external, WAIT)
        .await
        .unwrap();
    assert_eq!((end.state, end.seq), (TerminalState::Completed, 2));
    pod.worker.unwrap().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_releases_unfinished_runs_after_the_grace_period() {
    let url = migrated_database_url().await;
    let services =
        Arc::new(PodServices::start(&url, "pod-a", PodServicesOptions::default()).unwrap());
    let worker = Worker::spawn(
        Arc::clone(&services.registry),
        Arc::clone(&services.hub),
        demo_engines(),
        WorkerConfig {
            grace: Duration::from_millis(50),
            poll_interval: Duration::from_millis(50),
            ..WorkerConfig::new("pod-a")
        },
        Arc::clone(&services.work),
    );
    let id = services
        .registry
        .register_process(ProcessRegistration::new("sleep", json!({"ms": 600_000})))
        .await
        .unwrap()
        .id;
    services.work.notify_one();
    let mut stream = services.subscriptions.subscribe(id.clone(), 0);
    use futures::StreamExt;
    assert_eq!(
        stream.next().await.unwrap().unwrap().event_type,
        "process.started"
    );
    let stats = Arc::clone(worker.stats());
    worker.shutdown().await;
    assert_eq!(stats.released.load(std::sync::atomic::Ordering::Relaxed), 1);
    let record = services.registry.get_process(&id).await.unwrap().unwrap();
    assert!(record.lease.is_none(), "released for another pod");
    assert!(
        record.terminal.is_none(),
        "not ended: another pod continues it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_that_would_be_refused_writes_nothing() {
    let url = migrated_database_url().await;
    let api = pod(&url, "pod-api", false).await;
    let id = start(&api, "steps", json!({}), Disposition::Rerun).await;
    // A pod id whose canceller name ("canceller:<pod>") would exceed an owner's 128
    // characters: refused before the request is appended.
    let long_pod = "p".repeat(120);
    let refused = cancel_process(
        api.services.registry.as_ref(),
        &id,
        &long_pod,
        json!(null),
        None,
    )
    .await;
    assert!(
        matches!(refused, Err(ProcessError::InvalidInput(_))),
        "{refused:?}"
    );
    let record = api
        .services
        .registry
        .get_process(&id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.last_seq, 0, "nothing was appended");
    assert_eq!(record.status, ProcessStatus::Pending);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_oversized_cancel_reason_is_refused_and_writes_nothing() {
    let url = migrated_database_url().await;
    let api = pod(&url, "pod-api", false).await;
    let id = start(&api, "steps", json!({}), Disposition::Rerun).await;
    let reason = json!("r".repeat(proclog::pod::cancel::MAX_CANCEL_REASON_BYTES));
    let refused =
        cancel_process(api.services.registry.as_ref(), &id, "pod-api", reason, None).await;
    match refused {
        Err(ProcessError::InvalidInput(message)) => {
            assert!(message.contains("cancellation reason"), "{message}")
        }
        other => panic!("an oversized reason must be refused, got {other:?}"),
    }
    let record = api
        .services
        .registry
        .get_process(&id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.last_seq, 0, "nothing was appended");
    assert_eq!(record.status, ProcessStatus::Pending);
    // A reason at the limit is accepted and the process ends cancelled.
    let reason = json!("r".repeat(proclog::pod::cancel::MAX_CANCEL_REASON_BYTES - 2));
    let cancelled = cancel_process(api.services.registry.as_ref(), &id, "pod-api", reason, None)
        .await
        .unwrap();
    assert_eq!(cancelled.status, ProcessStatus::Cancelled);
}

/// A row written by hand over SQL that cannot be read back (nested deeper than serde_json
/// reads) fails alone: reading it is a clear error naming it, a subscription to it ends with
/// that error instead of retrying for ever, and claiming it fails that process once while the
/// ordinary processes claimed with it run to completion.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreadable_row_fails_alone() {
    let url = migrated_database_url().await;
    let admin = common::sql_client(&url).await;
    // Oldest first: the bad process is claimed in the same batch as the others.
    admin
        .batch_execute(
            "INSERT INTO proclog.processes (process_id, kind, input, disposition, created_at)
             VALUES ('unreadable', 'steps',
                     (repeat('[', 200) || '1' || repeat(']', 200))::jsonb, 'rerun',
                     now() - interval '1 hour');
             INSERT INTO proclog.processes (process_id, kind, input, disposition, status, last_seq)
             VALUES ('bad-log', 'external-kind', '{}', 'external', 'running', 2);
             INSERT INTO proclog.events (process_id, seq, event_type, payload, writer)
             VALUES ('bad-log', 1, 'fine', '1', 'sql'),
                    ('bad-log', 2, 'deep', (repeat('[', 200) || repeat(']', 200))::jsonb, 'sql');",
        )
        .await
        .unwrap();
    let pod = pod(&url, "pod-a", false).await;
    let registry = &pod.services.registry;
    let unreadable = ProcessId::new("unreadable").unwrap();
    let read = registry.get_process(&unreadable).await;
    match &read {
        Err(err @ ProcessError::Undecodable { id, location, .. }) => {
            assert_eq!(id, &unreadable);
            assert_eq!(location, "input");
            assert!(
                err.to_string().contains("repair or delete it over SQL"),
                "{err}"
            );
            assert!(!err.is_transient());
        }
        other => panic!("{other:?}"),
    }
    let bad_log = ProcessId::new("bad-log").unwrap();
    let events = registry.events_after(&bad_log, 0, 10).await;
    assert!(
        matches!(&events, Err(ProcessError::Undecodable { location, .. }) if location == "event 2 payload"),
        "{events:?}"
    );
    // The first event alone still reads.
    assert_eq!(
        registry.events_after(&bad_log, 0, 1).await.unwrap().len(),
        1
    );
    use futures::StreamExt;
    let streamed: Vec<_> = pod
        .services
        .subscriptions
        .subscribe(bad_log.clone(), 0)
        .collect()
        .await;
    assert!(
        matches!(streamed.as_slice(), [Err(ProcessError::Undecodable { .. })]),
        "the subscription ends with the error: {streamed:?}"
    );

    let mut ordinary = Vec::new();
    for _ in 0..5 {
        ordinary.push(
            start(
                &pod,
                "steps",
                json!({"steps": 2, "delay_ms": 1}),
                Disposition::Rerun,
            )
            .await,
        );
    }
    let worker = Worker::spawn(
        Arc::clone(&pod.services.registry),
        Arc::clone(&pod.services.hub),
        demo_engines(),
        WorkerConfig {
            lease_ttl: Duration::from_secs(30),
            poll_interval: Duration::from_millis(100),
            concurrency: 8,
            ..WorkerConfig::new("pod-a")
        },
        Arc::clone(&pod.services.work),
    );
    for id in &ordinary {
        let done = pod.services.driver.await_terminal(id, WAIT).await.unwrap();
        assert_eq!(done.state, TerminalState::Completed);
    }
    let failed = pod
        .services
        .driver
        .await_terminal(&unreadable, WAIT)
        .await
        .unwrap();
    assert_eq!(failed.state, TerminalState::Failed);
    assert_eq!(failed.output["reason"], "undecodable");
    assert!(
        failed.output["error"]
            .as_str()
            .unwrap()
            .contains("unreadable")
    );
    let attempts: i32 = admin
        .query_one(
            "SELECT attempts FROM proclog.processes WHERE process_id = 'unreadable'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(attempts, 1, "claimed once, failed once");
    worker.shutdown().await;
}

/// The demo engines bound their input: a run of a billion steps or a year's sleep fails at
/// once with the reason instead of occupying a pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn demo_engines_refuse_unbounded_input() {
    let url = migrated_database_url().await;
    let pod = pod(&url, "pod-a", true).await;
    for (kind, input, field) in [
        ("steps", json!({"steps": 1_000_000_000u64}), "steps"),
        ("steps", json!({"steps": 2, "delay_ms": -1}), "delay_ms"),
        ("sleep", json!({"ms": 31_536_000_000u64}), "ms"),
    ] {
        let id = start(&pod, kind, input, Disposition::Rerun).await;
        let end = pod.services.driver.await_terminal(&id, WAIT).await.unwrap();
        assert_eq!(end.state, TerminalState::Failed);
        let message = end.output["error"].as_str().unwrap();
        assert!(
            message.starts_with(&format!("{field} must be")),
            "{message}"
        );
    }
    pod.worker.unwrap().shutdown().await;
}
