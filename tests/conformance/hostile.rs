//! Hostile library input: every backend refuses it the same way and writes nothing, and every
//! backend compares JSON content by the same rule (Postgres `jsonb` equality).

use proclog::validate::{MAX_BATCH_BYTES, MAX_TIMESTAMP};
use proclog::{
    AppendRequest, Completion, ProcessError, ProcessFilter, ProcessId, ProcessRegistration,
    RegistryConfig, TerminalState,
};
use serde_json::json;

use crate::common::Store;

async fn registered(store: &dyn Store, id: &str) -> ProcessId {
    let registry = store.pod("pod-a").await;
    let id = ProcessId::new(id).unwrap();
    registry
        .register_process(ProcessRegistration::new("demo", json!({})).with_id(id.clone()))
        .await
        .unwrap();
    id
}

pub async fn numbers_compare_by_value_everywhere(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let id = ProcessId::new("numbers").unwrap();
    let with = |input| ProcessRegistration::new("demo", input).with_id(id.clone());
    registry
        .register_process(with(json!({"x": 1, "y": [2, 3]})))
        .await
        .unwrap();
    let same = registry
        .register_process(with(json!({"y": [2.0, 3e0], "x": 1.0})))
        .await;
    assert!(same.is_ok(), "1 and 1.0 are the same content: {same:?}");
    let other = registry
        .register_process(with(json!({"x": 2, "y": [2, 3]})))
        .await;
    assert!(
        matches!(other, Err(ProcessError::Conflict { .. })),
        "{other:?}"
    );

    let first = registry
        .append_event(
            &id,
            AppendRequest::new("t", json!({"n": 10})).with_replay_key("k"),
        )
        .await
        .unwrap();
    let replay = registry
        .append_event(
            &id,
            AppendRequest::new("t", json!({"n": 10.0})).with_replay_key("k"),
        )
        .await
        .unwrap();
    assert!(replay.replayed);
    assert_eq!(replay.event.seq, first.event.seq);
    let conflict = registry
        .append_event(
            &id,
            AppendRequest::new("t", json!({"n": 10.5})).with_replay_key("k"),
        )
        .await;
    assert!(
        matches!(conflict, Err(ProcessError::ReplayConflict { .. })),
        "{conflict:?}"
    );

    registry
        .complete_process(
            &id,
            Completion::new(TerminalState::Completed, json!([1, 2])),
        )
        .await
        .unwrap();
    let again = registry
        .complete_process(
            &id,
            Completion::new(TerminalState::Completed, json!([1.0, 2.0])),
        )
        .await;
    assert!(again.is_ok(), "the identical completion: {again:?}");
    let different = registry
        .complete_process(
            &id,
            Completion::new(TerminalState::Completed, json!([2, 1])),
        )
        .await;
    assert!(
        matches!(different, Err(ProcessError::AlreadyTerminal { .. })),
        "{different:?}"
    );
}

pub async fn bad_writers_are_refused_before_anything_is_written(store: &dyn Store) {
    let id = registered(store, "w").await;
    for writer in ["", "pod\0a", &"w".repeat(129)] {
        let registry = store.pod_with(RegistryConfig::new(writer)).await;
        let append = registry
            .append_event(&id, AppendRequest::new("t", json!(1)))
            .await;
        assert!(
            matches!(append, Err(ProcessError::InvalidInput(_))),
            "{writer:?}: {append:?}"
        );
        let complete = registry
            .complete_process(&id, Completion::new(TerminalState::Completed, json!(1)))
            .await;
        assert!(
            matches!(complete, Err(ProcessError::InvalidInput(_))),
            "{writer:?}: {complete:?}"
        );
    }
    let record = store
        .pod("pod-a")
        .await
        .get_process(&id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.last_seq, 0);
    assert!(record.terminal.is_none());
}

pub async fn a_batch_is_held_to_its_total_size(store: &dyn Store) {
    let id = registered(store, "big").await;
    let registry = store.pod("pod-a").await;
    let payload = json!("x".repeat(200 * 1024));
    let count = MAX_BATCH_BYTES / (200 * 1024) + 1;
    let batch = vec![AppendRequest::new("t", payload); count];
    let refused = registry.append_events(&id, batch).await;
    assert!(
        matches!(refused, Err(ProcessError::PayloadTooLarge { limit, .. }) if limit == MAX_BATCH_BYTES),
        "{refused:?}"
    );
    assert_eq!(
        registry.get_process(&id).await.unwrap().unwrap().last_seq,
        0
    );
}

