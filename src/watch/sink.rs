//! `ProcessEventSink`: best-effort freshness after a committed append.

use async_trait::async_trait;

use crate::model::{ProcessEvent, ProcessId};

/// Told about each event after its append has committed. Best effort, never truth.
///
/// `emit` returns `()`: it cannot fail or roll back the write. It is awaited inline on the
/// append path, so it must return fast: real I/O goes to a channel or background task that
/// drops (and counts) when full. No buffering across crashes, no retry, no delivery promise:
/// consumers that need completeness reconcile from `events_after`.
#[async_trait]
pub trait ProcessEventSink: Send + Sync {
    /// Called once per newly written event, in seq order within one append call. Never called
    /// for terminal events (completion bypasses the sink) nor for replayed appends.
    async fn emit(&self, event: &ProcessEvent);
}

/// Told when a process has been completed through this pod, so that waiters on other pods can
/// be woken early. A hint only triggers a read of the terminal column; it carries no state.
pub trait CompletionHint: Send + Sync {
    /// Must not block: hand the hint to a background sender or drop it.
    fn completed(&self, id: &ProcessId);
}

/// Told when runnable work may exist: a runnable process was registered, or a lease handed
/// back. The stack's hint wakes the local worker and tells the other pods, so that every
/// entry point (library, HTTP, console, CLI) starts work without waiting for a poll.
pub trait WorkHint: Send + Sync {
    /// Must not block.
    fn work_available(&self);
}

/// A sink that does nothing (a pod without cross-pod freshness).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoopSink;

#[async_trait]
impl ProcessEventSink for NoopSink {
    async fn emit(&self, _event: &ProcessEvent) {}
}

impl CompletionHint for NoopSink {
    fn completed(&self, _id: &ProcessId) {}
}

impl WorkHint for NoopSink {
    fn work_available(&self) {}
}
