//! CONTRACT §3 and §4: the sink contract, the change hub, cross-pod freshness over
//! LISTEN/NOTIFY, gap-free subscriptions over a lossy path, and `await_terminal`.
//! Several `PodServices` in one test process stand for pods sharing one Postgres.

mod common;

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use proclog::pg::{ListenerStatus, PgNotifier, PgProcessRegistry, connect_pool};
use proclog::pod_services::{PodServices, PodServicesOptions};
use proclog::watch::{CompletionHint, NoopSink};
use proclog::{
    AppendRequest, AwaitError, Completion, InMemoryProcessRegistry, ProcessChangeHub, ProcessError,
    ProcessEvent, ProcessEventSink, ProcessId, ProcessRegistration, ProcessRegistry,
    ProcessWorkDriver, RegistryConfig, TerminalState, WatchedProcessRegistry,
};
use serde_json::json;

use common::{migrated_database_url, sql_client};

/// Records every emitted (process, seq, type).
#[derive(Default)]
struct RecordingSink {
    seen: Mutex<Vec<(ProcessId, i64, String)>>,
}

#[async_trait]
impl ProcessEventSink for RecordingSink {
    async fn emit(&self, event: &ProcessEvent) {
        self.seen.lock().unwrap().push((
            event.process_id.clone(),
            event.seq,
            event.event_type.clone(),
        ));
    }
}

impl RecordingSink {
    fn seqs(&self) -> Vec<i64> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(_, seq, _)| *seq)
            .collect()
    }
}

#[derive(Default)]
struct RecordingHint {
    completed: Mutex<Vec<ProcessId>>,
}

impl CompletionHint for RecordingHint {
    fn completed(&self, id: &ProcessId) {
        self.completed.lock().unwrap().push(id.clone());
    }
}

fn memory_registry(writer: &str) -> InMemoryProcessRegistry {
    InMemoryProcessRegistry::new(RegistryConfig::new(writer))
}

async fn register(registry: &dyn ProcessRegistry) -> ProcessId {
    registry
        .register_process(ProcessRegistration::new("demo", json!(null)))
        .await
        .unwrap()
        .id
}

fn event(n: i64) -> AppendRequest {
    AppendRequest::new("step", json!({"n": n}))
}

#[tokio::test]
async fn sink_sees_each_written_event_in_seq_order_but_no_terminal_or_replayed_event() {
    let sink = Arc::new(RecordingSink::default());
    let hint = Arc::new(RecordingHint::default());
    let hub = Arc::new(ProcessChangeHub::new());
    let registry =
        WatchedProcessRegistry::new(memory_registry("pod-a"), Arc::clone(&hub), sink.clone())
            .with_completion_hint(hint.clone());
    let id = register(&registry).await;
    registry.append_event(&id, event(1)).await.unwrap();
    registry
        .append_events(&id, (2..=5).map(event).collect())
        .await
        .unwrap();
    let keyed = event(6).with_replay_key("k");
    registry.append_event(&id, keyed.clone()).await.unwrap();
    assert_eq!(sink.seqs(), [1, 2, 3, 4, 5, 6]);

    // A replay wrote nothing: it is neither emitted nor ticked.
    let mut watcher = hub.watch(&id);
    let replay = registry.append_event(&id, keyed).await.unwrap();
    assert!(replay.replayed);
    assert_eq!(sink.seqs().len(), 6);
    // Refused appends emit nothing either.
    assert!(
        registry
            .append_event(&id, AppendRequest::new("process.x", json!(1)))
            .await
            .is_err()
    );
    assert_eq!(sink.seqs().len(), 6);

    // Completion bypasses the sink but ticks the hub and gives the hint.
    registry
        .complete_process(
            &id,
            Completion::new(TerminalState::Completed, json!("done")),
        )
        .await
        .unwrap();
    watcher.changed().await;
    assert_eq!(
        sink.seqs().len(),
        6,
        "the terminal event never reaches the sink"
    );
    assert_eq!(*hint.completed.lock().unwrap(), std::slice::from_ref(&id));
    let log = registry.events_after(&id, 0, 100).await.unwrap();
    assert_eq!(log.last().unwrap().event_type, "process.completed");
}

