//! Schedules (CONTRACT §10): a stored cron expression in an explicit time zone that yields one
//! process per due time, whatever the number of pods and however long they were all down.
//!
//! A schedule is a row ([`ScheduleRecord`], `proclog.schedules`) with the next due time it
//! has not produced yet. A pod's scheduler ([`crate::pod::scheduler`]) claims due rows for a
//! short while, registers the process of each due time its catch-up and overlap policies
//! allow, and moves the row past them. The process of a due time has an id derived from the
//! schedule and the due time ([`due_process_id`]), so two pods producing the same due time
//! (a claim that lapsed under a slow pod) make one process, and a pod that died between
//! registering and moving the row on registers the same process again, which answers it.

use std::str::FromStr;

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ProcessError;
use crate::model::{Disposition, ProcessId};

/// Most due times one tick of a schedule looks at; a schedule further behind (every second,
/// all pods down for a day) skips the rest as missed and goes on from now.
pub const MAX_DUE_TIMES_PER_TICK: usize = 1_000;

/// Largest schedule input, serialized (a page of schedules stays a few megabytes).
pub const MAX_SCHEDULE_INPUT_BYTES: usize = 16 * 1024;

/// Longest `catch_up_limit`.
pub const MAX_CATCH_UP_LIMIT: u32 = 1_000;

/// Longest `missed_after_ms`: a day.
pub const MAX_MISSED_AFTER_MILLIS: u64 = 24 * 3_600_000;

/// What a due time does while the process of an earlier one has not ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum OverlapPolicy {
    /// It is skipped (no process).
    #[default]
    Skip,
    /// It waits until the earlier process has ended, then runs; due times that pass
    /// meanwhile are folded into it (at most one waits).
    QueueOne,
    /// It runs anyway.
    Allow,
}

impl OverlapPolicy {
    /// Its name as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            OverlapPolicy::Skip => "skip",
            OverlapPolicy::QueueOne => "queue_one",
            OverlapPolicy::Allow => "allow",
        }
    }
}

/// What happens to due times that passed while no pod produced them (all pods down, the
/// schedule claimed by a pod that died): due times older than
/// [`ScheduleSpec::missed_after_ms`] when a pod comes to them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum CatchUpPolicy {
    /// Missed due times make no process.
    #[default]
    SkipMissed,
    /// All the missed due times make one process, for the latest of them.
    RunOnce,
    /// Every missed due time makes its process, the latest `catch_up_limit` of them at most.
    RunAll,
}

impl CatchUpPolicy {
    /// Its name as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            CatchUpPolicy::SkipMissed => "skip_missed",
            CatchUpPolicy::RunOnce => "run_once",
            CatchUpPolicy::RunAll => "run_all",
        }
    }
}

fn default_time_zone() -> String {
    "UTC".into()
}

fn default_catch_up_limit() -> u32 {
    100
}

fn default_missed_after_ms() -> u64 {
    60_000
}

/// A schedule as created: [`ScheduleRecord`] without its progress.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    /// Its id: 1 to 64 characters from `[A-Za-z0-9._:-]`.
    pub id: String,
    /// A cron expression: 5 fields (minute hour day-of-month month day-of-week), or 6 to 7
    /// with seconds first (and a year last), e.g. `0 */15 * * * *`.
    pub cron: String,
    /// The IANA time zone the expression is read in (default `UTC`), e.g. `Europe/Berlin`.
    #[serde(default = "default_time_zone")]
    pub time_zone: String,
    /// The kind of the processes it starts.
    pub kind: String,
    /// Their input (the same for every due time; the process id names the due time).
    #[serde(default)]
    pub input: Value,
    /// Their disposition.
    #[serde(default)]
    pub disposition: Disposition,
    /// What a due time does while the previous process has not ended (default `skip`).
    #[serde(default)]
    pub overlap: OverlapPolicy,
    /// What happens to due times missed while no pod ran it (default `skip_missed`).
    #[serde(default)]
    pub catch_up: CatchUpPolicy,
    /// Most missed due times `run_all` runs (1 to 1,000, default 100): the latest ones.
    #[serde(default = "default_catch_up_limit")]
    pub catch_up_limit: u32,
    /// A due time is missed (and its catch-up policy decides) when no pod came to it for this
    /// long, in milliseconds (0 to a day, default 60,000): a tick a little late is not an
    /// outage.
    #[serde(default = "default_missed_after_ms")]
    pub missed_after_ms: u64,
    /// The queue its processes are claimed from (default: the kind's; see [`crate::queue`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "http", schema(pattern = "^[A-Za-z0-9._:-]{1,128}$"))]
    pub queue: Option<String>,
}

