//! CONTRACT §10 (queues and keys): limits per queue and per key (global concurrency,
//! concurrency per pod, starts per period) never exceeded whatever the number of pods racing,
//! keys served round-robin, priorities within a key, limits changed at run time.

use std::collections::HashMap;
use std::time::Duration;

use futures::future::join_all;
use proclog::queue::{Limits, QueueLimits, RateLimit};
use proclog::{
    Completion, ProcessError, ProcessId, ProcessRegistration, ProcessRegistry, RunnableClaim,
    TerminalState,
};
use serde_json::json;

use crate::common::Store;

const TTL: Duration = Duration::from_secs(60);

fn concurrency(limit: u32) -> Limits {
    Limits {
        concurrency: Some(limit),
        ..Limits::default()
    }
}

async fn register(
    registry: &dyn ProcessRegistry,
    queue: &str,
    key: Option<&str>,
    priority: i16,
) -> ProcessId {
    let mut registration = ProcessRegistration::new("work", json!(null))
        .in_queue(queue)
        .with_priority(priority);
    if let Some(key) = key {
        registration = registration.with_concurrency_key(key);
    }
    registry.register_process(registration).await.unwrap().id
}

async fn finish(registry: &dyn ProcessRegistry, claim: &RunnableClaim) {
    registry
        .complete_process(
            &claim.process.id,
            Completion::new(TerminalState::Completed, json!(null)).fenced(&claim.lease),
        )
        .await
        .unwrap();
}

fn keys_of(claims: &[RunnableClaim]) -> HashMap<String, usize> {
    let mut keys = HashMap::new();
    for claim in claims {
        let key = claim.process.concurrency_key.clone().unwrap_or_default();
        *keys.entry(key).or_default() += 1;
    }
    keys
}

