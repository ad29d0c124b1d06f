//! The same workloads on a plain Postgres and on a Citus cluster (a coordinator and two
//! workers, every node on this machine's cores), one after the other in one run, as ratios
//! (Citus / Postgres); and what each Citus node spends per operation, read from `/proc`, the
//! basis of the scale model in BENCHMARKS.md.
//!
//! Every node runs with `fsync` on. A node's CPU is its postmaster's time, the time of the
//! backends it has reaped (`cutime`/`cstime`) and that of its live children; a workload's
//! CPU per operation divides the CPU of the whole run (warmup included) by the operations of
//! the run at the measured rate, an estimate good to the warmup's share.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use proclog::local_pg::{LocalPostgres, LocalPostgresOptions};
use proclog::pg::{PgNotifier, PgProcessRegistry, connect_pool};
use proclog::testing::LocalCitus;
use proclog::{
    AppendRequest, Completion, Disposition, ProcessChangeHub, ProcessFilter, ProcessId,
    ProcessRegistration, ProcessRegistry, RegistryConfig, TerminalState, WatchedProcessRegistry,
};
use serde_json::json;

use crate::Plan;
use crate::baseline::BenchResult;
use crate::report::{Latency, Row};
use crate::workloads::{Op, closed_loop, register_many, registry_op, warm};

/// Connections of each registry's pool (the highest concurrency measured).
const POOL: usize = 64;

/// Runs the comparison; an empty result (and a note on stderr) without Citus.
pub async fn compare(plan: Plan) -> BenchResult<Vec<Row>> {
    if !LocalCitus::available() {
        eprintln!("citus: skipped, the citus extension is not installed (see .ci/run)");
        return Ok(Vec::new());
    }
    let options = LocalPostgresOptions {
        durable: true,
        settings: vec![("max_connections".into(), "400".into())],
    };
    eprintln!("citus: starting a Postgres, and a Citus coordinator with two workers ...");
    let postgres = {
        let options = options.clone();
        tokio::task::spawn_blocking(move || LocalPostgres::start(&options)).await??
    };
    let citus = LocalCitus::start(2, &options).await?;
    let mut nodes = vec![("coordinator".to_owned(), data_dir(citus.coordinator()))];
    for (index, worker) in citus.workers().iter().enumerate() {
        nodes.push((format!("worker {}", index + 1), data_dir(worker)));
    }
    let backends = [
        Backend::prepare("postgres", postgres.url("postgres"), Vec::new()).await?,
        Backend::prepare("citus", citus.url(), nodes).await?,
    ];

    let mut rows = Vec::new();
    for workload in WORKLOADS {
        let mut measured = Vec::new();
        for backend in &backends {
            measured.push(backend.measure(workload, plan).await?);
        }
        rows.push(row(workload, &measured[0], &measured[1]));
    }
    drop(backends);
    citus.stop()?;
    postgres.stop()?;
    Ok(rows)
}

/// A workload of the comparison.
#[derive(Clone, Copy, Debug)]
enum Workload {
    /// Unkeyed appends, each worker to a process of its own.
    Append(usize),
    /// Appends with a replay key, each worker to a process of its own.
    KeyedAppend(usize),
    /// Batches of 100 events.
    Batch(usize),
    /// Appends through the watching decorator with the NOTIFY sink.
    NotifiedAppend(usize),
    /// `events_after`: a page of 100 from a log of 1,000.
    Read(usize),
    /// Register a process and complete it.
    Lifecycle(usize),
    /// `claim_runnable` of up to 10 pending processes (a scan of every shard on Citus).
    Claim(usize),
    /// `claim_runnable` when nothing is runnable: a pod's idle poll (scans of every shard
    /// on Citus), calls/s.
    IdlePoll(usize),
    /// The first page (50) of the process list (a scan of every shard on Citus).
    List(usize),
}

const WORKLOADS: [Workload; 11] = [
    Workload::Append(1),
    Workload::Append(16),
    Workload::Append(64),
    Workload::KeyedAppend(16),
    Workload::Batch(4),
    Workload::NotifiedAppend(16),
    Workload::Read(16),
    Workload::Lifecycle(16),
    Workload::Claim(4),
    Workload::IdlePoll(1),
    Workload::List(4),
];

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Append(_) => "citus vs postgres: append (own process)",
            Workload::KeyedAppend(_) => "citus vs postgres: keyed append",
            Workload::Batch(_) => "citus vs postgres: batch of 100 (events/s)",
            Workload::NotifiedAppend(_) => "citus vs postgres: append, NOTIFY sink on",
            Workload::Read(_) => "citus vs postgres: events_after page of 100",
            Workload::Lifecycle(_) => "citus vs postgres: register + complete",
            Workload::Claim(_) => "citus vs postgres: claim_runnable (claims/s)",
            Workload::IdlePoll(_) => "citus vs postgres: idle claim poll (calls/s)",
            Workload::List(_) => "citus vs postgres: list page of 50",
        }
    }

    fn concurrency(self) -> usize {
        match self {
            Workload::Append(n)
            | Workload::KeyedAppend(n)
            | Workload::Batch(n)
            | Workload::NotifiedAppend(n)
            | Workload::Read(n)
            | Workload::Lifecycle(n)
            | Workload::Claim(n)
            | Workload::IdlePoll(n)
            | Workload::List(n) => n,
        }
    }
}

