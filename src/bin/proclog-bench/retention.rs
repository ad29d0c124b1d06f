//! Retention: what pruning a large history costs the appends that run beside it, with
//! proclog's prune (bounded batches, each its own transaction) against one `DELETE`
//! statement over the same history (how the prune worked before).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use proclog::{AppendRequest, Disposition, ProcessId, ProcessRegistry};
use serde_json::json;

use crate::Plan;
use crate::baseline::BenchResult;
use crate::report::{Latency, Row};
use crate::workloads::{register_many, warm_registry};

/// Appenders running beside the prune, each on a process of its own.
const APPENDERS: usize = 8;
/// Events per pruned process.
const EVENTS_PER_PROCESS: i64 = 100;

/// Workload: appends alone, during proclog's prune of a seeded history, and during one
/// `DELETE` of the same history.
pub async fn prune(url: &str, plan: Plan) -> BenchResult<Vec<Row>> {
    let Setup {
        history,
        registry,
        ids,
        admin,
    } = Setup::new(url, plan, "retention-live", APPENDERS, 1).await?;
    let mut rows = Vec::new();

    let window = plan.measure;
    let alone = appends_during(&registry, &ids, || {
        Box::pin(async move {
            tokio::time::sleep(window).await;
            Ok(String::new())
        })
    })
    .await?;
    rows.push(
        Row::new("appends beside no prune", APPENDERS)
            .rates(None, alone.rate)
            .latency(&Latency::of(&mut alone.latencies.clone())),
    );

    for one_statement in [false, true] {
        let cutoff = seed(&admin, history).await?;
        let pruner = Arc::clone(&registry);
        let admin = admin.clone();
        let during = appends_during(&registry, &ids, move || {
            Box::pin(async move {
                if one_statement {
                    let client = admin.get().await?;
                    let deleted = client
                        .execute(
                            "DELETE FROM proclog.processes
                              WHERE terminal_state IS NOT NULL AND completed_at < $1",
                            &[&cutoff],
                        )
                        .await?;
                    Ok(format!("{deleted} processes"))
                } else {
                    let report = pruner.prune_terminal_processes(cutoff).await?;
                    Ok(format!(
                        "{} processes, {} events",
                        report.processes, report.events
                    ))
                }
            })
        })
        .await?;
        let name = if one_statement {
            format!("appends beside one DELETE of {history} events")
        } else {
            format!("appends beside proclog's prune of {history} events")
        };
        rows.push(
            Row::new(name, APPENDERS)
                .rates(None, during.rate)
                .latency(&Latency::of(&mut during.latencies.clone()))
                .note(format!(
                    "the prune took {:.1} s ({:.0} events/s; {})",
                    during.took.as_secs_f64(),
                    history as f64 / during.took.as_secs_f64(),
                    during.what
                )),
        );
    }
    Ok(rows)
}

/// What both retention workloads start from.
struct Setup {
    /// Events of the history to prune (2,000,000 in `--full`, else 100,000).
    history: i64,
    registry: Arc<dyn ProcessRegistry>,
    /// Live `external` processes for the appenders.
    ids: Arc<Vec<ProcessId>>,
    /// A pool of `admin_size` connections without a statement timeout (a one-statement
    /// `DELETE` and the seeding's `VACUUM` run long).
    admin: deadpool_postgres::Pool,
}

impl Setup {
    async fn new(
        url: &str,
        plan: Plan,
        prefix: &str,
        live: usize,
        admin_size: usize,
    ) -> BenchResult<Self> {
        let history = if plan.waiters >= 10_000 {
            2_000_000
        } else {
            100_000
        };
        let registry = warm_registry(url, APPENDERS + 2).await?;
        let ids = Arc::new(register_many(&*registry, prefix, live, Disposition::External).await?);
        let admin = proclog::pg::connect_pool_with(
            url,
            &proclog::pg::PoolOptions {
                statement_timeout: None,
                ..proclog::pg::PoolOptions::new(admin_size)
            },
        )?;
        Ok(Self {
            history,
            registry,
            ids,
            admin,
        })
    }
}

