//! The cancellation requests of a pod's runs, read for all of them at once.
//!
//! A cancellation request is state: `process.cancel_requested` sets the process row's
//! `cancel_request` in the statement that appends it (schema version 8). So a run does not
//! scan its log for one: it registers with the pod's [`CancelWatch`], which asks the registry
//! for the requests of every registered run in one read ([`ProcessRegistry::cancel_requests`])
//! when a run registers (a request made before the run started is found at once), when the
//! hub's cancel feed ticks for a registered run (a request through this pod, or a notice of
//! one from another pod), on a resync, and on a slow safety poll, at most once per
//! [`ROUND_GAP`]. The runs' own appends do not wake it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::model::ProcessId;
use crate::registry::ProcessRegistry;
use crate::tasks::TaskHandle;
use crate::watch::ProcessChangeHub;
use crate::watch::hub::FeedEvent;

/// Shortest interval between two reads (the most a request waits beyond its tick).
pub(crate) const ROUND_GAP: Duration = Duration::from_millis(200);

struct Registration {
    id: ProcessId,
    reply: oneshot::Sender<Value>,
}

/// A pod's cancel watch. Cheap to clone; its task is owned by whoever holds the
/// [`TaskHandle`] [`CancelWatch::start`] returned (the worker's claim loop).
#[derive(Clone)]
pub(crate) struct CancelWatch {
    registrations: mpsc::UnboundedSender<Registration>,
}

impl CancelWatch {
    /// Starts the watch reading `registry`, woken by `hub`'s cancel feed, polling every
    /// `poll` as a safety net.
    pub(crate) fn start(
        registry: Arc<dyn ProcessRegistry>,
        hub: Arc<ProcessChangeHub>,
        poll: Duration,
    ) -> (Self, TaskHandle) {
        let (registrations, incoming) = mpsc::unbounded_channel();
        let task = TaskHandle::spawn("cancel watch", watch(registry, hub, poll, incoming));
        (Self { registrations }, task)
    }

    /// Resolves with the request for `id` once one is found (never, if none is made, or the
    /// watch has stopped).
    pub(crate) async fn requested(&self, id: &ProcessId) -> Value {
        let (reply, answer) = oneshot::channel();
        let registered = self.registrations.send(Registration {
            id: id.clone(),
            reply,
        });
        match (registered, answer.await) {
            (Ok(()), Ok(request)) => request,
            _ => std::future::pending().await,
        }
    }
}

async fn watch(
    registry: Arc<dyn ProcessRegistry>,
    hub: Arc<ProcessChangeHub>,
    poll: Duration,
    mut incoming: mpsc::UnboundedReceiver<Registration>,
) {
    let mut feed = hub.cancel_feed();
    let mut pending: HashMap<ProcessId, Vec<oneshot::Sender<Value>>> = HashMap::new();
    let mut due = true;
    let mut last_round = Instant::now() - ROUND_GAP;
    loop {
        if due && !pending.is_empty() {
            tokio::time::sleep_until(last_round + ROUND_GAP).await;
            while let Ok(registration) = incoming.try_recv() {
                add(&mut pending, registration);
            }
            round(registry.as_ref(), &mut pending).await;
            last_round = Instant::now();
            due = false;
        }
        tokio::select! {
            registration = incoming.recv() => match registration {
                Some(registration) => {
                    add(&mut pending, registration);
                    due = true;
                }
                None => return,
            },
            event = feed.next() => {
                due |= match event {
                    FeedEvent::Tick(id) => pending.contains_key(&id),
                    FeedEvent::Resync => true,
                };
            }
            _ = tokio::time::sleep(poll), if !pending.is_empty() => due = true,
        }
    }
}

fn add(pending: &mut HashMap<ProcessId, Vec<oneshot::Sender<Value>>>, registration: Registration) {
    pending
        .entry(registration.id)
        .or_default()
        .push(registration.reply);
}

/// One read for every run still waiting; answers those with a request.
async fn round(
    registry: &dyn ProcessRegistry,
    pending: &mut HashMap<ProcessId, Vec<oneshot::Sender<Value>>>,
) {
    pending.retain(|_, replies| {
        replies.retain(|reply| !reply.is_closed());
        !replies.is_empty()
    });
    if pending.is_empty() {
        return;
    }
    let ids: Vec<ProcessId> = pending.keys().cloned().collect();
    match registry.cancel_requests(&ids).await {
        Ok(requests) => {
            for (id, request) in requests {
                for reply in pending.remove(&id).unwrap_or_default() {
                    let _ = reply.send(request.clone());
                }
            }
        }
        // The next tick or poll reads again.
        Err(err) => tracing::debug!(error = %err, runs = ids.len(), "cancel watch read failed"),
    }
}
