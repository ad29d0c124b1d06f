//! The cost of queue limits (CONTRACT §10): a pod's claim-and-finish cycle over a backlog
//! spread over many keys, without limits (the plain claim, oldest first) and in a queue with
//! limits per queue and per key (counted under the queue's lock, keys round-robin).

use std::time::{Duration, Instant};

use proclog::queue::{Limits, QueueLimits};
use proclog::{Completion, ProcessRegistration, Proclog, TerminalState};
use serde_json::json;

use crate::Plan;
use crate::baseline::BenchResult;
use crate::report::{Latency, Row};

/// Claims per call, as a pod with 16 free slots asks.
const BATCH: u32 = 16;

pub async fn claims(url: &str, plan: Plan) -> BenchResult<Vec<Row>> {
    let (processes, keys) = if plan.waiters >= 10_000 {
        (10_000, 1_000)
    } else {
        (2_000, 200)
    };
    let stack = Proclog::builder(url).pod_id("bench-queues").start().await?;
    let mut rows = Vec::new();
    for limited in [false, true] {
        let queue = if limited {
            "bench-limited"
        } else {
            "bench-plain"
        };
        let pool = proclog::pg::connect_pool(url, 1)?;
        pool.get()
            .await?
            .batch_execute(
                "DELETE FROM proclog.processes WHERE kind = 'bench-queued';
                 DELETE FROM proclog.queues WHERE queue LIKE 'bench-%';",
            )
            .await?;
        eprintln!("{processes} processes over {keys} keys in {queue} ...");
        for n in 0..processes {
            stack
                .registry()
                .register_process(
                    ProcessRegistration::new("bench-queued", json!(null))
                        .in_queue(queue)
                        .with_concurrency_key(format!("key-{:04}", n % keys)),
                )
                .await?;
        }
        if limited {
            let limits = QueueLimits {
                queue: Limits {
                    concurrency: Some(64),
                    ..Limits::default()
                },
                each_key: Limits {
                    concurrency: Some(1),
                    ..Limits::default()
                },
                ..QueueLimits::default()
            };
            stack.cluster().set_queue(queue, &limits).await?;
        }
        pool.get()
            .await?
            .batch_execute("VACUUM ANALYZE proclog.processes")
            .await?;
        let registry = stack.registry();
        let (mut claim_times, mut claimed) = (Vec::new(), 0usize);
        let started = Instant::now();
        while started.elapsed() < plan.measure * 2 && claimed < processes {
            let sent = Instant::now();
            let batch = registry
                .claim_runnable("bench-queues", Duration::from_secs(60), BATCH)
                .await?;
            claim_times.push(sent.elapsed());
            if batch.is_empty() {
                break;
            }
            claimed += finish(registry.as_ref(), batch).await?;
        }
        let elapsed = started.elapsed().max(Duration::from_micros(1));
        let name = if limited {
            "claim and finish, limited queue"
        } else {
            "claim and finish, no limits"
        };
        let note = if limited {
            format!(
                "{keys} keys, queue 64 at once, each key 1; {BATCH} per claim, each finished; claims/s"
            )
        } else {
            format!("{keys} keys (ignored: no limits); {BATCH} per claim, each finished; claims/s")
        };
        rows.push(
            Row::new(name, 1)
                .rates(None, claimed as f64 / elapsed.as_secs_f64())
                .latency(&Latency::of(&mut claim_times))
                .note(note),
        );
    }
    rows.push(behind_a_held_backlog(&stack, url, processes, plan).await?);
    let pool = proclog::pg::connect_pool(url, 1)?;
    pool.get()
        .await?
        .batch_execute(
            "DELETE FROM proclog.processes WHERE kind = 'bench-queued';
             DELETE FROM proclog.queues WHERE queue LIKE 'bench-%';",
        )
        .await?;
    stack.shutdown().await;
    Ok(rows)
}

/// The plain claim of work registered after a backlog that a queue's limits hold (concurrency
/// 0): the claim's scan steps over the held rows, oldest first.
async fn behind_a_held_backlog(
    stack: &Proclog,
    url: &str,
    held: usize,
    plan: Plan,
) -> BenchResult<Row> {
    let pool = proclog::pg::connect_pool(url, 1)?;
    pool.get()
        .await?
        .batch_execute(
            "DELETE FROM proclog.processes WHERE kind = 'bench-queued';
             DELETE FROM proclog.queues WHERE queue LIKE 'bench-%';",
        )
        .await?;
    eprintln!("{held} processes held in bench-held, plain work after them ...");
    let limits = QueueLimits {
        queue: Limits {
            concurrency: Some(0),
            ..Limits::default()
        },
        ..QueueLimits::default()
    };
    stack.cluster().set_queue("bench-held", &limits).await?;
    let registry = stack.registry();
    for _ in 0..held {
        registry
            .register_process(
                ProcessRegistration::new("bench-queued", json!(null)).in_queue("bench-held"),
            )
            .await?;
    }
    let (mut claim_times, mut claimed) = (Vec::new(), 0usize);
    let started = Instant::now();
    while started.elapsed() < plan.measure {
        for _ in 0..BATCH {
            registry
                .register_process(ProcessRegistration::new("bench-queued", json!(null)))
                .await?;
        }
        let sent = Instant::now();
        let batch = registry
            .claim_runnable("bench-queues", Duration::from_secs(60), BATCH)
            .await?;
        claim_times.push(sent.elapsed());
        claimed += finish(registry.as_ref(), batch).await?;
    }
    let elapsed = started.elapsed().max(Duration::from_micros(1));
    Ok(Row::new("claim and finish, behind a held backlog", 1)
        .rates(None, claimed as f64 / elapsed.as_secs_f64())
        .latency(&Latency::of(&mut claim_times))
        .note(format!(
            "{held} older processes held (concurrency 0) in another queue; the claim call"
        )))
}

/// Completes every claimed process under its lease, as a pod's run would; returns how many.
async fn finish(
    registry: &dyn proclog::ProcessRegistry,
    claims: Vec<proclog::RunnableClaim>,
) -> BenchResult<usize> {
    let count = claims.len();
    for claim in claims {
        registry
            .complete_process(
                &claim.process.id,
                Completion::new(TerminalState::Completed, json!(null)).fenced(&claim.lease),
            )
            .await?;
    }
    Ok(count)
}
