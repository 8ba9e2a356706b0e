//! Supervised background tasks: no task dies silently.
//!
//! Invariant: a supervised task that panics is logged, counted under its name in
//! `gristmill_task_panics_total{task}` and started again after a backoff (1 s, doubling to
//! 30 s; back to 1 s once it has run for a minute). A *forever* task (the results collector,
//! the tick, the dead-shard watcher) that returns is started again too; a *one-shot* task (one
//! batch's dispatch or finalization) that returns is done.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Panics per task name, for `/metrics`.
#[derive(Debug, Default)]
pub struct TaskPanics(Mutex<BTreeMap<&'static str, u64>>);

impl TaskPanics {
    fn add(&self, task: &'static str) -> u64 {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(task).or_default();
        *n += 1;
        *n
    }

    /// Every task that panicked, with its count.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.iter().map(|(k, v)| (*k, *v)).collect()
    }
}

/// Whether a supervised task is meant to run for the life of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    Forever,
    OneShot,
}

/// Spawns `make()` under supervision (see the module's invariant).
pub fn supervise<F, Fut>(task: &'static str, lifetime: Lifetime, panics: Arc<TaskPanics>, make: F)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut backoff = Duration::from_secs(1);
        loop {
            let started = Instant::now();
            match tokio::spawn(make()).await {
                Ok(()) if lifetime == Lifetime::OneShot => return,
                Ok(()) => tracing::error!(task, "background task stopped; starting it again"),
                Err(e) if e.is_panic() => {
                    let n = panics.add(task);
                    let what = e
                        .into_panic()
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "a panic".into());
                    tracing::error!(task, panics = n, panic = %what, "background task panicked; starting it again");
                }
                // Cancelled: the runtime is shutting down.
                Err(_) => return,
            }
            if started.elapsed() > Duration::from_secs(60) {
                backoff = Duration::from_secs(1);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn a_panicking_task_is_counted_and_started_again() {
        let panics = Arc::new(TaskPanics::default());
        let runs = Arc::new(AtomicU32::new(0));
        let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel();
        {
            let runs = runs.clone();
            supervise("flaky", Lifetime::OneShot, panics.clone(), move || {
                let runs = runs.clone();
                let done_tx = done_tx.clone();
                async move {
                    if runs.fetch_add(1, Ordering::SeqCst) < 2 {
                        panic!("boom");
                    }
                    let _ = done_tx.send(());
                }
            });
        }
        tokio::time::timeout(Duration::from_secs(60), done.recv())
            .await
            .expect("the task ran to the end on its third start");
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert_eq!(panics.snapshot(), vec![("flaky", 2)]);
    }
}
