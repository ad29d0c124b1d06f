//! Embedding, through the public API only: two hosts run proclog in-process with their own
//! engine. One is killed (its runtime dropped without any shutdown) in the middle of a run;
//! the other takes the process over after the lease TTL and reruns it, and the engine's
//! replay-keyed steps and idempotent side effects are each recorded exactly once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use proclog::pod::{EngineResult, Pod, ProcessEngine, RunContext};
use proclog::{
    Pool, ProcessRegistration, ProcessStatus, Proclog, TerminalState, async_trait, testing,
};
use serde_json::json;

/// Safety cap on every wait (never a timing assertion).
const CAP: Duration = Duration::from_secs(120);

/// Charges in three steps. Each step is an effect outside proclog (a row in the host's own
/// table, written idempotently) and an event appended with the step's own replay key, so a
/// rerun repeats neither.
struct Charge {
    pool: Pool,
    /// Steps taken by this host's engine (effects attempted, including repeats).
    steps_taken: Arc<AtomicU32>,
}

#[async_trait]
impl ProcessEngine for Charge {
    async fn run(&self, run: RunContext) -> EngineResult {
        let failed = |err: &dyn std::fmt::Display| json!({"error": err.to_string()});
        for step in 1..=3 {
            tokio::select! {
                _ = run.cancel.cancelled() => return Err(json!({"error": "stopped"})),
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            if !run.is_owner() {
                return Err(json!({"error": "no longer the owner"}));
            }
            let client = self.pool.get().await.map_err(|err| failed(&err))?;
            client
                .execute(
                    "INSERT INTO host_charges (process_id, step, attempt) VALUES ($1, $2, $3)
                     ON CONFLICT (process_id, step) DO NOTHING",
                    &[&run.process.id.as_str(), &step, &run.attempt],
                )
                .await
                .map_err(|err| failed(&err))?;
            self.steps_taken.fetch_add(1, Ordering::SeqCst);
            run.events
                .append_with_key("charged", json!({"step": step}), &format!("charge-{step}"))
                .await
                .map_err(|err| failed(&err))?;
        }
        Ok(json!({"charged": 3}))
    }
}

/// A host: its own runtime on its own thread, with a stack and a pod running `Charge`.
struct Host {
    runtime: tokio::runtime::Runtime,
    stack: Option<Proclog>,
    pod: Option<Pod>,
    steps_taken: Arc<AtomicU32>,
}

impl Host {
    fn start(url: &str, name: &str) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let steps_taken = Arc::new(AtomicU32::new(0));
        let (stack, pod) = runtime.block_on(async {
            let stack = Proclog::builder(url)
                .pod_id(name)
                .lease_ttl(Duration::from_millis(1500))
                .start()
                .await
                .unwrap();
            let pod = Pod::builder(&stack)
                .engine(
                    "charge",
                    Charge {
                        pool: stack.pool().expect("a Postgres stack").clone(),
                        steps_taken: Arc::clone(&steps_taken),
                    },
                )
                .concurrency(4)
                .poll_interval(Duration::from_millis(100))
                .start()
                .await
                .unwrap();
            (stack, pod)
        });
        Self {
            runtime,
            stack: Some(stack),
            pod: Some(pod),
            steps_taken,
        }
    }

    /// Kills the host: its runtime is dropped with every task, nothing is shut down.
    fn kill(mut self) {
        std::mem::forget(self.pod.take());
        std::mem::forget(self.stack.take());
        self.runtime.shutdown_background();
    }

    fn stop(mut self) {
        let (pod, stack) = (self.pod.take().unwrap(), self.stack.take().unwrap());
        self.runtime.block_on(async {
            pod.shutdown().await;
            stack.shutdown().await;
        });
    }
}

async fn scalar(url: &str, sql: &str) -> i64 {
    let pool = proclog::pg::connect_pool(url, 1).unwrap();
    let client = pool.get().await.unwrap();
    client.query_one(sql, &[]).await.unwrap().get(0)
}

