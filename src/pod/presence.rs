//! A pod's row in `proclog.pods`: registered at start, heartbeated on the database clock,
//! marked draining and then stopped on a clean stop. A killed pod's row keeps its last
//! heartbeat, and `proclog.pod_status` shows it as `gone` after three heartbeat periods.
//!
//! Presence is information, never a lease: no decision about who runs what reads it. A failed
//! heartbeat is logged and tried again at the next period; it never stops the pod.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How a pod describes itself in `proclog.pods`.
#[derive(Clone, Debug)]
pub struct PresenceInfo {
    /// The pod id.
    pub pod_id: String,
    /// Where the pod serves its HTTP API and console (`None`: it serves none).
    pub address: Option<String>,
    /// Most processes the pod runs at once.
    pub concurrency: usize,
    /// Heartbeat period.
    pub heartbeat_every: Duration,
}

/// What a pod is doing, as written to `proclog.pods.state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PresenceState {
    /// Claiming and running processes.
    Running,
    /// Stopping: no new claims, runs finishing or being released.
    Draining,
    /// Stopped cleanly.
    Stopped,
}

impl PresenceState {
    fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Draining => "draining",
            Self::Stopped => "stopped",
        }
    }
}

/// Rows of pods stopped or gone longer than this are deleted by the pods still running.
const PRUNE_AFTER: &str = "7 days";
/// Bound on each presence statement.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

const UPSERT: &str = "
    INSERT INTO proclog.pods AS p (pod_id, incarnation, address, version, concurrency, state,
                                   heartbeat_every, stopped_at)
    VALUES ($1, $2, $3, $4, $5, $6, make_interval(secs => $7),
            CASE WHEN $6 = 'stopped' THEN now() END)
    ON CONFLICT (pod_id) DO UPDATE
       SET incarnation = EXCLUDED.incarnation,
           address = EXCLUDED.address,
           version = EXCLUDED.version,
           concurrency = EXCLUDED.concurrency,
           -- A heartbeat never takes a stopping pod back to running.
           state = CASE WHEN p.incarnation = EXCLUDED.incarnation
                         AND (p.state = 'stopped'
                              OR p.state = 'draining' AND EXCLUDED.state = 'running')
                        THEN p.state ELSE EXCLUDED.state END,
           started_at = CASE WHEN p.incarnation = EXCLUDED.incarnation THEN p.started_at
                             ELSE now() END,
           heartbeat_at = now(),
           heartbeat_every = EXCLUDED.heartbeat_every,
           stopped_at = CASE WHEN p.incarnation = EXCLUDED.incarnation
                              AND p.state = 'stopped' THEN p.stopped_at
                             ELSE EXCLUDED.stopped_at END
     -- An old incarnation (a process still stopping while its successor runs under the same
     -- pod id) does not mark the successor draining or stopped.
     WHERE p.incarnation = EXCLUDED.incarnation OR EXCLUDED.state = 'running'";

const PRUNE: &str = "
    DELETE FROM proclog.pods
     WHERE coalesce(stopped_at, heartbeat_at) < now() - $1::text::interval
       AND (state = 'stopped' OR heartbeat_at < now() - 3 * heartbeat_every)";

/// The pod's presence: a heartbeat task and the clean-stop marks.
pub struct Presence {
    pool: Pool,
    info: Arc<PresenceInfo>,
    incarnation: uuid::Uuid,
    state: watch::Sender<PresenceState>,
    task: JoinHandle<()>,
}

impl Presence {
    /// Registers the pod (as `running`) and starts heartbeating. A database that cannot be
    /// reached now is retried by the heartbeats.
    pub async fn start(pool: Pool, info: PresenceInfo) -> Self {
        let info = Arc::new(info);
        let incarnation = uuid::Uuid::new_v4();
        let (state, mut changes) = watch::channel(PresenceState::Running);
        if let Err(err) = write(&pool, &info, incarnation, PresenceState::Running).await {
            tracing::warn!(pod = %info.pod_id, error = %err, "cannot register the pod yet");
        }
        prune(&pool).await;
        let task = {
            let (pool, info) = (pool.clone(), Arc::clone(&info));
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(info.heartbeat_every);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                ticks.tick().await;
                let mut beats: u64 = 0;
                loop {
                    tokio::select! {
                        _ = ticks.tick() => {}
                        changed = changes.changed() => {
                            if changed.is_err() {
                                return;
                            }
                        }
                    }
                    let now = *changes.borrow_and_update();
                    if now == PresenceState::Stopped {
                        return;
                    }
                    if let Err(err) = write(&pool, &info, incarnation, now).await {
                        tracing::warn!(pod = %info.pod_id, error = %err, "heartbeat failed");
                    }
                    beats += 1;
                    // About once an hour at the default period.
                    if beats.is_multiple_of(720) {
                        prune(&pool).await;
                    }
                }
            })
        };
        Self {
            pool,
            info,
            incarnation,
            state,
            task,
        }
    }

    /// Marks the pod draining (it stops claiming) and keeps heartbeating.
    pub fn draining(&self) {
        self.state.send_replace(PresenceState::Draining);
    }

    /// Marks the pod stopped and ends the heartbeats (one attempt, bounded).
    pub async fn stopped(self) {
        self.state.send_replace(PresenceState::Stopped);
        let _ = self.task.await;
        if let Err(err) = write(
            &self.pool,
            &self.info,
            self.incarnation,
            PresenceState::Stopped,
        )
        .await
        {
            tracing::warn!(pod = %self.info.pod_id, error = %err, "cannot mark the pod stopped");
        }
    }
}

async fn write(
    pool: &Pool,
    info: &PresenceInfo,
    incarnation: uuid::Uuid,
    state: PresenceState,
) -> Result<(), String> {
    let call = async {
        let client = pool.get().await.map_err(|err| err.to_string())?;
        let concurrency = i32::try_from(info.concurrency).unwrap_or(i32::MAX);
        client
            .execute(
                UPSERT,
                &[
                    &info.pod_id,
                    &incarnation,
                    &info.address,
                    &env!("CARGO_PKG_VERSION"),
                    &concurrency,
                    &state.as_str(),
                    &info.heartbeat_every.as_secs_f64(),
                ],
            )
            .await
            .map(|_| ())
            .map_err(|err| err.to_string())
    };
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

async fn prune(pool: &Pool) {
    let call = async {
        let client = pool.get().await.map_err(|err| err.to_string())?;
        client
            .execute(PRUNE, &[&PRUNE_AFTER])
            .await
            .map_err(|err| err.to_string())
    };
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(0)) => {}
        Ok(Ok(pruned)) => tracing::info!(pruned, "pruned the rows of long-gone pods"),
        Ok(Err(err)) => tracing::debug!(error = %err, "cannot prune pod rows"),
        Err(_) => tracing::debug!("pruning pod rows timed out"),
    }
}
