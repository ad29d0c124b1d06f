//! CONTRACT §2: completion and the terminal column.

use proclog::{Completion, ProcessError, ProcessId, ProcessStatus, RegistryConfig, TerminalState};
use serde_json::json;

use crate::common::Store;
use crate::support::{assert_dense, claim, event, expired_lease, log, new_process};

pub async fn completion_appends_the_terminal_event_last_and_fills_the_column(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let process = new_process(&*registry).await;
    registry
        .append_events(
            &process.id,
            vec![event("a", json!(1)), event("b", json!(2))],
        )
        .await
        .unwrap();
    let output = json!({"summary": "done", "steps": 2});
    let record = registry
        .complete_process(
            &process.id,
            Completion::new(TerminalState::Completed, output.clone()),
        )
        .await
        .unwrap();
    assert_eq!(record.status, ProcessStatus::Completed);
    assert_eq!(record.last_seq, 3);
    let terminal = record.terminal.clone().expect("terminal column is set");
    assert_eq!(terminal.state, TerminalState::Completed);
    assert_eq!(terminal.seq, 3);
    assert_eq!(terminal.output, output);
    assert!(terminal.completed_at >= record.created_at);
    let events = log(&*registry, &process.id).await;
    assert_dense(&events);
    let last = events.last().unwrap();
    assert_eq!(last.event_type, "process.completed");
    assert_eq!(last.payload, output);
    assert_eq!(last.writer, "pod-a");
    assert!(last.is_terminal());
    assert_eq!(
        registry.get_process(&process.id).await.unwrap(),
        Some(record)
    );
}

pub async fn every_terminal_state_is_reachable(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    for state in TerminalState::ALL.iter().copied() {
        let process = new_process(&*registry).await;
        let record = registry
            .complete_process(&process.id, Completion::new(state, json!(state.as_str())))
            .await
            .unwrap();
        assert_eq!(record.status, ProcessStatus::from(state));
        assert!(record.status.is_terminal());
        assert_eq!(
            record.terminal.unwrap().seq,
            1,
            "an empty log ends at seq 1"
        );
        let events = log(&*registry, &process.id).await;
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].event_type, format!("process.{}", state.as_str()));
    }
}

pub async fn identical_completion_is_idempotent_other_is_already_terminal(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let other_pod = store.pod("pod-b").await;
    let process = new_process(&*registry).await;
    let completion = Completion::new(TerminalState::Completed, json!({"v": 1}));
    let first = registry
        .complete_process(&process.id, completion.clone())
        .await
        .unwrap();
    let again = other_pod
        .complete_process(&process.id, completion)
        .await
        .unwrap();
    assert_eq!(first, again);
    for different in [
        Completion::new(TerminalState::Completed, json!({"v": 2})),
        Completion::new(TerminalState::Failed, json!({"v": 1})),
        Completion::new(TerminalState::Cancelled, json!(null)),
    ] {
        match registry.complete_process(&process.id, different).await {
            Err(ProcessError::AlreadyTerminal { id, state }) => {
                assert_eq!((id, state), (process.id.clone(), TerminalState::Completed));
            }
            other => panic!("expected AlreadyTerminal, got {other:?}"),
        }
    }
    assert_eq!(
        log(&*registry, &process.id).await.len(),
        1,
        "one terminal event"
    );
}

pub async fn completion_refusals_write_nothing(store: &dyn Store) {
    let registry = store
        .pod_with(RegistryConfig::new("pod-a").with_max_payload_bytes(50))
        .await;
    let missing = ProcessId::new("missing").unwrap();
    let result = registry
        .complete_process(
            &missing,
            Completion::new(TerminalState::Completed, json!(1)),
        )
        .await;
    assert!(
        matches!(result, Err(ProcessError::NotFound(_))),
        "{result:?}"
    );

    let process = new_process(&*registry).await;
    let too_big = Completion::new(TerminalState::Completed, json!("x".repeat(60)));
    let result = registry.complete_process(&process.id, too_big).await;
    assert!(
        matches!(result, Err(ProcessError::PayloadTooLarge { .. })),
        "{result:?}"
    );

    let expired = expired_lease(store, &*registry, &process.id).await;
    let result = registry
        .complete_process(
            &process.id,
            Completion::new(TerminalState::Completed, json!(1)).fenced(&expired),
        )
        .await;
    assert!(
        matches!(result, Err(ProcessError::LeaseLost { .. })),
        "expired: {result:?}"
    );

    let current = claim(&*registry, &process.id, "pod-b").await;
    let result = registry
        .complete_process(
            &process.id,
            Completion::new(TerminalState::Completed, json!(1)).fenced(&expired),
        )
        .await;
    assert!(
        matches!(result, Err(ProcessError::LeaseLost { .. })),
        "stale: {result:?}"
    );

    let record = registry.get_process(&process.id).await.unwrap().unwrap();
    assert!(record.terminal.is_none());
    assert_eq!(record.last_seq, 0);
    assert_eq!(record.lease.map(|l| l.generation), Some(current.generation));
    assert!(log(&*registry, &process.id).await.is_empty());
}

pub async fn completion_releases_the_lease(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let process = new_process(&*registry).await;
    let lease = claim(&*registry, &process.id, "pod-a").await;
    let record = registry
        .complete_process(
            &process.id,
            Completion::new(TerminalState::Completed, json!(1)).fenced(&lease),
        )
        .await
        .unwrap();
    assert!(record.lease.is_none(), "the lease is released");
    assert_eq!(
        record.lease_generation, lease.generation,
        "the generation stays"
    );
    let events = log(&*registry, &process.id).await;
    assert_eq!(events[0].lease_generation, Some(lease.generation));
    // The released lease can no longer be renewed; the process can no longer be claimed.
    let renewed = registry
        .renew(&lease, std::time::Duration::from_secs(10))
        .await;
    assert!(
        matches!(renewed, Err(ProcessError::LeaseLost { .. })),
        "{renewed:?}"
    );
    let claimed = registry
        .claim(&process.id, "pod-b", std::time::Duration::from_secs(10))
        .await;
    assert!(
        matches!(claimed, Err(ProcessError::ProcessTerminal { .. })),
        "{claimed:?}"
    );
}
