//! What the workers say about the shards they are running, between results.
//!
//! Results count a line when it finishes; a shard of long generations can run for minutes
//! before its first line does. Workers report each running shard about once a second on core
//! NATS ([`ProgressMessage`]): the tokens generated so far by its unfinished lines. This module
//! keeps the latest report per (batch, shard, worker) and sums them per batch. Reports are
//! advisory: one that is not renewed within [`STALE_AFTER`] is forgotten (the worker died or
//! the shard ended without a last report), and nothing here is ever counted in a batch's
//! results or usage.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use gristmill_protocol::cluster::ProgressMessage;

/// How long a report counts without being renewed (workers report every second).
pub const STALE_AFTER: Duration = Duration::from_secs(5);

/// Shards running now and the tokens their unfinished lines have generated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Running {
    pub shards: u64,
    pub output_tokens: u64,
}

/// A batch's latest reports: (shard, worker) → (running tokens, delivery, when received).
type BatchReports = HashMap<(u32, String), (u64, u32, Instant)>;

/// One shard running on one worker, from a fresh report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningShard {
    pub shard: u32,
    pub worker: String,
    /// Which delivery of the shard (1: the first; 0: not said).
    pub delivery: u32,
    pub running_tokens: u64,
}

/// The latest progress reports.
#[derive(Debug, Default)]
pub struct Progress {
    reports: HashMap<String, BatchReports>,
}

impl Progress {
    /// Takes a worker's report, received at `now`.
    pub fn record(&mut self, m: ProgressMessage, now: Instant) {
        let key = (m.shard, m.worker);
        if m.done {
            if let Some(shards) = self.reports.get_mut(&m.batch_id) {
                shards.remove(&key);
                if shards.is_empty() {
                    self.reports.remove(&m.batch_id);
                }
            }
        } else {
            self.reports
                .entry(m.batch_id)
                .or_default()
                .insert(key, (m.running_tokens, m.delivery, now));
        }
    }

    /// What is running for a batch, from reports fresh at `now`.
    pub fn running(&self, batch: &str, now: Instant) -> Running {
        let mut r = Running::default();
        for (tokens, _, at) in self.reports.get(batch).into_iter().flat_map(|s| s.values()) {
            if now.saturating_duration_since(*at) < STALE_AFTER {
                r.shards += 1;
                r.output_tokens += tokens;
            }
        }
        r
    }

    /// Drops stale reports (called now and then, so that dead workers' reports do not pile up).
    pub fn prune(&mut self, now: Instant) {
        self.reports.retain(|_, shards| {
            shards.retain(|_, (_, _, at)| now.saturating_duration_since(*at) < STALE_AFTER);
            !shards.is_empty()
        });
    }

    /// The shards of a batch running now (fresh reports), by shard then worker.
    pub fn running_shards(&self, batch: &str, now: Instant) -> Vec<RunningShard> {
        let mut out: Vec<RunningShard> = self
            .reports
            .get(batch)
            .into_iter()
            .flat_map(|s| s.iter())
            .filter(|(_, (_, _, at))| now.saturating_duration_since(*at) < STALE_AFTER)
            .map(|((shard, worker), (tokens, delivery, _))| RunningShard {
                shard: *shard,
                worker: worker.clone(),
                delivery: *delivery,
                running_tokens: *tokens,
            })
            .collect();
        out.sort_by(|a, b| (a.shard, &a.worker).cmp(&(b.shard, &b.worker)));
        out
    }

    /// Shards each worker runs now (fresh reports, every batch).
    pub fn shards_by_worker(&self, now: Instant) -> HashMap<String, u64> {
        let mut out: HashMap<String, u64> = HashMap::new();
        for ((_, worker), (_, _, at)) in self.reports.values().flat_map(|s| s.iter()) {
            if now.saturating_duration_since(*at) < STALE_AFTER {
                *out.entry(worker.clone()).or_default() += 1;
            }
        }
        out
    }

    /// Forgets a batch (it ended).
    pub fn forget(&mut self, batch: &str) {
        self.reports.remove(batch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(batch: &str, shard: u32, worker: &str, tokens: u64, done: bool) -> ProgressMessage {
        ProgressMessage {
            batch_id: batch.into(),
            shard,
            worker: worker.into(),
            running_tokens: tokens,
            done,
            delivery: 1,
        }
    }

    #[test]
    fn running_shards_are_summed_per_batch_and_forgotten_when_done_or_stale() {
        let t0 = Instant::now();
        let mut p = Progress::default();
        p.record(report("b1", 0, "w1", 10, false), t0);
        p.record(report("b1", 1, "w2", 5, false), t0);
        p.record(report("b2", 0, "w1", 7, false), t0);
        // A newer report replaces the older one of the same shard on the same worker.
        p.record(
            report("b1", 0, "w1", 30, false),
            t0 + Duration::from_secs(1),
        );
        let at = t0 + Duration::from_secs(2);
        let want = Running {
            shards: 2,
            output_tokens: 35,
        };
        assert_eq!(p.running("b1", at), want);
        assert_eq!(p.running("b2", at).output_tokens, 7);
        assert_eq!(p.running("nope", at), Running::default());
        // A redelivered shard on another worker is a second report until the first goes stale.
        p.record(report("b1", 1, "w3", 2, false), at);
        assert_eq!(p.running("b1", at).shards, 3);
        let running = p.running_shards("b1", at);
        let names: Vec<(u32, &str)> = running
            .iter()
            .map(|r| (r.shard, r.worker.as_str()))
            .collect();
        assert_eq!(names, [(0, "w1"), (1, "w2"), (1, "w3")]);
        assert_eq!(running[0].running_tokens, 30);
        let by_worker = p.shards_by_worker(at);
        assert_eq!(
            (by_worker["w1"], by_worker["w2"], by_worker["w3"]),
            (2, 1, 1)
        );
        // Done: gone at once.
        p.record(report("b1", 0, "w1", 0, true), at);
        assert_eq!(p.running("b1", at).output_tokens, 7);
        // Stale: w2's report of t0 no longer counts 5 s later; w3's (at t0+2) still does.
        let later = t0 + STALE_AFTER + Duration::from_millis(1);
        assert_eq!(
            p.running("b1", later),
            Running {
                shards: 1,
                output_tokens: 2
            }
        );
        p.prune(later);
        assert_eq!(p.reports["b1"].len(), 1);
        assert!(!p.reports.contains_key("b2"), "b2's only report was stale");
        p.forget("b1");
        assert!(p.reports.is_empty());
    }
}
