//! `PgListener`: one dedicated, unpooled connection per pod that LISTENs for notices and turns
//! them into local hub ticks.
//!
//! It pings its connection to detect loss, reconnects with backoff, and after every
//! (re)connect tells every local watcher to resynchronise from the log, since notices sent
//! while it was away are gone. At connect it sends a probe from a second connection: if the
//! probe does not arrive (a pooler in transaction mode, where LISTEN cannot work) it says so
//! and stops, leaving the pod in polling mode, where subscribers and waiters rely on their
//! safety polls.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use tokio::sync::{Notify, mpsc, watch};
use tokio_postgres::{AsyncMessage, Notification};
use tokio_util::sync::CancellationToken;

use super::tls::DatabaseTarget;
use crate::backoff::Backoff;
use crate::tasks::TaskHandle;
use crate::watch::hub::ProcessChangeHub;
use crate::watch::notice::{
    EVENTS_CHANNEL, EventNotice, NoticeKind, Pack, TERMINAL_CHANNEL, TerminalHint, WORK_CHANNEL,
};

/// Where the listener is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenerStatus {
    /// Connecting for the first time.
    Connecting,
    /// Connected, LISTENing, probe received.
    Listening,
    /// Connection lost; reconnecting with backoff.
    Reconnecting,
    /// LISTEN does not work on this connection (e.g. a transaction-mode pooler): the pod
    /// polls instead.
    Polling {
        /// Why.
        reason: String,
    },
}

/// Counters of a [`PgListener`].
#[derive(Debug, Default)]
pub struct ListenerStats {
    /// Notices received from other pods and turned into ticks.
    pub notices: AtomicU64,
    /// Reconnects after a lost connection.
    pub reconnects: AtomicU64,
    /// Sessions started (connect, LISTEN, probe): the first, reconnects, and the periodic
    /// retries after LISTEN was found not to work.
    pub sessions: AtomicU64,
    /// Time from an append's acknowledgement on another pod to its notice arriving here
    /// (wall clocks of both pods: skew between them shows here).
    pub notice_latency: crate::metrics::LatencyHistogram,
}

/// Tuning of a [`PgListener`].
#[derive(Clone, Debug)]
pub struct ListenerOptions {
    /// How often the connection is pinged to detect loss.
    pub ping_interval: Duration,
    /// How long a ping or the start-up probe may take.
    pub probe_timeout: Duration,
    /// Reconnect backoff floor.
    pub reconnect_floor: Duration,
    /// Reconnect backoff cap.
    pub reconnect_cap: Duration,
    /// After LISTEN was found not to work (a transaction-mode pooler), how long the listener
    /// polls before it tries LISTEN again (the pooler may have been reconfigured or removed).
    pub relisten_interval: Duration,
}

impl Default for ListenerOptions {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_secs(5),
            probe_timeout: Duration::from_secs(3),
            reconnect_floor: Duration::from_millis(50),
            reconnect_cap: Duration::from_secs(5),
            relisten_interval: Duration::from_secs(60),
        }
    }
}

/// A listener's status and counters. The listening itself is a task: owned by this value
/// when made by [`PgListener::spawn`] (dropping it stops listening), or by whoever runs the
/// task [`PgListener::start`] returns.
pub struct PgListener {
    status: watch::Receiver<ListenerStatus>,
    stats: Arc<ListenerStats>,
    task: Option<TaskHandle>,
}

impl PgListener {
    /// Stops listening now, when this value owns the task (also done on drop).
    /// Subscriptions fall back to their safety polls.
    pub fn stop(&mut self) {
        self.task.take();
    }

    /// Starts listening on `target` (a dedicated connection, never from a pool), ticking
    /// `hub` for notices written by pods other than `own_pod`, and notifying `work` for work
    /// hints from other pods (and after every reconnect). The returned value owns the task.
    pub fn spawn(
        target: DatabaseTarget,
        hub: Arc<ProcessChangeHub>,
        work: Arc<Notify>,
        own_pod: impl Into<String>,
        options: ListenerOptions,
    ) -> Self {
        let (mut listener, listen) = Self::start(target, hub, work, own_pod, options);
        listener.task = Some(TaskHandle::spawn(
            "listener",
            listen(CancellationToken::new()),
        ));
        listener
    }

