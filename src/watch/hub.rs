//! `ProcessChangeHub`: in-process change ticks, per process and pod-wide.
//!
//! A tick says "the log or terminal column of this process may have changed: read it". It
//! carries no data, so a lost or duplicated tick is harmless to correctness; readers always
//! go back to the registry. Per-process entries exist only while someone watches, so memory
//! does not grow with the number of processes ever seen.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, watch};

use crate::model::ProcessId;

/// Capacity of the pod-wide tick feed; a receiver that lags behind it is told to re-read
/// everything it cares about.
const FEED_CAPACITY: usize = 4096;

/// In-process change ticks. Share it behind an `Arc`.
pub struct ProcessChangeHub {
    watched: Mutex<HashMap<ProcessId, watch::Sender<u64>>>,
    /// Bumped by [`ProcessChangeHub::resync_all`]: everything may have changed.
    epoch: watch::Sender<u64>,
    /// Every tick, for watchers of many processes at once (the work driver).
    feed: broadcast::Sender<ProcessId>,
    /// Ticks of cancellation requests only: what a pod's cancel watch follows, so that the
    /// runs' own appends do not wake it.
    cancels: broadcast::Sender<ProcessId>,
}

impl Default for ProcessChangeHub {
    fn default() -> Self {
        Self::new()
    }
}

impl ProcessChangeHub {
    /// An empty hub.
    pub fn new() -> Self {
        Self {
            watched: Mutex::new(HashMap::new()),
            epoch: watch::channel(0).0,
            feed: broadcast::channel(FEED_CAPACITY).0,
            cancels: broadcast::channel(FEED_CAPACITY).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ProcessId, watch::Sender<u64>>> {
        self.watched.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Signals a possible change of `id` to its watchers and to the pod-wide feed.
    /// Never blocks; costs a map lookup when nobody watches.
    pub fn tick(&self, id: &ProcessId) {
        if let Some(sender) = self.lock().get(id) {
            sender.send_modify(|version| *version += 1);
        }
        if self.feed.receiver_count() > 0 {
            let _ = self.feed.send(id.clone());
        }
    }

    /// Ticks `id` for a cancellation request: its watchers and the pod-wide feed, and the
    /// cancel feed.
    pub fn tick_cancel(&self, id: &ProcessId) {
        self.tick(id);
        if self.cancels.receiver_count() > 0 {
            let _ = self.cancels.send(id.clone());
        }
    }

    /// Whether a tick would reach anyone now: a watched process, an open feed or cancel
    /// feed. A listener skips reading the notices of other pods while it is false.
    pub fn has_watchers(&self) -> bool {
        self.feed.receiver_count() > 0
            || self.cancels.receiver_count() > 0
            || !self.lock().is_empty()
    }

    /// [`ProcessChangeHub::tick`] (or [`ProcessChangeHub::tick_cancel`] when `cancel`) of a
    /// process named by text from outside, such as a notice: no allocation unless someone
    /// wants the tick, and nothing at all for text that is not a process id.
    pub fn tick_named(&self, id: &str, cancel: bool) {
        if let Some(sender) = self.lock().get(id) {
            sender.send_modify(|version| *version += 1);
        }
        let to_feed = self.feed.receiver_count() > 0;
        let to_cancels = cancel && self.cancels.receiver_count() > 0;
        if !(to_feed || to_cancels) {
            return;
        }
        let Ok(id) = ProcessId::new(id) else { return };
        if to_cancels {
            let _ = self.cancels.send(id.clone());
        }
        if to_feed {
            let _ = self.feed.send(id);
        }
    }

    /// A feed of cancellation ticks (and resyncs) only.
    pub fn cancel_feed(&self) -> ChangeFeed {
        ChangeFeed {
            ticks: self.cancels.subscribe(),
            epoch: self.epoch.subscribe(),
        }
    }

    /// Signals that every process may have changed (e.g. the listener reconnected and may
    /// have missed notices): every watcher wakes and re-reads.
    pub fn resync_all(&self) {
        self.epoch.send_modify(|epoch| *epoch += 1);
    }

    /// Watches `id`. Changes signalled after this call are never missed: create the watcher,
    /// then read, then wait on [`ChangeWatcher::changed`].
    pub fn watch(self: &Arc<Self>, id: &ProcessId) -> ChangeWatcher {
        let receiver = self
            .lock()
            .entry(id.clone())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        ChangeWatcher {
            hub: Arc::clone(self),
            id: id.clone(),
            receiver: Some(receiver),
            epoch: self.epoch.subscribe(),
        }
    }

    /// Every subsequent tick of any process, plus resyncs as [`FeedEvent::Resync`].
    pub fn feed(&self) -> ChangeFeed {
        ChangeFeed {
            ticks: self.feed.subscribe(),
            epoch: self.epoch.subscribe(),
        }
    }

    /// How many pod-wide feeds are open (each costs a little on every tick while it exists).
    pub fn feeds(&self) -> usize {
        self.feed.receiver_count()
    }

    /// How many processes are watched right now.
    pub fn watched_processes(&self) -> usize {
        self.lock().len()
    }
}

/// A watch on one process, from [`ProcessChangeHub::watch`]. Dropping the last watcher of a
/// process removes its entry from the hub.
pub struct ChangeWatcher {
    hub: Arc<ProcessChangeHub>,
    id: ProcessId,
    receiver: Option<watch::Receiver<u64>>,
    epoch: watch::Receiver<u64>,
}

impl ChangeWatcher {
    /// Waits for a tick of this process or a hub-wide resync since the last call (or since
    /// the watcher was created).
    pub async fn changed(&mut self) {
        let receiver = self.receiver.as_mut().expect("present until drop");
        tokio::select! {
            // The hub holds the senders for as long as a receiver exists, so these never
            // report a closed channel; if they did, returning is the safe answer.
            _ = receiver.changed() => {}
            _ = self.epoch.changed() => {}
        }
    }

    /// The process watched.
    pub fn process_id(&self) -> &ProcessId {
        &self.id
    }
}

impl Drop for ChangeWatcher {
    fn drop(&mut self) {
        drop(self.receiver.take());
        let mut watched = self.hub.lock();
        if watched
            .get(&self.id)
            .is_some_and(|sender| sender.receiver_count() == 0)
        {
            watched.remove(&self.id);
        }
    }
}

/// What [`ChangeFeed::next`] reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FeedEvent {
    /// This process ticked.
    Tick(ProcessId),
    /// Ticks may have been missed (resync, or the receiver lagged): re-read everything.
    Resync,
}

/// Every tick of a hub, from [`ProcessChangeHub::feed`].
pub struct ChangeFeed {
    ticks: broadcast::Receiver<ProcessId>,
    epoch: watch::Receiver<u64>,
}

impl ChangeFeed {
    /// The next tick or resync.
    pub async fn next(&mut self) -> FeedEvent {
        tokio::select! {
            tick = self.ticks.recv() => match tick {
                Ok(id) => FeedEvent::Tick(id),
                Err(_) => FeedEvent::Resync,
            },
            _ = self.epoch.changed() => FeedEvent::Resync,
        }
    }
}