/// A sink that takes its time: the append still succeeds (it is merely slower).
struct SlowSink {
    emitted: AtomicUsize,
}

#[async_trait]
impl ProcessEventSink for SlowSink {
    async fn emit(&self, _event: &ProcessEvent) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.emitted.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn a_slow_sink_never_fails_an_append() {
    let sink = Arc::new(SlowSink {
        emitted: AtomicUsize::new(0),
    });
    let registry = WatchedProcessRegistry::new(
        memory_registry("pod-a"),
        Arc::new(ProcessChangeHub::new()),
        sink.clone(),
    );
    let id = register(&registry).await;
    for n in 1..=5 {
        let outcome = registry.append_event(&id, event(n)).await.unwrap();
        assert_eq!(outcome.event.seq, n);
    }
    assert_eq!(sink.emitted.load(Ordering::SeqCst), 5);
}

/// Panics on every event.
struct PanickingSink;

#[async_trait]
impl ProcessEventSink for PanickingSink {
    async fn emit(&self, _event: &ProcessEvent) {
        panic!("a sink bug");
    }
}

impl CompletionHint for PanickingSink {
    fn completed(&self, _id: &ProcessId) {
        panic!("a hint bug");
    }
}

#[tokio::test]
async fn a_panicking_sink_cannot_take_a_committed_write_from_its_caller() {
    let registry = WatchedProcessRegistry::new(
        memory_registry("pod-a"),
        Arc::new(ProcessChangeHub::new()),
        Arc::new(PanickingSink),
    )
    .with_completion_hint(Arc::new(PanickingSink));
    let id = register(&registry).await;
    let outcome = registry.append_event(&id, event(1)).await.unwrap();
    assert_eq!(outcome.event.seq, 1, "the caller learns its seq");
    let batch = registry
        .append_events(&id, vec![event(2), event(3)])
        .await
        .unwrap();
    assert_eq!(batch.len(), 2);
    let record = registry
        .complete_process(&id, Completion::new(TerminalState::Completed, json!(1)))
        .await
        .unwrap();
    assert_eq!(record.last_seq, 4);
    assert_eq!(
        registry.sink_panics(),
        4,
        "three emits and one hint, contained and counted"
    );
}

#[tokio::test]
async fn a_notifier_that_cannot_send_settles_its_flush() {
    // Nothing listens on this port: every send fails.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let pool = connect_pool(&format!("postgres://nobody@127.0.0.1:{port}/none"), 1).unwrap();
    let notifier = PgNotifier::spawn(pool, "pod-a", 16);
    let registry = WatchedProcessRegistry::new(
        memory_registry("pod-a"),
        Arc::new(ProcessChangeHub::new()),
        Arc::new(notifier.clone()),
    );
    let id = register(&registry).await;
    for n in 1..=3 {
        registry.append_event(&id, event(n)).await.unwrap();
    }
    // Failed notices count as settled: with a day's timeout this returns as soon as the
    // sends have failed (the cap only guards the test).
    tokio::time::timeout(
        Duration::from_secs(60),
        notifier.flush(Duration::from_secs(24 * 3600)),
    )
    .await
    .expect("flush settles failed notices");
    assert_eq!(notifier.stats().failed.load(Ordering::Relaxed), 3);
}

#[tokio::test]
async fn a_full_notice_channel_drops_and_counts_while_appends_succeed() {
    let url = migrated_database_url().await;
    // The notifier's only connection is held by the test, so its sender cannot drain.
    let notifier_pool = connect_pool(&url, 1).unwrap();
    let held = notifier_pool.get().await.unwrap();
    let notifier = PgNotifier::spawn(notifier_pool.clone(), "pod-a", 4);
    let registry = WatchedProcessRegistry::new(
        PgProcessRegistry::new(connect_pool(&url, 2).unwrap(), RegistryConfig::new("pod-a")),
        Arc::new(ProcessChangeHub::new()),
        Arc::new(notifier.clone()),
    );
    let id = register(&registry).await;
    for n in 1..=100 {
        registry
            .append_event(&id, event(n))
            .await
            .expect("append succeeds");
    }
    assert_eq!(
        registry.events_after(&id, 0, 1000).await.unwrap().len(),
        100
    );
    let stats = Arc::clone(notifier.stats());
    assert!(
        stats.dropped.load(Ordering::Relaxed) >= 100 - 4 - 4,
        "a full channel drops"
    );
    // Once the connection is free, what was queued is sent; every notice is accounted for.
    drop(held);
    notifier.flush(Duration::from_secs(60)).await;
    assert_eq!(
        stats.sent.load(Ordering::Relaxed) + stats.dropped.load(Ordering::Relaxed),
        100
    );
    assert!(stats.sent.load(Ordering::Relaxed) >= 1);
}

#[tokio::test]
async fn hub_entries_exist_only_while_watched() {
    let hub = Arc::new(ProcessChangeHub::new());
    let a = ProcessId::new("a").unwrap();
    hub.tick(&a);
    assert_eq!(
        hub.watched_processes(),
        0,
        "ticking an unwatched process stores nothing"
    );
    let mut first = hub.watch(&a);
    let second = hub.watch(&a);
    assert_eq!(hub.watched_processes(), 1);
    hub.tick(&a);
    first.changed().await; // a tick after watch() is never missed
    drop(second);
    assert_eq!(hub.watched_processes(), 1);
    drop(first);
    assert_eq!(hub.watched_processes(), 0);
    for n in 0..1000 {
        let id = ProcessId::new(format!("p{n}")).unwrap();
        let watcher = hub.watch(&id);
        hub.tick(&id);
        drop(watcher);
    }
    assert_eq!(
        hub.watched_processes(),
        0,
        "memory does not grow with processes seen"
    );
    let mut watcher = hub.watch(&a);
    hub.resync_all();
    watcher.changed().await; // a resync wakes every watcher
}

async fn two_pods(url: &str) -> (PodServices, PodServices) {
    let a = PodServices::start(url, "pod-a", PodServicesOptions::default()).unwrap();
    let b = PodServices::start(url, "pod-b", PodServicesOptions::default()).unwrap();
    assert_eq!(a.listener_ready().await, ListenerStatus::Listening);
    assert_eq!(b.listener_ready().await, ListenerStatus::Listening);
    (a, b)
}

/// Collects a subscription to its end.
async fn collect(
    stream: futures::stream::BoxStream<'static, Result<ProcessEvent, ProcessError>>,
) -> Vec<ProcessEvent> {
    stream
        .map(|item| item.expect("subscription item"))
        .collect()
        .await
}

fn assert_exactly_once_in_order(events: &[ProcessEvent], last: i64) {
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=last).collect::<Vec<_>>());
    assert!(events.last().unwrap().is_terminal());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_appended_on_pod_a_reach_a_subscriber_on_pod_b_in_order() {
    let url = migrated_database_url().await;
    let (a, b) = two_pods(&url).await;
    // A long safety poll, so the events can only arrive promptly through notices.
    let subscriptions = b
        .subscriptions
        .clone()
        .with_safety_poll(Duration::from_secs(3600));
    let id = register(&*a.registry).await;
    let subscriber = tokio::spawn(collect(subscriptions.subscribe(id.clone(), 0)));
    for n in 1..=50 {
        a.registry.append_event(&id, event(n)).await.unwrap();
    }
    a.registry
        .append_events(&id, (51..=60).map(event).collect())
        .await
        .unwrap();
    a.registry
        .complete_process(&id, Completion::new(TerminalState::Completed, json!("ok")))
        .await
        .unwrap();
    let events = subscriber.await.unwrap();
    assert_exactly_once_in_order(&events, 61);
    assert_eq!(events[10].payload, json!({"n": 11}));
    assert!(events.iter().all(|e| e.writer == "pod-a"));
    assert!(b.link.counters().received > 0, "woken by notices");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn notices_travel_packed_and_earlier_json_notices_still_wake() {
    let url = migrated_database_url().await;
    let (a, b) = two_pods(&url).await;
    // Long safety polls: what arrives promptly arrived through a notice.
    let subscriptions = b
        .subscriptions
        .clone()
        .with_safety_poll(Duration::from_secs(3600));
    let mut ids = Vec::new();
    for _ in 0..200 {
        ids.push(register(&*a.registry).await);
    }
    let watched: Vec<_> = ids
        .iter()
        .step_by(50)
        .map(|id| tokio::spawn(collect(subscriptions.subscribe(id.clone(), 0))))
        .collect();
    // Many processes' events at once: their notices share payloads.
    let before = a.link.counters();
    futures::future::join_all(ids.iter().map(|id| {
        let registry = std::sync::Arc::clone(&a.registry);
        async move {
            registry.append_event(id, event(1)).await.unwrap();
            registry
                .complete_process(id, Completion::new(TerminalState::Completed, json!("ok")))
                .await
                .unwrap();
        }
    }))
    .await;
    for subscriber in watched {
        assert_exactly_once_in_order(&subscriber.await.unwrap(), 2);
    }
    a.link.flush(Duration::from_secs(10)).await;
    let after = a.link.counters();
    let (sent, payloads) = (after.sent - before.sent, after.payloads - before.payloads);
    assert!(sent >= 400, "{sent} notices sent");
    assert!(
        payloads * 4 < sent,
        "{sent} notices went out in {payloads} payloads"
    );

    // Pods of an earlier version send JSON notices; malformed and forged payloads are ignored
    // and the listener goes on.
    let quiet = PgProcessRegistry::new(connect_pool(&url, 1).unwrap(), RegistryConfig::new("old"));
    let id = register(&quiet).await;
    let subscriber = tokio::spawn(collect(subscriptions.subscribe(id.clone(), 0)));
    let waiter = {
        let driver = b.driver.clone();
        let id = id.clone();
        tokio::spawn(async move { driver.await_terminal(&id, Duration::from_secs(3600)).await })
    };
    while b.driver.stats().waiters.load(Ordering::Relaxed) == 0 {
        tokio::task::yield_now().await;
    }
    let admin = sql_client(&url).await;
    let notify = |channel: &'static str, payload: String| {
        let admin = &admin;
        async move {
            admin
                .execute("SELECT pg_notify($1, $2)", &[&channel, &payload])
                .await
                .unwrap();
        }
    };
    for garbage in [
        "p1 not-a-stamp old-pod\ne 1 x".to_owned(),
        format!("p1 1 old-pod\nz 1 {id}\ne 1\n\u{7}"),
        "{\"process_id\": 42}".to_owned(),
        String::new(),
    ] {
        notify("proclog_events", garbage).await;
    }
    quiet.append_event(&id, event(1)).await.unwrap();
    let legacy_event = json!({"process_id": id, "seq": 1, "event_type": "step", "pod": "old-pod"});
    notify("proclog_events", legacy_event.to_string()).await;
    quiet
        .complete_process(&id, Completion::new(TerminalState::Completed, json!("ok")))
        .await
        .unwrap();
    notify(
        "proclog_terminal",
        json!({"process_id": id, "pod": "old-pod"}).to_string(),
    )
    .await;
    assert_exactly_once_in_order(&subscriber.await.unwrap(), 2);
    assert_eq!(
        waiter.await.unwrap().expect("terminal").state,
        TerminalState::Completed
    );
    assert_eq!(b.link.status(), ListenerStatus::Listening);
}

