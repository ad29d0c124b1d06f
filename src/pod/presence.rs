//! A pod's presence: registered at start, heartbeated on the store's clock, marked draining and
//! then stopped on a clean stop ([`ClusterStore::record_presence`]). A killed pod's row keeps
//! its last heartbeat, and the store shows it as `gone` after three heartbeat periods.
//!
//! Presence is information, never a lease: no decision about who runs what reads it. A failed
//! heartbeat is logged and tried again at the next period; it never stops the pod.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

pub use crate::store::PresenceState;
use crate::store::{ClusterStore, PRUNE_PODS_AFTER, PresenceRecord};
use crate::tasks::TaskHandle;

/// How a pod describes itself.
#[derive(Clone, Debug)]
pub struct PresenceInfo {
    /// The pod id.
    pub pod_id: String,
    /// Where the pod serves its HTTP API and console (`None`: it serves none).
    pub address: Option<String>,
    /// Most processes the pod runs at once.
    pub concurrency: usize,
    /// Heartbeat period.
    pub heartbeat_every: Duration,
}

/// Pruning of long-gone pods' rows runs every this many heartbeats.
const PRUNE_EVERY_BEATS: u64 = 720;

/// The heartbeat of a running pod. Dropped, its task stops (no further heartbeat).
pub struct Presence {
    store: Arc<dyn ClusterStore>,
    record: watch::Sender<PresenceRecord>,
    task: TaskHandle,
}

impl Presence {
    /// Registers the pod as running (one attempt; a failure is logged and the heartbeats try
    /// again), prunes the rows of long-gone pods, and starts the heartbeat.
    pub async fn start(store: Arc<dyn ClusterStore>, info: PresenceInfo) -> Self {
        let record = PresenceRecord {
            pod_id: info.pod_id.clone(),
            incarnation: uuid::Uuid::new_v4(),
            address: info.address.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            concurrency: i32::try_from(info.concurrency).unwrap_or(i32::MAX),
            state: PresenceState::Running,
            heartbeat_every: info.heartbeat_every,
        };
        write(store.as_ref(), &record).await;
        prune(store.as_ref()).await;
        let period = record.heartbeat_every;
        let (record, mut changes) = watch::channel(record);
        let task = {
            let store = Arc::clone(&store);
            TaskHandle::spawn("presence", async move {
                let mut ticks = tokio::time::interval(period);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                ticks.tick().await;
                let mut beats: u64 = 0;
                loop {
                    tokio::select! {
                        _ = ticks.tick() => {}
                        changed = changes.changed() => {
                            if changed.is_err() {
                                return;
                            }
                        }
                    }
                    let now = changes.borrow_and_update().clone();
                    if now.state == PresenceState::Stopped {
                        return;
                    }
                    write(store.as_ref(), &now).await;
                    beats += 1;
                    if beats.is_multiple_of(PRUNE_EVERY_BEATS) {
                        prune(store.as_ref()).await;
                    }
                }
            })
        };
        Self {
            store,
            record,
            task,
        }
    }

    /// Marks the pod draining (it stops claiming); a heartbeat writes it at once.
    pub fn draining(&self) {
        self.record
            .send_modify(|record| record.state = PresenceState::Draining);
    }

    /// Says where the pod serves its API; a heartbeat writes it at once.
    pub fn advertise(&self, address: Option<String>) {
        self.record.send_modify(|record| record.address = address);
    }

    /// Marks the pod stopped and ends the heartbeats (one attempt, bounded); returns once the
    /// heartbeat task has ended.
    pub async fn stopped(self) {
        self.record
            .send_modify(|record| record.state = PresenceState::Stopped);
        self.task.join().await;
        let stopped = self.record.borrow().clone();
        write(self.store.as_ref(), &stopped).await;
    }
}

async fn write(store: &dyn ClusterStore, record: &PresenceRecord) {
    if let Err(err) = store.record_presence(record).await {
        tracing::warn!(pod = %record.pod_id, state = record.state.as_str(), error = %err, "heartbeat failed");
    }
}

async fn prune(store: &dyn ClusterStore) {
    match store.prune_pods(PRUNE_PODS_AFTER).await {
        Ok(0) => {}
        Ok(pruned) => tracing::info!(pruned, "pruned the rows of long-gone pods"),
        Err(err) => tracing::debug!(error = %err, "cannot prune pod rows"),
    }
}
