//! CONTRACT §6a in process: a transient fault never changes a process's outcome.
//!
//! A `Worker` runs against real Postgres through `FaultyRegistry`, which makes chosen calls
//! fail with `Unavailable` either before they reach the database or after they committed
//! (the answer lost), as a killed connection or a restarting server would. Each test checks
//! the outcome and the log over SQL.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use common::{migrated_database_url, sql_client};
use proclog::pg::{PgProcessRegistry, connect_pool};
use proclog::pod::{
    EngineResult, Engines, ProcessEngine, RunContext, Worker, WorkerConfig, demo_engines,
};
use proclog::{
    AppendOutcome, AppendRequest, ClaimOutcome, Completion, Disposition, Lease, ProcessChangeHub,
    ProcessError, ProcessEvent, ProcessFilter, ProcessId, ProcessPage, ProcessRecord,
    ProcessRegistration, ProcessRegistry, ProcessResult, ProcessStatus, PruneReport,
    RegistryConfig, RunnableClaim,
};
use serde_json::json;
use tokio::sync::Notify;

/// Safety cap on waits for conditions (never a timing assertion).
const CAP: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Append,
    Complete,
    Renew,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum When {
    /// The call never reaches the database.
    Before,
    /// The call commits, then its answer is lost.
    After,
}

/// A registry whose next calls of a kind fail with `Unavailable`, as planned.
struct FaultyRegistry {
    inner: Arc<dyn ProcessRegistry>,
    plan: Mutex<Vec<(Op, When, u32)>>,
    injected: Mutex<Vec<(Op, When)>>,
}

impl FaultyRegistry {
    fn new(inner: Arc<dyn ProcessRegistry>, plan: Vec<(Op, When, u32)>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            plan: Mutex::new(plan),
            injected: Mutex::new(Vec::new()),
        })
    }

    /// The fault planned for the next call of `op`, if any (consumes one).
    fn take(&self, op: Op) -> Option<When> {
        let mut plan = self.plan.lock().unwrap();
        let (_, when, left) = plan.iter_mut().find(|(o, _, left)| *o == op && *left > 0)?;
        *left -= 1;
        self.injected.lock().unwrap().push((op, *when));
        Some(*when)
    }

    fn injected(&self) -> Vec<(Op, When)> {
        self.injected.lock().unwrap().clone()
    }

    async fn call<T>(
        &self,
        op: Op,
        call: impl std::future::Future<Output = ProcessResult<T>>,
    ) -> ProcessResult<T> {
        match self.take(op) {
            None => call.await,
            Some(When::Before) => Err(lost()),
            Some(When::After) => {
                let _ = call.await;
                Err(lost())
            }
        }
    }
}

fn lost() -> ProcessError {
    ProcessError::Unavailable("injected: connection closed".into())
}

#[async_trait]
impl ProcessRegistry for FaultyRegistry {
    async fn register_process(&self, r: ProcessRegistration) -> ProcessResult<ProcessRecord> {
        self.inner.register_process(r).await
    }
    async fn get_process(&self, id: &ProcessId) -> ProcessResult<Option<ProcessRecord>> {
        self.inner.get_process(id).await
    }
    async fn list_processes(&self, filter: ProcessFilter) -> ProcessResult<ProcessPage> {
        self.inner.list_processes(filter).await
    }
    async fn append_events(
        &self,
        id: &ProcessId,
        requests: Vec<AppendRequest>,
    ) -> ProcessResult<Vec<AppendOutcome>> {
        self.call(Op::Append, self.inner.append_events(id, requests))
            .await
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
        self.call(Op::Complete, self.inner.complete_process(id, completion))
            .await
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
        self.call(Op::Renew, self.inner.renew(lease, ttl)).await
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
        lease: &proclog::Lease,
        suspension: proclog::Suspension,
    ) -> ProcessResult<proclog::ProcessRecord> {
        self.inner.suspend(lease, suspension).await
    }
    async fn prune_terminal_processes(&self, cutoff: DateTime<Utc>) -> ProcessResult<PruneReport> {
        self.inner.prune_terminal_processes(cutoff).await
    }
}

fn pg_registry(url: &str, pod: &str, pool_size: usize) -> Arc<dyn ProcessRegistry> {
    Arc::new(PgProcessRegistry::new(
        connect_pool(url, pool_size).unwrap(),
        RegistryConfig::new(pod),
    ))
}

