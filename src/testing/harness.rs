//! [`EngineHarness`]: run one [`ProcessEngine`] the way a pod runs it (claim, lease,
//! `process.started`, the engine, completion, reruns after a lost owner), against the
//! in-memory registry or a test database, with faults injected at chosen points, and get the
//! log and the terminal record back. River's `rivertest` is the model: a host tests its
//! engines with it in a few lines.
//!
//! ```no_run
//! # async fn demo() {
//! use proclog::pod::{EngineResult, ProcessEngine, RunContext};
//! use proclog::testing::{EngineHarness, Fault};
//! use proclog::{TerminalState, async_trait};
//! use serde_json::json;
//!
//! struct Greet;
//!
//! #[async_trait]
//! impl ProcessEngine for Greet {
//!     async fn run(&self, run: RunContext) -> EngineResult {
//!         run.events
//!             .append_with_key("greeted", json!({"name": run.process.input["name"]}), "greet")
//!             .await
//!             .map_err(|err| json!({"error": err.to_string()}))?;
//!         Ok(json!("done"))
//!     }
//! }
//!
//! // The lease is lost right after the first append: the process is run again (attempt 2),
//! // and the keyed step is found done instead of written twice.
//! let report = EngineHarness::new("greet", Greet)
//!     .input(json!({"name": "Ada"}))
//!     .fault(Fault::LoseLease { after_appends: 1 })
//!     .run()
//!     .await
//!     .unwrap();
//! assert_eq!(report.state(), Some(TerminalState::Completed));
//! assert_eq!(report.record.attempts, 2);
//! assert_eq!(report.count("greeted"), 1);
//! # }
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::error::{ProcessError, ProcessResult};
use crate::model::{
    AppendOutcome, AppendRequest, ClaimOutcome, Completion, Disposition, Lease, ProcessEvent,
    ProcessFilter, ProcessId, ProcessPage, ProcessRecord, ProcessRegistration, PruneReport,
    RunnableClaim, TerminalRecord, TerminalState,
};
use crate::pod::{Pod, ProcessEngine, RunEnd};
use crate::pod_services::PodServices;
use crate::registry::{ProcessRegistry, RegistryConfig};
use crate::stack::Proclog;
use crate::store::ClusterStore;

/// A fault to inject, counted in the engine's own appends, its steps, timers and receipts
/// included (1 is its first; proclog's `process.started` does not count). Each fault fires
/// once.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// The `nth` append fails with a transient error (`Unavailable`): before it is written
    /// (`committed: false`) or after (`committed: true`, the answer lost). The run retries
    /// it, with its replay key: the engine sees nothing, the log holds the event once.
    TransientAppend {
        /// Which append.
        nth: usize,
        /// Whether it was written before the error.
        committed: bool,
    },
    /// Right after the engine's `after_appends`th append, the run's lease is lost (as when
    /// its pod is paused or cut off past its TTL): every later write of that run is refused
    /// with `LeaseLost`, and the process is claimed again once the lease has expired (a
    /// `rerun` process runs again, an `abandon` process is completed `abandoned`).
    LoseLease {
        /// After how many appends.
        after_appends: usize,
    },
    /// Right after the engine's `after_appends`th append, a cancellation is requested.
    Cancel {
        /// After how many appends.
        after_appends: usize,
        /// The reason given.
        reason: Value,
    },
}

/// Runs one engine on one process; see the module doc.
pub struct EngineHarness {
    kind: String,
    engine: Arc<dyn ProcessEngine>,
    input: Value,
    disposition: Disposition,
    lease_ttl: Duration,
    faults: Vec<Fault>,
    database_url: Option<String>,
    timeout: Duration,
    suspend_after: Duration,
    retry: Option<crate::model::RetryPolicy>,
    shape: Option<Box<dyn FnOnce(ProcessRegistration) -> ProcessRegistration + Send>>,
}

/// What happened to the process.
#[derive(Clone, Debug)]
pub struct HarnessReport {
    /// The process's record at the end (attempts, the terminal column, ...).
    pub record: ProcessRecord,
    /// Its whole log.
    pub events: Vec<ProcessEvent>,
    /// How each run ended, in order.
    pub runs: Vec<RunEnd>,
}

impl HarnessReport {
    /// The terminal state (`None` if the process did not end within the harness's timeout).
    pub fn state(&self) -> Option<TerminalState> {
        self.record.terminal.as_ref().map(|t| t.state)
    }

    /// The terminal output.
    pub fn output(&self) -> Option<&Value> {
        self.record.terminal.as_ref().map(|t| &t.output)
    }

    /// The event types of the log, in order.
    pub fn event_types(&self) -> Vec<&str> {
        self.events.iter().map(|e| e.event_type.as_str()).collect()
    }

    /// How many events of `event_type` the log holds.
    pub fn count(&self, event_type: &str) -> usize {
        self.events
            .iter()
            .filter(|e| e.event_type == event_type)
            .count()
    }
}

