//! What the dashboard reads: each batch's counts over time, its shards and errors, the workers
//! heard from lately and the autoscaler's last answer (all advisory, in the leader's memory;
//! see [`crate::dashboard`]).

use std::collections::{BTreeSet, HashMap};

use serde_json::{json, Value};

use super::*;
use crate::dashboard::{rates, shard_views, ErrorTally, Holder, Point, Series};

/// Seconds between a batch's samples at first (they coarsen as it runs long).
const SAMPLE_EVERY_S: f64 = 1.0;
/// Samples kept per batch while it runs, and once it has ended.
const SAMPLES: usize = 600;
const SAMPLES_ENDED: usize = 120;
/// The window of "now" rates.
const RATE_WINDOW_S: f64 = 10.0;
/// Workers' rates are measured over this window; silent ones are dropped after `WORKERS_FORGET_S`.
pub(super) const WORKERS_WINDOW_S: f64 = 30.0;
pub(super) const WORKERS_FORGET_S: f64 = 600.0;
/// Shards listed per batch at most (the rest are summed in the counts by status).
const MAX_SHARDS_LISTED: usize = 1000;

/// A batch's dashboard data.
#[derive(Debug)]
pub(super) struct BatchWatch {
    series: Series,
    pub(super) errors: ErrorTally,
    /// The most deliveries a worker reported, per shard.
    deliveries: HashMap<u32, u32>,
    /// Shards that failed on every delivery.
    pub(super) dead: BTreeSet<u32>,
}

impl Default for BatchWatch {
    fn default() -> Self {
        Self {
            series: Series::new(SAMPLE_EVERY_S, SAMPLES),
            errors: ErrorTally::default(),
            deliveries: HashMap::new(),
            dead: BTreeSet::new(),
        }
    }
}

impl BatchWatch {
    /// A worker runs `shard` on `delivery`; whether that is a redelivery not seen before.
    pub(super) fn delivered(&mut self, shard: u32, delivery: u32) -> bool {
        let d = self.deliveries.entry(shard).or_default();
        let new = delivery > *d && delivery > 1;
        *d = (*d).max(delivery);
        new
    }
}

