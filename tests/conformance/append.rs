//! CONTRACT §2: appends, replay keys, sealing, `events_after`, fencing of appends.

use proclog::{
    AppendRequest, Completion, ProcessError, ProcessId, ProcessStatus, RegistryConfig,
    TerminalState,
};
use serde_json::json;

use crate::common::Store;
use crate::support::{assert_dense, claim, event, expired_lease, log, new_process};

pub async fn appends_get_dense_seqs_from_one(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let process = new_process(&*registry).await;
    for n in 1..=20 {
        let outcome = registry
            .append_event(&process.id, event("step", json!({"n": n})))
            .await
            .unwrap();
        assert_eq!(outcome.event.seq, n);
        assert!(!outcome.replayed);
        assert_eq!(outcome.event.writer, "pod-a");
        assert_eq!(outcome.event.lease_generation, None);
        assert_eq!(outcome.event.process_id, process.id);
    }
    let events = log(&*registry, &process.id).await;
    assert_dense(&events);
    assert_eq!(events.len(), 20);
    assert_eq!(events[4].payload, json!({"n": 5}));
    assert_eq!(events[4].event_type, "step");
    assert!(
        events
            .windows(2)
            .all(|w| w[0].occurred_at <= w[1].occurred_at)
    );
    let record = registry.get_process(&process.id).await.unwrap().unwrap();
    assert_eq!(record.last_seq, 20);
}

pub async fn append_to_unknown_process_is_not_found(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let missing = ProcessId::new("missing").unwrap();
    let single = registry
        .append_event(&missing, event("step", json!(1)))
        .await;
    assert!(
        matches!(single, Err(ProcessError::NotFound(ref id)) if *id == missing),
        "{single:?}"
    );
    let keyed = registry
        .append_event(&missing, event("step", json!(1)).with_replay_key("k"))
        .await;
    assert!(matches!(keyed, Err(ProcessError::NotFound(_))), "{keyed:?}");
    let batch = registry
        .append_events(&missing, vec![event("a", json!(1)), event("b", json!(2))])
        .await;
    assert!(matches!(batch, Err(ProcessError::NotFound(_))), "{batch:?}");
    assert_eq!(registry.get_process(&missing).await.unwrap(), None);
}

pub async fn reserved_and_malformed_event_types_are_refused(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let process = new_process(&*registry).await;
    let too_long = "t".repeat(129);
    for bad in [
        "process.started",
        "process.completed",
        "",
        "tab\there",
        "nul\0",
        &too_long,
    ] {
        let result = registry
            .append_event(&process.id, event(bad, json!(1)))
            .await;
        assert!(
            matches!(result, Err(ProcessError::InvalidInput(_))),
            "type {bad:?}: {result:?}"
        );
    }
    for bad_key in ["", "line\nbreak"] {
        let result = registry
            .append_event(&process.id, event("ok", json!(1)).with_replay_key(bad_key))
            .await;
        assert!(
            matches!(result, Err(ProcessError::InvalidInput(_))),
            "{result:?}"
        );
    }
    assert!(log(&*registry, &process.id).await.is_empty());
    // Printable non-ASCII and 128 characters are fine; so is "process" without the dot.
    for good in ["étape ✓", &"t".repeat(128), "processing"] {
        registry
            .append_event(&process.id, event(good, json!(1)))
            .await
            .unwrap();
    }
}

