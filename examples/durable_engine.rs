//! A durable engine (CONTRACT §9): steps that run once per process, a wait for a message
//! that holds no pod, and a durable timer, on a pod over the in-memory registry (no database
//! needed). Run with `cargo run --example durable_engine`; it prints what happened and exits
//! non-zero on any failure.
//!
//! The engine reserves stock, waits for an `approve` message, charges, sleeps, and ships.
//! Each step's body prints when it really runs: after the wait the process is resumed by a
//! new run, which replays `reserve` from the log instead of reserving again.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use proclog::pod::{EngineResult, Pod, ProcessEngine, RunContext};
use proclog::{
    InMemoryProcessRegistry, Message, ProcessRegistration, ProcessStatus, Proclog, RegistryConfig,
    TerminalState, async_trait,
};
use serde_json::{Value, json};

struct Order {
    /// How many times a step body really ran, all steps together.
    executions: Arc<AtomicU32>,
}

#[async_trait]
impl ProcessEngine for Order {
    async fn run(&self, run: RunContext) -> EngineResult {
        println!(
            "  run of attempt {} (resumed: {})",
            run.attempt, run.resumed
        );
        let executions = Arc::clone(&self.executions);
        let hold: Value = run
            .step("reserve", || async move {
                executions.fetch_add(1, Ordering::Relaxed);
                println!("    reserve: executed");
                Ok(json!({"hold": "H-1"}))
            })
            .await?;
        // Waits without a pod: the process is suspended until a message of `approve` comes.
        let approval = run.recv("approve", None).await?.unwrap_or(Value::Null);
        let executions = Arc::clone(&self.executions);
        let charge: Value = run
            .step("charge", || async move {
                executions.fetch_add(1, Ordering::Relaxed);
                println!("    charge: executed");
                Ok(json!({"charged": 42}))
            })
            .await?;
        // A durable timer on the database clock (short ones are slept in the run).
        run.sleep("cooling", Duration::from_millis(200)).await?;
        Ok(json!({"hold": hold, "approval": approval, "charge": charge}))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let stack = Proclog::in_memory(
        InMemoryProcessRegistry::new(RegistryConfig::new("example-pod")),
        Duration::from_secs(5),
    );
    let executions = Arc::new(AtomicU32::new(0));
    let pod = Pod::builder(&stack)
        .engine(
            "order",
            Order {
                executions: Arc::clone(&executions),
            },
        )
        .start()
        .await?;
    let record = stack
        .registry()
        .register_process(ProcessRegistration::new("order", json!({"sku": "A-1"})))
        .await?;
    println!("registered {}", record.id);

    // Wait until the run has suspended the process for the message.
    loop {
        let now = stack
            .registry()
            .get_process(&record.id)
            .await?
            .expect("registered");
        if now.status == ProcessStatus::Waiting {
            println!(
                "  waiting for {:?}, holding no lease: {}",
                now.waiting_for,
                now.lease.is_none()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stack
        .registry()
        .send_message(
            &record.id,
            Message::new("approve", json!({"by": "ann"})).with_replay_key("approval-1"),
        )
        .await?;
    println!("sent approve");
    let end = stack
        .driver()
        .await_terminal(&record.id, Duration::from_secs(30))
        .await?;
    println!("ended {} with {}", end.state, end.output);
    pod.shutdown().await;
    stack.shutdown().await;

    assert_eq!(end.state, TerminalState::Completed);
    assert_eq!(end.output["approval"]["by"], "ann");
    assert_eq!(
        executions.load(Ordering::Relaxed),
        2,
        "reserve and charge ran once each, though the process ran twice"
    );
    println!("ok: each step ran once");
    Ok(())
}
