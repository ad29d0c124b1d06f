//! `InMemoryProcessRegistry`: the registry contract held in a mutex-guarded map.
//!
//! It is the reference model of the contract: the conformance suite runs the same tests against
//! it and against Postgres, so a divergence between the two is a failing test. Its clock is the
//! local clock truncated to microseconds, like Postgres timestamps.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use std::time::Duration;

mod queues;

use async_trait::async_trait;
use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use uuid::Uuid;

use crate::error::{ProcessError, ProcessResult};
use crate::model::{
    AppendOutcome, AppendRequest, ClaimOutcome, Completion, Lease, LeaseFence, LeaseInfo,
    LostOwner, ProcessEvent, ProcessFilter, ProcessId, ProcessPage, ProcessRecord,
    ProcessRegistration, ProcessStatus, PruneReport, RunnableClaim, StartDecision, StartOutcome,
    StartPolicy, Suspension, TerminalRecord, json_equal,
};
use crate::registry::ParentState;
use crate::registry::{ProcessRegistry, RegistryConfig};
use crate::schedule::{ScheduleRecord, ScheduleSpec};
use crate::store::ScheduleProgress;
use crate::store::{
    ClusterStore, PodView, PresenceRecord, PresenceState, ProcessQuery, ProcessSummary,
};
use crate::{ListCursor, validate};

/// A process registry in memory.
///
/// [`InMemoryProcessRegistry::share`] gives another handle on the same store with its own
/// config, the way several pods share one database.
pub struct InMemoryProcessRegistry {
    config: RegistryConfig,
    processes: Arc<Mutex<HashMap<ProcessId, Entry>>>,
    pods: Arc<Mutex<HashMap<String, PodRow>>>,
    /// Start keys by (kind, key), as `proclog.start_keys` holds them. Locked before
    /// `processes` when both are.
    start_keys: Arc<Mutex<HashMap<(String, String), StartKey>>>,
    /// Schedules by id, as `proclog.schedules` holds them.
    schedules: Arc<Mutex<HashMap<String, ScheduleRow>>>,
    /// Controlled queues by name, as `proclog.queues` holds them. Locked before
    /// `processes` when both are.
    queues: Arc<Mutex<HashMap<String, queues::QueueState>>>,
    /// Claims so far: alternates whether controlled queues or the rest are served first.
    claim_rounds: Arc<std::sync::atomic::AtomicU64>,
}

/// The answer to a registration whose id exists: the process when the content is the same,
/// else `Conflict`.
fn existing_start(
    processes: &HashMap<ProcessId, Entry>,
    id: &ProcessId,
    registration: &ProcessRegistration,
) -> ProcessResult<StartOutcome> {
    let record = &processes.get(id).expect("the caller checked").record;
    if crate::registry::same_registration(record, registration) {
        Ok(StartOutcome {
            process: record.clone(),
            decision: StartDecision::Existing,
        })
    } else {
        Err(ProcessError::Conflict { id: id.clone() })
    }
}

/// A start key's row: the process its last accepted start made, and the end of a
/// de-duplication window.
struct StartKey {
    process_id: ProcessId,
    expires_at: Option<DateTime<Utc>>,
}

/// A pod's row, as `proclog.pods` holds it.
struct PodRow {
    presence: PresenceRecord,
    started_at: DateTime<Utc>,
    heartbeat_at: DateTime<Utc>,
    stopped_at: Option<DateTime<Utc>>,
}

struct Entry {
    record: ProcessRecord,
    /// The wake time as `proclog.processes.wake_at` holds it: [`FOREVER`] for a wait on a
    /// message alone (the record shows `None` then).
    wake: Option<DateTime<Utc>>,
    lease_token: Option<Uuid>,
    events: Vec<ProcessEvent>,
    replay_keys: HashMap<String, usize>,
}

fn now() -> DateTime<Utc> {
    Utc::now()
        .duration_trunc(TimeDelta::microseconds(1))
        .expect("the clock is representable")
}

/// 'infinity', as a wake time.
const FOREVER: DateTime<Utc> = DateTime::<Utc>::MAX_UTC;

fn millis_delta(millis: u64) -> TimeDelta {
    TimeDelta::milliseconds(i64::try_from(millis).expect("validated bound"))
}

fn ttl_delta(ttl: Duration) -> TimeDelta {
    TimeDelta::from_std(ttl).expect("validated ttl fits")
}

impl Entry {
    fn set_wake(&mut self, wake: Option<DateTime<Utc>>) {
        self.wake = wake;
        self.record.wake_at = wake.filter(|at| *at != FOREVER);
    }

    fn lease_is_live(&self, at: DateTime<Utc>) -> bool {
        self.lease_token.is_some()
            && self
                .record
                .lease
                .as_ref()
                .is_some_and(|lease| lease.expires_at > at)
    }

    fn fence_holds(&self, fence: &LeaseFence, at: DateTime<Utc>) -> bool {
        self.lease_token == Some(fence.token) && self.lease_is_live(at)
    }

    fn terminal_refusal(&self) -> Option<ProcessError> {
        self.record
            .terminal
            .as_ref()
            .map(|terminal| ProcessError::ProcessTerminal {
                id: self.record.id.clone(),
                state: terminal.state,
            })
    }