pub async fn oversized_payloads_are_refused_and_the_limit_is_inclusive(store: &dyn Store) {
    let registry = store
        .pod_with(RegistryConfig::new("pod-a").with_max_payload_bytes(100))
        .await;
    let process = new_process(&*registry).await;
    // A JSON string of n characters serializes to n + 2 bytes.
    let at_limit = json!("x".repeat(98));
    let over = json!("x".repeat(99));
    let result = registry
        .append_event(&process.id, event("big", over.clone()))
        .await;
    match result {
        Err(ProcessError::PayloadTooLarge { size, limit }) => {
            assert_eq!((size, limit), (101, 100));
        }
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    let in_batch = registry
        .append_events(&process.id, vec![event("ok", json!(1)), event("big", over)])
        .await;
    assert!(
        matches!(in_batch, Err(ProcessError::PayloadTooLarge { .. })),
        "{in_batch:?}"
    );
    assert!(
        log(&*registry, &process.id).await.is_empty(),
        "nothing written"
    );
    let stored = registry
        .append_event(&process.id, event("fits", at_limit.clone()))
        .await;
    assert_eq!(stored.unwrap().event.payload, at_limit);
}

pub async fn batches_are_consecutive_and_all_or_nothing(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let process = new_process(&*registry).await;
    registry
        .append_event(&process.id, event("first", json!(0)))
        .await
        .unwrap();
    let batch: Vec<AppendRequest> = (1..=10)
        .map(|n| event("batched", json!({"n": n})))
        .collect();
    let outcomes = registry.append_events(&process.id, batch).await.unwrap();
    let seqs: Vec<i64> = outcomes.iter().map(|o| o.event.seq).collect();
    assert_eq!(seqs, (2..=11).collect::<Vec<_>>());
    assert_eq!(outcomes[9].event.payload, json!({"n": 10}));
    assert!(outcomes.iter().all(|o| !o.replayed));

    // One bad request refuses the whole batch.
    let mixed = vec![event("ok", json!(1)), event("process.fake", json!(2))];
    assert!(matches!(
        registry.append_events(&process.id, mixed).await,
        Err(ProcessError::InvalidInput(_))
    ));
    let events = log(&*registry, &process.id).await;
    assert_eq!(events.len(), 11);
    assert_dense(&events);
}

pub async fn malformed_batches_are_refused(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let process = new_process(&*registry).await;
    let lease = claim(&*registry, &process.id, "owner").await;
    let empty = registry.append_events(&process.id, vec![]).await;
    assert!(
        matches!(empty, Err(ProcessError::InvalidInput(_))),
        "{empty:?}"
    );
    let repeated_key = vec![
        event("a", json!(1)).with_replay_key("same"),
        event("b", json!(2)).with_replay_key("same"),
    ];
    let repeated = registry.append_events(&process.id, repeated_key).await;
    assert!(
        matches!(repeated, Err(ProcessError::InvalidInput(_))),
        "{repeated:?}"
    );
    let mixed_fences = vec![event("a", json!(1)).fenced(&lease), event("b", json!(2))];
    let mixed = registry.append_events(&process.id, mixed_fences).await;
    assert!(
        matches!(mixed, Err(ProcessError::InvalidInput(_))),
        "{mixed:?}"
    );
    let too_many: Vec<AppendRequest> = (0..10_001).map(|_| event("x", json!(null))).collect();
    let huge = registry.append_events(&process.id, too_many).await;
    assert!(
        matches!(huge, Err(ProcessError::InvalidInput(_))),
        "{huge:?}"
    );
    assert!(log(&*registry, &process.id).await.is_empty());
}

pub async fn first_append_marks_a_pending_process_running(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let process = new_process(&*registry).await;
    assert_eq!(process.status, ProcessStatus::Pending);
    registry
        .append_event(&process.id, event("step", json!(1)))
        .await
        .unwrap();
    let record = registry.get_process(&process.id).await.unwrap().unwrap();
    assert_eq!(record.status, ProcessStatus::Running);
    assert!(record.updated_at >= process.updated_at);
}

pub async fn replay_returns_the_stored_event_once(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let retrying_pod = store.pod("pod-b").await;
    let process = new_process(&*registry).await;
    registry
        .append_event(&process.id, event("before", json!(0)))
        .await
        .unwrap();
    let request = event("charge", json!({"amount": 5})).with_replay_key("charge-1");
    let first = registry
        .append_event(&process.id, request.clone())
        .await
        .unwrap();
    assert!(!first.replayed);
    assert_eq!(first.event.replay_key.as_deref(), Some("charge-1"));
    // The client lost the answer and retries, possibly through another pod.
    let retry = retrying_pod
        .append_event(&process.id, request.clone())
        .await
        .unwrap();
    assert!(retry.replayed);
    assert_eq!(
        retry.event, first.event,
        "the stored event, same seq, original writer"
    );
    let again = registry.append_event(&process.id, request).await.unwrap();
    assert_eq!(again.event.seq, 2);
    let events = log(&*registry, &process.id).await;
    assert_eq!(events.len(), 2, "exactly one event for the key");
    // The key is per process: another process may use it.
    let other = new_process(&*registry).await;
    let elsewhere = registry
        .append_event(
            &other.id,
            event("charge", json!({"amount": 5})).with_replay_key("charge-1"),
        )
        .await
        .unwrap();
    assert!(!elsewhere.replayed);
    assert_eq!(elsewhere.event.seq, 1);
}

pub async fn replay_with_other_content_conflicts(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let process = new_process(&*registry).await;
    registry
        .append_event(
            &process.id,
            event("charge", json!({"amount": 5})).with_replay_key("k1"),
        )
        .await
        .unwrap();
    for changed in [
        event("charge", json!({"amount": 6})).with_replay_key("k1"),
        event("refund", json!({"amount": 5})).with_replay_key("k1"),
    ] {
        match registry.append_event(&process.id, changed).await {
            Err(ProcessError::ReplayConflict { id, replay_key }) => {
                assert_eq!((id, replay_key.as_str()), (process.id.clone(), "k1"));
            }
            other => panic!("expected ReplayConflict, got {other:?}"),
        }
    }
    assert_eq!(log(&*registry, &process.id).await.len(), 1);
}

pub async fn replay_after_terminal_still_returns_the_stored_event(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let process = new_process(&*registry).await;
    let request = event("last-step", json!({"done": true})).with_replay_key("final");
    let stored = registry
        .append_event(&process.id, request.clone())
        .await
        .unwrap();
    registry
        .complete_process(
            &process.id,
            Completion::new(TerminalState::Completed, json!(null)),
        )
        .await
        .unwrap();
    let retry = registry.append_event(&process.id, request).await.unwrap();
    assert!(retry.replayed);
    assert_eq!(retry.event, stored.event);
    // A new key on the terminal process is refused.
    let fresh = registry
        .append_event(&process.id, event("late", json!(1)).with_replay_key("new"))
        .await;
    assert!(
        matches!(fresh, Err(ProcessError::ProcessTerminal { .. })),
        "{fresh:?}"
    );
}

pub async fn batch_replay_is_whole_or_conflict(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let process = new_process(&*registry).await;
    let batch = vec![
        event("a", json!(1)).with_replay_key("b-1"),
        event("b", json!(2)).with_replay_key("b-2"),
        event("c", json!(3)).with_replay_key("b-3"),
    ];
    let first = registry
        .append_events(&process.id, batch.clone())
        .await
        .unwrap();
    let retry = registry
        .append_events(&process.id, batch.clone())
        .await
        .unwrap();
    assert!(retry.iter().all(|o| o.replayed));
    let stored: Vec<_> = first.iter().map(|o| o.event.clone()).collect();
    let replayed: Vec<_> = retry.iter().map(|o| o.event.clone()).collect();
    assert_eq!(stored, replayed);
    // A single request of the batch retried alone is also a replay.
    let single = registry
        .append_event(&process.id, batch[1].clone())
        .await
        .unwrap();
    assert!(single.replayed && single.event.seq == 2);
    // A batch mixing a stored key with a new event is a conflict, and writes nothing.
    let partial = vec![
        batch[0].clone(),
        event("d", json!(4)).with_replay_key("b-4"),
    ];
    let result = registry.append_events(&process.id, partial).await;
    assert!(
        matches!(result, Err(ProcessError::ReplayConflict { .. })),
        "{result:?}"
    );
    let unkeyed_mix = vec![batch[0].clone(), event("e", json!(5))];
    let result = registry.append_events(&process.id, unkeyed_mix).await;
    assert!(
        matches!(result, Err(ProcessError::ReplayConflict { .. })),
        "{result:?}"
    );
    assert_eq!(log(&*registry, &process.id).await.len(), 3);
}

pub async fn terminal_process_is_sealed(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let process = new_process(&*registry).await;
    registry
        .append_event(&process.id, event("step", json!(1)))
        .await
        .unwrap();
    registry
        .complete_process(
            &process.id,
            Completion::new(TerminalState::Failed, json!({"e": 1})),
        )
        .await
        .unwrap();
    let single = registry
        .append_event(&process.id, event("late", json!(1)))
        .await;
    assert!(
        matches!(
            single,
            Err(ProcessError::ProcessTerminal {
                state: TerminalState::Failed,
                ..
            })
        ),
        "{single:?}"
    );
    let batch = registry
        .append_events(
            &process.id,
            vec![event("late", json!(1)), event("later", json!(2))],
        )
        .await;
    assert!(
        matches!(batch, Err(ProcessError::ProcessTerminal { .. })),
        "{batch:?}"
    );
    let events = log(&*registry, &process.id).await;
    assert_eq!(events.len(), 2);
    assert_eq!(events.last().unwrap().event_type, "process.failed");
}

pub async fn events_after_pages_in_order(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let process = new_process(&*registry).await;
    assert!(
        registry
            .events_after(&process.id, 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let batch = (1..=25).map(|n| event("e", json!(n))).collect();
    registry.append_events(&process.id, batch).await.unwrap();
    let page = registry.events_after(&process.id, 10, 5).await.unwrap();
    assert_eq!(
        page.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![11, 12, 13, 14, 15]
    );
    let tail = registry.events_after(&process.id, 20, 100).await.unwrap();
    assert_eq!(
        tail.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (21..=25).collect::<Vec<_>>()
    );
    assert!(
        registry
            .events_after(&process.id, 25, 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        registry
            .events_after(&process.id, 1000, 100)
            .await
            .unwrap()
            .is_empty()
    );
}

/// Pages are bounded in bytes as well as rows: a page takes events while the payloads before
/// them add up to less than the budget (so it exceeds it by at most one event, and holds at
/// least one), and reading on from its last seq yields the whole log, in order, once.
/// Listing is held to the same budget with its cursor.
pub async fn pages_are_bounded_in_bytes(store: &dyn Store) {
    let budget = 1000;
    let registry = store
        .pod_with(RegistryConfig::new("pod-a").with_max_page_bytes(budget))
        .await;
    let process = new_process(&*registry).await;
    let payload = |n: usize| json!(format!("{n:03}{}", "x".repeat(397)));
    let batch = (1..=10).map(|n| event("e", payload(n))).collect();
    registry.append_events(&process.id, batch).await.unwrap();
    let big = json!("y".repeat(3000));
    registry
        .append_event(&process.id, event("big", big.clone()))
        .await
        .unwrap();
    let size = |e: &proclog::ProcessEvent| serde_json::to_vec(&e.payload).unwrap().len();
    let mut after = 0;
    let mut seen = Vec::new();
    loop {
        let page = registry
            .events_after(&process.id, after, 10_000)
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        let before_last: usize = page[..page.len() - 1].iter().map(size).sum();
        assert!(
            before_last < budget,
            "a page stops at the budget: {before_last}"
        );
        assert!(page.len() < 10, "cut by bytes, not rows: {}", page.len());
        after = last.seq;
        seen.extend(page.iter().map(|e| e.seq));
    }
    assert_eq!(seen, (1..=11).collect::<Vec<_>>());
    // An event over the budget comes alone.
    let alone = registry
        .events_after(&process.id, 10, 10_000)
        .await
        .unwrap();
    assert_eq!(alone.len(), 1);
    assert_eq!(alone[0].payload, big);

    for n in 0..6 {
        registry
            .register_process(
                proclog::ProcessRegistration::new("paged", payload(n))
                    .with_id(ProcessId::new(format!("paged-{n}")).unwrap()),
            )
            .await
            .unwrap();
    }
    let filter = |after| proclog::ProcessFilter {
        kind: Some("paged".into()),
        after,
        limit: Some(1000),
        ..proclog::ProcessFilter::default()
    };
    let mut listed = Vec::new();
    let mut cursor = None;
    loop {
        let page = registry.list_processes(filter(cursor)).await.unwrap();
        assert!(!page.processes.is_empty());
        assert!(
            page.processes.len() < 6,
            "cut by bytes: {}",
            page.processes.len()
        );
        listed.extend(page.processes.iter().map(|p| p.id.to_string()));
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(
        listed,
        (0..6).map(|n| format!("paged-{n}")).collect::<Vec<_>>()
    );
}

pub async fn events_after_refuses_unknown_process_and_bad_bounds(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let missing = ProcessId::new("missing").unwrap();
    let result = registry.events_after(&missing, 0, 10).await;
    assert!(
        matches!(result, Err(ProcessError::NotFound(_))),
        "{result:?}"
    );
    let process = new_process(&*registry).await;
    for (after, limit) in [(-1, 10), (0, 0), (0, 10_001)] {
        let result = registry.events_after(&process.id, after, limit).await;
        assert!(
            matches!(result, Err(ProcessError::InvalidInput(_))),
            "after {after}, limit {limit}: {result:?}"
        );
    }
}

pub async fn fenced_appends_record_the_generation(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let process = new_process(&*registry).await;
    let lease = claim(&*registry, &process.id, "pod-a").await;
    assert_eq!(lease.generation, 1);
    let outcome = registry
        .append_event(&process.id, event("step", json!(1)).fenced(&lease))
        .await
        .unwrap();
    assert_eq!(outcome.event.lease_generation, Some(1));
    let batch = vec![
        event("a", json!(1)).fenced(&lease),
        event("b", json!(2)).fenced(&lease),
    ];
    let outcomes = registry.append_events(&process.id, batch).await.unwrap();
    assert!(outcomes.iter().all(|o| o.event.lease_generation == Some(1)));
    // Unfenced appends (e.g. from an API client) are still accepted while a lease is held.
    let unfenced = registry
        .append_event(&process.id, event("note", json!(1)))
        .await
        .unwrap();
    assert_eq!(unfenced.event.lease_generation, None);
}

pub async fn stale_and_expired_leases_cannot_append(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let process = new_process(&*registry).await;
    let expired = expired_lease(store, &*registry, &process.id).await;
    let result = registry
        .append_event(&process.id, event("zombie", json!(1)).fenced(&expired))
        .await;
    assert!(
        matches!(result, Err(ProcessError::LeaseLost { .. })),
        "expired: {result:?}"
    );

    // Another owner takes over: the old lease is superseded for good.
    let current = claim(&*registry, &process.id, "pod-b").await;
    assert!(current.generation > expired.generation);
    for stale in [&expired] {
        let single = registry
            .append_event(&process.id, event("zombie", json!(2)).fenced(stale))
            .await;
        assert!(
            matches!(single, Err(ProcessError::LeaseLost { .. })),
            "{single:?}"
        );
        let keyed = registry
            .append_event(
                &process.id,
                event("zombie", json!(3)).fenced(stale).with_replay_key("z"),
            )
            .await;
        assert!(
            matches!(keyed, Err(ProcessError::LeaseLost { .. })),
            "{keyed:?}"
        );
        let batch = registry
            .append_events(
                &process.id,
                vec![
                    event("z", json!(1)).fenced(stale),
                    event("z", json!(2)).fenced(stale),
                ],
            )
            .await;
        assert!(
            matches!(batch, Err(ProcessError::LeaseLost { .. })),
            "{batch:?}"
        );
    }
    assert!(
        log(&*registry, &process.id).await.is_empty(),
        "no zombie write landed"
    );
    registry
        .append_event(&process.id, event("live", json!(1)).fenced(&current))
        .await
        .expect("the current lease writes");
    // A released lease is lost too.
    registry.release(&current).await.unwrap();
    let released = registry
        .append_event(
            &process.id,
            event("after-release", json!(1)).fenced(&current),
        )
        .await;
    assert!(
        matches!(released, Err(ProcessError::LeaseLost { .. })),
        "{released:?}"
    );
    assert_eq!(log(&*registry, &process.id).await.len(), 1);
}

pub async fn payloads_that_postgres_cannot_store_are_invalid(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let process = new_process(&*registry).await;
    for payload in [
        json!("nul\u{0}inside"),
        json!({"nested": ["ok", {"k": "\u{0}"}]}),
        json!({"key\u{0}": 1}),
    ] {
        let result = registry
            .append_event(&process.id, event("x", payload.clone()))
            .await;
        assert!(
            matches!(result, Err(ProcessError::InvalidInput(_))),
            "{payload}: {result:?}"
        );
    }
    let result = registry
        .register_process(proclog::ProcessRegistration::new("demo", json!("\u{0}")))
        .await;
    assert!(
        matches!(result, Err(ProcessError::InvalidInput(_))),
        "{result:?}"
    );
    let result = registry
        .complete_process(
            &process.id,
            Completion::new(TerminalState::Completed, json!("\u{0}")),
        )
        .await;
    assert!(
        matches!(result, Err(ProcessError::InvalidInput(_))),
        "{result:?}"
    );
    assert!(log(&*registry, &process.id).await.is_empty());
    // A literal backslash followed by "u0000" is ordinary text.
    let fine = json!("\\u0000 is just text");
    let stored = registry
        .append_event(&process.id, event("x", fine.clone()))
        .await
        .unwrap();
    assert_eq!(log(&*registry, &process.id).await[0].payload, fine);
    assert_eq!(stored.event.payload, fine);
}

/// A process's row records its first cancellation request, whichever path appends it (with
/// or without a replay key); later requests change nothing. (Its first start is recorded the
/// same way: `tests/pod_worker.rs` shows it for runs.)
pub async fn the_row_records_the_first_cancel_request(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let process = new_process(&*registry).await;
    assert_eq!(process.started_at, None);
    assert_eq!(process.cancel_request, None);
    // Owned by a live lease: the canceller appends its request and leaves it to the owner.
    claim(&*registry, &process.id, "owner").await;
    for (reason, key) in [("first", None), ("second", Some("k2")), ("third", None)] {
        proclog::pod::cancel_process(&*registry, &process.id, "pod-a", json!(reason), key)
            .await
            .unwrap();
    }
    let record = registry.get_process(&process.id).await.unwrap().unwrap();
    assert_eq!(
        record.cancel_request,
        Some(json!({"reason": "first", "by": "pod-a"}))
    );
    assert!(record.terminal.is_none(), "the owner acts on it");
    let listed = registry
        .list_processes(proclog::ProcessFilter::default())
        .await
        .unwrap();
    assert_eq!(listed.processes[0].cancel_request, record.cancel_request);
}
