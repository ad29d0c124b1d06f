//! The retry rule of every write a run makes.
//!
//! A write that fails with a transient error ([`ProcessError::is_transient`]: a lost or
//! refused connection, a timeout, a server restarting, a serialization failure or deadlock)
//! is tried again with backoff for as long as the run's lease is surely live (its write
//! deadline, see [`super::lease`]). Any other answer ends the retry at once: `LeaseLost`,
//! `ProcessTerminal`/`AlreadyTerminal` and input errors are decisions a retry would only
//! repeat. A refusal with `LeaseLost` marks the lease lost.
//!
//! Retrying is safe only because every write a run makes is idempotent: appends carry replay
//! keys derived from the lease generation and the run's own counter, a completion repeated
//! with identical content returns the stored record, renew and release are idempotent. So a
//! write whose first attempt committed but whose answer was lost is stored exactly once.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};

use super::lease::{LeaseClock, pause_before, write_backoff};
use crate::error::{ProcessError, ProcessResult};

/// Runs `write` until it succeeds, fails for a non-transient reason, or the lease's write
/// deadline has passed (the last pause is cut short so that one more try happens right before
/// it) (then the last transient error is returned and the
/// lease is marked lost: the run can no longer prove it owns the process). Counts every retry.
pub(crate) async fn retry_write<T, F, Fut>(
    clock: &LeaseClock,
    retries: &AtomicU64,
    what: &str,
    mut write: F,
) -> ProcessResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ProcessResult<T>>,
{
    let mut backoff = write_backoff();
    loop {
        if !clock.is_live() {
            clock.lose();
            return Err(ProcessError::Unavailable(format!(
                "{what}: the lease could not be confirmed in time"
            )));
        }
        match write().await {
            Err(err) if err.is_transient() => {
                let pause = clock
                    .write_deadline()
                    .and_then(|deadline| pause_before(deadline, &mut backoff));
                let Some(pause) = pause else {
                    tracing::warn!(error = %err, "{what} failed and the lease runs out: giving up");
                    clock.lose();
                    return Err(err);
                };
                retries.fetch_add(1, Ordering::Relaxed);
                tracing::info!(error = %err, retry_in = ?pause, "{what} failed; retrying");
                tokio::time::sleep(pause).await;
            }
            Err(err @ ProcessError::LeaseLost { .. }) => {
                clock.lose();
                return Err(err);
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;
    use std::time::Duration;

    use tokio::time::Instant;

    use super::*;
    use crate::model::ProcessId;

    fn unavailable() -> ProcessError {
        ProcessError::Unavailable("connection closed".into())
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_until_success() {
        let clock = LeaseClock::new(Duration::from_secs(10), Instant::now());
        let retries = AtomicU64::new(0);
        let calls = AtomicU32::new(0);
        let result = retry_write(&clock, &retries, "append", || async {
            match calls.fetch_add(1, Ordering::Relaxed) {
                0..=2 => Err(unavailable()),
                _ => Ok(7),
            }
        })
        .await;
        assert_eq!(result.unwrap(), 7);
        assert_eq!(retries.load(Ordering::Relaxed), 3);
        assert!(clock.is_live());
    }

    #[tokio::test(start_paused = true)]
    async fn decisions_stop_the_retry_at_once() {
        let clock = LeaseClock::new(Duration::from_secs(10), Instant::now());
        let retries = AtomicU64::new(0);
        let id = ProcessId::new("p").unwrap();
        let refused: ProcessResult<()> = retry_write(&clock, &retries, "append", || async {
            Err(ProcessError::InvalidInput("bad".into()))
        })
        .await;
        assert!(matches!(refused, Err(ProcessError::InvalidInput(_))));
        assert!(clock.is_live(), "an input error says nothing of the lease");
        let lost: ProcessResult<()> = retry_write(&clock, &retries, "append", || async {
            Err(ProcessError::LeaseLost { id: id.clone() })
        })
        .await;
        assert!(matches!(lost, Err(ProcessError::LeaseLost { .. })));
        assert!(!clock.is_live(), "LeaseLost marks the lease lost");
        assert_eq!(retries.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_longer_than_the_lease_gives_up_before_the_deadline() {
        let start = Instant::now();
        let clock = LeaseClock::new(Duration::from_secs(10), start);
        let retries = AtomicU64::new(0);
        let result: ProcessResult<()> = retry_write(&clock, &retries, "complete", || async {
            Err(unavailable())
        })
        .await;
        assert!(matches!(result, Err(ProcessError::Unavailable(_))));
        // Tried until the write deadline itself, never past it.
        assert!(Instant::now() <= start + Duration::from_secs(8));
        assert!(Instant::now() + Duration::from_millis(50) >= start + Duration::from_secs(8));
        assert!(!clock.is_live());
        assert!(retries.load(Ordering::Relaxed) > 5);
    }
}
