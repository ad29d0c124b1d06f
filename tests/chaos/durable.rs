//! The invariants of durable execution (CONTRACT §9), over SQL, the ledger and the `order`
//! engine's journal lines (`step:<name>`):
//!
//! - i. a step whose output was stored is never executed again (no later run executes it);
//! - j. no timer fires before its due time on the database clock (no step stored after a
//!   timer before it was due; no resume before the wake time its suspension recorded);
//! - k. every acknowledged message is received exactly once, in order (an order that
//!   completed received the first `approve` message, once);
//! - l. retry counts and gaps follow the policy (one retry, after its backoff);
//! - m. a process past its deadline is terminal within one TTL (unless a fault held up the
//!   whole cluster meanwhile), and never fails for its deadline early.

use std::collections::HashMap;
use std::path::Path;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;

use crate::load::{Ledger, Plan};
use crate::schedule::FaultRecord;
use crate::settings::{POD_NAMES, TAKEOVER_SLACK, TTL};
use crate::snapshot::{EventRow, Snapshot};
use crate::violation::Violation;

/// Slack on the deadline bound for the poll and the statements around it.
const DEADLINE_SLACK_NS: i64 = 1_000_000_000;

fn ns(at: &Value) -> Option<i64> {
    serde_json::from_value::<DateTime<Utc>>(at.clone())
        .ok()
        .and_then(|at| at.timestamp_nanos_opt())
}

/// j, k, l, m over the database and the ledger.
pub(crate) fn check_durable(
    ledger: &Ledger,
    snapshot: &Snapshot,
    faults: &[FaultRecord],
) -> Vec<Violation> {
    let mut violations = Vec::new();
    for (id, row) in &snapshot.processes {
        if row.kind != "order" {
            continue;
        }
        let log = snapshot.log(id);
        check_timers(id, log, &mut violations);
        check_receipts(id, row.terminal_state.as_deref(), log, &mut violations);
        let plan = ledger.processes.get(id).map(|planned| planned.plan);
        if plan == Some(Plan::Order) && row.terminal_state.as_deref() == Some("completed") {
            check_retries(id, row.retries, log, &mut violations);
        }
        if let (Some(deadline), Some(completed)) = (row.deadline_ns, row.completed_ns) {
            let failed_for_it = row
                .output
                .as_ref()
                .is_some_and(|output| output["error"] == "deadline exceeded");
            if failed_for_it && completed < deadline {
                violations.push(Violation::new(
                    "m. deadline",
                    id,
                    format!(
                        "failed for its deadline {} ms early",
                        (deadline - completed) / 1_000_000
                    ),
                ));
            }
            let bound = deadline + TTL.as_nanos() as i64 + DEADLINE_SLACK_NS;
            let held_up = faults.iter().any(|fault| {
                fault.start_ns <= completed
                    && fault.end_ns + (TTL + TAKEOVER_SLACK).as_nanos() as i64 >= deadline
            });
            if completed > bound && !held_up {
                violations.push(Violation::new(
                    "m. deadline",
                    id,
                    format!(
                        "ended {} ms after its deadline, over one TTL, with no fault meanwhile",
                        (completed - deadline) / 1_000_000
                    ),
                ));
            }
        }
    }
    violations
}

/// j. Steps after a timer were stored once it was due; resumes come after their wake time.
fn check_timers(id: &str, log: &[EventRow], violations: &mut Vec<Violation>) {
    for timer in log.iter().filter(|e| e.event_type == "process.timer") {
        let Some(millis) = timer.payload["duration_ms"].as_i64() else {
            continue;
        };
        let due = timer.occurred_ns + millis * 1_000_000;
        for early in log
            .iter()
            .filter(|e| e.seq > timer.seq && e.event_type == "process.step" && e.occurred_ns < due)
        {
            violations.push(Violation::new(
                "j. no timer fires early",
                id,
                format!(
                    "step {} stored {} ms before timer {} was due",
                    early.payload["name"],
                    (due - early.occurred_ns) / 1_000_000,
                    timer.payload["name"]
                ),
            ));
        }
    }
    for (at, wait) in log
        .iter()
        .enumerate()
        .filter(|(_, e)| e.event_type == "process.waiting")
    {
        let Some(wake) = ns(&wait.payload["wake_at"]) else {
            continue;
        };
        // A message ends a wait for one early: only timers and backoffs are held to it.
        if wait.payload["topic"].is_string() {
            continue;
        }
        if let Some(resume) = log[at..].iter().find(|e| e.event_type == "process.started")
            && resume.occurred_ns < wake
        {
            violations.push(Violation::new(
                "j. no timer fires early",
                id,
                format!(
                    "resumed at seq {} {} ms before the wake time of its {} wait",
                    resume.seq,
                    (wake - resume.occurred_ns) / 1_000_000,
                    wait.payload["reason"]
                ),
            ));
        }
    }
}

