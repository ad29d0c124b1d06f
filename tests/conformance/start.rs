//! CONTRACT §10 (start policies): de-duplication within a window, singleton per key,
//! debounce, decided one start at a time per key; the answer says which happened.

use std::time::Duration;

use proclog::{
    Completion, ProcessError, ProcessId, ProcessRegistration, ProcessStatus, StartDecision,
    StartPolicy, TerminalState,
};
use serde_json::json;

use crate::common::Store;
use crate::durable::wait_until;

fn dedup(key: &str, window_ms: u64) -> StartPolicy {
    StartPolicy::Deduplicate {
        key: key.into(),
        window_ms,
    }
}

fn singleton(key: &str, refuse: bool) -> StartPolicy {
    StartPolicy::Singleton {
        key: key.into(),
        refuse,
    }
}

fn debounce(key: &str, window_ms: u64) -> StartPolicy {
    StartPolicy::Debounce {
        key: key.into(),
        window_ms,
    }
}

fn start(kind: &str, input: serde_json::Value, policy: StartPolicy) -> ProcessRegistration {
    ProcessRegistration::new(kind, input).with_start_policy(policy)
}

pub async fn deduplication_answers_the_first_start_within_its_window(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let first = registry
        .start_process(start("hook", json!(1), dedup("delivery-7", 60_000)))
        .await
        .unwrap();
    assert_eq!(first.decision, StartDecision::Created);
    let second = registry
        .start_process(start("hook", json!(2), dedup("delivery-7", 60_000)))
        .await
        .unwrap();
    assert_eq!(second.decision, StartDecision::Deduplicated);
    assert_eq!(second.process.id, first.process.id);
    assert_eq!(second.process.input, json!(1), "the first start's process");
    // Keys belong to a kind.
    let other_kind = registry
        .start_process(start("mail", json!(2), dedup("delivery-7", 60_000)))
        .await
        .unwrap();
    assert_eq!(other_kind.decision, StartDecision::Created);
    // Whatever the first start's process did since, the window decides.
    registry
        .complete_process(
            &first.process.id,
            Completion::new(TerminalState::Completed, json!(null)),
        )
        .await
        .unwrap();
    let third = registry
        .start_process(start("hook", json!(3), dedup("delivery-7", 60_000)))
        .await
        .unwrap();
    assert_eq!(
        (third.decision, &third.process.id),
        (StartDecision::Deduplicated, &first.process.id)
    );
    // After the window a start is new again; a retried start (same id) is that process.
    let short = registry
        .start_process(start("hook", json!(1), dedup("delivery-8", 200)))
        .await
        .unwrap();
    wait_until(
        store,
        short.process.created_at + chrono::TimeDelta::milliseconds(250),
    )
    .await;
    let id = ProcessId::new("after-the-window").unwrap();
    let later = registry
        .start_process(start("hook", json!(4), dedup("delivery-8", 200)).with_id(id.clone()))
        .await
        .unwrap();
    assert_eq!(
        (later.decision, &later.process.id),
        (StartDecision::Created, &id)
    );
    let retried = registry
        .start_process(start("hook", json!(4), dedup("delivery-8", 200)).with_id(id.clone()))
        .await
        .unwrap();
    assert_eq!(
        (retried.decision, &retried.process.id),
        (StartDecision::Existing, &id)
    );
    let clash = registry
        .start_process(start("hook", json!(5), dedup("delivery-9", 200)).with_id(id.clone()))
        .await;
    assert!(
        matches!(clash, Err(ProcessError::Conflict { .. })),
        "{clash:?}"
    );
}