/// A schedule as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct ScheduleRecord {
    /// What it was created with.
    #[serde(flatten)]
    pub spec: ScheduleSpec,
    /// Paused: no due time produces anything, and those that pass are skipped.
    pub paused: bool,
    /// The next due time not produced yet (`None`: the expression has no further one).
    pub next_due_at: Option<DateTime<Utc>>,
    /// The latest due time that made a process.
    pub last_due_at: Option<DateTime<Utc>>,
    /// The process of `last_due_at`.
    pub last_process_id: Option<ProcessId>,
    /// Due times skipped by a policy, in all (those passed over by a pause are not counted).
    pub skipped: i64,
    /// Its next due time waits for the previous process to end (`queue_one`).
    #[serde(default)]
    pub held: bool,
    /// When it was created (database clock).
    pub created_at: DateTime<Utc>,
}

/// A parsed schedule: its expression and time zone.
#[derive(Clone, Debug)]
pub struct Cron {
    schedule: cron::Schedule,
    zone: chrono_tz::Tz,
}

impl Cron {
    /// Parses `expression` (5 to 7 fields, see [`ScheduleSpec::cron`]) in `time_zone`.
    pub fn parse(expression: &str, time_zone: &str) -> Result<Self, ProcessError> {
        let invalid = |why: String| ProcessError::InvalidInput(why);
        if expression.len() > 256 {
            return Err(invalid(
                "a cron expression is at most 256 characters".into(),
            ));
        }
        let fields = expression.split_whitespace().count();
        let expanded = match fields {
            5 => format!("0 {expression}"),
            6 | 7 => expression.to_owned(),
            n => {
                return Err(invalid(format!(
                    "a cron expression has 5 fields (or 6 to 7, seconds first), not {n}"
                )));
            }
        };
        let schedule = cron::Schedule::from_str(&expanded).map_err(|err| {
            invalid(format!(
                "cron expression {expression:?}: {}",
                err.to_string().replace('\n', " ")
            ))
        })?;
        let zone = chrono_tz::Tz::from_str(time_zone)
            .map_err(|_| invalid(format!("unknown time zone {time_zone:?} (IANA names)")))?;
        Ok(Self { schedule, zone })
    }

    /// The first due time strictly after `after`. (Around a fall-back of the clocks the
    /// expression's iterator may answer an instant of the repeated hour that is not after
    /// `after`: those are passed over, so due times only move forward.)
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.schedule
            .after(&after.with_timezone(&self.zone))
            .map(|due| due.with_timezone(&Utc))
            .take(16)
            .find(|due| *due > after)
    }

    /// The due times from `from` up to `until` (both included), in order: the newest `limit`
    /// of them, and whether older ones were left out.
    pub fn due_between(
        &self,
        from: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: usize,
    ) -> (Vec<DateTime<Utc>>, bool) {
        let Some(past_until) = until.checked_add_signed(TimeDelta::seconds(1)) else {
            return (Vec::new(), false);
        };
        let mut due: Vec<DateTime<Utc>> = self
            .schedule
            .after(&past_until.with_timezone(&self.zone))
            .rev()
            .map(|due| due.with_timezone(&Utc))
            .filter(|due| *due <= until)
            .take_while(|due| *due >= from)
            .take(limit.saturating_add(1))
            .collect();
        let beyond = due.len() > limit;
        due.truncate(limit);
        due.sort();
        due.dedup();
        (due, beyond)
    }
}

