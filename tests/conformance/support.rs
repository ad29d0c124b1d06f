//! Helpers shared by the conformance cases.

use std::time::Duration;

use proclog::{
    AppendRequest, ClaimOutcome, Lease, ProcessEvent, ProcessId, ProcessRecord,
    ProcessRegistration, ProcessRegistry,
};
use serde_json::{Value, json};

use crate::common::Store;

/// Registers a fresh process of kind `demo` with a unique id.
pub async fn new_process(registry: &dyn ProcessRegistry) -> ProcessRecord {
    registry
        .register_process(ProcessRegistration::new("demo", json!({"n": 1})))
        .await
        .expect("register")
}

/// An unkeyed, unfenced append request.
pub fn event(event_type: &str, payload: Value) -> AppendRequest {
    AppendRequest::new(event_type, payload)
}

/// The whole log of `id`.
pub async fn log(registry: &dyn ProcessRegistry, id: &ProcessId) -> Vec<ProcessEvent> {
    let mut events = Vec::new();
    loop {
        let after = events.last().map_or(0, |e: &ProcessEvent| e.seq);
        let page = registry
            .events_after(id, after, 1000)
            .await
            .expect("read log");
        if page.is_empty() {
            return events;
        }
        events.extend(page);
    }
}

/// Asserts that `events` is exactly seq 1..=n.
pub fn assert_dense(events: &[ProcessEvent]) {
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    let expected: Vec<i64> = (1..=events.len() as i64).collect();
    assert_eq!(seqs, expected, "log is not dense from 1");
}

/// Claims a lease that must be granted.
pub async fn claim(registry: &dyn ProcessRegistry, id: &ProcessId, owner: &str) -> Lease {
    match registry
        .claim(id, owner, Duration::from_secs(60))
        .await
        .expect("claim")
    {
        ClaimOutcome::Acquired(lease) => lease,
        busy => panic!("expected a lease, got {busy:?}"),
    }
}

/// Claims a lease with the shortest TTL and waits (on the store's clock) until it has expired.
pub async fn expired_lease(
    store: &dyn Store,
    registry: &dyn ProcessRegistry,
    id: &ProcessId,
) -> Lease {
    let lease = match registry
        .claim(id, "short-lived", Duration::from_millis(1))
        .await
        .expect("claim")
    {
        ClaimOutcome::Acquired(lease) => lease,
        busy => panic!("expected a lease, got {busy:?}"),
    };
    while store.now().await <= lease.expires_at {
        tokio::task::yield_now().await;
    }
    lease
}
