//! Live subscriptions: every event after a seq, exactly once, in order, ending after the
//! terminal event.
//!
//! A subscription reads the log (`events_after`) whenever its process ticks in the local hub
//! (a local append, a notice from another pod, a resync after a listener reconnect) and, as a
//! safety net, at least once per safety-poll interval. Because every read starts right after
//! the last event delivered, a missed or reordered notice can only delay an event, never skip
//! or repeat it: the log is the truth, ticks are hints.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;

use super::hub::{ChangeWatcher, ProcessChangeHub};
use crate::backoff::Backoff;
use crate::error::{ProcessError, ProcessResult};
use crate::model::{ProcessEvent, ProcessId};
use crate::registry::ProcessRegistry;

/// How long an event can wait for a lost notice before the safety poll finds it.
pub const DEFAULT_SAFETY_POLL: Duration = Duration::from_secs(1);
/// Events fetched per read.
const PAGE: u32 = 1000;

/// Opens live subscriptions over a registry and a pod's change hub.
#[derive(Clone)]
pub struct ProcessSubscriptions {
    registry: Arc<dyn ProcessRegistry>,
    hub: Arc<ProcessChangeHub>,
    safety_poll: Duration,
}

impl ProcessSubscriptions {
    /// Subscriptions reading `registry`, woken by `hub`.
    pub fn new(registry: Arc<dyn ProcessRegistry>, hub: Arc<ProcessChangeHub>) -> Self {
        Self {
            registry,
            hub,
            safety_poll: DEFAULT_SAFETY_POLL,
        }
    }

    /// The same, with another safety-poll interval.
    pub fn with_safety_poll(mut self, interval: Duration) -> Self {
        self.safety_poll = interval;
        self
    }

    /// A stream of every event of `id` with `seq > after_seq`, exactly once, in order, with no
    /// gap, ending after the terminal event (at once if the process ended at or before
    /// `after_seq`). An unknown process yields one `NotFound` and ends; so does any other
    /// error that is not transient (e.g. [`ProcessError::Undecodable`]): it is yielded once
    /// and the stream ends. Transient database errors are retried with backoff, not yielded.
    pub fn subscribe(
        &self,
        id: ProcessId,
        after_seq: i64,
    ) -> BoxStream<'static, ProcessResult<ProcessEvent>> {
        let state = Subscription {
            watcher: self.hub.watch(&id),
            registry: Arc::clone(&self.registry),
            id,
            last_seq: after_seq.max(0),
            buffer: VecDeque::new(),
            checked_end: false,
            finished: false,
            safety_poll: self.safety_poll,
            retry: Backoff::new(Duration::from_millis(50), Duration::from_secs(2)),
        };
        futures::stream::unfold(state, |mut state| async move {
            state.next().await.map(|item| (item, state))
        })
        .boxed()
    }
}

struct Subscription {
    registry: Arc<dyn ProcessRegistry>,
    /// Created before the first read, so no tick after it is missed.
    watcher: ChangeWatcher,
    id: ProcessId,
    last_seq: i64,
    buffer: VecDeque<ProcessEvent>,
    /// Whether the "already ended before `after_seq`" case was ruled out.
    checked_end: bool,
    finished: bool,
    safety_poll: Duration,
    retry: Backoff,
}

impl Subscription {
    async fn next(&mut self) -> Option<ProcessResult<ProcessEvent>> {
        loop {
            if let Some(event) = self.buffer.pop_front() {
                self.last_seq = event.seq;
                if event.is_terminal() {
                    self.finished = true;
                    self.buffer.clear();
                }
                return Some(Ok(event));
            }
            if self.finished {
                return None;
            }
            match self
                .registry
                .events_after(&self.id, self.last_seq, PAGE)
                .await
            {
                Ok(events) if !events.is_empty() => {
                    self.retry.reset();
                    self.checked_end = true;
                    self.buffer.extend(events);
                }
                Ok(_) => {
                    if !self.checked_end {
                        match self.ended_before_start().await {
                            Ok(true) => {
                                self.finished = true;
                                return None;
                            }
                            Ok(false) => self.checked_end = true,
                            Err(err) => {
                                if let Some(end) = self.fail(err).await {
                                    return Some(Err(end));
                                }
                                continue;
                            }
                        }
                    }
                    tokio::select! {
                        _ = self.watcher.changed() => {}
                        _ = tokio::time::sleep(self.safety_poll) => {}
                    }
                }
                Err(err) => {
                    if let Some(end) = self.fail(err).await {
                        return Some(Err(end));
                    }
                }
            }
        }
    }

    /// True when the process ended at or before the seq the subscription started after.
    async fn ended_before_start(&self) -> ProcessResult<bool> {
        match self.registry.get_process(&self.id).await? {
            None => Err(ProcessError::NotFound(self.id.clone())),
            Some(record) => Ok(record
                .terminal
                .is_some_and(|terminal| terminal.seq <= self.last_seq)),
        }
    }

    /// A transient error is retried after a backoff; any other (`NotFound`, an event that
    /// cannot be read back, an unexpected database answer) would only repeat, so it ends the
    /// stream (returned).
    async fn fail(&mut self, err: ProcessError) -> Option<ProcessError> {
        if !err.is_transient() {
            tracing::warn!(process_id = %self.id, error = %err, "subscription ended by an error");
            self.finished = true;
            return Some(err);
        }
        tracing::warn!(process_id = %self.id, error = %err, "subscription read failed; retrying");
        tokio::time::sleep(self.retry.next_delay()).await;
        None
    }
}