impl ScheduleSpec {
    /// Checks every field; returns the parsed expression.
    pub fn validate(&self) -> Result<Cron, ProcessError> {
        crate::validate::schedule_id(&self.id)?;
        crate::validate::kind(&self.kind)?;
        if let Some(queue) = &self.queue {
            crate::queue::queue_name(queue)?;
        }
        if self.catch_up_limit == 0 || self.catch_up_limit > MAX_CATCH_UP_LIMIT {
            return Err(ProcessError::InvalidInput(format!(
                "catch_up_limit must be 1 to {MAX_CATCH_UP_LIMIT}, got {}",
                self.catch_up_limit
            )));
        }
        if self.missed_after_ms > MAX_MISSED_AFTER_MILLIS {
            return Err(ProcessError::InvalidInput(format!(
                "missed_after_ms must be at most {MAX_MISSED_AFTER_MILLIS}, got {}",
                self.missed_after_ms
            )));
        }
        let cron = Cron::parse(&self.cron, &self.time_zone)?;
        if cron.next_after(Utc::now()).is_none() {
            return Err(ProcessError::InvalidInput(format!(
                "cron expression {:?} has no due time from now on",
                self.cron
            )));
        }
        Ok(cron)
    }
}

/// Whether two specs define the same schedule (JSON inputs compared by value).
pub fn same_spec(a: &ScheduleSpec, b: &ScheduleSpec) -> bool {
    a.id == b.id
        && a.cron == b.cron
        && a.time_zone == b.time_zone
        && a.kind == b.kind
        && crate::model::json_equal(&a.input, &b.input)
        && a.disposition == b.disposition
        && a.overlap == b.overlap
        && a.catch_up == b.catch_up
        && a.catch_up_limit == b.catch_up_limit
        && a.missed_after_ms == b.missed_after_ms
        && a.queue == b.queue
}

impl ScheduleSpec {
    /// The registration of one of its processes, with id `id`.
    pub fn registration(&self, id: ProcessId) -> crate::model::ProcessRegistration {
        let mut registration =
            crate::model::ProcessRegistration::new(self.kind.clone(), self.input.clone())
                .with_id(id)
                .with_disposition(self.disposition);
        registration.queue = self.queue.clone();
        registration
    }
}

/// The id of the process of `schedule`'s due time `due`: `<schedule>.<YYYYMMDDTHHMMSSZ>`
/// (UTC; with milliseconds when the due time has them).
pub fn due_process_id(schedule: &str, due: DateTime<Utc>) -> ProcessId {
    let stamp = if due.timestamp_subsec_millis() == 0 {
        due.format("%Y%m%dT%H%M%SZ").to_string()
    } else {
        due.format("%Y%m%dT%H%M%S%.3fZ").to_string()
    };
    ProcessId::new(format!("{schedule}.{stamp}")).expect("a schedule id and a stamp make an id")
}

/// What one tick decides for a schedule whose next due time has come, as of `now`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TickPlan {
    /// The due times to produce a process for, in order.
    pub run: Vec<DateTime<Utc>>,
    /// How many due times are skipped (of those the tick looked at: at most
    /// [`MAX_DUE_TIMES_PER_TICK`]; older ones are skipped uncounted).
    pub skipped: i64,
    /// The row's next due time after this tick.
    pub next_due_at: Option<DateTime<Utc>>,
    /// `next_due_at` is held by `queue_one` until the previous process ends: the catch-up
    /// policy does not apply to it when it is produced.
    pub held: bool,
}

