//! CONTRACT §5: leases and fencing.

use std::time::Duration;

use proclog::{ClaimOutcome, Completion, ProcessError, ProcessId, ProcessStatus, TerminalState};
use serde_json::json;

use crate::common::Store;
use crate::support::{claim, expired_lease, new_process};

const MINUTE: Duration = Duration::from_secs(60);

pub async fn claim_grants_then_reports_busy(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let process = new_process(&*registry).await;
    let before = store.now().await;
    let lease = claim(&*registry, &process.id, "pod-a").await;
    assert_eq!(lease.process_id, process.id);
    assert_eq!(lease.owner, "pod-a");
    assert_eq!(lease.generation, 1);
    assert!(lease.expires_at > before + chrono::TimeDelta::seconds(59));
    let record = registry.get_process(&process.id).await.unwrap().unwrap();
    assert_eq!(
        record.status,
        ProcessStatus::Running,
        "a claimed process is running"
    );
    let held = record.lease.expect("the lease is recorded");
    assert_eq!((held.owner.as_str(), held.generation), ("pod-a", 1));
    assert_eq!(held.expires_at, lease.expires_at);

    let other_pod = store.pod("pod-b").await;
    for owner in ["pod-b", "pod-a"] {
        match other_pod.claim(&process.id, owner, MINUTE).await.unwrap() {
            ClaimOutcome::Busy { holder, expires_at } => {
                assert_eq!(holder, "pod-a");
                assert_eq!(expires_at, lease.expires_at);
            }
            acquired => panic!("a live lease is exclusive, got {acquired:?}"),
        }
    }
}

pub async fn generation_never_decreases_across_release_and_reclaim(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let process = new_process(&*registry).await;
    let mut last = 0;
    for round in 0..5 {
        let lease = claim(&*registry, &process.id, &format!("owner-{round}")).await;
        assert_eq!(lease.generation, last + 1);
        last = lease.generation;
        registry.release(&lease).await.unwrap();
        let record = registry.get_process(&process.id).await.unwrap().unwrap();
        assert!(record.lease.is_none());
        assert_eq!(
            record.lease_generation, last,
            "release keeps the generation"
        );
    }
    let expired = expired_lease(store, &*registry, &process.id).await;
    assert_eq!(expired.generation, last + 1);
    let next = claim(&*registry, &process.id, "after-expiry").await;
    assert_eq!(next.generation, last + 2);
}

pub async fn renew_extends_a_live_lease_only(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let process = new_process(&*registry).await;
    let lease = match registry
        .claim(&process.id, "pod-a", Duration::from_secs(5))
        .await
        .unwrap()
    {
        ClaimOutcome::Acquired(lease) => lease,
        busy => panic!("{busy:?}"),
    };
    let renewed = registry
        .renew(&lease, Duration::from_secs(600))
        .await
        .unwrap();
    assert!(renewed.expires_at > lease.expires_at);
    assert_eq!(
        (renewed.token, renewed.generation),
        (lease.token, lease.generation)
    );
    let record = registry.get_process(&process.id).await.unwrap().unwrap();
    assert_eq!(record.lease.unwrap().expires_at, renewed.expires_at);
    // The old copy of the lease (same token) is still the current lease.
    let shorter = registry
        .renew(&lease, MINUTE)
        .await
        .expect("same token renews");
    // A renewal never moves the expiry earlier (a delayed renewal cannot shorten a lease).
    assert_eq!(shorter.expires_at, renewed.expires_at);
    let record = registry.get_process(&process.id).await.unwrap().unwrap();
    assert_eq!(record.lease.unwrap().expires_at, renewed.expires_at);
    let bad_ttl = registry.renew(&lease, Duration::ZERO).await;
    assert!(
        matches!(bad_ttl, Err(ProcessError::InvalidInput(_))),
        "{bad_ttl:?}"
    );

    // Expired: cannot be renewed, even with no other claimant.
    let other = new_process(&*registry).await;
    let expired = expired_lease(store, &*registry, &other.id).await;
    let result = registry.renew(&expired, MINUTE).await;
    assert!(
        matches!(result, Err(ProcessError::LeaseLost { .. })),
        "{result:?}"
    );
    // Released: lost too.
    registry.release(&lease).await.unwrap();
    let result = registry.renew(&lease, MINUTE).await;
    assert!(
        matches!(result, Err(ProcessError::LeaseLost { .. })),
        "{result:?}"
    );
    // Unknown process.
    let ghost = proclog::Lease {
        process_id: ProcessId::new("ghost").unwrap(),
        ..lease
    };
    let result = registry.renew(&ghost, MINUTE).await;
    assert!(
        matches!(result, Err(ProcessError::NotFound(_))),
        "{result:?}"
    );
}

