//! Every task the gateway spawns, in one tracker the app owns.
//!
//! Some tasks carry ledger records (a stream drained for a provider's usage after its client
//! left, a settlement counting tokens off the runtime, an exchange kept alive for a commercial
//! backend): shutdown waits for all of them before the ledger closes, so no record of a
//! request that ended is lost. Background loops (health probes, metrics upkeep, the idle
//! watch) end when shutdown begins ([`Tasks::stopping`]).
//!
//! ```text
//! shutdown: stop accepting ─► connections drain ─► tasks.close_and_wait() ─► ledger.close()
//! ```

use std::future::Future;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug, Clone, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl Tasks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawns a task that shutdown will wait for.
    #[allow(clippy::disallowed_methods)]
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(task)
    }

    /// A future counted as a task of the tracker, for a caller that spawns it itself (to
    /// keep it abortable).
    pub fn track<F: Future>(&self, task: F) -> tokio_util::task::task_tracker::TrackedFuture<F> {
        self.tracker.track_future(task)
    }

    /// Runs blocking work on the blocking pool, tracked like any task.
    #[allow(clippy::disallowed_methods)]
    pub fn spawn_blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        self.tracker.spawn_blocking(work)
    }

    /// Resolves when shutdown begins: background loops end there.
    pub async fn stopping(&self) {
        self.stop.cancelled().await
    }

    pub fn is_stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Tells background loops to end, then waits for every task, those spawned meanwhile
    /// included.
    pub async fn close_and_wait(&self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn shutdown_waits_for_work_and_ends_loops() {
        let tasks = Tasks::new();
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        tasks.spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            flag.store(true, Ordering::SeqCst);
        });
        let looping = tasks.clone();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = looping.stopping() => return,
                    _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                }
            }
        });
        tasks.close_and_wait().await;
        assert!(
            done.load(Ordering::SeqCst),
            "the work finished before shutdown returned"
        );
    }
}
