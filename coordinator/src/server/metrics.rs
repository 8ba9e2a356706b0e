//! Prometheus metrics.

use super::*;

impl Coordinator {
    /// Prometheus text exposition of the coordinator's metrics.
    pub async fn metrics(&self) -> String {
        let queue_shards = match self.js.get_stream(SHARD_STREAM).await {
            Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
            Err(_) => 0,
        };
        let mut by_status: HashMap<&'static str, u64> = HashMap::new();
        let mut queue_tokens = 0u64;
        for s in self.lock().values() {
            *by_status.entry(status_name(s.rec.status)).or_default() += 1;
            if s.rec.status == BatchStatus::InProgress && s.rec.total > 0 {
                let left = s.rec.total.saturating_sub(s.rec.completed + s.rec.failed);
                queue_tokens += s.rec.tokens * left / s.rec.total;
            }
        }
        let rate = {
            let r = self.rate.lock().unwrap_or_else(|p| p.into_inner());
            match (r.front(), r.back()) {
                (Some(a), Some(b)) if b.0 > a.0 => (b.1 - a.1) as f64 / (b.0 - a.0).as_secs_f64(),
                _ => 0.0,
            }
        };
        let c = &self.counters;
        let mut m = String::new();
        let mut gauge = |name: &str, help: &str, kind: &str, lines: Vec<(String, String)>| {
            m.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            for (labels, v) in lines {
                m.push_str(&format!("{name}{labels} {v}\n"));
            }
        };
        gauge(
            "gristmill_queue_shards",
            "Shards waiting in or held from the work queue.",
            "gauge",
            vec![(String::new(), queue_shards.to_string())],
        );
        gauge(
            "gristmill_queue_tokens",
            "Prompt plus max_tokens of lines not yet finished (what the autoscaler weighs).",
            "gauge",
            vec![(String::new(), queue_tokens.to_string())],
        );
        let mut statuses: Vec<_> = ALL_STATUSES
            .iter()
            .map(|&s| {
                (
                    format!("{{status=\"{}\"}}", status_name(s)),
                    by_status
                        .get(status_name(s))
                        .copied()
                        .unwrap_or(0)
                        .to_string(),
                )
            })
            .collect();
        statuses.sort();
        gauge("gristmill_batches", "Batches by status.", "gauge", statuses);
        gauge(
            "gristmill_results_total",
            "Line results counted (duplicates excluded).",
            "counter",
            vec![
                (
                    "{outcome=\"completed\"}".into(),
                    c.results_completed.load(Ordering::Relaxed).to_string(),
                ),
                (
                    "{outcome=\"failed\"}".into(),
                    c.results_failed.load(Ordering::Relaxed).to_string(),
                ),
            ],
        );
        gauge(
            "gristmill_duplicate_results_total",
            "Results dropped because their line had already reported (redeliveries).",
            "counter",
            vec![(
                String::new(),
                c.duplicate_results.load(Ordering::Relaxed).to_string(),
            )],
        );
        gauge(
            "gristmill_rejected_results_total",
            "Results dropped because their batch has no such line, or because they did not come from the shard that carried it (forged or misrouted).",
            "counter",
            vec![(
                String::new(),
                c.rejected_results.load(Ordering::Relaxed).to_string(),
            )],
        );
        gauge(
            "gristmill_finalize_failures_total",
            "Finalization attempts that failed (the store full or unreachable); each batch is retried until its files are stored.",
            "counter",
            vec![(
                String::new(),
                c.finalize_failures.load(Ordering::Relaxed).to_string(),
            )],
        );
        gauge(
            "gristmill_dispatch_failures_total",
            "Dispatch attempts that failed; a batch whose dispatch fails every time is failed.",
            "counter",
            vec![(
                String::new(),
                c.dispatch_failures.load(Ordering::Relaxed).to_string(),
            )],
        );
        let mut panics: Vec<(String, String)> =
            ["results", "dead_shards", "tick", "dispatch", "finalize"]
                .iter()
                .map(|t| (format!("{{task=\"{t}\"}}"), "0".to_string()))
                .collect();
        for (task, n) in self.panics.snapshot() {
            let label = format!("{{task=\"{task}\"}}");
            match panics.iter_mut().find(|(l, _)| *l == label) {
                Some(entry) => entry.1 = n.to_string(),
                None => panics.push((label, n.to_string())),
            }
        }
        gauge(
            "gristmill_task_panics_total",
            "Background tasks that panicked (each was started again).",
            "counter",
            panics,
        );
        gauge(
            "gristmill_completion_tokens_total",
            "Tokens generated by workers.",
            "counter",
            vec![(
                String::new(),
                c.completion_tokens.load(Ordering::Relaxed).to_string(),
            )],
        );
        gauge(
            "gristmill_completion_tokens_per_second",
            "Tokens generated per second over the last 10 s.",
            "gauge",
            vec![(String::new(), format!("{rate:.1}"))],
        );
        gauge(
            "gristmill_shards_published_total",
            "Shards published to the work queue.",
            "counter",
            vec![(
                String::new(),
                c.shards_published.load(Ordering::Relaxed).to_string(),
            )],
        );
        let (measured, active) = {
            let m = self.meter.lock().unwrap_or_else(|p| p.into_inner());
            let now = now_s_f64();
            (m.estimate(), m.active_workers(now))
        };
        gauge(
            "gristmill_workers_active",
            "Workers that published results in the throughput meter's window.",
            "gauge",
            vec![(String::new(), active.to_string())],
        );
        if let Some(rate) = measured {
            gauge(
                "gristmill_worker_tokens_per_second",
                "Queue tokens (prompt plus max_tokens) one worker retires per second, measured while shards wait (what the autoscaler divides by).",
                "gauge",
                vec![(String::new(), format!("{rate:.1}"))],
            );
        }
        if self.settings.autoscale_dry_run.is_some() {
            let desired = self.autoscale.lock().map(|s| s.1).unwrap_or(0);
            gauge(
                "gristmill_autoscale_desired_replicas",
                "Workers the autoscaling policy asks for (applied with --autoscale, logged only with --autoscale-dry-run).",
                "gauge",
                vec![(String::new(), desired.to_string())],
            );
        }
        gauge(
            "gristmill_dead_shards_total",
            "Shards that failed on every delivery.",
            "counter",
            vec![(
                String::new(),
                c.dead_shards.load(Ordering::Relaxed).to_string(),
            )],
        );
        m
    }
}
