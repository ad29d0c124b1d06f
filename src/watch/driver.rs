//! `ProcessWorkDriver::await_terminal`: waiting for a process to end, by reading the durable
//! terminal column.
//!
//! All waiters of one driver share one poller: each poll round is one `terminal_states` query
//! for every pending id. Rounds follow a backoff (25 ms floor, doubling, 1 s cap) that local hub
//! ticks of a pending process reset. A tick (a local completion, or a hint from another pod via
//! the listener) or a new waiter triggers a round at once, but rounds are never closer than
//! [`EARLY_ROUND_GAP`], so a storm of ticks costs at most 200 queries per second for all the
//! driver's waiters together. A hint is never trusted: only the column decides.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::hub::{ChangeFeed, FeedEvent, ProcessChangeHub};
use crate::backoff::Backoff;
use crate::model::{ProcessId, TerminalRecord};
use crate::registry::ProcessRegistry;

/// Shortest interval between two poll rounds, and the first backoff delay.
pub const POLL_FLOOR: Duration = Duration::from_millis(25);
/// Longest interval between two poll rounds.
pub const POLL_CAP: Duration = Duration::from_secs(1);
/// Shortest interval between two rounds, for rounds brought forward by ticks or new waiters.
pub const EARLY_ROUND_GAP: Duration = Duration::from_millis(5);

/// Why `await_terminal` returned without a terminal state.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum AwaitError {
    /// No process has this id.
    #[error("process {0} not found")]
    NotFound(ProcessId),
    /// The process did not end within the timeout.
    #[error("process {id} did not end within {waited:?}")]
    Timeout {
        /// The process.
        id: ProcessId,
        /// How long the caller waited.
        waited: Duration,
    },
    /// The process did not end within the timeout while the database could not be read (its
    /// last poll failed): the outcome is unknown, not late.
    #[error("database unavailable while waiting for process {id}: {cause}")]
    Unavailable {
        /// The process.
        id: ProcessId,
        /// The last poll's error.
        cause: String,
    },
    /// The driver was shut down.
    #[error("the work driver stopped")]
    Stopped,
}

/// Counters and gauges of a [`ProcessWorkDriver`].
#[derive(Debug, Default)]
pub struct DriverStats {
    /// Poll rounds (queries) made.
    pub polls: AtomicU64,
    /// Waiters currently waiting.
    pub waiters: AtomicU64,
    /// Time from a completion (its `completed_at`, database clock) to its waiters on this
    /// pod being answered.
    pub wake: crate::metrics::LatencyHistogram,
}

struct Waiter {
    id: ProcessId,
    reply: oneshot::Sender<Result<TerminalRecord, AwaitError>>,
}

/// Waits for processes to end. Cheap to clone; clones share one poller, run by its owner
/// ([`ProcessWorkDriver::start`]; a stack's `TaskSet`) or by itself until the last clone is
/// dropped ([`ProcessWorkDriver::spawn`]).
#[derive(Clone)]
pub struct ProcessWorkDriver {
    waiters: mpsc::UnboundedSender<Waiter>,
    stats: Arc<DriverStats>,
    last_failure: Arc<Mutex<Option<String>>>,
}

impl ProcessWorkDriver {
    /// A driver reading `registry`, woken early by ticks of `hub`, whose poller runs on its
    /// own until the last clone is dropped.
    pub fn spawn(registry: Arc<dyn ProcessRegistry>, hub: Arc<ProcessChangeHub>) -> Self {
        let (driver, poll) = Self::start(registry, hub);
        tokio::spawn(poll(CancellationToken::new()));
        driver
    }

    /// The driver and its poller, for an owner to run: the poller ends when its token fires
    /// (its waiters then get [`AwaitError::Stopped`]) or the last clone is dropped.
    pub fn start(
        registry: Arc<dyn ProcessRegistry>,
        hub: Arc<ProcessChangeHub>,
    ) -> (
        Self,
        impl FnOnce(CancellationToken) -> BoxFuture<'static, ()> + Send + 'static,
    ) {
        let (waiters, incoming) = mpsc::unbounded_channel();
        let stats = Arc::new(DriverStats::default());
        let last_failure = Arc::new(Mutex::new(None));
        let poller = Poller {
            registry,
            hub,
            feed: None,
            incoming,
            pending: HashMap::new(),
            waiting_since: HashMap::new(),
            stats: Arc::clone(&stats),
            last_failure: Arc::clone(&last_failure),
        };
        let poll = move |stop: CancellationToken| {
            async move {
                tokio::select! {
                    () = poller.run() => {}
                    () = stop.cancelled() => {}
                }
            }
            .boxed()
        };
        let driver = Self {
            waiters,
            stats,
            last_failure,
        };
        (driver, poll)
    }

    /// The driver's counters.
    pub fn stats(&self) -> &Arc<DriverStats> {
        &self.stats
    }

