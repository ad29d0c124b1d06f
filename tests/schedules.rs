//! CONTRACT §10, schedules: the store's rules on both backends, and every due time making
//! exactly the processes its catch-up policy promises when every pod was down across
//! several of them and three pods race to catch up.

#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use proclog::pod::Pod;
use proclog::pod::scheduler::{create_schedule, pause_schedule, tick, trigger_schedule};
use proclog::schedule::{CatchUpPolicy, OverlapPolicy, ScheduleSpec, due_process_id};
use proclog::store::{ClusterStore, ScheduleProgress};
use proclog::{
    InMemoryProcessRegistry, ProcessError, ProcessFilter, ProcessRegistry, Proclog, RegistryConfig,
};
use serde_json::json;

fn spec(id: &str, cron: &str) -> ScheduleSpec {
    serde_json::from_value(json!({"id": id, "cron": cron, "kind": "tick"})).unwrap()
}

async fn store_rules(store: &dyn ClusterStore, registry: &dyn ProcessRegistry) {
    let nightly = spec("nightly", "0 2 * * *");
    let made = create_schedule(store, registry, &nightly).await.unwrap();
    assert_eq!(
        (
            made.spec.time_zone.as_str(),
            made.spec.overlap,
            made.spec.catch_up
        ),
        ("UTC", OverlapPolicy::Skip, CatchUpPolicy::SkipMissed),
        "the defaults"
    );
    let next = made.next_due_at.expect("a first due time");
    assert!(next > Utc::now() && next <= Utc::now() + TimeDelta::days(1));
    assert_eq!(
        create_schedule(store, registry, &nightly).await.unwrap(),
        made,
        "idempotent"
    );
    let other = spec("nightly", "0 3 * * *");
    assert!(matches!(
        create_schedule(store, registry, &other).await,
        Err(ProcessError::InvalidInput(msg)) if msg.contains("delete it first")
    ));
    let mut bad = Vec::new();
    for (field, value) in [
        ("cron", json!("61 * * * *")),
        ("cron", json!("* * *")),
        ("cron", json!("0 0 30 2 *")),
        ("time_zone", json!("Mars/Olympus")),
        ("id", json!("x".repeat(65))),
        ("id", json!("has space")),
        ("kind", json!("")),
        ("catch_up_limit", json!(0)),
        ("missed_after_ms", json!(86_400_001u64)),
    ] {
        let mut value_spec = serde_json::to_value(spec("bad", "* * * * *")).unwrap();
        value_spec[field] = value.clone();
        let bad_spec: ScheduleSpec = serde_json::from_value(value_spec).unwrap();
        bad.push(create_schedule(store, registry, &bad_spec).await);
        assert!(
            matches!(bad.last(), Some(Err(ProcessError::InvalidInput(_)))),
            "{field} = {value}: {:?}",
            bad.last()
        );
    }
    let mut huge = spec("huge", "* * * * *");
    huge.input = json!("x".repeat(registry.payload_limit() + 1));
    assert!(matches!(
        create_schedule(store, registry, &huge).await,
        Err(ProcessError::PayloadTooLarge { .. })
    ));
    assert!(store.get_schedule("bad").await.unwrap().is_none());

    // Pause and resume; a paused schedule is never due.
    let paused = pause_schedule(store, "nightly", true).await.unwrap();
    assert!(paused.paused);
    let resumed = pause_schedule(store, "nightly", false).await.unwrap();
    assert!(!resumed.paused && resumed.next_due_at.is_some());
    assert!(matches!(
        pause_schedule(store, "nope", true).await,
        Err(ProcessError::ScheduleNotFound(_))
    ));

    // A schedule due now: one owner's claim excludes another's; only the claimer moves it.
    let every_second = spec("every-second", "* * * * * *");
    let made = create_schedule(store, registry, &every_second)
        .await
        .unwrap();
    let due = made.next_due_at.unwrap();
    while Utc::now() < due + TimeDelta::milliseconds(50) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (claimed, now) = store
        .claim_due_schedules("pod-a", Duration::from_secs(30), 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1, "{claimed:?}");
    assert!(now >= due);
    let (none, _) = store
        .claim_due_schedules("pod-b", Duration::from_secs(30), 10)
        .await
        .unwrap();
    assert!(none.is_empty(), "claimed by pod-a");
    let progress = ScheduleProgress {
        next_due_at: Some(due + TimeDelta::seconds(1)),
        skipped: 0,
        last: Some((due, due_process_id("every-second", due))),
        held: false,
    };
    assert!(
        !store
            .advance_schedule("every-second", "pod-b", Some(due), &progress)
            .await
            .unwrap()
    );
    assert!(
        !store
            .advance_schedule(
                "every-second",
                "pod-a",
                Some(due - TimeDelta::seconds(1)),
                &progress
            )
            .await
            .unwrap(),
        "moved from another due time"
    );
    assert!(
        store
            .advance_schedule("every-second", "pod-a", Some(due), &progress)
            .await
            .unwrap()
    );
    let moved = store.get_schedule("every-second").await.unwrap().unwrap();
    assert_eq!(moved.next_due_at, Some(due + TimeDelta::seconds(1)));
    assert_eq!(
        moved.last_process_id,
        Some(due_process_id("every-second", due))
    );

    // A tick produces the due times; a trigger starts one now.
    while Utc::now() < due + TimeDelta::milliseconds(1_100) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = tick(store, registry, "pod-a").await.unwrap();
    assert!(report.produced >= 1, "{report:?}");
    let produced = due_process_id("every-second", due + TimeDelta::seconds(1));
    assert!(registry.get_process(&produced).await.unwrap().is_some());
    let manual = trigger_schedule(store, registry, "every-second")
        .await
        .unwrap();
    assert!(manual.id.as_str().starts_with("every-second.manual."));
    assert!(matches!(
        trigger_schedule(store, registry, "nope").await,
        Err(ProcessError::ScheduleNotFound(_))
    ));

    let page = store.list_schedules(None, 1).await.unwrap();
    assert_eq!(page[0].spec.id, "every-second");
    let rest = store
        .list_schedules(Some("every-second"), 10)
        .await
        .unwrap();
    assert_eq!(
        rest.iter().map(|s| s.spec.id.as_str()).collect::<Vec<_>>(),
        ["nightly"]
    );
    assert!(store.delete_schedule("every-second").await.unwrap());
    assert!(!store.delete_schedule("every-second").await.unwrap());

    // A hold (queue_one) is looked at again a second later; a pause ends it. A schedule with
    // no due time left asks no pod to come back.
    let ending = create_schedule(store, registry, &spec("ending", "* * * * * *"))
        .await
        .unwrap();
    let due = ending.next_due_at.unwrap();
    while Utc::now() < due + TimeDelta::milliseconds(50) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (claimed, _) = store
        .claim_due_schedules("pod-a", Duration::from_secs(30), 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let hold = ScheduleProgress {
        next_due_at: Some(due),
        skipped: 0,
        last: None,
        held: true,
    };
    assert!(
        store
            .advance_schedule("ending", "pod-a", Some(due), &hold)
            .await
            .unwrap()
    );
    assert!(store.get_schedule("ending").await.unwrap().unwrap().held);
    let next = store.next_schedule_due().await.unwrap().unwrap();
    assert!(
        next > due + TimeDelta::milliseconds(500),
        "after the hold: {next}"
    );
    assert!(!pause_schedule(store, "ending", true).await.unwrap().held);
    let resumed = pause_schedule(store, "ending", false).await.unwrap();
    while Utc::now() < resumed.next_due_at.unwrap() + TimeDelta::milliseconds(50) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (claimed, _) = store
        .claim_due_schedules("pod-a", Duration::from_secs(30), 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let last = ScheduleProgress {
        next_due_at: None,
        skipped: 0,
        last: None,
        held: false,
    };
    assert!(
        store
            .advance_schedule("ending", "pod-a", resumed.next_due_at, &last)
            .await
            .unwrap()
    );
    let next = store.next_schedule_due().await.unwrap();
    assert!(
        next.is_some_and(|next| next > Utc::now() + TimeDelta::minutes(1)),
        "only the nightly schedule is ahead: {next:?}"
    );
    assert!(store.delete_schedule("ending").await.unwrap());
    assert!(
        registry.get_process(&produced).await.unwrap().is_some(),
        "its processes stay"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_follow_the_same_rules_in_memory_and_on_postgres() {
    let memory = InMemoryProcessRegistry::new(RegistryConfig::new("memory"));
    store_rules(&memory, &memory).await;
    let stack = Proclog::builder(common::migrated_database_url().await)
        .start()
        .await
        .unwrap();
    store_rules(stack.cluster().as_ref(), stack.registry().as_ref()).await;
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_follow_the_same_rules_on_citus() {
    if !common::citus_installed() {
        return;
    }
    let url = proclog::testing::migrated_citus_database_url()
        .await
        .unwrap();
    let stack = Proclog::builder(url).start().await.unwrap();
    store_rules(stack.cluster().as_ref(), stack.registry().as_ref()).await;
    stack.shutdown().await;
}

/// The database clock.
async fn db_now(url: &str) -> DateTime<Utc> {
    common::sql_client(url)
        .await
        .query_one("SELECT now()", &[])
        .await
        .unwrap()
        .get(0)
}

async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let cap = tokio::time::Instant::now() + Duration::from_secs(90);
    while !check().await {
        assert!(tokio::time::Instant::now() < cap, "{what}: not in 90 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Three pods, each with its own stack, producing schedules every 100 ms at most.
async fn start_pods(url: &str, round: &str) -> Vec<(Proclog, Pod)> {
    let mut pods = Vec::new();
    for n in 0..3 {
        let stack = Proclog::builder(url)
            .pod_id(format!("sched-{round}-{n}"))
            .start()
            .await
            .unwrap();
        let pod = Pod::builder(&stack)
            .concurrency(0)
            .schedules(Some(Duration::from_millis(100)))
            .start()
            .await
            .unwrap();
        pods.push((stack, pod));
    }
    pods
}

async fn stop_pods(pods: Vec<(Proclog, Pod)>) {
    for (stack, pod) in pods {
        pod.shutdown().await;
        stack.shutdown().await;
    }
}

/// The due times of the processes of `kind`, from their ids.
async fn produced(registry: &dyn ProcessRegistry, schedule: &str) -> BTreeSet<DateTime<Utc>> {
    let mut dues = BTreeSet::new();
    let mut filter = ProcessFilter {
        kind: Some(schedule.to_owned()),
        limit: Some(1_000),
        ..Default::default()
    };
    loop {
        let page = registry.list_processes(filter.clone()).await.unwrap();
        for process in &page.processes {
            let stamp = process.id.as_str().rsplit('.').next().unwrap();
            let due = chrono::NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%SZ")
                .unwrap_or_else(|err| panic!("{}: {err}", process.id))
                .and_utc();
            assert!(dues.insert(due), "one process per due time: {}", process.id);
        }
        match page.next {
            Some(next) => filter.after = Some(next),
            None => return dues,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_pod_down_across_three_due_times_then_three_pods_catch_up_as_promised() {
    let url = common::migrated_database_url().await;
    let pods = start_pods(&url, "a").await;
    let (stack, _) = &pods[0];
    let (store, registry) = (stack.cluster().clone(), stack.registry().clone());
    // Due every 2 s (even seconds); a due time no pod came to for 1 s is missed.
    let policies = [
        ("skip-missed", CatchUpPolicy::SkipMissed),
        ("run-once", CatchUpPolicy::RunOnce),
        ("run-all", CatchUpPolicy::RunAll),
    ];
    for (id, catch_up) in policies {
        let spec = ScheduleSpec {
            kind: id.to_owned(),
            overlap: OverlapPolicy::Allow,
            catch_up,
            missed_after_ms: 1_000,
            disposition: proclog::Disposition::External,
            ..spec(id, "*/2 * * * * *")
        };
        create_schedule(store.as_ref(), registry.as_ref(), &spec)
            .await
            .unwrap();
    }
    for (id, _) in policies {
        until("a first due time produced", || async {
            !produced(registry.as_ref(), id).await.is_empty()
        })
        .await;
    }
    stop_pods(pods).await;

    // Every pod is down. The last due time each schedule produced, then three more pass.
    let stack = Proclog::builder(url.clone()).start().await.unwrap();
    let registry = stack.registry().clone();
    let mut last_before = Vec::new();
    for (id, _) in policies {
        last_before.push(*produced(registry.as_ref(), id).await.last().unwrap());
    }
    let latest = *last_before.iter().max().unwrap();
    // Restart 1.1 s after an odd second: the three due times after `latest` are then more than
    // a second old (missed), and the next one is 0.9 s ahead.
    let restart_at = latest + TimeDelta::milliseconds(7_100);
    until("three due times passed with no pod", || async {
        db_now(&url).await >= restart_at
    })
    .await;
    let pods = start_pods(&url, "b").await;
    let after = latest + TimeDelta::seconds(10);
    for (id, _) in policies {
        until("due times after the restart produced", || async {
            produced(registry.as_ref(), id)
                .await
                .last()
                .is_some_and(|last| *last >= after)
        })
        .await;
    }
    stop_pods(pods).await;

    for ((id, catch_up), last) in policies.iter().zip(&last_before) {
        let dues = produced(registry.as_ref(), id).await;
        let missed: Vec<DateTime<Utc>> = (1..)
            .map(|n| *last + TimeDelta::seconds(2 * n))
            .take_while(|due| *due <= latest + TimeDelta::seconds(6))
            .collect();
        assert!(missed.len() >= 3, "{id}: {missed:?}");
        let made: Vec<_> = missed.iter().filter(|due| dues.contains(due)).collect();
        match catch_up {
            CatchUpPolicy::SkipMissed => assert!(made.is_empty(), "{id}: {made:?}"),
            CatchUpPolicy::RunOnce => {
                assert_eq!(
                    made,
                    [missed.last().unwrap()],
                    "{id}: the latest missed only"
                )
            }
            CatchUpPolicy::RunAll => assert_eq!(made.len(), missed.len(), "{id}: every missed"),
        }
        // After the restart every due time made its process, once (ids are unique per due
        // time: `produced` fails on a second process of one).
        for n in 4..=5 {
            let due = latest + TimeDelta::seconds(2 * n);
            assert!(dues.contains(&due), "{id}: {due} after the restart");
        }
        let record = stack.cluster().get_schedule(id).await.unwrap().unwrap();
        let skipped = match catch_up {
            CatchUpPolicy::SkipMissed => missed.len() as i64,
            CatchUpPolicy::RunOnce => missed.len() as i64 - 1,
            CatchUpPolicy::RunAll => 0,
        };
        assert!(record.skipped >= skipped, "{id}: {record:?}");
    }
    stack.shutdown().await;
}
