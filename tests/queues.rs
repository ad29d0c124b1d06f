//! CONTRACT §10, queues and keys, with real pods: three pods race over 1,000 processes of 50
//! keys in one queue with limits per queue, per key and per pod. A sampler counts live leases
//! over SQL every 50 ms: no limit is ever exceeded. Keys are served round-robin: the one
//! process of a key registered after everything else starts within the first turn of keys,
//! not after the backlog (under first come, first served it would start last).

#[path = "common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use proclog::pod::{EngineResult, Pod, ProcessEngine, RunContext};
use proclog::queue::{Limits, QueueLimits};
use proclog::{ProcessRegistration, Proclog};
use serde_json::json;

const QUEUE: &str = "tenants";
const QUEUE_CONCURRENCY: i64 = 12;
const KEY_CONCURRENCY: i64 = 2;
const BIG_KEY_CONCURRENCY: i64 = 6;
const POD_CONCURRENCY: i64 = 6;

/// Holds its slot for 50 ms.
struct Work;

#[async_trait]
impl ProcessEngine for Work {
    async fn run(&self, _run: RunContext) -> EngineResult {
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(json!(null))
    }
}

fn limits() -> QueueLimits {
    let mut limits = QueueLimits {
        queue: Limits {
            concurrency: Some(QUEUE_CONCURRENCY as u32),
            per_pod: Some(POD_CONCURRENCY as u32),
            rate: None,
        },
        each_key: Limits {
            concurrency: Some(KEY_CONCURRENCY as u32),
            ..Limits::default()
        },
        ..QueueLimits::default()
    };
    limits.keys.insert(
        "big".into(),
        Limits {
            concurrency: Some(BIG_KEY_CONCURRENCY as u32),
            ..Limits::default()
        },
    );
    limits
}

/// What one sample saw: the most live leases of the queue, of one key (by key), of one pod.
#[derive(Default, Debug)]
struct Peaks {
    samples: u64,
    queue: i64,
    keys: HashMap<String, i64>,
    pod: i64,
}

