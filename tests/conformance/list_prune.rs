//! CONTRACT §2: listing with keyset pagination, and pruning.

use std::collections::BTreeSet;

use proclog::{
    Completion, ProcessError, ProcessFilter, ProcessId, ProcessRegistration, ProcessStatus,
    TerminalState,
};
use serde_json::json;

use crate::common::Store;
use crate::support::{event, log, new_process};

pub async fn list_filters_and_paginates(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let start = store.now().await;
    let mut ids = BTreeSet::new();
    for n in 0..7 {
        let kind = if n % 2 == 0 { "even" } else { "odd" };
        let record = registry
            .register_process(
                ProcessRegistration::new(kind, json!(n))
                    .with_id(ProcessId::new(format!("p{n}")).unwrap()),
            )
            .await
            .unwrap();
        ids.insert(record.id);
    }
    let done = ProcessId::new("p3").unwrap();
    registry
        .complete_process(&done, Completion::new(TerminalState::Completed, json!(1)))
        .await
        .unwrap();
    registry
        .append_event(&ProcessId::new("p4").unwrap(), event("step", json!(1)))
        .await
        .unwrap();

    // Page through everything two at a time: every process exactly once, in order.
    let mut seen = Vec::new();
    let mut filter = ProcessFilter {
        limit: Some(2),
        ..Default::default()
    };
    loop {
        let page = registry.list_processes(filter.clone()).await.unwrap();
        assert!(page.processes.len() <= 2);
        seen.extend(page.processes.iter().map(|p| (p.created_at, p.id.clone())));
        match page.next {
            Some(cursor) => filter.after = Some(cursor),
            None => break,
        }
    }
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted, "pages come in (created_at, id) order");
    let seen_ids: BTreeSet<ProcessId> = seen.into_iter().map(|(_, id)| id).collect();
    assert_eq!(seen_ids, ids);

    let by_status = |status| ProcessFilter {
        status: Some(status),
        ..Default::default()
    };
    let completed = registry
        .list_processes(by_status(ProcessStatus::Completed))
        .await
        .unwrap();
    assert_eq!(
        completed
            .processes
            .iter()
            .map(|p| p.id.as_str())
            .collect::<Vec<_>>(),
        ["p3"]
    );
    assert!(completed.next.is_none());
    let running = registry
        .list_processes(by_status(ProcessStatus::Running))
        .await
        .unwrap();
    assert_eq!(
        running
            .processes
            .iter()
            .map(|p| p.id.as_str())
            .collect::<Vec<_>>(),
        ["p4"]
    );
    let pending = registry
        .list_processes(by_status(ProcessStatus::Pending))
        .await
        .unwrap();
    assert_eq!(pending.processes.len(), 5);

    let odd = registry
        .list_processes(ProcessFilter {
            kind: Some("odd".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let odd_ids: Vec<&str> = odd.processes.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(odd_ids.len(), 3);
    assert!(odd_ids.iter().all(|id| ["p1", "p3", "p5"].contains(id)));

    let none_before = registry
        .list_processes(ProcessFilter {
            created_before: Some(start),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(none_before.processes.is_empty());
    let all_after = registry
        .list_processes(ProcessFilter {
            created_after: Some(start),
            kind: Some("even".into()),
            status: Some(ProcessStatus::Pending),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(all_after.processes.len(), 3, "p0, p2, p6 (p4 is running)");
}

pub async fn list_refuses_bad_limits_and_kinds(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    for limit in [0, 1001] {
        let result = registry
            .list_processes(ProcessFilter {
                limit: Some(limit),
                ..Default::default()
            })
            .await;
        assert!(
            matches!(result, Err(ProcessError::InvalidInput(_))),
            "{limit}: {result:?}"
        );
    }
    let result = registry
        .list_processes(ProcessFilter {
            kind: Some("no spaces allowed".into()),
            ..Default::default()
        })
        .await;
    assert!(
        matches!(result, Err(ProcessError::InvalidInput(_))),
        "{result:?}"
    );
}

pub async fn prune_removes_old_terminal_processes_only(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let old_done = new_process(&*registry).await;
    registry
        .append_events(
            &old_done.id,
            vec![event("a", json!(1)), event("b", json!(2))],
        )
        .await
        .unwrap();
    registry
        .complete_process(
            &old_done.id,
            Completion::new(TerminalState::Completed, json!(1)),
        )
        .await
        .unwrap();
    let old_running = new_process(&*registry).await;
    registry
        .append_event(&old_running.id, event("a", json!(1)))
        .await
        .unwrap();
    let old_pending = new_process(&*registry).await;

    // Wait until the store's clock has moved past the first completion.
    let first_completed_at = registry
        .get_process(&old_done.id)
        .await
        .unwrap()
        .unwrap()
        .terminal
        .unwrap()
        .completed_at;
    let mut cutoff = store.now().await;
    while cutoff <= first_completed_at {
        tokio::task::yield_now().await;
        cutoff = store.now().await;
    }
    let recent_done = new_process(&*registry).await;
    // Make sure the recent completion is at or after the cutoff on the store's clock.
    while store.now().await <= cutoff {
        tokio::task::yield_now().await;
    }
    registry
        .complete_process(
            &recent_done.id,
            Completion::new(TerminalState::Failed, json!(1)),
        )
        .await
        .unwrap();

    let report = registry.prune_terminal_processes(cutoff).await.unwrap();
    assert_eq!((report.processes, report.events), (1, 3));
    assert_eq!(registry.get_process(&old_done.id).await.unwrap(), None);
    let gone = registry.events_after(&old_done.id, 0, 10).await;
    assert!(matches!(gone, Err(ProcessError::NotFound(_))), "{gone:?}");
    for kept in [&old_running.id, &old_pending.id, &recent_done.id] {
        assert!(
            registry.get_process(kept).await.unwrap().is_some(),
            "{kept} kept"
        );
    }
    assert_eq!(log(&*registry, &old_running.id).await.len(), 1);

    let again = registry.prune_terminal_processes(cutoff).await.unwrap();
    assert_eq!((again.processes, again.events), (0, 0), "idempotent");

    // Even a cutoff in the future never touches a non-terminal process.
    let future = store.now().await + chrono::TimeDelta::days(365);
    let report = registry.prune_terminal_processes(future).await.unwrap();
    assert_eq!((report.processes, report.events), (1, 1));
    assert!(
        registry
            .get_process(&old_running.id)
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        registry
            .get_process(&old_pending.id)
            .await
            .unwrap()
            .is_some()
    );
}