/// Gauges with one series per label value, measured at each scrape.
pub(super) type GaugeFamily = prometheus_client::metrics::family::Family<
    Vec<(&'static str, String)>,
    prometheus_client::metrics::gauge::Gauge<f64, std::sync::atomic::AtomicU64>,
>;

/// The autoscaler's last decision, as the dashboard shows it.
#[derive(Debug, Clone)]
pub(super) struct LastDecision {
    pub(super) at_s: f64,
    pub(super) current: u32,
    pub(super) decision: crate::autoscale::Decision,
    pub(super) pending_tokens: f64,
    pub(super) tokens_per_s_per_worker: Option<f64>,
}

fn point(rec: &BatchRecord, t: f64) -> Point {
    Point {
        t,
        completed: rec.completed,
        failed: rec.failed,
        tokens: rec.completion_tokens,
    }
}

/// When a batch stopped running, if it did.
fn ended_at(rec: &BatchRecord) -> Option<u64> {
    rec.completed_at
        .or(rec.failed_at)
        .or(rec.expired_at)
        .or(rec.cancelled_at)
        .or(rec.finalizing_at)
        .or(rec.cancelling_at)
}

impl Coordinator {
    /// Samples the counts of every batch that is running or changed since its last sample
    /// (once a second, from the tick).
    pub(super) fn sample_batches(&self) {
        let now = now_s_f64();
        for st in self.lock().values_mut() {
            let p = point(&st.rec, now);
            let changed = st.watch.series.points().last().is_none_or(|l| {
                (l.completed, l.failed, l.tokens) != (p.completed, p.failed, p.tokens)
            });
            if st.rec.status == BatchStatus::InProgress || changed {
                st.watch.series.push(p);
            }
            if st.rec.status.is_terminal() {
                // An ended batch keeps its shape in less memory.
                st.watch.series.shrink_to(SAMPLES_ENDED);
            }
        }
    }

    fn workers_now(&self, now: f64) -> Value {
        let in_flight = self
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .shards_by_worker(Instant::now());
        let views = self
            .workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .view(now, &in_flight);
        json!(views)
    }

    fn autoscale_now(&self) -> Value {
        let Some(policy) = self.settings.autoscale_dry_run else {
            return json!({"enabled": false});
        };
        let last = self
            .last_decision
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut v = json!({
            "enabled": true,
            "applied": self.scaler.is_some(),
            "min_replicas": policy.min_replicas,
            "max_replicas": policy.max_replicas,
            "active_workers": self.meter.lock().unwrap_or_else(|e| e.into_inner()).active_workers(now_s_f64()),
        });
        if let Some(d) = last {
            let (reason, why) = d.decision.reason.describe();
            v["decided_at"] = json!(d.at_s);
            v["current_replicas"] = json!(d.current);
            v["desired_replicas"] = json!(d.decision.replicas);
            v["deadline_need"] = json!(d.decision.deadline_need);
            v["reason"] = json!(reason);
            v["why"] = json!(why);
            v["pending_tokens"] = json!(d.pending_tokens.round().max(0.0));
            v["tokens_per_s_per_worker"] = json!(d.tokens_per_s_per_worker);
        }
        v
    }

    /// A batch's summary line on the dashboard: its OpenAI object, rates and time left.
    fn batch_summary(&self, st: &BatchState, now: f64) -> Value {
        let rec = &st.rec;
        let mut v = rec.to_openai();
        let live = point(rec, now);
        let ended = ended_at(rec).map(|t| t as f64);
        let r = rates(
            &st.watch.series,
            live,
            rec.total,
            rec.in_progress_at.map(|t| t as f64),
            ended,
            RATE_WINDOW_S,
        );
        let running = self.running(&rec.id);
        v["dashboard"] = json!({
            "tokens_per_s_now": r.tokens_per_s_now,
            "tokens_per_s_avg": r.tokens_per_s_avg,
            "lines_per_s_now": r.lines_per_s_now,
            "eta_s": r.eta_s,
            "ended_at": ended_at(rec),
            "shards": rec.shards,
            "running_shards": running.shards,
            "running_output_tokens": running.output_tokens,
            "dead_shards": st.watch.dead.len(),
        });
        v
    }

    /// The dashboard's overview for `tenant`: its newest batches (at most `limit`), the
    /// workers, the autoscaler and cluster-wide rates.
    pub fn dashboard(&self, tenant: &str, limit: usize) -> Value {
        let now = now_s_f64();
        let batches: Vec<Value> = {
            let map = self.lock();
            let mut mine: Vec<&BatchState> = map
                .values()
                .filter(|s| crate::tenants::owns(s.rec.owner.as_deref(), tenant))
                .collect();
            mine.sort_by(|a, b| {
                b.rec
                    .created_at
                    .cmp(&a.rec.created_at)
                    .then(b.rec.id.cmp(&a.rec.id))
            });
            mine.iter()
                .take(limit)
                .map(|s| self.batch_summary(s, now))
                .collect()
        };
        json!({
            "now": now,
            "coordinator": self.lease.identity(),
            "batches": batches,
            "workers": self.workers_now(now),
            "autoscale": self.autoscale_now(),
            "cluster": {
                "completion_tokens_per_s": self.tokens_per_s(),
                "dead_shards_total": self.counters.dead_shards.get(),
                "results_total": self.counters.results.get_or_create(&[("outcome", "completed")]).get()
                    + self.counters.results.get_or_create(&[("outcome", "failed")]).get(),
            },
        })
    }

    /// One batch's page: its summary, counts over time, shards and errors by code; `None`
    /// when `tenant` has no such batch.
    pub fn dashboard_batch(&self, id: &str, tenant: &str) -> Option<Value> {
        let now = now_s_f64();
        let running = self
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .running_shards(id, Instant::now());
        let map = self.lock();
        let st = map
            .get(id)
            .filter(|s| crate::tenants::owns(s.rec.owner.as_deref(), tenant))?;
        let mut v = self.batch_summary(st, now);
        let mut history: Vec<Point> = st.watch.series.points().to_vec();
        if !st.rec.status.is_terminal() || history.is_empty() {
            history.push(point(&st.rec, now));
        }
        let holders: Vec<(u32, Holder)> = running
            .into_iter()
            .map(|r| {
                (
                    r.shard,
                    Holder {
                        worker: r.worker,
                        delivery: r.delivery,
                        running_tokens: r.running_tokens,
                    },
                )
            })
            .collect();
        let shards = shard_views(
            st.rec.shards,
            &st.rec.ledger.shard_counts(),
            &holders,
            &st.watch.deliveries,
            &st.watch.dead,
        );
        let count = |want: crate::dashboard::ShardStatus| {
            shards.iter().filter(|s| s.status == want).count()
        };
        use crate::dashboard::ShardStatus as S;
        let redelivered = shards.iter().filter(|s| s.deliveries > 1).count();
        let mut errors = st.watch.errors.clone();
        for (_, e) in &st.rec.errors {
            errors.add(&e.code, &e.message);
        }
        v["history"] = json!(history);
        v["shard_counts"] = json!({
            "running": count(S::Running), "dead": count(S::Dead), "pending": count(S::Pending),
            "done": count(S::Done), "redelivered": redelivered,
        });
        v["shards_listed"] = json!(shards.len().min(MAX_SHARDS_LISTED));
        v["shard_list"] = json!(shards
            .into_iter()
            .take(MAX_SHARDS_LISTED)
            .collect::<Vec<_>>());
        v["errors_by_code"] = json!(errors.counts());
        Some(v)
    }

    /// For /metrics: tokens/s per worker, and time left and to the deadline per running batch.
    pub(super) fn dashboard_gauges(&self) -> (GaugeFamily, GaugeFamily, GaugeFamily) {
        let now = now_s_f64();
        let (workers, eta, deadline) = (
            GaugeFamily::default(),
            GaugeFamily::default(),
            GaugeFamily::default(),
        );
        let in_flight = HashMap::new();
        for w in self
            .workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .view(now, &in_flight)
        {
            workers
                .get_or_create(&vec![("worker", w.name)])
                .set(w.tokens_per_s);
        }
        for st in self.lock().values() {
            let rec = &st.rec;
            if rec.status != BatchStatus::InProgress {
                continue;
            }
            let label = vec![("batch", rec.id.clone())];
            deadline
                .get_or_create(&label)
                .set(rec.expires_at as f64 - now);
            let r = rates(
                &st.watch.series,
                point(rec, now),
                rec.total,
                rec.in_progress_at.map(|t| t as f64),
                None,
                RATE_WINDOW_S,
            );
            if let Some(s) = r.eta_s {
                eta.get_or_create(&label).set(s);
            }
        }
        (workers, eta, deadline)
    }

    /// Completion tokens per second over the last 10 s, cluster-wide.
    pub(super) fn tokens_per_s(&self) -> f64 {
        let r = self.rate.lock().unwrap_or_else(|p| p.into_inner());
        match (r.front(), r.back()) {
            (Some(a), Some(b)) if b.0 > a.0 => (b.1 - a.1) as f64 / (b.0 - a.0).as_secs_f64(),
            _ => 0.0,
        }
    }
}