    /// The replay decision of CONTRACT §2 for a batch: `None` when no key of the batch is
    /// stored (a new write), otherwise the stored events or `ReplayConflict`.
    fn replay(&self, requests: &[AppendRequest]) -> Option<ProcessResult<Vec<AppendOutcome>>> {
        let stored: Vec<Option<&ProcessEvent>> = requests
            .iter()
            .map(|request| {
                request
                    .replay_key
                    .as_ref()
                    .and_then(|key| self.replay_keys.get(key))
                    .map(|index| &self.events[*index])
            })
            .collect();
        stored.iter().position(Option::is_some)?;
        let mismatched: Vec<&AppendRequest> = requests
            .iter()
            .zip(&stored)
            .filter(|(request, event)| {
                !event.is_some_and(|event| {
                    event.event_type == request.event_type
                        && json_equal(&event.payload, &request.payload)
                })
            })
            .map(|(request, _)| request)
            .collect();
        // The key named is the smallest mismatched key, else the smallest stored key of the
        // batch: the same rule as Postgres's `proclog.append_events`.
        let named = mismatched
            .iter()
            .filter_map(|request| request.replay_key.as_ref())
            .min()
            .or_else(|| {
                requests
                    .iter()
                    .zip(&stored)
                    .filter(|(_, event)| event.is_some())
                    .filter_map(|(request, _)| request.replay_key.as_ref())
                    .min()
            });
        Some(if mismatched.is_empty() {
            Ok(stored
                .into_iter()
                .map(|event| AppendOutcome {
                    event: event.expect("checked above").clone(),
                    replayed: true,
                })
                .collect())
        } else {
            Err(ProcessError::ReplayConflict {
                id: self.record.id.clone(),
                replay_key: named.cloned().unwrap_or_default(),
            })
        })
    }

    /// Grants a new lease (next generation) to `owner`; the caller checked none is live.
    fn grant(&mut self, owner: &str, ttl: Duration, at: DateTime<Utc>) -> Lease {
        let lease = Lease {
            process_id: self.record.id.clone(),
            owner: owner.to_owned(),
            token: Uuid::new_v4(),
            generation: self.record.lease_generation + 1,
            expires_at: at + ttl_delta(ttl),
        };
        self.lease_token = Some(lease.token);
        self.record.lease_generation = lease.generation;
        self.record.lease = Some(LeaseInfo {
            owner: lease.owner.clone(),
            generation: lease.generation,
            expires_at: lease.expires_at,
        });
        if matches!(
            self.record.status,
            ProcessStatus::Pending | ProcessStatus::Waiting
        ) {
            self.record.status = ProcessStatus::Running;
        }
        self.record.updated_at = at;
        lease
    }

    fn push_event(
        &mut self,
        event_type: String,
        payload: serde_json::Value,
        replay_key: Option<String>,
        writer: &str,
        fence: Option<LeaseFence>,
        at: DateTime<Utc>,
    ) -> ProcessEvent {
        self.record.last_seq += 1;
        let event = ProcessEvent {
            process_id: self.record.id.clone(),
            seq: self.record.last_seq,
            event_type,
            payload,
            replay_key,
            occurred_at: at,
            writer: writer.to_owned(),
            lease_generation: fence.map(|fence| fence.generation),
        };
        if let Some(key) = &event.replay_key {
            self.replay_keys.insert(key.clone(), self.events.len());
        }
        // As the trigger `events_record_process_state` does: the first of each kind wins.
        match event.event_type.as_str() {
            crate::reserved::STARTED => {
                self.record.started_at.get_or_insert(at);
            }
            crate::reserved::CANCEL_REQUESTED => {
                self.record
                    .cancel_request
                    .get_or_insert_with(|| event.payload.clone());
            }
            // A message wakes a process waiting for its topic.
            crate::reserved::MESSAGE
                if self.record.waiting_for.is_some()
                    && crate::registry::is_message_of(
                        &event,
                        self.record.waiting_for.as_deref().unwrap_or_default(),
                    )
                    && self.wake.is_some_and(|wake| wake > at) =>
            {
                self.set_wake(Some(at));
            }
            _ => {}
        }
        self.events.push(event.clone());
        self.record.updated_at = at;
        event
    }
}

impl InMemoryProcessRegistry {
    /// Writes the terminal event and column (the completion without its parent's message).
    fn complete_locally(
        &self,
        id: &ProcessId,
        completion: Completion,
    ) -> ProcessResult<ProcessRecord> {
        validate::completion(
            &self.config.writer,
            &completion,
            self.config.max_payload_bytes,
        )?;
        let mut processes = self.lock();
        let entry = processes
            .get_mut(id)
            .ok_or_else(|| ProcessError::NotFound(id.clone()))?;
        if let Some(terminal) = &entry.record.terminal {
            return if terminal.state == completion.state
                && json_equal(&terminal.output, &completion.output)
            {
                Ok(entry.record.clone())
            } else {
                Err(ProcessError::AlreadyTerminal {
                    id: id.clone(),
                    state: terminal.state,
                })
            };
        }
        let at = now();
        if let Some(fence) = &completion.fence
            && !entry.fence_holds(fence, at)
        {
            return Err(ProcessError::LeaseLost { id: id.clone() });
        }
        let event = entry.push_event(
            completion.state.event_type().to_owned(),
            completion.output.clone(),
            None,
            &self.config.writer,
            completion.fence,
            at,
        );
        entry.record.status = completion.state.into();
        entry.record.terminal = Some(TerminalRecord {
            state: completion.state,
            seq: event.seq,
            output: completion.output,
            completed_at: at,
        });
        entry.record.lease = None;
        entry.lease_token = None;
        Ok(entry.record.clone())
    }

    /// An empty registry with `config`.
    pub fn new(config: RegistryConfig) -> Self {
        Self {
            config,
            processes: Arc::new(Mutex::new(HashMap::new())),
            pods: Arc::new(Mutex::new(HashMap::new())),
            start_keys: Arc::new(Mutex::new(HashMap::new())),
            schedules: Arc::new(Mutex::new(HashMap::new())),
            queues: Arc::default(),
            claim_rounds: Arc::default(),
        }
    }