/// Forwards only every other event's notice to the real notifier.
struct DropEveryOther {
    inner: PgNotifier,
    forwarded: AtomicU64,
}

#[async_trait]
impl ProcessEventSink for DropEveryOther {
    async fn emit(&self, event: &ProcessEvent) {
        if event.seq % 2 == 0 {
            self.forwarded.fetch_add(1, Ordering::Relaxed);
            self.inner.emit(event).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lost_notices_and_a_killed_listener_lose_no_event() {
    let url = migrated_database_url().await;
    let a = PodServices::start_with_sink(&url, "pod-a", PodServicesOptions::default(), |n| {
        Arc::new(DropEveryOther {
            inner: n.clone(),
            forwarded: AtomicU64::new(0),
        })
    })
    .unwrap();
    let b = PodServices::start(&url, "pod-b", PodServicesOptions::default()).unwrap();
    assert_eq!(a.listener_ready().await, ListenerStatus::Listening);
    assert_eq!(b.listener_ready().await, ListenerStatus::Listening);
    let subscriptions = b
        .subscriptions
        .clone()
        .with_safety_poll(Duration::from_millis(200));
    let id = register(&*a.registry).await;
    let mut stream = subscriptions.subscribe(id.clone(), 0);
    let mut received = Vec::new();

    for n in 1..=20 {
        a.registry.append_event(&id, event(n)).await.unwrap();
    }
    while received.len() < 10 {
        received.push(stream.next().await.unwrap().unwrap());
    }

    // Kill pod B's listener backend mid-stream.
    let admin = sql_client(&url).await;
    let killed = admin
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE application_name = 'proclog-listener-pod-b'
                AND datname = current_database()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        killed.len(),
        1,
        "pod B's listener connection was found and killed"
    );
    for n in 21..=40 {
        a.registry.append_event(&id, event(n)).await.unwrap();
    }
    a.registry
        .complete_process(&id, Completion::new(TerminalState::Completed, json!("ok")))
        .await
        .unwrap();
    while let Some(item) = stream.next().await {
        received.push(item.unwrap());
    }
    assert_exactly_once_in_order(&received, 41);

    // The listener came back on its own.
    let mut status = b.link.status_updates();
    status
        .wait_for(|s| *s == ListenerStatus::Listening)
        .await
        .unwrap();
    while b.link.counters().reconnects == 0 {
        status.changed().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscriptions_start_anywhere_and_end_after_the_terminal_event() {
    let url = migrated_database_url().await;
    let (a, b) = two_pods(&url).await;
    let id = register(&*a.registry).await;
    a.registry
        .append_events(&id, (1..=5).map(event).collect())
        .await
        .unwrap();
    // Midway, while running: the rest, then the end.
    let tail = tokio::spawn(collect(b.subscriptions.subscribe(id.clone(), 3)));
    a.registry
        .complete_process(&id, Completion::new(TerminalState::Failed, json!("boom")))
        .await
        .unwrap();
    let events = tail.await.unwrap();
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [4, 5, 6]);
    assert_eq!(events[2].event_type, "process.failed");
    // After the end: nothing, and the stream ends at once.
    assert!(
        collect(b.subscriptions.subscribe(id.clone(), 6))
            .await
            .is_empty()
    );
    assert!(
        collect(b.subscriptions.subscribe(id.clone(), 100))
            .await
            .is_empty()
    );
    // From the start of an ended process: the whole log.
    assert_eq!(
        collect(b.subscriptions.subscribe(id.clone(), 0))
            .await
            .len(),
        6
    );
    // Unknown process: one NotFound, then the end.
    let mut unknown = b
        .subscriptions
        .subscribe(ProcessId::new("nope").unwrap(), 0);
    assert!(matches!(
        unknown.next().await,
        Some(Err(ProcessError::NotFound(_)))
    ));
    assert!(unknown.next().await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn await_terminal_on_pod_b_sees_a_completion_on_pod_a() {
    let url = migrated_database_url().await;
    let (a, b) = two_pods(&url).await;
    let id = register(&*a.registry).await;
    a.registry.append_event(&id, event(1)).await.unwrap();
    let waiter = {
        let driver = b.driver.clone();
        let id = id.clone();
        tokio::spawn(async move { driver.await_terminal(&id, Duration::from_secs(600)).await })
    };
    while b.driver.stats().waiters.load(Ordering::Relaxed) == 0 {
        tokio::task::yield_now().await;
    }
    a.registry
        .complete_process(
            &id,
            Completion::new(TerminalState::Completed, json!({"r": 42})),
        )
        .await
        .unwrap();
    let terminal = waiter.await.unwrap().expect("terminal");
    assert_eq!(terminal.state, TerminalState::Completed);
    assert_eq!(terminal.output, json!({"r": 42}));
    assert_eq!(terminal.seq, 2);
    // Already terminal: answered from the column at once.
    let again = b
        .driver
        .await_terminal(&id, Duration::from_secs(600))
        .await
        .unwrap();
    assert_eq!(again, terminal);
}

#[tokio::test]
async fn await_terminal_distinguishes_timeout_from_unknown() {
    let url = migrated_database_url().await;
    let pod = PodServices::start(&url, "pod-a", PodServicesOptions::default()).unwrap();
    let missing = ProcessId::new("missing").unwrap();
    let unknown = pod
        .driver
        .await_terminal(&missing, Duration::from_secs(600))
        .await;
    assert_eq!(unknown, Err(AwaitError::NotFound(missing)));
    let running = register(&*pod.registry).await;
    let timed_out = pod
        .driver
        .await_terminal(&running, Duration::from_millis(100))
        .await;
    assert_eq!(
        timed_out,
        Err(AwaitError::Timeout {
            id: running,
            waited: Duration::from_millis(100)
        })
    );
    // The abandoned waiter is forgotten.
    while pod.driver.stats().waiters.load(Ordering::Relaxed) != 0 {
        tokio::task::yield_now().await;
    }
}

/// Counts `terminal_states` calls (one per poll round) on top of a real registry.
struct CountingRegistry {
    inner: PgProcessRegistry,
    terminal_reads: AtomicU64,
}

#[async_trait]
impl ProcessRegistry for CountingRegistry {
    async fn register_process(
        &self,
        r: ProcessRegistration,
    ) -> proclog::ProcessResult<proclog::ProcessRecord> {
        self.inner.register_process(r).await
    }
    async fn get_process(
        &self,
        id: &ProcessId,
    ) -> proclog::ProcessResult<Option<proclog::ProcessRecord>> {
        self.inner.get_process(id).await
    }
    async fn terminal_states(
        &self,
        ids: &[ProcessId],
    ) -> proclog::ProcessResult<std::collections::HashMap<ProcessId, Option<proclog::TerminalRecord>>>
    {
        self.terminal_reads.fetch_add(1, Ordering::SeqCst);
        self.inner.terminal_states(ids).await
    }
    async fn list_processes(
        &self,
        f: proclog::ProcessFilter,
    ) -> proclog::ProcessResult<proclog::ProcessPage> {
        self.inner.list_processes(f).await
    }
    async fn append_event(
        &self,
        id: &ProcessId,
        r: AppendRequest,
    ) -> proclog::ProcessResult<proclog::AppendOutcome> {
        self.inner.append_event(id, r).await
    }
    async fn append_events(
        &self,
        id: &ProcessId,
        r: Vec<AppendRequest>,
    ) -> proclog::ProcessResult<Vec<proclog::AppendOutcome>> {
        self.inner.append_events(id, r).await
    }
    async fn events_after(
        &self,
        id: &ProcessId,
        after: i64,
        limit: u32,
    ) -> proclog::ProcessResult<Vec<ProcessEvent>> {
        self.inner.events_after(id, after, limit).await
    }
    async fn complete_process(
        &self,
        id: &ProcessId,
        c: Completion,
    ) -> proclog::ProcessResult<proclog::ProcessRecord> {
        self.inner.complete_process(id, c).await
    }
    async fn claim(
        &self,
        id: &ProcessId,
        owner: &str,
        ttl: Duration,
    ) -> proclog::ProcessResult<proclog::ClaimOutcome> {
        self.inner.claim(id, owner, ttl).await
    }
    async fn renew(
        &self,
        lease: &proclog::Lease,
        ttl: Duration,
    ) -> proclog::ProcessResult<proclog::Lease> {
        self.inner.renew(lease, ttl).await
    }
    async fn release(&self, lease: &proclog::Lease) -> proclog::ProcessResult<()> {
        self.inner.release(lease).await
    }
    async fn claim_runnable(
        &self,
        owner: &str,
        ttl: Duration,
        limit: u32,
    ) -> proclog::ProcessResult<Vec<proclog::RunnableClaim>> {
        self.inner.claim_runnable(owner, ttl, limit).await
    }
    async fn next_wake(&self) -> proclog::ProcessResult<Option<Duration>> {
        self.inner.next_wake().await
    }

    async fn suspend(
        &self,
        lease: &proclog::Lease,
        suspension: proclog::Suspension,
    ) -> proclog::ProcessResult<proclog::ProcessRecord> {
        self.inner.suspend(lease, suspension).await
    }
    async fn prune_terminal_processes(
        &self,
        cutoff: chrono::DateTime<chrono::Utc>,
    ) -> proclog::ProcessResult<proclog::PruneReport> {
        self.inner.prune_terminal_processes(cutoff).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_waiters_share_their_polls() {
    const WAITERS: usize = 1000;
    let url = migrated_database_url().await;
    let counting = Arc::new(CountingRegistry {
        inner: PgProcessRegistry::new(connect_pool(&url, 4).unwrap(), RegistryConfig::new("pod-b")),
        terminal_reads: AtomicU64::new(0),
    });
    let hub = Arc::new(ProcessChangeHub::new());
    assert_eq!(hub.feeds(), 0);
    let driver = ProcessWorkDriver::spawn(counting.clone(), Arc::clone(&hub));
    assert_eq!(hub.feeds(), 0, "an idle driver holds no feed");
    let writer = WatchedProcessRegistry::new(
        PgProcessRegistry::new(connect_pool(&url, 4).unwrap(), RegistryConfig::new("pod-a")),
        Arc::new(ProcessChangeHub::new()),
        Arc::new(NoopSink),
    );
    let ids: Vec<ProcessId> = (0..WAITERS)
        .map(|n| ProcessId::new(format!("w{n}")).unwrap())
        .collect();
    for id in &ids {
        writer
            .register_process(ProcessRegistration::new("demo", json!(null)).with_id(id.clone()))
            .await
            .unwrap();
    }
    let mut waiters = Vec::with_capacity(WAITERS);
    for id in &ids {
        let driver = driver.clone();
        let id = id.clone();
        waiters.push(tokio::spawn(async move {
            driver.await_terminal(&id, Duration::from_secs(600)).await
        }));
    }
    while driver.stats().waiters.load(Ordering::Relaxed) < WAITERS as u64 {
        tokio::task::yield_now().await;
    }
    assert_eq!(hub.feeds(), 1, "waiters share one feed");
    // Complete them all in one statement, from "another pod", with no hint at all: only the
    // shared backoff polling can find out.
    let texts: Vec<&str> = ids.iter().map(ProcessId::as_str).collect();
    sql_client(&url)
        .await
        .execute(
            "SELECT proclog.complete_process(id, 'pod-a', NULL, 'completed', '\"done\"')
               FROM unnest($1::text[]) AS id",
            &[&texts],
        )
        .await
        .unwrap();
    for waiter in waiters {
        let terminal = waiter.await.unwrap().expect("every waiter resolves");
        assert_eq!(
            (terminal.state, terminal.seq),
            (TerminalState::Completed, 1)
        );
    }
    // With nobody waiting, the driver lets go of the hub's feed, so appends pay nothing for it.
    while hub.feeds() != 0 {
        tokio::task::yield_now().await;
    }
    let reads = counting.terminal_reads.load(Ordering::SeqCst);
    println!("{WAITERS} waiters resolved with {reads} terminal-state queries");
    assert!(
        reads < 100,
        "waiters share their polls: {reads} queries for {WAITERS} waiters"
    );
    assert_eq!(driver.stats().waiters.load(Ordering::Relaxed), 0);
}
