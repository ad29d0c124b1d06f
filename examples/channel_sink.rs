//! A host's own `ProcessEventSink`: hand each committed event to a bounded channel, and drop
//! (and count) it when the channel is full.
//!
//! A sink is called inline after every committed append made through the stack's registry,
//! next to proclog's own NOTIFY forwarding. Its contract (see `ProcessEventSink`): `emit`
//! cannot fail or roll back the write, and it must return fast, so real work goes to a channel
//! or background task that drops when full. It is best effort: the terminal event never goes
//! through it, and nothing is buffered or retried. A consumer that needs every event
//! reconciles from `events_after` (see `examples/reconciling_subscriber.rs`).
//!
//! This program installs such a sink with `Proclog::builder(..).sink(..)`, feeds a slow
//! consumer task through a channel of 4, appends a few events calmly (all delivered), then a
//! burst of 20 in one batch (most dropped, the writes unaffected), and prints the counts.
//!
//! Database: `DATABASE_URL` if set (migrated at start), otherwise a new database on a
//! throwaway local Postgres from `proclog::testing::migrated_database_url()` (needs the
//! PostgreSQL server binaries; it stops when this program exits).
//!
//! ```sh
//! cargo run --example channel_sink
//! ```
//!
//! Exits 0 when the counts add up, non-zero on any failure.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proclog::{
    AppendRequest, Completion, Disposition, ProcessEvent, ProcessEventSink, ProcessRegistration,
    Proclog, TerminalState, async_trait,
};
use serde_json::json;
use tokio::sync::mpsc::{self, error::TrySendError};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Puts each event on a bounded channel without ever waiting; counts what it had to drop.
struct ChannelSink {
    events: mpsc::Sender<ProcessEvent>,
    delivered: AtomicU64,
    dropped: AtomicU64,
}

#[async_trait]
impl ProcessEventSink for ChannelSink {
    async fn emit(&self, event: &ProcessEvent) {
        // `try_send`, never `send().await`: a slow consumer must not slow down (or block) the
        // append path. For big payloads, send only `(process_id, seq)` and let the consumer
        // read the event from the registry.
        match self.events.try_send(event.clone()) {
            Ok(()) => self.delivered.fetch_add(1, Ordering::Relaxed),
            // Full (the consumer is behind) or closed (it is gone): drop and count.
            Err(TrySendError::Full(_) | TrySendError::Closed(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed)
            }
        };
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

    // A tiny channel, so that a burst overflows it.
    let (sender, mut receiver) = mpsc::channel::<ProcessEvent>(4);
    let sink = Arc::new(ChannelSink {
        events: sender,
        delivered: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
    });
    let stack = Proclog::builder(url)
        .pod_id("sink-demo")
        .sink(sink.clone())
        .start()
        .await?;

    // The consumer: slow on purpose (20 ms per event), e.g. it pushes to a websocket.
    let received = Arc::new(Mutex::new(Vec::<i64>::new()));
    let consumer = {
        let received = Arc::clone(&received);
        tokio::spawn(async move {
            while let Some(event) = receiver.recv().await {
                tokio::time::sleep(Duration::from_millis(20)).await;
                println!(
                    "  consumer got seq {:>2} {} {}",
                    event.seq, event.event_type, event.payload
                );
                received.lock().unwrap().push(event.seq);
            }
        })
    };

    // An `external` process: driven by this program, never run by a pod.
    let process = stack
        .registry()
        .register_process(
            ProcessRegistration::new("sink-demo", json!({}))
                .with_disposition(Disposition::External),
        )
        .await?;
    let id = process.id.clone();
    println!("registered {id}");

    println!("calm: 3 appends, 100 ms apart");
    for i in 1..=3 {
        stack
            .registry()
            .append_event(&id, AppendRequest::new("calm", json!({"i": i})))
            .await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    println!("burst: 20 events in one append");
    let burst: Vec<AppendRequest> = (1..=20)
        .map(|i| AppendRequest::new("burst", json!({"i": i})))
        .collect();
    let written = stack.registry().append_events(&id, burst).await?;
    println!(
        "  the append committed seqs {}..={} regardless of the sink",
        written[0].event.seq,
        written[written.len() - 1].event.seq
    );

    // Completing is never emitted through the sink.
    stack
        .registry()
        .complete_process(
            &id,
            Completion::new(TerminalState::Completed, json!("done")),
        )
        .await?;

    // Let the consumer catch up with what was delivered (bounded wait).
    let delivered = sink.delivered.load(Ordering::Relaxed);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while (received.lock().unwrap().len() as u64) < delivered {
        if tokio::time::Instant::now() > deadline {
            return Err("the consumer did not catch up".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    consumer.abort();

    let dropped = sink.dropped.load(Ordering::Relaxed);
    let received = received.lock().unwrap().clone();
    let record = stack
        .registry()
        .get_process(&id)
        .await?
        .ok_or("process vanished")?;
    let missed: Vec<i64> = (1..record.last_seq)
        .filter(|seq| !received.contains(seq))
        .collect();
    println!(
        "sink: {delivered} delivered, {dropped} dropped; the log has {} events (the last one \
         is the terminal event, which never goes through a sink)",
        record.last_seq
    );
    println!("the consumer missed seqs {missed:?}: to see them it reads events_after");
    stack.shutdown().await;

    if delivered + dropped != 23
        || dropped == 0
        || received.len() as u64 != delivered
        || record.last_seq != 24
        || received.iter().take(3).copied().collect::<Vec<_>>() != [1, 2, 3]
    {
        return Err("unexpected counts".into());
    }
    println!("ok");
    Ok(())
}
