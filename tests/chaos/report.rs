//! The summary of a round: the faults, writes and outcomes counted, as JSON (for
//! `PROCLOG_CHAOS_REPORT`) and as Markdown tables.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use serde_json::{Value, json};

use crate::api::ClientStats;
use crate::cluster::Backend;
use crate::journals::JournalStats;
use crate::load::{CancelAnswer, Ledger, Plan};
use crate::schedule::FaultRecord;
use crate::settings::Settings;
use crate::snapshot::Snapshot;
use crate::violation::Violation;

/// Everything the summary reports.
pub(crate) struct Round<'a> {
    pub(crate) settings: &'a Settings,
    pub(crate) backend: Backend,
    pub(crate) faults: &'a [FaultRecord],
    pub(crate) ledger: &'a Ledger,
    pub(crate) stats: &'a ClientStats,
    pub(crate) snapshot: &'a Snapshot,
    pub(crate) journal: &'a JournalStats,
    pub(crate) violations: &'a [Violation],
}

fn count_by<'a>(items: impl Iterator<Item = &'a str>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for item in items {
        *counts.entry(item.to_owned()).or_insert(0) += 1;
    }
    counts
}

impl Round<'_> {
    pub(crate) fn to_json(&self) -> Value {
        let ledger = self.ledger;
        let cancels = |wanted: fn(&Option<CancelAnswer>) -> bool| {
            ledger
                .processes
                .values()
                .filter(|p| wanted(&p.cancel))
                .count()
        };
        let states = count_by(
            self.snapshot
                .processes
                .values()
                .map(|p| p.terminal_state.as_deref().unwrap_or("not terminal")),
        );
        let starts_by_pod = count_by(self.snapshot.events.values().flat_map(|log| {
            log.iter()
                .filter(|e| e.event_type == "process.started")
                .map(|e| e.payload["pod"].as_str().unwrap_or("?"))
        }));
        let reruns = self
            .snapshot
            .events
            .values()
            .filter(|log| {
                log.iter()
                    .filter(|e| e.event_type == "process.started" && e.payload["resumed"] != true)
                    .count()
                    > 1
            })
            .count();
        let durable = count_by(self.snapshot.events.values().flat_map(|log| {
            log.iter().filter_map(|e| match e.event_type.as_str() {
                "process.step" => Some("steps stored"),
                "process.timer" => Some("timers recorded"),
                "process.waiting" => Some("suspensions"),
                "process.message" => Some("messages"),
                "process.received" => Some("receipts"),
                "process.started" if e.payload["resumed"] == true => Some("resumes"),
                _ => None,
            })
        }));
        json!({
            "seed": self.settings.seed,
            "backend": format!("{:?}", self.backend).to_lowercase(),
            "fault_secs": self.settings.fault_time.as_secs(),
            "faults": count_by(self.faults.iter().map(|f| f.kind.name())),
            "fault_log": self.faults.iter().map(FaultRecord::to_json).collect::<Vec<_>>(),
            "writes": {
                "registrations_acknowledged":
                    ledger.processes.values().filter(|p| p.registered).count(),
                "appends_acknowledged": ledger.appends.len(),
                "appends_acknowledged_as_replays":
                    ledger.appends.iter().filter(|a| a.replayed).count(),
                "cancels_acknowledged":
                    cancels(|c| *c == Some(CancelAnswer::Acknowledged)),
                "cancels_answered_terminal":
                    cancels(|c| matches!(c, Some(CancelAnswer::Terminal { .. }))),
                "completions_acknowledged":
                    ledger.processes.values().filter(|p| p.completed).count(),
                "requests": self.stats.requests.load(Ordering::Relaxed),
                "requests_retried": self.stats.retries.load(Ordering::Relaxed),
                "appends_retried": self.stats.append_retries.load(Ordering::Relaxed),
                "given_up": self.stats.gave_up.load(Ordering::Relaxed),
            },
            "processes": {
                "total": self.snapshot.processes.len(),
                "by_final_state": states,
                "rerun": reruns,
                "runs_started_by_pod": starts_by_pod,
                "by_plan": count_by(ledger.processes.values().map(|p| plan_name(p.plan))),
                "durable": durable,
            },
            "journal": {
                "lines": self.journal.lines,
                "malformed_lines": self.journal.malformed,
                "processes": self.journal.processes,
            },
            "violations": self.violations.len(),
            "violation_list": self.violations.iter().map(ToString::to_string).collect::<Vec<_>>(),
        })
    }
}

fn plan_name(plan: Plan) -> &'static str {
    match plan {
        Plan::Steps => "steps_rerun",
        Plan::StepsAbandon => "steps_abandon",
        Plan::Fail => "fail",
        Plan::Cancel => "steps_cancelled",
        Plan::External => "external",
        Plan::Order => "order",
        Plan::OrderDeadline => "order_deadline",
        Plan::Fanout => "fanout",
        Plan::Limited => "limited",
    }
}

/// The summary as Markdown tables (for RELIABILITY.md).
pub(crate) fn print_summary(report: &Value) {
    println!(
        "\n## Chaos round: seed {}, {} s of faults\n",
        report["seed"], report["fault_secs"]
    );
    print_table("fault", "injected", &report["faults"]);
    print_table("write", "count", &report["writes"]);
    print_table(
        "final state",
        "processes",
        &report["processes"]["by_final_state"],
    );
    print_table("process plan", "processes", &report["processes"]["by_plan"]);
    print_table(
        "durable execution",
        "events",
        &report["processes"]["durable"],
    );
    print_table(
        "pod",
        "runs started",
        &report["processes"]["runs_started_by_pod"],
    );
    println!(
        "processes: {} ({} rerun at least once); journal lines: {} ({} malformed); \
         invariant violations: {}\n",
        report["processes"]["total"],
        report["processes"]["rerun"],
        report["journal"]["lines"],
        report["journal"]["malformed_lines"],
        report["violations"]
    );
}

fn print_table(key: &str, value: &str, map: &Value) {
    println!("| {key} | {value} |\n| --- | ---: |");
    if let Some(map) = map.as_object() {
        for (name, count) in map {
            println!("| {name} | {count} |");
        }
    }
    println!();
}
