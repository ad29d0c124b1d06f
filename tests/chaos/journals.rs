//! Invariant h, over the demo engines' journals (`--demo-journal`): never two engines of one
//! process at once.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::Deserialize;

use crate::settings::POD_NAMES;
use crate::snapshot::Snapshot;
use crate::violation::Violation;

/// One line of a demo engine journal.
#[derive(Deserialize)]
struct JournalLine {
    process_id: String,
    pod: String,
    generation: i64,
    what: String,
    at_ns: i64,
}

/// What one generation (run) of a process did, from the journals.
#[derive(Default)]
struct RunSpan {
    pod: String,
    start_ns: Option<i64>,
    last_effect_ns: Option<i64>,
}

/// What the journals held.
#[derive(Default)]
pub(crate) struct JournalStats {
    pub(crate) lines: usize,
    pub(crate) malformed: usize,
    pub(crate) processes: usize,
}

/// Reads every pod's journal into runs per process and generation.
fn read_journals(dir: &Path) -> (HashMap<String, BTreeMap<i64, RunSpan>>, JournalStats) {
    let mut runs: HashMap<String, BTreeMap<i64, RunSpan>> = HashMap::new();
    let mut stats = JournalStats::default();
    for name in POD_NAMES {
        let text = std::fs::read_to_string(dir.join(format!("{name}.journal"))).unwrap_or_default();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            stats.lines += 1;
            let Ok(entry) = serde_json::from_str::<JournalLine>(line) else {
                stats.malformed += 1; // e.g. the last line of a killed pod
                continue;
            };
            let run = runs
                .entry(entry.process_id)
                .or_default()
                .entry(entry.generation)
                .or_default();
            run.pod = entry.pod;
            match entry.what.as_str() {
                "start" => {
                    run.start_ns = Some(entry.at_ns);
                    run.last_effect_ns = run.last_effect_ns.max(Some(entry.at_ns));
                }
                // `step` (steps engine), `step:<name>` (order engine).
                what if what == "step" || what.starts_with("step:") => {
                    run.last_effect_ns = run.last_effect_ns.max(Some(entry.at_ns));
                }
                _ => {}
            }
        }
    }
    stats.processes = runs.len();
    (runs, stats)
}

/// h. Never two engines of one process at once: every effect of a generation precedes the
/// start of every later generation.
pub(crate) fn check_journals(dir: &Path, snapshot: &Snapshot) -> (Vec<Violation>, JournalStats) {
    const NAME: &str = "h. one engine at a time";
    let (runs, stats) = read_journals(dir);
    let mut violations = Vec::new();
    for (id, generations) in &runs {
        let mut latest: Option<(i64, i64, &str)> = None; // (effect, generation, pod)
        for (generation, run) in generations {
            if let (Some(start), Some((effect, earlier, pod))) = (run.start_ns, latest)
                && effect >= start
            {
                violations.push(Violation::new(
                    NAME,
                    id,
                    format!(
                        "generation {earlier} on {pod} acted {} ms after generation \
                         {generation} started on {}",
                        (effect - start) as f64 / 1e6,
                        run.pod
                    ),
                ));
            }
            if let Some(effect) = run.last_effect_ns
                && latest.is_none_or(|(top, _, _)| effect > top)
            {
                latest = Some((effect, *generation, &run.pod));
            }
        }
    }
    let steps_started = snapshot
        .events
        .iter()
        .filter(|(id, _)| {
            snapshot
                .processes
                .get(*id)
                .is_some_and(|p| p.kind == "steps")
        })
        .any(|(_, log)| log.iter().any(|e| e.event_type == "process.started"));
    if steps_started && stats.lines == 0 {
        violations.push(Violation::new(
            NAME,
            "-",
            "steps processes ran but the journals are empty (--demo-journal)",
        ));
    }
    (violations, stats)
}
