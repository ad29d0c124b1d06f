//! A pod's scheduler: produces the processes of due schedules (CONTRACT §10). Every pod runs
//! one; they share the work through short claims on the schedules' rows, and a due time makes
//! one process whoever produces it (its id is derived from the schedule and the due time).

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::error::{ProcessError, ProcessResult};
use crate::model::ProcessRecord;
use crate::registry::ProcessRegistry;
use crate::schedule::{Cron, ScheduleRecord, ScheduleSpec, due_process_id, plan_tick};
use crate::store::{ClusterStore, ScheduleProgress};

/// How long a pod holds the schedules it claimed (a tick takes far less; a pod that dies
/// holding one delays its due times by this much at most).
pub const SCHEDULE_CLAIM_TTL: Duration = Duration::from_secs(30);

/// Most schedules one tick claims (a tick looks at up to 1,000 due times of each: twenty keep
/// it well within its claim).
pub const SCHEDULES_PER_TICK: u32 = 20;

/// What one tick did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TickReport {
    /// Schedules claimed.
    pub schedules: usize,
    /// Processes registered (or found registered: a due time another claim produced).
    pub produced: usize,
    /// Due times skipped by a policy.
    pub skipped: i64,
}

/// Claims the due schedules (at most [`SCHEDULES_PER_TICK`]) as `owner` and produces their
/// due times. A schedule that fails (its store write, a registration) is left to its claim's
/// expiry: the next tick after it produces the same due times, which answer the processes
/// already made.
pub async fn tick(
    store: &dyn ClusterStore,
    registry: &dyn ProcessRegistry,
    owner: &str,
) -> ProcessResult<TickReport> {
    let (due, now) = store
        .claim_due_schedules(owner, SCHEDULE_CLAIM_TTL, SCHEDULES_PER_TICK)
        .await?;
    let mut report = TickReport {
        schedules: due.len(),
        ..TickReport::default()
    };
    for schedule in due {
        match tick_one(store, registry, owner, &schedule, now).await {
            Ok((produced, skipped)) => {
                report.produced += produced;
                report.skipped += skipped;
            }
            Err(err) => tracing::warn!(
                schedule = %schedule.spec.id, error = %err,
                "a schedule's tick failed; its claim lapses and a later tick produces it"
            ),
        }
    }
    Ok(report)
}

async fn tick_one(
    store: &dyn ClusterStore,
    registry: &dyn ProcessRegistry,
    owner: &str,
    schedule: &ScheduleRecord,
    now: chrono::DateTime<Utc>,
) -> ProcessResult<(usize, i64)> {
    let cron = Cron::parse(&schedule.spec.cron, &schedule.spec.time_zone)?;
    let previous_running = match &schedule.last_process_id {
        Some(id) => registry
            .get_process(id)
            .await?
            .is_some_and(|record| record.terminal.is_none()),
        None => false,
    };
    let plan = plan_tick(schedule, &cron, now, previous_running);
    let mut last = None;
    for due in &plan.run {
        let id = due_process_id(&schedule.spec.id, *due);
        produce(registry, &schedule.spec, id.clone()).await?;
        last = Some((*due, id));
    }
    let progress = ScheduleProgress {
        next_due_at: plan.next_due_at,
        skipped: plan.skipped,
        last,
        held: plan.held,
    };
    if !store
        .advance_schedule(&schedule.spec.id, owner, schedule.next_due_at, &progress)
        .await?
    {
        tracing::debug!(schedule = %schedule.spec.id, "the schedule moved on meanwhile");
    }
    if !plan.run.is_empty() || plan.skipped > 0 {
        tracing::info!(
            schedule = %schedule.spec.id, produced = plan.run.len(), skipped = plan.skipped,
            next_due_at = ?plan.next_due_at, "schedule ticked"
        );
    }
    Ok((plan.run.len(), plan.skipped))
}

/// Registers the process `id` of `spec`. A process of that id with other content (the
/// schedule was deleted and made again with another input) counts as produced.
async fn produce(
    registry: &dyn ProcessRegistry,
    spec: &ScheduleSpec,
    id: crate::ProcessId,
) -> ProcessResult<()> {
    match registry.register_process(spec.registration(id)).await {
        Ok(_) | Err(ProcessError::Conflict { .. }) => Ok(()),
        Err(err) => Err(err),
    }
}

/// Creates a schedule: checks it (its input against the registry's payload limit and
/// [`crate::schedule::MAX_SCHEDULE_INPUT_BYTES`]) and
/// stores it with its first due time after now. Idempotent by id and definition.
pub async fn create_schedule(
    store: &dyn ClusterStore,
    registry: &dyn ProcessRegistry,
    spec: &ScheduleSpec,
) -> ProcessResult<ScheduleRecord> {
    let cron = spec.validate()?;
    crate::validate::payload_bytes(
        &spec.input,
        registry
            .payload_limit()
            .min(crate::schedule::MAX_SCHEDULE_INPUT_BYTES),
    )?;
    store
        .create_schedule(spec, cron.next_after(Utc::now()))
        .await
}

/// Pauses (`true`) or resumes a schedule; a resumed schedule's next due time is the first
/// after now (due times that passed while it was paused are skipped). `ScheduleNotFound`.
pub async fn pause_schedule(
    store: &dyn ClusterStore,
    id: &str,
    paused: bool,
) -> ProcessResult<ScheduleRecord> {
    let not_found = || ProcessError::ScheduleNotFound(id.to_owned());
    let schedule = store.get_schedule(id).await?.ok_or_else(not_found)?;
    let cron = Cron::parse(&schedule.spec.cron, &schedule.spec.time_zone)?;
    store
        .pause_schedule(id, paused, cron.next_after(Utc::now()))
        .await?
        .ok_or_else(not_found)
}

/// Starts a process of the schedule now, outside its due times (`<schedule>.manual.<now>`).
/// `ScheduleNotFound`.
pub async fn trigger_schedule(
    store: &dyn ClusterStore,
    registry: &dyn ProcessRegistry,
    id: &str,
) -> ProcessResult<ProcessRecord> {
    let schedule = store
        .get_schedule(id)
        .await?
        .ok_or_else(|| ProcessError::ScheduleNotFound(id.to_owned()))?;
    let stamp = Utc::now().format("%Y%m%dT%H%M%S%.6fZ");
    let process = crate::ProcessId::new(format!("{id}.manual.{stamp}"))?;
    registry
        .register_process(schedule.spec.registration(process))
        .await
}

/// The scheduler loop of a pod: a tick, then a sleep until the next due time (at most
/// `poll`, so that schedules made by other pods are seen), until `stop`.
pub(crate) async fn run(
    store: Arc<dyn ClusterStore>,
    registry: Arc<dyn ProcessRegistry>,
    owner: String,
    poll: Duration,
    stop: CancellationToken,
) {
    loop {
        if let Err(err) = tick(store.as_ref(), registry.as_ref(), &owner).await {
            tracing::debug!(error = %err, "the scheduler's tick failed; trying again");
        }
        let wait = match store.next_schedule_due().await {
            Ok(Some(due)) => (due - Utc::now())
                .to_std()
                .unwrap_or(poll / 8)
                .clamp(Duration::from_millis(20), poll),
            _ => poll,
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return,
        }
    }
}