impl EngineHarness {
    /// A harness running processes of `kind` with `engine`: input `null`, disposition
    /// `rerun`, leases of 500 ms (so reruns come quickly), in memory, no faults, 60 s to end.
    pub fn new(kind: &str, engine: impl ProcessEngine + 'static) -> Self {
        Self {
            kind: kind.to_owned(),
            engine: Arc::new(engine),
            input: Value::Null,
            disposition: Disposition::Rerun,
            lease_ttl: Duration::from_millis(500),
            faults: Vec::new(),
            database_url: None,
            timeout: Duration::from_secs(60),
            suspend_after: Duration::from_secs(2),
            retry: None,
            shape: None,
        }
    }

    /// Waits up to `threshold` are slept in the run, longer ones suspend the process
    /// (default 2 s, as on a pod).
    pub fn suspend_after(mut self, threshold: Duration) -> Self {
        self.suspend_after = threshold;
        self
    }

    /// The engine kind's retry policy (see [`crate::pod::Engines::with_retry`]).
    pub fn retry(mut self, policy: crate::model::RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// Shapes the registration (a start time, a deadline, a retry policy of its own).
    pub fn registration(
        mut self,
        shape: impl FnOnce(ProcessRegistration) -> ProcessRegistration + Send + 'static,
    ) -> Self {
        self.shape = Some(Box::new(shape));
        self
    }

    /// The process's input.
    pub fn input(mut self, input: Value) -> Self {
        self.input = input;
        self
    }

    /// The process's disposition.
    pub fn disposition(mut self, disposition: Disposition) -> Self {
        self.disposition = disposition;
        self
    }

    /// The lease TTL of the runs (the time a lost lease takes to expire before the rerun).
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// Injects `fault`.
    pub fn fault(mut self, fault: Fault) -> Self {
        self.faults.push(fault);
        self
    }

    /// Runs on the migrated Postgres database at `url` (e.g. from
    /// [`super::migrated_database_url`]) instead of in memory.
    pub fn database_url(mut self, url: impl Into<String>) -> Self {
        self.database_url = Some(url.into());
        self
    }

    /// How long the process may take to end before the report is returned as it is.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Registers the process, runs it on a pod of its own until it ends (or the timeout),
    /// and reports. Call it within a Tokio runtime.
    pub async fn run(self) -> ProcessResult<HarnessReport> {
        let pod_id = format!("harness-{}", uuid::Uuid::new_v4().simple());
        let config = RegistryConfig::new(&pod_id);
        let (registry, cluster): (Arc<dyn ProcessRegistry>, Arc<dyn ClusterStore>) =
            match &self.database_url {
                None => {
                    let memory = Arc::new(crate::InMemoryProcessRegistry::new(config));
                    (Arc::clone(&memory) as Arc<dyn ProcessRegistry>, memory)
                }
                Some(url) => {
                    let pool = crate::pg::connect_pool(url, 4)?;
                    let probe = crate::pg::connect_pool(url, 1)?;
                    (
                        Arc::new(crate::PgProcessRegistry::new(pool.clone(), config)),
                        Arc::new(crate::pg::PgClusterStore::new(pool, probe)),
                    )
                }
            };
        let faulty = Arc::new(Faulty {
            inner: Arc::clone(&registry),
            faults: Mutex::new(self.faults.clone()),
            state: Mutex::new(FaultState::default()),
            pod_id: pod_id.clone(),
        });
        let services = PodServices::with_store(&pod_id, faulty, cluster, None);
        let stack = Proclog::over(services, self.lease_ttl);
        let mut engines =
            crate::pod::Engines::new().with(&self.kind, HarnessEngine(Arc::clone(&self.engine)));
        if let Some(policy) = self.retry.clone() {
            engines = engines.with_retry(&self.kind, policy);
        }
        let pod = Pod::builder(&stack)
            .engines(engines)
            .concurrency(1)
            .poll_interval(Duration::from_millis(50))
            .suspend_after(self.suspend_after)
            .start()
            .await?;
        let mut registration = ProcessRegistration::new(&self.kind, self.input.clone())
            .with_disposition(self.disposition);
        if let Some(shape) = self.shape {
            registration = shape(registration);
        }
        let process = stack.registry().register_process(registration).await?;
        let _ = stack
            .driver()
            .await_terminal(&process.id, self.timeout)
            .await;
        let stats = pod.stats().cloned();
        pod.shutdown().await;
        let record = registry
            .get_process(&process.id)
            .await?
            .ok_or_else(|| ProcessError::NotFound(process.id.clone()))?;
        let mut events = Vec::new();
        loop {
            let page = registry
                .events_after(
                    &process.id,
                    events.last().map_or(0, |e: &ProcessEvent| e.seq),
                    10_000,
                )
                .await?;
            if page.is_empty() {
                break;
            }
            events.extend(page);
        }
        stack.shutdown().await;
        Ok(HarnessReport {
            record,
            events,
            runs: stats.map(|s| s.ends()).unwrap_or_default(),
        })
    }
}

/// The host's engine, as the harness's pod runs it.
struct HarnessEngine(Arc<dyn ProcessEngine>);

#[async_trait]
impl ProcessEngine for HarnessEngine {
    async fn run(&self, run: crate::pod::RunContext) -> crate::pod::EngineResult {
        self.0.run(run).await
    }
}

#[derive(Default)]
struct FaultState {
    /// The engine's appends so far.
    appends: usize,
    /// Lease tokens lost by a [`Fault::LoseLease`].
    lost: Vec<uuid::Uuid>,
}

/// The registry under the harness's pod, injecting the faults.
struct Faulty {
    inner: Arc<dyn ProcessRegistry>,
    faults: Mutex<Vec<Fault>>,
    state: Mutex<FaultState>,
    pod_id: String,
}

impl Faulty {
    fn lost(&self, token: Option<uuid::Uuid>) -> bool {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        token.is_some_and(|token| state.lost.contains(&token))
    }

