//! The invariants checked over SQL and the ledger (a to g): every acknowledged write stored
//! once, dense logs sealed by one terminal event, no write under a superseded lease,
//! `abandon` at most once, every process ending as decided, takeovers only after a fault.

use serde_json::{Value, json};

use crate::load::{CancelAnswer, Ledger, Plan, Planned};
use crate::schedule::FaultRecord;
use crate::settings::TERMINAL_TYPES;
use crate::snapshot::{EventRow, Snapshot};
use crate::violation::Violation;

/// a. Every acknowledged append is stored exactly once at its seq; every acknowledged
/// registration exists as registered.
fn check_ledger(ledger: &Ledger, snapshot: &Snapshot) -> Vec<Violation> {
    const NAME: &str = "a. acknowledged write";
    let mut violations = Vec::new();
    for append in &ledger.appends {
        let log = snapshot.log(&append.process);
        let at_seq = log.iter().find(|e| e.seq == append.seq);
        let copies = log
            .iter()
            .filter(|e| e.event_type == append.event_type && e.payload == append.payload)
            .count();
        let keyed = log
            .iter()
            .filter(|e| e.replay_key.as_deref() == Some(append.replay_key.as_str()))
            .count();
        let matches = at_seq.is_some_and(|e| {
            e.event_type == append.event_type
                && e.payload == append.payload
                && e.replay_key.as_deref() == Some(append.replay_key.as_str())
        });
        if !matches || copies != 1 || keyed != 1 {
            violations.push(Violation::new(
                NAME,
                &append.process,
                format!(
                    "append {} acknowledged at seq {} (replayed: {}): stored there: {}, \
                     copies of its content: {copies}, events with its key: {keyed}",
                    append.replay_key,
                    append.seq,
                    append.replayed,
                    at_seq.map_or("nothing".into(), |e| format!(
                        "{} {}",
                        e.event_type, e.payload
                    )),
                ),
            ));
        }
    }
    for (id, planned) in ledger.processes.iter().filter(|(_, p)| p.registered) {
        let registration = &planned.registration;
        match snapshot.processes.get(id) {
            None => violations.push(Violation::new(
                NAME,
                id,
                "acknowledged registration is missing",
            )),
            Some(row)
                if json!(row.kind) != registration["kind"]
                    || row.input != registration["input"]
                    || json!(row.disposition) != registration["disposition"] =>
            {
                violations.push(Violation::new(
                    NAME,
                    id,
                    format!(
                        "stored as {} {} {}, registered as {registration}",
                        row.kind, row.input, row.disposition
                    ),
                ));
            }
            Some(_) => {}
        }
    }
    violations
}

/// b. Every log is dense from 1 to `last_seq`.
fn check_dense(snapshot: &Snapshot) -> Vec<Violation> {
    let mut violations = Vec::new();
    for (id, row) in &snapshot.processes {
        let log = snapshot.log(id);
        let dense = log.iter().zip(1..).all(|(event, seq)| event.seq == seq);
        if !dense || log.len() as i64 != row.last_seq {
            let seqs: Vec<i64> = log.iter().map(|e| e.seq).collect();
            violations.push(Violation::new(
                "b. dense log",
                id,
                format!("last_seq {} but seqs {seqs:?}", row.last_seq),
            ));
        }
    }
    violations
}

/// c. Exactly one terminal event, the last one, matching the terminal column.
fn check_terminal(snapshot: &Snapshot) -> Vec<Violation> {
    let mut violations = Vec::new();
    for (id, row) in &snapshot.processes {
        let log = snapshot.log(id);
        let terminal: Vec<&EventRow> = log
            .iter()
            .filter(|e| TERMINAL_TYPES.contains(&e.event_type.as_str()))
            .collect();
        let Some(state) = &row.terminal_state else {
            continue; // reported by "every process ends"
        };
        let sound = terminal.len() == 1
            && terminal[0].event_type == format!("process.{state}")
            && row.terminal_seq == Some(row.last_seq)
            && terminal[0].seq == row.last_seq;
        if !sound {
            let found: Vec<String> = terminal
                .iter()
                .map(|e| format!("{}@{}", e.event_type, e.seq))
                .collect();
            violations.push(Violation::new(
                "c. one terminal event, last",
                id,
                format!(
                    "state {state}, terminal_seq {:?}, last_seq {}, terminal events {found:?}",
                    row.terminal_seq, row.last_seq
                ),
            ));
        }
    }
    violations
}

