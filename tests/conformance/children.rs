//! CONTRACT §10 (registry side): a child records its parent, is listed under it, needs a
//! live parent, and its end reaches the parent's log once.

use proclog::{
    Completion, ProcessError, ProcessFilter, ProcessId, ProcessRegistration, ProcessRegistry,
    ProcessStatus, Suspension, TerminalState,
};
use serde_json::json;

use crate::common::Store;
use crate::support::{claim, log};

async fn children(registry: &dyn ProcessRegistry, parent: &ProcessId) -> Vec<ProcessId> {
    registry
        .list_processes(ProcessFilter {
            parent: Some(parent.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .processes
        .into_iter()
        .map(|record| record.id)
        .collect()
}

pub async fn a_child_records_its_parent_and_is_listed_under_it(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let parent = registry
        .register_process(ProcessRegistration::new("parent", json!(null)))
        .await
        .unwrap();
    let mut made = Vec::new();
    for n in 0..3 {
        let child = registry
            .register_process(
                ProcessRegistration::new("child", json!(n)).with_parent(parent.id.clone()),
            )
            .await
            .unwrap();
        assert_eq!(child.parent.as_ref(), Some(&parent.id));
        made.push(child.id);
    }
    // A process that is not a child, and a grandchild: neither is listed under the parent.
    registry
        .register_process(ProcessRegistration::new("child", json!("other")))
        .await
        .unwrap();
    let grandchild = registry
        .register_process(
            ProcessRegistration::new("child", json!("grand")).with_parent(made[0].clone()),
        )
        .await
        .unwrap();
    assert_eq!(children(registry.as_ref(), &parent.id).await, made);
    let marked = |id: &ProcessId| {
        let registry = registry.clone();
        let id = id.clone();
        async move {
            registry
                .get_process(&id)
                .await
                .unwrap()
                .unwrap()
                .has_children
        }
    };
    assert!(!parent.has_children, "no child yet when it was registered");
    assert!(marked(&parent.id).await && marked(&made[0]).await);
    assert!(!marked(&made[1]).await && !marked(&grandchild.id).await);
    assert_eq!(
        children(registry.as_ref(), &made[0]).await,
        vec![grandchild.id.clone()]
    );
    assert!(parent.parent.is_none());
    assert_eq!(
        registry
            .get_process(&grandchild.id)
            .await
            .unwrap()
            .unwrap()
            .parent,
        Some(made[0].clone())
    );
    // The parent is part of the registration's content.
    let again = ProcessRegistration::new("child", json!("grand")).with_id(grandchild.id.clone());
    assert!(matches!(
        registry.register_process(again).await,
        Err(ProcessError::Conflict { .. })
    ));
    let same = ProcessRegistration::new("child", json!("grand"))
        .with_id(grandchild.id.clone())
        .with_parent(made[0].clone());
    assert_eq!(
        registry.register_process(same).await.unwrap().id,
        grandchild.id
    );
}

pub async fn a_child_needs_a_live_parent(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let unknown = ProcessId::new("no-such-parent").unwrap();
    let refused = registry
        .register_process(ProcessRegistration::new("child", json!(1)).with_parent(unknown))
        .await;
    assert!(
        matches!(&refused, Err(ProcessError::InvalidInput(msg)) if msg.contains("does not exist")),
        "{refused:?}"
    );
    let own = ProcessId::new("its-own-parent").unwrap();
    let refused = registry
        .register_process(
            ProcessRegistration::new("child", json!(1))
                .with_id(own.clone())
                .with_parent(own.clone()),
        )
        .await;
    assert!(
        matches!(refused, Err(ProcessError::InvalidInput(_))),
        "{refused:?}"
    );
    assert!(registry.get_process(&own).await.unwrap().is_none());

    let parent = registry
        .register_process(ProcessRegistration::new("parent", json!(null)))
        .await
        .unwrap();
    let child = registry
        .register_process(
            ProcessRegistration::new("child", json!(1)).with_parent(parent.id.clone()),
        )
        .await
        .unwrap();
    registry
        .complete_process(
            &parent.id,
            Completion::new(TerminalState::Completed, json!(null)),
        )
        .await
        .unwrap();
    let refused = registry
        .register_process(
            ProcessRegistration::new("child", json!(2)).with_parent(parent.id.clone()),
        )
        .await;
    assert!(
        matches!(&refused, Err(ProcessError::InvalidInput(msg)) if msg.contains("has ended")),
        "{refused:?}"
    );
    // A retried registration of a child made before the parent ended is still answered.
    let retried = ProcessRegistration::new("child", json!(1))
        .with_id(child.id.clone())
        .with_parent(parent.id.clone());
    assert_eq!(registry.register_process(retried).await.unwrap(), child);
    assert_eq!(
        children(registry.as_ref(), &parent.id).await,
        vec![child.id]
    );
}

pub async fn a_childs_end_reaches_its_waiting_parent_once(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let parent = registry
        .register_process(ProcessRegistration::new("parent", json!(null)))
        .await
        .unwrap();
    let child = registry
        .register_process(
            ProcessRegistration::new("child", json!(1)).with_parent(parent.id.clone()),
        )
        .await
        .unwrap();
    // The parent waits for its children's ends as a join does.
    let lease = claim(registry.as_ref(), &parent.id, "pod-a").await;
    let waiting = registry
        .suspend(
            &lease,
            Suspension {
                wake_at: None,
                delay: None,
                topic: Some("process.child".into()),
                after_seq: 0,
                retry: false,
                reason: json!({"reason": "children"}),
            },
        )
        .await
        .unwrap();
    assert_eq!(waiting.status, ProcessStatus::Waiting);
    let end = Completion::new(TerminalState::Failed, json!({"error": "no stock"}));
    registry
        .complete_process(&child.id, end.clone())
        .await
        .unwrap();
    // A repeated completion (a retry after a lost answer) tells the parent nothing new.
    registry.complete_process(&child.id, end).await.unwrap();
    let events = log(registry.as_ref(), &parent.id).await;
    let told: Vec<_> = events
        .iter()
        .filter(|event| event.event_type == "process.message")
        .collect();
    assert_eq!(told.len(), 1, "{events:?}");
    assert_eq!(
        told[0].payload,
        json!({"topic": "process.child", "payload": {"child": child.id, "state": "failed"}})
    );
    let woken = registry.get_process(&parent.id).await.unwrap().unwrap();
    assert!(
        woken
            .wake_at
            .is_some_and(|at| at <= chrono::Utc::now() + chrono::TimeDelta::seconds(5)),
        "the message made the waiting parent runnable: {woken:?}"
    );
    let claims = registry
        .claim_runnable("pod-b", std::time::Duration::from_secs(60), 10)
        .await
        .unwrap();
    assert!(claims.iter().any(|claim| claim.process.id == parent.id));

    // A parent that has ended is told nothing, and the child's end stands.
    let late = registry
        .register_process(
            ProcessRegistration::new("child", json!(2)).with_parent(parent.id.clone()),
        )
        .await
        .unwrap();
    let parent_lease = claims
        .into_iter()
        .find(|claim| claim.process.id == parent.id)
        .unwrap()
        .lease;
    registry
        .complete_process(
            &parent.id,
            Completion::new(TerminalState::Completed, json!(null)).fenced(&parent_lease),
        )
        .await
        .unwrap();
    let ended = registry
        .complete_process(
            &late.id,
            Completion::new(TerminalState::Completed, json!(null)),
        )
        .await
        .unwrap();
    assert_eq!(ended.status, ProcessStatus::Completed);
}
