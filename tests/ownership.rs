//! Every background task has an owner: a pod or a stack dropped without `shutdown()` stops
//! its tasks at once (no claim, renewal or heartbeat afterwards, checked over SQL), and
//! `shutdown()` returns only when every task has ended. And new work wakes the pod whatever
//! the entry point (library, HTTP, console), without waiting for its poll.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{migrated_database_url, sql_client};
use proclog::http::{HttpOptions, HttpServer};
use proclog::pod::{Pod, demo_engines};
use proclog::{ProcessId, ProcessRegistration, Proclog, TerminalState};
use serde_json::json;

/// The longest any wait here may take (a safety cap, never a timing assertion).
const CAP: Duration = Duration::from_secs(60);

/// Waits until the SQL condition holds.
async fn until(client: &tokio_postgres::Client, what: &str, sql: &str) {
    let deadline = tokio::time::Instant::now() + CAP;
    loop {
        let holds: bool = client.query_one(sql, &[]).await.unwrap().get(0);
        if holds {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn stack_and_pod(url: &str, name: &str, poll: Duration) -> (Proclog, Pod) {
    let stack = Proclog::builder(url)
        .pod_id(name)
        .lease_ttl(Duration::from_millis(1500))
        .start()
        .await
        .unwrap();
    let pod = Pod::builder(&stack)
        .engines(demo_engines())
        .concurrency(2)
        .poll_interval(poll)
        .heartbeat_every(Duration::from_millis(200))
        .start()
        .await
        .unwrap();
    (stack, pod)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_pod_and_stack_stop_claiming_renewing_and_heartbeating() {
    let url = migrated_database_url().await;
    let sql = sql_client(&url).await;
    let (stack, pod) = stack_and_pod(&url, "dropped", Duration::from_millis(100)).await;
    let running = stack
        .registry()
        .register_process(
            ProcessRegistration::new("steps", json!({"steps": 10000, "delay_ms": 20}))
                .with_id(ProcessId::new("running").unwrap()),
        )
        .await
        .unwrap();
    until(
        &sql,
        "the process runs and has renewed its lease",
        "SELECT last_seq >= 3 FROM proclog.processes WHERE process_id = 'running'",
    )
    .await;

    drop(pod);
    drop(stack);

    // What the dropped pod had written when it stopped: taken once the log stops moving
    // (an append in flight when the tasks were aborted may still commit).
    let snapshot = "SELECT p.last_seq, p.lease_expires_at, d.heartbeat_at
                      FROM proclog.processes p, proclog.pods d
                     WHERE p.process_id = 'running' AND d.pod_id = 'dropped'";
    let mut before = sql.query_one(snapshot, &[]).await.unwrap();
    // Work that a live pod would claim at once.
    sql.batch_execute(
        "INSERT INTO proclog.processes (process_id, kind, input, disposition)
         VALUES ('left-alone', 'steps', '{\"steps\": 1, \"delay_ms\": 1}', 'rerun')",
    )
    .await
    .unwrap();
    // Long enough for every one of its tasks to have acted many times over, were it
    // alive: its lease has expired on the database clock (a renewal would have moved it),
    // and its row is gone (three heartbeat periods without one).
    until(
        &sql,
        "the lease lapses",
        "SELECT lease_expires_at < now() FROM proclog.processes WHERE process_id = 'running'",
    )
    .await;
    until(
        &sql,
        "the pod is gone",
        "SELECT status = 'gone' FROM proclog.pod_status WHERE pod_id = 'dropped'",
    )
    .await;
    let after = sql.query_one(snapshot, &[]).await.unwrap();
    // An append aborted mid-flight may have committed right after the first read: then take
    // the first read again, now that the log has surely stopped.
    if after.get::<_, i64>(0) != before.get::<_, i64>(0) {
        before = sql.query_one(snapshot, &[]).await.unwrap();
    }
    assert_eq!(after.get::<_, i64>(0), before.get::<_, i64>(0), "no append");
    assert_eq!(
        after.get::<_, chrono::DateTime<chrono::Utc>>(1),
        before.get::<_, chrono::DateTime<chrono::Utc>>(1),
        "no renewal"
    );
    assert_eq!(
        after.get::<_, chrono::DateTime<chrono::Utc>>(2),
        before.get::<_, chrono::DateTime<chrono::Utc>>(2),
        "no heartbeat"
    );
    let status: String = sql
        .query_one(
            "SELECT status FROM proclog.processes WHERE process_id = 'left-alone'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "pending", "no claim");
    // Every connection of the dropped stack is closed: pools, listener, notifier.
    until(
        &sql,
        "the dropped stack's connections close",
        "SELECT count(*) = 0 FROM pg_stat_activity WHERE application_name LIKE 'proclog-%dropped'",
    )
    .await;
    assert_eq!(running.id.as_str(), "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_returns_when_every_task_has_ended() {
    let url = migrated_database_url().await;
    let sql = sql_client(&url).await;
    let (stack, pod) = stack_and_pod(&url, "orderly", Duration::from_millis(100)).await;
    let services = Arc::clone(stack.services());
    assert_eq!(
        services.task_names(),
        [
            "notifier",
            "listener",
            "group commit flusher",
            "group commit flusher",
            "await poller"
        ]
    );
    let done = stack
        .registry()
        .register_process(ProcessRegistration::new(
            "steps",
            json!({"steps": 3, "delay_ms": 1}),
        ))
        .await
        .unwrap();
    stack.driver().await_terminal(&done.id, CAP).await.unwrap();
    pod.shutdown().await;
    stack.shutdown().await;
    assert!(services.task_names().is_empty(), "every task joined");
    // The notices queued before the stop were sent, not dropped.
    let link = services.link.counters();
    assert_eq!(link.dropped, 0);
    assert!(link.sent > 0);
    // After shutdown the stack answers no more appends (its flushers are gone for good).
    let refused = services
        .registry
        .append_event(&done.id, proclog::AppendRequest::new("late", json!(1)))
        .await;
    assert!(
        matches!(
            refused,
            Err(proclog::ProcessError::Unavailable(_))
                | Err(proclog::ProcessError::ProcessTerminal { .. })
        ),
        "{refused:?}"
    );
    until(
        &sql,
        "the listener's and notifier's connections close",
        "SELECT count(*) = 0 FROM pg_stat_activity
          WHERE application_name IN ('proclog-listener-orderly', 'proclog-notify-orderly')",
    )
    .await;
}

/// With a poll of an hour, a process starts only if its registration woke the pod: through
/// the library, the HTTP API and the console alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn new_work_wakes_the_pod_from_every_entry_point() {
    let url = migrated_database_url().await;
    let (stack, pod) = stack_and_pod(&url, "waker", Duration::from_secs(3600)).await;
    let http = HttpServer::start(
        &stack,
        Some(&pod),
        "127.0.0.1:0".parse().unwrap(),
        HttpOptions {
            demo_form: true,
            ..HttpOptions::default()
        },
    )
    .await
    .unwrap();
    let base = format!("http://{}", http.address());
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let steps = json!({"steps": 1, "delay_ms": 1});
    let library = stack
        .registry()
        .register_process(ProcessRegistration::new("steps", steps.clone()))
        .await
        .unwrap()
        .id;
    let over_http: serde_json::Value = client
        .post(format!("{base}/v1/processes"))
        .json(&json!({"kind": "steps", "input": steps}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let over_http = ProcessId::new(over_http["id"].as_str().unwrap()).unwrap();
    let console = client
        .post(format!("{base}/ui/demo"))
        .form(&[("steps", "1"), ("delay_ms", "1")])
        .send()
        .await
        .unwrap();
    let page = console.headers()["location"].to_str().unwrap().to_owned();
    let from_console = ProcessId::new(page.trim_start_matches("/ui/processes/")).unwrap();
    for id in [library, over_http, from_console] {
        let end = stack.driver().await_terminal(&id, CAP).await.unwrap();
        assert_eq!(end.state, TerminalState::Completed, "{id}");
    }
    pod.shutdown().await;
    http.shutdown().await;
    stack.shutdown().await;
}