pub async fn release_is_idempotent_and_ignores_stale_tokens(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let process = new_process(&*registry).await;
    let stale = expired_lease(store, &*registry, &process.id).await;
    let current = claim(&*registry, &process.id, "pod-b").await;
    registry
        .release(&stale)
        .await
        .expect("a stale release is a no-op");
    let record = registry.get_process(&process.id).await.unwrap().unwrap();
    assert_eq!(
        record.lease.map(|l| (l.owner, l.generation)),
        Some(("pod-b".to_owned(), current.generation)),
        "the current lease is untouched"
    );
    registry.release(&current).await.unwrap();
    registry
        .release(&current)
        .await
        .expect("releasing twice is fine");
    assert!(
        registry
            .get_process(&process.id)
            .await
            .unwrap()
            .unwrap()
            .lease
            .is_none()
    );
    // Releasing a lease of a process that no longer exists is a no-op as well.
    let ghost = proclog::Lease {
        process_id: ProcessId::new("ghost").unwrap(),
        ..current
    };
    registry.release(&ghost).await.unwrap();
}

pub async fn expired_lease_can_be_claimed_by_another_owner(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let process = new_process(&*registry).await;
    let old = expired_lease(store, &*registry, &process.id).await;
    let new = claim(&*registry, &process.id, "pod-b").await;
    assert_eq!(new.generation, old.generation + 1);
    assert_ne!(new.token, old.token);
    let result = registry.renew(&old, MINUTE).await;
    assert!(
        matches!(result, Err(ProcessError::LeaseLost { .. })),
        "{result:?}"
    );
}

pub async fn claim_refusals(store: &dyn Store) {
    let registry = store.pod("pod-a").await;
    let missing = ProcessId::new("missing").unwrap();
    let result = registry.claim(&missing, "pod-a", MINUTE).await;
    assert!(
        matches!(result, Err(ProcessError::NotFound(_))),
        "{result:?}"
    );

    let process = new_process(&*registry).await;
    for owner in ["", "bad\nowner", &"o".repeat(129)] {
        let result = registry.claim(&process.id, owner, MINUTE).await;
        assert!(
            matches!(result, Err(ProcessError::InvalidInput(_))),
            "{owner:?}: {result:?}"
        );
    }
    for ttl in [Duration::ZERO, Duration::from_secs(86_401)] {
        let result = registry.claim(&process.id, "pod-a", ttl).await;
        assert!(
            matches!(result, Err(ProcessError::InvalidInput(_))),
            "{ttl:?}: {result:?}"
        );
    }
    let record = registry.get_process(&process.id).await.unwrap().unwrap();
    assert_eq!(
        (record.lease_generation, record.status),
        (0, ProcessStatus::Pending)
    );

    registry
        .complete_process(
            &process.id,
            Completion::new(TerminalState::Cancelled, json!(null)),
        )
        .await
        .unwrap();
    let result = registry.claim(&process.id, "pod-a", MINUTE).await;
    assert!(
        matches!(
            result,
            Err(ProcessError::ProcessTerminal {
                state: TerminalState::Cancelled,
                ..
            })
        ),
        "{result:?}"
    );
}
