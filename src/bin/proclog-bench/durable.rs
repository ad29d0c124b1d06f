//! Durable execution (CONTRACT §9): what sleeping processes cost an idle pod, how soon a due
//! timer and a message resume a process, and a memoized step against a plain append.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use proclog::pod::{EngineResult, Pod, ProcessEngine, RunContext};
use proclog::{Message, ProcessId, ProcessRegistration, ProcessRegistry, Proclog};
use serde_json::{Value, json};

use crate::Plan;
use crate::baseline::BenchResult;
use crate::report::{Latency, Row};

/// Sleeps on timer `t` for `input.ms`, or receives `go` when `input.recv`; or, with
/// `input.steps`, makes that many steps (or plain appends with `input.appends`) then sleeps
/// `input.ms` and makes them again (replayed).
struct BenchEngine;

#[async_trait::async_trait]
impl ProcessEngine for BenchEngine {
    async fn run(&self, run: RunContext) -> EngineResult {
        let input = run.process.input.clone();
        let steps = input["steps"].as_u64().unwrap_or(0);
        let appends = input["appends"].as_bool().unwrap_or(false);
        for i in 0..steps {
            if appends {
                if !run.resumed {
                    run.events
                        .append("work", json!({ "i": i }))
                        .await
                        .map_err(|err| json!(err.to_string()))?;
                }
            } else {
                let _: u64 = run.step(&format!("s{i}"), || async move { Ok(i) }).await?;
            }
        }
        if input["recv"].as_bool() == Some(true) {
            run.recv("go", None).await?;
        } else if let Some(ms) = input["ms"].as_u64() {
            run.sleep("t", Duration::from_millis(ms)).await?;
        }
        Ok(Value::Null)
    }
}

async fn stack(url: &str, pod_id: &str) -> BenchResult<Proclog> {
    Ok(Proclog::builder(url)
        .pod_id(pod_id)
        .lease_ttl(Duration::from_secs(15))
        .start()
        .await?)
}

async fn pod(stack: &Proclog) -> BenchResult<Pod> {
    Ok(Pod::builder(stack)
        .engine("bench-durable", BenchEngine)
        .concurrency(64)
        .suspend_after(Duration::from_millis(100))
        .start()
        .await?)
}

async fn register(
    registry: &dyn ProcessRegistry,
    prefix: &str,
    count: usize,
    input: Value,
) -> BenchResult<Vec<ProcessId>> {
    let mut ids = Vec::with_capacity(count);
    for n in 0..count {
        let id = ProcessId::new(format!("{prefix}-{n}-{}", uuid::Uuid::new_v4().simple()))?;
        registry
            .register_process(
                ProcessRegistration::new("bench-durable", input.clone()).with_id(id.clone()),
            )
            .await?;
        ids.push(id);
    }
    Ok(ids)
}

async fn await_all(stack: &Proclog, ids: &[ProcessId]) -> BenchResult<()> {
    for id in ids {
        stack
            .driver()
            .await_terminal(id, Duration::from_secs(120))
            .await?;
    }
    Ok(())
}

async fn log(
    registry: &dyn ProcessRegistry,
    id: &ProcessId,
) -> BenchResult<Vec<proclog::ProcessEvent>> {
    let mut events: Vec<proclog::ProcessEvent> = Vec::new();
    loop {
        let after = events.last().map_or(0, |e| e.seq);
        let page = registry.events_after(id, after, 1000).await?;
        if page.is_empty() {
            return Ok(events);
        }
        events.extend(page);
    }
}

fn between(from: DateTime<Utc>, to: DateTime<Utc>) -> Duration {
    (to - from).to_std().unwrap_or_default()
}

