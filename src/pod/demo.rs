//! Demo engines shipped with the pod binary, for watching crash semantics.
//!
//! - `steps`: input `{"steps": N, "delay_ms": D}` (defaults 5 and 500): appends N `step`
//!   events `{i, of, attempt}` D ms apart, then completes with `{steps, attempt}`.
//! - `sleep`: input `{"ms": D}` (default 1000): waits, then completes with `{slept_ms}`.
//! - `fail`: input `{"message": M}`: fails at once with `{error: M}`.

use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};

use super::engine::{EngineResult, Engines, ProcessEngine, RunContext};

fn number(input: &Value, key: &str, default: u64) -> u64 {
    input.get(key).and_then(Value::as_u64).unwrap_or(default)
}

/// Emits N `step` events with a delay, then completes.
pub struct StepsEngine;

#[async_trait]
impl ProcessEngine for StepsEngine {
    async fn run(&self, run: RunContext) -> EngineResult {
        let steps = number(&run.process.input, "steps", 5);
        let delay = Duration::from_millis(number(&run.process.input, "delay_ms", 500));
        for i in 1..=steps {
            tokio::select! {
                _ = run.cancel.cancelled() => return Err(json!({"error": "cancelled"})),
                _ = tokio::time::sleep(delay) => {}
            }
            let step = json!({"i": i, "of": steps, "attempt": run.attempt});
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
        let ms = number(&run.process.input, "ms", 1000);
        tokio::select! {
            _ = run.cancel.cancelled() => Err(json!({"error": "cancelled"})),
            _ = tokio::time::sleep(Duration::from_millis(ms)) => Ok(json!({"slept_ms": ms})),
        }
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

/// `steps`, `sleep` and `fail`.
pub fn demo_engines() -> Engines {
    Engines::new()
        .with("steps", StepsEngine)
        .with("sleep", SleepEngine)
        .with("fail", FailEngine)
}