    /// The terminal column of `id` as soon as it is set: state, output, `terminal_seq` and
    /// completion time. `NotFound` if no such process exists, `Timeout` if it has not ended
    /// within `timeout`, `Unavailable` if the timeout passed while the database could not be
    /// read.
    pub async fn await_terminal(
        &self,
        id: &ProcessId,
        timeout: Duration,
    ) -> Result<TerminalRecord, AwaitError> {
        let (reply, answer) = oneshot::channel();
        self.waiters
            .send(Waiter {
                id: id.clone(),
                reply,
            })
            .map_err(|_| AwaitError::Stopped)?;
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(AwaitError::Stopped),
            Err(_) => Err(match self.last_failure.lock().map(|f| f.clone()) {
                Ok(Some(cause)) => AwaitError::Unavailable {
                    id: id.clone(),
                    cause,
                },
                _ => AwaitError::Timeout {
                    id: id.clone(),
                    waited: timeout,
                },
            }),
        }
    }
}

struct Poller {
    registry: Arc<dyn ProcessRegistry>,
    hub: Arc<ProcessChangeHub>,
    /// The hub's tick feed, held only while someone waits: the hub pays for the feed on every
    /// append while a receiver exists, so an idle driver holds none.
    feed: Option<ChangeFeed>,
    incoming: mpsc::UnboundedReceiver<Waiter>,
    pending: HashMap<ProcessId, Vec<oneshot::Sender<Result<TerminalRecord, AwaitError>>>>,
    /// When each pending id got its first waiter (this pod's clock): only completions after
    /// it count in the wake histogram.
    waiting_since: HashMap<ProcessId, chrono::DateTime<chrono::Utc>>,
    stats: Arc<DriverStats>,
    /// The error of the last round, while the last round failed.
    last_failure: Arc<Mutex<Option<String>>>,
}

impl Poller {
    async fn run(mut self) {
        let mut backoff = Backoff::new(POLL_FLOOR, POLL_CAP);
        loop {
            if self.pending.is_empty() {
                self.feed = None;
                match self.incoming.recv().await {
                    Some(waiter) => self.add(waiter),
                    None => return,
                }
                backoff.reset();
                // Subscribed before the first read, so no tick after that read is missed.
                self.feed = Some(self.hub.feed());
            }
            while let Ok(waiter) = self.incoming.try_recv() {
                self.add(waiter);
            }
            self.forget_abandoned();
            if self.pending.is_empty() {
                continue;
            }
            self.round().await;
            let round_at = Instant::now();
            if self.pending.is_empty() {
                continue;
            }
            // Wait for the backoff delay, or less if something may have changed.
            let mut feed = self.feed.take().unwrap_or_else(|| self.hub.feed());
            let mut deadline = round_at + backoff.next_delay();
            let soon = round_at + EARLY_ROUND_GAP;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => break,
                    event = feed.next() => {
                        let relevant = match &event {
                            FeedEvent::Tick(id) => self.pending.contains_key(id),
                            FeedEvent::Resync => true,
                        };
                        if relevant {
                            backoff.reset();
                            deadline = deadline.min(soon);
                        }
                    }
                    waiter = self.incoming.recv() => match waiter {
                        Some(waiter) => {
                            // A new waiter's first read should not wait out a long backoff.
                            self.add(waiter);
                            deadline = deadline.min(soon);
                        }
                        None => return,
                    },
                }
            }
            self.feed = Some(feed);
        }
    }

    fn add(&mut self, waiter: Waiter) {
        self.stats.waiters.fetch_add(1, Ordering::Relaxed);
        self.waiting_since
            .entry(waiter.id.clone())
            .or_insert_with(chrono::Utc::now);
        self.pending
            .entry(waiter.id)
            .or_default()
            .push(waiter.reply);
    }

    /// Drops waiters whose caller gave up (timed out or was cancelled).
    fn forget_abandoned(&mut self) {
        let stats = &self.stats;
        self.pending.retain(|_, replies| {
            let before = replies.len();
            replies.retain(|reply| !reply.is_closed());
            stats
                .waiters
                .fetch_sub((before - replies.len()) as u64, Ordering::Relaxed);
            !replies.is_empty()
        });
        let pending = &self.pending;
        self.waiting_since.retain(|id, _| pending.contains_key(id));
    }

    /// One query for every pending id; answers those that ended or do not exist.
    async fn round(&mut self) {
        let ids: Vec<ProcessId> = self.pending.keys().cloned().collect();
        self.stats.polls.fetch_add(1, Ordering::Relaxed);
        let result = self.registry.terminal_states(&ids).await;
        if let Ok(mut last) = self.last_failure.lock() {
            *last = result.as_ref().err().map(ToString::to_string);
        }
        let states = match result {
            Ok(states) => states,
            Err(err) => {
                tracing::warn!(error = %err, waiting = ids.len(), "terminal poll failed; will retry");
                return;
            }
        };
        for id in ids {
            let answer = match states.get(&id) {
                None => Err(AwaitError::NotFound(id.clone())),
                Some(Some(terminal)) => Ok(terminal.clone()),
                Some(None) => continue,
            };
            let replies = self.pending.remove(&id).unwrap_or_default();
            let since = self.waiting_since.remove(&id);
            if let (Ok(terminal), Some(since)) = (&answer, since)
                && terminal.completed_at >= since
                && !replies.is_empty()
            {
                self.stats.wake.observe_since(terminal.completed_at);
            }
            self.stats
                .waiters
                .fetch_sub(replies.len() as u64, Ordering::Relaxed);
            for reply in replies {
                let _ = reply.send(answer.clone());
            }
        }
    }
}
