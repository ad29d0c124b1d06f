//! The workloads of BENCHMARKS.md, each measured against its baseline in the same run.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::BoxFuture;
use proclog::http::{ApiState, router};
use proclog::pg::{PgProcessRegistry, connect_pool};
use proclog::pod_services::{PodServices, PodServicesOptions};
use proclog::{
    AppendRequest, Completion, Disposition, ProcessId, ProcessRegistration, ProcessRegistry,
    RegistryConfig, TerminalState,
};
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::Plan;
use crate::baseline::{self, BenchResult};
use crate::report::{Latency, Row};

pub(crate) type Op = Arc<dyn Fn(usize, u64) -> BoxFuture<'static, BenchResult<u64>> + Send + Sync>;

/// Runs `op` in `concurrency` closed loops for warmup + measure; returns units per second over
/// the measured window and the latency of every measured call.
pub(crate) async fn closed_loop(
    concurrency: usize,
    plan: Plan,
    op: Op,
) -> BenchResult<(f64, Vec<Duration>)> {
    let start = Instant::now();
    let measured_from = start + plan.warmup;
    let end = measured_from + plan.measure;
    let mut workers = Vec::with_capacity(concurrency);
    for worker in 0..concurrency {
        let op = Arc::clone(&op);
        workers.push(tokio::spawn(async move {
            let mut units = 0u64;
            let mut latencies = Vec::new();
            let mut iteration = 0u64;
            loop {
                let began = Instant::now();
                if began >= end {
                    break;
                }
                let done = op(worker, iteration).await?;
                iteration += 1;
                if began >= measured_from {
                    units += done;
                    latencies.push(began.elapsed());
                }
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((units, latencies))
        }));
    }
    let mut units = 0;
    let mut latencies = Vec::new();
    for worker in workers {
        let (done, mut samples) = worker.await??;
        units += done;
        latencies.append(&mut samples);
    }
    Ok((units as f64 / plan.measure.as_secs_f64(), latencies))
}

/// Opens `size` connections of `pool` at once, so that no measurement pays for connecting.
pub(crate) async fn warm(pool: &deadpool_postgres::Pool, size: usize) -> BenchResult<()> {
    let mut held = Vec::with_capacity(size);
    for _ in 0..size {
        held.push(pool.get().await?);
    }
    Ok(())
}

pub(crate) async fn register_many(
    registry: &dyn ProcessRegistry,
    prefix: &str,
    count: usize,
    disposition: Disposition,
) -> BenchResult<Vec<ProcessId>> {
    let mut ids = Vec::with_capacity(count);
    for n in 0..count {
        let id = ProcessId::new(format!("{prefix}-{n}-{}", uuid::Uuid::new_v4().simple()))?;
        registry
            .register_process(
                ProcessRegistration::new("bench", json!(null))
                    .with_id(id.clone())
                    .with_disposition(disposition),
            )
            .await?;
        ids.push(id);
    }
    Ok(ids)
}

pub(crate) fn payload(i: u64) -> Value {
    json!({"i": i, "note": "a small event payload"})
}

pub(crate) fn registry_op(registry: Arc<dyn ProcessRegistry>, ids: Arc<Vec<ProcessId>>) -> Op {
    Arc::new(move |worker, i| {
        let registry = Arc::clone(&registry);
        let id = ids[worker % ids.len()].clone();
        Box::pin(async move {
            registry
                .append_event(&id, AppendRequest::new("bench", payload(i)))
                .await?;
            Ok(1)
        })
    })
}

pub(crate) fn raw_op(
    pool: deadpool_postgres::Pool,
    sql: &'static str,
    ids: Arc<Vec<ProcessId>>,
) -> Op {
    Arc::new(move |worker, i| {
        let pool = pool.clone();
        let id = ids[worker % ids.len()].clone();
        Box::pin(async move { baseline::append(&pool, sql, id.as_str(), &payload(i)).await })
    })
}

pub(crate) fn pod_options(pool_size: usize) -> PodServicesOptions {
    PodServicesOptions {
        pool_size,
        ..PodServicesOptions::default()
    }
}

/// Measures `ops` in turns (three rounds of each, in order), so that drift during the run
/// (table growth, autovacuum, a neighbour on the machine) falls on every variant alike.
/// Returns each op's mean rate and all its latencies.
pub(crate) async fn interleaved(
    concurrency: usize,
    plan: Plan,
    ops: &[Op],
) -> BenchResult<Vec<(f64, Vec<Duration>)>> {
    const ROUNDS: u32 = 3;
    let slice = Plan {
        measure: plan.measure / ROUNDS,
        warmup: plan.warmup / ROUNDS,
        ..plan
    };
    let mut results: Vec<(f64, Vec<Duration>)> = vec![(0.0, Vec::new()); ops.len()];
    for _ in 0..ROUNDS {
        for (op, result) in ops.iter().zip(results.iter_mut()) {
            let (rate, mut latencies) = closed_loop(concurrency, slice, Arc::clone(op)).await?;
            result.0 += rate / f64::from(ROUNDS);
            result.1.append(&mut latencies);
        }
    }
    Ok(results)
}

/// A pool of `size` connections, all already open.
async fn warm_pool(url: &str, size: usize) -> BenchResult<deadpool_postgres::Pool> {
    let pool = connect_pool(url, size)?;
    warm(&pool, size).await?;
    Ok(pool)
}

pub(crate) async fn warm_registry(url: &str, size: usize) -> BenchResult<Arc<dyn ProcessRegistry>> {
    Ok(Arc::new(PgProcessRegistry::new(
        warm_pool(url, size).await?,
        RegistryConfig::new("bench"),
    )))
}

/// A registry with group commit off: every append a statement of its own.
async fn warm_single_registry(url: &str, size: usize) -> BenchResult<Arc<dyn ProcessRegistry>> {
    Ok(Arc::new(
        PgProcessRegistry::new(warm_pool(url, size).await?, RegistryConfig::new("bench"))
            .with_group_commit(None),
    ))
}

/// Appends with a replay key each (unique per worker and iteration).
fn keyed_registry_op(registry: Arc<dyn ProcessRegistry>, ids: Arc<Vec<ProcessId>>) -> Op {
    Arc::new(move |worker, i| {
        let registry = Arc::clone(&registry);
        let id = ids[worker % ids.len()].clone();
        Box::pin(async move {
            registry
                .append_event(
                    &id,
                    AppendRequest::new("bench", payload(i))
                        .with_replay_key(format!("w{worker}-{i}")),
                )
                .await?;
            Ok(1)
        })
    })
}

/// Workload: group commit on against off (and raw SQL), on own processes, one hot process,
/// and with replay keys.
pub async fn group_commit(url: &str, plan: Plan) -> BenchResult<Vec<Row>> {
    let mut rows = Vec::new();
    let setup = PgProcessRegistry::new(connect_pool(url, 4)?, RegistryConfig::new("setup"));
    for concurrency in [1usize, 16, 64, 256] {
        eprintln!("group commit x{concurrency} ...");
        let ids = Arc::new(register_many(&setup, "g", concurrency, Disposition::External).await?);
        // One connection per closed loop where every append is its own statement (at most
        // 64: the server's connections, not the client, bound the single path); the group
        // path needs only its flushers'.
        let connections = concurrency.min(64);
        let ops = [
            raw_op(
                warm_pool(url, connections).await?,
                baseline::APPEND,
                Arc::clone(&ids),
            ),
            registry_op(
                warm_single_registry(url, connections).await?,
                Arc::clone(&ids),
            ),
            registry_op(warm_registry(url, 4).await?, Arc::clone(&ids)),
        ];
        let mut results = interleaved(concurrency, plan, &ops).await?.into_iter();
        let (raw, _) = results.next().expect("raw");
        let (single, mut single_latency) = results.next().expect("single");
        let (grouped, mut grouped_latency) = results.next().expect("grouped");
        let single_latency = Latency::of(&mut single_latency);
        rows.push(
            Row::new("group commit: on vs off, own processes", concurrency)
                .rates(Some(single), grouped)
                .latency(&Latency::of(&mut grouped_latency))
                .note(format!(
                    "off: p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms; on / raw SQL {:.2}",
                    single_latency.p50,
                    single_latency.p99,
                    single_latency.max,
                    grouped / raw
                )),
        );
    }
    for (name, keyed, processes) in [
        ("group commit: on vs off, one hot process", false, 1usize),
        ("group commit: on vs off, replay keys", true, 64),
    ] {
        let concurrency = 64;
        eprintln!("{name} ...");
        let ids = Arc::new(register_many(&setup, "gh", processes, Disposition::External).await?);
        let op = |registry| {
            if keyed {
                keyed_registry_op(registry, Arc::clone(&ids))
            } else {
                registry_op(registry, Arc::clone(&ids))
            }
        };
        let ops = [
            op(warm_single_registry(url, concurrency).await?),
            op(warm_registry(url, 4).await?),
        ];
        let mut results = interleaved(concurrency, plan, &ops).await?.into_iter();
        let (single, mut single_latency) = results.next().expect("single");
        let (grouped, mut grouped_latency) = results.next().expect("grouped");
        let single_latency = Latency::of(&mut single_latency);
        rows.push(
            Row::new(name, concurrency)
                .rates(Some(single), grouped)
                .latency(&Latency::of(&mut grouped_latency))
                .note(format!(
                    "off: p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms",
                    single_latency.p50, single_latency.p99, single_latency.max
                )),
        );
    }
    Ok(rows)
}

/// Workload 1: single-event appends on distinct processes.
pub async fn single_appends(url: &str, plan: Plan) -> BenchResult<Vec<Row>> {
    let mut rows = Vec::new();
    for concurrency in [1usize, 4, 16, 64] {
        eprintln!("append x{concurrency} ...");
        let setup = PgProcessRegistry::new(connect_pool(url, 4)?, RegistryConfig::new("setup"));
        let ids = Arc::new(register_many(&setup, "a", concurrency, Disposition::External).await?);
        let raw_pool = warm_pool(url, concurrency).await?;
        let registry = warm_registry(url, concurrency).await?;
        let pod = PodServices::start(url, "bench-a", pod_options(concurrency))?;
        warm(pod.pool().expect("postgres"), concurrency).await?;
        pod.listener_ready().await;
        let ops = [
            raw_op(raw_pool.clone(), baseline::APPEND, Arc::clone(&ids)),
            raw_op(raw_pool, baseline::APPEND_NOTIFY_INLINE, Arc::clone(&ids)),
            registry_op(registry, Arc::clone(&ids)),
            registry_op(Arc::clone(&pod.registry), Arc::clone(&ids)),
        ];
        let mut results = interleaved(concurrency, plan, &ops).await?.into_iter();
        let (raw, _) = results.next().expect("raw");
        let (naive, mut naive_latency) = results.next().expect("naive");
        let (plain, mut plain_latency) = results.next().expect("registry");
        let (watched, mut watched_latency) = results.next().expect("watched");
        let stats = pod.link.counters();
        let dropped = stats.dropped;
        let batches = stats.batches.max(1);
        let sent = stats.sent;
        rows.push(
            Row::new("append: registry vs raw SQL", concurrency)
                .rates(Some(raw), plain)
                .latency(&Latency::of(&mut plain_latency)),
        );
        rows.push(
            Row::new("append: NOTIFY sink on vs raw SQL", concurrency)
                .rates(Some(raw), watched)
                .latency(&Latency::of(&mut watched_latency))
                .note(format!(
                    "{:.1} notices per NOTIFY round trip, {dropped} dropped",
                    sent as f64 / batches as f64
                )),
        );
        rows.push(
            Row::new("append: NOTIFY sink on vs off", concurrency).rates(Some(plain), watched),
        );
        rows.push(
            Row::new("append: NOTIFY sink vs naive pg_notify in txn", concurrency)
                .rates(Some(naive), watched)
                .note(format!(
                    "naive p50 {:.2} ms",
                    Latency::of(&mut naive_latency).p50
                )),
        );
    }
    Ok(rows)
}

/// Workload 2: 16 appenders on one process.
pub async fn hot_process(url: &str, plan: Plan) -> BenchResult<Vec<Row>> {
    eprintln!("hot process ...");
    let concurrency = 16;
    let setup = PgProcessRegistry::new(connect_pool(url, 2)?, RegistryConfig::new("setup"));
    let ids = Arc::new(register_many(&setup, "hot", 1, Disposition::External).await?);
    let ops = [
        raw_op(
            warm_pool(url, concurrency).await?,
            baseline::APPEND,
            Arc::clone(&ids),
        ),
        registry_op(warm_registry(url, concurrency).await?, ids),
    ];
    let mut results = interleaved(concurrency, plan, &ops).await?.into_iter();
    let (raw, _) = results.next().expect("raw");
    let (ours, mut latency) = results.next().expect("registry");
    Ok(vec![
        Row::new("hot process: registry vs raw SQL", concurrency)
            .rates(Some(raw), ours)
            .latency(&Latency::of(&mut latency)),
    ])
}

/// Workload 3: `append_events` batches, against raw batches and against single appends.
pub async fn batches(url: &str, plan: Plan) -> BenchResult<Vec<Row>> {
    let concurrency = 4;
    let mut rows = Vec::new();
    let setup = PgProcessRegistry::new(connect_pool(url, 2)?, RegistryConfig::new("setup"));
    let ids = Arc::new(register_many(&setup, "batch", concurrency, Disposition::External).await?);
    let registry = warm_registry(url, concurrency).await?;
    let raw_pool = warm_pool(url, concurrency).await?;
    for size in [10u64, 100] {
        eprintln!("batches of {size} ...");
        let (raw_ids, pool) = (Arc::clone(&ids), raw_pool.clone());
        let raw_batch: Op = Arc::new(move |worker, i| {
            let pool = pool.clone();
            let id = raw_ids[worker].clone();
            Box::pin(async move {
                let payloads: Vec<Value> = (0..size).map(|k| payload(i * 1000 + k)).collect();
                baseline::append_batch(&pool, id.as_str(), &payloads).await
            })
        });
        let (our_ids, our_registry) = (Arc::clone(&ids), Arc::clone(&registry));
        let our_batch: Op = Arc::new(move |worker, i| {
            let registry = Arc::clone(&our_registry);
            let id = our_ids[worker].clone();
            Box::pin(async move {
                let requests = (0..size)
                    .map(|k| AppendRequest::new("bench", payload(i * 1000 + k)))
                    .collect();
                Ok(registry.append_events(&id, requests).await?.len() as u64)
            })
        });
        let single = registry_op(Arc::clone(&registry), Arc::clone(&ids));
        let mut results = interleaved(concurrency, plan, &[raw_batch, our_batch, single])
            .await?
            .into_iter();
        let (raw, _) = results.next().expect("raw");
        let (ours, mut latency) = results.next().expect("ours");
        let (singles, _) = results.next().expect("single");
        rows.push(
            Row::new(
                format!("append_events x{size}: events/s vs raw SQL"),
                concurrency,
            )
            .rates(Some(raw), ours)
            .latency(&Latency::of(&mut latency))
            .note(format!(
                "{:.1}x single appends ({singles:.0}/s)",
                ours / singles
            )),
        );
    }
    Ok(rows)
}

/// Workload 4: `events_after` pages.
pub async fn reads(url: &str, plan: Plan) -> BenchResult<Vec<Row>> {
    let concurrency = 4;
    let registry = warm_registry(url, concurrency).await?;
    let ids = register_many(&*registry, "read", 1, Disposition::External).await?;
    let id = ids[0].clone();
    for chunk in 0..10 {
        let requests = (0..100)
            .map(|k| AppendRequest::new("bench", payload(chunk * 100 + k)))
            .collect();
        registry.append_events(&id, requests).await?;
    }
    let raw_pool = warm_pool(url, concurrency).await?;
    let mut rows = Vec::new();
    for limit in [100u32, 1000] {
        eprintln!("events_after {limit} ...");
        let (pool, raw_id) = (raw_pool.clone(), id.clone());
        let raw_read: Op = Arc::new(move |_, _| {
            let pool = pool.clone();
            let id = raw_id.clone();
            Box::pin(async move { baseline::read(&pool, id.as_str(), i64::from(limit)).await })
        });
        let (our_registry, our_id) = (Arc::clone(&registry), id.clone());
        let our_read: Op = Arc::new(move |_, _| {
            let registry = Arc::clone(&our_registry);
            let id = our_id.clone();
            Box::pin(async move { Ok(registry.events_after(&id, 0, limit).await?.len() as u64) })
        });
        let mut results = interleaved(concurrency, plan, &[raw_read, our_read])
            .await?
            .into_iter();
        let (raw, _) = results.next().expect("raw");
        let (ours, mut latency) = results.next().expect("ours");
        rows.push(
            Row::new(
                format!("events_after {limit}: events/s vs raw SELECT"),
                concurrency,
            )
            .rates(Some(raw), ours)
            .latency(&Latency::of(&mut latency)),
        );
    }
    Ok(rows)
}

/// Workload 5: notice latency, from the append's acknowledgement on pod A to delivery to a
/// subscriber on pod B, at about 1,000 appends/s; alone and beside 16 busy appenders.
pub async fn notice_latency(url: &str, plan: Plan) -> BenchResult<Vec<Row>> {
    let a = PodServices::start(url, "bench-pod-a", pod_options(24))?;
    let b = PodServices::start(url, "bench-pod-b", pod_options(4))?;
    a.listener_ready().await;
    b.listener_ready().await;
    let mut rows = Vec::new();
    for busy in [false, true] {
        eprintln!("notice latency (busy: {busy}) ...");
        let ids = register_many(&*a.registry, "notice", 1, Disposition::External).await?;
        let id = ids[0].clone();
        let acked: Arc<Mutex<HashMap<i64, Instant>>> = Arc::default();
        let subscription = b
            .subscriptions
            .clone()
            .with_safety_poll(Duration::from_secs(3600))
            .subscribe(id.clone(), 0);
        let receiver = tokio::spawn(async move {
            let mut received = Vec::new();
            let mut stream = subscription;
            while let Some(Ok(event)) = stream.next().await {
                received.push((event.seq, Instant::now()));
            }
            received
        });
        let background = if busy {
            let others =
                Arc::new(register_many(&*a.registry, "busy", 16, Disposition::External).await?);
            let op = registry_op(Arc::clone(&a.registry), others);
            let load_plan = Plan {
                warmup: Duration::ZERO,
                measure: plan.warmup + plan.measure + Duration::from_millis(200),
                ..plan
            };
            Some(tokio::spawn(closed_loop(16, load_plan, op)))
        } else {
            None
        };
        let pace = Duration::from_millis(1);
        let started = Instant::now();
        let mut next = tokio::time::Instant::now();
        let total = ((plan.warmup + plan.measure).as_secs_f64() * 1000.0) as u64;
        for i in 0..total {
            let outcome = a
                .registry
                .append_event(&id, AppendRequest::new("tick", payload(i)))
                .await?;
            acked.lock().await.insert(outcome.event.seq, Instant::now());
            next += pace;
            tokio::time::sleep_until(next).await;
        }
        let rate = total as f64 / started.elapsed().as_secs_f64();
        a.registry
            .complete_process(&id, Completion::new(TerminalState::Completed, json!(null)))
            .await?;
        let received = receiver.await?;
        if let Some(load) = background {
            load.await??;
        }
        let acked = acked.lock().await;
        let warm = (plan.warmup.as_secs_f64() * 1000.0) as i64;
        let mut latencies: Vec<Duration> = received
            .iter()
            .filter(|(seq, _)| *seq > warm)
            .filter_map(|(seq, at)| {
                acked
                    .get(seq)
                    .map(|acked_at| at.saturating_duration_since(*acked_at))
            })
            .collect();
        let latency = Latency::of(&mut latencies);
        rows.push(
            Row::new(
                if busy {
                    "notice latency A->B, beside 16 appenders"
                } else {
                    "notice latency A->B"
                },
                1,
            )
            .rates(None, rate)
            .latency(&latency)
            .note(format!("{} events delivered in order", received.len())),
        );
    }
    Ok(rows)
}

/// Workload 6: `await_terminal` wake latency across pods, and the poll cost of many waiters.
pub async fn await_wake(url: &str, plan: Plan) -> BenchResult<Vec<Row>> {
    eprintln!("await_terminal wake ...");
    let a = PodServices::start(url, "bench-pod-a", pod_options(4))?;
    let b = PodServices::start(url, "bench-pod-b", pod_options(4))?;
    a.listener_ready().await;
    b.listener_ready().await;
    let rounds = if plan.waiters >= 10_000 { 300 } else { 60 };
    let ids = register_many(&*a.registry, "wake", rounds, Disposition::External).await?;
    let mut latencies = Vec::with_capacity(rounds);
    for id in &ids {
        let driver = b.driver.clone();
        let waiting = Arc::clone(driver.stats());
        let target = id.clone();
        let waiter = tokio::spawn(async move {
            let result = driver
                .await_terminal(&target, Duration::from_secs(30))
                .await;
            (result, Instant::now())
        });
        while waiting.waiters.load(Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        // Let the waiter's first read pass, as for a waiter that has been waiting a while.
        tokio::time::sleep(Duration::from_millis(30)).await;
        a.registry
            .complete_process(id, Completion::new(TerminalState::Completed, json!(null)))
            .await?;
        let completed = Instant::now();
        let (result, woke) = waiter.await?;
        result?;
        latencies.push(woke.saturating_duration_since(completed));
    }
    let mut rows = vec![
        Row::new("await_terminal wake A->B (with hint)", 1)
            .latency(&Latency::of(&mut latencies))
            .note(format!("{rounds} completions")),
    ];

    eprintln!("{} waiters ...", plan.waiters);
    let many = register_many(&*a.registry, "waiter", plan.waiters, Disposition::External).await?;
    let mut waiters = Vec::with_capacity(many.len());
    for id in &many {
        let driver = b.driver.clone();
        let id = id.clone();
        waiters.push(tokio::spawn(async move {
            driver.await_terminal(&id, Duration::from_secs(3600)).await
        }));
    }
    while b.driver.stats().waiters.load(Ordering::Relaxed) < many.len() as u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Past the backoff ramp, count the queries of a quiet period.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = b.driver.stats().polls.load(Ordering::Relaxed);
    let window = plan.measure.max(Duration::from_secs(3));
    tokio::time::sleep(window).await;
    let polls = b.driver.stats().polls.load(Ordering::Relaxed) - before;
    rows.push(
        Row::new(
            format!("{} idle waiters on one pod: queries/s", plan.waiters),
            plan.waiters,
        )
        .rates(None, polls as f64 / window.as_secs_f64())
        .note("terminal-column queries per second, all waiters together"),
    );
    for waiter in waiters {
        waiter.abort();
    }
    Ok(rows)
}

/// Serves a pod's API on a free loopback port with the pod's own accept loop (keep-alive,
/// `TCP_NODELAY`, its bounds), as `proclog serve` does; returns its base URL.
pub(crate) async fn serve_pod(
    services: Arc<PodServices>,
) -> BenchResult<(String, tokio::task::JoinHandle<()>)> {
    let options = proclog::http::HttpOptions::default();
    let state = ApiState::new(services, None, &options);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(proclog::http::server::serve(
        listener,
        router(state, 1 << 20),
        options.limits.clone(),
        Arc::default(),
        std::future::pending(),
    ));
    Ok((base, server))
}

/// Workload 7: appends over HTTP through one pod and through three.
pub async fn http_appends(url: &str, plan: Plan) -> BenchResult<Vec<Row>> {
    let concurrency = 16;
    eprintln!("HTTP appends ...");
    let setup = PgProcessRegistry::new(connect_pool(url, 2)?, RegistryConfig::new("setup"));
    let ids = Arc::new(register_many(&setup, "http", concurrency, Disposition::External).await?);
    let mut servers = Vec::new();
    let mut bases = Vec::new();
    let mut pods = Vec::new();
    for n in 0..3 {
        let services = Arc::new(PodServices::start(
            url,
            &format!("http-pod-{n}"),
            pod_options(concurrency),
        )?);
        warm(services.pool().expect("postgres"), concurrency).await?;
        pods.push(Arc::clone(&services));
        let (base, server) = serve_pod(services).await?;
        bases.push(base);
        servers.push(server);
    }
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()?;
    let through = |pods: usize| -> Op {
        let client = client.clone();
        let bases = Arc::new(bases[..pods].to_vec());
        let ids = Arc::clone(&ids);
        Arc::new(move |worker, i| {
            let client = client.clone();
            let url = format!(
                "{}/v1/processes/{}/events",
                bases[worker % bases.len()],
                ids[worker]
            );
            Box::pin(async move {
                let response = client
                    .post(url)
                    .json(&json!({"event_type": "bench", "payload": payload(i)}))
                    .send()
                    .await?;
                if !response.status().is_success() {
                    return Err(format!("HTTP {}", response.status()).into());
                }
                Ok(1)
            })
        })
    };
    // `POST /v1/events` with 100 appends, one to each of 100 processes (each appender its own
    // hundred), through one pod.
    let spread =
        Arc::new(register_many(&setup, "httpb", 100 * concurrency, Disposition::External).await?);
    let batched: Op = {
        let client = client.clone();
        let url = format!("{}/v1/events", bases[0]);
        Arc::new(move |worker, i| {
            let (client, url) = (client.clone(), url.clone());
            let appends: Vec<Value> = spread[worker * 100..(worker + 1) * 100]
                .iter()
                .map(|id| json!({"process_id": id, "event_type": "bench", "payload": payload(i)}))
                .collect();
            Box::pin(async move {
                let response = client
                    .post(url)
                    .json(&json!({"appends": appends}))
                    .send()
                    .await?;
                if !response.status().is_success() {
                    return Err(format!("HTTP {}", response.status()).into());
                }
                Ok(100)
            })
        })
    };
    let ops = [
        raw_op(
            warm_pool(url, concurrency).await?,
            baseline::APPEND,
            Arc::clone(&ids),
        ),
        registry_op(Arc::clone(&pods[0].registry), Arc::clone(&ids)),
        through(1),
        through(3),
        batched,
    ];
    let mut results = interleaved(concurrency, plan, &ops).await?.into_iter();
    let (raw, _) = results.next().expect("raw");
    let (library, _) = results.next().expect("library");
    let mut rows = Vec::new();
    for pods in [1, 3] {
        let (ours, mut latency) = results.next().expect("http");
        rows.push(
            Row::new(
                format!("HTTP appends through {pods} pod(s) vs raw SQL"),
                concurrency,
            )
            .rates(Some(raw), ours)
            .latency(&Latency::of(&mut latency))
            .note(format!(
                "{:.2} of the library path through the same pod ({library:.0}/s)",
                ours / library
            )),
        );
    }
    let (ours, mut latency) = results.next().expect("batched");
    rows.push(
        Row::new(
            "HTTP POST /v1/events, 100 processes a request: events/s vs library single appends",
            concurrency,
        )
        .rates(Some(library), ours)
        .latency(&Latency::of(&mut latency)),
    );
    for server in servers {
        server.abort();
    }
    Ok(rows)
}

/// Workload 8: from `kill -9` of a pod to the first event of its process on another pod.
pub async fn kill_recovery(url: &str, plan: Plan) -> BenchResult<Vec<Row>> {
    let exe = std::env::current_exe()?
        .parent()
        .map(|dir| dir.join("proclog"))
        .filter(|path| path.is_file());
    let Some(exe) = exe else {
        return Ok(vec![Row::new("kill -9 -> first recovered event", 1).note(
            "skipped: build the proclog binary first (cargo build --release)",
        )]);
    };
    eprintln!("kill -9 recovery (lease TTL {:?}) ...", plan.lease_ttl);
    let ttl = plan.lease_ttl.as_millis().to_string();
    let mut pods = Vec::new();
    for name in ["kill-a", "kill-b"] {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = tokio::process::Command::new(&exe)
            .args([
                "pod",
                "--demo-engines",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--pod-id",
                name,
            ])
            .args(["--lease-ttl-ms", &ttl])
            .env("DATABASE_URL", url)
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .spawn()?;
        pods.push((name, child));
    }
    let registry = PgProcessRegistry::new(connect_pool(url, 2)?, RegistryConfig::new("bench"));
    let id = registry
        .register_process(ProcessRegistration::new(
            "steps",
            json!({"steps": 10000, "delay_ms": 50}),
        ))
        .await?
        .id;
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let give_up = Instant::now() + Duration::from_secs(60) + plan.lease_ttl * 4;
    let owner = loop {
        if Instant::now() > give_up {
            return Err("the process never started".into());
        }
        let row = client
            .query_one(
                "SELECT lease_owner FROM proclog.processes WHERE process_id = $1 AND last_seq >= 3",
                &[&id.as_str()],
            )
            .await
            .ok();
        if let Some(owner) = row.and_then(|r| r.get::<_, Option<String>>(0)) {
            break owner;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let victim = pods
        .iter_mut()
        .find(|(name, _)| *name == owner)
        .ok_or("owner unknown")?;
    victim.1.start_kill()?;
    let killed = Instant::now();
    loop {
        if Instant::now() > give_up {
            return Err("the process was never taken over".into());
        }
        let taken: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM proclog.events
                  WHERE process_id = $1 AND writer <> $2)",
                &[&id.as_str(), &owner],
            )
            .await?
            .get(0);
        if taken {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = killed.elapsed();
    registry
        .complete_process(
            &id,
            Completion::new(TerminalState::Cancelled, json!("bench over")),
        )
        .await
        .ok();
    Ok(vec![
        Row::new("kill -9 -> first recovered event", 1)
            .latency(&Latency {
                p50: elapsed.as_secs_f64() * 1000.0,
                p99: elapsed.as_secs_f64() * 1000.0,
                max: elapsed.as_secs_f64() * 1000.0,
            })
            .note(format!(
                "one kill, lease TTL {} ms",
                plan.lease_ttl.as_millis()
            )),
    ])
}