    /// [`PgListener::spawn`] without spawning: the listening task is returned for an owner to
    /// run; it ends when its token fires.
    pub fn start(
        target: DatabaseTarget,
        hub: Arc<ProcessChangeHub>,
        work: Arc<Notify>,
        own_pod: impl Into<String>,
        options: ListenerOptions,
    ) -> (
        Self,
        impl FnOnce(CancellationToken) -> BoxFuture<'static, ()> + Send + 'static,
    ) {
        let (status_tx, status) = watch::channel(ListenerStatus::Connecting);
        let stats = Arc::new(ListenerStats::default());
        let task_stats = Arc::clone(&stats);
        let own_pod = own_pod.into();
        let listen = move |stop: CancellationToken| {
            async move {
                tokio::select! {
                    () = run(target, Targets { hub, work }, own_pod, options, status_tx, task_stats) => {}
                    () = stop.cancelled() => {}
                }
            }
            .boxed()
        };
        (
            Self {
                status,
                stats,
                task: None,
            },
            listen,
        )
    }

    /// The current status.
    pub fn status(&self) -> ListenerStatus {
        self.status.borrow().clone()
    }

    /// A receiver of status changes.
    pub fn status_updates(&self) -> watch::Receiver<ListenerStatus> {
        self.status.clone()
    }

    /// The listener's counters.
    pub fn stats(&self) -> &Arc<ListenerStats> {
        &self.stats
    }
}

/// What notices are turned into.
struct Targets {
    hub: Arc<ProcessChangeHub>,
    work: Arc<Notify>,
}

/// How a session ended.
enum SessionEnd {
    /// The connection was lost or failed: reconnect.
    Lost(String),
    /// LISTEN does not work here: give up on notices.
    Unsupported(String),
}

async fn run(
    target: DatabaseTarget,
    targets: Targets,
    own_pod: String,
    options: ListenerOptions,
    status: watch::Sender<ListenerStatus>,
    stats: Arc<ListenerStats>,
) {
    let mut backoff = Backoff::new(options.reconnect_floor, options.reconnect_cap);
    loop {
        match session(
            &target,
            &targets,
            &own_pod,
            &options,
            &status,
            &stats,
            &mut backoff,
        )
        .await
        {
            SessionEnd::Unsupported(reason) => {
                tracing::warn!(
                    %reason,
                    "LISTEN/NOTIFY does not work on this connection (a pooler in transaction \
                     mode?); falling back to polling: events from other pods arrive within the \
                     safety-poll interval"
                );
                let _ = status.send(ListenerStatus::Polling { reason });
                tokio::time::sleep(options.relisten_interval).await;
                tracing::info!("trying LISTEN again");
            }
            SessionEnd::Lost(reason) => {
                if *status.borrow() == ListenerStatus::Listening {
                    stats.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                tracing::warn!(%reason, "listener connection lost; reconnecting");
                let _ = status.send(ListenerStatus::Reconnecting);
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

async fn session(
    target: &DatabaseTarget,
    targets: &Targets,
    own_pod: &str,
    options: &ListenerOptions,
    status: &watch::Sender<ListenerStatus>,
    stats: &ListenerStats,
    backoff: &mut Backoff,
) -> SessionEnd {
    stats.sessions.fetch_add(1, Ordering::Relaxed);
    let (client, mut connection) = match target.connect().await {
        Ok(pair) => pair,
        Err(err) => return SessionEnd::Lost(err.to_string()),
    };
    // The connection future delivers notifications; drive it in its own task.
    let (notifications_tx, mut notifications) = mpsc::unbounded_channel::<Notification>();
    let driver = TaskHandle::spawn("listener connection", async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(notification)) => {
                    if notifications_tx.send(notification).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::debug!(error = %err, "listener connection ended");
                    return;
                }
            }
        }
    });
    let _driver = driver;

    let listen =
        format!("LISTEN {EVENTS_CHANNEL}; LISTEN {TERMINAL_CHANNEL}; LISTEN {WORK_CHANNEL}");
    if let Err(err) = client.batch_execute(&listen).await {
        return SessionEnd::Lost(err.to_string());
    }
    // The probe comes from another connection, as real notices do: behind a transaction-mode
    // pooler the LISTEN was made on a server connection this client no longer holds, so the
    // probe never reaches it.
    let probe = format!("probe {}", uuid::Uuid::new_v4());
    if let Err(err) = send_probe(target, &probe).await {
        return SessionEnd::Lost(err.to_string());
    }
    let probe_deadline = tokio::time::sleep(options.probe_timeout);
    tokio::pin!(probe_deadline);
    loop {
        tokio::select! {
            received = notifications.recv() => match received {
                Some(n) if n.payload() == probe => break,
                Some(n) => forward(&n, targets, own_pod, stats),
                None => return SessionEnd::Lost("connection closed during the probe".into()),
            },
            _ = &mut probe_deadline => {
                return SessionEnd::Unsupported(format!(
                    "a self-addressed notification did not arrive within {:?}",
                    options.probe_timeout
                ));
            }
        }
    }
    let _ = status.send(ListenerStatus::Listening);
    backoff.reset();
    // Anything sent while we were not listening is lost: everyone re-reads the log.
    targets.hub.resync_all();
    targets.work.notify_one();

    let mut ping = tokio::time::interval(options.ping_interval);
    ping.tick().await; // the first tick is immediate
    loop {
        tokio::select! {
            received = notifications.recv() => match received {
                Some(n) => forward(&n, targets, own_pod, stats),
                None => return SessionEnd::Lost("connection closed".into()),
            },
            _ = ping.tick() => {
                match tokio::time::timeout(options.probe_timeout, client.simple_query("SELECT 1")).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(err)) => return SessionEnd::Lost(err.to_string()),
                    Err(_) => return SessionEnd::Lost("ping timed out".into()),
                }
            }
        }
    }
}