/// d. No event written under a generation older than one already seen in the same log.
fn check_generations(snapshot: &Snapshot) -> Vec<Violation> {
    let mut violations = Vec::new();
    for (id, log) in &snapshot.events {
        let mut highest: Option<(i64, i64)> = None; // (generation, seq)
        for event in log {
            let Some(generation) = event.generation else {
                continue;
            };
            match highest {
                Some((top, seq)) if generation < top => violations.push(Violation::new(
                    "d. no write under a superseded lease",
                    id,
                    format!(
                        "{} at seq {} under generation {generation}, after generation {top} \
                         at seq {seq}",
                        event.event_type, event.seq
                    ),
                )),
                Some((top, _)) if generation == top => {}
                _ => highest = Some((generation, event.seq)),
            }
        }
    }
    violations
}

/// e. An `abandon` process never starts twice.
fn check_abandon_once(snapshot: &Snapshot) -> Vec<Violation> {
    snapshot
        .processes
        .iter()
        .filter(|(_, row)| row.disposition == "abandon")
        .filter_map(|(id, _)| {
            let starts: Vec<i64> = snapshot
                .log(id)
                .iter()
                .filter(|e| e.event_type == "process.started" && e.payload["resumed"] != true)
                .map(|e| e.seq)
                .collect();
            (starts.len() > 1).then(|| {
                Violation::new(
                    "e. abandon runs at most once",
                    id,
                    format!("process.started at seqs {starts:?}"),
                )
            })
        })
        .collect()
}

/// The terminal states a process may end in, given its plan and what the client was told
/// (`abandoned` of an `abandon` process is further checked by [`check_takeovers`]).
fn allowed_states(planned: &Planned) -> &'static [&'static str] {
    match planned.plan {
        Plan::Steps => &["completed"],
        Plan::StepsAbandon => &["completed", "abandoned"],
        Plan::Fail => &["failed"],
        Plan::External | Plan::Order | Plan::Fanout | Plan::Limited => &["completed"],
        Plan::OrderDeadline => &["failed"],
        Plan::Cancel => match planned.cancel {
            Some(CancelAnswer::Acknowledged) => &["cancelled"],
            Some(CancelAnswer::Terminal { retried: false }) => &["completed"],
            _ => &["cancelled", "completed"],
        },
    }
}

/// Whether an acknowledged cancellation legitimately lost the race with the engine: the
/// process completed and the request was written after the engine's last step (its work was
/// done; only the completion was still on its way).
fn cancelled_too_late(planned: &Planned, state: &str, log: &[EventRow]) -> bool {
    let request = log
        .iter()
        .find(|e| e.event_type == "process.cancel_requested")
        .map(|e| e.seq);
    let last_step = log
        .iter()
        .filter(|e| e.event_type == "step")
        .map(|e| e.seq)
        .max();
    planned.plan == Plan::Cancel
        && state == "completed"
        && matches!((request, last_step), (Some(request), Some(step)) if request > step)
}