/// Terminal processes of `EVENTS_PER_PROCESS` events each, `events` in all, completed a day
/// ago (written set-based, as the registry would have left them); returns a cutoff after
/// them.
async fn seed(pool: &deadpool_postgres::Pool, events: i64) -> BenchResult<DateTime<Utc>> {
    let processes = events / EVENTS_PER_PROCESS;
    eprintln!("{processes} terminal processes of {EVENTS_PER_PROCESS} events ...");
    let client = pool.get().await?;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    client
        .execute(
            "INSERT INTO proclog.processes
                    (process_id, kind, input, disposition, status, last_seq, terminal_state,
                     terminal_seq, output, completed_at, created_at)
             SELECT 'old-' || $1 || '-' || g, 'bench-old', 'null', 'external', 'completed',
                    $3, 'completed', $3, 'null', now() - interval '1 day',
                    now() - interval '2 days'
               FROM generate_series(1, $2::bigint) g",
            &[&tag, &processes, &EVENTS_PER_PROCESS],
        )
        .await?;
    // In slices, as the history was written: no single huge transaction.
    let slice = 1_000i64;
    let mut from = 1i64;
    while from <= processes {
        let to = (from + slice - 1).min(processes);
        client
            .execute(
                "INSERT INTO proclog.events (process_id, seq, event_type, payload, writer)
                 SELECT 'old-' || $1 || '-' || g, s,
                        CASE WHEN s = $4 THEN 'process.completed' ELSE 'bench' END,
                        CASE WHEN s = $4 THEN 'null'::jsonb
                             ELSE '{\"i\": 1, \"note\": \"a small event payload\"}' END,
                        'seed'
                   FROM generate_series($2::bigint, $3::bigint) g,
                        generate_series(1, $4::bigint) s",
                &[&tag, &from, &to, &EVENTS_PER_PROCESS],
            )
            .await?;
        from = to + 1;
    }
    for statement in [
        "VACUUM ANALYZE proclog.processes",
        "VACUUM ANALYZE proclog.events",
    ] {
        client.batch_execute(statement).await?;
    }
    // A checkpoint now rather than in the middle of the measurement (superuser only).
    let _ = client.batch_execute("CHECKPOINT").await;
    let now: DateTime<Utc> = client.query_one("SELECT now()", &[]).await?.get(0);
    Ok(now - chrono::TimeDelta::hours(1))
}

struct During {
    rate: f64,
    latencies: Vec<Duration>,
    took: Duration,
    what: String,
}

type Task = BoxFuture<'static, BenchResult<String>>;

/// Runs `APPENDERS` closed loops of single appends while `task` runs; returns the appends'
/// rate and latencies over the task's span, and the task's duration and answer.
async fn appends_during(
    registry: &Arc<dyn ProcessRegistry>,
    ids: &Arc<Vec<ProcessId>>,
    task: impl FnOnce() -> Task,
) -> BenchResult<During> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut appenders = Vec::with_capacity(APPENDERS);
    for worker in 0..APPENDERS {
        let (registry, ids, stop) = (Arc::clone(registry), Arc::clone(ids), Arc::clone(&stop));
        appenders.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let began = Instant::now();
                registry
                    .append_event(
                        &ids[worker],
                        AppendRequest::new("bench", json!({"i": i, "note": "beside a prune"})),
                    )
                    .await?;
                samples.push((began, began.elapsed()));
                i += 1;
            }
            BenchResult::Ok(samples)
        }));
    }
    // The appenders reach their pace first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let what = task().await?;
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for appender in appenders {
        for (began, latency) in appender.await?? {
            if began >= started && began < started + took {
                latencies.push(latency);
            }
        }
    }
    Ok(During {
        rate: latencies.len() as f64 / took.as_secs_f64(),
        latencies,
        took,
        what,
    })
}

/// Partitions of the partitioned copy of `events` ([`partitioning`]): a month of daily
/// registration buckets.
const BUCKETS: i32 = 30;

