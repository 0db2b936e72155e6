//! Every task the gateway spawns, in one tracker the app owns.
//!
//! Some tasks carry ledger records (a stream drained for a provider's usage after its client
//! left, a settlement counting tokens off the runtime, an exchange kept alive for a commercial
//! backend): shutdown waits for all of them before the ledger closes, so no record of a
//! request that ended is lost. Background loops (health probes, metrics upkeep, the idle
//! watch) end when shutdown begins ([`Tasks::stopping`]).
//!
//! ```text
//! shutdown: stop accepting ─► connections drain ─► (grace) ─► open streams end ([`Tasks::end_streams`])
//!           ─► tasks.close_and_wait() ─► ledger.close()
//! ```

use atomic_waker::AtomicWaker;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Context;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug, Clone, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    stop: CancellationToken,
    ending: Arc<Ending>,
}

/// Streams still open when the grace period ends are ended by the gateway: an error event,
/// then the close, billed and recorded. Each stream has its own waker slot, registered only
/// while it waits on its upstream, so a waiting stream costs one uncontended atomic per poll.
#[derive(Debug, Default)]
struct Ending {
    ended: AtomicBool,
    next_id: AtomicU64,
    waiting: dashmap::DashMap<u64, Arc<AtomicWaker>>,
}

/// One stream's view of [`Tasks::end_streams`].
#[derive(Debug)]
pub struct EndWatch {
    ending: Arc<Ending>,
    slot: Option<(u64, Arc<AtomicWaker>)>,
}

impl EndWatch {
    /// Whether open streams must end now; if not, wakes this task when they must.
    pub fn poll_ended(&mut self, cx: &mut Context<'_>) -> bool {
        if self.ending.ended.load(Ordering::Acquire) {
            return true;
        }
        let (_, waker) = self.slot.get_or_insert_with(|| {
            let id = self.ending.next_id.fetch_add(1, Ordering::Relaxed);
            let waker = Arc::new(AtomicWaker::new());
            self.ending.waiting.insert(id, waker.clone());
            (id, waker)
        });
        waker.register(cx.waker());
        // Ended between the first check and the registration: its wake may have been missed.
        self.ending.ended.load(Ordering::Acquire)
    }
}

pin_project_lite::pin_project! {
    /// See [`Tasks::until_ended`].
    pub struct UntilEnded<F> {
        #[pin]
        work: F,
        watch: EndWatch,
    }
}

impl<F: Future> Future for UntilEnded<F> {
    type Output = Option<F::Output>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> std::task::Poll<Self::Output> {
        let this = self.project();
        match this.work.poll(cx) {
            std::task::Poll::Ready(out) => std::task::Poll::Ready(Some(out)),
            std::task::Poll::Pending if this.watch.poll_ended(cx) => std::task::Poll::Ready(None),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

impl Drop for EndWatch {
    fn drop(&mut self) {
        if let Some((id, _)) = self.slot.take() {
            self.ending.waiting.remove(&id);
        }
    }
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

    /// For a stream: tells it when the gateway ends open streams.
    pub fn end_watch(&self) -> EndWatch {
        EndWatch {
            ending: self.ending.clone(),
            slot: None,
        }
    }

    /// Whether shutdown has ended open requests.
    pub fn streams_ended(&self) -> bool {
        self.ending.ended.load(Ordering::Acquire)
    }

    /// `work`, unless shutdown ends open requests first (`None`): an answer still waited for
    /// then gets an error at once instead of a dropped connection.
    pub fn until_ended<F: Future>(&self, work: F) -> UntilEnded<F> {
        UntilEnded {
            work,
            watch: self.end_watch(),
        }
    }

    /// Ends every open stream (the grace period is over): each writes its ending and settles.
    pub fn end_streams(&self) {
        self.ending.ended.store(true, Ordering::Release);
        for w in self.ending.waiting.iter() {
            w.value().wake();
        }
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
