//! CONTRACT §6 (registry side): claiming runnable processes, and the batched terminal read.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use proclog::{
    Completion, Disposition, ProcessError, ProcessId, ProcessRegistration, ProcessStatus,
    TerminalState,
};
use serde_json::json;

use crate::common::Store;
use crate::support::{claim, expired_lease};

const MINUTE: Duration = Duration::from_secs(60);

async fn register(
    registry: &dyn proclog::ProcessRegistry,
    name: &str,
    disposition: Disposition,
) -> ProcessId {
    registry
        .register_process(
            ProcessRegistration::new("demo", json!(null))
                .with_id(ProcessId::new(name).unwrap())
                .with_disposition(disposition),
        )
        .await
        .unwrap()
        .id
}

pub async fn claim_runnable_takes_the_oldest_runnable_processes(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let first = register(&*registry, "r1", Disposition::Rerun).await;
    let external = register(&*registry, "r2-external", Disposition::External).await;
    let done = register(&*registry, "r3-done", Disposition::Rerun).await;
    let held = register(&*registry, "r4-held", Disposition::Rerun).await;
    let abandon = register(&*registry, "r5", Disposition::Abandon).await;
    let last = register(&*registry, "r6", Disposition::Rerun).await;
    registry
        .complete_process(&done, Completion::new(TerminalState::Completed, json!(1)))
        .await
        .unwrap();
    claim(&*registry, &held, "someone-else").await;

    let claims = registry.claim_runnable("pod-a", MINUTE, 2).await.unwrap();
    let ids: Vec<&ProcessId> = claims.iter().map(|c| &c.process.id).collect();
    assert_eq!(
        ids,
        [&first, &abandon],
        "oldest first, skipping external, terminal, held"
    );
    for claimed in &claims {
        assert_eq!(claimed.lease.owner, "pod-a");
        assert_eq!(claimed.lease.generation, 1);
        assert_eq!(claimed.process.attempts, 1);
        assert_eq!(claimed.process.status, ProcessStatus::Running);
        assert!(claimed.lost_owner.is_none(), "never owned before");
        // The lease is real: it fences writes.
        registry
            .append_event(
                &claimed.process.id,
                proclog::AppendRequest::new("step", json!(1)).fenced(&claimed.lease),
            )
            .await
            .unwrap();
    }
    let rest = registry.claim_runnable("pod-b", MINUTE, 10).await.unwrap();
    assert_eq!(
        rest.iter().map(|c| &c.process.id).collect::<Vec<_>>(),
        [&last]
    );
    assert!(
        registry
            .claim_runnable("pod-b", MINUTE, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let record = registry.get_process(&external).await.unwrap().unwrap();
    assert_eq!(
        (record.status, record.lease_generation),
        (ProcessStatus::Pending, 0)
    );
}

pub async fn claim_runnable_reports_a_lost_owner_but_not_a_released_one(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let lost = register(&*registry, "lost", Disposition::Abandon).await;
    let released = register(&*registry, "released", Disposition::Abandon).await;
    let expired = expired_lease(store, &*registry, &lost).await;
    let handed_back = claim(&*registry, &released, "pod-old").await;
    registry.release(&handed_back).await.unwrap();

    let claims = registry
        .claim_runnable("pod-new", MINUTE, 10)
        .await
        .unwrap();
    assert_eq!(claims.len(), 2);
    let by_id = |id: &ProcessId| claims.iter().find(|c| &c.process.id == id).unwrap();
    let evidence = by_id(&lost)
        .lost_owner
        .clone()
        .expect("the lost owner is reported");
    assert_eq!(evidence.owner, "short-lived");
    assert_eq!(evidence.generation, expired.generation);
    assert_eq!(evidence.expired_at, expired.expires_at);
    assert_eq!(by_id(&lost).lease.generation, expired.generation + 1);
    assert!(
        by_id(&released).lost_owner.is_none(),
        "a released lease is not lost"
    );
    assert_eq!(
        by_id(&released).lease.generation,
        handed_back.generation + 1
    );
    // The expired lease is fenced out.
    let zombie = registry
        .append_event(
            &lost,
            proclog::AppendRequest::new("z", json!(1)).fenced(&expired),
        )
        .await;
    assert!(
        matches!(zombie, Err(ProcessError::LeaseLost { .. })),
        "{zombie:?}"
    );
}

pub async fn concurrent_pods_claim_each_process_once(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    for n in 0..60 {
        register(&*registry, &format!("job-{n:02}"), Disposition::Rerun).await;
    }
    let mut tasks = Vec::new();
    for pod in 0..3 {
        let registry = Arc::clone(&store.pod(&format!("pod-{pod}")).await);
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let claims = registry
                    .claim_runnable(&format!("pod-{pod}"), MINUTE, 7)
                    .await
                    .unwrap();
                if claims.is_empty() {
                    return mine;
                }
                mine.extend(claims.into_iter().map(|c| c.process.id));
            }
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    let distinct: HashSet<&ProcessId> = all.iter().collect();
    assert_eq!(all.len(), 60, "every process claimed");
    assert_eq!(distinct.len(), 60, "no process claimed twice");
}

pub async fn claim_runnable_refuses_bad_arguments(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    for (owner, ttl, limit) in [
        ("", MINUTE, 1),
        ("pod", Duration::ZERO, 1),
        ("pod", MINUTE, 0),
        ("pod", MINUTE, 1001),
    ] {
        let result = registry.claim_runnable(owner, ttl, limit).await;
        assert!(
            matches!(result, Err(ProcessError::InvalidInput(_))),
            "{result:?}"
        );
    }
}

pub async fn terminal_states_reads_many_processes_at_once(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let running = register(&*registry, "running", Disposition::Rerun).await;
    let ended = register(&*registry, "ended", Disposition::Rerun).await;
    registry
        .complete_process(
            &ended,
            Completion::new(TerminalState::Failed, json!({"e": 1})),
        )
        .await
        .unwrap();
    let unknown = ProcessId::new("unknown").unwrap();
    let states = registry
        .terminal_states(&[running.clone(), ended.clone(), unknown.clone()])
        .await
        .unwrap();
    assert_eq!(states.len(), 2);
    assert_eq!(states[&running], None);
    let terminal = states[&ended].clone().unwrap();
    assert_eq!((terminal.state, terminal.seq), (TerminalState::Failed, 1));
    assert_eq!(terminal.output, json!({"e": 1}));
    assert!(!states.contains_key(&unknown));
    assert!(registry.terminal_states(&[]).await.unwrap().is_empty());
}

pub async fn next_lease_expiry_reports_the_earliest_live_lease(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    assert_eq!(registry.next_wake().await.unwrap(), None);
    let external = register(&*registry, "ext", Disposition::External).await;
    claim(&*registry, &external, "client").await;
    assert_eq!(
        registry.next_wake().await.unwrap(),
        None,
        "external processes are never taken over"
    );
    let later = register(&*registry, "later", Disposition::Rerun).await;
    registry
        .claim(&later, "pod-a", Duration::from_secs(3600))
        .await
        .unwrap();
    let sooner = register(&*registry, "sooner", Disposition::Rerun).await;
    claim(&*registry, &sooner, "pod-b").await; // 60 s
    let next = registry.next_wake().await.unwrap().expect("a live lease");
    assert!(next <= MINUTE, "{next:?}");
    assert!(next > Duration::from_secs(30), "{next:?}");
    // An expired lease is not "next": it is already claimable.
    let lapsed = register(&*registry, "lapsed", Disposition::Rerun).await;
    expired_lease(store, &*registry, &lapsed).await;
    let next = registry.next_wake().await.unwrap().expect("a live lease");
    assert!(next > Duration::from_secs(30), "{next:?}");
}
