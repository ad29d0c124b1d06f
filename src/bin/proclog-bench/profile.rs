//! `--profile`: one of proclog's append paths alone, in closed loops, for a profiler to watch.
//! It prints its rate and nothing else; the table's figures come from the interleaved runs.

use std::sync::Arc;
use std::time::Duration;

use proclog::pg::{PgProcessRegistry, connect_pool};
use proclog::pod_services::PodServices;
use proclog::{AppendRequest, Disposition, ProcessRegistry, RegistryConfig};

use crate::Plan;
use crate::baseline::{self, BenchResult};
use crate::workloads::{self, Op};

/// Runs `path` with `concurrency` appenders for `window` (after a second of warm-up), with
/// `flushers` group-commit flushers on the `group` path (default: the registry's); returns
/// events per second.
pub async fn run(
    url: &str,
    path: &str,
    concurrency: usize,
    window: Duration,
    flushers: Option<usize>,
) -> BenchResult<f64> {
    let setup = PgProcessRegistry::new(connect_pool(url, 2)?, RegistryConfig::new("setup"));
    let ids = Arc::new(
        workloads::register_many(&setup, "prof", concurrency, Disposition::External).await?,
    );
    let connections = concurrency.min(64);
    let mut pod = None;
    let mut stats = None;
    let op: Op = match path {
        "pod" => {
            let services = PodServices::start(url, "bench-prof", workloads::pod_options(64))?;
            workloads::warm(services.pool().expect("postgres"), 64).await?;
            services.listener_ready().await;
            let op = workloads::registry_op(Arc::clone(&services.registry), ids);
            pod = Some(services);
            op
        }
        "group" => {
            let pool = connect_pool(url, 16)?;
            workloads::warm(&pool, 16).await?;
            let mut registry = PgProcessRegistry::new(pool, RegistryConfig::new("bench"));
            if let Some(flushers) = flushers {
                registry = registry.with_group_commit(Some(proclog::pg::GroupCommitOptions {
                    flushers,
                    ..Default::default()
                }));
            }
            stats = registry.group_commit_stats();
            workloads::registry_op(Arc::new(registry), ids)
        }
        "single" => {
            let pool = connect_pool(url, connections)?;
            workloads::warm(&pool, connections).await?;
            let registry: Arc<dyn ProcessRegistry> = Arc::new(
                PgProcessRegistry::new(pool, RegistryConfig::new("bench")).with_group_commit(None),
            );
            workloads::registry_op(registry, ids)
        }
        "batch" => {
            let registry = workloads::warm_registry(url, connections).await?;
            Arc::new(move |worker, i| {
                let registry = Arc::clone(&registry);
                let id = ids[worker % ids.len()].clone();
                Box::pin(async move {
                    let requests = (0..100)
                        .map(|k| AppendRequest::new("bench", workloads::payload(i * 1000 + k)))
                        .collect();
                    Ok(registry.append_events(&id, requests).await?.len() as u64)
                })
            })
        }
        "http" => {
            let services = Arc::new(PodServices::start(
                url,
                "bench-prof",
                workloads::pod_options(64),
            )?);
            workloads::warm(services.pool().expect("postgres"), 64).await?;
            let (base, _server) = workloads::serve_pod(Arc::clone(&services)).await?;
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(concurrency)
                .build()?;
            Arc::new(move |worker, i| {
                let client = client.clone();
                let url = format!("{base}/v1/processes/{}/events", ids[worker % ids.len()]);
                Box::pin(async move {
                    let response = client
                        .post(url)
                        .json(&serde_json::json!({"event_type": "bench", "payload": workloads::payload(i)}))
                        .send()
                        .await?;
                    if !response.status().is_success() {
                        return Err(format!("HTTP {}", response.status()).into());
                    }
                    Ok(1)
                })
            })
        }
        "raw" => {
            let pool = connect_pool(url, connections)?;
            workloads::warm(&pool, connections).await?;
            workloads::raw_op(pool, baseline::APPEND, ids)
        }
        other => return Err(format!("no profile path {other:?}").into()),
    };
    let plan = Plan {
        measure: window,
        warmup: Duration::from_secs(1),
        waiters: 0,
        lease_ttl: Duration::from_secs(15),
    };
    let (rate, _) = workloads::closed_loop(concurrency, plan, op).await?;
    drop(pod);
    if let Some(stats) = stats {
        let load = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
        eprintln!(
            "group commit: {} appends in {} statements ({:.1} per statement, largest {})",
            load(&stats.enqueued),
            load(&stats.batches),
            load(&stats.enqueued) as f64 / load(&stats.batches).max(1) as f64,
            load(&stats.largest_batch)
        );
    }
    Ok(rate)
}