/// One backend: its URL, a registry on it, and its nodes' data directories (Citus only).
struct Backend {
    name: &'static str,
    url: String,
    registry: Arc<PgProcessRegistry>,
    nodes: Vec<(String, PathBuf)>,
}

/// What one workload measured on one backend.
struct Measured {
    rate: f64,
    latency: Latency,
    /// CPU milliseconds per operation by node.
    cpu_ms_per_op: Vec<(String, f64)>,
}

impl Backend {
    async fn prepare(
        name: &'static str,
        url: String,
        nodes: Vec<(String, PathBuf)>,
    ) -> BenchResult<Self> {
        let pool = connect_pool(&url, POOL)?;
        proclog::pg::migrate(&pool).await?;
        warm(&pool, POOL).await?;
        let registry = Arc::new(PgProcessRegistry::new(
            pool,
            RegistryConfig::new(format!("bench-{name}")),
        ));
        Ok(Self {
            name,
            url,
            registry,
            nodes,
        })
    }

    async fn measure(&self, workload: Workload, plan: Plan) -> BenchResult<Measured> {
        let concurrency = workload.concurrency();
        let op = self.op(workload, plan).await?;
        let before = self.cpu();
        let (rate, mut latencies) = closed_loop(concurrency, plan, op).await?;
        let after = self.cpu();
        let operations = rate * (plan.warmup + plan.measure).as_secs_f64();
        let cpu_ms_per_op = before
            .iter()
            .zip(&after)
            .map(|((node, b), (_, a))| (node.clone(), (a - b) * 1000.0 / operations.max(1.0)))
            .collect();
        eprintln!("citus: {} on {}: {rate:.0}/s", workload.name(), self.name);
        Ok(Measured {
            rate,
            latency: Latency::of(&mut latencies),
            cpu_ms_per_op,
        })
    }

    /// CPU seconds so far of each node.
    fn cpu(&self) -> Vec<(String, f64)> {
        self.nodes
            .iter()
            .map(|(node, dir)| (node.clone(), node_cpu_seconds(dir)))
            .collect()
    }

