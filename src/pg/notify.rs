//! `PgNotifier`: the LISTEN/NOTIFY-forwarding sink.
//!
//! `emit` (and the completion hint) only `try_send` a small notice (a process id, a seq, a
//! kind, a clock reading) onto a bounded channel, counting what is dropped when it is full.
//! One background task drains the channel, packs what it took into as few payloads as
//! possible (one line per process, see [`crate::watch::notice`]) and sends them in one round
//! trip (`pg_notify` over `unnest`), on its own connection, outside any append transaction.
//! Postgres serialises the commits of transactions that NOTIFY, so batching them here,
//! instead of notifying inside each append, keeps appends free to group-commit; packing
//! spares every listening pod a message and a decode per event.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::Pool;
use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::model::{ProcessEvent, ProcessId};
use crate::watch::notice::{EVENTS_CHANNEL, NoticeKind, PackedNotice, WORK_CHANNEL, pack};
use crate::watch::sink::{CompletionHint, ProcessEventSink};

/// Most notices sent in one round trip.
const MAX_BATCH: usize = 1000;

/// Least time from the start of one NOTIFY round trip to the start of the next. Under load a
/// round trip takes longer than this and nothing waits; at low load the notices of this
/// interval share one round trip, so that a lone appender does not pay a second transaction
/// (and every pod a wake-up) per event. A notice waits at most this long for company.
pub const MIN_SEND_INTERVAL: Duration = Duration::from_millis(1);

/// Counters of a [`PgNotifier`], readable at any time.
#[derive(Debug, Default)]
pub struct NotifierStats {
    /// Notices accepted onto the channel.
    pub enqueued: AtomicU64,
    /// Notices handed to Postgres.
    pub sent: AtomicU64,
    /// Notices dropped because the channel was full or a send failed.
    pub dropped: AtomicU64,
    /// Of the dropped notices, those accepted onto the channel whose send then failed.
    pub failed: AtomicU64,
    /// Round trips made.
    pub batches: AtomicU64,
    /// NOTIFY payloads sent (each packs the notices of one or more processes).
    pub payloads: AtomicU64,
}

/// A hint waiting to be sent.
enum Outgoing {
    /// Of a process: what happened, its seq, and when the writer learnt it (µs since the
    /// Unix epoch).
    Notice {
        process_id: ProcessId,
        seq: i64,
        kind: NoticeKind,
        at_us: i64,
    },
    /// Runnable work may exist.
    Work,
}

/// The NOTIFY-forwarding sink and completion hint of one pod. Clones share the channel.
#[derive(Clone)]
pub struct PgNotifier {
    queue: mpsc::Sender<Outgoing>,
    stats: Arc<NotifierStats>,
}

impl PgNotifier {
    /// Starts a background sender on `pool` (give it a pool of its own, size 1), for pod
    /// `pod`, with room for `capacity` pending notices, on its own: it stops when every clone
    /// of the notifier is dropped. A stack owns its sender instead (see [`PgNotifier::start`]).
    pub fn spawn(pool: Pool, pod: impl Into<String>, capacity: usize) -> Self {
        let (notifier, sender) = Self::start(pool, pod, capacity);
        tokio::spawn(sender(CancellationToken::new()));
        notifier
    }

    /// The notifier and its sender, for an owner to run (e.g. in a [`crate::tasks::TaskSet`]):
    /// the sender sends what is queued until its token fires, then what was queued by then,
    /// and ends.
    pub fn start(
        pool: Pool,
        pod: impl Into<String>,
        capacity: usize,
    ) -> (
        Self,
        impl FnOnce(CancellationToken) -> BoxFuture<'static, ()> + Send + 'static,
    ) {
        let (queue, pending) = mpsc::channel(capacity.max(1));
        let stats = Arc::new(NotifierStats::default());
        let sender_stats = Arc::clone(&stats);
        let pod: Arc<str> = Arc::from(pod.into());
        let sender = move |stop: CancellationToken| {
            send_batches(pool, pod, pending, sender_stats, stop).boxed()
        };
        let notifier = Self { queue, stats };
        (notifier, sender)
    }

    /// The notifier's counters.
    pub fn stats(&self) -> &Arc<NotifierStats> {
        &self.stats
    }

    /// Tells every pod that runnable processes may exist (after a registration or a release).
    pub fn work_available(&self) {
        self.enqueue(Outgoing::Work);
    }

    fn notice(&self, process_id: &ProcessId, seq: i64, kind: NoticeKind) {
        self.enqueue(Outgoing::Notice {
            process_id: process_id.clone(),
            seq,
            kind,
            at_us: chrono::Utc::now().timestamp_micros(),
        });
    }

