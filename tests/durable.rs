//! CONTRACT §9 on a pod: memoized steps, durable timers, messages and receives, retries of
//! failures, start times and deadlines, in memory and on Postgres (the engine harness for
//! one pod; stacks of their own where messages come from outside or from another pod).

#[path = "common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use proclog::pod::{EngineResult, Pod, ProcessEngine, RunContext, RunEnd, StepError};
use proclog::testing::{EngineHarness, Fault};
use proclog::{
    InMemoryProcessRegistry, Message, ProcessEvent, ProcessId, ProcessRecord, ProcessRegistration,
    ProcessStatus, Proclog, RegistryConfig, RetryPolicy, TerminalState,
};
use serde_json::{Value, json};

type Body = dyn Fn(RunContext) -> Pin<Box<dyn Future<Output = EngineResult> + Send>> + Send + Sync;

/// An engine from a closure.
struct FnEngine(Box<Body>);

#[async_trait::async_trait]
impl ProcessEngine for FnEngine {
    async fn run(&self, run: RunContext) -> EngineResult {
        (self.0)(run).await
    }
}

fn engine<F, Fut>(body: F) -> FnEngine
where
    F: Fn(RunContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = EngineResult> + Send + 'static,
{
    FnEngine(Box::new(move |run| Box::pin(body(run))))
}

/// How many times each step's body ran, across runs.
#[derive(Clone, Default)]
struct Executions(Arc<Mutex<HashMap<String, u32>>>);

impl Executions {
    fn count(&self, name: &str) {
        *self.0.lock().unwrap().entry(name.to_owned()).or_default() += 1;
    }

    fn of(&self, name: &str) -> u32 {
        self.0
            .lock()
            .unwrap()
            .get(name)
            .copied()
            .unwrap_or_default()
    }
}

/// Three steps; each records that it executed.
fn three_steps(executions: Executions) -> FnEngine {
    engine(move |run| {
        let executions = executions.clone();
        async move {
            let mut outputs = Vec::new();
            for name in ["reserve", "charge", "ship"] {
                let executions = executions.clone();
                let output: Value = run
                    .step(name, || {
                        let executions = executions.clone();
                        async move {
                            executions.count(name);
                            Ok(json!({ "done": name }))
                        }
                    })
                    .await?;
                outputs.push(output);
            }
            Ok(json!({"outputs": outputs, "steps": run.steps().replayed}))
        }
    })
}

/// A stack on the in-memory registry with leases of `ttl`.
fn memory_stack(ttl: Duration) -> Proclog {
    Proclog::in_memory(
        InMemoryProcessRegistry::new(RegistryConfig::new("memory-pod")),
        ttl,
    )
}

/// The harness on both backends.
async fn on_both(
    make: impl Fn() -> EngineHarness,
    check: impl Fn(&proclog::testing::HarnessReport, &str),
) {
    let memory = make().run().await.unwrap();
    check(&memory, "memory");
    let url = common::migrated_database_url().await;
    let pg = make().database_url(url).run().await.unwrap();
    check(&pg, "postgres");
}

fn events_of<'a>(events: &'a [ProcessEvent], event_type: &str) -> Vec<&'a ProcessEvent> {
    events
        .iter()
        .filter(|event| event.event_type == event_type)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_step_is_never_executed_again_after_a_lost_owner() {
    let executions = Executions::default();
    let make = || {
        EngineHarness::new("order", three_steps(executions.clone()))
            // The lease is lost right after the second step is stored.
            .fault(Fault::LoseLease { after_appends: 2 })
    };
    let memory = make().run().await.unwrap();
    assert_eq!(memory.state(), Some(TerminalState::Completed));
    assert_eq!(memory.record.attempts, 2, "a rerun after the lost owner");
    for name in ["reserve", "charge"] {
        assert_eq!(executions.of(name), 1, "{name} was stored: executed once");
    }
    // The documented window: the lost run executed `ship` before it learnt of the loss (its
    // store was refused), so the rerun executes it again; its output is stored once.
    assert_eq!(executions.of("ship"), 2);
    assert_eq!(memory.count("process.step"), 3);
    assert_eq!(
        memory.output().unwrap()["steps"],
        2,
        "the rerun replayed two steps"
    );

    let executions_pg = Executions::default();
    let url = common::migrated_database_url().await;
    let pg = EngineHarness::new("order", three_steps(executions_pg.clone()))
        .fault(Fault::LoseLease { after_appends: 2 })
        .database_url(url)
        .run()
        .await
        .unwrap();
    assert_eq!(pg.state(), Some(TerminalState::Completed));
    assert_eq!(pg.record.attempts, 2);
    for name in ["reserve", "charge"] {
        assert_eq!(executions_pg.of(name), 1, "{name} executed once (postgres)");
    }
    assert_eq!(executions_pg.of("ship"), 2);
    assert_eq!(pg.count("process.step"), 3);
    assert_eq!(pg.output(), memory.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_fails_stores_nothing_and_its_retries_run_in_the_run() {
    let tries = Arc::new(Mutex::new(0u32));
    let flaky = {
        let tries = Arc::clone(&tries);
        engine(move |run| {
            let tries = Arc::clone(&tries);
            async move {
                let mut policy = RetryPolicy::attempts(3);
                policy.initial_delay_ms = 1;
                let value: u32 = run
                    .step_with_retry("flaky", &policy, || {
                        let tries = Arc::clone(&tries);
                        async move {
                            let mut tries = tries.lock().unwrap();
                            *tries += 1;
                            if *tries < 3 {
                                Err(json!("not yet"))
                            } else {
                                Ok(*tries)
                            }
                        }
                    })
                    .await?;
                let never: Result<u32, StepError> = run
                    .step("broken", || async { Err(json!({"code": 7})) })
                    .await;
                let error = never.unwrap_err();
                assert!(matches!(&error, StepError::Failed { error, .. } if error["code"] == 7));
                let twice = run.step("flaky", || async { Ok(0u32) }).await;
                assert!(matches!(twice, Err(StepError::Invalid(_))));
                Err(json!({"value": value, "broken": Value::from(error)}))
            }
        })
    };
    let report = EngineHarness::new("flaky", flaky).run().await.unwrap();
    assert_eq!(report.state(), Some(TerminalState::Failed));
    assert_eq!(*tries.lock().unwrap(), 3);
    assert_eq!(report.output().unwrap()["value"], 3);
    assert_eq!(report.output().unwrap()["broken"]["step"], "broken");
    let steps = events_of(&report.events, "process.step");
    assert_eq!(steps.len(), 1, "only the step that succeeded is stored");
    assert_eq!(steps[0].payload, json!({"name": "flaky", "output": 3}));
    assert_eq!(steps[0].replay_key.as_deref(), Some("proclog:step:flaky"));
}

/// Sleeps `ms` on timer "nap" between two steps.
fn napper(ms: u64, executions: Executions) -> FnEngine {
    engine(move |run| {
        let executions = executions.clone();
        async move {
            let before = executions.clone();
            run.step("before", || async move {
                before.count("before");
                Ok(())
            })
            .await?;
            run.sleep("nap", Duration::from_millis(ms)).await?;
            let woke = run.database_now();
            Ok(json!({"woke": woke, "resumed": run.resumed}))
        }
    })
}

fn timer_due(events: &[ProcessEvent]) -> DateTime<Utc> {
    let timer = events_of(events, "process.timer")[0];
    assert_eq!(timer.payload["name"], "nap");
    timer.occurred_at + TimeDelta::milliseconds(timer.payload["duration_ms"].as_i64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_sleep_suspends_the_process_and_a_run_resumes_it_when_due() {
    let executions = Executions::default();
    let make = || {
        EngineHarness::new("nap", napper(700, executions.clone()))
            .suspend_after(Duration::from_millis(50))
    };
    on_both(make, |report, backend| {
        assert_eq!(report.state(), Some(TerminalState::Completed), "{backend}");
        assert_eq!(
            report.runs,
            [RunEnd::Suspended, RunEnd::Ended(TerminalState::Completed)],
            "{backend}"
        );
        assert_eq!(
            report.record.attempts, 1,
            "a resume is no rerun ({backend})"
        );
        let due = timer_due(&report.events);
        let waiting = events_of(&report.events, "process.waiting");
        assert_eq!(waiting.len(), 1, "{backend}");
        assert_eq!(waiting[0].payload["reason"], "timer");
        let started = events_of(&report.events, "process.started");
        assert_eq!(started.len(), 2, "{backend}");
        assert_eq!(started[1].payload["resumed"], true);
        assert!(
            started[1].occurred_at >= due,
            "never resumed before its due time ({backend})"
        );
        let output = report.output().unwrap();
        assert_eq!(output["resumed"], true);
        let woke: DateTime<Utc> = serde_json::from_value(output["woke"].clone()).unwrap();
        assert!(woke >= due, "{backend}");
    })
    .await;
    assert_eq!(
        executions.of("before"),
        2,
        "once per backend: replayed on resume"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_sleep_stays_in_the_run() {
    let report = EngineHarness::new("nap", napper(100, Executions::default()))
        .run()
        .await
        .unwrap();
    assert_eq!(report.runs, [RunEnd::Ended(TerminalState::Completed)]);
    assert_eq!(report.count("process.waiting"), 0);
    let woke: DateTime<Utc> =
        serde_json::from_value(report.output().unwrap()["woke"].clone()).unwrap();
    assert!(woke >= timer_due(&report.events));
}

/// Fails retryably until its third run.
fn flaky_until_third_run(always: bool) -> FnEngine {
    engine(move |run| async move {
        let executed: u32 = run.step("once", || async { Ok(1u32) }).await?;
        if always || run.process.retries < 2 {
            return Err(run.retryable(json!({"error": "busy", "retries": run.process.retries})));
        }
        Ok(json!({"executed": executed, "retries": run.process.retries}))
    })
}

fn quick_policy(max_attempts: u32) -> RetryPolicy {
    let mut policy = RetryPolicy::attempts(max_attempts);
    policy.initial_delay_ms = 50;
    policy.factor = 2.0;
    policy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retryable_failure_waits_for_its_backoff_and_runs_again() {
    let make = || EngineHarness::new("flaky", flaky_until_third_run(false)).retry(quick_policy(3));
    on_both(make, |report, backend| {
        assert_eq!(report.state(), Some(TerminalState::Completed), "{backend}");
        assert_eq!(report.record.retries, 2, "{backend}");
        assert_eq!(
            report.record.attempts, 1,
            "retries are no reruns ({backend})"
        );
        assert_eq!(report.count("process.step"), 1, "memoized ({backend})");
        let waits = events_of(&report.events, "process.waiting");
        assert_eq!(waits.len(), 2);
        for (n, wait) in waits.iter().enumerate() {
            assert_eq!(wait.payload["reason"], "retry");
            assert_eq!(wait.payload["retry"], n + 1);
            // The backoff doubles: 50 ms, then 100 ms.
            assert_eq!(wait.payload["delay_ms"], 50 << n);
            let wake: DateTime<Utc> =
                serde_json::from_value(wait.payload["wake_at"].clone()).unwrap();
            assert!(wake >= wait.occurred_at + TimeDelta::milliseconds(50 << n));
        }
        let starts = events_of(&report.events, "process.started");
        let wake: DateTime<Utc> =
            serde_json::from_value(waits[1].payload["wake_at"].clone()).unwrap();
        assert!(
            starts[2].occurred_at >= wake,
            "no run before its backoff ({backend})"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_retryable_failure_ends_the_process_with_the_count() {
    let exhausted = EngineHarness::new("flaky", flaky_until_third_run(true))
        .retry(quick_policy(2))
        .run()
        .await
        .unwrap();
    assert_eq!(exhausted.state(), Some(TerminalState::Failed));
    assert_eq!(
        exhausted.output(),
        Some(&json!({"error": {"error": "busy", "retries": 1}, "retries": 1}))
    );
    // The process's own policy wins over its kind's.
    let own = EngineHarness::new("flaky", flaky_until_third_run(false))
        .retry(quick_policy(2))
        .registration(|registration| registration.retry(quick_policy(3)))
        .run()
        .await
        .unwrap();
    assert_eq!(own.state(), Some(TerminalState::Completed));
    // Without a policy, a retryable failure is a failure.
    let none = EngineHarness::new("flaky", flaky_until_third_run(false))
        .run()
        .await
        .unwrap();
    assert_eq!(none.state(), Some(TerminalState::Failed));
    assert_eq!(none.output(), Some(&json!({"error": "busy", "retries": 0})));
    assert_eq!(none.record.retries, 0);
}

/// Waits for cancellation, or ignores it.
fn stubborn(ignore_cancel: bool) -> FnEngine {
    engine(move |run| async move {
        if ignore_cancel {
            std::future::pending::<()>().await;
        }
        run.cancel.cancelled().await;
        Err(json!("stopped"))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_ends_a_running_process_whatever_its_engine_does() {
    for ignore_cancel in [false, true] {
        let make = || {
            EngineHarness::new("stuck", stubborn(ignore_cancel))
                .lease_ttl(Duration::from_secs(2))
                .registration(|registration| registration.timeout(Duration::from_millis(300)))
        };
        on_both(make, |report, backend| {
            assert_eq!(report.state(), Some(TerminalState::Failed), "{backend}");
            let output = report.output().unwrap();
            assert_eq!(output["error"], "deadline exceeded", "{backend}");
            let deadline: DateTime<Utc> =
                serde_json::from_value(output["deadline"].clone()).unwrap();
            let ended = report.record.terminal.as_ref().unwrap().completed_at;
            assert!(ended >= deadline, "{backend}");
            assert!(
                ended <= deadline + TimeDelta::seconds(2),
                "within one TTL of the deadline ({backend}, ignoring the stop: {ignore_cancel})"
            );
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_start_runs_after_its_time() {
    let make = || {
        EngineHarness::new("later", engine(|_| async { Ok(json!("ran")) }))
            .registration(|registration| registration.start_in(Duration::from_millis(300)))
    };
    on_both(make, |report, backend| {
        assert_eq!(report.state(), Some(TerminalState::Completed), "{backend}");
        let started = events_of(&report.events, "process.started")[0];
        assert!(
            started.occurred_at >= report.record.created_at + TimeDelta::milliseconds(300),
            "{backend}"
        );
    })
    .await;
}

/// Receives `approve` (for ever) and `note` (100 ms), then returns what came.
fn approver() -> FnEngine {
    engine(|run| async move {
        let approval = run.recv("approve", None).await?;
        let note = run.recv("note", Some(Duration::from_millis(100))).await?;
        Ok(json!({"approval": approval, "note": note}))
    })
}

async fn until(mut check: impl FnMut() -> Pin<Box<dyn Future<Output = bool> + Send>>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn until_waiting(stack: &Proclog, id: &ProcessId) -> ProcessRecord {
    let registry = Arc::clone(stack.registry());
    let id2 = id.clone();
    until(move || {
        let registry = Arc::clone(&registry);
        let id = id2.clone();
        Box::pin(async move {
            registry.get_process(&id).await.unwrap().unwrap().status == ProcessStatus::Waiting
        })
    })
    .await;
    stack.registry().get_process(id).await.unwrap().unwrap()
}

async fn receive_on(stack: &Proclog, poll: Duration) {
    let pod = Pod::builder(stack)
        .engine("approve", approver())
        .poll_interval(poll)
        .heartbeat_every(Duration::from_millis(200))
        .start()
        .await
        .unwrap();
    let registry = stack.registry();
    let record = registry
        .register_process(ProcessRegistration::new("approve", json!(null)))
        .await
        .unwrap();
    let waiting = until_waiting(stack, &record.id).await;
    assert_eq!(waiting.waiting_for.as_deref(), Some("approve"));
    assert_eq!(waiting.wake_at, None);
    assert!(waiting.lease.is_none());
    registry
        .send_message(&record.id, Message::new("approve", json!({"by": "ann"})))
        .await
        .unwrap();
    let end = stack
        .driver()
        .await_terminal(&record.id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(end.state, TerminalState::Completed);
    assert_eq!(end.output, json!({"approval": {"by": "ann"}, "note": null}));
    let record = registry.get_process(&record.id).await.unwrap().unwrap();
    assert_eq!(record.attempts, 1);
    pod.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receive_waits_without_a_pod_and_a_message_wakes_it() {
    let memory = memory_stack(Duration::from_secs(5));
    receive_on(&memory, Duration::from_secs(3600)).await;
    memory.shutdown().await;
    let url = common::migrated_database_url().await;
    let pg = Proclog::builder(url).start().await.unwrap();
    receive_on(&pg, Duration::from_secs(3600)).await;
    pg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sent_on_one_pod_wakes_the_process_on_another_through_the_hint() {
    let url = common::migrated_database_url().await;
    // The runner polls once an hour: only the hint of the message can wake it in time.
    let runner = Proclog::builder(url.clone())
        .pod_id("runner")
        .start()
        .await
        .unwrap();
    let sender = Proclog::builder(url)
        .pod_id("sender")
        .start()
        .await
        .unwrap();
    runner.listener_ready().await;
    let pod = Pod::builder(&runner)
        .engine("approve", approver())
        .poll_interval(Duration::from_secs(3600))
        .start()
        .await
        .unwrap();
    let record = sender
        .registry()
        .register_process(ProcessRegistration::new("approve", json!(null)))
        .await
        .unwrap();
    until_waiting(&sender, &record.id).await;
    let sent = sender
        .registry()
        .send_message(
            &record.id,
            Message::new("approve", json!("yes")).with_replay_key("approval-1"),
        )
        .await
        .unwrap();
    let end = sender
        .driver()
        .await_terminal(&record.id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(end.output["approval"], "yes");
    let events = common::log_of(sender.registry().as_ref(), &record.id).await;
    let receipts = events_of(&events, "process.received");
    assert_eq!(receipts[0].payload["message_seq"], sent.event.seq);
    assert_eq!(
        receipts[1].payload["timed_out"], true,
        "the note never came"
    );
    pod.shutdown().await;
    sender.shutdown().await;
    runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_received_once_each_in_order_across_runs() {
    // Three messages sent before the run: three receives take them in order, then a sleep
    // suspends the process; the resumed run gets all three again from its receipts (the
    // output is the resumed run's) and takes none twice.
    let collector = engine(|run| async move {
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(run.recv("item", None).await?.unwrap_or(Value::Null));
        }
        run.sleep("after", Duration::from_millis(300)).await?;
        Ok(json!({"got": got, "resumed": run.resumed}))
    });
    let url = common::migrated_database_url().await;
    let stack = Proclog::builder(url).start().await.unwrap();
    let registry = stack.registry();
    let record = registry
        .register_process(ProcessRegistration::new("collect", json!(null)))
        .await
        .unwrap();
    for n in 1..=3 {
        registry
            .send_message(&record.id, Message::new("item", json!(n)))
            .await
            .unwrap();
    }
    let pod = Pod::builder(&stack)
        .engine("collect", collector)
        .poll_interval(Duration::from_millis(50))
        .suspend_after(Duration::from_millis(50))
        .start()
        .await
        .unwrap();
    let end = stack
        .driver()
        .await_terminal(&record.id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(end.output, json!({"got": [1, 2, 3], "resumed": true}));
    let events = common::log_of(registry.as_ref(), &record.id).await;
    let seqs: Vec<i64> = events_of(&events, "process.received")
        .iter()
        .map(|receipt| receipt.payload["message_seq"].as_i64().unwrap())
        .collect();
    let sent: Vec<i64> = events_of(&events, "process.message")
        .iter()
        .map(|message| message.seq)
        .collect();
    assert_eq!(seqs, sent, "each message once, in order");
    assert!(
        events_of(&events, "process.received")
            .iter()
            .all(|receipt| receipt.payload.get("payload").is_none()),
        "a receipt names its message, it does not copy it"
    );
    pod.shutdown().await;
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_process_is_cancelled_and_a_deadline_ends_a_wait() {
    let stack = memory_stack(Duration::from_secs(2));
    let pod = Pod::builder(&stack)
        .engine("approve", approver())
        .poll_interval(Duration::from_secs(3600))
        .start()
        .await
        .unwrap();
    let registry = stack.registry();
    let cancelled = registry
        .register_process(ProcessRegistration::new("approve", json!(null)))
        .await
        .unwrap();
    until_waiting(&stack, &cancelled.id).await;
    let record = proclog::pod::cancel_process(
        registry.as_ref(),
        &cancelled.id,
        "test",
        json!("no longer needed"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(record.status, ProcessStatus::Cancelled);

    let expiring = registry
        .register_process(
            ProcessRegistration::new("approve", json!(null)).timeout(Duration::from_millis(400)),
        )
        .await
        .unwrap();
    until_waiting(&stack, &expiring.id).await;
    let end = stack
        .driver()
        .await_terminal(&expiring.id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(end.state, TerminalState::Failed);
    assert_eq!(end.output["error"], "deadline exceeded");
    pod.shutdown().await;
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_pod_suspends_a_run_asleep_in_a_durable_wait() {
    let stack = memory_stack(Duration::from_secs(5));
    let pod = Pod::builder(&stack)
        .engine("nap", napper(30_000, Executions::default()))
        .suspend_after(Duration::from_secs(60))
        .grace(Duration::from_millis(100))
        .poll_interval(Duration::from_millis(50))
        .start()
        .await
        .unwrap();
    let record = stack
        .registry()
        .register_process(
            ProcessRegistration::new("nap", json!(null))
                .with_disposition(proclog::Disposition::Abandon),
        )
        .await
        .unwrap();
    let registry = Arc::clone(stack.registry());
    let id = record.id.clone();
    until(move || {
        let registry = Arc::clone(&registry);
        let id = id.clone();
        Box::pin(async move {
            let events = common::log_of(registry.as_ref(), &id).await;
            events
                .iter()
                .any(|event| event.event_type == "process.timer")
        })
    })
    .await;
    let stats = Arc::clone(pod.stats().unwrap());
    pod.shutdown().await;
    assert_eq!(stats.ends(), [RunEnd::Suspended]);
    let record = stack
        .registry()
        .get_process(&record.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        record.status,
        ProcessStatus::Waiting,
        "an abandon process asleep is suspended, not abandoned"
    );
    let events = common::log_of(stack.registry().as_ref(), &record.id).await;
    assert_eq!(record.wake_at, Some(timer_due(&events)));
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receive_raced_against_a_timer_suspends_for_both() {
    // Nobody sends: the timer must still wake the process (the wait for the message does not
    // replace it); then a second process whose message comes first.
    let racer = || {
        engine(|run| async move {
            let answer = tokio::select! {
                message = run.recv("approve", None) => json!({"message": message?}),
                slept = run.sleep("expire", Duration::from_millis(600)) => {
                    slept?;
                    json!("expired")
                }
            };
            Ok(answer)
        })
    };
    let make = || EngineHarness::new("race", racer()).suspend_after(Duration::from_millis(50));
    on_both(make, |report, backend| {
        assert_eq!(report.state(), Some(TerminalState::Completed), "{backend}");
        assert_eq!(report.output(), Some(&json!("expired")), "{backend}");
        let wait = events_of(&report.events, "process.waiting")[0];
        assert_eq!(
            wait.payload["topic"], "approve",
            "both waits: {}",
            wait.payload
        );
        assert!(
            wait.payload["wake_at"].is_string(),
            "{backend}: {}",
            wait.payload
        );
    })
    .await;

    let stack = memory_stack(Duration::from_secs(5));
    let pod = Pod::builder(&stack)
        .engine("race", racer())
        .suspend_after(Duration::from_millis(50))
        .start()
        .await
        .unwrap();
    let record = stack
        .registry()
        .register_process(ProcessRegistration::new("race", json!(null)))
        .await
        .unwrap();
    let waiting = until_waiting(&stack, &record.id).await;
    assert_eq!(waiting.waiting_for.as_deref(), Some("approve"));
    assert!(waiting.wake_at.is_some());
    stack
        .registry()
        .send_message(&record.id, Message::new("approve", json!(7)))
        .await
        .unwrap();
    let end = stack
        .driver()
        .await_terminal(&record.id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(end.output, json!({"message": 7}));
    pod.shutdown().await;
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_retryable_error_is_retried_and_a_bad_kind_policy_stops_the_pod() {
    let big = engine(|run| async move {
        if run.process.retries == 0 {
            return Err(run.retryable(json!("x".repeat(200_000))));
        }
        Ok(json!("second run"))
    });
    let report = EngineHarness::new("big", big)
        .retry(quick_policy(2))
        .run()
        .await
        .unwrap();
    assert_eq!(report.state(), Some(TerminalState::Completed));
    assert_eq!(report.record.retries, 1);
    let wait = events_of(&report.events, "process.waiting")[0];
    assert_eq!(wait.payload["error"]["truncated"], true);

    let stack = memory_stack(Duration::from_secs(5));
    let mut wild = RetryPolicy::attempts(3);
    wild.max_delay_ms = u64::MAX;
    let refused = Pod::builder(&stack)
        .engines(
            proclog::pod::Engines::new()
                .with("big", engine(|_| async { Ok(Value::Null) }))
                .with_retry("big", wild),
        )
        .start()
        .await;
    assert!(matches!(
        refused,
        Err(proclog::ProcessError::InvalidInput(_))
    ));
    stack.shutdown().await;
}

// CONTRACT §10, children: spawned once per name, joined without a pod, cancelled with their
// parent.

/// Spawns three children (the first with an id of its own, new on every call: only the
/// memoized spawn keeps it from being started again by a later run), joins them all and
/// answers the sum of their outputs.
fn parent_of_three() -> FnEngine {
    engine(|run| async move {
        let mut children = Vec::new();
        for n in 0..3 {
            let mut registration = ProcessRegistration::new("child", json!(n));
            if n == 0 {
                registration = registration.with_id(ProcessId::generate());
            }
            children.push(run.spawn(&format!("c{n}"), registration).await?);
        }
        let ended = run.join_all(&children).await?;
        let sum: i64 = ended.iter().map(|end| end.output.as_i64().unwrap()).sum();
        Ok(json!({"sum": sum, "children": children}))
    })
}

/// Waits for a `go` message, then answers ten times its input.
fn child_waiting_for_go() -> FnEngine {
    engine(|run| async move {
        run.recv("go", None).await?;
        Ok(json!(run.process.input.as_i64().unwrap() * 10))
    })
}

async fn children_of(stack: &Proclog, parent: &ProcessId) -> Vec<ProcessRecord> {
    stack
        .registry()
        .list_processes(proclog::ProcessFilter {
            parent: Some(parent.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .processes
}

async fn spawn_and_join_on(stack: &Proclog) {
    let pod = Pod::builder(stack)
        .engine("parent", parent_of_three())
        .engine("child", child_waiting_for_go())
        .poll_interval(Duration::from_secs(3600))
        .start()
        .await
        .unwrap();
    let registry = stack.registry();
    let parent = registry
        .register_process(ProcessRegistration::new("parent", json!(null)))
        .await
        .unwrap();
    let waiting = until_waiting(stack, &parent.id).await;
    assert_eq!(waiting.waiting_for.as_deref(), Some("process.child"));
    assert!(waiting.lease.is_none(), "a join holds no pod");
    let children = children_of(stack, &parent.id).await;
    assert_eq!(children.len(), 3);
    for child in &children {
        assert_eq!(child.parent.as_ref(), Some(&parent.id));
        until_waiting(stack, &child.id).await;
    }
    assert!(
        children
            .iter()
            .any(|child| child.id.as_str() == format!("{}.c1", parent.id)),
        "an id not given is derived from the parent's and the name"
    );
    // The children end one by one; each end wakes the parent, which looks and waits again.
    for child in &children {
        registry
            .send_message(&child.id, Message::new("go", json!(null)))
            .await
            .unwrap();
    }
    let end = stack
        .driver()
        .await_terminal(&parent.id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(end.state, TerminalState::Completed);
    assert_eq!(end.output["sum"], 30);
    assert_eq!(
        children_of(stack, &parent.id).await.len(),
        3,
        "runs that resumed the parent spawned nothing again"
    );
    let events = common::log_of(registry.as_ref(), &parent.id).await;
    assert_eq!(events_of(&events, "process.spawned").len(), 3);
    let told: Vec<_> = events_of(&events, "process.message")
        .into_iter()
        .filter(|event| event.payload["topic"] == "process.child")
        .collect();
    assert_eq!(told.len(), 3, "each child's end reached the parent once");
    assert!(
        told.iter()
            .all(|event| event.payload["payload"]["state"] == "completed")
    );
    assert_eq!(
        registry
            .get_process(&parent.id)
            .await
            .unwrap()
            .unwrap()
            .attempts,
        1,
        "resumes are not reruns"
    );
    pod.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_spawns_children_once_and_joins_them_without_a_pod() {
    let memory = memory_stack(Duration::from_secs(5));
    spawn_and_join_on(&memory).await;
    memory.shutdown().await;
    let url = common::migrated_database_url().await;
    let pg = Proclog::builder(url).start().await.unwrap();
    spawn_and_join_on(&pg).await;
    pg.shutdown().await;
    // On Citus the parent and its children live on different shards: the child's end reaches
    // its parent in a statement of its own.
    if common::citus_installed() {
        let url = proclog::testing::migrated_citus_database_url()
            .await
            .unwrap();
        let citus = Proclog::builder(url).start().await.unwrap();
        spawn_and_join_on(&citus).await;
        citus.shutdown().await;
    }
}

/// Spawns a child that ends at once and one that waits for `go`, then joins both.
fn parent_of_two() -> FnEngine {
    engine(|run| async move {
        let quick = run
            .spawn("quick", ProcessRegistration::new("quick", json!(null)))
            .await?;
        let slow = run
            .spawn("slow", ProcessRegistration::new("child", json!(1)))
            .await?;
        run.join_all(&[quick, slow]).await?;
        Ok(json!("joined"))
    })
}

async fn cancel_cascade_on(stack: &Proclog) {
    let pod = Pod::builder(stack)
        .engine("parent", parent_of_two())
        .engine("child", child_waiting_for_go())
        .engine("quick", engine(|_run| async move { Ok(json!("done")) }))
        .poll_interval(Duration::from_secs(3600))
        .start()
        .await
        .unwrap();
    let registry = stack.registry();
    let parent = registry
        .register_process(ProcessRegistration::new("parent", json!(null)))
        .await
        .unwrap();
    let quick = ProcessId::new(format!("{}.quick", parent.id)).unwrap();
    let slow = ProcessId::new(format!("{}.slow", parent.id)).unwrap();
    until_waiting(stack, &parent.id).await;
    stack
        .driver()
        .await_terminal(&quick, Duration::from_secs(60))
        .await
        .unwrap();
    until_waiting(stack, &slow).await;
    until_waiting(stack, &parent.id).await;
    let record = proclog::pod::cancel_process(
        registry.as_ref(),
        &parent.id,
        "test",
        json!("changed my mind"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(record.status, ProcessStatus::Cancelled);
    let slow_end = stack
        .driver()
        .await_terminal(&slow, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(slow_end.state, TerminalState::Cancelled);
    assert_eq!(
        slow_end.output["request"]["reason"]["parent"],
        json!(parent.id),
        "the child's request names its parent"
    );
    let quick_end = registry.get_process(&quick).await.unwrap().unwrap();
    assert_eq!(
        quick_end.terminal.unwrap().state,
        TerminalState::Completed,
        "an ended child keeps its end"
    );
    pod.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_parent_cancels_its_children_that_have_not_ended() {
    let memory = memory_stack(Duration::from_secs(5));
    cancel_cascade_on(&memory).await;
    memory.shutdown().await;
    let url = common::migrated_database_url().await;
    let pg = Proclog::builder(url).start().await.unwrap();
    cancel_cascade_on(&pg).await;
    pg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_not_told_of_an_end_looks_again_after_its_recheck_period() {
    // The joined process is not a child: its end sends no message, as when the pod that
    // ended a child died before telling the parent.
    let url = common::migrated_database_url().await;
    let stack = Proclog::builder(url).start().await.unwrap();
    let registry = stack.registry();
    let other = registry
        .register_process(
            ProcessRegistration::new("external", json!(null))
                .with_disposition(proclog::Disposition::External),
        )
        .await
        .unwrap();
    let joined = other.id.clone();
    let pod = Pod::builder(&stack)
        .engine(
            "joiner",
            engine(move |run| {
                let joined = joined.clone();
                async move {
                    let end = run.join(&joined).await?;
                    Ok(json!({"state": end.state}))
                }
            }),
        )
        .join_recheck(Duration::from_millis(300))
        .poll_interval(Duration::from_millis(100))
        .start()
        .await
        .unwrap();
    let joiner = registry
        .register_process(ProcessRegistration::new("joiner", json!(null)))
        .await
        .unwrap();
    let waiting = until_waiting(&stack, &joiner.id).await;
    assert!(waiting.wake_at.is_some(), "the join looks again later");
    registry
        .complete_process(
            &other.id,
            proclog::Completion::new(TerminalState::Failed, json!("gone")),
        )
        .await
        .unwrap();
    let end = stack
        .driver()
        .await_terminal(&joiner.id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(end.output, json!({"state": "failed"}));
    pod.shutdown().await;
    stack.shutdown().await;
}

async fn second_cancel_on(stack: &Proclog) {
    let registry = stack.registry();
    let external = |id: &str| {
        ProcessRegistration::new("nobody-runs-it", json!(null))
            .with_id(ProcessId::new(id).unwrap())
            .with_disposition(proclog::Disposition::External)
    };
    let parent = registry.register_process(external("root")).await.unwrap();
    let child = registry
        .register_process(external("root.kid").with_parent(parent.id.clone()))
        .await
        .unwrap();
    let grandchild = registry
        .register_process(external("root.kid.kid").with_parent(child.id.clone()))
        .await
        .unwrap();
    let record =
        proclog::pod::cancel_process(registry.as_ref(), &parent.id, "pod-a", json!("stop"), None)
            .await
            .unwrap();
    assert_eq!(record.status, ProcessStatus::Cancelled);
    for id in [&child.id, &grandchild.id] {
        let end = registry.get_process(id).await.unwrap().unwrap();
        assert_eq!(end.status, ProcessStatus::Cancelled, "{id}");
    }
    // A second request from another pod: the parent has ended (its answer says so), the
    // request it passes on is the same and is written once.
    let again =
        proclog::pod::cancel_process(registry.as_ref(), &parent.id, "pod-b", json!("again"), None)
            .await;
    assert!(
        matches!(again, Err(proclog::ProcessError::ProcessTerminal { .. })),
        "{again:?}"
    );
    let log = common::log_of(registry.as_ref(), &child.id).await;
    assert_eq!(events_of(&log, "process.cancel_requested").len(), 1);
    // A parent asked to stop takes no more children.
    let refused = registry
        .register_process(external("root.late").with_parent(parent.id.clone()))
        .await;
    assert!(
        matches!(refused, Err(proclog::ProcessError::InvalidInput(_))),
        "{refused:?}"
    );

    // A parent that ended otherwise than cancelled leaves its children be, even when asked.
    let done = registry.register_process(external("done")).await.unwrap();
    let orphan = registry
        .register_process(external("done.kid").with_parent(done.id.clone()))
        .await
        .unwrap();
    registry
        .complete_process(
            &done.id,
            proclog::Completion::new(TerminalState::Completed, json!(null)),
        )
        .await
        .unwrap();
    let late =
        proclog::pod::cancel_process(registry.as_ref(), &done.id, "pod-a", json!("x"), None).await;
    assert!(
        matches!(late, Err(proclog::ProcessError::ProcessTerminal { .. })),
        "{late:?}"
    );
    let orphan = registry.get_process(&orphan.id).await.unwrap().unwrap();
    assert_eq!(orphan.status, ProcessStatus::Pending);
    assert!(orphan.cancel_request.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_cancellation_passes_on_the_same_request_once() {
    let memory = memory_stack(Duration::from_secs(5));
    second_cancel_on(&memory).await;
    memory.shutdown().await;
    let url = common::migrated_database_url().await;
    let pg = Proclog::builder(url).start().await.unwrap();
    second_cancel_on(&pg).await;
    pg.shutdown().await;
}
