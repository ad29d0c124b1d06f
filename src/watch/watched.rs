//! `WatchedProcessRegistry`: a decorator that signals committed appends and completions.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::FutureExt;

use super::hub::ProcessChangeHub;
use super::sink::{CompletionHint, NoopSink, ProcessEventSink, WorkHint};
use crate::error::ProcessResult;
use crate::model::{
    AppendOutcome, AppendRequest, ClaimOutcome, Completion, Lease, Message, ProcessEvent,
    ProcessFilter, ProcessId, ProcessPage, ProcessRecord, ProcessRegistration, PruneReport,
    RunnableClaim, Suspension, TerminalRecord,
};
use crate::registry::ProcessRegistry;

/// Wraps any registry and changes none of its results. After each successful
/// `append_event`/`append_events` that wrote events it ticks the hub for that process, then
/// calls the sink's `emit` once per written event, in seq order. Replayed appends wrote
/// nothing, so they neither tick nor emit (the original write did). `complete_process` goes
/// straight to the inner registry (its terminal event never reaches the sink), then ticks the
/// hub and gives the completion hint.
///
/// The sink cannot fail a write: a sink that panics in `emit` is contained (logged, counted
/// in [`WatchedProcessRegistry::sink_panics`]) and the caller still gets its outcome.
pub struct WatchedProcessRegistry<R> {
    inner: R,
    hub: Arc<ProcessChangeHub>,
    sink: Arc<dyn ProcessEventSink>,
    hint: Arc<dyn CompletionHint>,
    work: Arc<dyn WorkHint>,
    sink_panics: Arc<AtomicU64>,
    append_latency: Option<crate::metrics::LatencyHistogram>,
}

impl<R: ProcessRegistry> WatchedProcessRegistry<R> {
    /// Decorates `inner`, ticking `hub` and emitting to `sink`; no completion hint.
    pub fn new(inner: R, hub: Arc<ProcessChangeHub>, sink: Arc<dyn ProcessEventSink>) -> Self {
        Self {
            inner,
            hub,
            sink,
            hint: Arc::new(NoopSink),
            work: Arc::new(NoopSink),
            sink_panics: Arc::new(AtomicU64::new(0)),
            append_latency: None,
        }
    }

    /// How many `emit` calls (and completion hints) panicked, and were contained.
    pub fn sink_panics(&self) -> u64 {
        self.sink_panics.load(Ordering::Relaxed)
    }

    /// The counter behind [`Self::sink_panics`], to read after the registry is shared.
    pub fn sink_panic_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.sink_panics)
    }

    /// The same decorator, giving `work` a hint whenever runnable work may exist: after a
    /// registration of a process pods run (not `external`, not ended), after a release,
    /// after a message, after a suspension whose wait is already over, and after the end of
    /// a child (its parent may wait) or of a process placed in a named queue or under a
    /// concurrency key (a slot of a limited queue may be free).
    pub fn with_work_hint(mut self, work: Arc<dyn WorkHint>) -> Self {
        self.work = work;
        self
    }

    /// The same decorator, giving `hint` on every completion.
    pub fn with_completion_hint(mut self, hint: Arc<dyn CompletionHint>) -> Self {
        self.hint = hint;
        self
    }

    /// The same decorator, recording how long each successful append (a batch counts once)
    /// took in `histogram`.
    pub fn with_append_latency(mut self, histogram: crate::metrics::LatencyHistogram) -> Self {
        self.append_latency = Some(histogram);
        self
    }

    /// The decorated registry.
    pub fn inner(&self) -> &R {
        &self.inner
    }

    /// The hub this decorator ticks.
    pub fn hub(&self) -> &Arc<ProcessChangeHub> {
        &self.hub
    }

    async fn signal(&self, id: &ProcessId, outcomes: &[AppendOutcome]) {
        if outcomes.iter().all(|outcome| outcome.replayed) {
            return;
        }
        if outcomes.iter().any(|outcome| {
            !outcome.replayed && outcome.event.event_type == crate::reserved::CANCEL_REQUESTED
        }) {
            self.hub.tick_cancel(id);
        } else {
            self.hub.tick(id);
        }
        for outcome in outcomes {
            if !outcome.replayed {
                let emitted = AssertUnwindSafe(self.sink.emit(&outcome.event))
                    .catch_unwind()
                    .await;
                if emitted.is_err() {
                    self.sink_panics.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        process_id = %id,
                        seq = outcome.event.seq,
                        "the event sink panicked; the append stands"
                    );
                }
            }
        }
    }
}

#[async_trait]
impl<R: ProcessRegistry> ProcessRegistry for WatchedProcessRegistry<R> {
    async fn register_process(
        &self,
        registration: ProcessRegistration,
    ) -> ProcessResult<ProcessRecord> {
        self.start_process(registration)
            .await
            .map(|started| started.process)
    }