pub async fn a_registration_records_its_queue_key_and_priority(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let plain = registry
        .register_process(ProcessRegistration::new("mail", json!(1)))
        .await
        .unwrap();
    assert_eq!(plain.queue, "mail", "the default queue is the kind's");
    assert_eq!((plain.concurrency_key, plain.priority), (None, 0));
    let placed = ProcessRegistration::new("mail", json!(2))
        .with_id(ProcessId::new("placed").unwrap())
        .in_queue("outbound")
        .with_concurrency_key("tenant-7")
        .with_priority(-3);
    let record = registry.register_process(placed.clone()).await.unwrap();
    assert_eq!(record.queue, "outbound");
    assert_eq!(record.concurrency_key.as_deref(), Some("tenant-7"));
    assert_eq!(record.priority, -3);
    let read = registry.get_process(&record.id).await.unwrap().unwrap();
    assert_eq!((read.queue, read.priority), ("outbound".to_owned(), -3));
    // The same registration again is answered; another queue, key or priority is not it.
    assert_eq!(
        registry.register_process(placed.clone()).await.unwrap().id,
        record.id
    );
    for variant in [
        placed.clone().in_queue("inbound"),
        placed.clone().with_concurrency_key("tenant-8"),
        placed.clone().with_priority(4),
    ] {
        match registry.register_process(variant).await {
            Err(ProcessError::Conflict { id }) => assert_eq!(id, record.id),
            other => panic!("expected Conflict, got {other:?}"),
        }
    }
    for bad in [
        ProcessRegistration::new("mail", json!(3)).in_queue("no spaces"),
        ProcessRegistration::new("mail", json!(3)).with_concurrency_key(""),
        ProcessRegistration::new("mail", json!(3)).with_concurrency_key("x".repeat(257)),
        ProcessRegistration::new("mail", json!(3)).with_priority(101),
    ] {
        match registry.register_process(bad).await {
            Err(ProcessError::InvalidInput(_)) => {}
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }
}

pub async fn racing_pods_never_exceed_a_queue_or_key_limit(store: &dyn Store) {
    let cluster = store.cluster().await;
    let registry = store.pod("setup").await;
    let mut limits = QueueLimits {
        queue: concurrency(5),
        each_key: concurrency(2),
        ..QueueLimits::default()
    };
    limits.keys.insert("wide".into(), concurrency(3));
    cluster.set_queue("limited", &limits).await.unwrap();
    for n in 0..30 {
        let key = ["wide", "a", "b"][n % 3];
        register(registry.as_ref(), "limited", Some(key), 0).await;
    }
    // Work of another queue is not held by this one's limits.
    let free = register(registry.as_ref(), "free", None, 0).await;
    let mut pods = Vec::new();
    for n in 0..6 {
        let name = format!("pod-{n}");
        pods.push((store.pod(&name).await, name));
    }
    let claims: Vec<RunnableClaim> = join_all(
        pods.iter()
            .map(|(pod, name)| pod.claim_runnable(name, TTL, 10)),
    )
    .await
    .into_iter()
    .flat_map(Result::unwrap)
    .collect();
    let limited: Vec<RunnableClaim> = claims
        .iter()
        .filter(|claim| claim.process.id != free)
        .cloned()
        .collect();
    assert!(claims.iter().any(|claim| claim.process.id == free));
    assert_eq!(
        limited.len(),
        5,
        "the queue's limit, reached: {:?}",
        keys_of(&limited)
    );
    let keys = keys_of(&limited);
    assert!(keys.get("wide").copied().unwrap_or(0) <= 3, "{keys:?}");
    assert!(keys.get("a").copied().unwrap_or(0) <= 2, "{keys:?}");
    assert!(keys.get("b").copied().unwrap_or(0) <= 2, "{keys:?}");
    // Full: nothing more, from any pod, until a slot frees.
    assert!(
        pods[0]
            .0
            .claim_runnable("pod-0", TTL, 10)
            .await
            .unwrap()
            .is_empty()
    );
    finish(registry.as_ref(), &limited[0]).await;
    let next = pods[1].0.claim_runnable("pod-1", TTL, 10).await.unwrap();
    assert_eq!(next.len(), 1, "one slot freed");
}

pub async fn a_per_pod_limit_holds_each_pod(store: &dyn Store) {
    let cluster = store.cluster().await;
    let registry = store.pod("setup").await;
    let mut limits = QueueLimits::default();
    limits.queue.per_pod = Some(2);
    limits.each_key.per_pod = Some(1);
    cluster.set_queue("per-pod", &limits).await.unwrap();
    for n in 0..12 {
        register(
            registry.as_ref(),
            "per-pod",
            Some(["x", "y", "z"][n % 3]),
            0,
        )
        .await;
    }
    let a = store.pod("pod-a").await;
    let b = store.pod("pod-b").await;
    let first = a.claim_runnable("pod-a", TTL, 10).await.unwrap();
    assert_eq!(first.len(), 2, "two per pod, one per key per pod");
    assert_eq!(keys_of(&first).len(), 2, "{:?}", keys_of(&first));
    assert!(a.claim_runnable("pod-a", TTL, 10).await.unwrap().is_empty());
    let second = b.claim_runnable("pod-b", TTL, 10).await.unwrap();
    assert_eq!(second.len(), 2, "another pod has its own share");
}

pub async fn keys_are_served_round_robin(store: &dyn Store) {
    let cluster = store.cluster().await;
    let registry = store.pod("setup").await;
    cluster
        .set_queue("fair", &QueueLimits::default())
        .await
        .unwrap();
    for _ in 0..20 {
        register(registry.as_ref(), "fair", Some("backlog"), 0).await;
    }
    let lone = register(registry.as_ref(), "fair", Some("lone"), 0).await;
    let pod = store.pod("pod-a").await;
    let first = pod.claim_runnable("pod-a", TTL, 1).await.unwrap();
    let second = pod.claim_runnable("pod-a", TTL, 1).await.unwrap();
    let served: Vec<&ProcessId> = first.iter().chain(&second).map(|c| &c.process.id).collect();
    assert!(
        served.contains(&&lone),
        "a key with one process is served within one turn of the key with a backlog: {served:?}"
    );
    // A claim of several takes one per key per turn.
    for _ in 0..3 {
        register(registry.as_ref(), "fair", Some("third"), 0).await;
    }
    let batch = pod.claim_runnable("pod-a", TTL, 4).await.unwrap();
    let keys = keys_of(&batch);
    assert_eq!(keys.get("third"), Some(&2), "{keys:?}");
    assert_eq!(keys.get("backlog"), Some(&2), "{keys:?}");
}

pub async fn priority_orders_a_keys_work(store: &dyn Store) {
    let cluster = store.cluster().await;
    let registry = store.pod("setup").await;
    cluster
        .set_queue("ranked", &QueueLimits::default())
        .await
        .unwrap();
    let low = register(registry.as_ref(), "ranked", None, -1).await;
    let normal = register(registry.as_ref(), "ranked", None, 0).await;
    let high = register(registry.as_ref(), "ranked", None, 5).await;
    let pod = store.pod("pod-a").await;
    let mut order = Vec::new();
    for _ in 0..3 {
        let claims = pod.claim_runnable("pod-a", TTL, 1).await.unwrap();
        order.extend(claims.into_iter().map(|claim| claim.process.id));
    }
    assert_eq!(order, [high, normal, low]);
}

pub async fn a_rate_limit_counts_starts_in_its_period(store: &dyn Store) {
    let cluster = store.cluster().await;
    let registry = store.pod("setup").await;
    let mut limits = QueueLimits::default();
    limits.queue.rate = Some(RateLimit {
        starts: 2,
        period_ms: 3_600_000,
    });
    cluster.set_queue("metered", &limits).await.unwrap();
    for _ in 0..5 {
        register(registry.as_ref(), "metered", None, 0).await;
    }
    let pod = store.pod("pod-a").await;
    let claims = pod.claim_runnable("pod-a", TTL, 5).await.unwrap();
    assert_eq!(claims.len(), 2);
    for claim in &claims {
        finish(registry.as_ref(), claim).await;
    }
    assert!(
        pod.claim_runnable("pod-a", TTL, 5)
            .await
            .unwrap()
            .is_empty(),
        "ended runs still count as starts within the period"
    );
    // A short period passes: starts are counted again.
    limits.queue.rate = Some(RateLimit {
        starts: 2,
        period_ms: 1,
    });
    cluster.set_queue("metered", &limits).await.unwrap();
    let after = store.now().await + chrono::TimeDelta::milliseconds(2);
    crate::durable::wait_until(store, after).await;
    assert_eq!(pod.claim_runnable("pod-a", TTL, 5).await.unwrap().len(), 2);
}

pub async fn limits_change_at_run_time(store: &dyn Store) {
    let cluster = store.cluster().await;
    let registry = store.pod("setup").await;
    let mut limits = QueueLimits {
        queue: concurrency(0),
        ..QueueLimits::default()
    };
    let record = cluster.set_queue("held", &limits).await.unwrap();
    assert_eq!(record.limits, limits);
    for _ in 0..4 {
        register(registry.as_ref(), "held", Some("k"), 0).await;
    }
    let pod = store.pod("pod-a").await;
    assert!(
        pod.claim_runnable("pod-a", TTL, 10)
            .await
            .unwrap()
            .is_empty(),
        "0 holds the work"
    );
    let view = cluster.get_queue("held").await.unwrap().unwrap();
    assert_eq!(view.keys.len(), 1);
    assert_eq!((view.keys[0].running, view.keys[0].ready), (0, 4));
    limits.queue = concurrency(1);
    cluster.set_queue("held", &limits).await.unwrap();
    assert_eq!(pod.claim_runnable("pod-a", TTL, 10).await.unwrap().len(), 1);
    let view = cluster.get_queue("held").await.unwrap().unwrap();
    assert_eq!((view.keys[0].running, view.keys[0].ready), (1, 3));
    // Without limits, the queue's work is claimed as any other's.
    assert!(cluster.delete_queue("held").await.unwrap());
    assert!(!cluster.delete_queue("held").await.unwrap());
    assert!(cluster.get_queue("held").await.unwrap().is_none());
    assert_eq!(pod.claim_runnable("pod-a", TTL, 10).await.unwrap().len(), 3);
    let names: Vec<String> = cluster
        .list_queues(None, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|queue| queue.queue)
        .collect();
    assert!(names.is_empty(), "{names:?}");
    // Bad limits are refused, naming what is wrong; nothing is stored.
    let mut bad = QueueLimits::default();
    bad.each_key.rate = Some(RateLimit {
        starts: 0,
        period_ms: 1_000,
    });
    match cluster.set_queue("held", &bad).await {
        Err(ProcessError::InvalidInput(message)) => {
            assert!(message.contains("each_key"), "{message}")
        }
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    assert!(matches!(
        cluster.set_queue("bad name", &QueueLimits::default()).await,
        Err(ProcessError::InvalidInput(_))
    ));
    assert!(cluster.list_queues(None, 100).await.unwrap().is_empty());
}

pub async fn a_waiting_process_holds_no_slot(store: &dyn Store) {
    let cluster = store.cluster().await;
    let registry = store.pod("setup").await;
    let limits = QueueLimits {
        queue: concurrency(1),
        ..QueueLimits::default()
    };
    cluster.set_queue("one", &limits).await.unwrap();
    let first = register(registry.as_ref(), "one", None, 0).await;
    let second = register(registry.as_ref(), "one", None, 0).await;
    let pod = store.pod("pod-a").await;
    let claims = pod.claim_runnable("pod-a", TTL, 5).await.unwrap();
    assert_eq!(claims.len(), 1);
    assert_eq!(claims[0].process.id, first);
    pod.suspend(
        &claims[0].lease,
        proclog::Suspension {
            wake_at: None,
            delay: None,
            topic: Some("go".into()),
            after_seq: claims[0].process.last_seq,
            retry: false,
            reason: json!({"reason": "test"}),
        },
    )
    .await
    .unwrap();
    let next = pod.claim_runnable("pod-a", TTL, 5).await.unwrap();
    assert_eq!(next.len(), 1, "the waiting process gave its slot up");
    assert_eq!(next[0].process.id, second);
}

pub async fn queues_are_listed_by_pages(store: &dyn Store) {
    let cluster = store.cluster().await;
    for name in ["c-queue", "a-queue", "b-queue"] {
        cluster
            .set_queue(name, &QueueLimits::default())
            .await
            .unwrap();
    }
    let names = |page: Vec<proclog::queue::QueueRecord>| -> Vec<String> {
        page.into_iter().map(|queue| queue.queue).collect()
    };
    assert_eq!(
        names(cluster.list_queues(None, 2).await.unwrap()),
        ["a-queue", "b-queue"]
    );
    assert_eq!(
        names(cluster.list_queues(Some("b-queue"), 2).await.unwrap()),
        ["c-queue"]
    );
    for limit in [0, 101] {
        assert!(matches!(
            cluster.list_queues(None, limit).await,
            Err(ProcessError::InvalidInput(_))
        ));
    }
}

pub async fn a_process_past_its_deadline_is_failed_whatever_the_limits(store: &dyn Store) {
    let cluster = store.cluster().await;
    let registry = store.pod("setup").await;
    let limits = QueueLimits {
        queue: concurrency(0),
        ..QueueLimits::default()
    };
    cluster.set_queue("held-late", &limits).await.unwrap();
    let mut registration = ProcessRegistration::new("work", json!(null)).in_queue("held-late");
    registration.timeout_ms = Some(1);
    let late = registry.register_process(registration).await.unwrap();
    crate::durable::wait_until(store, late.deadline.unwrap()).await;
    let pod = store.pod("pod-a").await;
    let claims = pod.claim_runnable("pod-a", TTL, 5).await.unwrap();
    assert_eq!(
        claims.iter().map(|c| &c.process.id).collect::<Vec<_>>(),
        [&late.id],
        "claimed to be failed (no engine runs), though the queue holds its work"
    );
}

pub async fn keys_that_cannot_be_served_do_not_hold_the_turn(store: &dyn Store) {
    let cluster = store.cluster().await;
    let registry = store.pod("setup").await;
    cluster
        .set_queue("crowded", &QueueLimits::default())
        .await
        .unwrap();
    // More keys than one claim visits, each with work that is not runnable yet ...
    for n in 0..proclog::queue::MAX_KEY_VISITS + 20 {
        registry
            .register_process(
                ProcessRegistration::new("work", json!(null))
                    .in_queue("crowded")
                    .with_concurrency_key(format!("asleep-{n:04}"))
                    .start_in(Duration::from_secs(3_600)),
            )
            .await
            .unwrap();
    }
    // ... and after them in key order, a key with runnable work.
    let ready = register(registry.as_ref(), "crowded", Some("ready"), 0).await;
    let pod = store.pod("pod-a").await;
    let mut served = Vec::new();
    for _ in 0..2 {
        served.extend(
            pod.claim_runnable("pod-a", TTL, 1)
                .await
                .unwrap()
                .into_iter()
                .map(|claim| claim.process.id),
        );
    }
    assert_eq!(
        served,
        [ready],
        "the second claim goes on from where the first stopped"
    );
}

pub async fn within_a_turn_higher_priority_goes_first(store: &dyn Store) {
    let cluster = store.cluster().await;
    let registry = store.pod("setup").await;
    let limits = QueueLimits {
        queue: concurrency(1),
        ..QueueLimits::default()
    };
    cluster.set_queue("urgent", &limits).await.unwrap();
    register(registry.as_ref(), "urgent", Some("a-routine"), 0).await;
    let urgent = register(registry.as_ref(), "urgent", Some("b-urgent"), 9).await;
    let pod = store.pod("pod-a").await;
    let claims = pod.claim_runnable("pod-a", TTL, 2).await.unwrap();
    assert_eq!(
        claims.iter().map(|c| &c.process.id).collect::<Vec<_>>(),
        [&urgent],
        "the one slot goes to the higher priority of the keys visited"
    );
}