pub async fn a_singleton_key_has_one_process_that_has_not_ended(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let first = registry
        .start_process(start("sync", json!("a"), singleton("tenant-1", false)))
        .await
        .unwrap();
    assert_eq!(first.decision, StartDecision::Created);
    let second = registry
        .start_process(start("sync", json!("b"), singleton("tenant-1", false)))
        .await
        .unwrap();
    assert_eq!(
        (second.decision, &second.process.id),
        (StartDecision::Running, &first.process.id)
    );
    let refused = registry
        .start_process(start("sync", json!("c"), singleton("tenant-1", true)))
        .await;
    match refused {
        Err(ProcessError::StartRefused { key, existing }) => {
            assert_eq!((key.as_str(), &existing), ("tenant-1", &first.process.id));
        }
        other => panic!("expected StartRefused, got {other:?}"),
    }
    registry
        .complete_process(
            &first.process.id,
            Completion::new(TerminalState::Failed, json!(null)),
        )
        .await
        .unwrap();
    let next = registry
        .start_process(start("sync", json!("d"), singleton("tenant-1", true)))
        .await
        .unwrap();
    assert_eq!(next.decision, StartDecision::Created);
    assert_ne!(next.process.id, first.process.id);

    // Starts of a new key racing from several pods make exactly one process.
    let mut racers = Vec::new();
    for n in 0..12 {
        let registry = store.pod(&format!("pod-{n}")).await;
        racers.push(tokio::spawn(async move {
            registry
                .start_process(start("sync", json!(n), singleton("tenant-2", false)))
                .await
                .unwrap()
        }));
    }
    let mut created = Vec::new();
    let mut ids = std::collections::HashSet::new();
    for racer in racers {
        let started = racer.await.unwrap();
        ids.insert(started.process.id.clone());
        if started.decision == StartDecision::Created {
            created.push(started.process.id);
        } else {
            assert_eq!(started.decision, StartDecision::Running);
        }
    }
    assert_eq!(created.len(), 1, "one start made the process");
    assert_eq!(ids.len(), 1, "every start answered it");
}

pub async fn debounce_keeps_the_last_start_of_a_burst(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let first = registry
        .start_process(
            start("reindex", json!(1), debounce("doc-9", 60_000)).timeout(Duration::from_secs(600)),
        )
        .await
        .unwrap();
    let budget = first.process.deadline.unwrap() - first.process.wake_at.unwrap();
    assert_eq!(first.decision, StartDecision::Created);
    let first_wake = first.process.wake_at.expect("a debounced start waits");
    assert!(first_wake >= first.process.created_at + chrono::TimeDelta::seconds(59));
    for n in 2..=4 {
        let again = registry
            .start_process(start("reindex", json!(n), debounce("doc-9", 60_000)))
            .await
            .unwrap();
        assert_eq!(
            (again.decision, &again.process.id),
            (StartDecision::Debounced, &first.process.id)
        );
        assert_eq!(again.process.input, json!(n), "the last start's input");
        assert!(again.process.wake_at.unwrap() >= first_wake);
        assert_eq!(
            again.process.deadline.unwrap() - again.process.wake_at.unwrap(),
            budget,
            "the deadline moves with the start"
        );
    }
    let record = registry
        .get_process(&first.process.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.input, json!(4));
    assert_eq!(record.status, ProcessStatus::Pending);

    // Once its process has started, a start of the key makes a new one.
    let short = registry
        .start_process(start("reindex", json!("x"), debounce("doc-10", 100)))
        .await
        .unwrap();
    wait_until(store, short.process.wake_at.unwrap()).await;
    let claims = registry
        .claim_runnable("pod-a", Duration::from_secs(60), 100)
        .await
        .unwrap();
    assert!(
        claims
            .iter()
            .any(|claim| claim.process.id == short.process.id)
    );
    let next = registry
        .start_process(start("reindex", json!("y"), debounce("doc-10", 100)))
        .await
        .unwrap();
    assert_eq!(next.decision, StartDecision::Created);
    assert_ne!(next.process.id, short.process.id);
    assert_eq!(
        registry
            .get_process(&short.process.id)
            .await
            .unwrap()
            .unwrap()
            .input,
        json!("x"),
        "a process that started keeps its input"
    );
}

pub async fn bad_start_policies_are_refused_and_write_nothing(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let id = ProcessId::new("never-started").unwrap();
    for policy in [
        dedup("", 1_000),
        dedup("k", 0),
        dedup("k", 31 * 24 * 3_600_000),
        singleton("bad\u{0}key", false),
        singleton(&"k".repeat(257), false),
        debounce("k", 0),
    ] {
        let refused = registry
            .start_process(start("k", json!(null), policy.clone()).with_id(id.clone()))
            .await;
        assert!(
            matches!(refused, Err(ProcessError::InvalidInput(_))),
            "{policy:?}: {refused:?}"
        );
    }
    assert!(registry.get_process(&id).await.unwrap().is_none());
    // Without a policy the answer still says what happened.
    let plain = registry
        .start_process(ProcessRegistration::new("k", json!(null)).with_id(id.clone()))
        .await
        .unwrap();
    assert_eq!(plain.decision, StartDecision::Created);
    let again = registry
        .start_process(ProcessRegistration::new("k", json!(null)).with_id(id.clone()))
        .await
        .unwrap();
    assert_eq!(again.decision, StartDecision::Existing);
}
