//! The invariants of composition (CONTRACT §10), over SQL and the ledger:
//!
//! - n. no child spawned twice: a `fanout` process has exactly the children its spawns
//!   name (`<id>.c0` ..), each spawn recorded once, each child ended `completed` with its
//!   steps;
//! - o. every due time of the round's schedule produced exactly its process: the schedule's
//!   processes are one per due time (their ids name it), every two seconds from the first to
//!   the last with none missing (`run_all` catches up whatever the faults did), each ended
//!   `completed`.

use std::collections::BTreeSet;

use chrono::{NaiveDateTime, TimeDelta};
use serde_json::{Value, json};

use crate::load::{FANOUT_CHILDREN, Ledger, Plan};
use crate::snapshot::{ProcessRow, Snapshot};
use crate::violation::Violation;

/// The schedule every round makes (see [`schedule_spec`]).
pub(crate) const SCHEDULE_ID: &str = "chaos-every-2s";

/// Due every 2 s, each due time a short `sleep`; missed due times all run.
pub(crate) fn schedule_spec() -> Value {
    json!({
        "id": SCHEDULE_ID, "cron": "*/2 * * * * *", "kind": "sleep", "input": {"ms": 50},
        "overlap": "allow", "catch_up": "run_all", "catch_up_limit": 1000,
        "missed_after_ms": 1000,
    })
}

fn parent_plan(row: &ProcessRow, ledger: &Ledger) -> Option<Plan> {
    let parent = row.parent_id.as_ref()?;
    ledger.processes.get(parent).map(|planned| planned.plan)
}

/// Whether `id` is a process the pods made: a child of a `fanout`, or a due time of the
/// round's schedule.
pub(crate) fn made_by_pods(id: &str, row: &ProcessRow, ledger: &Ledger) -> bool {
    parent_plan(row, ledger) == Some(Plan::Fanout) || id.starts_with(&format!("{SCHEDULE_ID}."))
}

/// n. and o.
pub(crate) fn check_children(ledger: &Ledger, snapshot: &Snapshot) -> Vec<Violation> {
    let mut violations = Vec::new();
    const CHILDREN: &str = "n. no child spawned twice";
    for (id, planned) in &ledger.processes {
        if planned.plan != Plan::Fanout || !planned.registered {
            continue;
        }
        let Some(row) = snapshot.processes.get(id) else {
            continue; // reported by a.
        };
        let children: BTreeSet<&String> = snapshot
            .processes
            .iter()
            .filter(|(_, child)| child.parent_id.as_deref() == Some(id.as_str()))
            .map(|(child, _)| child)
            .collect();
        let spawned: Vec<&str> = snapshot
            .log(id)
            .iter()
            .filter(|event| event.event_type == "process.spawned")
            .filter_map(|event| event.payload["name"].as_str())
            .collect();
        let names: BTreeSet<&str> = spawned.iter().copied().collect();
        let expected: BTreeSet<String> =
            (0..FANOUT_CHILDREN).map(|n| format!("{id}.c{n}")).collect();
        let unexpected: Vec<&&String> = children
            .iter()
            .filter(|child| !expected.contains(child.as_str()))
            .collect();
        if names.len() != spawned.len() || !unexpected.is_empty() {
            violations.push(Violation::new(
                CHILDREN,
                id,
                format!("spawns recorded {spawned:?}; children not of a spawn {unexpected:?}"),
            ));
        }
        if row.terminal_state.as_deref() == Some("completed")
            && (children.len() != FANOUT_CHILDREN || spawned.len() != FANOUT_CHILDREN)
        {
            violations.push(Violation::new(
                CHILDREN,
                id,
                format!("completed with children {children:?} and spawns {spawned:?}"),
            ));
        }
        for child in children {
            let end = &snapshot.processes[child];
            let steps = end.output.as_ref().map(|output| output["steps"].clone());
            if end.terminal_state.as_deref() != Some("completed") || steps != Some(json!(6)) {
                violations.push(Violation::new(
                    CHILDREN,
                    child,
                    format!(
                        "a child ended {:?} with {:?}",
                        end.terminal_state, end.output
                    ),
                ));
            }
        }
    }
    violations.extend(check_schedule(snapshot));
    violations
}

/// o.
fn check_schedule(snapshot: &Snapshot) -> Vec<Violation> {
    const NAME: &str = "o. one process per due time";
    let mut violations = Vec::new();
    let prefix = format!("{SCHEDULE_ID}.");
    let mut dues = BTreeSet::new();
    for (id, row) in &snapshot.processes {
        let Some(stamp) = id.strip_prefix(&prefix) else {
            continue;
        };
        match NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%SZ") {
            Ok(due) if due.and_utc().timestamp() % 2 == 0 => {
                dues.insert(due);
            }
            _ => violations.push(Violation::new(NAME, id, "not the id of a due time")),
        }
        if row.terminal_state.as_deref() != Some("completed") {
            violations.push(Violation::new(
                NAME,
                id,
                format!("ended {:?}", row.terminal_state),
            ));
        }
    }
    let (Some(first), Some(last)) = (dues.first(), dues.last()) else {
        violations.push(Violation::new(NAME, SCHEDULE_ID, "no due time produced"));
        return violations;
    };
    let mut due = *first;
    let mut missing = Vec::new();
    while due <= *last {
        if !dues.contains(&due) {
            missing.push(due.to_string());
        }
        due += TimeDelta::seconds(2);
    }
    if !missing.is_empty() {
        violations.push(Violation::new(
            NAME,
            SCHEDULE_ID,
            format!("due times with no process between {first} and {last}: {missing:?}"),
        ));
    }
    violations
}
