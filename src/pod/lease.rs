//! Lease keeping: what a run knows of its lease on the local clock, and the task that renews it.
//!
//! A lease lives on the database clock (`expires_at > now()`), which a pod cannot read without
//! a round trip. The run therefore keeps a conservative local bound instead: a claim or renewal
//! *sent* at local instant `t` yields an expiry of at least `t + ttl` (the database takes `now()`
//! after the statement left this pod), so the lease is surely live until `t + ttl` as measured
//! here. From that bound:
//!
//! - writes are retried, and the engine may act, until the *write deadline*
//!   `valid_until - margin`; past it the engine is asked to stop (its cancellation token fires);
//! - at the *hard deadline* `valid_until - margin / 2` the engine is dropped, so two engines
//!   never run the same process at once even if one ignores its cancellation;
//! - once past the write deadline, or refused with `LeaseLost`, the clock is *lost* for good:
//!   a later successful renewal does not revive it.
//!
//! The margin is a fifth of the TTL: it absorbs clock-rate drift between the pod and the
//! database and the time an engine takes to notice its cancellation.
//!
//! The lease is renewed every tenth of the TTL, so a run survives any fault shorter than
//! [`FAULT_TOLERANCE`] of the TTL (the write deadline, 0.8 TTL, less one renewal interval):
//! at the default 15 s TTL, an outage of up to 10.5 s delays a run and changes nothing. A
//! longer fault may stop the run (it then writes nothing more, and another pod takes the
//! process over once the lease has expired on the database); no design can do better without
//! trusting a lease it cannot confirm.
//!
//! Assumptions, stated: the database clock does not step forward by more than a tenth of the
//! TTL (a failover to a host whose clock is ahead, an NTP step); the pod's monotonic clock
//! keeps running while the host is suspended (a paused process is fine, a suspended VM is
//! not); and claims and renewals are single autocommit statements, so the database reads
//! `now()` after the statement left the pod.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::error::ProcessError;
use crate::model::Lease;
use crate::registry::ProcessRegistry;

/// What the run knows of its lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Validity {
    /// Surely live on the database until this local instant.
    Until(Instant),
    /// Lost, or no longer confirmable: the run writes nothing more under it.
    Lost,
}

/// A run's local view of its lease. Cheap to clone; clones share the view.
#[derive(Clone, Debug)]
pub struct LeaseClock {
    ttl: Duration,
    margin: Duration,
    state: Arc<watch::Sender<Validity>>,
}

impl LeaseClock {
    /// The view of a lease of `ttl` granted by a statement sent at `sent_at`.
    pub(crate) fn new(ttl: Duration, sent_at: Instant) -> Self {
        let (state, _) = watch::channel(Validity::Until(sent_at + ttl));
        Self {
            ttl,
            margin: ttl / 5,
            state: Arc::new(state),
        }
    }

    /// Records a renewal sent at `sent_at`. Ignored once the clock is lost or past its write
    /// deadline: a lease the run stopped trusting is never trusted again.
    pub(crate) fn confirm(&self, sent_at: Instant) {
        let now = Instant::now();
        let margin = self.margin;
        let ttl = self.ttl;
        self.state.send_if_modified(|validity| match *validity {
            Validity::Until(until) if now + margin < until && sent_at + ttl > until => {
                *validity = Validity::Until(sent_at + ttl);
                true
            }
            _ => false,
        });
    }

    /// Marks the lease lost (refused with `LeaseLost`, or unconfirmable in time).
    pub(crate) fn lose(&self) {
        self.state.send_if_modified(|validity| {
            let changed = *validity != Validity::Lost;
            *validity = Validity::Lost;
            changed
        });
    }

    /// The lease's TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The local instant until which the lease is surely live; `None` once lost.
    pub fn valid_until(&self) -> Option<Instant> {
        match *self.state.borrow() {
            Validity::Until(until) => Some(until),
            Validity::Lost => None,
        }
    }

    /// Until when writes are retried and the engine may act; `None` once lost.
    pub fn write_deadline(&self) -> Option<Instant> {
        self.valid_until().map(|until| until - self.margin)
    }

    /// When the engine is dropped if it has not returned; `None` once lost.
    pub fn hard_deadline(&self) -> Option<Instant> {
        self.valid_until().map(|until| until - self.margin / 2)
    }

    /// True while the lease is confirmed and the write deadline has not passed. A synchronous
    /// check, so it holds even for a pod that was paused and has just resumed.
    pub fn is_live(&self) -> bool {
        self.write_deadline()
            .is_some_and(|deadline| Instant::now() < deadline)
    }

    /// Resolves once the lease is lost or its write deadline has passed.
    pub async fn write_deadline_passed(&self) {
        self.wait_past(|clock| clock.write_deadline()).await;
    }

    /// Resolves once the lease is lost or its hard deadline has passed.
    pub async fn hard_deadline_passed(&self) {
        self.wait_past(|clock| clock.hard_deadline()).await;
    }