    fn enqueue(&self, outgoing: Outgoing) {
        match self.queue.try_send(outgoing) {
            Ok(()) => self.stats.enqueued.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.stats.dropped.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// Waits (at most `timeout`) until every notice accepted so far has been sent or dropped;
    /// used before a pod exits so that its last hints go out.
    pub async fn flush(&self, timeout: Duration) {
        let settled = |stats: &NotifierStats| {
            let accepted = stats.enqueued.load(Ordering::Relaxed);
            let done = stats.sent.load(Ordering::Relaxed) + stats.failed.load(Ordering::Relaxed);
            done >= accepted
        };
        let _ = tokio::time::timeout(timeout, async {
            let mut pause = Backoff::new(Duration::from_millis(1), Duration::from_millis(50));
            while !settled(&self.stats) {
                tokio::time::sleep(pause.next_delay()).await;
            }
        })
        .await;
    }
}

#[async_trait]
impl ProcessEventSink for PgNotifier {
    async fn emit(&self, event: &ProcessEvent) {
        let kind = NoticeKind::of_event_type(&event.event_type);
        self.notice(&event.process_id, event.seq, kind);
    }
}

impl CompletionHint for PgNotifier {
    fn completed(&self, id: &ProcessId) {
        self.notice(id, 0, NoticeKind::Terminal);
    }
}

/// The NOTIFY calls of a batch of hints: its notices packed, one work hint at most.
fn notifications(pod: &str, batch: &[Outgoing]) -> (Vec<&'static str>, Vec<String>) {
    let stamp_us = batch
        .iter()
        .filter_map(|outgoing| match outgoing {
            Outgoing::Notice { at_us, .. } => Some(*at_us),
            Outgoing::Work => None,
        })
        .min()
        .unwrap_or_default();
    let notices = batch.iter().filter_map(|outgoing| match outgoing {
        Outgoing::Notice {
            process_id,
            seq,
            kind,
            ..
        } => Some(PackedNotice {
            process_id: process_id.as_str(),
            seq: *seq,
            kind: *kind,
        }),
        Outgoing::Work => None,
    });
    let mut payloads = pack(pod, stamp_us, notices);
    let mut channels = vec![EVENTS_CHANNEL; payloads.len()];
    if batch
        .iter()
        .any(|outgoing| matches!(outgoing, Outgoing::Work))
    {
        channels.push(WORK_CHANNEL);
        payloads.push(pod.to_owned());
    }
    (channels, payloads)
}

async fn send_batches(
    pool: Pool,
    pod: Arc<str>,
    mut pending: mpsc::Receiver<Outgoing>,
    stats: Arc<NotifierStats>,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut last_send: Option<tokio::time::Instant> = None;
    loop {
        let received = tokio::select! {
            received = pending.recv_many(&mut batch, MAX_BATCH) => received,
            () = stop.cancelled() => {
                // Stopping: accept no more, send what is queued, then end.
                pending.close();
                pending.recv_many(&mut batch, MAX_BATCH).await
            }
        };
        if received == 0 {
            return;
        }
        // Let appenders that are about to emit do so, so that one round trip carries them too.
        if let Some(last) = last_send {
            let due = last + MIN_SEND_INTERVAL;
            if due > tokio::time::Instant::now() && !stop.is_cancelled() {
                tokio::time::sleep_until(due).await;
            }
        }
        tokio::task::yield_now().await;
        last_send = Some(tokio::time::Instant::now());
        if batch.len() < MAX_BATCH {
            while let Ok(more) = pending.try_recv() {
                batch.push(more);
                if batch.len() == MAX_BATCH {
                    break;
                }
            }
        }
        let (channels, payloads) = notifications(&pod, &batch);
        match send(&pool, &channels, &payloads).await {
            Ok(()) => {
                stats.sent.fetch_add(batch.len() as u64, Ordering::Relaxed);
                stats.batches.fetch_add(1, Ordering::Relaxed);
                stats
                    .payloads
                    .fetch_add(payloads.len() as u64, Ordering::Relaxed);
                backoff.reset();
            }
            Err(err) => {
                // Notices are hints: subscribers reconcile from the log. Drop and go on.
                stats
                    .dropped
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                // Settled too: flush waits for these no longer.
                stats
                    .failed
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                tracing::warn!(error = %err, dropped = batch.len(), "could not send notices");
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
        batch.clear();
    }
}

async fn send(pool: &Pool, channels: &[&str], payloads: &[String]) -> Result<(), String> {
    let client = pool.get().await.map_err(|e| e.to_string())?;
    let statement = client
        .prepare_cached(
            // A NOTIFY transaction writes a commit record; notices are hints, so it need not
            // wait for the WAL flush (synchronous_commit off for this transaction only).
            "WITH local AS (SELECT set_config('synchronous_commit', 'off', true))
             SELECT pg_notify(n.channel, n.payload)
               FROM local,
                    unnest($1::text[], $2::text[]) WITH ORDINALITY AS n(channel, payload, ord)
              ORDER BY n.ord",
        )
        .await
        .map_err(|e| e.to_string())?;
    client
        .query(&statement, &[&channels, &payloads])
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}
