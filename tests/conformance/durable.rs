//! CONTRACT §9 (registry side): waiting without a lease, wake times, messages, retries,
//! start times and deadlines.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use proclog::{
    Completion, Disposition, Lease, Message, ProcessError, ProcessId, ProcessRegistration,
    ProcessRegistry, ProcessStatus, RetryPolicy, Suspension, TerminalState,
};
use serde_json::json;

use crate::common::Store;
use crate::support::{claim, log};

const MINUTE: Duration = Duration::from_secs(60);

/// Waits, on the store's clock, until `at` has passed.
pub(crate) async fn wait_until(store: &dyn Store, at: DateTime<Utc>) {
    while store.now().await <= at {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn wait(delay: Option<Duration>, topic: Option<&str>, after_seq: i64) -> Suspension {
    Suspension {
        wake_at: None,
        delay,
        topic: topic.map(str::to_owned),
        after_seq,
        retry: false,
        reason: json!({"reason": "test"}),
    }
}

/// Registers a process and claims it as pod `pod` would.
async fn running(registry: &dyn ProcessRegistry, registration: ProcessRegistration) -> Lease {
    let id = registry.register_process(registration).await.unwrap().id;
    let claims = registry.claim_runnable("pod", MINUTE, 100).await.unwrap();
    claims
        .into_iter()
        .find(|claim| claim.process.id == id)
        .expect("the new process is claimable")
        .lease
}

async fn claimable(registry: &dyn ProcessRegistry) -> Vec<ProcessId> {
    let claims = registry.claim_runnable("pod", MINUTE, 100).await.unwrap();
    claims.into_iter().map(|claim| claim.process.id).collect()
}

pub async fn a_delayed_start_is_not_claimed_before_its_time(store: &dyn Store) {
    let registry = store.pod("pod").await;
    let later = registry
        .register_process(
            // Long enough that the checks before the start time finish before it, even on
            // Citus under the whole suite's load (300 ms was not, once).
            ProcessRegistration::new("demo", json!(1)).start_in(Duration::from_millis(2_000)),
        )
        .await
        .unwrap();
    assert_eq!(later.status, ProcessStatus::Pending);
    let start = later.wake_at.expect("a start time on the row");
    assert!(start >= later.created_at + TimeDelta::milliseconds(2_000));
    assert!(
        claimable(&*registry).await.is_empty(),
        "not before its time"
    );
    let wake = registry.next_wake().await.unwrap().expect("a wake time");
    assert!(wake <= Duration::from_millis(2_000), "{wake:?}");

    wait_until(store, start).await;
    let claims = registry.claim_runnable("pod", MINUTE, 10).await.unwrap();
    assert_eq!(claims.len(), 1);
    let claim = &claims[0];
    assert_eq!(claim.process.id, later.id);
    assert_eq!(claim.process.attempts, 1);
    assert!(!claim.resumed, "a first start is no resume");
    assert_eq!(claim.process.wake_at, None);

    let at = store.now().await + TimeDelta::hours(1);
    let record = registry
        .register_process(ProcessRegistration::new("demo", json!(2)).start_at(at))
        .await
        .unwrap();
    assert_eq!(record.wake_at, Some(at));
    assert!(claimable(&*registry).await.is_empty());
}

pub async fn a_suspended_process_waits_without_a_lease_and_resumes(store: &dyn Store) {
    let registry = store.pod("pod").await;
    let lease = running(&*registry, ProcessRegistration::new("demo", json!(1))).await;
    let id = lease.process_id.clone();
    // Long enough that the checks before the wake time finish before it, even on Citus under
    // the whole suite's load (200 ms was not, once).
    let waiting = registry
        .suspend(&lease, wait(Some(Duration::from_millis(1_500)), None, 0))
        .await
        .unwrap();
    assert_eq!(waiting.status, ProcessStatus::Waiting);
    assert!(waiting.lease.is_none(), "a waiting process holds no lease");
    let wake = waiting.wake_at.expect("a wake time");
    let events = log(&*registry, &id).await;
    let last = events.last().unwrap();
    assert_eq!(last.event_type, "process.waiting");
    assert_eq!(last.payload["reason"], "test");
    assert_eq!(last.lease_generation, Some(lease.generation));
    assert_eq!(
        serde_json::from_value::<DateTime<Utc>>(last.payload["wake_at"].clone()).unwrap(),
        wake
    );

    // A retry after a lost answer changes nothing; the old lease writes nothing more.
    let again = registry
        .suspend(&lease, wait(Some(Duration::from_millis(1_500)), None, 0))
        .await
        .unwrap();
    assert_eq!(again.last_seq, waiting.last_seq);
    let refused = registry
        .append_event(
            &id,
            proclog::AppendRequest::new("late", json!(1)).fenced(&lease),
        )
        .await;
    assert!(matches!(refused, Err(ProcessError::LeaseLost { .. })));

    assert!(
        claimable(&*registry).await.is_empty(),
        "not before its wake time"
    );
    wait_until(store, wake).await;
    let claims = registry.claim_runnable("pod", MINUTE, 10).await.unwrap();
    assert_eq!(claims.len(), 1);
    assert!(claims[0].resumed, "a resume after a wait");
    assert_eq!(claims[0].process.attempts, 1, "a resume is no rerun");
    assert!(claims[0].lost_owner.is_none());
    assert_eq!(claims[0].process.status, ProcessStatus::Running);
    assert_eq!(claims[0].lease.generation, lease.generation + 1);
}

pub async fn suspension_refusals(store: &dyn Store) {
    let registry = store.pod("pod").await;
    let lease = running(&*registry, ProcessRegistration::new("demo", json!(1))).await;
    let bad_topic = registry
        .suspend(&lease, wait(None, Some("no spaces"), 0))
        .await;
    assert!(matches!(bad_topic, Err(ProcessError::InvalidInput(_))));
    let too_long = registry
        .suspend(
            &lease,
            wait(Some(Duration::from_secs(200 * 366 * 86_400)), None, 0),
        )
        .await;
    assert!(matches!(too_long, Err(ProcessError::InvalidInput(_))));

    let mut unknown = lease.clone();
    unknown.process_id = ProcessId::new("no-such-process").unwrap();
    let missing = registry.suspend(&unknown, wait(None, Some("t"), 0)).await;
    assert!(matches!(missing, Err(ProcessError::NotFound(_))));

    // A lease that is no longer the live one.
    registry.release(&lease).await.unwrap();
    let taken = claim(&*registry, &lease.process_id, "other").await;
    let stale = registry.suspend(&lease, wait(None, Some("t"), 0)).await;
    assert!(matches!(stale, Err(ProcessError::LeaseLost { .. })));

    registry
        .complete_process(
            &lease.process_id,
            Completion::new(TerminalState::Completed, json!(1)).fenced(&taken),
        )
        .await
        .unwrap();
    let ended = registry.suspend(&taken, wait(None, Some("t"), 0)).await;
    assert!(matches!(ended, Err(ProcessError::ProcessTerminal { .. })));
    assert_eq!(
        log(&*registry, &lease.process_id).await.len(),
        1,
        "refusals wrote nothing"
    );
}

pub async fn a_message_wakes_a_process_waiting_for_its_topic(store: &dyn Store) {
    let registry = store.pod("pod").await;
    let lease = running(&*registry, ProcessRegistration::new("demo", json!(1))).await;
    let id = lease.process_id.clone();
    let waiting = registry
        .suspend(&lease, wait(None, Some("approve"), 0))
        .await
        .unwrap();
    assert_eq!(waiting.wake_at, None, "only a message wakes it");
    assert_eq!(waiting.waiting_for.as_deref(), Some("approve"));
    assert!(claimable(&*registry).await.is_empty());
    assert_eq!(registry.next_wake().await.unwrap(), None);

    let other = registry
        .send_message(&id, Message::new("other", json!({"x": 1})))
        .await
        .unwrap();
    assert_eq!(other.event.event_type, "process.message");
    assert_eq!(
        other.event.payload,
        json!({"topic": "other", "payload": {"x": 1}})
    );
    assert!(claimable(&*registry).await.is_empty(), "another topic");

    let approve = Message::new("approve", json!({"by": "ann"})).with_replay_key("m1");
    let sent = registry.send_message(&id, approve.clone()).await.unwrap();
    assert!(!sent.replayed);
    assert_eq!(sent.event.replay_key.as_deref(), Some("proclog:msg:m1"));
    let again = registry.send_message(&id, approve).await.unwrap();
    assert!(again.replayed, "idempotent by key");
    assert_eq!(again.event.seq, sent.event.seq);
    let conflict = registry
        .send_message(
            &id,
            Message::new("approve", json!({"by": "bob"})).with_replay_key("m1"),
        )
        .await;
    assert!(matches!(conflict, Err(ProcessError::ReplayConflict { .. })));

    let claims = registry.claim_runnable("pod", MINUTE, 10).await.unwrap();
    assert_eq!(claims.len(), 1, "the message made it runnable at once");
    assert!(claims[0].resumed);
    assert_eq!(claims[0].process.waiting_for, None);

    let first = registry.next_message(&id, "approve", 0).await.unwrap();
    assert_eq!(first.map(|event| event.seq), Some(sent.event.seq));
    let none = registry
        .next_message(&id, "approve", sent.event.seq)
        .await
        .unwrap();
    assert!(none.is_none());
    assert!(
        registry.journal(&id, 0, 100).await.unwrap().is_empty(),
        "messages are not journal"
    );
}

pub async fn a_message_already_there_ends_a_suspension_at_once(store: &dyn Store) {
    let registry = store.pod("pod").await;
    let lease = running(&*registry, ProcessRegistration::new("demo", json!(1))).await;
    let id = lease.process_id.clone();
    let sent = registry
        .send_message(&id, Message::new("go", json!(1)))
        .await
        .unwrap();
    // Waiting for messages after the one already received: it still waits.
    let lease2 = {
        let waiting = registry
            .suspend(&lease, wait(None, Some("go"), sent.event.seq))
            .await
            .unwrap();
        assert_eq!(waiting.wake_at, None);
        claim(&*registry, &id, "host").await
    };
    registry.release(&lease2).await.unwrap();
    let record = registry.get_process(&id).await.unwrap().unwrap();
    assert_eq!(
        record.status,
        ProcessStatus::Waiting,
        "a release gives the wait back"
    );
    assert!(claimable(&*registry).await.is_empty());

    let second = registry
        .send_message(&id, Message::new("go", json!(2)))
        .await
        .unwrap();
    let claims = registry.claim_runnable("pod", MINUTE, 10).await.unwrap();
    assert_eq!(claims.len(), 1);
    // Now suspend for a message that is already stored: runnable at once.
    let waiting = registry
        .suspend(&claims[0].lease, wait(None, Some("go"), sent.event.seq))
        .await
        .unwrap();
    let now = store.now().await;
    assert!(waiting.wake_at.is_some_and(|at| at <= now));
    assert_eq!(claimable(&*registry).await, std::slice::from_ref(&id));
    let next = registry
        .next_message(&id, "go", sent.event.seq)
        .await
        .unwrap();
    assert_eq!(next.map(|event| event.seq), Some(second.event.seq));
}

pub async fn messages_are_refused_for_ended_and_unknown_processes(store: &dyn Store) {
    let registry = store.pod("pod").await;
    let record = registry
        .register_process(ProcessRegistration::new("demo", json!(1)))
        .await
        .unwrap();
    let unknown = registry
        .send_message(
            &ProcessId::new("nobody").unwrap(),
            Message::new("t", json!(1)),
        )
        .await;
    assert!(matches!(unknown, Err(ProcessError::NotFound(_))));
    let bad = registry
        .send_message(&record.id, Message::new("", json!(1)))
        .await;
    assert!(matches!(bad, Err(ProcessError::InvalidInput(_))));
    let long_key = "k".repeat(250);
    let bad_key = registry
        .send_message(
            &record.id,
            Message::new("t", json!(1)).with_replay_key(long_key),
        )
        .await;
    assert!(matches!(bad_key, Err(ProcessError::InvalidInput(_))));
    let big = registry
        .send_message(&record.id, Message::new("t", json!("x".repeat(300 * 1024))))
        .await;
    assert!(matches!(big, Err(ProcessError::PayloadTooLarge { .. })));
    registry
        .complete_process(
            &record.id,
            Completion::new(TerminalState::Completed, json!(1)),
        )
        .await
        .unwrap();
    let ended = registry
        .send_message(&record.id, Message::new("t", json!(1)))
        .await;
    assert!(matches!(ended, Err(ProcessError::ProcessTerminal { .. })));
    assert_eq!(log(&*registry, &record.id).await.len(), 1);
}

pub async fn a_deadline_makes_any_unleased_process_claimable(store: &dyn Store) {
    let registry = store.pod("pod").await;
    // Long enough for the checks before the deadline under load (see above).
    let timeout = Duration::from_millis(2_000);
    let later = registry
        .register_process(
            ProcessRegistration::new("demo", json!(1))
                .start_in(Duration::from_secs(3600))
                .timeout(timeout),
        )
        .await
        .unwrap();
    let external = registry
        .register_process(
            ProcessRegistration::new("demo", json!(2))
                .with_disposition(Disposition::External)
                .timeout(timeout),
        )
        .await
        .unwrap();
    let deadline = later.deadline.expect("a deadline on the row");
    assert!(deadline >= later.created_at + TimeDelta::milliseconds(2_000));
    assert!(claimable(&*registry).await.is_empty());
    assert!(registry.next_wake().await.unwrap().is_some());
    wait_until(store, deadline.max(external.deadline.unwrap())).await;
    let mut ids = claimable(&*registry).await;
    ids.sort();
    let mut expected = vec![later.id, external.id];
    expected.sort();
    assert_eq!(ids, expected, "past their deadline, whatever they wait for");
}

pub async fn retries_are_counted_apart_from_attempts(store: &dyn Store) {
    let registry = store.pod("pod").await;
    let policy = RetryPolicy::attempts(3);
    let lease = running(
        &*registry,
        ProcessRegistration::new("demo", json!(1)).retry(policy.clone()),
    )
    .await;
    let mut retry = wait(Some(Duration::from_millis(1)), None, 0);
    retry.retry = true;
    let waiting = registry.suspend(&lease, retry).await.unwrap();
    assert_eq!(waiting.retries, 1);
    assert_eq!(waiting.attempts, 1);
    assert_eq!(waiting.retry_policy, Some(policy.clone()));

    // The same id registered again: same policy is the same process, another is a conflict.
    let again = registry
        .register_process(
            ProcessRegistration::new("demo", json!(1))
                .with_id(lease.process_id.clone())
                .retry(policy),
        )
        .await
        .unwrap();
    assert_eq!(again.retries, 1);
    let conflict = registry
        .register_process(
            ProcessRegistration::new("demo", json!(1))
                .with_id(lease.process_id.clone())
                .retry(RetryPolicy::attempts(4)),
        )
        .await;
    assert!(matches!(conflict, Err(ProcessError::Conflict { .. })));
}

pub async fn bad_schedules_are_invalid_input(store: &dyn Store) {
    let registry = store.pod("pod").await;
    let now = store.now().await;
    let mut both = ProcessRegistration::new("demo", json!(1)).start_at(now);
    both.start_in_ms = Some(5);
    let mut two_deadlines = ProcessRegistration::new("demo", json!(1)).deadline(now);
    two_deadlines.timeout_ms = Some(5);
    let mut too_far = ProcessRegistration::new("demo", json!(1));
    too_far.timeout_ms = Some(u64::MAX);
    let mut no_runs = RetryPolicy::attempts(1);
    no_runs.max_attempts = 0;
    let mut wild = RetryPolicy::attempts(2);
    wild.factor = 100.0;
    let mut jitter = RetryPolicy::attempts(2);
    jitter.jitter = 2.0;
    let mut long_delay = RetryPolicy::attempts(2);
    long_delay.max_delay_ms = u64::MAX;
    let mut bad_trace = ProcessRegistration::new("demo", json!(1));
    bad_trace.trace_parent = Some("00-00000000000000000000000000000000-b7ad6b7169203331-01".into());
    let mut not_a_trace = ProcessRegistration::new("demo", json!(1));
    not_a_trace.trace_parent = Some("hello".into());
    for registration in [
        both,
        two_deadlines,
        too_far,
        ProcessRegistration::new("demo", json!(1)).retry(no_runs),
        ProcessRegistration::new("demo", json!(1)).retry(wild),
        ProcessRegistration::new("demo", json!(1)).retry(jitter),
        ProcessRegistration::new("demo", json!(1)).retry(long_delay),
        bad_trace,
        not_a_trace,
    ] {
        let refused = registry.register_process(registration.clone()).await;
        assert!(
            matches!(refused, Err(ProcessError::InvalidInput(_))),
            "{registration:?}: {refused:?}"
        );
    }
    let listed = registry
        .list_processes(proclog::ProcessFilter::default())
        .await
        .unwrap();
    assert!(listed.processes.is_empty(), "nothing was registered");
    let mut traced = ProcessRegistration::new("demo", json!(1));
    let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    traced.trace_parent = Some(parent.into());
    let record = registry.register_process(traced).await.unwrap();
    assert_eq!(record.trace_parent.as_deref(), Some(parent));
}

pub async fn a_waiting_process_can_be_cancelled(store: &dyn Store) {
    let registry = store.pod("pod").await;
    let lease = running(&*registry, ProcessRegistration::new("demo", json!(1))).await;
    let id = lease.process_id.clone();
    registry
        .suspend(&lease, wait(Some(Duration::from_secs(3600)), None, 0))
        .await
        .unwrap();
    let cancelled = proclog::pod::cancel_process(&*registry, &id, "pod", json!("stop"), None)
        .await
        .unwrap();
    assert_eq!(cancelled.status, ProcessStatus::Cancelled);

    // A request made while the run still held its lease: the suspension that follows ends
    // at once, so that the next run acts on the request.
    let lease = running(&*registry, ProcessRegistration::new("demo", json!(2))).await;
    let id = lease.process_id.clone();
    let pending = proclog::pod::cancel_process(&*registry, &id, "pod", json!("stop"), None)
        .await
        .unwrap();
    assert_eq!(
        pending.status,
        ProcessStatus::Running,
        "its owner acts on it"
    );
    let waiting = registry
        .suspend(&lease, wait(Some(Duration::from_secs(3600)), None, 0))
        .await
        .unwrap();
    let now = store.now().await;
    assert!(waiting.wake_at.is_some_and(|at| at <= now));
    let claims = registry.claim_runnable("pod", MINUTE, 10).await.unwrap();
    assert_eq!(claims.len(), 1);
    assert!(claims[0].process.cancel_request.is_some());
}

pub async fn proclogs_replay_keys_are_not_a_callers(store: &dyn Store) {
    let registry = store.pod("pod").await;
    let record = registry
        .register_process(ProcessRegistration::new("demo", json!(1)))
        .await
        .unwrap();
    for key in ["proclog:step:charge", "proclog:g2:waiting", "proclog:"] {
        let refused = registry
            .append_event(
                &record.id,
                proclog::AppendRequest::new("x", json!(1)).with_replay_key(key),
            )
            .await;
        assert!(
            matches!(refused, Err(ProcessError::InvalidInput(_))),
            "{key}: {refused:?}"
        );
        let cancel =
            proclog::pod::cancel_process(&*registry, &record.id, "pod", json!(null), Some(key))
                .await;
        assert!(
            matches!(cancel, Err(ProcessError::InvalidInput(_))),
            "{key}"
        );
    }
    assert!(
        log(&*registry, &record.id).await.is_empty(),
        "nothing written"
    );
}
