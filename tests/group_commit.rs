//! Group commit: appends queued while a flusher's statement is in flight go out together,
//! and each caller still gets its own answer. The batches here are made deterministic by
//! holding a process row lock from the test, so that the flusher waits while the others
//! queue behind it.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use proclog::pg::{GroupCommitOptions, GroupCommitStats};
use proclog::{
    AppendRequest, ClaimOutcome, Completion, PgProcessRegistry, ProcessError, ProcessId,
    ProcessRegistration, ProcessRegistry, RegistryConfig, TerminalState,
};
use serde_json::json;

use common::{migrated_database_url, sql_client};

/// One flusher, so that every append of the test shares its queue.
fn registry(url: &str) -> PgProcessRegistry {
    let pool = proclog::pg::connect_pool(url, 8).unwrap();
    PgProcessRegistry::new(pool, RegistryConfig::new("group-pod")).with_group_commit(Some(
        GroupCommitOptions {
            flushers: 1,
            ..GroupCommitOptions::default()
        },
    ))
}

async fn register(registry: &PgProcessRegistry, id: &str) -> ProcessId {
    let id = ProcessId::new(id).unwrap();
    registry
        .register_process(ProcessRegistration::new("group", json!(null)).with_id(id.clone()))
        .await
        .unwrap();
    id
}

/// Polls `condition` (bounded) until it holds.
async fn until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..2000 {
        if condition().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("timed out waiting until {what}");
}

/// A transaction of the test's own that holds `id`'s row lock until `release`.
struct RowLock {
    client: tokio_postgres::Client,
}

impl RowLock {
    async fn take(url: &str, id: &ProcessId) -> Self {
        let client = sql_client(url).await;
        client.batch_execute("BEGIN").await.unwrap();
        client
            .execute(
                "SELECT 1 FROM proclog.processes WHERE process_id = $1 FOR UPDATE",
                &[&id.as_str()],
            )
            .await
            .unwrap();
        Self { client }
    }

    async fn release(self) {
        self.client.batch_execute("COMMIT").await.unwrap();
    }
}