    /// The operation of `workload`, with what it needs registered first.
    async fn op(&self, workload: Workload, plan: Plan) -> BenchResult<Op> {
        let registry: Arc<dyn ProcessRegistry> = self.registry.clone();
        let concurrency = workload.concurrency();
        let external = |prefix: &'static str| {
            let registry = Arc::clone(&registry);
            async move { register_many(&*registry, prefix, concurrency, Disposition::External).await }
        };
        Ok(match workload {
            Workload::Append(_) => {
                registry_op(registry.clone(), Arc::new(external("c-app").await?))
            }
            Workload::KeyedAppend(_) => {
                let ids = Arc::new(external("c-key").await?);
                Arc::new(move |worker, i| {
                    let (registry, id) = (Arc::clone(&registry), ids[worker].clone());
                    Box::pin(async move {
                        let request = AppendRequest::new("bench", json!({"i": i}))
                            .with_replay_key(format!("k-{i}"));
                        registry.append_event(&id, request).await?;
                        Ok(1)
                    })
                })
            }
            Workload::Batch(_) => {
                let ids = Arc::new(external("c-batch").await?);
                Arc::new(move |worker, i| {
                    let (registry, id) = (Arc::clone(&registry), ids[worker].clone());
                    Box::pin(async move {
                        let batch = (0..100)
                            .map(|n| AppendRequest::new("bench", json!({"i": i, "n": n})))
                            .collect();
                        registry.append_events(&id, batch).await?;
                        Ok(100)
                    })
                })
            }
            Workload::NotifiedAppend(_) => {
                let notifier = PgNotifier::spawn(connect_pool(&self.url, 2)?, "bench", 4096);
                let watched: Arc<dyn ProcessRegistry> = Arc::new(WatchedProcessRegistry::new(
                    Arc::clone(&self.registry),
                    Arc::new(ProcessChangeHub::new()),
                    Arc::new(notifier),
                ));
                registry_op(watched, Arc::new(external("c-notify").await?))
            }
            Workload::Read(_) => {
                let id = external("c-read").await?.remove(0);
                for chunk in 0..10 {
                    let batch = (0..100)
                        .map(|n| AppendRequest::new("bench", json!({"n": chunk * 100 + n})))
                        .collect();
                    registry.append_events(&id, batch).await?;
                }
                Arc::new(move |_, i| {
                    let (registry, id) = (Arc::clone(&registry), id.clone());
                    Box::pin(async move {
                        let after = (i % 9) as i64 * 100;
                        registry.events_after(&id, after, 100).await?;
                        Ok(1)
                    })
                })
            }
            Workload::Lifecycle(_) => Arc::new(move |worker, i| {
                let registry = Arc::clone(&registry);
                Box::pin(async move {
                    let id = ProcessId::new(format!(
                        "c-life-{worker}-{i}-{}",
                        uuid::Uuid::new_v4().simple()
                    ))?;
                    registry
                        .register_process(
                            ProcessRegistration::new("bench", json!(null))
                                .with_id(id.clone())
                                .with_disposition(Disposition::External),
                        )
                        .await?;
                    registry
                        .complete_process(&id, Completion::new(TerminalState::Completed, json!(1)))
                        .await?;
                    Ok(1)
                })
            }),
            Workload::Claim(_) => {
                // Enough pending work that no claimer runs dry within the run (20,000
                // claims/s at most), registered set-based.
                let wanted = ((plan.warmup + plan.measure).as_secs_f64() * 20_000.0) as i64;
                let pool = connect_pool(&self.url, 1)?;
                pool.get()
                    .await?
                    .execute(
                        "INSERT INTO proclog.processes (process_id, kind, input, disposition)
                         SELECT 'c-claim-' || g, 'bench', 'null', 'rerun'
                           FROM generate_series(1, $1::bigint) g",
                        &[&wanted],
                    )
                    .await?;
                Arc::new(move |worker, _| {
                    let registry = Arc::clone(&registry);
                    Box::pin(async move {
                        let claims = registry
                            .claim_runnable(
                                &format!("bench-claimer-{worker}"),
                                Duration::from_secs(600),
                                10,
                            )
                            .await?;
                        Ok(claims.len() as u64)
                    })
                })
            }
            Workload::IdlePoll(_) => {
                // Nothing runnable: what the claim workload left unclaimed goes (what it
                // claimed stays leased for 600 s, so the scans still pass over it).
                connect_pool(&self.url, 1)?
                    .get()
                    .await?
                    .execute(
                        "DELETE FROM proclog.processes
                          WHERE process_id LIKE 'c-claim-%' AND lease_owner IS NULL",
                        &[],
                    )
                    .await?;
                Arc::new(move |_, _| {
                    let registry = Arc::clone(&registry);
                    Box::pin(async move {
                        let claims = registry
                            .claim_runnable("bench-idle", Duration::from_secs(600), 10)
                            .await?;
                        if !claims.is_empty() {
                            return Err("the idle poll found runnable work".into());
                        }
                        Ok(1)
                    })
                })
            }
            Workload::List(_) => Arc::new(move |_, _| {
                let registry = Arc::clone(&registry);
                Box::pin(async move {
                    registry
                        .list_processes(ProcessFilter {
                            limit: Some(50),
                            ..ProcessFilter::default()
                        })
                        .await?;
                    Ok(1)
                })
            }),
        })
    }
}

fn row(workload: Workload, postgres: &Measured, citus: &Measured) -> Row {
    let cpu: Vec<String> = citus
        .cpu_ms_per_op
        .iter()
        .map(|(node, ms)| format!("{node} {ms:.3}"))
        .collect();
    Row::new(workload.name(), workload.concurrency())
        .rates(Some(postgres.rate), citus.rate)
        .latency(&citus.latency)
        .note(format!(
            "baseline = the same on one Postgres (its p99 {:.2} ms); Citus CPU ms/op: {}",
            postgres.latency.p99,
            cpu.join(", ")
        ))
}

/// The data directory of a node.
fn data_dir(node: &LocalPostgres) -> PathBuf {
    node.dir().join("data")
}

/// CPU seconds of the cluster in `data_dir`: the postmaster (with the backends it reaped) and
/// its live children. 0 when it cannot be read (not Linux).
fn node_cpu_seconds(data_dir: &Path) -> f64 {
    let Some(postmaster) = std::fs::read_to_string(data_dir.join("postmaster.pid"))
        .ok()
        .and_then(|text| text.lines().next()?.trim().parse::<u32>().ok())
    else {
        return 0.0;
    };
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut total = 0u64;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Some(fields) = stat_fields(pid) else {
            continue;
        };
        // Fields after the command: state(0) ppid(1) ... utime(11) stime(12) cutime(13)
        // cstime(14).
        let field = |n: usize| {
            fields
                .get(n)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        if pid == postmaster {
            total += field(11) + field(12) + field(13) + field(14);
        } else if field(1) == u64::from(postmaster) {
            total += field(11) + field(12);
        }
    }
    total as f64 / ticks
}

/// The fields of `/proc/<pid>/stat` after the command name.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}
