//! The once-a-second tick: expiry, throughput, autoscaling.

use super::*;

impl Coordinator {
    /// Once a second: store changed records, expire overdue batches, sample tokens/s, and
    /// every 10 s sweep for dead shards.
    pub(super) async fn tick(self: Arc<Self>) {
        let mut interval = tokio::time::interval(Duration::from_millis(500));
        let mut n = 0u64;
        let autoscale_every = (self.settings.autoscale_interval.as_millis() / 500).max(1) as u64;
        loop {
            interval.tick().await;
            n += 1;
            let dirty: Vec<String> = self
                .lock()
                .iter()
                .filter(|(_, s)| s.dirty)
                .map(|(k, _)| k.clone())
                .collect();
            for id in dirty {
                if let Err(e) = self.save(&id).await {
                    tracing::warn!(batch = %id, error = format!("{e:#}"), "could not store batch");
                }
            }
            let now = now_s();
            let overdue: Vec<String> = {
                let mut map = self.lock();
                map.iter_mut()
                    .filter(|(_, s)| {
                        s.rec.status == BatchStatus::InProgress
                            && !s.closing
                            && now >= s.rec.expires_at
                    })
                    .map(|(k, s)| {
                        s.closing = true;
                        s.rec.ending = Some(BatchStatus::Expired);
                        k.clone()
                    })
                    .collect()
            };
            for id in overdue {
                tracing::info!(batch = %id, "completion window ran out");
                self.purge_shards(&id).await;
                self.spawn_finalize(id);
            }
            // A batch whose window runs out before it was dispatched fails (it has no lines
            // to report as expired).
            let stuck: Vec<String> = self
                .lock()
                .iter()
                .filter(|(_, s)| s.rec.status == BatchStatus::Validating && now >= s.rec.expires_at)
                .map(|(k, _)| k.clone())
                .collect();
            for id in stuck {
                tracing::warn!(batch = %id, "completion window ran out while validating");
                let error = LineError::new(
                    "expired_while_validating",
                    "the batch's completion window ran out before its input file was dispatched",
                );
                if let Err(e) = self.fail_validation(&id, vec![(None, error)]).await {
                    tracing::warn!(batch = %id, error = format!("{e:#}"), "could not fail the batch; retrying at the next tick");
                }
            }
            if n.is_multiple_of(2) {
                let mut rate = self.rate.lock().unwrap_or_else(|p| p.into_inner());
                rate.push_back((Instant::now(), self.counters.completion_tokens.get()));
                while rate.len() > 11 {
                    rate.pop_front();
                }
                drop(rate);
                self.sample_batches();
            }
            if n.is_multiple_of(autoscale_every) {
                let rate = self.measure().await;
                self.autoscale_tick(rate).await;
            }
            if n.is_multiple_of(20) {
                if let Err(e) = self.sweep_dead_shards().await {
                    tracing::debug!(error = format!("{e:#}"), "dead shard sweep failed");
                }
            }
        }
    }

    /// Samples the throughput meter: measured while shards wait undelivered.
    pub(super) async fn measure(&self) -> Option<f64> {
        let backlogged = match self.js.get_stream(SHARD_STREAM).await {
            Ok(s) => s
                .consumer_info(WORKER_CONSUMER)
                .await
                .map(|i| i.num_pending > 0)
                .unwrap_or(false),
            Err(_) => false,
        };
        let now = now_s_f64();
        self.meter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sample(now, backlogged)
    }

    /// One decision of the autoscaling policy from the batches in memory: applied to the worker
    /// StatefulSet with `--autoscale`, only logged (when it changes) in a dry run.
    pub(super) async fn autoscale_tick(&self, measured_tokens_per_s: Option<f64>) {
        let Some(policy) = self.settings.autoscale_dry_run else {
            return;
        };
        let live = match &self.scaler {
            Some(scaler) => match scaler.replicas().await {
                Ok(n) => Some(n),
                Err(e) => {
                    tracing::warn!(error = %e, "autoscale: cannot read the worker replicas");
                    return;
                }
            },
            None => None,
        };
        let batches: Vec<crate::autoscale::PendingBatch> = self
            .lock()
            .values()
            .filter(|s| s.rec.status == BatchStatus::InProgress && s.rec.total > 0)
            .map(|s| {
                let left = s.rec.total.saturating_sub(s.rec.completed + s.rec.failed);
                crate::autoscale::PendingBatch {
                    tokens: (s.rec.tokens * left / s.rec.total) as f64,
                    deadline_s: s.rec.expires_at as f64,
                }
            })
            .collect();
        let pending_tokens: f64 = batches.iter().map(|b| b.tokens).sum();
        let (current, d) = {
            let mut state = self.autoscale.lock().unwrap_or_else(|p| p.into_inner());
            let current = live.unwrap_or(state.1);
            let obs = crate::autoscale::Observation {
                now_s: now_s() as f64,
                batches,
                current_replicas: current,
                tokens_per_s_per_worker: measured_tokens_per_s,
            };
            let d = crate::autoscale::decide(&policy, &obs, &mut state.0);
            state.1 = d.replicas;
            (current, d)
        };
        *self.last_decision.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(super::watch::LastDecision {
                at_s: now_s_f64(),
                current,
                decision: d,
                pending_tokens,
                tokens_per_s_per_worker: measured_tokens_per_s,
            });
        if d.replicas == current {
            return;
        }
        match &self.scaler {
            None => {
                tracing::info!(from = current, to = d.replicas, reason = ?d.reason, deadline_need = d.deadline_need, "autoscale (dry run): would scale the workers")
            }
            Some(scaler) => {
                if self.lease.fence().is_err() {
                    return;
                }
                match scaler.scale_to(d.replicas).await {
                    Ok(_) => {
                        tracing::info!(from = current, to = d.replicas, reason = ?d.reason, deadline_need = d.deadline_need, "autoscale: scaled the workers")
                    }
                    Err(e) => {
                        tracing::error!(error = %e, to = d.replicas, "autoscale: scaling failed")
                    }
                }
            }
        }
    }
}
