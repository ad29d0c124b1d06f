//! CONTRACT §1 and §2: registration and point reads.

use proclog::{
    AppendRequest, Completion, Disposition, ProcessError, ProcessFilter, ProcessId,
    ProcessRegistration, ProcessStatus, RegistryConfig, TerminalState,
};
use serde_json::json;

use crate::common::Store;

pub async fn registers_a_pending_process(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let id = ProcessId::new("order:42.v1_x-y").unwrap();
    let record = registry
        .register_process(
            ProcessRegistration::new("demo", json!({"items": [1, 2]}))
                .with_id(id.clone())
                .with_disposition(Disposition::Abandon),
        )
        .await
        .unwrap();
    assert_eq!(record.id, id);
    assert_eq!(record.kind, "demo");
    assert_eq!(record.input, json!({"items": [1, 2]}));
    assert_eq!(record.disposition, Disposition::Abandon);
    assert_eq!(record.status, ProcessStatus::Pending);
    assert_eq!(record.last_seq, 0);
    assert_eq!(record.lease_generation, 0);
    assert!(record.lease.is_none() && record.terminal.is_none());
    assert_eq!(registry.get_process(&id).await.unwrap(), Some(record));
}

pub async fn generates_a_uuid_v7_id_when_absent(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let a = registry
        .register_process(ProcessRegistration::new("demo", json!(null)))
        .await
        .unwrap();
    let b = registry
        .register_process(ProcessRegistration::new("demo", json!(null)))
        .await
        .unwrap();
    assert_ne!(a.id, b.id);
    let uuid = uuid::Uuid::parse_str(a.id.as_str()).expect("a generated id is a UUID");
    assert_eq!(uuid.get_version_num(), 7);
    assert_eq!(a.disposition, Disposition::Rerun, "rerun is the default");
}

pub async fn identical_registration_returns_the_existing_record(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let registration = ProcessRegistration::new("demo", json!({"k": "v"}))
        .with_id(ProcessId::new("same").unwrap());
    let first = registry
        .register_process(registration.clone())
        .await
        .unwrap();
    let again = registry
        .register_process(registration.clone())
        .await
        .unwrap();
    assert_eq!(first, again);

    // Whatever its state: after it ran and ended, the same registration still returns it.
    registry
        .append_event(&first.id, AppendRequest::new("step", json!(1)))
        .await
        .unwrap();
    let ended = registry
        .complete_process(
            &first.id,
            Completion::new(TerminalState::Completed, json!("ok")),
        )
        .await
        .unwrap();
    let after_end = registry.register_process(registration).await.unwrap();
    assert_eq!(after_end, ended);
    assert_eq!(after_end.status, ProcessStatus::Completed);
}

pub async fn different_registration_conflicts(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let id = ProcessId::new("taken").unwrap();
    let original = ProcessRegistration::new("demo", json!({"k": 1})).with_id(id.clone());
    let stored = registry.register_process(original.clone()).await.unwrap();
    let variants = [
        ProcessRegistration {
            kind: "other".into(),
            ..original.clone()
        },
        ProcessRegistration {
            input: json!({"k": 2}),
            ..original.clone()
        },
        original.clone().with_disposition(Disposition::External),
    ];
    for variant in variants {
        match registry.register_process(variant).await {
            Err(ProcessError::Conflict { id: conflicting }) => assert_eq!(conflicting, id),
            other => panic!("expected Conflict, got {other:?}"),
        }
    }
    assert_eq!(registry.get_process(&id).await.unwrap(), Some(stored));
}

pub async fn concurrent_registration_creates_one_process(store: &dyn Store) {
    let pod_a = store.pod("pod-a").await;
    let pod_b = store.pod("pod-b").await;
    for round in 0..25 {
        let registration = ProcessRegistration::new("demo", json!({"round": round}))
            .with_id(ProcessId::new(format!("race-{round}")).unwrap());
        let (a, b) = tokio::join!(
            pod_a.register_process(registration.clone()),
            pod_b.register_process(registration.clone())
        );
        let (a, b) = (a.expect("pod a registers"), b.expect("pod b registers"));
        assert_eq!(a, b, "both pods see the one process");
    }
    let all = pod_a
        .list_processes(ProcessFilter {
            limit: Some(1000),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(all.processes.len(), 25);
}

pub async fn invalid_kind_and_oversized_input_are_refused(store: &dyn Store) {
    let registry = store
        .pod_with(RegistryConfig::new("pod-a").with_max_payload_bytes(64))
        .await;
    for kind in ["", "has space", "ünïcode", &"k".repeat(129)] {
        let result = registry
            .register_process(ProcessRegistration::new(kind, json!(null)))
            .await;
        assert!(
            matches!(result, Err(ProcessError::InvalidInput(_))),
            "kind {kind:?}: {result:?}"
        );
    }
    let result = registry
        .register_process(ProcessRegistration::new("demo", json!("x".repeat(100))))
        .await;
    assert!(
        matches!(result, Err(ProcessError::PayloadTooLarge { limit: 64, .. })),
        "{result:?}"
    );
    let kind_at_limit = "k".repeat(128);
    registry
        .register_process(ProcessRegistration::new(
            kind_at_limit.as_str(),
            json!(null),
        ))
        .await
        .expect("a 128-character kind is fine");
    let all = registry
        .list_processes(ProcessFilter::default())
        .await
        .unwrap();
    assert_eq!(
        all.processes.len(),
        1,
        "refused registrations wrote nothing"
    );
}

pub async fn unknown_process_is_absent(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let missing = ProcessId::new("never-registered").unwrap();
    assert_eq!(registry.get_process(&missing).await.unwrap(), None);
}
