//! `ProcessEngine`: what runs a process of a given kind on a pod.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::error::{ProcessError, ProcessResult};
use crate::model::{AppendRequest, Lease, ProcessEvent, ProcessRecord};
use crate::registry::ProcessRegistry;

/// How a run ended: `Ok(output)` completes the process, `Err(output)` fails it.
pub type EngineResult = Result<Value, Value>;

/// Runs processes of one kind. An engine must return soon after `cancel` fires (lease lost,
/// cancellation requested, pod stopping); whatever it returns then is ignored in favour of
/// the reason for the stop.
#[async_trait]
pub trait ProcessEngine: Send + Sync {
    /// Runs one attempt of the process.
    async fn run(&self, run: RunContext) -> EngineResult;
}

/// Everything an engine gets for one attempt.
pub struct RunContext {
    /// The process (input, kind, disposition, ...).
    pub process: ProcessRecord,
    /// 1 for the first run, +1 for every rerun after a lost owner.
    pub attempt: i32,
    /// Appends to the process log under the run's lease.
    pub events: RunEvents,
    /// Fires when the run must stop.
    pub cancel: CancellationToken,
}

/// Appends made by an engine, fenced by the run's lease: once the lease is lost, every append
/// is refused with `LeaseLost` and the run is cancelled, so a paused or partitioned pod can
/// never write again.
#[derive(Clone)]
pub struct RunEvents {
    registry: Arc<dyn ProcessRegistry>,
    lease: Lease,
    lease_lost: CancellationToken,
}

impl RunEvents {
    pub(crate) fn new(
        registry: Arc<dyn ProcessRegistry>,
        lease: Lease,
        lease_lost: CancellationToken,
    ) -> Self {
        Self {
            registry,
            lease,
            lease_lost,
        }
    }

    /// Appends one event under the lease.
    pub async fn append(&self, event_type: &str, payload: Value) -> ProcessResult<ProcessEvent> {
        self.append_request(AppendRequest::new(event_type, payload))
            .await
    }

    pub(crate) async fn append_request(
        &self,
        request: AppendRequest,
    ) -> ProcessResult<ProcessEvent> {
        let result = self
            .registry
            .append_event(&self.lease.process_id, request.fenced(&self.lease))
            .await;
        if matches!(result, Err(ProcessError::LeaseLost { .. })) {
            self.lease_lost.cancel();
        }
        result.map(|outcome| outcome.event)
    }

    /// The lease the run writes under.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }
}

/// The engines a pod knows, by kind.
#[derive(Clone, Default)]
pub struct Engines {
    by_kind: HashMap<String, Arc<dyn ProcessEngine>>,
}

impl Engines {
    /// No engines.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the engine of `kind`.
    pub fn with(mut self, kind: &str, engine: impl ProcessEngine + 'static) -> Self {
        self.by_kind.insert(kind.to_owned(), Arc::new(engine));
        self
    }

    /// The engine of `kind`, if any.
    pub fn get(&self, kind: &str) -> Option<Arc<dyn ProcessEngine>> {
        self.by_kind.get(kind).cloned()
    }

    /// The kinds known, sorted.
    pub fn kinds(&self) -> Vec<String> {
        let mut kinds: Vec<String> = self.by_kind.keys().cloned().collect();
        kinds.sort();
        kinds
    }
}