/// Samples the queue's live leases every 50 ms until `stop`, asserting every limit each time.
async fn sample(url: String, stop: Arc<AtomicBool>) -> Peaks {
    let client = common::sql_client(&url).await;
    let mut peaks = Peaks::default();
    while !stop.load(Ordering::Relaxed) {
        let rows = client
            .query(
                "SELECT concurrency_key, lease_owner, count(*)
                   FROM proclog.processes
                  WHERE coalesce(queue, kind) = $1 AND terminal_state IS NULL
                    AND lease_expires_at > now()
                  GROUP BY 1, 2",
                &[&QUEUE],
            )
            .await
            .unwrap();
        let (mut total, mut by_key, mut by_pod) = (0, HashMap::new(), HashMap::new());
        for row in &rows {
            let (key, owner, count): (String, String, i64) = (row.get(0), row.get(1), row.get(2));
            total += count;
            *by_key.entry(key).or_insert(0) += count;
            *by_pod.entry(owner).or_insert(0) += count;
        }
        assert!(total <= QUEUE_CONCURRENCY, "queue over its limit: {total}");
        for (key, count) in &by_key {
            let limit = if key == "big" {
                BIG_KEY_CONCURRENCY
            } else {
                KEY_CONCURRENCY
            };
            assert!(*count <= limit, "key {key} over its limit: {count}");
            let peak = peaks.keys.entry(key.clone()).or_insert(0);
            *peak = (*peak).max(*count);
        }
        for (pod, count) in &by_pod {
            assert!(
                *count <= POD_CONCURRENCY,
                "pod {pod} over its limit: {count}"
            );
            peaks.pod = peaks.pod.max(*count);
        }
        peaks.queue = peaks.queue.max(total);
        peaks.samples += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    peaks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_pods_keep_every_limit_and_serve_keys_fairly() {
    let url = common::migrated_database_url().await;
    let setup = Proclog::builder(url.clone()).start().await.unwrap();
    setup.cluster().set_queue(QUEUE, &limits()).await.unwrap();
    // The backlog: one key with 520 processes first, then 48 keys of 10, then one process
    // of a key of its own, last of all.
    let registry = setup.registry();
    let mut registrations = Vec::new();
    for _ in 0..520 {
        registrations.push("big".to_owned());
    }
    for _ in 0..10 {
        for key in 0..48 {
            registrations.push(format!("k{key:02}"));
        }
    }
    registrations.push("lone".to_owned());
    assert_eq!(registrations.len(), 1_001);
    for key in &registrations {
        registry
            .register_process(
                ProcessRegistration::new("tenant-work", json!(null))
                    .in_queue(QUEUE)
                    .with_concurrency_key(key.as_str()),
            )
            .await
            .unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn(sample(url.clone(), Arc::clone(&stop)));
    let mut pods = Vec::new();
    for n in 0..3 {
        let stack = Proclog::builder(url.clone())
            .pod_id(format!("queue-pod-{n}"))
            .start()
            .await
            .unwrap();
        let pod = Pod::builder(&stack)
            .engine("tenant-work", Work)
            .concurrency(8)
            .poll_interval(Duration::from_millis(50))
            .schedules(None)
            .start()
            .await
            .unwrap();
        pods.push((stack, pod));
    }
    let client = common::sql_client(&url).await;
    let cap = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        let left: i64 = client
            .query_one(
                "SELECT count(*) FROM proclog.processes WHERE terminal_state IS NULL",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < cap,
            "{left} not ended in 300 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let peaks = sampler.await.unwrap();
    for (stack, pod) in pods {
        pod.shutdown().await;
        stack.shutdown().await;
    }

    // Start delays (from registration to the run's start) and the order of starts.
    let rows = client
        .query(
            "SELECT concurrency_key,
                    (extract(epoch FROM started_at - created_at) * 1000)::float8 AS delay_ms,
                    rank() OVER (ORDER BY started_at) AS start_rank
               FROM proclog.processes WHERE coalesce(queue, kind) = $1",
            &[&QUEUE],
        )
        .await
        .unwrap();
    let mut delays: HashMap<String, Vec<f64>> = HashMap::new();
    let mut lone_rank = 0;
    for row in &rows {
        let key: String = row.get(0);
        let delay: f64 = row.get(1);
        if key == "lone" {
            lone_rank = row.get::<_, i64>(2);
        }
        delays.entry(key).or_default().push(delay);
    }
    let median = |key: &str| -> f64 {
        let mut values = delays[key].clone();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let big_max = delays["big"].iter().copied().fold(0.0, f64::max);
    eprintln!(
        "fairness: lone key started {lone_rank}th of 1,001 after {:.0} ms; big key (520): median {:.0} ms, last {:.0} ms; a key of 10 (k00): median {:.0} ms; samples {}, peaks {:?}",
        delays["lone"][0],
        median("big"),
        big_max,
        median("k00"),
        peaks.samples,
        (
            peaks.queue,
            peaks.pod,
            peaks.keys.get("big"),
            peaks.keys.get("k00")
        ),
    );
    assert!(peaks.samples >= 10, "the sampler ran: {}", peaks.samples);
    assert_eq!(
        peaks.queue, QUEUE_CONCURRENCY,
        "the queue's limit was reached (the test saw the limit bind)"
    );
    // The lone key was served within the first turn of the 50 keys: the first claims took
    // one process of each key, whatever the backlogs (first come, first served would have
    // started it 1,001st).
    assert!(
        lone_rank <= 100,
        "the lone key waited behind backlogs: it started {lone_rank}th"
    );
    assert!(delays["lone"][0] < median("big"));
}

/// A schedule's processes go to the schedule's queue (and are held to its limits).
#[tokio::test]
async fn a_schedules_processes_go_to_its_queue() {
    use proclog::pod::scheduler::{create_schedule, trigger_schedule};
    use proclog::store::ClusterStore;
    use proclog::{InMemoryProcessRegistry, ProcessRegistry, RegistryConfig};
    let registry = InMemoryProcessRegistry::new(RegistryConfig::new("pod-a"));
    let spec: proclog::schedule::ScheduleSpec = serde_json::from_value(json!({
        "id": "nightly", "cron": "0 2 * * *", "kind": "report", "queue": "reports"
    }))
    .unwrap();
    create_schedule(&registry, &registry, &spec).await.unwrap();
    let process = trigger_schedule(&registry, &registry, "nightly")
        .await
        .unwrap();
    assert_eq!(process.queue, "reports");
    // Held by the queue's limits like any of its work.
    registry
        .set_queue(
            "reports",
            &QueueLimits {
                queue: Limits {
                    concurrency: Some(0),
                    ..Limits::default()
                },
                ..QueueLimits::default()
            },
        )
        .await
        .unwrap();
    let claims = registry
        .claim_runnable("pod-a", Duration::from_secs(30), 10)
        .await
        .unwrap();
    assert!(claims.is_empty());
    // A bad queue name is refused with the schedule.
    let bad: proclog::schedule::ScheduleSpec = serde_json::from_value(json!({
        "id": "bad", "cron": "0 2 * * *", "kind": "report", "queue": "no spaces"
    }))
    .unwrap();
    assert!(matches!(
        create_schedule(&registry, &registry, &bad).await,
        Err(proclog::ProcessError::InvalidInput(_))
    ));
}

/// At most `MAX_QUEUES` queues have limits; the next is refused and nothing is stored.
#[tokio::test]
async fn a_queue_beyond_the_most_is_refused() {
    use proclog::store::ClusterStore;
    use proclog::{InMemoryProcessRegistry, RegistryConfig};
    let store = InMemoryProcessRegistry::new(RegistryConfig::new("pod-a"));
    for n in 0..proclog::queue::MAX_QUEUES {
        store
            .set_queue(&format!("q{n:04}"), &QueueLimits::default())
            .await
            .unwrap();
    }
    match store.set_queue("one-more", &QueueLimits::default()).await {
        Err(proclog::ProcessError::InvalidInput(message)) => {
            assert!(message.contains("at most"), "{message}")
        }
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    // Setting an existing queue again is not a new one.
    store.set_queue("q0000", &limits()).await.unwrap();
    assert!(store.get_queue("one-more").await.unwrap().is_none());
}

/// Limits written by hand over SQL that cannot be read: the queue's work is held (never
/// claimed without its limits), other work goes on, and reading the queue says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_limits_hold_their_queue_and_nothing_else() {
    let url = common::migrated_database_url().await;
    let stack = Proclog::builder(url.clone()).start().await.unwrap();
    stack
        .cluster()
        .set_queue("mangled", &limits())
        .await
        .unwrap();
    common::sql_client(&url)
        .await
        .batch_execute(r#"UPDATE proclog.queues SET limits = '{"queue": {"concurrency": "many"}}'"#)
        .await
        .unwrap();
    let registry = stack.registry();
    let held = registry
        .register_process(ProcessRegistration::new("work", json!(null)).in_queue("mangled"))
        .await
        .unwrap();
    let free = registry
        .register_process(ProcessRegistration::new("work", json!(null)))
        .await
        .unwrap();
    let mut claimed = Vec::new();
    for _ in 0..2 {
        claimed.extend(
            registry
                .claim_runnable("pod-a", Duration::from_secs(30), 5)
                .await
                .unwrap()
                .into_iter()
                .map(|claim| claim.process.id),
        );
    }
    assert_eq!(claimed, [free.id]);
    assert!(!claimed.contains(&held.id));
    match stack.cluster().get_queue("mangled").await {
        Err(proclog::ProcessError::Database(message)) => {
            assert!(message.contains("mangled"), "{message}")
        }
        other => panic!("expected a Database error, got {other:?}"),
    }
    stack.shutdown().await;
}
