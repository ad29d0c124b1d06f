//! A subscriber that sees every event exactly once, in order, from notifications that may be
//! lost, duplicated or late.
//!
//! Notifications (a host's sink, hub ticks, NOTIFY from other pods) are hints: each one only
//! says "read again". The subscriber keeps the last seq it delivered and, whenever it is woken,
//! reads `registry.events_after(id, last_seq, limit)` until it is caught up. Since every read
//! starts right after the last delivered seq, a lost hint only delays an event, and a
//! duplicate or stale hint costs one read: no gap, no repeat. Two rules make it complete:
//! - be listening before the first read, so that no hint between the read and the wait is lost;
//! - also wake on a timer (a safety poll), for the hints that never come: a sink never sees
//!   the terminal event, and hints are lost across crashes and reconnects.
//!
//! Here the hints come from a sink with a channel of 1 that drops when full, while a writer
//! appends 60 events in bursts and completes the process. Then the same is done with what
//! proclog ships: `stack.subscriptions().subscribe(id, after_seq)`, a stream with the same
//! guarantee (woken by hub ticks and NOTIFY, with a safety poll of its own).
//!
//! Database: `DATABASE_URL` if set (migrated at start), otherwise a new database on a
//! throwaway local Postgres from `proclog::testing::migrated_database_url()` (needs the
//! PostgreSQL server binaries; it stops when this program exits).
//!
//! ```sh
//! cargo run --example reconciling_subscriber
//! ```
//!
//! Exits 0 when both subscribers saw the whole log in order, non-zero on any failure.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use proclog::{
    AppendRequest, Completion, Disposition, ProcessEvent, ProcessEventSink, ProcessId,
    ProcessRegistration, ProcessRegistry, Proclog, TerminalState, async_trait,
};
use serde_json::json;
use tokio::sync::mpsc;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Events read per `events_after` call.
const PAGE: u32 = 16;
/// How long a lost hint can delay the subscriber.
const SAFETY_POLL: Duration = Duration::from_millis(250);
/// Events the writer appends before completing.
const EVENTS: i64 = 60;

/// A hint: "process `id` has events up to `seq`". Carries no data.
struct Hint {
    id: ProcessId,
    seq: i64,
}

/// A lossy source of hints: `try_send` onto a tiny channel, dropping when full.
struct HintSink {
    hints: mpsc::Sender<Hint>,
    dropped: AtomicU64,
}

