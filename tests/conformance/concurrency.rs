//! CONTRACT §2 and §5 under concurrency: several pods (each with its own pool) at once.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use proclog::{
    ClaimOutcome, Completion, ProcessError, ProcessId, ProcessRegistration, ProcessRegistry,
    TerminalState,
};
use serde_json::json;

use crate::common::Store;
use crate::support::{assert_dense, event, log, new_process};

const PODS: usize = 3;
const TASKS_PER_POD: usize = 8;
const APPENDS_PER_TASK: usize = 300;
const TOTAL: usize = PODS * TASKS_PER_POD * APPENDS_PER_TASK;

async fn pods(store: &dyn Store) -> Vec<Arc<dyn ProcessRegistry>> {
    let mut pods = Vec::new();
    for n in 0..PODS {
        pods.push(store.pod(&format!("pod-{n}")).await);
    }
    pods
}

/// Runs `TASKS_PER_POD` tasks on every pod, each appending `APPENDS_PER_TASK` events to the
/// process `target(task, i)` returns, and returns every acknowledged (process, seq, payload).
async fn append_from_every_pod(
    pods: &[Arc<dyn ProcessRegistry>],
    target: impl Fn(usize, usize) -> ProcessId + Send + Sync + Clone + 'static,
) -> Vec<(ProcessId, i64, serde_json::Value)> {
    let mut tasks = Vec::new();
    for (pod_index, pod) in pods.iter().enumerate() {
        for task_index in 0..TASKS_PER_POD {
            let pod = Arc::clone(pod);
            let target = target.clone();
            let task = pod_index * TASKS_PER_POD + task_index;
            tasks.push(tokio::spawn(async move {
                let mut acknowledged = Vec::with_capacity(APPENDS_PER_TASK);
                for i in 0..APPENDS_PER_TASK {
                    let id = target(task, i);
                    let payload = json!({"task": task, "i": i});
                    let outcome = pod
                        .append_event(&id, event("work", payload.clone()))
                        .await
                        .expect("append");
                    acknowledged.push((id, outcome.event.seq, payload));
                }
                acknowledged
            }));
        }
    }
    let mut all = Vec::with_capacity(TOTAL);
    for task in tasks {
        all.extend(task.await.expect("task"));
    }
    all
}

pub async fn three_pods_append_to_one_process_without_gaps(store: &dyn Store) {
    let pods = pods(store).await;
    let process = new_process(&*pods[0]).await;
    let id = process.id.clone();
    let acknowledged = append_from_every_pod(&pods, move |_, _| id.clone()).await;
    let events = log(&*pods[1], &process.id).await;
    assert_eq!(events.len(), TOTAL);
    assert_dense(&events);
    // Every acknowledged write is present, at the seq it was acknowledged with.
    for (_, seq, payload) in &acknowledged {
        assert_eq!(&events[*seq as usize - 1].payload, payload);
    }
    let seqs: HashSet<i64> = acknowledged.iter().map(|(_, seq, _)| *seq).collect();
    assert_eq!(seqs.len(), TOTAL, "no seq was handed out twice");
    let writers: HashSet<&str> = events.iter().map(|e| e.writer.as_str()).collect();
    assert_eq!(writers.len(), PODS);
    // Within one task, seqs increase (each append starts after the previous one returned).
    let record = pods[2].get_process(&process.id).await.unwrap().unwrap();
    assert_eq!(record.last_seq, TOTAL as i64);
}

pub async fn three_pods_append_to_500_processes_without_gaps(store: &dyn Store) {
    const PROCESSES: usize = 500;
    let pods = pods(store).await;
    let mut ids = Vec::with_capacity(PROCESSES);
    for n in 0..PROCESSES {
        let record = pods[n % PODS]
            .register_process(
                ProcessRegistration::new("demo", json!(null))
                    .with_id(ProcessId::new(format!("proc-{n}")).unwrap()),
            )
            .await
            .unwrap();
        ids.push(record.id);
    }
    let ids = Arc::new(ids);
    let targets = Arc::clone(&ids);
    let acknowledged = append_from_every_pod(&pods, move |task, i| {
        targets[(task * APPENDS_PER_TASK + i) % PROCESSES].clone()
    })
    .await;
    assert_eq!(acknowledged.len(), TOTAL);
    let mut total = 0;
    for id in ids.iter() {
        let events = log(&*pods[0], id).await;
        assert_dense(&events);
        total += events.len();
    }
    assert_eq!(total, TOTAL, "every acknowledged append is stored once");
}

pub async fn concurrent_retries_of_one_key_write_one_event(store: &dyn Store) {
    let pods = pods(store).await;
    for round in 0..10 {
        let process = new_process(&*pods[0]).await;
        let mut tasks = Vec::new();
        for n in 0..8 {
            let pod = Arc::clone(&pods[n % PODS]);
            let id = process.id.clone();
            tasks.push(tokio::spawn(async move {
                pod.append_event(
                    &id,
                    event("pay", json!({"round": round})).with_replay_key("once"),
                )
                .await
                .expect("keyed append")
            }));
        }
        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(task.await.unwrap());
        }
        assert_eq!(
            outcomes.iter().filter(|o| !o.replayed).count(),
            1,
            "one writer wins"
        );
        assert!(outcomes.iter().all(|o| o.event.seq == 1));
        assert_eq!(log(&*pods[0], &process.id).await.len(), 1);
    }
}

pub async fn concurrent_claims_grant_one_lease(store: &dyn Store) {
    let pods = pods(store).await;
    for _ in 0..10 {
        let process = new_process(&*pods[0]).await;
        let mut tasks = Vec::new();
        for n in 0..6 {
            let pod = Arc::clone(&pods[n % PODS]);
            let id = process.id.clone();
            tasks.push(tokio::spawn(async move {
                pod.claim(&id, &format!("claimant-{n}"), Duration::from_secs(60))
                    .await
                    .expect("claim")
            }));
        }
        let mut granted = 0;
        for task in tasks {
            if let ClaimOutcome::Acquired(lease) = task.await.unwrap() {
                granted += 1;
                assert_eq!(lease.generation, 1);
            }
        }
        assert_eq!(granted, 1, "exactly one claimant gets the lease");
    }
}

pub async fn concurrent_completions_end_a_process_once(store: &dyn Store) {
    let pods = pods(store).await;
    for _ in 0..10 {
        let process = new_process(&*pods[0]).await;
        let mut tasks = Vec::new();
        for (n, state) in [
            TerminalState::Completed,
            TerminalState::Failed,
            TerminalState::Cancelled,
        ]
        .into_iter()
        .enumerate()
        {
            let pod = Arc::clone(&pods[n % PODS]);
            let id = process.id.clone();
            tasks.push(tokio::spawn(async move {
                pod.complete_process(&id, Completion::new(state, json!(n)))
                    .await
            }));
        }
        let mut winners = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(_) => winners += 1,
                Err(ProcessError::AlreadyTerminal { .. }) => {}
                Err(other) => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(winners, 1);
        let events = log(&*pods[0], &process.id).await;
        assert_eq!(events.len(), 1, "one terminal event");
    }
}