    /// Another registry over the same processes, writing with `config` (another pod).
    pub fn share(&self, config: RegistryConfig) -> Self {
        Self {
            config,
            processes: Arc::clone(&self.processes),
            pods: Arc::clone(&self.pods),
            start_keys: Arc::clone(&self.start_keys),
            schedules: Arc::clone(&self.schedules),
            queues: Arc::clone(&self.queues),
            claim_rounds: Arc::clone(&self.claim_rounds),
        }
    }

    /// The config this registry writes with.
    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ProcessId, Entry>> {
        self.processes
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn lock_schedules(&self) -> std::sync::MutexGuard<'_, HashMap<String, ScheduleRow>> {
        self.schedules
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn lock_pods(&self) -> std::sync::MutexGuard<'_, HashMap<String, PodRow>> {
        self.pods
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

/// The same rules as `proclog.pods` and `proclog.pod_status` (see [`ClusterStore`]).
#[async_trait]
impl ClusterStore for InMemoryProcessRegistry {
    async fn record_presence(&self, presence: &PresenceRecord) -> ProcessResult<()> {
        let at = now();
        let mut pods = self.lock_pods();
        let row = pods.get_mut(&presence.pod_id);
        match row {
            None => {
                pods.insert(
                    presence.pod_id.clone(),
                    PodRow {
                        presence: presence.clone(),
                        started_at: at,
                        heartbeat_at: at,
                        stopped_at: (presence.state == PresenceState::Stopped).then_some(at),
                    },
                );
            }
            Some(row) if row.presence.incarnation == presence.incarnation => {
                let keep = row.presence.state == PresenceState::Stopped
                    || (row.presence.state == PresenceState::Draining
                        && presence.state == PresenceState::Running);
                let state = if keep {
                    row.presence.state
                } else {
                    presence.state
                };
                if row.presence.state != PresenceState::Stopped && state == PresenceState::Stopped {
                    row.stopped_at = Some(at);
                }
                row.presence = PresenceRecord {
                    state,
                    ..presence.clone()
                };
                row.heartbeat_at = at;
            }
            // A new incarnation starts afresh; an old one never touches its successor's row.
            Some(row) if presence.state == PresenceState::Running => {
                *row = PodRow {
                    presence: presence.clone(),
                    started_at: at,
                    heartbeat_at: at,
                    stopped_at: None,
                };
            }
            Some(_) => {}
        }
        Ok(())
    }

    async fn prune_pods(&self, older_than: Duration) -> ProcessResult<u64> {
        let at = now();
        let cutoff = at - TimeDelta::from_std(older_than).unwrap_or(TimeDelta::MAX);
        let mut pods = self.lock_pods();
        let before = pods.len();
        pods.retain(|_, row| {
            let gone = row.presence.state == PresenceState::Stopped || is_gone(row, at);
            !(gone && row.stopped_at.unwrap_or(row.heartbeat_at) < cutoff)
        });
        Ok((before - pods.len()) as u64)
    }

    async fn pods(&self) -> ProcessResult<Vec<PodView>> {
        let at = now();
        let leases: HashMap<String, i64> = self
            .lock()
            .values()
            .filter(|entry| entry.lease_is_live(at) && entry.record.terminal.is_none())
            .filter(|entry| entry.record.disposition != crate::model::Disposition::External)
            .filter_map(|entry| entry.record.lease.as_ref().map(|l| l.owner.clone()))
            .fold(HashMap::new(), |mut held, owner| {
                *held.entry(owner).or_default() += 1;
                held
            });
        let mut views: Vec<PodView> = self
            .lock_pods()
            .values()
            .map(|row| PodView {
                pod_id: row.presence.pod_id.clone(),
                status: if row.presence.state == PresenceState::Stopped {
                    "stopped".into()
                } else if is_gone(row, at) {
                    "gone".into()
                } else {
                    row.presence.state.as_str().into()
                },
                address: row.presence.address.clone(),
                version: row.presence.version.clone(),
                concurrency: row.presence.concurrency,
                started_at: row.started_at,
                heartbeat_at: row.heartbeat_at,
                heartbeat_age_secs: (at - row.heartbeat_at).as_seconds_f64(),
                stopped_at: row.stopped_at,
                leases_held: leases.get(&row.presence.pod_id).copied().unwrap_or(0),
            })
            .collect();
        views.sort_by(|a, b| {
            let ended = |v: &PodView| matches!(v.status.as_str(), "stopped" | "gone");
            (ended(a), &a.pod_id).cmp(&(ended(b), &b.pod_id))
        });
        views.truncate(crate::store::MAX_PODS);
        Ok(views)
    }

    async fn status_counts(&self) -> ProcessResult<Vec<(String, i64)>> {
        let mut counts: std::collections::BTreeMap<String, i64> = Default::default();
        for entry in self.lock().values() {
            *counts
                .entry(entry.record.status.as_str().to_owned())
                .or_default() += 1;
        }
        Ok(counts.into_iter().collect())
    }

    async fn process_summaries(&self, query: &ProcessQuery) -> ProcessResult<Vec<ProcessSummary>> {
        let at = now();
        let limit = query.limit.clamp(1, crate::store::MAX_SUMMARY_PAGE) as usize;
        let processes = self.lock();
        let mut rows: Vec<&Entry> = processes
            .values()
            .filter(|e| {
                query
                    .status
                    .as_deref()
                    .is_none_or(|s| e.record.status.as_str() == s)
            })
            .filter(|e| query.kind.as_deref().is_none_or(|k| e.record.kind == k))
            .filter(|e| {
                query.owner.as_deref().is_none_or(|owner| {
                    e.lease_is_live(at)
                        && e.record.terminal.is_none()
                        && e.record.lease.as_ref().is_some_and(|l| l.owner == owner)
                })
            })
            .filter(|e| {
                query
                    .before
                    .as_ref()
                    .is_none_or(|(at, id)| (e.record.created_at, &e.record.id) < (*at, id))
            })
            .collect();
        rows.sort_by(|a, b| {
            (b.record.created_at, &b.record.id).cmp(&(a.record.created_at, &a.record.id))
        });
        Ok(rows
            .into_iter()
            .take(limit)
            .map(|e| ProcessSummary {
                id: e.record.id.to_string(),
                kind: e.record.kind.clone(),
                status: e.record.status.as_str().to_owned(),
                disposition: e.record.disposition.as_str().to_owned(),
                attempts: e.record.attempts,
                owner: e
                    .lease_is_live(at)
                    .then(|| e.record.lease.as_ref().map(|l| l.owner.clone()))
                    .flatten(),
                lease_generation: e.record.lease_generation,
                last_seq: e.record.last_seq,
                created_at: e.record.created_at,
                updated_at: e.record.updated_at,
            })
            .collect())
    }

    /// Always the schema this binary knows: memory has nothing to migrate.
    async fn schema_version(&self) -> ProcessResult<i32> {
        Ok(crate::pg::migrate::latest_version())
    }

    async fn create_schedule(
        &self,
        spec: &ScheduleSpec,
        first_due: Option<DateTime<Utc>>,
    ) -> ProcessResult<ScheduleRecord> {
        let mut schedules = self.lock_schedules();
        if let Some(existing) = schedules.get(&spec.id) {
            return if crate::schedule::same_spec(&existing.record.spec, spec) {
                Ok(existing.record.clone())
            } else {
                Err(ProcessError::InvalidInput(format!(
                    "schedule {} exists with another definition: delete it first",
                    spec.id
                )))
            };
        }
        if schedules.len() >= crate::store::MAX_SCHEDULES {
            return Err(ProcessError::InvalidInput(format!(
                "there are {} schedules already, the most a store keeps",
                crate::store::MAX_SCHEDULES
            )));
        }
        let record = ScheduleRecord {
            spec: spec.clone(),
            paused: false,
            next_due_at: first_due,
            last_due_at: None,
            last_process_id: None,
            skipped: 0,
            held: false,
            created_at: now(),
        };
        schedules.insert(
            spec.id.clone(),
            ScheduleRow {
                record: record.clone(),
                claim: None,
            },
        );
        Ok(record)
    }

    async fn get_schedule(&self, id: &str) -> ProcessResult<Option<ScheduleRecord>> {
        Ok(self.lock_schedules().get(id).map(|row| row.record.clone()))
    }

    async fn list_schedules(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> ProcessResult<Vec<ScheduleRecord>> {
        let schedules = self.lock_schedules();
        let mut page: Vec<ScheduleRecord> = schedules
            .values()
            .filter(|row| after.is_none_or(|after| row.record.spec.id.as_str() > after))
            .map(|row| row.record.clone())
            .collect();
        page.sort_by(|a, b| a.spec.id.cmp(&b.spec.id));
        page.truncate(limit.clamp(1, crate::store::MAX_SCHEDULE_PAGE) as usize);
        Ok(page)
    }

    async fn delete_schedule(&self, id: &str) -> ProcessResult<bool> {
        Ok(self.lock_schedules().remove(id).is_some())
    }

    async fn pause_schedule(
        &self,
        id: &str,
        paused: bool,
        next_due: Option<DateTime<Utc>>,
    ) -> ProcessResult<Option<ScheduleRecord>> {
        let mut schedules = self.lock_schedules();
        let Some(row) = schedules.get_mut(id) else {
            return Ok(None);
        };
        // A pause or a resume ends a hold (a resumed schedule starts afresh from now).
        row.record.held &= !paused && !row.record.paused;
        if row.record.paused && !paused {
            row.record.next_due_at = next_due;
        }
        row.record.paused = paused;
        row.claim = None;
        Ok(Some(row.record.clone()))
    }

    async fn claim_due_schedules(
        &self,
        owner: &str,
        ttl: Duration,
        limit: u32,
    ) -> ProcessResult<(Vec<ScheduleRecord>, DateTime<Utc>)> {
        let at = now();
        let mut schedules = self.lock_schedules();
        let mut due: Vec<&mut ScheduleRow> = schedules
            .values_mut()
            .filter(|row| {
                !row.record.paused
                    && row.record.next_due_at.is_some_and(|due| due <= at)
                    && row.claim.as_ref().is_none_or(|(_, until)| *until <= at)
            })
            .collect();
        due.sort_by_key(|row| row.record.next_due_at);
        due.truncate(limit.clamp(1, crate::store::MAX_SCHEDULE_PAGE) as usize);
        let until = TimeDelta::from_std(ttl)
            .ok()
            .and_then(|ttl| at.checked_add_signed(ttl))
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        let claimed = due
            .into_iter()
            .map(|row| {
                row.claim = Some((owner.to_owned(), until));
                row.record.clone()
            })
            .collect();
        Ok((claimed, at))
    }

    async fn advance_schedule(
        &self,
        id: &str,
        owner: &str,
        expected: Option<DateTime<Utc>>,
        progress: &ScheduleProgress,
    ) -> ProcessResult<bool> {
        let mut schedules = self.lock_schedules();
        let Some(row) = schedules.get_mut(id) else {
            return Ok(false);
        };
        let claimed = row.claim.as_ref().is_some_and(|(by, _)| by == owner);
        if !claimed || row.record.paused || row.record.next_due_at != expected {
            return Ok(false);
        }
        row.record.next_due_at = progress.next_due_at;
        row.record.skipped += progress.skipped;
        if let Some((due, process)) = &progress.last {
            row.record.last_due_at = Some(*due);
            row.record.last_process_id = Some(process.clone());
        }
        row.record.held = progress.held;
        row.claim = progress.held.then(|| {
            let recheck = TimeDelta::from_std(crate::store::HELD_RECHECK).expect("a second");
            (String::new(), now() + recheck)
        });
        Ok(true)
    }

    async fn next_schedule_due(&self) -> ProcessResult<Option<DateTime<Utc>>> {
        Ok(self
            .lock_schedules()
            .values()
            .filter(|row| !row.record.paused)
            .filter_map(|row| {
                let due = row.record.next_due_at?;
                Some(row.claim.as_ref().map_or(due, |(_, until)| due.max(*until)))
            })
            .min())
    }

    async fn set_queue(
        &self,
        queue: &str,
        limits: &crate::queue::QueueLimits,
    ) -> ProcessResult<crate::queue::QueueRecord> {
        crate::queue::queue_name(queue)?;
        limits.validate()?;
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        if !queues.contains_key(queue) && queues.len() >= crate::queue::MAX_QUEUES {
            return Err(ProcessError::InvalidInput(format!(
                "at most {} queues may have limits: remove one first",
                crate::queue::MAX_QUEUES
            )));
        }
        let at = now();
        let state = queues.entry(queue.to_owned()).or_insert_with(|| {
            queues::QueueState::new(crate::queue::QueueRecord {
                queue: queue.to_owned(),
                limits: limits.clone(),
                cursor_key: None,
                updated_at: at,
            })
        });
        state.record.limits = limits.clone();
        state.record.updated_at = at;
        Ok(state.record.clone())
    }

    async fn get_queue(&self, queue: &str) -> ProcessResult<Option<crate::queue::QueueView>> {
        let queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        let Some(state) = queues.get(queue) else {
            return Ok(None);
        };
        let processes = self.lock();
        Ok(Some(crate::queue::QueueView {
            record: state.record.clone(),
            keys: queues::load(queue, &processes, now()),
        }))
    }

    async fn list_queues(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> ProcessResult<Vec<crate::queue::QueueRecord>> {
        crate::queue::page_limit(limit)?;
        let queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        let mut records: Vec<_> = queues
            .values()
            .filter(|state| after.is_none_or(|after| state.record.queue.as_str() > after))
            .map(|state| state.record.clone())
            .collect();
        records.sort_by(|a, b| a.queue.cmp(&b.queue));
        records.truncate(limit as usize);
        Ok(records)
    }

    async fn delete_queue(&self, queue: &str) -> ProcessResult<bool> {
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        Ok(queues.remove(queue).is_some())
    }
}

/// A schedule's row: the record and its claim (owner, until).
struct ScheduleRow {
    record: ScheduleRecord,
    claim: Option<(String, DateTime<Utc>)>,
}

/// A row whose heartbeat is three periods old.
fn is_gone(row: &PodRow, at: DateTime<Utc>) -> bool {
    let period = TimeDelta::from_std(row.presence.heartbeat_every).unwrap_or(TimeDelta::MAX);
    row.heartbeat_at < at - period * 3
}

#[async_trait]
impl ProcessRegistry for InMemoryProcessRegistry {
    async fn register_process(
        &self,
        registration: ProcessRegistration,
    ) -> ProcessResult<ProcessRecord> {
        self.start_process(registration)
            .await
            .map(|started| started.process)
    }

    async fn start_process(
        &self,
        mut registration: ProcessRegistration,
    ) -> ProcessResult<StartOutcome> {
        validate::registration(&registration, self.config.max_payload_bytes)?;
        let id = registration.id.clone().unwrap_or_else(ProcessId::generate);
        // Keys before processes, always: starts of one key are decided one at a time.
        let mut keys = self
            .start_keys
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let mut processes = self.lock();

        if let Some(parent) = &registration.parent {
            let state = processes.get(parent).map(|entry| ParentState {
                ended: entry.record.terminal.is_some(),
                cancelling: entry.record.cancel_request.is_some(),
            });
            let live = state.is_some_and(|state| !state.ended && !state.cancelling);
            if !live
                && state.is_some()
                && processes
                    .get(&id)
                    .is_some_and(|entry| entry.record.parent.as_ref() == Some(parent))
            {
                return existing_start(&processes, &id, &registration);
            }
            crate::registry::check_parent(&id, parent, state)?;
        }
        let at = now();
        let policy = registration.start_policy.clone();
        if let Some(policy) = &policy {
            let slot = (registration.kind.clone(), policy.key().to_owned());
            let window = millis_delta(policy.window_ms());
            if keys.get(&slot).is_some_and(|key| key.process_id == id)
                && processes.contains_key(&id)
            {
                return existing_start(&processes, &id, &registration);
            }
            if let Some(key) = keys.get(&slot)
                && let Some(entry) = processes.get_mut(&key.process_id)
            {
                let live = entry.record.terminal.is_none();
                let unstarted = live
                    && entry.record.status == ProcessStatus::Pending
                    && entry.record.started_at.is_none()
                    && entry.lease_token.is_none();
                let decision = match policy {
                    StartPolicy::Deduplicate { .. }
                        if key.expires_at.is_some_and(|end| end > at) =>
                    {
                        Some(StartDecision::Deduplicated)
                    }
                    StartPolicy::Singleton { refuse: true, .. } if live => {
                        return Err(ProcessError::StartRefused {
                            key: policy.key().to_owned(),
                            existing: key.process_id.clone(),
                        });
                    }
                    StartPolicy::Singleton { .. } if live => Some(StartDecision::Running),
                    StartPolicy::Debounce { .. } if unstarted => {
                        let requested = registration
                            .start_at
                            .or_else(|| registration.start_in_ms.map(|ms| at + millis_delta(ms)));
                        let wake = requested.map_or(at + window, |wake| wake.max(at + window));
                        if let (Some(deadline), Some(old)) = (entry.record.deadline, entry.wake) {
                            entry.record.deadline = Some(deadline + (wake - old));
                        }
                        entry.record.input = registration.input.clone();
                        entry.record.wake_at = Some(wake);
                        entry.wake = Some(wake);
                        entry.record.updated_at = at;
                        Some(StartDecision::Debounced)
                    }
                    _ => None,
                };
                if let Some(decision) = decision {
                    let process = entry.record.clone();
                    if decision == StartDecision::Debounced {
                        keys.insert(
                            slot,
                            StartKey {
                                process_id: process.id.clone(),
                                expires_at: None,
                            },
                        );
                    }
                    return Ok(StartOutcome { process, decision });
                }
            }
            if processes.contains_key(&id) {
                return existing_start(&processes, &id, &registration);
            }
            if let StartPolicy::Debounce { .. } = policy {
                let requested = registration
                    .start_at
                    .or_else(|| registration.start_in_ms.map(|ms| at + millis_delta(ms)));
                registration.start_at =
                    Some(requested.map_or(at + window, |wake| wake.max(at + window)));
                registration.start_in_ms = None;
            }
            keys.insert(
                slot,
                StartKey {
                    process_id: id.clone(),
                    expires_at: matches!(policy, StartPolicy::Deduplicate { .. })
                        .then(|| at + window),
                },
            );
        }
        if processes.contains_key(&id) {
            return existing_start(&processes, &id, &registration);
        }
        if let Some(parent) = &registration.parent {
            processes
                .get_mut(parent)
                .expect("checked above")
                .record
                .has_children = true;
        }
        let wake = registration
            .start_at
            .or_else(|| registration.start_in_ms.map(|ms| at + millis_delta(ms)));
        let deadline = registration
            .deadline
            .or_else(|| registration.timeout_ms.map(|ms| at + millis_delta(ms)));
        let kind = registration.kind;
        let record = ProcessRecord {
            id: id.clone(),
            kind: kind.clone(),
            input: registration.input,
            disposition: registration.disposition,
            status: ProcessStatus::Pending,
            last_seq: 0,
            created_at: at,
            updated_at: at,
            lease_generation: 0,
            attempts: 0,
            lease: None,
            terminal: None,
            started_at: None,
            cancel_request: None,
            wake_at: wake,
            waiting_for: None,
            deadline,
            retries: 0,
            retry_policy: registration.retry,
            trace_parent: registration.trace_parent,
            parent: registration.parent,
            has_children: false,
            queue: registration.queue.unwrap_or_else(|| kind.clone()),
            concurrency_key: registration.concurrency_key,
            priority: registration.priority,
        };
        processes.insert(
            id,
            Entry {
                record: record.clone(),
                wake,
                lease_token: None,
                events: Vec::new(),
                replay_keys: HashMap::new(),
            },
        );
        Ok(StartOutcome {
            process: record,
            decision: StartDecision::Created,
        })
    }

    async fn get_process(&self, id: &ProcessId) -> ProcessResult<Option<ProcessRecord>> {
        Ok(self.lock().get(id).map(|entry| entry.record.clone()))
    }

    async fn list_processes(&self, filter: ProcessFilter) -> ProcessResult<ProcessPage> {
        let limit = validate::list_filter(&filter)? as usize;
        let mut matching: Vec<ProcessRecord> = self
            .lock()
            .values()
            .map(|entry| &entry.record)
            .filter(|record| {
                filter.status.is_none_or(|status| record.status == status)
                    && filter.kind.as_ref().is_none_or(|kind| &record.kind == kind)
                    && filter
                        .parent
                        .as_ref()
                        .is_none_or(|parent| record.parent.as_ref() == Some(parent))
                    && filter
                        .created_after
                        .is_none_or(|after| record.created_at >= after)
                    && filter
                        .created_before
                        .is_none_or(|before| record.created_at < before)
                    && filter.after.as_ref().is_none_or(|cursor| {
                        (record.created_at, &record.id) > (cursor.created_at, &cursor.id)
                    })
            })
            .cloned()
            .collect();
        matching.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        // The page budget, as in Postgres: records are taken while the inputs and outputs
        // before them add up to less than it.
        let size = |value: &serde_json::Value| serde_json::to_vec(value).map_or(0, |t| t.len());
        let mut bytes = 0usize;
        let within_budget = matching
            .iter()
            .take_while(|record| {
                let take = bytes < self.config.max_page_bytes;
                bytes +=
                    size(&record.input) + record.terminal.as_ref().map_or(0, |t| size(&t.output));
                take
            })
            .count();
        let has_more = matching.len() > limit.min(within_budget);
        matching.truncate(limit.min(within_budget));
        let next = has_more.then(|| {
            let last = matching.last().expect("a full page is not empty");
            ListCursor {
                created_at: last.created_at,
                id: last.id.clone(),
            }
        });
        Ok(ProcessPage {
            processes: matching,
            next,
        })
    }

    async fn append_events(
        &self,
        id: &ProcessId,
        requests: Vec<AppendRequest>,
    ) -> ProcessResult<Vec<AppendOutcome>> {
        validate::append_batch(
            &self.config.writer,
            &requests,
            self.config.max_payload_bytes,
        )?;
        let mut processes = self.lock();
        let entry = processes
            .get_mut(id)
            .ok_or_else(|| ProcessError::NotFound(id.clone()))?;
        if let Some(replayed) = entry.replay(&requests) {
            return replayed;
        }
        if let Some(refusal) = entry.terminal_refusal() {
            return Err(refusal);
        }
        let at = now();
        let fence = requests[0].fence;
        if let Some(fence) = &fence
            && !entry.fence_holds(fence, at)
        {
            return Err(ProcessError::LeaseLost { id: id.clone() });
        }
        if entry.record.status == ProcessStatus::Pending {
            entry.record.status = ProcessStatus::Running;
        }
        let writer = self.config.writer.as_str();
        Ok(requests
            .into_iter()
            .map(|request| AppendOutcome {
                event: entry.push_event(
                    request.event_type,
                    request.payload,
                    request.replay_key,
                    writer,
                    fence,
                    at,
                ),
                replayed: false,
            })
            .collect())
    }

    async fn events_after(
        &self,
        id: &ProcessId,
        after_seq: i64,
        limit: u32,
    ) -> ProcessResult<Vec<ProcessEvent>> {
        validate::events_after(after_seq, limit)?;
        let processes = self.lock();
        let entry = processes
            .get(id)
            .ok_or_else(|| ProcessError::NotFound(id.clone()))?;
        let budget = self.config.max_page_bytes;
        let mut bytes = 0usize;
        let mut page = Vec::new();
        for event in entry
            .events
            .iter()
            .filter(|event| event.seq > after_seq)
            .take(limit as usize)
        {
            if bytes >= budget {
                break;
            }
            bytes += serde_json::to_vec(&event.payload).map_or(0, |text| text.len());
            page.push(event.clone());
        }
        Ok(page)
    }

    async fn complete_process(
        &self,
        id: &ProcessId,
        completion: Completion,
    ) -> ProcessResult<ProcessRecord> {
        let record = self.complete_locally(id, completion)?;
        crate::registry::tell_parent(self, &record).await;
        Ok(record)
    }

    async fn claim(
        &self,
        id: &ProcessId,
        owner: &str,
        ttl: Duration,
    ) -> ProcessResult<ClaimOutcome> {
        validate::claim(owner, ttl)?;
        let mut processes = self.lock();
        let entry = processes
            .get_mut(id)
            .ok_or_else(|| ProcessError::NotFound(id.clone()))?;
        if let Some(refusal) = entry.terminal_refusal() {
            return Err(refusal);
        }
        let at = now();
        if entry.lease_is_live(at) {
            let held = entry
                .record
                .lease
                .as_ref()
                .expect("a live lease is recorded");
            return Ok(ClaimOutcome::Busy {
                holder: held.owner.clone(),
                expires_at: held.expires_at,
            });
        }
        Ok(ClaimOutcome::Acquired(entry.grant(owner, ttl, at)))
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> ProcessResult<Lease> {
        validate::lease_ttl(ttl)?;
        let mut processes = self.lock();
        let entry = processes
            .get_mut(&lease.process_id)
            .ok_or_else(|| ProcessError::NotFound(lease.process_id.clone()))?;
        let at = now();
        if !entry.fence_holds(&lease.fence(), at) {
            return Err(ProcessError::LeaseLost {
                id: lease.process_id.clone(),
            });
        }
        let mut expires_at = at + ttl_delta(ttl);
        if let Some(recorded) = entry.record.lease.as_mut() {
            expires_at = expires_at.max(recorded.expires_at);
            recorded.expires_at = expires_at;
        }
        Ok(Lease {
            expires_at,
            ..lease.clone()
        })
    }

    async fn release(&self, lease: &Lease) -> ProcessResult<()> {
        let mut processes = self.lock();
        if let Some(entry) = processes.get_mut(&lease.process_id)
            && entry.lease_token == Some(lease.token)
        {
            entry.lease_token = None;
            entry.record.lease = None;
            if entry.record.status == ProcessStatus::Running && entry.wake.is_some() {
                entry.record.status = ProcessStatus::Waiting;
            }
        }
        Ok(())
    }

    async fn claim_runnable(
        &self,
        owner: &str,
        ttl: Duration,
        limit: u32,
    ) -> ProcessResult<Vec<RunnableClaim>> {
        validate::claim_runnable(owner, ttl, limit)?;
        let at = now();
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        let mut processes = self.lock();
        let round = self
            .claim_rounds
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Controlled queues and the rest take turns at being served first.
        let controlled_first = !queues.is_empty() && round % 2 == 1;
        let mut chosen: Vec<ProcessId> = Vec::new();
        if controlled_first {
            chosen = queues::choose(
                &mut queues,
                &processes,
                owner,
                limit as usize,
                at,
                round / 2,
            );
        }
        // The rest in Postgres's order: past the deadline in any queue (earliest first), then
        // runnable outside controlled queues in the order it became runnable (its wake time,
        // else its creation).
        let rank = |entry: &Entry| -> Option<(u8, DateTime<Utc>)> {
            let record = &entry.record;
            if queues::overdue(entry, at) {
                // Failed whatever the limits: the claim runs no engine.
                return record.deadline.map(|deadline| (0, deadline));
            }
            (queues::runnable(entry, at) && !queues.contains_key(&record.queue))
                .then(|| (1, entry.wake.unwrap_or(record.created_at)))
        };
        let mut runnable: Vec<((u8, DateTime<Utc>), &ProcessId)> = processes
            .values()
            .filter_map(|entry| rank(entry).map(|rank| (rank, &entry.record.id)))
            .collect();
        runnable.sort();
        let free = limit as usize - chosen.len();
        chosen.extend(runnable.into_iter().take(free).map(|(_, id)| id.clone()));
        let free = limit as usize - chosen.len();
        if !controlled_first && free > 0 {
            chosen.extend(queues::choose(
                &mut queues,
                &processes,
                owner,
                free,
                at,
                round / 2,
            ));
        }
        drop(queues);
        let mut claims: Vec<RunnableClaim> = Vec::with_capacity(chosen.len());
        for id in &chosen {
            let Some(entry) = processes.get_mut(id) else {
                continue;
            };
            claims.push({
                let lost_owner = entry.record.lease.as_ref().map(|lost| LostOwner {
                    owner: lost.owner.clone(),
                    generation: lost.generation,
                    expired_at: lost.expires_at,
                });
                let resumed =
                    entry.record.status == ProcessStatus::Waiting && entry.record.attempts > 0;
                let lease = entry.grant(owner, ttl, at);
                entry.record.status = ProcessStatus::Running;
                if !resumed {
                    entry.record.attempts += 1;
                }
                entry.set_wake(None);
                entry.record.waiting_for = None;
                RunnableClaim {
                    lease,
                    process: entry.record.clone(),
                    lost_owner,
                    resumed,
                }
            });
        }
        claims.sort_by(|a, b| {
            (a.process.created_at, &a.process.id).cmp(&(b.process.created_at, &b.process.id))
        });
        Ok(claims)
    }

    async fn next_wake(&self) -> ProcessResult<Option<Duration>> {
        let at = now();
        Ok(self
            .lock()
            .values()
            .filter(|entry| entry.record.terminal.is_none())
            .filter_map(|entry| {
                let runs = entry.record.disposition != crate::Disposition::External;
                if entry.lease_is_live(at) {
                    return runs
                        .then(|| entry.record.lease.as_ref().map(|lease| lease.expires_at))
                        .flatten();
                }
                let wake = entry.wake.filter(|wake| runs && *wake != FOREVER);
                [wake, entry.record.deadline].into_iter().flatten().min()
            })
            .min()
            .map(|next| (next - at).to_std().unwrap_or_default()))
    }

    async fn suspend(&self, lease: &Lease, suspension: Suspension) -> ProcessResult<ProcessRecord> {
        validate::suspension(&suspension, self.config.max_payload_bytes)?;
        let id = &lease.process_id;
        let mut processes = self.lock();
        let entry = processes
            .get_mut(id)
            .ok_or_else(|| ProcessError::NotFound(id.clone()))?;
        let key = crate::reserved::waiting_key(lease.generation);
        if entry
            .replay_keys
            .get(&key)
            .is_some_and(|at| entry.events[*at].event_type == crate::reserved::WAITING)
        {
            return Ok(entry.record.clone());
        }
        if let Some(refusal) = entry.terminal_refusal() {
            return Err(refusal);
        }
        let at = now();
        if !entry.fence_holds(&lease.fence(), at) {
            return Err(ProcessError::LeaseLost { id: id.clone() });
        }
        let mut wake = suspension
            .wake_at
            .or_else(|| {
                suspension
                    .delay
                    .map(|delay| at + TimeDelta::from_std(delay).expect("validated bound"))
            })
            .unwrap_or(FOREVER);
        let message_waits = suspension.topic.as_deref().is_some_and(|topic| {
            entry.events.iter().any(|event| {
                event.seq > suspension.after_seq && crate::registry::is_message_of(event, topic)
            })
        });
        if entry.record.cancel_request.is_some() || message_waits {
            wake = wake.min(at);
        }
        let mut payload = match suspension.reason {
            serde_json::Value::Object(map) => map,
            other => {
                let mut map = serde_json::Map::new();
                map.insert("reason".into(), other);
                map
            }
        };
        payload.insert(
            "wake_at".into(),
            if wake == FOREVER {
                serde_json::Value::Null
            } else {
                serde_json::to_value(wake).expect("a time serializes")
            },
        );
        payload.insert("topic".into(), serde_json::json!(suspension.topic));
        entry.push_event(
            crate::reserved::WAITING.to_owned(),
            serde_json::Value::Object(payload),
            Some(key),
            &self.config.writer,
            Some(lease.fence()),
            at,
        );
        entry.record.status = ProcessStatus::Waiting;
        entry.set_wake(Some(wake));
        entry.record.waiting_for = suspension.topic;
        if suspension.retry {
            entry.record.retries += 1;
        }
        entry.record.lease = None;
        entry.lease_token = None;
        Ok(entry.record.clone())
    }

    fn payload_limit(&self) -> usize {
        self.config.max_payload_bytes
    }

    async fn prune_terminal_processes(&self, cutoff: DateTime<Utc>) -> ProcessResult<PruneReport> {
        validate::timestamp("prune cutoff", cutoff)?;
        let mut report = PruneReport::default();
        // Keys before processes, as a start takes them.
        let mut keys = self
            .start_keys
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let mut processes = self.lock();
        processes.retain(|_, entry| {
            let prune = entry
                .record
                .terminal
                .as_ref()
                .is_some_and(|terminal| terminal.completed_at < cutoff);
            if prune {
                report.processes += 1;
                report.events += entry.events.len() as u64;
            }
            !prune
        });
        let at = now();
        keys.retain(|_, key| {
            processes.contains_key(&key.process_id) && key.expires_at.is_none_or(|end| end >= at)
        });
        Ok(report)
    }
}