    /// Takes the first fault matching `pick`.
    fn take(&self, pick: impl Fn(&Fault) -> bool) -> Option<Fault> {
        let mut faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        let at = faults.iter().position(pick)?;
        Some(faults.remove(at))
    }
}

#[async_trait]
impl ProcessRegistry for Faulty {
    async fn register_process(
        &self,
        registration: ProcessRegistration,
    ) -> ProcessResult<ProcessRecord> {
        self.inner.register_process(registration).await
    }

    async fn start_process(
        &self,
        registration: ProcessRegistration,
    ) -> ProcessResult<crate::model::StartOutcome> {
        self.inner.start_process(registration).await
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

    async fn cancel_requests(&self, ids: &[ProcessId]) -> ProcessResult<HashMap<ProcessId, Value>> {
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
        let fence = requests.first().and_then(|r| r.fence);
        if self.lost(fence.map(|f| f.token)) {
            return Err(ProcessError::LeaseLost { id: id.clone() });
        }
        // The engine's appends, its steps, timers and receipts included; not the run's own
        // `process.started`.
        let engine_append = fence.is_some()
            && requests
                .iter()
                .all(|r| r.event_type != crate::reserved::STARTED);
        if !engine_append {
            return self.inner.append_events(id, requests).await;
        }
        let nth = {
            let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            state.appends + 1
        };
        let transient =
            self.take(|fault| matches!(fault, Fault::TransientAppend { nth: n, .. } if *n == nth));
        if let Some(Fault::TransientAppend { committed, .. }) = transient {
            if committed {
                self.inner.append_events(id, requests).await?;
            }
            return Err(ProcessError::Unavailable(format!(
                "injected by the harness: append {nth} {}",
                if committed {
                    "written, answer lost"
                } else {
                    "not written"
                }
            )));
        }
        let outcomes = self.inner.append_events(id, requests).await?;
        if outcomes.iter().all(|o| o.replayed) {
            return Ok(outcomes);
        }
        self.state.lock().unwrap_or_else(|p| p.into_inner()).appends = nth;
        if self
            .take(|fault| matches!(fault, Fault::LoseLease { after_appends } if *after_appends == nth))
            .is_some()
            && let Some(fence) = fence
        {
            self.state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .lost
                .push(fence.token);
        }
        if let Some(Fault::Cancel { reason, .. }) = self.take(
            |fault| matches!(fault, Fault::Cancel { after_appends, .. } if *after_appends == nth),
        ) {
            crate::pod::cancel_process(self.inner.as_ref(), id, &self.pod_id, reason, None).await?;
        }
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
        if self.lost(completion.fence.map(|f| f.token)) {
            return Err(ProcessError::LeaseLost { id: id.clone() });
        }
        self.inner.complete_process(id, completion).await
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
        if self.lost(Some(lease.token)) {
            return Err(ProcessError::LeaseLost {
                id: lease.process_id.clone(),
            });
        }
        self.inner.renew(lease, ttl).await
    }

    async fn release(&self, lease: &Lease) -> ProcessResult<()> {
        self.inner.release(lease).await
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

    async fn suspend(
        &self,
        lease: &Lease,
        suspension: crate::model::Suspension,
    ) -> ProcessResult<ProcessRecord> {
        if self.lost(Some(lease.token)) {
            return Err(ProcessError::LeaseLost {
                id: lease.process_id.clone(),
            });
        }
        self.inner.suspend(lease, suspension).await
    }

    async fn prune_terminal_processes(&self, cutoff: DateTime<Utc>) -> ProcessResult<PruneReport> {
        self.inner.prune_terminal_processes(cutoff).await
    }
}