    async fn start_process(
        &self,
        registration: ProcessRegistration,
    ) -> ProcessResult<crate::model::StartOutcome> {
        let started = self.inner.start_process(registration).await?;
        let record = &started.process;
        if record.disposition != crate::model::Disposition::External && record.terminal.is_none() {
            self.work.work_available();
        }
        Ok(started)
    }

    async fn get_process(&self, id: &ProcessId) -> ProcessResult<Option<ProcessRecord>> {
        self.inner.get_process(id).await
    }

    async fn terminal_states(
        &self,
        ids: &[ProcessId],
    ) -> ProcessResult<HashMap<ProcessId, Option<TerminalRecord>>> {
        self.inner.terminal_states(ids).await
    }

    async fn cancel_requests(
        &self,
        ids: &[ProcessId],
    ) -> ProcessResult<HashMap<ProcessId, serde_json::Value>> {
        self.inner.cancel_requests(ids).await
    }

    async fn list_processes(&self, filter: ProcessFilter) -> ProcessResult<ProcessPage> {
        self.inner.list_processes(filter).await
    }

    async fn append_events(
        &self,
        id: &ProcessId,
        requests: Vec<AppendRequest>,
    ) -> ProcessResult<Vec<AppendOutcome>> {
        let started = std::time::Instant::now();
        let outcomes = self.inner.append_events(id, requests).await?;
        if let Some(histogram) = &self.append_latency {
            histogram.observe(started.elapsed());
        }
        self.signal(id, &outcomes).await;
        Ok(outcomes)
    }

    async fn events_after(
        &self,
        id: &ProcessId,
        after_seq: i64,
        limit: u32,
    ) -> ProcessResult<Vec<ProcessEvent>> {
        self.inner.events_after(id, after_seq, limit).await
    }

    async fn complete_process(
        &self,
        id: &ProcessId,
        completion: Completion,
    ) -> ProcessResult<ProcessRecord> {
        let record = self.inner.complete_process(id, completion).await?;
        self.hub.tick(id);
        if let Some(parent) = &record.parent {
            // The registry told the parent (a message in its log): it may be runnable now.
            self.hub.tick(parent);
            self.work.work_available();
        } else if record.concurrency_key.is_some() || record.queue != record.kind {
            // Work placed for flow control: its end may free a slot another pod waits for
            // (the pod that ran it claims again anyway).
            self.work.work_available();
        }
        if std::panic::catch_unwind(AssertUnwindSafe(|| self.hint.completed(id))).is_err() {
            self.sink_panics.fetch_add(1, Ordering::Relaxed);
            tracing::error!(process_id = %id, "the completion hint panicked; the completion stands");
        }
        Ok(record)
    }

    async fn claim(
        &self,
        id: &ProcessId,
        owner: &str,
        ttl: Duration,
    ) -> ProcessResult<ClaimOutcome> {
        self.inner.claim(id, owner, ttl).await
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> ProcessResult<Lease> {
        self.inner.renew(lease, ttl).await
    }

    async fn release(&self, lease: &Lease) -> ProcessResult<()> {
        self.inner.release(lease).await?;
        self.work.work_available();
        Ok(())
    }

    async fn claim_runnable(
        &self,
        owner: &str,
        ttl: Duration,
        limit: u32,
    ) -> ProcessResult<Vec<RunnableClaim>> {
        self.inner.claim_runnable(owner, ttl, limit).await
    }

    async fn next_wake(&self) -> ProcessResult<Option<Duration>> {
        self.inner.next_wake().await
    }

    async fn suspend(&self, lease: &Lease, suspension: Suspension) -> ProcessResult<ProcessRecord> {
        let record = self.inner.suspend(lease, suspension).await?;
        self.hub.tick(&lease.process_id);
        // A wait that is over already (a message was there): runnable at once.
        if record.terminal.is_none() && record.wake_at.is_some_and(|at| at <= chrono::Utc::now()) {
            self.work.work_available();
        }
        Ok(record)
    }

    async fn send_message(&self, id: &ProcessId, message: Message) -> ProcessResult<AppendOutcome> {
        let outcome = self.inner.send_message(id, message).await?;
        self.signal(id, std::slice::from_ref(&outcome)).await;
        if !outcome.replayed {
            // The message may make a waiting process runnable: any pod may take it now.
            self.work.work_available();
        }
        Ok(outcome)
    }

    async fn journal(
        &self,
        id: &ProcessId,
        after_seq: i64,
        limit: u32,
    ) -> ProcessResult<Vec<ProcessEvent>> {
        self.inner.journal(id, after_seq, limit).await
    }

    async fn next_message(
        &self,
        id: &ProcessId,
        topic: &str,
        after_seq: i64,
    ) -> ProcessResult<Option<ProcessEvent>> {
        self.inner.next_message(id, topic, after_seq).await
    }

    fn payload_limit(&self) -> usize {
        self.inner.payload_limit()
    }

    async fn prune_terminal_processes(&self, cutoff: DateTime<Utc>) -> ProcessResult<PruneReport> {
        self.inner.prune_terminal_processes(cutoff).await
    }
}