    async fn wait_past(&self, deadline: impl Fn(&Self) -> Option<Instant>) {
        let mut updates = self.state.subscribe();
        loop {
            let Some(at) = deadline(self) else { return };
            if Instant::now() >= at {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                changed = updates.changed() => if changed.is_err() { return },
            }
        }
    }
}

/// The share of the TTL a fault may last without changing a run's outcome (0.7).
pub const FAULT_TOLERANCE: f64 = 0.7;

/// How often the lease is renewed, as a fraction of the TTL (every tenth).
const RENEW_DIVISOR: u32 = 10;

/// How long to pause before the next try: the backoff's delay, cut so that one more try
/// happens right before `deadline`; `None` once the deadline has passed.
pub(crate) fn pause_before(deadline: Instant, backoff: &mut Backoff) -> Option<Duration> {
    const SLACK: Duration = Duration::from_millis(5);
    let left = deadline.checked_duration_since(Instant::now())?;
    if left <= SLACK * 2 {
        return None;
    }
    Some(backoff.next_delay().min(left - SLACK))
}

/// Retry pacing of a run's writes: 20 ms doubling to 1 s.
pub(crate) fn write_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(20), Duration::from_secs(1))
}

/// Renews `lease` every tenth of the TTL on `leases` (a path of its own, so that a saturated
/// request pool cannot starve it), retrying transient failures until the write deadline.
/// Returns when the lease is lost, refused, or no longer confirmable in time; the clock says
/// which. Aborted by its run when the run ends.
pub(crate) async fn keep_lease(
    leases: Arc<dyn ProcessRegistry>,
    mut lease: Lease,
    clock: LeaseClock,
    retries: Arc<AtomicU64>,
) {
    let ttl = clock.ttl();
    let every = ttl / RENEW_DIVISOR;
    let Some(mut last_sent) = clock.valid_until().map(|until| until - ttl) else {
        return;
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(last_sent + every) => {}
            _ = clock.write_deadline_passed() => { clock.lose(); return; }
        }
        let mut backoff = write_backoff();
        loop {
            let sent = Instant::now();
            match leases.renew(&lease, ttl).await {
                Ok(renewed) => {
                    clock.confirm(sent);
                    lease = renewed;
                    last_sent = sent;
                    break;
                }
                Err(err) if err.is_transient() => {
                    retries.fetch_add(1, Ordering::Relaxed);
                    let Some(deadline) = clock.write_deadline() else {
                        return;
                    };
                    let Some(pause) = pause_before(deadline, &mut backoff) else {
                        tracing::warn!(error = %err, "lease could not be renewed in time: the run stops");
                        clock.lose();
                        return;
                    };
                    tracing::info!(error = %err, "lease renewal failed; retrying");
                    tokio::time::sleep(pause).await;
                }
                Err(err) => {
                    if !matches!(err, ProcessError::LeaseLost { .. }) {
                        tracing::warn!(error = %err, "lease renewal refused: the run stops");
                    }
                    clock.lose();
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn deadlines_follow_the_last_confirmed_send() {
        let start = Instant::now();
        let clock = LeaseClock::new(Duration::from_secs(10), start);
        assert_eq!(clock.valid_until(), Some(start + Duration::from_secs(10)));
        assert_eq!(clock.write_deadline(), Some(start + Duration::from_secs(8)));
        assert_eq!(clock.hard_deadline(), Some(start + Duration::from_secs(9)));
        assert!(clock.is_live());

        tokio::time::advance(Duration::from_secs(3)).await;
        clock.confirm(start + Duration::from_secs(3));
        assert_eq!(clock.valid_until(), Some(start + Duration::from_secs(13)));
        // An older confirmation never moves the bound back.
        clock.confirm(start + Duration::from_secs(1));
        assert_eq!(clock.valid_until(), Some(start + Duration::from_secs(13)));
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_write_deadline_the_lease_is_never_trusted_again() {
        let start = Instant::now();
        let clock = LeaseClock::new(Duration::from_secs(10), start);
        clock.write_deadline_passed().await;
        assert_eq!(Instant::now(), start + Duration::from_secs(8));
        assert!(!clock.is_live());
        // A renewal that comes back now (sent late) does not revive it.
        clock.confirm(Instant::now());
        assert!(!clock.is_live());
        clock.lose();
        assert_eq!(clock.write_deadline(), None);
        clock.hard_deadline_passed().await; // resolves at once when lost
    }

    #[tokio::test(start_paused = true)]
    async fn losing_wakes_the_waiters() {
        let clock = LeaseClock::new(Duration::from_secs(10), Instant::now());
        let waiter = tokio::spawn({
            let clock = clock.clone();
            async move { clock.write_deadline_passed().await }
        });
        tokio::task::yield_now().await;
        clock.lose();
        waiter.await.unwrap();
        assert!(!clock.is_live());
    }
}
