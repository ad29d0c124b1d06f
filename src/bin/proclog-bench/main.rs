//! `proclog-bench`: proclog against the cheapest correct raw SQL for the same work, on the
//! same Postgres, in one run. Prints one Markdown table; `--json FILE` writes the same rows.
//!
//! ```text
//! cargo run --release --bin proclog-bench -- --quick
//! cargo run --release --bin proclog-bench -- --full --json bench.json
//! ```
//!
//! Speed is measured here, never asserted: every figure is a ratio to a baseline measured in
//! the same run, since absolute numbers on a shared machine drift.

mod baseline;
mod citus;
mod durable;
mod pgbench;
mod profile;
mod queues;
mod report;
mod retention;
mod schedules;
mod workloads;

use std::time::Duration;

use clap::Parser;
use proclog::local_pg::{LocalPostgres, LocalPostgresOptions};

use report::Row;

/// Benchmarks proclog against raw SQL on the same Postgres.
#[derive(Parser, Debug)]
#[command(name = "proclog-bench")]
struct Args {
    /// Short runs (a smoke check that every workload works).
    #[arg(long, conflicts_with = "full")]
    quick: bool,
    /// Long runs, for BENCHMARKS.md.
    #[arg(long)]
    full: bool,
    /// Also write the rows as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Use this database (it is migrated; bench tables are created in it) instead of a
    /// throwaway cluster.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Only run workloads whose name contains this.
    #[arg(long)]
    only: Option<String>,
    /// Instead of the table: run one of proclog's paths alone, for a profiler to watch
    /// (`tools/flamegraph.sh`): `pod` (a pod's registry: NOTIFY sink, group commit),
    /// `group` (group commit, no sink), `single` (no group commit, no sink), `batch` (batches of
    /// 100 events), `http` (single appends over HTTP through one pod, the client in this
    /// process), `raw` (the raw SQL baseline).
    #[arg(long, value_parser = ["pod", "group", "single", "batch", "http", "raw"])]
    profile: Option<String>,
    /// Appenders of `--profile`.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Seconds `--profile` runs.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Group-commit flushers of `--profile group` (default: the registry's default).
    #[arg(long)]
    flushers: Option<usize>,
}

/// How long each measurement runs, and the kill-recovery TTL.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub measure: Duration,
    pub warmup: Duration,
    pub waiters: usize,
    pub lease_ttl: Duration,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args = Args::parse();
    let plan = if args.full {
        Plan {
            measure: Duration::from_secs(5),
            warmup: Duration::from_secs(1),
            waiters: 10_000,
            lease_ttl: Duration::from_secs(15),
        }
    } else {
        Plan {
            measure: Duration::from_millis(600),
            warmup: Duration::from_millis(200),
            waiters: 1_000,
            lease_ttl: Duration::from_secs(2),
        }
    };
    let local;
    let url = match &args.database_url {
        Some(url) => url.clone(),
        None => {
            eprintln!("starting a throwaway Postgres (fsync on) ...");
            local = tokio::task::spawn_blocking(|| {
                LocalPostgres::start(&LocalPostgresOptions {
                    durable: true,
                    settings: vec![("max_connections".into(), "400".into())],
                })
            })
            .await??;
            local.url("postgres")
        }
    };
    let pool = proclog::pg::connect_pool(&url, 1)?;
    proclog::pg::migrate(&pool).await?;
    // A steadier start: the tables hold some history and the planner has statistics, so no
    // figure depends on autovacuum's view of an almost empty table.
    let client = pool.get().await?;
    for statement in [
        "INSERT INTO proclog.processes (process_id, kind, input, disposition)
         SELECT 'seed-' || g, 'seed', 'null', 'external' FROM generate_series(1, 1000) g
         ON CONFLICT DO NOTHING",
        "VACUUM ANALYZE proclog.processes",
        "VACUUM ANALYZE proclog.events",
    ] {
        client.batch_execute(statement).await?;
    }
    drop(client);

    if let Some(path) = &args.profile {
        let window = Duration::from_secs(args.seconds.max(1));
        let rate = profile::run(&url, path, args.concurrency.max(1), window, args.flushers).await?;
        println!("{path} x{}: {rate:.0} events/s", args.concurrency);
        return Ok(());
    }
    let mut rows: Vec<Row> = Vec::new();
    let selected = |name: &str| args.only.as_deref().is_none_or(|only| name.contains(only));
    if selected("append") {
        rows.extend(workloads::single_appends(&url, plan).await?);
    }
    if selected("group") {
        rows.extend(workloads::group_commit(&url, plan).await?);
    }
    if selected("pgbench") {
        rows.extend(pgbench::pgbench_baseline(&url, plan).await?);
    }
    if selected("hot") {
        rows.extend(workloads::hot_process(&url, plan).await?);
    }
    if selected("batch") {
        rows.extend(workloads::batches(&url, plan).await?);
    }
    if selected("events_after") {
        rows.extend(workloads::reads(&url, plan).await?);
    }
    if selected("notice") {
        rows.extend(workloads::notice_latency(&url, plan).await?);
    }
    if selected("await") {
        rows.extend(workloads::await_wake(&url, plan).await?);
    }
    if selected("http") {
        rows.extend(workloads::http_appends(&url, plan).await?);
    }
    if selected("kill") {
        rows.extend(workloads::kill_recovery(&url, plan).await?);
    }
    if selected("durable") || selected("sleeping") {
        rows.extend(durable::sleeping(&url, plan).await?);
    }
    if selected("durable") || selected("resume") {
        rows.extend(durable::resumes(&url, plan).await?);
    }
    if selected("durable") || selected("step") {
        rows.extend(durable::steps(&url, plan).await?);
    }
    if selected("prune") {
        rows.extend(retention::prune(&url, plan).await?);
    }
    if selected("prune") || selected("partition") {
        rows.extend(retention::partitioning(&url, plan).await?);
    }
    if selected("schedule") {
        rows.extend(schedules::ticks(&url, plan).await?);
    }
    if selected("queue") {
        rows.extend(queues::claims(&url, plan).await?);
    }
    if selected("citus") {
        rows.extend(citus::compare(plan).await?);
    }

    println!("{}", report::markdown(&rows));
    // A check that the machine was quiet: on an idle 2-core machine one appender's median
    // append is about 0.3-0.45 ms; much more means the figures above were disturbed.
    if let Some(p50) = rows
        .iter()
        .find(|row| row.concurrency == 1 && row.workload.starts_with("group commit"))
        .and_then(|row| row.p50_ms)
    {
        println!("\nquiet check: one appender's median append took {p50:.2} ms");
    }
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&rows)?)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
