//! Demo engines shipped with the pod binary, for watching crash semantics.
//!
//! - `steps`: input `{"steps": N, "delay_ms": D}` (defaults 5 and 500; N at most 10,000, D at
//!   most 60,000): appends N `step` events `{i, of, attempt}` D ms apart, then completes with
//!   `{steps, attempt}`.
//! - `sleep`: input `{"ms": D}` (default 1000, at most one hour): waits, then completes with
//!   `{slept_ms}`.
//!
//! - `fail`: input `{"message": M}`: fails at once with `{error: M}`.
//! - `order`: durable execution (CONTRACT §9) in five parts. Input `{"work_ms": W,
//!   "ship_after_ms": S, "declines": F}` (defaults 500, 5000 and 0; W at most 60,000, S at
//!   most a day, F at most 10). Step `reserve` (W ms of work), then it waits for a message
//!   of topic `approve` (without holding a pod), step `charge` (W ms; the first F runs that
//!   get there fail retryably first: the kind retries up to 4 runs, 1 s doubling), a durable
//!   timer `cooling` of S ms, step `ship` (W ms), and completes with every step's output.
//!   A message `{"approved": false}` fails the order. Every step runs once per process,
//!   whatever happens to its pods.
//!
//! - `fanout`: children (CONTRACT §10). Input `{"children": N, "steps": S, "delay_ms": D}`
//!   (defaults 3, 5 and 500; N at most 20): spawns N `steps` children `c0` .. `c<N-1>`
//!   (input `{"steps": S, "delay_ms": D}`, ids `<id>.c<i>`), waits for them all without a
//!   pod, and completes with `{children: N, states: [...]}`.
//!
//! An input out of these bounds fails the process with `{error}` at once.
//!
//! With a [`DemoJournal`] (`proclog pod --demo-journal FILE`), each engine records its effects
//! (`start`, each `step`) and its return (`stop`) as JSON lines with wall-clock instants, so a
//! test can check from outside that no two engines of one process ever acted at once.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde_json::{Value, json};

use super::engine::{EngineResult, Engines, ProcessEngine, RunContext};

/// `input[key]` as a whole number from 0 to `max`, or `default` when absent; anything else is
/// the process's failure.
fn number(input: &Value, key: &str, default: u64, max: u64) -> Result<u64, Value> {
    match input.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(value) => value
            .as_u64()
            .filter(|n| *n <= max)
            .ok_or_else(|| json!({"error": format!("{key} must be a whole number from 0 to {max}, got {value}")})),
    }
}

/// An append-only file of engine effects, one JSON object per line:
/// `{"process_id", "pod", "generation", "attempt", "what": "start"|"step"|"stop", "at_ns"}`,
/// `at_ns` in nanoseconds since the Unix epoch (wall clock).
pub struct DemoJournal {
    pod: String,
    file: Mutex<File>,
}

impl DemoJournal {
    /// Opens (creates, appends to) the journal at `path` for pod `pod`.
    pub fn open(path: &Path, pod: &str) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self {
            pod: pod.to_owned(),
            file: Mutex::new(file),
        })
    }

    fn record(&self, run: &RunContext, what: &str) {
        let at_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos());
        let line = json!({
            "process_id": run.process.id,
            "pod": self.pod,
            "generation": run.events.lease().generation,
            "attempt": run.attempt,
            "what": what,
            "at_ns": at_ns,
        });
        let mut file = self
            .file
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Err(err) = writeln!(file, "{line}") {
            tracing::warn!(error = %err, "could not write the demo journal");
        }
    }
}

/// Records an effect in the journal, if any.
fn effect(journal: &Option<Arc<DemoJournal>>, run: &RunContext, what: &str) {
    if let Some(journal) = journal {
        journal.record(run, what);
    }
}

/// Emits N `step` events with a delay, then completes. Each step is an "effect": it is taken
/// only while the run surely owns the process ([`RunContext::is_owner`]).
#[derive(Default)]
pub struct StepsEngine {
    journal: Option<Arc<DemoJournal>>,
}

#[async_trait]
impl ProcessEngine for StepsEngine {
    async fn run(&self, run: RunContext) -> EngineResult {
        let result = self.steps(&run).await;
        effect(&self.journal, &run, "stop");
        result
    }
}

impl StepsEngine {
    async fn steps(&self, run: &RunContext) -> EngineResult {
        let steps = number(&run.process.input, "steps", 5, 10_000)?;
        let delay = Duration::from_millis(number(&run.process.input, "delay_ms", 500, 60_000)?);
        if !run.is_owner() {
            return Err(json!({"error": "stopped before the first step"}));
        }
        effect(&self.journal, run, "start");
        for i in 1..=steps {
            tokio::select! {
                _ = run.cancel.cancelled() => return Err(json!({"error": "cancelled"})),
                _ = tokio::time::sleep(delay) => {}
            }
            if !run.is_owner() {
                return Err(json!({"error": "stopped"}));
            }
            effect(&self.journal, run, "step");
            let step = json!({"i": i, "of": steps, "attempt": run.attempt});
            // Transient database errors were retried already: an error here means the run
            // is being stopped (its answer is then ignored) or the store refused the step.
            if let Err(err) = run.events.append("step", step).await {
                return Err(json!({"error": err.to_string()}));
            }
        }
        Ok(json!({"steps": steps, "attempt": run.attempt}))
    }
}

