//! Cancellation: a `process.cancel_requested` event, acted on by the owner or, when nobody
//! runs the process, right away.

use serde_json::{Value, json};

use crate::error::ProcessResult;
use crate::model::{AppendRequest, ProcessId, ProcessRecord};
use crate::registry::ProcessRegistry;
use crate::reserved::CANCEL_REQUESTED;

/// Largest cancellation `reason`, as serialized JSON. The reason is copied into the
/// terminal event's output, so it is kept small enough that the completion always fits.
pub const MAX_CANCEL_REASON_BYTES: usize = 4096;

/// Requests cancellation of `id` on behalf of `pod`: appends `process.cancel_requested
/// {reason, by}`, then, if no live lease is held (nobody runs it: pending, `external`, or its
/// owner was lost), claims it and completes it as `cancelled` at once. Otherwise the owning
/// pod sees the request, stops the run and completes it as `cancelled`. Returns the process
/// as it is after the request. A terminal process is `ProcessTerminal` (nothing to cancel).
///
/// With a `replay_key`, a retried request (after a lost answer) finds its stored request
/// instead of writing a second one, and finishes the work the first try may have left. Every
/// input is checked before anything is written: a refused request writes nothing. A `reason`
/// larger than [`MAX_CANCEL_REASON_BYTES`] is `InvalidInput`.
///
/// Then the request is passed to its children that have not ended, and to theirs (CONTRACT
/// §10): each gets `process.cancel_requested {reason: {parent, reason}, by}` with a replay
/// key derived from the parent, so a retried request passes each on once; a child's end is
/// decided by its own owner (or at once, when nobody runs it) as for any request.
pub async fn cancel_process(
    registry: &dyn ProcessRegistry,
    id: &ProcessId,
    pod: &str,
    reason: Value,
    replay_key: Option<&str>,
) -> ProcessResult<ProcessRecord> {
    if let Some(key) = replay_key {
        crate::validate::caller_replay_key(key)?;
    }
    let reason_bytes = serde_json::to_vec(&reason).map_or(usize::MAX, |bytes| bytes.len());
    if reason_bytes > MAX_CANCEL_REASON_BYTES {
        return Err(crate::ProcessError::InvalidInput(format!(
            "the cancellation reason is {reason_bytes} bytes of JSON; at most \
             {MAX_CANCEL_REASON_BYTES} are accepted"
        )));
    }
    let mut append =
        AppendRequest::reserved(CANCEL_REQUESTED, json!({"reason": reason, "by": pod}));
    if let Some(key) = replay_key {
        append = append.with_replay_key(key);
    }
    let record = match cancel_one(registry, id, pod, append).await {
        Ok(record) => record,
        // Ended already: if it ended cancelled, its descendants may not have been told (a
        // request that ended it at once and stopped before passing itself on): a retry
        // passes it on. A parent that ended otherwise leaves its children be.
        Err(err @ crate::ProcessError::ProcessTerminal { .. }) => {
            let asked = registry
                .get_process(id)
                .await
                .ok()
                .flatten()
                .is_some_and(|record| record.has_children && record.cancel_request.is_some());
            if asked && let Err(walk) = cancel_descendants(registry, id, pod).await {
                tracing::warn!(process_id = %id, error = %walk,
                    "could not pass an earlier cancellation on to every descendant");
            }
            return Err(err);
        }
        Err(err) => return Err(err),
    };
    if record.has_children {
        cancel_descendants(registry, id, pod).await?;
    }
    Ok(record)
}

/// Most descendants one request cancels; beyond, the rest are left as they are (a warning is
/// logged; a later request goes on).
pub const MAX_CANCELLED_DESCENDANTS: usize = 10_000;

/// Most descendants (ended or not) one request looks at.
pub const MAX_VISITED_DESCENDANTS: usize = 100_000;

/// Passes a cancellation of `root` on to every descendant that has not ended, breadth
/// first, within [`MAX_CANCELLED_DESCENDANTS`] and [`MAX_VISITED_DESCENDANTS`]. Each gets
/// the request derived from its parent ([`crate::registry::parent_cancel_request`]): the
/// same whichever pod passes it on, so a request passed on twice is written once.
async fn cancel_descendants(
    registry: &dyn ProcessRegistry,
    root: &ProcessId,
    pod: &str,
) -> ProcessResult<()> {
    let mut parents = std::collections::VecDeque::from([root.clone()]);
    let (mut cancelled, mut visited) = (0usize, 0usize);
    let within = |cancelled: usize, visited: usize| {
        cancelled < MAX_CANCELLED_DESCENDANTS && visited < MAX_VISITED_DESCENDANTS
    };
    while let Some(parent) = parents.pop_front() {
        let mut filter = crate::model::ProcessFilter {
            parent: Some(parent.clone()),
            limit: Some(1_000),
            ..Default::default()
        };
        loop {
            let page = registry.list_processes(filter.clone()).await?;
            for child in &page.processes {
                if !within(cancelled, visited) {
                    break;
                }
                visited += 1;
                // Grandchildren are visited whether or not the child has ended: a child that
                // ended leaves its own children running.
                if child.has_children {
                    parents.push_back(child.id.clone());
                }
                if child.terminal.is_some() {
                    continue;
                }
                cancelled += 1;
                let request = crate::registry::parent_cancel_request(&parent);
                match cancel_one(registry, &child.id, pod, request).await {
                    // Ended meanwhile, or pruned: nothing left to pass on to.
                    Ok(_)
                    | Err(crate::ProcessError::ProcessTerminal { .. })
                    | Err(crate::ProcessError::NotFound(_)) => {}
                    Err(err) => return Err(err),
                }
            }
            match page.next {
                Some(next) if within(cancelled, visited) => filter.after = Some(next),
                _ => break,
            }
        }
        if !within(cancelled, visited) {
            tracing::warn!(process_id = %root, cancelled, visited,
                "a cancellation reached its bound of descendants");
            break;
        }
    }
    Ok(())
}

/// Writes the cancellation request `append` to `id` alone and, when nobody runs it, ends it
/// (see [`cancel_process`] and [`crate::registry::request_cancellation`]).
async fn cancel_one(
    registry: &dyn ProcessRegistry,
    id: &ProcessId,
    pod: &str,
    append: AppendRequest,
) -> ProcessResult<ProcessRecord> {
    crate::registry::request_cancellation(registry, id, &format!("canceller:{pod}"), append).await
}