/// k. At most one receipt of `approve`, taking the first message, after it; exactly one
/// when the order completed.
fn check_receipts(
    id: &str,
    state: Option<&str>,
    log: &[EventRow],
    violations: &mut Vec<Violation>,
) {
    let first_message = log
        .iter()
        .find(|e| e.event_type == "process.message" && e.payload["topic"] == "approve");
    let receipts: Vec<&EventRow> = log
        .iter()
        .filter(|e| e.event_type == "process.received" && e.payload["topic"] == "approve")
        .collect();
    let expected = usize::from(state == Some("completed"));
    let sound = receipts.len() <= 1
        && (state != Some("completed") || receipts.len() == expected)
        && receipts.iter().all(|receipt| {
            receipt.payload["n"] == 1
                && first_message.is_some_and(|message| {
                    receipt.payload["message_seq"] == message.seq && receipt.seq > message.seq
                })
        });
    if !sound {
        let seen: Vec<String> = receipts
            .iter()
            .map(|r| format!("seq {}: {}", r.seq, r.payload))
            .collect();
        violations.push(Violation::new(
            "k. messages received once, in order",
            id,
            format!(
                "{state:?}; first approve message at {:?}; receipts {seen:?}",
                first_message.map(|m| m.seq)
            ),
        ));
    }
}

/// l. The order's one retryable failure: one retry, 1 s of backoff, no run before it.
fn check_retries(id: &str, retries: i32, log: &[EventRow], violations: &mut Vec<Violation>) {
    let waits: Vec<(usize, &EventRow)> = log
        .iter()
        .enumerate()
        .filter(|(_, e)| e.event_type == "process.waiting" && e.payload["reason"] == "retry")
        .collect();
    if retries != 1 || waits.len() != 1 {
        violations.push(Violation::new(
            "l. retries follow the policy",
            id,
            format!("retries {retries}, retry waits {}", waits.len()),
        ));
        return;
    }
    let (at, wait) = waits[0];
    let delay_ms = wait.payload["delay_ms"].as_i64();
    let resume = log[at..].iter().find(|e| e.event_type == "process.started");
    let gap_ok = match (delay_ms, resume) {
        (Some(delay), Some(resume)) => resume.occurred_ns >= wait.occurred_ns + delay * 1_000_000,
        _ => false,
    };
    if delay_ms != Some(1_000) || !gap_ok {
        violations.push(Violation::new(
            "l. retries follow the policy",
            id,
            format!(
                "retry wait {} then {:?}",
                wait.payload,
                resume.map(|r| (r.seq, r.occurred_ns - wait.occurred_ns))
            ),
        ));
    }
}

/// One line of a journal, as far as steps go.
#[derive(Deserialize)]
struct Line {
    process_id: String,
    generation: i64,
    what: String,
}

/// i. No run executes a step whose output an earlier run stored.
pub(crate) fn check_stored_steps(dir: &Path, snapshot: &Snapshot) -> Vec<Violation> {
    let mut executions: HashMap<(String, String), Vec<i64>> = HashMap::new();
    for name in POD_NAMES {
        let text = std::fs::read_to_string(dir.join(format!("{name}.journal"))).unwrap_or_default();
        for line in text.lines() {
            let Ok(line) = serde_json::from_str::<Line>(line) else {
                continue;
            };
            if let Some(step) = line.what.strip_prefix("step:") {
                executions
                    .entry((line.process_id, step.to_owned()))
                    .or_default()
                    .push(line.generation);
            }
        }
    }
    let mut violations = Vec::new();
    for (id, log) in &snapshot.events {
        for stored in log.iter().filter(|e| e.event_type == "process.step") {
            let name = stored.payload["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let Some(generation) = stored.generation else {
                continue;
            };
            let runs = executions.get(&(id.clone(), name.clone()));
            let later: Vec<i64> = runs
                .into_iter()
                .flatten()
                .copied()
                .filter(|run| *run > generation)
                .collect();
            if !later.is_empty() {
                violations.push(Violation::new(
                    "i. a stored step never runs again",
                    id,
                    format!(
                        "step {name} stored by generation {generation}, executed again by \
                         generations {later:?}"
                    ),
                ));
            }
        }
    }
    violations
}