#[async_trait]
impl ProcessEventSink for HintSink {
    async fn emit(&self, event: &ProcessEvent) {
        let hint = Hint {
            id: event.process_id.clone(),
            seq: event.seq,
        };
        if self.hints.try_send(hint).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What woke the subscriber, and how often a read found something.
#[derive(Default, Debug)]
struct Wakeups {
    hints: u64,
    stale_hints: u64,
    safety_polls: u64,
    polls_that_found_events: u64,
}

/// Delivers every event of `id` after `last_seq`, exactly once and in order, until the terminal
/// event. `hints` must exist before the first read (it does: it was created with the sink).
async fn reconcile(
    registry: Arc<dyn ProcessRegistry>,
    id: ProcessId,
    mut last_seq: i64,
    mut hints: mpsc::Receiver<Hint>,
) -> Result<(Vec<ProcessEvent>, Wakeups), Error> {
    let mut delivered = Vec::new();
    let mut wakeups = Wakeups::default();
    let mut woken_by_poll = false;
    loop {
        // Catch up: read after the last delivered seq until a page comes back short.
        let mut found = false;
        loop {
            let page = registry.events_after(&id, last_seq, PAGE).await?;
            let short = page.len() < PAGE as usize;
            for event in page {
                // The registry hands out dense seqs in order; this is what "exactly once, in
                // order" rests on.
                if event.seq != last_seq + 1 {
                    return Err(format!("gap: {} after {last_seq}", event.seq).into());
                }
                last_seq = event.seq;
                found = true;
                let terminal = event.is_terminal();
                delivered.push(event);
                if terminal {
                    // The sink never sees the terminal event: usually a safety poll finds it.
                    wakeups.polls_that_found_events += u64::from(woken_by_poll);
                    return Ok((delivered, wakeups));
                }
            }
            if short {
                break;
            }
        }
        wakeups.polls_that_found_events += u64::from(found && woken_by_poll);
        // Wait for a hint about this process, or the safety poll.
        woken_by_poll = false;
        tokio::select! {
            hint = hints.recv() => match hint {
                Some(hint) if hint.id == id && hint.seq > last_seq => wakeups.hints += 1,
                // Another process, or events already delivered: harmless, read anyway.
                Some(_) => wakeups.stale_hints += 1,
                // The hint source is gone: the safety poll alone still gets everything.
                None => tokio::time::sleep(SAFETY_POLL).await,
            },
            _ = tokio::time::sleep(SAFETY_POLL) => {
                wakeups.safety_polls += 1;
                woken_by_poll = true;
            }
        }
    }
}

/// `DATABASE_URL` if set, otherwise a new, migrated database on a throwaway local Postgres.
async fn database_url() -> Result<String, Error> {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => Ok(url),
        _ => Ok(proclog::testing::migrated_database_url().await?),
    }
}

/// Checks that `events` is the whole log 1..=n, ending with the terminal event.
fn check_whole_log(name: &str, events: &[ProcessEvent], last_seq: i64) -> Result<(), Error> {
    let seqs: Vec<i64> = events.iter().map(|event| event.seq).collect();
    let expected: Vec<i64> = (1..=last_seq).collect();
    if seqs != expected || !events.last().is_some_and(ProcessEvent::is_terminal) {
        return Err(format!("{name}: got seqs {seqs:?}, expected 1..={last_seq}").into());
    }
    println!(
        "{name}: {} events, seqs 1..={last_seq} in order, ending with {}",
        events.len(),
        events[events.len() - 1].event_type
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let url = database_url().await?;
    let (hints, hint_receiver) = mpsc::channel(1);
    let sink = Arc::new(HintSink {
        hints,
        dropped: AtomicU64::new(0),
    });
    let stack = Proclog::builder(url)
        .pod_id("subscriber-demo")
        .sink(sink.clone())
        .start()
        .await?;
    let registry = Arc::clone(stack.registry());

    let process = registry
        .register_process(
            ProcessRegistration::new("subscriber-demo", json!({}))
                .with_disposition(Disposition::External),
        )
        .await?;
    let id = process.id.clone();
    println!("registered {id}");

    // Both subscribers start before the writer, from seq 0.
    let ours = tokio::spawn(reconcile(
        Arc::clone(&registry),
        id.clone(),
        0,
        hint_receiver,
    ));
    let shipped = tokio::spawn(
        stack
            .subscriptions()
            .subscribe(id.clone(), 0)
            .collect::<Vec<_>>(),
    );

    // The writer: bursts of 1 to 6 events, a few ms apart, then the completion.
    let mut seq = 0;
    let mut burst = 1;
    while seq < EVENTS {
        let n = burst.min(EVENTS - seq);
        let requests = (0..n)
            .map(|i| AppendRequest::new("tick", json!({"n": seq + i + 1})))
            .collect();
        registry.append_events(&id, requests).await?;
        seq += n;
        burst = burst % 6 + 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    registry
        .complete_process(
            &id,
            Completion::new(TerminalState::Completed, json!({"events": EVENTS})),
        )
        .await?;
    println!(
        "writer: {EVENTS} events and the completion; the sink dropped {} hints",
        sink.dropped.load(Ordering::Relaxed)
    );

    let cap = Duration::from_secs(20);
    let (events, wakeups) = tokio::time::timeout(cap, ours).await???;
    println!("reconciling subscriber woken by: {wakeups:?}");
    check_whole_log("reconciling subscriber", &events, EVENTS + 1)?;

    let streamed: Vec<ProcessEvent> = tokio::time::timeout(cap, shipped)
        .await??
        .into_iter()
        .collect::<Result<_, _>>()?;
    check_whole_log(
        "stack.subscriptions().subscribe(id, 0)",
        &streamed,
        EVENTS + 1,
    )?;

    // A subscription resumes from any seq (e.g. the last one a client acknowledged), and ends
    // after the terminal event.
    let resumed: Vec<i64> = stack
        .subscriptions()
        .subscribe(id.clone(), EVENTS - 2)
        .map(|event| event.map(|event| event.seq))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    println!("subscribe(id, {}) yields seqs {resumed:?}", EVENTS - 2);
    if resumed != [EVENTS - 1, EVENTS, EVENTS + 1] {
        return Err("unexpected resumed subscription".into());
    }

    stack.shutdown().await;
    println!("ok");
    Ok(())
}