/// Plans a tick of `record` at `now`, given whether the process of its last due time is
/// still running (`previous_running`).
pub fn plan_tick(
    record: &ScheduleRecord,
    cron: &Cron,
    now: DateTime<Utc>,
    previous_running: bool,
) -> TickPlan {
    let Some(first) = record.next_due_at else {
        return TickPlan {
            run: Vec::new(),
            skipped: 0,
            next_due_at: None,
            held: false,
        };
    };
    let (due, beyond) = cron.due_between(first, now, MAX_DUE_TIMES_PER_TICK);
    let missed_after =
        TimeDelta::milliseconds(i64::try_from(record.spec.missed_after_ms).unwrap_or(i64::MAX));
    let recent_from = now.checked_sub_signed(missed_after).unwrap_or(now);
    // A due time held by `queue_one` waited for the previous process, not for a pod: it is
    // never "missed".
    let (missed, recent): (Vec<_>, Vec<_>) = due
        .iter()
        .partition(|at| **at < recent_from && !(record.held && **at == first));
    let mut run: Vec<DateTime<Utc>> = match record.spec.catch_up {
        CatchUpPolicy::SkipMissed => recent.clone(),
        CatchUpPolicy::RunOnce => {
            // The missed due times fold into one, the latest; recent ones run as usual.
            let mut run: Vec<_> = missed.last().copied().into_iter().collect();
            run.extend(recent.iter().copied());
            run
        }
        CatchUpPolicy::RunAll => {
            let keep = record.spec.catch_up_limit as usize;
            let mut run: Vec<_> = missed[missed.len().saturating_sub(keep)..].to_vec();
            run.extend(recent.iter().copied());
            run
        }
    };
    run.sort();
    let after_all = || {
        let last = due.last().copied().unwrap_or(first);
        cron.next_after(if beyond { last.max(now) } else { last })
    };
    match record.spec.overlap {
        OverlapPolicy::Allow => {}
        // One process at a time: none while the previous runs, else the latest due time
        // (the ones before it in this tick would overlap it).
        OverlapPolicy::Skip if previous_running => run.clear(),
        OverlapPolicy::Skip => run = run.last().copied().into_iter().collect(),
        OverlapPolicy::QueueOne => {
            // The latest due time waits (the row stays on it) until the previous process has
            // ended; the ones before it fold into it.
            if let Some(latest) = run.last().copied() {
                if previous_running {
                    return TickPlan {
                        run: Vec::new(),
                        skipped: due.iter().filter(|at| **at < latest).count() as i64,
                        next_due_at: Some(latest),
                        held: true,
                    };
                }
                run = vec![latest];
            }
        }
    }
    let skipped = due.len() as i64 - run.len() as i64;
    TickPlan {
        run,
        skipped,
        next_due_at: after_all(),
        held: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(
        catch_up: CatchUpPolicy,
        overlap: OverlapPolicy,
        next: DateTime<Utc>,
    ) -> ScheduleRecord {
        ScheduleRecord {
            spec: ScheduleSpec {
                id: "s".into(),
                cron: "0 * * * * *".into(),
                time_zone: "UTC".into(),
                kind: "k".into(),
                input: Value::Null,
                disposition: Disposition::Rerun,
                overlap,
                catch_up,
                catch_up_limit: 3,
                missed_after_ms: 60_000,
                queue: None,
            },
            paused: false,
            next_due_at: Some(next),
            last_due_at: None,
            last_process_id: None,
            skipped: 0,
            held: false,
            created_at: next,
        }
    }

    fn at(minute: u32, second: u32) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(&format!("2026-01-01T10:{minute:02}:{second:02}Z"))
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn missed_due_times_follow_the_catch_up_policy() {
        let cron = Cron::parse("* * * * *", "UTC").unwrap();
        // Due every minute from 10:00; now 10:10:30: 10:00..10:09 are missed, 10:10 is recent.
        let now = at(10, 30);
        let plan = |catch_up| {
            plan_tick(
                &record(catch_up, OverlapPolicy::Allow, at(0, 0)),
                &cron,
                now,
                false,
            )
        };
        let skip = plan(CatchUpPolicy::SkipMissed);
        assert_eq!(skip.run, vec![at(10, 0)]);
        assert_eq!((skip.skipped, skip.next_due_at), (10, Some(at(11, 0))));
        let once = plan(CatchUpPolicy::RunOnce);
        assert_eq!(once.run, vec![at(9, 0), at(10, 0)]);
        let all = plan(CatchUpPolicy::RunAll);
        assert_eq!(
            all.run,
            vec![at(7, 0), at(8, 0), at(9, 0), at(10, 0)],
            "the latest 3 missed"
        );
        assert_eq!(all.skipped, 7);
    }

    #[test]
    fn overlap_skips_queues_or_allows() {
        let cron = Cron::parse("* * * * *", "UTC").unwrap();
        let now = at(2, 5);
        let plan = |overlap, running| {
            plan_tick(
                &record(CatchUpPolicy::RunAll, overlap, at(1, 0)),
                &cron,
                now,
                running,
            )
        };
        assert_eq!(
            plan(OverlapPolicy::Allow, true).run,
            vec![at(1, 0), at(2, 0)]
        );
        let skipped = plan(OverlapPolicy::Skip, true);
        assert_eq!(
            (skipped.run.len(), skipped.next_due_at),
            (0, Some(at(3, 0)))
        );
        let queued = plan(OverlapPolicy::QueueOne, true);
        assert_eq!((queued.run.len(), queued.next_due_at), (0, Some(at(2, 0))));
        let freed = plan(OverlapPolicy::QueueOne, false);
        assert_eq!(
            (freed.run, freed.next_due_at),
            (vec![at(2, 0)], Some(at(3, 0)))
        );
    }

    #[test]
    fn a_held_due_time_is_never_missed_and_one_tick_looks_at_the_newest() {
        let cron = Cron::parse("* * * * *", "UTC").unwrap();
        // queue_one held 10:01 while the previous ran; it ends at 10:05:30: 10:01 runs (not
        // missed, though old), folding 10:02 .. 10:05 into it.
        let mut held = record(CatchUpPolicy::SkipMissed, OverlapPolicy::QueueOne, at(1, 0));
        held.held = true;
        let plan = plan_tick(&held, &cron, at(5, 30), false);
        assert_eq!((plan.run, plan.held), (vec![at(5, 0)], false));
        held.held = false;
        assert!(plan_tick(&held, &cron, at(5, 30), false).run == vec![at(5, 0)]);
        let mut unheld = record(CatchUpPolicy::SkipMissed, OverlapPolicy::QueueOne, at(1, 0));
        unheld.spec.missed_after_ms = 0;
        assert!(plan_tick(&unheld, &cron, at(5, 30), false).run.is_empty());
        held.spec.missed_after_ms = 0;
        held.held = true;
        let plan = plan_tick(&held, &cron, at(1, 30), false);
        assert_eq!(plan.run, vec![at(1, 0)], "held, not missed");
        // Every second for much longer than a tick looks at: the newest due times run.
        let busy = Cron::parse("* * * * * *", "UTC").unwrap();
        let behind = record(CatchUpPolicy::RunOnce, OverlapPolicy::Allow, at(0, 0));
        let now = at(0, 0) + TimeDelta::seconds(3 * MAX_DUE_TIMES_PER_TICK as i64);
        let plan = plan_tick(&behind, &busy, now, false);
        assert_eq!(plan.run.last(), Some(&now), "the newest, not the oldest");
        assert_eq!(plan.next_due_at, Some(now + TimeDelta::seconds(1)));
        // skip: one at a time even within a tick.
        let late = record(CatchUpPolicy::RunAll, OverlapPolicy::Skip, at(1, 0));
        assert_eq!(plan_tick(&late, &cron, at(3, 5), false).run, vec![at(3, 0)]);
    }

    #[test]
    fn due_times_only_move_forward_across_daylight_saving() {
        let cron = Cron::parse("*/15 * * * *", "Europe/Berlin").unwrap();
        for (start, hours) in [("2026-10-24T23:00:00Z", 4), ("2026-03-29T00:00:00Z", 3)] {
            let start = DateTime::parse_from_rfc3339(start)
                .unwrap()
                .with_timezone(&Utc);
            let mut at = start;
            while at < start + TimeDelta::hours(hours) {
                let next = cron.next_after(at).unwrap();
                assert!(
                    next > at && next <= at + TimeDelta::hours(2),
                    "{at} -> {next}"
                );
                at += TimeDelta::minutes(5);
            }
            let (due, _) = cron.due_between(start, start + TimeDelta::hours(hours), 1_000);
            assert!(due.windows(2).all(|pair| pair[0] < pair[1]), "{due:?}");
        }
    }

    #[test]
    fn expressions_zones_and_ids() {
        assert!(Cron::parse("*/5 * * * *", "Europe/Berlin").is_ok());
        assert!(Cron::parse("0 0 * * * * 2030", "UTC").is_ok());
        for (expression, zone) in [
            ("* * * *", "UTC"),
            ("bad * * * *", "UTC"),
            ("* * * * *", "Mars/Base"),
        ] {
            assert!(
                matches!(
                    Cron::parse(expression, zone),
                    Err(ProcessError::InvalidInput(_))
                ),
                "{expression} {zone}"
            );
        }
        // 02:30 in Berlin on the spring-forward day does not exist; 9:00 Berlin is 8:00 UTC.
        let berlin = Cron::parse("0 9 * * *", "Europe/Berlin").unwrap();
        assert_eq!(
            berlin.next_after(at(0, 0)).unwrap().to_rfc3339(),
            "2026-01-02T08:00:00+00:00"
        );
        assert_eq!(
            due_process_id("nightly", at(3, 0)).as_str(),
            "nightly.20260101T100300Z"
        );
    }
}