async fn send_probe(target: &DatabaseTarget, probe: &str) -> Result<(), tokio_postgres::Error> {
    // Named apart from the listener itself, so that operators can tell the two apart.
    let mut target = target.clone();
    let name = target
        .config()
        .get_application_name()
        .unwrap_or("proclog")
        .to_owned();
    target
        .config_mut()
        .application_name(format!("{name}-probe"));
    let (client, connection) = target.connect().await?;
    let driver = TaskHandle::spawn("listener probe", async move {
        let _ = connection.await;
    });
    client
        .execute("SELECT pg_notify($1, $2)", &[&EVENTS_CHANNEL, &probe])
        .await?;
    drop(client);
    driver.join().await;
    Ok(())
}

/// The oldest notice stamp the latency histogram believes.
const PLAUSIBLE_NOTICE_AGE: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

/// Turns one notification into hub ticks, ignoring our own pod's notices (already ticked
/// locally), probes and anything malformed. A packed payload of another pod is read line by
/// line only while someone on this pod watches (a subscriber, a waiter, the cancel watch);
/// otherwise only its header is.
fn forward(notification: &Notification, targets: &Targets, own_pod: &str, stats: &ListenerStats) {
    forward_payload(
        notification.channel(),
        notification.payload(),
        targets,
        own_pod,
        stats,
    );
}

/// [`forward`] of a channel's payload.
fn forward_payload(
    channel: &str,
    payload: &str,
    targets: &Targets,
    own_pod: &str,
    stats: &ListenerStats,
) {
    match channel {
        WORK_CHANNEL if payload != own_pod => targets.work.notify_one(),
        EVENTS_CHANNEL => match Pack::parse(payload) {
            Some(pack) if pack.pod == own_pod => {}
            Some(pack) => {
                observe_latency(stats, Some(pack.stamp_us));
                if targets.hub.has_watchers() {
                    let mut count = 0;
                    for notice in pack.notices() {
                        count += 1;
                        let cancel = notice.kind == NoticeKind::CancelRequested;
                        targets.hub.tick_named(notice.process_id, cancel);
                    }
                    stats.notices.fetch_add(count, Ordering::Relaxed);
                } else {
                    stats
                        .notices
                        .fetch_add(pack.len() as u64, Ordering::Relaxed);
                }
            }
            // A JSON notice of a pod of an earlier version.
            None => {
                if let Some(notice) =
                    EventNotice::from_payload(payload).filter(|notice| notice.pod != own_pod)
                {
                    observe_latency(stats, notice.sent_at_us);
                    stats.notices.fetch_add(1, Ordering::Relaxed);
                    if notice.event_type == crate::reserved::CANCEL_REQUESTED {
                        targets.hub.tick_cancel(&notice.process_id);
                    } else {
                        targets.hub.tick(&notice.process_id);
                    }
                }
            }
        },
        TERMINAL_CHANNEL => {
            if let Some(hint) =
                TerminalHint::from_payload(payload).filter(|hint| hint.pod != own_pod)
            {
                stats.notices.fetch_add(1, Ordering::Relaxed);
                targets.hub.tick(&hint.process_id);
            }
        }
        _ => {}
    }
}