async fn wait_for(url: &str, sql: &str) {
    let deadline = tokio::time::Instant::now() + CAP;
    while scalar(url, sql).await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never: {sql}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn a_killed_host_s_work_is_taken_over_and_its_keyed_effects_happen_once() {
    let test = tokio::runtime::Runtime::new().unwrap();
    let url = test.block_on(async {
        let url = testing::migrated_database_url().await.unwrap();
        let pool = proclog::pg::connect_pool(&url, 1).unwrap();
        pool.get()
            .await
            .unwrap()
            .batch_execute(
                "CREATE TABLE host_charges (process_id text, step int, attempt int,
                                            PRIMARY KEY (process_id, step))",
            )
            .await
            .unwrap();
        url
    });
    let a = Host::start(&url, "host-a");
    let id = a.runtime.block_on(async {
        a.stack
            .as_ref()
            .unwrap()
            .registry()
            .register_process(ProcessRegistration::new("charge", json!({"amount": 42})))
            .await
            .unwrap()
            .id
    });
    // Kill host-a right after its first charge.
    test.block_on(wait_for(
        &url,
        &format!("SELECT count(*) FROM proclog.events WHERE process_id = '{id}' AND event_type = 'charged'"),
    ));
    let taken_by_a = a.steps_taken.load(Ordering::SeqCst);
    a.kill();
    assert!(taken_by_a >= 1);

    let b = Host::start(&url, "host-b");
    let terminal = b.runtime.block_on(async {
        b.stack
            .as_ref()
            .unwrap()
            .driver()
            .await_terminal(&id, CAP)
            .await
            .unwrap()
    });
    assert_eq!(terminal.state, TerminalState::Completed);
    let record = b.runtime.block_on(async {
        b.stack
            .as_ref()
            .unwrap()
            .registry()
            .get_process(&id)
            .await
            .unwrap()
            .unwrap()
    });
    assert_eq!(record.status, ProcessStatus::Completed);
    assert_eq!(record.attempts, 2, "host-b reran it");
    assert!(
        b.steps_taken.load(Ordering::SeqCst) >= 2,
        "host-b took steps of its own"
    );

    test.block_on(async {
        for step in 1..=3 {
            let events = scalar(
                &url,
                &format!(
                    "SELECT count(*) FROM proclog.events WHERE process_id = '{id}'
                        AND event_type = 'charged' AND (payload->>'step')::int = {step}"
                ),
            )
            .await;
            assert_eq!(events, 1, "step {step}'s event is in the log once");
            let charges = scalar(
                &url,
                &format!(
                    "SELECT count(*) FROM host_charges WHERE process_id = '{id}' AND step = {step}"
                ),
            )
            .await;
            assert_eq!(charges, 1, "step {step} charged once");
        }
        let starts = scalar(
            &url,
            &format!(
                "SELECT count(*) FROM proclog.events WHERE process_id = '{id}' AND event_type = 'process.started'"
            ),
        )
        .await;
        assert_eq!(starts, 2);
        let writers = scalar(
            &url,
            &format!(
                "SELECT count(DISTINCT writer) FROM proclog.events WHERE process_id = '{id}'"
            ),
        )
        .await;
        assert_eq!(writers, 2, "both hosts wrote to the one log");
    });
    b.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_host_settings_are_refused_before_anything_runs() {
    let url = testing::migrated_database_url().await.unwrap();
    let bad_id = Proclog::builder(&url).pod_id("").start().await;
    assert!(matches!(
        bad_id,
        Err(proclog::ProcessError::InvalidInput(_))
    ));
    let bad_ttl = Proclog::builder(&url)
        .lease_ttl(Duration::ZERO)
        .start()
        .await;
    assert!(matches!(
        bad_ttl,
        Err(proclog::ProcessError::InvalidInput(_))
    ));
    let stack = Proclog::builder(&url)
        .pod_id("host-x")
        .start()
        .await
        .unwrap();
    let too_many = Pod::builder(&stack).concurrency(5000).start().await;
    assert!(matches!(
        too_many,
        Err(proclog::ProcessError::InvalidInput(_))
    ));
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port_in_use = proclog::http::HttpServer::start(
        &stack,
        None,
        taken.local_addr().unwrap(),
        proclog::http::HttpOptions::default(),
    )
    .await;
    assert!(
        matches!(&port_in_use, Err(proclog::ProcessError::InvalidInput(msg)) if msg.contains("cannot listen")),
        "{:?}",
        port_in_use.err()
    );
    stack.shutdown().await;
}

/// A host sink that waits for a permit per event, records what it got, and panics on
/// events of type `boom`.
struct GatedSink {
    gate: Arc<tokio::sync::Semaphore>,
    entered: Arc<AtomicU32>,
    seen: Arc<std::sync::Mutex<Vec<i64>>>,
}

#[proclog::async_trait]
impl proclog::ProcessEventSink for GatedSink {
    async fn emit(&self, event: &proclog::ProcessEvent) {
        self.entered.fetch_add(1, Ordering::SeqCst);
        self.gate.acquire().await.unwrap().forget();
        if event.event_type == "boom" {
            panic!("the host's sink fails");
        }
        self.seen.lock().unwrap().push(event.seq);
    }
}

/// A host's sink behind the stack's bounded adapter never holds an append: appends return
/// while the sink is stuck; past its queue, events are dropped and counted; the rest arrive
/// in order; a panic in it is contained and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_host_sink_never_slows_an_append() {
    let url = testing::migrated_database_url().await.unwrap();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let entered = Arc::new(AtomicU32::new(0));
    let stack = Proclog::builder(&url)
        .pod_id("sink-host")
        .sink_bounded(
            Arc::new(GatedSink {
                gate: Arc::clone(&gate),
                entered: Arc::clone(&entered),
                seen: Arc::clone(&seen),
            }),
            3,
        )
        .start()
        .await
        .unwrap();
    let process = stack
        .registry()
        .register_process(
            ProcessRegistration::new("k", json!({}))
                .with_disposition(proclog::Disposition::External),
        )
        .await
        .unwrap();
    // The sink takes the first event and is stuck on it; the appends go on regardless.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for n in 1..=10 {
        tokio::time::timeout(
            Duration::from_secs(60),
            stack
                .registry()
                .append_event(&process.id, proclog::AppendRequest::new("step", json!(n))),
        )
        .await
        .expect("an append never waits for the host's sink")
        .unwrap();
        while n == 1 && entered.load(Ordering::SeqCst) == 0 {
            assert!(tokio::time::Instant::now() < deadline);
            tokio::task::yield_now().await;
        }
    }
    // One being delivered, three queued, six dropped.
    assert_eq!(stack.sink_dropped(), 6);
    gate.add_permits(4);
    while seen.lock().unwrap().len() < 4 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::task::yield_now().await;
    }
    assert_eq!(*seen.lock().unwrap(), [1, 2, 3, 4]);
    stack
        .registry()
        .append_event(&process.id, proclog::AppendRequest::new("boom", json!(0)))
        .await
        .unwrap();
    gate.add_permits(1);
    while stack.sink_panics() == 0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::task::yield_now().await;
    }
    stack.shutdown().await;
}