/// Sessions waiting for a row lock.
async fn lock_waiters(url: &str) -> i64 {
    sql_client(url)
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND wait_event_type = 'Lock'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

fn stats(registry: &PgProcessRegistry) -> Arc<GroupCommitStats> {
    registry.group_commit_stats().expect("group commit started")
}

type Outcome = proclog::ProcessResult<Vec<proclog::AppendOutcome>>;

fn spawn_append(
    registry: &PgProcessRegistry,
    id: &ProcessId,
    requests: Vec<AppendRequest>,
) -> tokio::task::JoinHandle<Outcome> {
    let registry = registry.clone();
    let id = id.clone();
    tokio::spawn(async move { registry.append_events(&id, requests).await })
}

fn step(n: i64) -> AppendRequest {
    AppendRequest::new("step", json!({ "n": n }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_batch_answers_each_caller_with_its_own_outcome() {
    let url = migrated_database_url().await;
    let registry = registry(&url);
    let blocker = register(&registry, "blocker").await;
    let plain = register(&registry, "plain").await;
    let shared = register(&registry, "shared").await;
    let ended = register(&registry, "ended").await;
    registry
        .complete_process(&ended, Completion::new(TerminalState::Completed, json!({})))
        .await
        .unwrap();
    let fenced = register(&registry, "fenced").await;
    let lease = match registry
        .claim(&fenced, "someone", Duration::from_secs(60))
        .await
        .unwrap()
    {
        ClaimOutcome::Acquired(lease) => lease,
        busy => panic!("{busy:?}"),
    };
    let stale = register(&registry, "stale").await;
    let stale_lease = match registry
        .claim(&stale, "old-owner", Duration::from_secs(60))
        .await
        .unwrap()
    {
        ClaimOutcome::Acquired(lease) => lease,
        busy => panic!("{busy:?}"),
    };
    registry.release(&stale_lease).await.unwrap();
    let keyed = register(&registry, "keyed").await;
    let stored = registry
        .append_event(&keyed, step(1).with_replay_key("k1"))
        .await
        .unwrap();
    let missing = ProcessId::new("missing").unwrap();

    // Hold the flusher on a batch of one, then queue a batch behind it.
    registry.append_event(&blocker, step(0)).await.unwrap();
    let lock = RowLock::take(&url, &blocker).await;
    let first = spawn_append(&registry, &blocker, vec![step(1)]);
    until("the flusher waits for the row lock", || async {
        lock_waiters(&url).await == 1
    })
    .await;
    let before = stats(&registry).enqueued.load(Ordering::Relaxed);
    let calls = vec![
        (
            "plain",
            spawn_append(&registry, &plain, vec![step(1), step(2), step(3)]),
        ),
        (
            "shared a",
            spawn_append(&registry, &shared, vec![step(1), step(2)]),
        ),
        ("shared b", spawn_append(&registry, &shared, vec![step(3)])),
        ("ended", spawn_append(&registry, &ended, vec![step(1)])),
        (
            "fenced",
            spawn_append(&registry, &fenced, vec![step(1).fenced(&lease)]),
        ),
        (
            "stale",
            spawn_append(&registry, &stale, vec![step(1).fenced(&stale_lease)]),
        ),
        (
            "replayed",
            spawn_append(&registry, &keyed, vec![step(1).with_replay_key("k1")]),
        ),
        (
            "conflict",
            spawn_append(&registry, &keyed, vec![step(99).with_replay_key("k1")]),
        ),
        ("missing", spawn_append(&registry, &missing, vec![step(1)])),
    ];
    let queued = calls.len() as u64;
    until("every call is queued", || async {
        stats(&registry).enqueued.load(Ordering::Relaxed) == before + queued
    })
    .await;
    lock.release().await;
    first.await.unwrap().unwrap();
    let mut outcomes = std::collections::HashMap::new();
    for (name, call) in calls {
        outcomes.insert(name, call.await.unwrap());
    }
    assert_eq!(
        stats(&registry).largest_batch.load(Ordering::Relaxed),
        queued,
        "the queued calls went out as one batch"
    );

    let seqs = |name: &str| -> Vec<i64> {
        match &outcomes[name] {
            Ok(events) => events.iter().map(|o| o.event.seq).collect(),
            Err(err) => panic!("{name}: {err:?}"),
        }
    };
    assert_eq!(seqs("plain"), [1, 2, 3]);
    // Two callers on one process: each gets consecutive seqs, together 1..3 (in whichever
    // order the two tasks reached the queue).
    let (a, b) = (seqs("shared a"), seqs("shared b"));
    assert!(
        a == [1, 2] && b == [3] || b == [1] && a == [2, 3],
        "shared a {a:?}, shared b {b:?}"
    );
    let fenced_events = outcomes["fenced"].as_ref().unwrap();
    assert_eq!(
        fenced_events[0].event.lease_generation,
        Some(lease.generation)
    );
    assert_eq!(fenced_events[0].event.writer, "group-pod");
    match &outcomes["ended"] {
        Err(ProcessError::ProcessTerminal { state, .. }) => {
            assert_eq!(*state, TerminalState::Completed)
        }
        other => panic!("a terminal process is sealed: {other:?}"),
    }
    assert!(
        matches!(outcomes["stale"], Err(ProcessError::LeaseLost { .. })),
        "{:?}",
        outcomes["stale"]
    );
    let replayed = outcomes["replayed"].as_ref().unwrap();
    assert!(replayed[0].replayed);
    assert_eq!(replayed[0].event, stored.event);
    match &outcomes["conflict"] {
        Err(ProcessError::ReplayConflict { replay_key, .. }) => assert_eq!(replay_key, "k1"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        outcomes["missing"],
        Err(ProcessError::NotFound(_))
    ));

    // The logs hold exactly what was acknowledged.
    let log = |id: ProcessId| {
        let registry = registry.clone();
        async move {
            registry
                .events_after(&id, 0, 100)
                .await
                .unwrap()
                .into_iter()
                .map(|e| (e.seq, e.payload["n"].as_i64().unwrap_or(-1)))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(log(plain).await, [(1, 1), (2, 2), (3, 3)]);
    let shared_log = log(shared).await;
    assert_eq!(
        shared_log.iter().map(|e| e.0).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(log(stale).await, []);
    assert_eq!(log(keyed).await, [(1, 1)]);
    assert_eq!(log(ended).await.len(), 1, "only the terminal event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_the_database_refuses_is_split_and_each_caller_answered_alone() {
    let url = migrated_database_url().await;
    let registry = registry(&url);
    let blocker = register(&registry, "blocker").await;
    let good = register(&registry, "good").await;
    let poison = register(&registry, "poison").await;
    // A trigger of the test's own makes any insert of an event of `poison` fail.
    sql_client(&url)
        .await
        .batch_execute(
            "CREATE FUNCTION test_poison() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'poisoned'; END $$;
             CREATE TRIGGER poison BEFORE INSERT ON proclog.events FOR EACH ROW
               WHEN (NEW.process_id = 'poison') EXECUTE FUNCTION test_poison();",
        )
        .await
        .unwrap();
    registry.append_event(&blocker, step(0)).await.unwrap();
    let lock = RowLock::take(&url, &blocker).await;
    let first = spawn_append(&registry, &blocker, vec![step(1)]);
    until("the flusher waits", || async {
        lock_waiters(&url).await == 1
    })
    .await;
    let before = stats(&registry).enqueued.load(Ordering::Relaxed);
    let good_call = spawn_append(&registry, &good, vec![step(1)]);
    let poison_call = spawn_append(&registry, &poison, vec![step(1)]);
    until("both calls are queued", || async {
        stats(&registry).enqueued.load(Ordering::Relaxed) == before + 2
    })
    .await;
    lock.release().await;
    first.await.unwrap().unwrap();
    let good_outcome = good_call.await.unwrap().expect("the good append is stored");
    assert_eq!(good_outcome[0].event.seq, 1);
    match poison_call.await.unwrap() {
        Err(ProcessError::Database(message)) => assert!(message.contains("poisoned"), "{message}"),
        other => panic!("the poisoned append gets its own error: {other:?}"),
    }
    assert_eq!(stats(&registry).split_batches.load(Ordering::Relaxed), 1);
    assert_eq!(registry.events_after(&good, 0, 10).await.unwrap().len(), 1);
    assert!(
        registry
            .events_after(&poison, 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unanswered_batch_is_unavailable_to_each_caller_and_replay_keys_resolve_it() {
    let url = migrated_database_url().await;
    // Calls bounded client-side: past it the batch may still commit (the ambiguous case).
    let registry = registry(&url).with_call_timeout(Duration::from_secs(2));
    let blocker = register(&registry, "blocker").await;
    // `a-...` sorts before `z-held`: the batch appends to it, then waits for the held row.
    let early = register(&registry, "a-early").await;
    let held = register(&registry, "z-held").await;
    registry.append_event(&blocker, step(0)).await.unwrap();
    let first_lock = RowLock::take(&url, &blocker).await;
    let held_lock = RowLock::take(&url, &held).await;
    let first = spawn_append(&registry, &blocker, vec![step(1)]);
    until("the flusher waits", || async {
        lock_waiters(&url).await == 1
    })
    .await;
    let before = stats(&registry).enqueued.load(Ordering::Relaxed);
    let early_call = spawn_append(&registry, &early, vec![step(1).with_replay_key("e1")]);
    let held_call = spawn_append(&registry, &held, vec![step(1).with_replay_key("h1")]);
    until("both calls are queued", || async {
        stats(&registry).enqueued.load(Ordering::Relaxed) == before + 2
    })
    .await;
    first_lock.release().await;
    let _ = first.await.unwrap();
    // The batch appends to `a-early`, then waits for `z-held` past the call bound.
    for call in [early_call, held_call] {
        let outcome = call.await.unwrap();
        assert!(
            matches!(outcome, Err(ProcessError::Unavailable(_))),
            "an unanswered batch is Unavailable to each caller: {outcome:?}"
        );
    }
    // The abandoned statement may now commit on the server, or not: a retry with the same
    // replay key resolves it either way, to exactly one event per caller.
    held_lock.release().await;
    for (id, key) in [(&early, "e1"), (&held, "h1")] {
        let retried = registry
            .append_event(id, step(1).with_replay_key(key))
            .await
            .unwrap();
        assert_eq!(retried.event.seq, 1);
        let log = registry.events_after(id, 0, 10).await.unwrap();
        assert_eq!(log.len(), 1, "{id}: written once");
        assert_eq!(log[0].replay_key.as_deref(), Some(key));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_concurrent_appenders_get_dense_logs_with_group_commit() {
    let url = migrated_database_url().await;
    let registry = registry(&url);
    let mut ids = Vec::new();
    for n in 0..16 {
        ids.push(register(&registry, &format!("p{n}")).await);
    }
    let mut tasks = Vec::new();
    for task in 0..64 {
        let registry = registry.clone();
        let id = ids[task % ids.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for n in 0..20 {
                let outcome = registry.append_event(&id, step(n)).await.unwrap();
                seqs.push(outcome.event.seq);
            }
            seqs
        }));
    }
    for task in tasks {
        let seqs = task.await.unwrap();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "one caller's seqs increase"
        );
    }
    for id in &ids {
        let log = registry.events_after(id, 0, 1000).await.unwrap();
        let seqs: Vec<i64> = log.iter().map(|e| e.seq).collect();
        assert_eq!(
            seqs,
            (1..=80).collect::<Vec<_>>(),
            "{id}: dense, no duplicates"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_append_given_up_before_its_batch_is_sent_is_never_written() {
    let url = migrated_database_url().await;
    let registry = registry(&url);
    let blocker = register(&registry, "blocker").await;
    let abandoned = register(&registry, "abandoned").await;
    registry.append_event(&blocker, step(0)).await.unwrap();
    let lock = RowLock::take(&url, &blocker).await;
    let first = spawn_append(&registry, &blocker, vec![step(1)]);
    until("the flusher waits", || async {
        lock_waiters(&url).await == 1
    })
    .await;
    let before = stats(&registry).enqueued.load(Ordering::Relaxed);
    let given_up = spawn_append(&registry, &abandoned, vec![step(1)]);
    until("the call is queued", || async {
        stats(&registry).enqueued.load(Ordering::Relaxed) == before + 1
    })
    .await;
    given_up.abort();
    assert!(given_up.await.unwrap_err().is_cancelled());
    lock.release().await;
    first.await.unwrap().unwrap();
    // The flusher serves its queue in order: once a later append is answered, the abandoned
    // one has been dealt with.
    registry.append_event(&blocker, step(2)).await.unwrap();
    assert!(
        registry
            .events_after(&abandoned, 0, 10)
            .await
            .unwrap()
            .is_empty(),
        "nothing is written for a caller that gave up before its batch was sent"
    );
}

#[test]
fn the_flushers_start_again_when_the_runtime_that_ran_them_is_gone() {
    let first = tokio::runtime::Runtime::new().unwrap();
    let (url, registry, id) = first.block_on(async {
        let url = migrated_database_url().await;
        let registry = registry(&url);
        let id = register(&registry, "across-runtimes").await;
        registry.append_event(&id, step(1)).await.unwrap();
        (url, registry, id)
    });
    drop(first);
    let second = tokio::runtime::Runtime::new().unwrap();
    second.block_on(async {
        // The first runtime's pooled connections are gone with it too: a fresh pool's
        // registry shares nothing; this one must recover on its own.
        let outcome = registry.append_event(&id, step(2)).await;
        let outcome = match outcome {
            // A connection of the dead runtime may fail once; the next call is clean.
            Err(ProcessError::Unavailable(_)) => registry.append_event(&id, step(2)).await,
            other => other,
        };
        assert_eq!(outcome.unwrap().event.seq, 2);
        drop(url);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_without_replay_keys_answers_each_caller_with_its_own_outcome() {
    // No replay key in the batch: it goes out as the set-based statement.
    let url = migrated_database_url().await;
    let registry = registry(&url);
    let blocker = register(&registry, "blocker").await;
    let plain = register(&registry, "plain").await;
    let shared = register(&registry, "shared").await;
    let ended = register(&registry, "ended").await;
    registry
        .complete_process(&ended, Completion::new(TerminalState::Failed, json!({})))
        .await
        .unwrap();
    let fenced = register(&registry, "fenced").await;
    let lease = match registry
        .claim(&fenced, "someone", Duration::from_secs(60))
        .await
        .unwrap()
    {
        ClaimOutcome::Acquired(lease) => lease,
        busy => panic!("{busy:?}"),
    };
    registry
        .append_event(&fenced, step(0).fenced(&lease))
        .await
        .unwrap();
    let stale = register(&registry, "stale").await;
    let stale_lease = match registry
        .claim(&stale, "old-owner", Duration::from_secs(60))
        .await
        .unwrap()
    {
        ClaimOutcome::Acquired(lease) => lease,
        busy => panic!("{busy:?}"),
    };
    registry.release(&stale_lease).await.unwrap();
    let missing = ProcessId::new("missing").unwrap();

    registry.append_event(&blocker, step(0)).await.unwrap();
    let lock = RowLock::take(&url, &blocker).await;
    let first = spawn_append(&registry, &blocker, vec![step(1)]);
    until("the flusher waits for the row lock", || async {
        lock_waiters(&url).await == 1
    })
    .await;
    let before = stats(&registry).enqueued.load(Ordering::Relaxed);
    let calls = vec![
        (
            "plain",
            spawn_append(&registry, &plain, vec![step(1), step(2), step(3)]),
        ),
        (
            "shared a",
            spawn_append(&registry, &shared, vec![step(1), step(2)]),
        ),
        ("shared b", spawn_append(&registry, &shared, vec![step(3)])),
        ("ended", spawn_append(&registry, &ended, vec![step(1)])),
        (
            "fenced",
            spawn_append(
                &registry,
                &fenced,
                vec![step(1).fenced(&lease), step(2).fenced(&lease)],
            ),
        ),
        (
            "stale",
            spawn_append(&registry, &stale, vec![step(1).fenced(&stale_lease)]),
        ),
        ("missing", spawn_append(&registry, &missing, vec![step(1)])),
        (
            "blocked again",
            spawn_append(&registry, &blocker, vec![step(2)]),
        ),
    ];
    let queued = calls.len() as u64;
    until("every call is queued", || async {
        stats(&registry).enqueued.load(Ordering::Relaxed) == before + queued
    })
    .await;
    lock.release().await;
    first.await.unwrap().unwrap();
    let mut outcomes = std::collections::HashMap::new();
    for (name, call) in calls {
        outcomes.insert(name, call.await.unwrap());
    }
    assert_eq!(
        stats(&registry).largest_batch.load(Ordering::Relaxed),
        queued
    );
    let seqs = |name: &str| -> Vec<i64> {
        match &outcomes[name] {
            Ok(events) => events.iter().map(|o| o.event.seq).collect(),
            Err(err) => panic!("{name}: {err:?}"),
        }
    };
    assert_eq!(seqs("plain"), [1, 2, 3]);
    let (a, b) = (seqs("shared a"), seqs("shared b"));
    assert!(
        a == [1, 2] && b == [3] || b == [1] && a == [2, 3],
        "{a:?} {b:?}"
    );
    assert_eq!(seqs("fenced"), [2, 3]);
    assert_eq!(seqs("blocked again"), [3]);
    let fenced_events = outcomes["fenced"].as_ref().unwrap();
    assert!(
        fenced_events
            .iter()
            .all(|o| o.event.lease_generation == Some(lease.generation))
    );
    assert!(
        fenced_events
            .iter()
            .all(|o| !o.replayed && o.event.writer == "group-pod")
    );
    let plain_events = outcomes["plain"].as_ref().unwrap();
    assert_eq!(plain_events[0].event.lease_generation, None);
    assert_eq!(plain_events[2].event.payload, json!({"n": 3}));
    match &outcomes["ended"] {
        Err(ProcessError::ProcessTerminal { state, .. }) => {
            assert_eq!(*state, TerminalState::Failed)
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        outcomes["stale"],
        Err(ProcessError::LeaseLost { .. })
    ));
    assert!(matches!(
        outcomes["missing"],
        Err(ProcessError::NotFound(_))
    ));
    // What each caller was told is what the logs hold.
    for (id, expected) in [
        (&plain, 3),
        (&shared, 3),
        (&fenced, 3),
        (&blocker, 3),
        (&stale, 0),
    ] {
        let log = registry.events_after(id, 0, 100).await.unwrap();
        let seqs: Vec<i64> = log.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=expected).collect::<Vec<_>>(), "{id}");
    }
    let stored = registry.events_after(&fenced, 1, 100).await.unwrap();
    assert_eq!(stored[0], fenced_events[0].event);
    let record = registry.get_process(&plain).await.unwrap().unwrap();
    assert_eq!(record.last_seq, 3);
    assert_eq!(record.status, proclog::ProcessStatus::Running);
}
