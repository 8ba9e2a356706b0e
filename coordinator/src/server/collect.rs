//! Results and shards coming back: the results collector, the workers' progress reports,
//! shards that used up their deliveries.

use super::*;

impl Coordinator {
    /// Consumes the results stream from the start, forever, counting each line's first result.
    pub(super) async fn collect_results(self: Arc<Self>) {
        loop {
            if let Err(e) = self.collect_from().await {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "results consumer stopped; restarting in 1 s"
                );
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    pub(super) async fn collect_from(self: &Arc<Self>) -> Result<()> {
        let stream = self.js.get_stream(RESULT_STREAM).await?;
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: self.next_result_seq.load(Ordering::SeqCst),
                },
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
        while let Some(m) = messages.next().await {
            let m = m?;
            // When the results were published, for the throughput meter.
            let published = m.info().ok().map(|info| {
                self.next_result_seq
                    .store(info.stream_sequence + 1, Ordering::SeqCst);
                info.published.unix_timestamp_nanos() as f64 / 1e9
            });
            // And by whom.
            let worker = m
                .headers
                .as_ref()
                .and_then(|h| h.get(WORKER_HEADER))
                .map(|v| v.as_str().to_string());
            let source = worker.as_deref().zip(published);
            // Counted under a span whose parent is the worker's run of the shard (its
            // `traceparent`), when spans are exported: the batch's trace comes back here.
            let parent = m
                .headers
                .as_ref()
                .and_then(|h| h.get(TRACEPARENT_HEADER))
                .and_then(|v| crate::telemetry::remote_context(v.as_str()));
            let span = match parent {
                Some(cx) => {
                    let span = tracing::info_span!("results", subject = %m.subject, worker = worker.as_deref().unwrap_or(""));
                    let _ = tracing_opentelemetry::OpenTelemetrySpanExt::set_parent(&span, cx);
                    span
                }
                None => tracing::Span::none(),
            };
            let _entered = span.enter();
            match decode_results(&m.payload) {
                Ok(rs) => self.count(rs, source),
                Err(e) => {
                    tracing::error!(subject = %m.subject, error = %e, "unreadable result skipped")
                }
            }
        }
        Ok(())
    }

    /// Counts a message's results, each line once, and keeps the first result of each line.
    /// `source` (worker, publish time) feeds the throughput meter.
    pub(super) fn count(
        self: &Arc<Self>,
        results: Vec<ResultMessage>,
        source: Option<(&str, f64)>,
    ) {
        let mut finished: Vec<String> = Vec::new();
        let c = &self.counters;
        // Queue tokens these results retire: each line its share of its batch's weight.
        let mut retired = 0.0;
        // Lines and completion tokens in the message, counted or not (a redelivered shard's
        // repeats were work too), for the worker's rate on the dashboard.
        let (mut lines, mut worked) = (0u64, 0u64);
        {
            // One lock for the whole message.
            let mut map = self.lock();
            for r in results {
                let (ok, prompt, tokens) = match &r.outcome {
                    ResultOutcome::Completed { usage, .. } => (
                        true,
                        usage.prompt_tokens as u64,
                        usage.completion_tokens as u64,
                    ),
                    ResultOutcome::Failed { .. } => (false, 0, 0),
                };
                lines += 1;
                worked += tokens;
                let Some(st) = map.get_mut(&r.batch_id) else {
                    continue;
                };
                if !matches!(
                    st.rec.status,
                    BatchStatus::Validating | BatchStatus::InProgress
                ) {
                    continue;
                }
                match st.rec.record(&r.custom_id, r.line, r.shard, ok) {
                    Recorded::New => {}
                    Recorded::Repeat => {
                        c.duplicate_results.inc();
                        continue;
                    }
                    Recorded::Foreign => {
                        let n = c.rejected_results.inc() + 1;
                        // Logged while few; the metric counts them all.
                        if n <= 100 || n.is_power_of_two() {
                            tracing::warn!(batch = %r.batch_id, line = r.line, shard = ?r.shard, rejected = n, "a result for a line this batch does not have (or from a shard that did not carry it) was rejected");
                        }
                        continue;
                    }
                }
                st.dirty = true;
                if let ResultOutcome::Failed { error } = &r.outcome {
                    st.watch.errors.add(&error.code, &error.message);
                }
                if st.rec.total > 0 {
                    retired += st.rec.tokens as f64 / st.rec.total as f64;
                }
                st.rec.prompt_tokens += prompt;
                st.rec.completion_tokens += tokens;
                c.result(ok);
                c.completion_tokens.inc_by(tokens);
                if !finished.contains(&r.batch_id) {
                    finished.push(r.batch_id.clone());
                }
            }
        }
        if let Some((worker, t)) = source {
            self.workers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .results(worker, t, lines, worked, now_s_f64());
            self.meter.lock().unwrap_or_else(|p| p.into_inner()).record(
                t,
                worker,
                retired,
                now_s_f64(),
            );
        }
        for id in finished {
            self.maybe_finish(&id);
        }
    }

    /// A shard delivered `max_deliver` times without success: its lines that have no result
    /// yet become error lines, and the shard leaves the stream.
    pub(super) async fn bury_shard(&self, seq: u64) -> Result<()> {
        let stream = self.js.get_stream(SHARD_STREAM).await?;
        let msg = match stream.get_raw_message(seq).await {
            Ok(m) => m,
            // Already acknowledged or buried.
            Err(_) => return Ok(()),
        };
        let shard: ShardMessage = serde_json::from_slice(&msg.payload)
            .with_context(|| format!("shard at sequence {seq} is unreadable"))?;
        let n = self.settings.max_deliver;
        let trace = batch_trace(&shard.batch_id, &[&shard.shard.to_string(), "buried"]);
        self.lease.fence()?;
        let mut acks = Vec::new();
        for r in &shard.requests {
            let result = shard.failed_line(
                r,
                n,
                "the worker holding its shard stopped or failed every time",
            );
            let msg_id = result_msg_id(&shard.batch_id, &r.custom_id, r.line);
            acks.push(
                publish(
                    &self.js,
                    result_subject(&shard.batch_id),
                    msg_id,
                    serde_json::to_vec(&result)?,
                    &trace,
                )
                .await?,
            );
        }
        await_acks(&mut acks).await?;
        stream.delete_message(seq).await.ok();
        self.counters.dead_shards.inc();
        if let Some(st) = self.lock().get_mut(&shard.batch_id) {
            st.watch.dead.insert(shard.shard);
        }
        tracing::warn!(batch = %shard.batch_id, shard = shard.shard, "shard failed on every delivery; its lines are error lines");
        Ok(())
    }

    /// Takes the workers' progress reports (core NATS, advisory).
    pub(super) async fn watch_progress(self: Arc<Self>) {
        let subject = format!("{PROGRESS_SUBJECT_PREFIX}.*");
        let mut sub = match self.client.subscribe(subject).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch the workers' progress reports");
                return;
            }
        };
        let mut pruned = Instant::now();
        while let Some(m) = sub.next().await {
            let Ok(report) = serde_json::from_slice::<ProgressMessage>(&m.payload) else {
                tracing::debug!(subject = %m.subject, "unreadable progress report");
                continue;
            };
            let now = Instant::now();
            self.workers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .heard(&report.worker, now_s_f64());
            let redelivered = self
                .lock()
                .get_mut(&report.batch_id)
                .is_some_and(|st| st.watch.delivered(report.shard, report.delivery));
            if redelivered {
                self.counters.shard_redeliveries.inc();
            }
            let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
            p.record(report, now);
            if now.duration_since(pruned) > crate::progress::STALE_AFTER {
                p.prune(now);
                pruned = now;
            }
        }
    }

    /// What the workers last said is running for a batch.
    pub fn running(&self, batch: &str) -> crate::progress::Running {
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .running(batch, Instant::now())
    }

    /// Listens for JetStream's max-deliveries advisories; a periodic sweep catches those sent
    /// while no coordinator was listening.
    pub(super) async fn watch_dead_shards(self: Arc<Self>) {
        let subject =
            format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{SHARD_STREAM}.{WORKER_CONSUMER}");
        let mut sub = match self.client.subscribe(subject).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch for dead shards");
                return;
            }
        };
        #[derive(Deserialize)]
        struct Advisory {
            stream_seq: u64,
        }
        while let Some(m) = sub.next().await {
            match serde_json::from_slice::<Advisory>(&m.payload) {
                Ok(a) => {
                    if let Err(e) = self.bury_shard(a.stream_seq).await {
                        tracing::error!(error = format!("{e:#}"), "burying a dead shard failed");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "unreadable advisory"),
            }
        }
    }

    /// With the worker consumer idle, any shard still in the stream at or below its delivered
    /// sequence has used up its deliveries.
    pub(super) async fn sweep_dead_shards(&self) -> Result<()> {
        let mut stream = self.js.get_stream(SHARD_STREAM).await?;
        let mut consumer: consumer::PullConsumer = stream
            .get_consumer(WORKER_CONSUMER)
            .await
            .map_err(|e| anyhow!("{e}"))?;
        let info = consumer.info().await?.clone();
        if info.num_pending > 0 || info.num_ack_pending > 0 {
            return Ok(());
        }
        let state = stream.info().await?.state.clone();
        if state.messages == 0 {
            return Ok(());
        }
        let last = info.delivered.stream_sequence.min(state.last_sequence);
        for seq in state.first_sequence..=last {
            self.bury_shard(seq).await?;
        }
        Ok(())
    }
}