/// f. Every process ends in the state its engine decided (or as cancelled on request).
fn check_outcomes(ledger: &Ledger, snapshot: &Snapshot) -> Vec<Violation> {
    const NAME: &str = "f. ends as decided";
    let mut violations = Vec::new();
    for (id, row) in &snapshot.processes {
        let Some(planned) = ledger.processes.get(id) else {
            // A child or a schedule's process: made by pods, checked by n. and o.
            if crate::composition::made_by_pods(id, row, ledger) {
                continue;
            }
            violations.push(Violation::new(
                NAME,
                id,
                "a process the client never registered",
            ));
            continue;
        };
        let Some(state) = row.terminal_state.as_deref() else {
            continue; // reported by "every process ends"
        };
        let allowed = allowed_states(planned);
        let output = row.output.clone().unwrap_or(Value::Null);
        if !allowed.contains(&state) && !cancelled_too_late(planned, state, snapshot.log(id)) {
            violations.push(Violation::new(
                NAME,
                id,
                format!(
                    "{:?} (cancel answer {:?}) ended {state}, expected one of {allowed:?}; \
                     output {output}",
                    planned.plan, planned.cancel
                ),
            ));
            continue;
        }
        let output_ok = match state {
            "completed" if row.kind == "steps" => output["steps"] == json!(6),
            "completed" if row.kind == "order" => output["ship"]["tracking"].is_string(),
            "completed" if row.kind == "fanout" => {
                output["states"] == json!(vec!["completed"; crate::load::FANOUT_CHILDREN])
            }
            "failed" if row.kind == "order" => output["error"] == json!("deadline exceeded"),
            "failed" => output["error"] == json!("planned failure"),
            _ => true,
        };
        if !output_ok {
            violations.push(Violation::new(
                NAME,
                id,
                format!("ended {state} with an unexpected output {output}"),
            ));
        }
    }
    violations
}

/// g. A process is rerun or abandoned only when the owner of its previous attempt had a
/// disruptive fault around that instant.
fn check_takeovers(snapshot: &Snapshot, faults: &[FaultRecord]) -> Vec<Violation> {
    let mut violations = Vec::new();
    let explained = |pod: &str, at_ns: i64| faults.iter().any(|f| f.explains(pod, at_ns));
    for (id, log) in &snapshot.events {
        let mut owner: Option<String> = None;
        for event in log {
            match event.event_type.as_str() {
                // A suspension hands the process back cleanly: the next run is a resume.
                "process.waiting" => owner = None,
                "process.started" => {
                    if let Some(previous) = &owner
                        && !explained(previous, event.occurred_ns)
                    {
                        violations.push(Violation::new(
                            "g. rerun only after its owner's fault",
                            id,
                            format!(
                                "process.started at seq {} ({}) after an attempt of {previous}, \
                                 which had no disruptive fault then",
                                event.seq, event.payload
                            ),
                        ));
                    }
                    owner = event.payload["pod"].as_str().map(str::to_owned);
                }
                "process.abandoned" => {
                    let payload = &event.payload;
                    let lost = payload["lost_owner"]
                        .as_str()
                        .or(payload["pod"].as_str())
                        .map(str::to_owned)
                        .or(owner.clone());
                    let justified = lost
                        .as_deref()
                        .is_some_and(|p| explained(p, event.occurred_ns));
                    if !justified {
                        violations.push(Violation::new(
                            "g. abandoned only after its owner's fault",
                            id,
                            format!(
                                "process.abandoned at seq {} ({payload}), previous owner {lost:?} \
                                 had no disruptive fault then",
                                event.seq
                            ),
                        ));
                    }
                }
                _ => {}
            }
        }
    }
    violations
}

/// Every invariant over the database and the ledger.
pub(crate) fn check_all(
    ledger: &Ledger,
    snapshot: &Snapshot,
    faults: &[FaultRecord],
) -> Vec<Violation> {
    let mut violations = check_ledger(ledger, snapshot);
    violations.extend(check_dense(snapshot));
    violations.extend(check_terminal(snapshot));
    violations.extend(check_generations(snapshot));
    violations.extend(check_abandon_once(snapshot));
    violations.extend(check_outcomes(ledger, snapshot));
    violations.extend(check_takeovers(snapshot, faults));
    violations.extend(crate::durable::check_durable(ledger, snapshot, faults));
    violations.extend(crate::composition::check_children(ledger, snapshot));
    violations
}