pub async fn instants_out_of_range_are_invalid_input(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let far_past = "-5000-01-01T00:00:00Z".parse().unwrap();
    let far_future = "+20000-01-01T00:00:00Z".parse().unwrap();
    for at in [far_past, far_future] {
        let list = registry
            .list_processes(ProcessFilter {
                created_after: Some(at),
                ..ProcessFilter::default()
            })
            .await;
        assert!(
            matches!(list, Err(ProcessError::InvalidInput(_))),
            "{list:?}"
        );
        let prune = registry.prune_terminal_processes(at).await;
        assert!(
            matches!(prune, Err(ProcessError::InvalidInput(_))),
            "{prune:?}"
        );
    }
    let edge = MAX_TIMESTAMP.parse().unwrap();
    assert!(registry.prune_terminal_processes(edge).await.is_ok());
}

/// A value nested `depth` levels deep, alternating arrays and objects.
fn nested(depth: usize) -> serde_json::Value {
    (0..depth).fold(json!("bottom"), |inner, level| {
        if level % 2 == 0 {
            json!([inner])
        } else {
            json!({"level": inner})
        }
    })
}

/// The deepest value accepted is stored and read back through every path (input, unkeyed and
/// keyed payloads, a replay, output, get, list, events, terminal states); one level more is
/// refused on every write path and writes nothing. (Before the bound, a value of 128 levels
/// was stored and could never be read back.)
pub async fn the_deepest_accepted_value_reads_back_everywhere(store: &dyn Store) {
    use proclog::validate::MAX_JSON_DEPTH;
    let registry = store.pod("pod-a").await;
    let deep = nested(MAX_JSON_DEPTH);
    let too_deep = nested(MAX_JSON_DEPTH + 1);
    let id = ProcessId::new("deep").unwrap();
    let refused = registry
        .register_process(ProcessRegistration::new("demo", too_deep.clone()).with_id(id.clone()))
        .await;
    assert!(
        matches!(refused, Err(ProcessError::InvalidInput(_))),
        "{refused:?}"
    );
    assert!(registry.get_process(&id).await.unwrap().is_none());
    let record = registry
        .register_process(ProcessRegistration::new("demo", deep.clone()).with_id(id.clone()))
        .await
        .unwrap();
    assert_eq!(record.input, deep);
    for request in [
        AppendRequest::new("t", too_deep.clone()),
        AppendRequest::new("t", too_deep.clone()).with_replay_key("too-deep"),
    ] {
        let refused = registry.append_event(&id, request).await;
        assert!(
            matches!(refused, Err(ProcessError::InvalidInput(_))),
            "{refused:?}"
        );
    }
    registry
        .append_event(&id, AppendRequest::new("plain", deep.clone()))
        .await
        .unwrap();
    let keyed = AppendRequest::new("keyed", deep.clone()).with_replay_key("k");
    registry.append_event(&id, keyed.clone()).await.unwrap();
    let replay = registry.append_event(&id, keyed).await.unwrap();
    assert!(replay.replayed);
    assert_eq!(replay.event.payload, deep);
    let refused = registry
        .complete_process(&id, Completion::new(TerminalState::Completed, too_deep))
        .await;
    assert!(
        matches!(refused, Err(ProcessError::InvalidInput(_))),
        "{refused:?}"
    );
    let done = registry
        .complete_process(&id, Completion::new(TerminalState::Completed, deep.clone()))
        .await
        .unwrap();
    assert_eq!(done.terminal.unwrap().output, deep);
    let read = registry.get_process(&id).await.unwrap().unwrap();
    assert_eq!(read.input, deep);
    let listed = registry
        .list_processes(ProcessFilter::default())
        .await
        .unwrap();
    assert_eq!(listed.processes[0].input, deep);
    let events = registry.events_after(&id, 0, 100).await.unwrap();
    assert_eq!(events.len(), 3);
    assert!(events.iter().all(|e| e.payload == deep));
    let terminal = registry
        .terminal_states(std::slice::from_ref(&id))
        .await
        .unwrap();
    assert_eq!(terminal[&id].as_ref().unwrap().output, deep);
}
