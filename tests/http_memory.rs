//! CONTRACT §12: what concurrent readers and writers of large logs cost a pod is bounded in
//! bytes, not only in rows. Measured on a real `proclog pod` process by its peak resident
//! memory (`VmHWM`), which is what an orchestrator's memory limit kills on.
//!
//! Before the byte budgets, ten concurrent reads of a 32 MB log took a pod from 153 MB to
//! 650 MB, and four refused 8 MiB requests peaked at 547 MB (the Kubernetes limit is 256 Mi).

mod common;

use common::migrated_database_url;
use common::pods::PodProcess;
use proclog::{
    AppendRequest, Completion, Disposition, PgProcessRegistry, ProcessId, ProcessRegistration,
    ProcessRegistry, RegistryConfig, TerminalState,
};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// The most a pod's peak resident memory may grow, over its peak after start and one read,
/// while ten readers page through a 32 MB log, five streams replay it, and four 8 MiB bodies
/// of the densest JSON are refused, all at once: about fifteen pages of the 1 MiB budget in
/// flight, each held as rows, values and JSON (measured here: about 40 MiB; before the byte
/// budgets: over 500 MiB).
const BOUND_MIB: u64 = 100;

/// Peak resident set of `pid`, in MiB.
fn peak_mib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kib / 1024
}

/// Pages through the whole log with `next_after`, returning how many events it read.
async fn read_all(client: &reqwest::Client, base: &str, id: &ProcessId) -> usize {
    let mut after = 0;
    let mut read = 0;
    loop {
        let page: Value = client
            .get(format!(
                "{base}/v1/processes/{id}/events?after={after}&limit=10000"
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let events = page["events"].as_array().unwrap();
        if events.is_empty() {
            assert!(page["next_after"].is_null());
            return read;
        }
        read += events.len();
        after = page["next_after"].as_i64().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reads_of_a_large_log_stay_within_the_memory_bound() {
    let url = migrated_database_url().await;
    let registry = PgProcessRegistry::new(
        proclog::pg::connect_pool(&url, 4).unwrap(),
        RegistryConfig::new("writer"),
    );
    let id = ProcessId::new("large-log").unwrap();
    registry
        .register_process(
            ProcessRegistration::new("k", json!({}))
                .with_id(id.clone())
                .with_disposition(Disposition::External),
        )
        .await
        .unwrap();
    // 128 events of 250 kB of hex that compresses little: a 32 MB log.
    let events = 128;
    for n in 0..events {
        let text: String = (0..(250_000 / 32))
            .map(|_| uuid::Uuid::new_v4().simple().to_string())
            .collect();
        registry
            .append_event(
                &id,
                AppendRequest::new("chunk", json!({"n": n, "text": text})),
            )
            .await
            .unwrap();
    }
    registry
        .complete_process(&id, Completion::new(TerminalState::Completed, json!({})))
        .await
        .unwrap();

    let pod = PodProcess::start(&url, "memory", &[]).await;
    let client = reqwest::Client::new();
    assert_eq!(read_all(&client, &pod.url, &id).await, events + 1);
    let baseline = peak_mib(pod.pid());

    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let (client, base, id) = (client.clone(), pod.url.clone(), id.clone());
        tasks.spawn(async move {
            assert_eq!(read_all(&client, &base, &id).await, events + 1);
        });
    }
    for _ in 0..5 {
        let (client, base, id) = (client.clone(), pod.url.clone(), id.clone());
        tasks.spawn(async move {
            let body = client
                .get(format!("{base}/v1/processes/{id}/stream"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            assert_eq!(
                body.matches("\nid: ").count() + usize::from(body.starts_with("id: ")),
                events + 1
            );
        });
    }
    for _ in 0..4 {
        let (client, base, id) = (client.clone(), pod.url.clone(), id.clone());
        tasks.spawn(async move {
            // 8 MiB of the densest JSON there is: a payload far over its limit.
            let ones = vec!["1"; 4 * 1024 * 1024 - 64].join(",");
            let body = format!(r#"{{"event_type": "t", "payload": [{ones}]}}"#);
            let answer = client
                .post(format!("{base}/v1/processes/{id}/events"))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status(), StatusCode::PAYLOAD_TOO_LARGE);
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let peak = peak_mib(pod.pid());
    eprintln!("pod peak resident memory: {baseline} MiB after start, {peak} MiB under load");
    assert!(
        peak.saturating_sub(baseline) <= BOUND_MIB,
        "the pod grew from {baseline} MiB to {peak} MiB (bound: {BOUND_MIB} MiB)"
    );
}