/// Workload: what partitioning `events` by a registration-time bucket would give and cost,
/// on a copy beside proclog's table: pruning by dropping a whole bucket of the same history
/// (with the appends beside it, as above), and reading a page of one log by process id
/// when the bucket is not known (every partition's index probed) against the table as it is.
pub async fn partitioning(url: &str, plan: Plan) -> BenchResult<Vec<Row>> {
    let Setup {
        history,
        registry,
        ids,
        admin,
    } = Setup::new(url, plan, "partition-live", APPENDERS + 1, 17).await?;
    let client = admin.get().await?;
    eprintln!("a copy of events in {BUCKETS} daily partitions, {history} events in the oldest ...");
    client
        .batch_execute(
            "DROP SCHEMA IF EXISTS bench_partition CASCADE;
             CREATE SCHEMA bench_partition;
             CREATE TABLE bench_partition.events (
                 bucket int NOT NULL, process_id text NOT NULL, seq bigint NOT NULL,
                 event_type text NOT NULL, payload jsonb NOT NULL,
                 occurred_at timestamptz NOT NULL DEFAULT now(), writer text NOT NULL,
                 PRIMARY KEY (bucket, process_id, seq)) PARTITION BY RANGE (bucket);
             CREATE INDEX ON bench_partition.events (process_id, seq);",
        )
        .await?;
    for bucket in 0..BUCKETS {
        client
            .batch_execute(&format!(
                "CREATE TABLE bench_partition.events_{bucket} PARTITION OF bench_partition.events
                     FOR VALUES FROM ({bucket}) TO ({})",
                bucket + 1
            ))
            .await?;
    }
    let processes = history / EVENTS_PER_PROCESS;
    let mut from = 1i64;
    while from <= processes {
        let to = (from + 999).min(processes);
        client
            .execute(
                "INSERT INTO bench_partition.events
                        (bucket, process_id, seq, event_type, payload, writer)
                 SELECT 0, 'old-' || g, s, 'bench',
                        '{\"i\": 1, \"note\": \"a small event payload\"}', 'seed'
                   FROM generate_series($1::bigint, $2::bigint) g,
                        generate_series(1, $3::bigint) s",
                &[&from, &to, &EVENTS_PER_PROCESS],
            )
            .await?;
        from = to + 1;
    }
    // One live log of 1,000 events in each table (the newest bucket in the copy).
    let live = ids[APPENDERS].clone();
    for chunk in 0..10u64 {
        let batch = (0..100)
            .map(|n| AppendRequest::new("bench", json!({"n": chunk * 100 + n})))
            .collect();
        registry.append_events(&live, batch).await?;
    }
    client
        .execute(
            "INSERT INTO bench_partition.events
                    (bucket, process_id, seq, event_type, payload, writer)
             SELECT $1, process_id, seq, event_type, payload, writer
               FROM proclog.events WHERE process_id = $2",
            &[&(BUCKETS - 1), &live.as_str()],
        )
        .await?;
    for table in ["bench_partition.events", "proclog.events"] {
        client
            .batch_execute(&format!("VACUUM ANALYZE {table}"))
            .await?;
    }
    let _ = client.batch_execute("CHECKPOINT").await;

    let mut rows = Vec::new();
    let mut rates = Vec::new();
    for table in ["proclog.events", "bench_partition.events"] {
        let sql: &'static str = if table == "proclog.events" {
            "SELECT seq, payload FROM proclog.events
              WHERE process_id = $1 AND seq > $2 ORDER BY seq LIMIT 100"
        } else {
            "SELECT seq, payload FROM bench_partition.events
              WHERE process_id = $1 AND seq > $2 ORDER BY seq LIMIT 100"
        };
        let (pool, id) = (admin.clone(), live.to_string());
        let op: crate::workloads::Op = Arc::new(move |_, i| {
            let (pool, id) = (pool.clone(), id.clone());
            Box::pin(async move {
                let client = pool.get().await?;
                let after = (i % 9) as i64 * 100;
                client.query(sql, &[&id, &after]).await?;
                Ok(1)
            })
        });
        let (rate, mut latencies) = crate::workloads::closed_loop(16, plan, op).await?;
        rates.push((rate, Latency::of(&mut latencies)));
    }
    rows.push(
        Row::new(
            format!("page of 100 by process id, {BUCKETS} partitions, bucket unknown"),
            16,
        )
        .rates(Some(rates[0].0), rates[1].0)
        .latency(&rates[1].1)
        .note("baseline = the same page from proclog.events as it is (unpartitioned)"),
    );

    let drop_admin = admin.clone();
    let during = appends_during(&registry, &ids, move || {
        Box::pin(async move {
            let client = drop_admin.get().await?;
            client
                .batch_execute(
                    "ALTER TABLE bench_partition.events
                         DETACH PARTITION bench_partition.events_0 CONCURRENTLY",
                )
                .await?;
            client
                .batch_execute("DROP TABLE bench_partition.events_0")
                .await?;
            Ok(String::new())
        })
    })
    .await?;
    rows.push(
        Row::new(
            format!("appends beside dropping a partition of {history} events"),
            APPENDERS,
        )
        .rates(None, during.rate)
        .latency(&Latency::of(&mut during.latencies.clone()))
        .note(format!(
            "DETACH ... CONCURRENTLY, then DROP: {:.0} ms",
            during.took.as_secs_f64() * 1000.0
        )),
    );
    client
        .batch_execute("DROP SCHEMA bench_partition CASCADE")
        .await?;
    Ok(rows)
}
