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

/// A host's sink behind a bounded queue, so that it can never slow an append: `emit` puts the
/// event on the queue and returns at once; when the queue is full the event is dropped and
/// counted ([`BoundedSink::dropped`]), as the sink contract allows (consumers that need every
/// event reconcile from the log). A task of the owner's delivers the queue to the host's sink
/// in order, containing (and counting) its panics.
pub struct BoundedSink {
    queue: tokio::sync::mpsc::Sender<ProcessEvent>,
    dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
    panics: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl BoundedSink {
    /// The adapter of `inner` with room for `capacity` events, and its delivery task for an
    /// owner to run: it delivers until its token fires, then what was queued by then.
    pub fn start(
        inner: std::sync::Arc<dyn ProcessEventSink>,
        capacity: usize,
    ) -> (
        Self,
        impl FnOnce(tokio_util::sync::CancellationToken) -> futures::future::BoxFuture<'static, ()>
        + Send
        + 'static,
    ) {
        use futures::FutureExt;
        let (queue, mut pending) = tokio::sync::mpsc::channel::<ProcessEvent>(capacity.max(1));
        let dropped = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let panics = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let task_panics = std::sync::Arc::clone(&panics);
        let deliver = move |stop: tokio_util::sync::CancellationToken| {
            async move {
                loop {
                    let event = tokio::select! {
                        event = pending.recv() => event,
                        () = stop.cancelled() => {
                            pending.close();
                            pending.recv().await
                        }
                    };
                    let Some(event) = event else { return };
                    let emitted = std::panic::AssertUnwindSafe(inner.emit(&event))
                        .catch_unwind()
                        .await;
                    if emitted.is_err() {
                        task_panics.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::error!(process_id = %event.process_id, seq = event.seq, "the host's sink panicked; the append stands");
                    }
                }
            }
            .boxed()
        };
        (
            Self {
                queue,
                dropped,
                panics,
            },
            deliver,
        )
    }

    /// Events dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The counters of dropped events and of panics of the host's sink, to read after the
    /// adapter is shared.
    pub fn counters(
        &self,
    ) -> (
        std::sync::Arc<std::sync::atomic::AtomicU64>,
        std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) {
        (
            std::sync::Arc::clone(&self.dropped),
            std::sync::Arc::clone(&self.panics),
        )
    }
}

#[async_trait]
impl ProcessEventSink for BoundedSink {
    async fn emit(&self, event: &ProcessEvent) {
        if self.queue.try_send(event.clone()).is_err() {
            self.dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}
