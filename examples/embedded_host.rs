//! A host that embeds proclog and runs its own engine.
//!
//! The host starts one pod's stack with `Proclog::builder`, runs its "send-invoice" engine with
//! `Pod::builder`, registers a process, waits for its terminal state with
//! `stack.driver().await_terminal`, prints the log, and shuts down (pod first, then stack).
//!
//! The engine shows the two rules for work that may run more than once (a process is run again
//! when its owner is lost):
//! - check `run.is_owner()` right before an effect outside the database, and key that effect
//!   by something stable (here the process id), so that a rerun does not repeat it;
//! - record each step with `RunEvents::append_with_key` and a key of your own: a rerun that
//!   appends the same key and content gets the stored event back instead of a second one.
//!
//! Database: `DATABASE_URL` if set (migrated at start; use a database no other pod serves, or
//! such a pod may claim the process and fail it for want of a "send-invoice" engine), otherwise
//! a new database on a throwaway local Postgres from `proclog::testing::migrated_database_url()`
//! (needs the PostgreSQL server binaries; it stops when this program exits).
//!
//! ```sh
//! cargo run --example embedded_host
//! ```
//!
//! Exits 0 when the process completed as expected, non-zero on any failure.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proclog::pod::{EngineResult, Pod, ProcessEngine, RunContext};
use proclog::{AppendRequest, ProcessRegistration, Proclog, TerminalState, async_trait};
use serde_json::{Value, json};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// A stand-in for an external service (an e-mail provider, a payment API) that accepts an
/// idempotency key, as most such services do: a second call with the same key does nothing.
#[derive(Default)]
struct Mailer {
    sent: Mutex<HashMap<String, Value>>,
}

impl Mailer {
    /// Sends `invoice` unless a send with `key` was made already; true if it sent now.
    fn send_once(&self, key: &str, invoice: &Value) -> bool {
        let mut sent = self.sent.lock().unwrap();
        if sent.contains_key(key) {
            return false;
        }
        sent.insert(key.to_owned(), invoice.clone());
        true
    }
}

/// The host's engine for processes of kind "send-invoice".
struct SendInvoice {
    mailer: Arc<Mailer>,
}

#[async_trait]
impl ProcessEngine for SendInvoice {
    async fn run(&self, run: RunContext) -> EngineResult {
        let failed = |err: proclog::ProcessError| json!({"error": err.to_string()});
        let order = run.process.input["order"].clone();
        println!(
            "engine: running {} (attempt {}) for order {order}",
            run.process.id, run.attempt
        );

        // Step 1, inside the database: an event with our own replay key. Its payload must be
        // the same on every attempt (no attempt number, no clock), or a rerun would get
        // `ReplayConflict` instead of the stored event.
        let prepared = run
            .events
            .append_with_key("invoice.prepared", json!({"order": order}), "prepare")
            .await
            .map_err(failed)?;
        println!(
            "engine: step 'prepare' {} at seq {}",
            if prepared.replayed {
                "found done by an earlier run"
            } else {
                "recorded"
            },
            prepared.event.seq
        );

        // Step 2, outside the database. Right before the effect: are we still the owner? A pod
        // paused or cut off past its lease must not act; another pod has the process by now.
        if !run.is_owner() {
            // What a run returns once it has lost its lease is ignored; just stop.
            return Err(json!({"error": "lease lost before sending"}));
        }
        // The effect is keyed by the process id, so a rerun after a crash between the send and
        // the event below does not send twice.
        let key = format!("invoice:{}", run.process.id);
        let sent_now = self.mailer.send_once(&key, &json!({"order": order}));
        println!("engine: mailer called with key {key} (sent now: {sent_now})");
        run.events
            .append_with_key("invoice.sent", json!({"order": order, "key": key}), "send")
            .await
            .map_err(failed)?;

        // Ok completes the process with this output; Err(output) would fail it.
        Ok(json!({"order": order, "sent": true}))
    }
}

/// `DATABASE_URL` if set, otherwise a new, migrated database on a throwaway local Postgres.
async fn database_url() -> Result<String, Error> {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => Ok(url),
        _ => Ok(proclog::testing::migrated_database_url().await?),
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let url = database_url().await?;

    // One pod's stack: connects, applies pending migrations, starts NOTIFY forwarding, the
    // listener, subscriptions and the await driver.
    let stack = Proclog::builder(url).pod_id("billing-1").start().await?;
    println!("stack started as pod {}", stack.pod_id());

    // A pod running our engine under leases (claims, renewals, recovery, bounded drain).
    let mailer = Arc::new(Mailer::default());
    let pod = Pod::builder(&stack)
        .engine(
            "send-invoice",
            SendInvoice {
                mailer: Arc::clone(&mailer),
            },
        )
        .concurrency(4)
        .start()
        .await?;

    // Register a process: it is `pending` until a pod claims it.
    let process = stack
        .registry()
        .register_process(ProcessRegistration::new(
            "send-invoice",
            json!({"order": 42}),
        ))
        .await?;
    // The stack's registry wakes the pods (this one and the others) as it registers
    // runnable work: the process starts now, not at the next poll.
    println!("registered {} ({})", process.id, process.status);

    // Wait for the durable terminal column (never for a hint).
    let terminal = stack
        .driver()
        .await_terminal(&process.id, Duration::from_secs(30))
        .await?;
    println!(
        "terminal: {} at seq {}, output {}",
        terminal.state, terminal.seq, terminal.output
    );

    // The log is the truth: print it.
    println!("log of {}:", process.id);
    let events = stack.registry().events_after(&process.id, 0, 100).await?;
    for event in &events {
        println!(
            "  {:>2} {:<18} {} (writer {}, lease generation {:?})",
            event.seq, event.event_type, event.payload, event.writer, event.lease_generation
        );
    }

    // What a rerun of step 'send' would get: the stored event, not a second one. A replay is
    // answered even now that the log is sealed by its terminal event.
    let sent = events
        .iter()
        .find(|event| event.event_type == "invoice.sent")
        .ok_or("no invoice.sent event")?;
    let again = stack
        .registry()
        .append_event(
            &process.id,
            AppendRequest::new("invoice.sent", sent.payload.clone()).with_replay_key("send"),
        )
        .await?;
    println!(
        "appending step 'send' again: replayed = {}, seq {} (the stored event)",
        again.replayed, again.event.seq
    );

    // Stop the pod first (it drains its runs), then the stack.
    pod.shutdown().await;
    stack.shutdown().await;

    let sends = mailer.sent.lock().unwrap().len();
    println!("mailer sends: {sends}");
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    let expected = [
        "process.started",
        "invoice.prepared",
        "invoice.sent",
        "process.completed",
    ];
    if terminal.state != TerminalState::Completed
        || types != expected
        || !again.replayed
        || again.event.seq != sent.seq
        || sends != 1
    {
        return Err(format!("unexpected outcome: {types:?}, {sends} sends").into());
    }
    println!("ok");
    Ok(())
}
