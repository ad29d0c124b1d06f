//! The server's limit, measured by `pgbench` (shipped with the PostgreSQL server) on the same
//! cluster in the same run: the cheapest one-statement append (a counter row and an insert,
//! no constraints) and proclog's own single-append statement on proclog's schema, against
//! proclog's registry through its Rust client with the NOTIFY sink on and with group commit.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;

use proclog::pg::{PgProcessRegistry, connect_pool};
use proclog::pod_services::PodServices;
use proclog::{Disposition, ProcessId, RegistryConfig};

use crate::Plan;
use crate::baseline::BenchResult;
use crate::report::{Latency, Row};
use crate::workloads;

/// The cheapest one-statement append: bump a counter row, insert at it. No constraint but
/// the primary keys.
const CHEAPEST_SETUP: &str = "
    DROP TABLE IF EXISTS pgbench_append_events, pgbench_append_counters;
    CREATE TABLE pgbench_append_counters (id int PRIMARY KEY, last bigint NOT NULL);
    CREATE TABLE pgbench_append_events (id int, seq bigint, event_type text, payload jsonb,
                                        writer text, PRIMARY KEY (id, seq));
    INSERT INTO pgbench_append_counters SELECT g, 0 FROM generate_series(0, 1023) g;
    VACUUM ANALYZE pgbench_append_counters;";

const CHEAPEST_SCRIPT: &str = "\
WITH c AS (UPDATE pgbench_append_counters SET last = last + 1 WHERE id = :client_id RETURNING last) \
INSERT INTO pgbench_append_events (id, seq, event_type, payload, writer) \
SELECT :client_id, c.last, 'bench', '{\"i\": 1, \"note\": \"a small event payload\"}', 'pgbench' FROM c;
";

/// proclog's unkeyed single-append statement (`APPEND_UNKEYED` in `src/pg/registry.rs`), with
/// its parameters written out: one event, unfenced, on process `pgbench-<client>`.
const PROCLOG_SCRIPT: &str = "\
WITH p AS (UPDATE proclog.processes SET last_seq = last_seq + 1, \
status = CASE WHEN status = 'pending' THEN 'running' ELSE status END, updated_at = now() \
WHERE process_id = 'pgbench-' || :client_id AND terminal_state IS NULL \
AND proclog.fence_holds(NULL::uuid, lease_token, lease_expires_at) \
RETURNING last_seq, lease_generation) \
INSERT INTO proclog.events (process_id, seq, event_type, payload, writer, lease_generation) \
SELECT 'pgbench-' || :client_id, p.last_seq, 'bench', \
'{\"i\": 1, \"note\": \"a small event payload\"}', 'pgbench', NULL FROM p \
RETURNING seq, occurred_at, lease_generation;
";

fn pgbench_binary() -> BenchResult<PathBuf> {
    Ok(proclog::local_pg::find_bin_dir()?.join("pgbench"))
}

/// Runs `script` with `clients` connections for `seconds`; returns transactions per second
/// and the mean latency in ms.
async fn run_pgbench(
    url: &str,
    script: &str,
    clients: usize,
    seconds: u64,
) -> BenchResult<(f64, f64)> {
    let dir = std::env::temp_dir().join(format!("proclog-pgbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("script.sql");
    std::fs::write(&path, script)?;
    let output = tokio::process::Command::new(pgbench_binary()?)
        .args(["-n", "-M", "prepared", "-c", &clients.to_string()])
        .args(["-j", &clients.min(2).to_string()])
        .args(["-T", &seconds.max(1).to_string(), "-f"])
        .arg(&path)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .await?;
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "pgbench failed ({}): {}{}",
            output.status,
            stdout,
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    let number_after = |label: &str| -> Option<f64> {
        let line = stdout.lines().find(|line| line.starts_with(label))?;
        line[label.len()..].split_whitespace().next()?.parse().ok()
    };
    let tps = number_after("tps = ").ok_or("no tps in pgbench's output")?;
    let latency = number_after("latency average = ").unwrap_or(0.0);
    Ok((tps, latency))
}

/// Rows: pgbench's cheapest append and pgbench running proclog's statement, against the
/// registry (sink on, group commit on, the default pod stack) at 1, 16 and 64 appenders.
pub async fn pgbench_baseline(url: &str, plan: Plan) -> BenchResult<Vec<Row>> {
    let admin = connect_pool(url, 1)?;
    let client = admin.get().await?;
    for statement in CHEAPEST_SETUP.split(';').filter(|s| !s.trim().is_empty()) {
        client.batch_execute(statement).await?;
    }
    drop(client);
    let setup = PgProcessRegistry::new(connect_pool(url, 2)?, RegistryConfig::new("setup"));
    for client in 0..64 {
        let id = ProcessId::new(format!("pgbench-{client}"))?;
        let registration = proclog::ProcessRegistration::new("bench", serde_json::json!(null))
            .with_id(id)
            .with_disposition(Disposition::External);
        proclog::ProcessRegistry::register_process(&setup, registration).await?;
    }
    let seconds = (plan.measure.as_secs_f64().ceil() as u64).max(1);
    let mut rows = Vec::new();
    for clients in [1usize, 16, 64] {
        eprintln!("pgbench x{clients} ...");
        let (cheapest, cheapest_ms) = run_pgbench(url, CHEAPEST_SCRIPT, clients, seconds).await?;
        let (statement, statement_ms) = run_pgbench(url, PROCLOG_SCRIPT, clients, seconds).await?;
        let ids = Arc::new(
            workloads::register_many(&setup, "pgb", clients, Disposition::External).await?,
        );
        let pod = PodServices::start(url, "bench-pgb", workloads::pod_options(clients))?;
        workloads::warm(pod.pool().expect("postgres"), clients).await?;
        pod.listener_ready().await;
        let ops = [workloads::registry_op(Arc::clone(&pod.registry), ids)];
        let mut results = workloads::interleaved(clients, plan, &ops)
            .await?
            .into_iter();
        let (ours, mut latency) = results.next().expect("registry");
        rows.push(
            Row::new(
                "append: registry (sink, group commit) vs pgbench cheapest",
                clients,
            )
            .rates(Some(cheapest), ours)
            .latency(&Latency::of(&mut latency))
            .note(format!(
                "pgbench cheapest {cheapest_ms:.2} ms mean; proclog's statement in pgbench \
                     {statement:.0}/s ({:.2} of cheapest, {statement_ms:.2} ms mean)",
                statement / cheapest
            )),
        );
    }
    Ok(rows)
}