/// The statements an idle pod sends while `sleeping` processes wait, and the claim's
/// duration among them.
pub async fn sleeping(url: &str, plan: Plan) -> BenchResult<Vec<Row>> {
    let sleeping: i32 = if plan.waiters >= 10_000 {
        100_000
    } else {
        10_000
    };
    eprintln!("{sleeping} sleeping processes ...");
    let pool = proclog::pg::connect_pool(url, 2)?;
    let client = pool.get().await?;
    client
        .execute(
            "INSERT INTO proclog.processes
                    (process_id, kind, input, disposition, status, attempts, wake_at)
             SELECT 'asleep-' || g || '-' || md5(random()::text), 'bench-durable', 'null',
                    'rerun', 'waiting', 1, now() + interval '1 day'
               FROM generate_series(1, $1::int) g",
            &[&sleeping],
        )
        .await?;
    client
        .batch_execute("VACUUM ANALYZE proclog.processes")
        .await?;
    let stack = stack(url, "bench-sleepy").await?;
    let pod = pod(&stack).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let commits = |client: deadpool_postgres::Object| async move {
        let row = client
            .query_one(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database
                  WHERE datname = current_database()",
                &[],
            )
            .await?;
        BenchResult::Ok(row.get::<_, i64>(0))
    };
    // Statistics are sent at the end of a transaction, with a delay: read around a window.
    client
        .execute("SELECT pg_stat_clear_snapshot()", &[])
        .await?;
    let before = commits(pool.get().await?).await?;
    let window = plan.measure.max(Duration::from_secs(10));
    tokio::time::sleep(window).await;
    client
        .execute("SELECT pg_stat_clear_snapshot()", &[])
        .await?;
    let after = commits(pool.get().await?).await?;
    // Our own two reads and the clear count too.
    let per_sec = (after - before - 3).max(0) as f64 / window.as_secs_f64();
    let mut claims = Vec::new();
    for _ in 0..50 {
        let started = Instant::now();
        let claimed = stack
            .registry()
            .claim_runnable("bench-probe", Duration::from_secs(5), 8)
            .await?;
        claims.push(started.elapsed());
        // Nothing of ours is due; hand back whatever an earlier workload left runnable.
        for claim in claimed {
            stack.registry().release(&claim.lease).await?;
        }
    }
    let mut wakes = Vec::new();
    for _ in 0..50 {
        let started = Instant::now();
        stack.registry().next_wake().await?;
        wakes.push(started.elapsed());
    }
    pod.shutdown().await;
    stack.shutdown().await;
    client
        .execute(
            "DELETE FROM proclog.processes WHERE process_id LIKE 'asleep-%'",
            &[],
        )
        .await?;
    Ok(vec![
        Row::new(format!("{sleeping} sleeping processes: an idle pod's statements/s"), 1)
            .rates(None, per_sec)
            .note("transactions per second on the database over the window (claims, next wake, heartbeat, cancel watch; 2 s poll)"),
        Row::new(format!("claim_runnable among {sleeping} sleeping, none due"), 1)
            .latency(&Latency::of(&mut claims))
            .note("50 claims of up to 8"),
        Row::new(format!("next_wake among {sleeping} sleeping"), 1)
            .latency(&Latency::of(&mut wakes))
            .note("50 reads"),
    ])
}

