//! Cancellation: a `process.cancel_requested` event, acted on by the owner or, when nobody
//! runs the process, right away.

use std::time::Duration;

use serde_json::{Value, json};

use crate::error::ProcessResult;
use crate::model::{
    AppendRequest, ClaimOutcome, Completion, ProcessId, ProcessRecord, TerminalState,
};
use crate::registry::ProcessRegistry;
use crate::reserved::CANCEL_REQUESTED;

/// Lease TTL of the short claim a canceller takes to complete an unowned process.
const CANCELLER_TTL: Duration = Duration::from_secs(30);

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
    let record = cancel_one(registry, id, pod, reason, replay_key).await?;
    if record.has_children {
        cancel_descendants(registry, id, pod).await?;
    }
    Ok(record)
}

/// Most descendants (ended or not) one request visits; beyond, the rest are left as they are
/// (a warning is logged).
pub const MAX_CANCELLED_DESCENDANTS: usize = 10_000;

/// Passes a cancellation of `root` on to every descendant that has not ended, breadth
/// first, at most [`MAX_CANCELLED_DESCENDANTS`].
async fn cancel_descendants(
    registry: &dyn ProcessRegistry,
    root: &ProcessId,
    pod: &str,
) -> ProcessResult<()> {
    let mut parents = std::collections::VecDeque::from([root.clone()]);
    let mut passed = 0usize;
    while let Some(parent) = parents.pop_front() {
        let mut filter = crate::model::ProcessFilter {
            parent: Some(parent.clone()),
            limit: Some(1_000),
            ..Default::default()
        };
        loop {
            let page = registry.list_processes(filter.clone()).await?;
            for child in &page.processes {
                if passed >= MAX_CANCELLED_DESCENDANTS {
                    break;
                }
                passed += 1;
                // Grandchildren are visited whether or not the child has ended: a child that
                // ended leaves its own children running.
                if child.has_children {
                    parents.push_back(child.id.clone());
                }
                if child.terminal.is_some() {
                    continue;
                }
                let reason = json!({"parent": parent, "reason": "the parent was cancelled"});
                let key = format!("proclog:parent-cancelled:{parent}");
                match cancel_one(registry, &child.id, pod, reason, Some(&key)).await {
                    Ok(_) | Err(crate::ProcessError::ProcessTerminal { .. }) => {}
                    Err(err) => return Err(err),
                }
            }
            match page.next {
                Some(next) if passed < MAX_CANCELLED_DESCENDANTS => filter.after = Some(next),
                _ => break,
            }
        }
        if passed >= MAX_CANCELLED_DESCENDANTS {
            tracing::warn!(process_id = %root, "a cancellation reached its bound of descendants");
            break;
        }
    }
    Ok(())
}

/// Requests cancellation of `id` alone (see [`cancel_process`]); a `replay_key` is checked
/// by the caller (this one may be proclog's own).
async fn cancel_one(
    registry: &dyn ProcessRegistry,
    id: &ProcessId,
    pod: &str,
    reason: Value,
    replay_key: Option<&str>,
) -> ProcessResult<ProcessRecord> {
    let canceller = format!("canceller:{pod}");
    crate::validate::owner(&canceller)?;
    let reason_bytes = serde_json::to_vec(&reason).map_or(usize::MAX, |bytes| bytes.len());
    if reason_bytes > MAX_CANCEL_REASON_BYTES {
        return Err(crate::ProcessError::InvalidInput(format!(
            "the cancellation reason is {reason_bytes} bytes of JSON; at most \
             {MAX_CANCEL_REASON_BYTES} are accepted"
        )));
    }
    let request = json!({"reason": reason, "by": pod});
    let mut append = AppendRequest::reserved(CANCEL_REQUESTED, request.clone());
    if let Some(key) = replay_key {
        append = append.with_replay_key(key);
    }
    let stored = registry.append_event(id, append).await?;
    // A replay carries the first try's request: complete with exactly that content.
    let request = stored.event.payload;
    match registry.claim(id, &canceller, CANCELLER_TTL).await {
        Ok(ClaimOutcome::Acquired(lease)) => {
            let completion = Completion::new(TerminalState::Cancelled, json!({"request": request}))
                .fenced(&lease);
            let completed = registry.complete_process(id, completion).await;
            if completed.is_err() {
                // Hand the process back at once rather than holding it for the canceller's
                // TTL; the request stays in the log, so the next owner cancels it.
                let _ = registry.release(&lease).await;
            }
            return completed;
        }
        // Owned: the owner acts on the request. Ended meanwhile: nothing left to do.
        Ok(ClaimOutcome::Busy { .. }) | Err(crate::ProcessError::ProcessTerminal { .. }) => {}
        Err(err) => return Err(err),
    }
    registry
        .get_process(id)
        .await?
        .ok_or_else(|| crate::ProcessError::NotFound(id.clone()))
}
