//! The cost of schedules (CONTRACT §10): one scheduler tick with 10,000 schedules stored and
//! none due (what every pod pays every second), and ticks that produce the due times of
//! 1,000 schedules come due at once.

use std::time::{Duration, Instant};

use proclog::Proclog;
use proclog::pod::scheduler::{create_schedule, tick};
use proclog::schedule::ScheduleSpec;
use serde_json::json;

use crate::Plan;
use crate::baseline::BenchResult;
use crate::report::{Latency, Row};

pub async fn ticks(url: &str, plan: Plan) -> BenchResult<Vec<Row>> {
    let (stored, due) = if plan.waiters >= 10_000 {
        (10_000, 1_000)
    } else {
        (2_000, 200)
    };
    eprintln!("{stored} schedules, {due} of them come due at once ...");
    let stack = Proclog::builder(url)
        .pod_id("bench-scheduler")
        .start()
        .await?;
    let (store, registry) = (stack.cluster().clone(), stack.registry().clone());
    let pool = proclog::pg::connect_pool(url, 1)?;
    let client = pool.get().await?;
    client
        .batch_execute(
            "DELETE FROM proclog.schedules WHERE schedule_id LIKE 'bench-%';
             DELETE FROM proclog.processes WHERE kind = 'bench-scheduled';",
        )
        .await?;
    for n in 0..stored {
        let spec: ScheduleSpec = serde_json::from_value(json!({
            "id": format!("bench-{n:05}"), "cron": "0 0 1 1 *", "kind": "bench-scheduled",
            "input": {"n": n}, "disposition": "external", "overlap": "allow",
        }))?;
        create_schedule(store.as_ref(), registry.as_ref(), &spec).await?;
    }
    client
        .batch_execute("VACUUM ANALYZE proclog.schedules")
        .await?;

    // Nothing due: the claim and the look at the next due time, as a pod's loop does.
    let mut idle = Vec::new();
    let until = Instant::now() + plan.measure;
    while Instant::now() < until || idle.len() < 20 {
        let started = Instant::now();
        tick(store.as_ref(), registry.as_ref(), "bench-scheduler").await?;
        store.next_schedule_due().await?;
        idle.push(started.elapsed());
    }
    let idle_ticks = idle.len();

    // `due` schedules come due at once (due at the top of every minute, the current one
    // not produced yet); ticks produce them until none is due.
    client
        .execute(
            "UPDATE proclog.schedules
                SET cron = '0 * * * * *', next_due_at = date_trunc('minute', now())
              WHERE schedule_id IN (SELECT schedule_id FROM proclog.schedules
                                     WHERE schedule_id LIKE 'bench-%'
                                     ORDER BY schedule_id LIMIT $1)",
            &[&(due as i64)],
        )
        .await?;
    let mut busy = Vec::new();
    let started = Instant::now();
    let mut produced = 0;
    loop {
        let tick_started = Instant::now();
        let report = tick(store.as_ref(), registry.as_ref(), "bench-scheduler").await?;
        if report.schedules == 0 {
            break;
        }
        busy.push(tick_started.elapsed());
        produced += report.produced;
    }
    let elapsed = started.elapsed().max(Duration::from_micros(1));
    client
        .batch_execute(
            "DELETE FROM proclog.schedules WHERE schedule_id LIKE 'bench-%';
             DELETE FROM proclog.processes WHERE kind = 'bench-scheduled';",
        )
        .await?;
    stack.shutdown().await;
    Ok(vec![
        Row::new("schedule tick, none due", 1)
            .latency(&Latency::of(&mut idle))
            .note(format!(
                "{stored} schedules stored; a claim and the next due time ({idle_ticks} ticks)"
            )),
        Row::new("schedule ticks producing due times", 1)
            .rates(None, produced as f64 / elapsed.as_secs_f64())
            .latency(&Latency::of(&mut busy))
            .note(format!(
                "{produced} processes of {due} schedules due at once, 20 per tick; per second"
            )),
    ])
}
