//! [`PodLink`]: how a pod's hints reach the other pods, and theirs reach it. On Postgres it is
//! NOTIFY (sent by [`crate::pg::PgNotifier`]) and LISTEN ([`crate::pg::PgListener`]); for a
//! store held in one process ([`LocalLink`]) there is nobody else to tell. Hints are never
//! truth (see the module [`crate::watch`]): a lost one delays a reader, never misleads it.

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::metrics::LatencyHistogram;

pub use crate::pg::ListenerStatus as LinkStatus;

/// Counters of a pod's link, as `/metrics` shows them.
#[derive(Clone, Debug, Default)]
pub struct LinkCounters {
    /// Notices handed to the other pods.
    pub sent: u64,
    /// Notices dropped (queue full, or a send failed).
    pub dropped: u64,
    /// Round trips that sent notices.
    pub batches: u64,
    /// NOTIFY payloads sent (each packs the notices of one or more processes).
    pub payloads: u64,
    /// Notices from other pods (one per process in a payload; those nobody on this pod
    /// watched are counted, not read).
    pub received: u64,
    /// Reconnects after a lost connection.
    pub reconnects: u64,
    /// Listening sessions started (the first, reconnects, retries after LISTEN was found not
    /// to work).
    pub sessions: u64,
    /// From an append acknowledged on another pod to its notice arriving here.
    pub notice_latency: LatencyHistogram,
}

/// The cross-pod side of freshness.
#[async_trait]
pub trait PodLink: Send + Sync {
    /// Tells the other pods that runnable work may exist (a registration, a release).
    fn work_available(&self);

    /// Waits, at most `timeout`, until the hints given so far have gone out.
    async fn flush(&self, timeout: Duration);

    /// Whether the other pods' hints arrive (`Listening`), or the pod relies on its polls.
    fn status(&self) -> LinkStatus {
        self.status_updates().borrow().clone()
    }

    /// A receiver of the status and its changes.
    fn status_updates(&self) -> watch::Receiver<LinkStatus>;

    /// Waits until hints arrive, or the pod knowingly polls; returns that status.
    async fn ready(&self) -> LinkStatus {
        let mut updates = self.status_updates();
        let status = updates
            .wait_for(|s| matches!(s, LinkStatus::Listening | LinkStatus::Polling { .. }))
            .await
            .map(|s| s.clone());
        status.unwrap_or(LinkStatus::Reconnecting)
    }

    /// The link's counters.
    fn counters(&self) -> LinkCounters;
}

/// The link of a store held in one process: every pod shares its hub, so there is nothing to
/// send and it always "listens".
#[derive(Debug)]
pub struct LocalLink {
    status: watch::Sender<LinkStatus>,
}

impl Default for LocalLink {
    fn default() -> Self {
        Self {
            status: watch::Sender::new(LinkStatus::Listening),
        }
    }
}

#[async_trait]
impl PodLink for LocalLink {
    fn work_available(&self) {}

    async fn flush(&self, _timeout: Duration) {}

    fn status_updates(&self) -> watch::Receiver<LinkStatus> {
        self.status.subscribe()
    }

    fn counters(&self) -> LinkCounters {
        LinkCounters::default()
    }
}