/// Waits, then completes.
pub struct SleepEngine;

#[async_trait]
impl ProcessEngine for SleepEngine {
    async fn run(&self, run: RunContext) -> EngineResult {
        let ms = number(&run.process.input, "ms", 1000, 3_600_000)?;
        tokio::select! {
            _ = run.cancel.cancelled() => Err(json!({"error": "cancelled"})),
            _ = tokio::time::sleep(Duration::from_millis(ms)) => Ok(json!({"slept_ms": ms})),
        }
    }
}

/// Spawns `steps` children and joins them; see the module doc.
pub struct FanoutEngine;

#[async_trait]
impl ProcessEngine for FanoutEngine {
    async fn run(&self, run: RunContext) -> EngineResult {
        let input = &run.process.input;
        let children = number(input, "children", 3, 20)?;
        let steps = number(input, "steps", 5, 10_000)?;
        let delay_ms = number(input, "delay_ms", 500, 60_000)?;
        let mut spawned = Vec::new();
        for n in 0..children {
            let registration = crate::model::ProcessRegistration::new(
                "steps",
                json!({"steps": steps, "delay_ms": delay_ms}),
            );
            spawned.push(run.spawn(&format!("c{n}"), registration).await?);
        }
        let ends = if spawned.is_empty() {
            Vec::new()
        } else {
            run.join_all(&spawned).await?
        };
        let states: Vec<Value> = ends.iter().map(|end| json!(end.state)).collect();
        Ok(json!({"children": children, "states": states}))
    }
}

/// Fails at once.
pub struct FailEngine;

#[async_trait]
impl ProcessEngine for FailEngine {
    async fn run(&self, run: RunContext) -> EngineResult {
        let message = run
            .process
            .input
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("the fail engine always fails")
            .to_owned();
        Err(json!({"error": message}))
    }
}

/// An order in five durable parts; see the module doc.
#[derive(Default)]
pub struct OrderEngine {
    journal: Option<Arc<DemoJournal>>,
}

impl OrderEngine {
    /// The retry policy of the `order` kind: 4 runs, 1 s doubling.
    pub fn retry_policy() -> crate::model::RetryPolicy {
        crate::model::RetryPolicy::attempts(4)
    }

    /// `W` ms of work as step `name`: recorded in the journal each time it executes.
    async fn work(
        &self,
        run: &RunContext,
        name: &str,
        output: Value,
        work: Duration,
    ) -> EngineResult {
        let journal = self.journal.clone();
        let value = run
            .step(name, || async move {
                tokio::select! {
                    _ = run.cancel.cancelled() => return Err(json!({"error": "cancelled"})),
                    _ = tokio::time::sleep(work) => {}
                }
                if !run.is_owner() {
                    return Err(json!({"error": "stopped"}));
                }
                effect(&journal, run, &format!("step:{name}"));
                Ok(output)
            })
            .await?;
        Ok(value)
    }
}

#[async_trait]
impl ProcessEngine for OrderEngine {
    async fn run(&self, run: RunContext) -> EngineResult {
        let input = &run.process.input;
        let work = Duration::from_millis(number(input, "work_ms", 500, 60_000)?);
        let ship_after = Duration::from_millis(number(input, "ship_after_ms", 5_000, 86_400_000)?);
        let declines = number(input, "declines", 0, 10)?;
        if !run.is_owner() {
            return Err(json!({"error": "stopped before it began"}));
        }
        effect(&self.journal, &run, "start");
        let reserved = self
            .work(&run, "reserve", json!({"reserved": run.process.id}), work)
            .await?;
        let approval = run.recv("approve", None).await?.unwrap_or(Value::Null);
        if approval.get("approved") == Some(&Value::Bool(false)) {
            return Err(json!({"error": "the order was declined", "approval": approval}));
        }
        let runs_so_far = u64::try_from(run.process.retries).unwrap_or_default();
        if runs_so_far < declines {
            return Err(run.retryable(json!({
                "error": "the card was declined",
                "retries": run.process.retries,
            })));
        }
        let charged = self
            .work(
                &run,
                "charge",
                json!({"charged": true, "approval": approval}),
                work,
            )
            .await?;
        run.sleep("cooling", ship_after).await?;
        let shipped = self
            .work(
                &run,
                "ship",
                json!({"tracking": format!("T-{}", run.process.id)}),
                work,
            )
            .await?;
        Ok(json!({"reserve": reserved, "charge": charged, "ship": shipped}))
    }
}

/// `steps`, `sleep`, `fail` and `order`.
pub fn demo_engines() -> Engines {
    demo_engines_with(None)
}

/// [`demo_engines`] whose `steps` and `order` engines record their effects in `journal`.
pub fn demo_engines_with(journal: Option<Arc<DemoJournal>>) -> Engines {
    Engines::new()
        .with(
            "steps",
            StepsEngine {
                journal: journal.clone(),
            },
        )
        .with("sleep", SleepEngine)
        .with("fail", FailEngine)
        .with("fanout", FanoutEngine)
        .with("order", OrderEngine { journal })
        .with_retry("order", OrderEngine::retry_policy())
}
