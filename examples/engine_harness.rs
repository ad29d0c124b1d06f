//! Testing your own engine with `proclog::testing::EngineHarness`: run it the way a pod runs
//! it, in memory (no database needed), with faults injected where you choose, and check the
//! log and the outcome. Run with `cargo run --example engine_harness`; it prints what
//! happened and exits non-zero on any failure.
//!
//! The engine below charges an order in two steps, each recorded with a replay key of its own,
//! and skips a step that an earlier run already recorded (`append_with_key` says so).

use proclog::pod::{EngineResult, ProcessEngine, RunContext};
use proclog::testing::{EngineHarness, Fault};
use proclog::{TerminalState, async_trait};
use serde_json::json;

struct Checkout;

#[async_trait]
impl ProcessEngine for Checkout {
    async fn run(&self, run: RunContext) -> EngineResult {
        let order = run.process.input["order"].clone();
        let failed = |err: proclog::ProcessError| json!({"error": err.to_string()});
        for step in ["reserve", "charge"] {
            let outcome = run
                .events
                .append_with_key(step, json!({"order": order}), step)
                .await
                .map_err(failed)?;
            if outcome.replayed {
                println!(
                    "  attempt {}: {step} was already stored (by an earlier run, or a retry of this one)",
                    run.attempt
                );
            } else {
                println!("  attempt {}: {step} done", run.attempt);
            }
        }
        Ok(json!({"order": order, "charged": true}))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("a plain run:");
    let plain = EngineHarness::new("checkout", Checkout)
        .input(json!({"order": 7}))
        .run()
        .await?;
    assert_eq!(plain.state(), Some(TerminalState::Completed));
    assert_eq!(
        plain.event_types(),
        ["process.started", "reserve", "charge", "process.completed"]
    );

    println!("the pod is lost right after the first step:");
    let rerun = EngineHarness::new("checkout", Checkout)
        .input(json!({"order": 8}))
        .fault(Fault::LoseLease { after_appends: 1 })
        .run()
        .await?;
    assert_eq!(rerun.state(), Some(TerminalState::Completed));
    assert_eq!(rerun.record.attempts, 2);
    assert_eq!((rerun.count("reserve"), rerun.count("charge")), (1, 1));

    println!("the database blips while the charge is written:");
    let blip = EngineHarness::new("checkout", Checkout)
        .input(json!({"order": 9}))
        .fault(Fault::TransientAppend {
            nth: 2,
            committed: true,
        })
        .run()
        .await?;
    assert_eq!(blip.state(), Some(TerminalState::Completed));
    assert_eq!(blip.count("charge"), 1);

    println!("the customer cancels after the reservation:");
    let cancelled = EngineHarness::new("checkout", Checkout)
        .input(json!({"order": 10}))
        .fault(Fault::Cancel {
            after_appends: 1,
            reason: json!("changed my mind"),
        })
        .run()
        .await?;
    println!(
        "  ended {:?}: {:?}",
        cancelled.state(),
        cancelled.event_types()
    );
    assert!(matches!(
        cancelled.state(),
        Some(TerminalState::Cancelled | TerminalState::Completed)
    ));
    println!("all checks passed");
    Ok(())
}