/// Due time to resumed run (database clock), and message to resumed run on another pod.
pub async fn resumes(url: &str, plan: Plan) -> BenchResult<Vec<Row>> {
    let count = if plan.waiters >= 10_000 { 200 } else { 30 };
    eprintln!("{count} timers and {count} messages ...");
    let runner = stack(url, "bench-runner").await?;
    let sender = stack(url, "bench-sender").await?;
    runner.listener_ready().await;
    let pod = pod(&runner).await?;
    let registry = Arc::clone(runner.registry());

    // Timers of 300 ms to 1.5 s, registered over about 1.5 s: each suspends (threshold
    // 100 ms) and is resumed when due.
    let mut timers = Vec::with_capacity(count);
    for n in 0..count {
        let ms = 300 + (n as u64 * 37) % 1200;
        timers.extend(register(&*registry, "timer", 1, json!({ "ms": ms })).await?);
        tokio::time::sleep(Duration::from_millis(1500 / count as u64)).await;
    }
    await_all(&runner, &timers).await?;
    let mut due_to_resume = Vec::with_capacity(count);
    for id in &timers {
        let events = log(&*registry, id).await?;
        let timer = events.iter().find(|e| e.event_type == "process.timer");
        let resumed = events
            .iter()
            .filter(|e| e.event_type == "process.started")
            .nth(1);
        if let (Some(timer), Some(resumed)) = (timer, resumed) {
            let ms = timer.payload["duration_ms"].as_i64().unwrap_or(0);
            let due = timer.occurred_at + chrono::TimeDelta::milliseconds(ms);
            due_to_resume.push(between(due, resumed.occurred_at));
        }
    }

    // Processes waiting for `go`; the message comes from another pod's stack.
    let waiting = register(&*registry, "recv", count, json!({ "recv": true })).await?;
    for id in &waiting {
        while registry.get_process(id).await?.map(|r| r.status)
            != Some(proclog::ProcessStatus::Waiting)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    for id in &waiting {
        sender
            .registry()
            .send_message(id, Message::new("go", json!(null)))
            .await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    await_all(&runner, &waiting).await?;
    let mut message_to_resume = Vec::with_capacity(count);
    for id in &waiting {
        let events = log(&*registry, id).await?;
        let message = events.iter().find(|e| e.event_type == "process.message");
        let resumed = events
            .iter()
            .filter(|e| e.event_type == "process.started")
            .nth(1);
        if let (Some(message), Some(resumed)) = (message, resumed) {
            message_to_resume.push(between(message.occurred_at, resumed.occurred_at));
        }
    }
    pod.shutdown().await;
    sender.shutdown().await;
    runner.shutdown().await;
    Ok(vec![
        Row::new("timer due -> resumed run (process.started)", 1)
            .latency(&Latency::of(&mut due_to_resume))
            .note(format!(
                "{count} suspended timers, database clock, 2 s poll (the wake is next_wake's)"
            )),
        Row::new("message on pod B -> resumed run on pod A", 1)
            .latency(&Latency::of(&mut message_to_resume))
            .note(format!(
                "{count} waiting receives, database clock, woken by the NOTIFY hint"
            )),
    ])
}

/// A memoized step against a plain append, executed and replayed.
pub async fn steps(url: &str, plan: Plan) -> BenchResult<Vec<Row>> {
    let count = if plan.waiters >= 10_000 { 20 } else { 5 };
    let per_process = 50u64;
    eprintln!("{count} processes of {per_process} steps, and of {per_process} appends ...");
    let runner = stack(url, "bench-steps").await?;
    let pod = pod(&runner).await?;
    let registry = Arc::clone(runner.registry());
    let mut rows = Vec::new();
    for (name, appends) in [("plain append", true), ("memoized step", false)] {
        let ids = register(
            &*registry,
            if appends { "appends" } else { "steps" },
            count,
            json!({"steps": per_process, "appends": appends, "ms": 200}),
        )
        .await?;
        await_all(&runner, &ids).await?;
        let mut executed = Vec::new();
        let mut replayed = Vec::new();
        for id in &ids {
            let events = log(&*registry, id).await?;
            let starts: Vec<&proclog::ProcessEvent> = events
                .iter()
                .filter(|e| e.event_type == "process.started")
                .collect();
            let timer = events.iter().find(|e| e.event_type == "process.timer");
            let end = events.last();
            if let (Some(first), Some(timer)) = (starts.first(), timer) {
                executed.push(between(first.occurred_at, timer.occurred_at) / per_process as u32);
            }
            if let (Some(second), Some(end)) = (starts.get(1), end) {
                replayed.push(between(second.occurred_at, end.occurred_at) / per_process as u32);
            }
        }
        rows.push(
            Row::new(format!("{name}: executed, per step"), 1)
                .latency(&Latency::of(&mut executed))
                .note(format!(
                    "{count} processes x {per_process}, one after another in a run"
                )),
        );
        if !appends {
            rows.push(
                Row::new(format!("{name}: replayed after a resume, per step"), 1)
                    .latency(&Latency::of(&mut replayed))
                    .note("the journal read once, then a lookup per step"),
            );
        }
    }
    pod.shutdown().await;
    runner.shutdown().await;
    Ok(rows)
}