/// Records a notice's latency from the sender's stamp. Any database login may NOTIFY on these
/// channels: a stamp from the future or older than a minute is skew or forgery, and is not
/// measured.
fn observe_latency(stats: &ListenerStats, sent_at_us: Option<i64>) {
    if let Some(sent) = sent_at_us
        .and_then(chrono::DateTime::from_timestamp_micros)
        .filter(|sent| {
            let age = chrono::Utc::now() - *sent;
            age >= -chrono::TimeDelta::seconds(1) && age <= PLAUSIBLE_NOTICE_AGE
        })
    {
        stats.notice_latency.observe_since(sent);
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;
    use crate::model::ProcessId;
    use crate::watch::hub::FeedEvent;
    use crate::watch::notice::{PackedNotice, pack};

    fn targets() -> Targets {
        Targets {
            hub: Arc::new(ProcessChangeHub::new()),
            work: Arc::new(Notify::new()),
        }
    }

    fn packed(pod: &str, notices: &[(&str, NoticeKind)]) -> String {
        let notices = notices.iter().map(|&(process_id, kind)| PackedNotice {
            process_id,
            seq: 1,
            kind,
        });
        let mut payloads = pack(pod, chrono::Utc::now().timestamp_micros(), notices);
        assert_eq!(payloads.len(), 1);
        payloads.remove(0)
    }

    #[test]
    fn another_pods_pack_ticks_the_watched_processes_and_the_cancel_feed() {
        let (targets, stats) = (targets(), ListenerStats::default());
        let (a, b) = (ProcessId::new("a").unwrap(), ProcessId::new("b").unwrap());
        let mut watch_a = targets.hub.watch(&a);
        let mut cancels = targets.hub.cancel_feed();
        let payload = packed(
            "pod-b",
            &[
                ("a", NoticeKind::Event),
                ("b", NoticeKind::CancelRequested),
                ("not an id", NoticeKind::CancelRequested),
            ],
        );
        forward_payload(EVENTS_CHANNEL, &payload, &targets, "pod-a", &stats);
        assert!(watch_a.changed().now_or_never().is_some(), "a was ticked");
        assert_eq!(cancels.next().now_or_never(), Some(FeedEvent::Tick(b)));
        assert!(
            cancels.next().now_or_never().is_none(),
            "no tick for a bad id"
        );
        assert_eq!(stats.notices.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn the_own_pods_pack_and_malformed_payloads_tick_nothing() {
        let (targets, stats) = (targets(), ListenerStats::default());
        let a = ProcessId::new("a").unwrap();
        let mut watch_a = targets.hub.watch(&a);
        let mut feed = targets.hub.feed();
        let own = packed("pod-a", &[("a", NoticeKind::CancelRequested)]);
        for (channel, payload) in [
            (EVENTS_CHANNEL, own.as_str()),
            (EVENTS_CHANNEL, "p1 x pod-b\ne 1 a\n"),
            (EVENTS_CHANNEL, "p9 1 pod-b\ne 1 a\n"),
            (EVENTS_CHANNEL, "{\"process_id\": \"a\"}"),
            (EVENTS_CHANNEL, ""),
            (TERMINAL_CHANNEL, "p1 1 pod-b\nt 0 a\n"),
            (TERMINAL_CHANNEL, r#"{"process_id": "a", "pod": "pod-a"}"#),
            ("elsewhere", r#"{"process_id": "a", "pod": "pod-b"}"#),
            (WORK_CHANNEL, "pod-a"),
        ] {
            forward_payload(channel, payload, &targets, "pod-a", &stats);
        }
        assert!(watch_a.changed().now_or_never().is_none());
        assert!(feed.next().now_or_never().is_none());
        assert_eq!(stats.notices.load(Ordering::Relaxed), 0);
        assert!(targets.work.notified().now_or_never().is_none());
        forward_payload(WORK_CHANNEL, "pod-b", &targets, "pod-a", &stats);
        assert!(targets.work.notified().now_or_never().is_some());
    }

    #[test]
    fn an_earlier_versions_json_notices_still_tick() {
        let (targets, stats) = (targets(), ListenerStats::default());
        let a = ProcessId::new("a").unwrap();
        let mut watch_a = targets.hub.watch(&a);
        let mut cancels = targets.hub.cancel_feed();
        let event = r#"{"process_id": "a", "seq": 3, "event_type": "process.cancel_requested", "pod": "pod-b"}"#;
        forward_payload(EVENTS_CHANNEL, event, &targets, "pod-a", &stats);
        assert!(watch_a.changed().now_or_never().is_some());
        assert_eq!(cancels.next().now_or_never(), Some(FeedEvent::Tick(a)));
        let terminal = r#"{"process_id": "a", "pod": "pod-b"}"#;
        forward_payload(TERMINAL_CHANNEL, terminal, &targets, "pod-a", &stats);
        assert!(watch_a.changed().now_or_never().is_some());
        assert_eq!(stats.notices.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn with_nobody_watching_a_pack_is_counted_not_read() {
        let (targets, stats) = (targets(), ListenerStats::default());
        let payload = packed(
            "pod-b",
            &[("a", NoticeKind::Event), ("b", NoticeKind::Terminal)],
        );
        assert!(!targets.hub.has_watchers());
        forward_payload(EVENTS_CHANNEL, &payload, &targets, "pod-a", &stats);
        assert_eq!(stats.notices.load(Ordering::Relaxed), 2);
    }
}
