//! Who owns each background task, and how it ends.
//!
//! Every task proclog starts has exactly one owner, in the shape of mini-redis's
//! `DbDropGuard` and shutdown-complete channel: the owner holds a [`TaskHandle`] (dropping it
//! aborts the task) or, for a task that must be told to stop and then waited for, keeps it in
//! a [`TaskSet`], whose [`TaskSet::shutdown`] stops its tasks one by one, in the reverse order
//! they were started, and waits for each. Nothing is left running behind an owner that is
//! gone: a `Pod` dropped without `shutdown()` stops claiming, renewing and heartbeating at
//! once, and so does a stack.
//!
//! | owner | tasks |
//! |---|---|
//! | [`crate::Proclog`] (a `TaskSet`) | notifier, listener, group-commit flushers, `await_terminal` poller, host sink adapters |
//! | [`crate::pod::Pod`] | the worker's claim loop (which owns its runs, which own their lease keepers), presence |
//! | `proclog::http::HttpServer` | the accept loop (which owns its connections) |

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A running task owned by this handle: dropped, the task is aborted; [`TaskHandle::join`]
/// waits for it to end. A task that panicked is logged when joined.
#[derive(Debug)]
#[must_use = "dropping a TaskHandle aborts its task"]
pub struct TaskHandle {
    name: &'static str,
    task: Option<JoinHandle<()>>,
}

impl TaskHandle {
    /// Spawns `future` on the current Tokio runtime as the task `name`.
    pub fn spawn(name: &'static str, future: impl Future<Output = ()> + Send + 'static) -> Self {
        Self {
            name,
            task: Some(tokio::spawn(future)),
        }
    }

    /// The task's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// True once the task has ended (returned, panicked or aborted).
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits for the task to end.
    pub async fn join(mut self) {
        if let Some(task) = self.task.take() {
            Self::report(self.name, task.await);
        }
    }

    /// Waits up to `limit` for the task to end, then aborts it and waits for that.
    pub async fn join_within(mut self, limit: Duration) {
        let Some(mut task) = self.task.take() else {
            return;
        };
        match tokio::time::timeout(limit, &mut task).await {
            Ok(ended) => Self::report(self.name, ended),
            Err(_) => {
                tracing::warn!(
                    task = self.name,
                    ?limit,
                    "the task did not stop in time: aborted"
                );
                task.abort();
                let _ = task.await;
            }
        }
    }

    fn report(name: &'static str, ended: Result<(), tokio::task::JoinError>) {
        if let Err(err) = ended
            && err.is_panic()
        {
            tracing::error!(task = name, "a background task panicked");
        }
    }
}

impl Drop for TaskHandle {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// One task of a [`TaskSet`]: told to stop by its token, then joined.
#[derive(Debug)]
struct Stoppable {
    stop: CancellationToken,
    handle: TaskHandle,
    grace: Duration,
}

/// Tasks stopped together, in the reverse order they were started. Dropped, every task is
/// aborted.
#[derive(Debug, Default)]
pub struct TaskSet {
    tasks: Vec<Stoppable>,
}

impl TaskSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts the task `name`: `start` gets the token that tells it to stop, and returns its
    /// future. At shutdown the task gets `grace` to end by itself after its token fires
    /// (finishing or handing back what it holds), then it is aborted.
    pub fn spawn<F>(
        &mut self,
        name: &'static str,
        grace: Duration,
        start: impl FnOnce(CancellationToken) -> F,
    ) where
        F: Future<Output = ()> + Send + 'static,
    {
        let stop = CancellationToken::new();
        let handle = TaskHandle::spawn(name, start(stop.clone()));
        self.tasks.push(Stoppable {
            stop,
            handle,
            grace,
        });
    }

    /// The names of the tasks, in the order they were started.
    pub fn names(&self) -> Vec<&'static str> {
        self.tasks.iter().map(|task| task.handle.name()).collect()
    }

    /// Stops every task, the last started first, each within its grace; returns when all
    /// have ended.
    pub async fn shutdown(mut self) {
        while let Some(task) = self.tasks.pop() {
            task.stop.cancel();
            tracing::debug!(task = task.handle.name(), "stopping");
            task.handle.join_within(task.grace).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn a_dropped_handle_aborts_its_task() {
        let ticks = Arc::new(AtomicUsize::new(0));
        let handle = {
            let ticks = Arc::clone(&ticks);
            TaskHandle::spawn("ticker", async move {
                loop {
                    ticks.fetch_add(1, Ordering::Relaxed);
                    tokio::task::yield_now().await;
                }
            })
        };
        while ticks.load(Ordering::Relaxed) < 3 {
            tokio::task::yield_now().await;
        }
        drop(handle);
        // Let the abort land, then prove nothing runs any more.
        tokio::task::yield_now().await;
        let after = ticks.load(Ordering::Relaxed);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(ticks.load(Ordering::Relaxed) <= after + 1);
    }

    #[tokio::test]
    async fn a_set_stops_its_tasks_last_started_first() {
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut set = TaskSet::new();
        for name in ["first", "second", "third"] {
            let order = Arc::clone(&order);
            set.spawn(name, Duration::from_secs(5), move |stop| async move {
                stop.cancelled().await;
                order.lock().unwrap().push(name);
            });
        }
        assert_eq!(set.names(), ["first", "second", "third"]);
        set.shutdown().await;
        assert_eq!(*order.lock().unwrap(), ["third", "second", "first"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_ignores_its_stop_is_aborted_after_its_grace() {
        let mut set = TaskSet::new();
        set.spawn("stubborn", Duration::from_millis(100), |_stop| {
            std::future::pending::<()>()
        });
        set.shutdown().await;
    }
}
