//! The engine harness hosts test their engines with, on proclog's own demo engines: every
//! fault it can inject, in memory and on Postgres.

use proclog::pod::RunEnd;
use proclog::pod::demo::{FailEngine, StepsEngine};
use proclog::testing::{EngineHarness, Fault};
use proclog::{Disposition, TerminalState};
use serde_json::json;

fn steps() -> EngineHarness {
    EngineHarness::new("steps", StepsEngine::default()).input(json!({"steps": 3, "delay_ms": 1}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_steps_engine_appends_its_steps_and_completes() {
    let report = steps().run().await.unwrap();
    assert_eq!(report.state(), Some(TerminalState::Completed));
    assert_eq!(
        report.event_types(),
        [
            "process.started",
            "step",
            "step",
            "step",
            "process.completed"
        ]
    );
    assert_eq!(report.output(), Some(&json!({"steps": 3, "attempt": 1})));
    assert_eq!(report.runs, [RunEnd::Ended(TerminalState::Completed)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_error_on_an_append_changes_nothing() {
    for committed in [false, true] {
        let report = steps()
            .fault(Fault::TransientAppend { nth: 2, committed })
            .run()
            .await
            .unwrap();
        assert_eq!(
            report.state(),
            Some(TerminalState::Completed),
            "{committed}"
        );
        assert_eq!(report.count("step"), 3, "each step once ({committed})");
        assert_eq!(report.record.attempts, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_reruns_a_rerun_process_and_abandons_an_abandon_process() {
    let rerun = steps()
        .fault(Fault::LoseLease { after_appends: 2 })
        .run()
        .await
        .unwrap();
    assert_eq!(rerun.state(), Some(TerminalState::Completed));
    assert_eq!(rerun.record.attempts, 2);
    assert_eq!(rerun.count("process.started"), 2);
    // The demo engine does not skip steps: 2 before the loss, 3 on the rerun.
    assert_eq!(rerun.count("step"), 5);
    assert_eq!(
        rerun.runs,
        [RunEnd::LeaseLost, RunEnd::Ended(TerminalState::Completed)]
    );
    let abandon = steps()
        .disposition(Disposition::Abandon)
        .fault(Fault::LoseLease { after_appends: 1 })
        .run()
        .await
        .unwrap();
    assert_eq!(abandon.state(), Some(TerminalState::Abandoned));
    assert_eq!(abandon.count("process.started"), 1, "run at most once");
    assert_eq!(abandon.output().unwrap()["reason"], "owner lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancellation_stops_the_engine() {
    let report = EngineHarness::new("steps", StepsEngine::default())
        .input(json!({"steps": 1000, "delay_ms": 5}))
        .fault(Fault::Cancel {
            after_appends: 1,
            reason: json!("enough"),
        })
        .run()
        .await
        .unwrap();
    assert_eq!(report.state(), Some(TerminalState::Cancelled));
    assert_eq!(report.output().unwrap()["request"]["reason"], "enough");
    assert!(report.count("step") < 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fail_engine_fails_on_postgres_too() {
    let url = proclog::testing::migrated_database_url().await.unwrap();
    let failed = EngineHarness::new("fail", FailEngine)
        .input(json!({"message": "no"}))
        .database_url(&url)
        .run()
        .await
        .unwrap();
    assert_eq!(failed.state(), Some(TerminalState::Failed));
    assert_eq!(failed.output(), Some(&json!({"error": "no"})));
    let rerun = steps()
        .database_url(&url)
        .fault(Fault::LoseLease { after_appends: 1 })
        .fault(Fault::TransientAppend {
            nth: 2,
            committed: true,
        })
        .run()
        .await
        .unwrap();
    assert_eq!(rerun.state(), Some(TerminalState::Completed));
    assert_eq!(rerun.record.attempts, 2);
}