fn config(pod: &str, ttl: Duration) -> WorkerConfig {
    WorkerConfig {
        lease_ttl: ttl,
        poll_interval: Duration::from_millis(50),
        grace: Duration::from_millis(100),
        hard_stop_margin: Duration::from_millis(300),
        ..WorkerConfig::new(pod)
    }
}

fn spawn(
    registry: Arc<dyn ProcessRegistry>,
    leases: Arc<dyn ProcessRegistry>,
    engines: Engines,
    config: WorkerConfig,
) -> Worker {
    Worker::spawn_with_leases(
        registry,
        leases,
        Arc::new(ProcessChangeHub::new()),
        engines,
        config,
        Arc::new(Notify::new()),
    )
}

async fn register(
    registry: &dyn ProcessRegistry,
    kind: &str,
    input: serde_json::Value,
    disposition: Disposition,
) -> ProcessId {
    registry
        .register_process(ProcessRegistration::new(kind, input).with_disposition(disposition))
        .await
        .unwrap()
        .id
}

async fn wait_terminal(registry: &dyn ProcessRegistry, id: &ProcessId) -> ProcessRecord {
    let deadline = tokio::time::Instant::now() + CAP;
    loop {
        let record = registry.get_process(id).await.unwrap().unwrap();
        if record.terminal.is_some() {
            return record;
        }
        assert!(tokio::time::Instant::now() < deadline, "{id} never ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The event types of a log, in order.
async fn log_types(url: &str, id: &ProcessId) -> Vec<String> {
    sql_client(url)
        .await
        .query(
            "SELECT event_type FROM proclog.events WHERE process_id = $1 ORDER BY seq",
            &[&id.as_str()],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

async fn run_with_faults(plan: Vec<(Op, When, u32)>) -> (String, ProcessId, Arc<FaultyRegistry>) {
    let url = migrated_database_url().await;
    let faulty = FaultyRegistry::new(pg_registry(&url, "pod-a", 4), plan);
    let id = register(
        faulty.as_ref(),
        "steps",
        json!({"steps": 3, "delay_ms": 1}),
        Disposition::Rerun,
    )
    .await;
    let registry: Arc<dyn ProcessRegistry> = faulty.clone();
    let worker = spawn(
        Arc::clone(&registry),
        registry,
        demo_engines(),
        config("pod-a", Duration::from_secs(30)),
    );
    let record = wait_terminal(faulty.as_ref(), &id).await;
    worker.shutdown().await;
    assert_eq!(record.status, ProcessStatus::Completed, "{record:?}");
    (url, id, faulty)
}

const CLEAN_LOG: [&str; 5] = [
    "process.started",
    "step",
    "step",
    "step",
    "process.completed",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_that_fails_once_is_retried_and_stored_once() {
    let (url, id, faulty) = run_with_faults(vec![(Op::Complete, When::Before, 1)]).await;
    assert_eq!(faulty.injected(), [(Op::Complete, When::Before)]);
    assert_eq!(log_types(&url, &id).await, CLEAN_LOG);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_whose_answer_was_lost_is_not_written_twice() {
    let (url, id, faulty) = run_with_faults(vec![(Op::Complete, When::After, 2)]).await;
    assert_eq!(faulty.injected().len(), 2);
    assert_eq!(log_types(&url, &id).await, CLEAN_LOG);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_whose_answers_were_lost_are_stored_exactly_once() {
    // The start and two of the steps commit and lose their answers; one step fails before.
    let (url, id, faulty) = run_with_faults(vec![
        (Op::Append, When::After, 3),
        (Op::Append, When::Before, 1),
    ])
    .await;
    assert_eq!(faulty.injected().len(), 4);
    assert_eq!(log_types(&url, &id).await, CLEAN_LOG);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_renewals_are_retried_without_losing_the_run() {
    let url = migrated_database_url().await;
    let registry = pg_registry(&url, "pod-a", 4);
    let leases = FaultyRegistry::new(
        pg_registry(&url, "pod-a", 1),
        vec![(Op::Renew, When::Before, 2), (Op::Renew, When::After, 2)],
    );
    let id = register(
        registry.as_ref(),
        "steps",
        json!({"steps": 4, "delay_ms": 300}),
        Disposition::Rerun,
    )
    .await;
    let worker = spawn(
        Arc::clone(&registry),
        leases.clone(),
        demo_engines(),
        config("pod-a", Duration::from_millis(900)),
    );
    let record = wait_terminal(registry.as_ref(), &id).await;
    worker.shutdown().await;
    assert_eq!(record.status, ProcessStatus::Completed);
    assert_eq!(record.attempts, 1, "never rerun");
    assert_eq!(
        leases.injected().len(),
        4,
        "the renewals were really disturbed"
    );
}

/// Sleeps, holding the process, for `ms` (default 3000), ignoring nothing.
struct Hold;

#[async_trait]
impl ProcessEngine for Hold {
    async fn run(&self, run: RunContext) -> EngineResult {
        let ms = run.process.input["ms"].as_u64().unwrap_or(3000);
        tokio::select! {
            _ = run.cancel.cancelled() => Err(json!({"error": "cancelled"})),
            _ = tokio::time::sleep(Duration::from_millis(ms)) => Ok(json!({"held_ms": ms})),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_request_pool_cannot_starve_lease_renewals() {
    let url = migrated_database_url().await;
    // The request pool has one connection, which the test holds while the engine runs for
    // three TTLs; renewals go through the pod's lease pool.
    let pool = connect_pool(&url, 1).unwrap();
    let registry: Arc<dyn ProcessRegistry> = Arc::new(PgProcessRegistry::new(
        pool.clone(),
        RegistryConfig::new("pod-a"),
    ));
    let leases = pg_registry(&url, "pod-a", 1);
    let id = register(
        registry.as_ref(),
        "hold",
        json!({"ms": 3000}),
        Disposition::Rerun,
    )
    .await;
    let ttl = Duration::from_secs(1);
    let engines = || Engines::new().with("hold", Hold);
    let a = spawn(
        Arc::clone(&registry),
        leases,
        engines(),
        config("pod-a", ttl),
    );
    let sql = sql_client(&url).await;
    common::pods::wait_for_sql(
        &sql,
        &format!(
            "SELECT count(*) = 1 FROM proclog.events WHERE process_id = '{id}' AND event_type = 'process.started'"
        ),
        CAP,
    )
    .await;
    let held = pool.get().await.unwrap();
    // Another pod stands by to take the process over the moment its lease lapses.
    let b_registry = pg_registry(&url, "pod-b", 2);
    let b = spawn(
        Arc::clone(&b_registry),
        Arc::clone(&b_registry),
        engines(),
        config("pod-b", ttl),
    );
    let started: i64 = sql
        .query_one(
            "SELECT count(*) FROM proclog.events WHERE process_id = $1 AND event_type = 'process.started'",
            &[&id.as_str()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(started, 1);
    // Hold the request pool until the engine has finished its 3 s (the lease kept alive all
    // that time by renewals alone), then let the completion through.
    common::pods::wait_for_sql(
        &sql,
        &format!(
            "SELECT now() - occurred_at > interval '3.2 seconds' FROM proclog.events
              WHERE process_id = '{id}' AND event_type = 'process.started'"
        ),
        CAP,
    )
    .await;
    drop(held);
    let record = wait_terminal(b_registry.as_ref(), &id).await;
    a.shutdown().await;
    b.shutdown().await;
    assert_eq!(record.status, ProcessStatus::Completed, "{record:?}");
    assert_eq!(record.attempts, 1, "pod-b never took it over");
    assert_eq!(record.terminal.unwrap().output, json!({"held_ms": 3000}));
}

/// Ignores its cancellation token entirely.
struct Stubborn;

#[async_trait]
impl ProcessEngine for Stubborn {
    async fn run(&self, _run: RunContext) -> EngineResult {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok(json!("never"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_ends_even_when_an_engine_ignores_cancellation() {
    let url = migrated_database_url().await;
    let registry = pg_registry(&url, "pod-a", 4);
    let id = register(registry.as_ref(), "stubborn", json!({}), Disposition::Rerun).await;
    let worker = spawn(
        Arc::clone(&registry),
        Arc::clone(&registry),
        Engines::new().with("stubborn", Stubborn),
        config("pod-a", Duration::from_secs(60)),
    );
    let sql = sql_client(&url).await;
    common::pods::wait_for_sql(
        &sql,
        &format!("SELECT last_seq = 1 FROM proclog.processes WHERE process_id = '{id}'"),
        CAP,
    )
    .await;
    // Safety cap only: without the hard stop this would never return.
    tokio::time::timeout(CAP, worker.shutdown())
        .await
        .expect("the drain ends");
    let record = registry.get_process(&id).await.unwrap().unwrap();
    assert_eq!(record.status, ProcessStatus::Running);
    assert_eq!(
        record.lease, None,
        "released for another pod to continue at once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_abandon_process_is_abandoned_and_never_started_again() {
    let url = migrated_database_url().await;
    let registry = pg_registry(&url, "pod-a", 4);
    let id = register(
        registry.as_ref(),
        "steps",
        json!({"steps": 1000, "delay_ms": 50}),
        Disposition::Abandon,
    )
    .await;
    let worker = spawn(
        Arc::clone(&registry),
        Arc::clone(&registry),
        demo_engines(),
        config("pod-a", Duration::from_secs(60)),
    );
    let sql = sql_client(&url).await;
    common::pods::wait_for_sql(
        &sql,
        &format!("SELECT last_seq >= 3 FROM proclog.processes WHERE process_id = '{id}'"),
        CAP,
    )
    .await;
    worker.shutdown().await;
    let record = registry.get_process(&id).await.unwrap().unwrap();
    assert_eq!(record.status, ProcessStatus::Abandoned);
    let output = record.terminal.unwrap().output;
    assert_eq!(output["reason"], "pod stopping", "{output}");
    assert_eq!(output["pod"], "pod-a");
    let types = log_types(&url, &id).await;
    assert_eq!(types.iter().filter(|t| *t == "process.started").count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandon_process_handed_back_after_its_start_is_abandoned_not_rerun() {
    // A run that wrote process.started and then released its lease (a drain whose
    // abandonment could not be written, a failed start): the next pod must not start it again.
    let url = migrated_database_url().await;
    let registry = pg_registry(&url, "pod-a", 4);
    let id = register(
        registry.as_ref(),
        "steps",
        json!({"steps": 1}),
        Disposition::Abandon,
    )
    .await;
    let claim = registry
        .claim_runnable("pod-a", Duration::from_secs(60), 1)
        .await
        .unwrap()
        .remove(0);
    // The earlier run's start: reserved types cannot be appended through the API, so an
    // ordinary fenced event is appended and renamed over SQL, and the row records the start
    // as the append of a real one would have.
    registry
        .append_event(
            &id,
            AppendRequest::new("start", json!({"attempt": 1, "pod": "pod-a"})).fenced(&claim.lease),
        )
        .await
        .unwrap();
    sql_client(&url)
        .await
        .execute(
            "WITH renamed AS (
                 UPDATE proclog.events SET event_type = 'process.started'
                  WHERE process_id = $1 RETURNING occurred_at)
             UPDATE proclog.processes SET started_at = (SELECT occurred_at FROM renamed)
              WHERE process_id = $1",
            &[&id.as_str()],
        )
        .await
        .unwrap();
    registry.release(&claim.lease).await.unwrap();
    let worker = spawn(
        Arc::clone(&registry),
        Arc::clone(&registry),
        demo_engines(),
        config("pod-b", Duration::from_secs(60)),
    );
    let record = wait_terminal(registry.as_ref(), &id).await;
    worker.shutdown().await;
    assert_eq!(record.status, ProcessStatus::Abandoned);
    let output = record.terminal.unwrap().output;
    assert_eq!(output["reason"], "interrupted", "{output}");
    let types = log_types(&url, &id).await;
    assert_eq!(types, ["process.started", "process.abandoned"]);
}

/// Panics in the middle of its run, after one step.
struct Panicking;

#[async_trait]
impl ProcessEngine for Panicking {
    async fn run(&self, run: RunContext) -> EngineResult {
        run.events
            .append("step", json!({"n": 1}))
            .await
            .map_err(|err| json!({"error": err.to_string()}))?;
        panic!("engine bug: index out of range");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_that_panics_fails_its_process_once_instead_of_rerunning_it() {
    let url = migrated_database_url().await;
    let registry = pg_registry(&url, "pod-a", 4);
    let id = register(
        registry.as_ref(),
        "panicking",
        json!({}),
        Disposition::Rerun,
    )
    .await;
    let worker = spawn(
        Arc::clone(&registry),
        Arc::clone(&registry),
        Engines::new().with("panicking", Panicking),
        config("pod-a", Duration::from_secs(60)),
    );
    let record = wait_terminal(registry.as_ref(), &id).await;
    assert_eq!(record.status, ProcessStatus::Failed, "{record:?}");
    assert_eq!(
        record.attempts, 1,
        "run once, not rerun after a lease expiry"
    );
    let output = record.terminal.unwrap().output;
    assert_eq!(output["panicked"], json!(true));
    assert!(
        output["error"]
            .as_str()
            .unwrap()
            .contains("index out of range"),
        "{output}"
    );
    assert_eq!(
        log_types(&url, &id).await,
        ["process.started", "step", "process.failed"]
    );
    worker.shutdown().await;
}
