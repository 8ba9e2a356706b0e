//! Dispatch: a new batch's input file validated (pass 1), then planned and published window
//! by window (pass 2) with its ledger and index; cancellation.

use super::*;
use tracing::Instrument;

impl Coordinator {
    /// Creates a batch in `validating` and starts its intake.
    pub async fn create_batch(self: &Arc<Self>, rec: BatchRecord) -> Result<BatchRecord> {
        let id = rec.id.clone();
        self.lock().insert(
            id.clone(),
            BatchState {
                rec: rec.clone(),
                dirty: true,
                closing: false,
                watch: Default::default(),
            },
        );
        self.save(&id).await?;
        self.spawn_dispatch(id);
        Ok(rec)
    }

    /// Validates the input file, publishes invalid lines as failed results and the shards,
    /// then moves the batch to `in_progress`. Safe to run again after a crash: every message
    /// carries a `Nats-Msg-Id`, and results are counted once per line anyway. A dispatch that
    /// keeps failing is retried with a growing pause, at most [`DISPATCH_ATTEMPTS`] times,
    /// then the batch fails with the last error (it never waits in `validating` for ever).
    pub(super) async fn dispatch(self: Arc<Self>, id: String) {
        let mut pause = Duration::from_secs(1);
        for attempt in 1..=DISPATCH_ATTEMPTS {
            let span =
                tracing::info_span!("dispatch", batch = %id, trace_id = %batch_trace_id(&id));
            crate::telemetry::under_batch(&span, &id);
            let Err(e) = self.try_dispatch(&id).instrument(span).await else {
                return;
            };
            self.counters.dispatch_failures.inc();
            if attempt == DISPATCH_ATTEMPTS {
                tracing::error!(batch = %id, attempt, error = format!("{e:#}"), "dispatch failed for the last time; the batch fails");
                let error = LineError::new(
                    "dispatch_failed",
                    format!("the batch could not be dispatched after {attempt} attempts: {e:#}"),
                );
                if let Err(e) = self.fail_validation(&id, vec![(None, error)]).await {
                    tracing::error!(batch = %id, error = format!("{e:#}"), "could not store the failed batch; a restarted coordinator will dispatch it again");
                }
                return;
            }
            tracing::error!(batch = %id, attempt, error = format!("{e:#}"), pause_s = pause.as_secs(), "dispatch failed; retrying");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(60));
        }
    }

    /// One attempt of dispatch, in its `dispatch` span (whose `traceparent` the shards carry
    /// when spans are exported).
    pub(super) async fn try_dispatch(self: &Arc<Self>, id: &str) -> Result<()> {
        let Some(rec) = self.batch(id) else {
            return Ok(());
        };
        if rec.status != BatchStatus::Validating {
            return Ok(());
        }
        tracing::info!(batch = %id, "validating");
        let limits = self.settings.limits;
        let file = rec.input_file_id.clone();
        let size = match self.objects.info(&file).await {
            Ok(info) => info.size as u64,
            Err(e) => {
                let error = LineError::new(
                    "file_not_found",
                    format!("input file {file} could not be read: {e}"),
                );
                return self.fail_validation(id, vec![(None, error)]).await;
            }
        };
        if size > limits.max_bytes {
            return self
                .fail_validation(id, crate::intake::file_too_large(size, &limits))
                .await;
        }
        // Pass 1: the file-level checks, streaming the file; nothing is kept but what they need.
        let mut scanner = Scanner::new(rec.endpoint, &limits);
        let mut lines = self.input_lines(&file).await?;
        while let Some((first, piece)) = lines.next().await? {
            scanner = scan_piece(scanner, first, piece).await?.0;
        }
        let total = match scanner.finish() {
            Ok(t) => t,
            Err(errors) => return self.fail_validation(id, errors).await,
        };
        self.update(id, |st| {
            st.rec.total = total;
            st.rec.ledger = Ledger::with_capacity(usize::try_from(total).unwrap_or(0));
        })
        .await?;
        // Pass 2: the lines again, planned and published window by window, the index object
        // written as they go.
        let (index_w, mut index_r) = tokio::io::duplex(FILE_CHUNK);
        let index_meta = object_store::ObjectMetadata {
            name: index_object(id),
            chunk_size: Some(FILE_CHUNK),
            ..Default::default()
        };
        self.lease.fence()?;
        let ((tokens, shards, cancelled), _) =
            tokio::try_join!(self.publish_lines(id, &rec, index_w), async {
                self.objects
                    .put(index_meta, &mut index_r)
                    .await
                    .map_err(|e| anyhow!(e).context(format!("storing batch {id}'s index")))
            },)?;
        let started = !cancelled
            && self
                .update(id, |st| {
                    st.rec.tokens = tokens;
                    st.rec.shards = shards;
                    if st.rec.status == BatchStatus::Validating {
                        st.rec.transition(BatchStatus::InProgress, now_s()).is_ok()
                    } else {
                        false
                    }
                })
                .await?;
        if !started {
            // Cancelled (or failed at its deadline) while validating: take back what was
            // published.
            self.purge_shards(id).await;
        }
        tracing::info!(batch = %id, lines = total, shards, tokens, "dispatched");
        self.maybe_finish(id);
        trim_allocator();
        Ok(())
    }

    /// Every line of a batch's input file, without shards (none when the file fails its
    /// file-level checks: such a batch has no lines).
    pub(super) async fn input_entries(&self, rec: &BatchRecord) -> Result<Vec<IndexEntry>> {
        let limits = self.settings.limits;
        let mut scanner = Scanner::new(rec.endpoint, &limits);
        let mut entries = Vec::new();
        let mut lines = self.input_lines(&rec.input_file_id).await?;
        while let Some((first, piece)) = lines.next().await? {
            let (back, scanned) = scan_piece(scanner, first, piece).await?;
            scanner = back;
            entries.extend(scanned.into_iter().map(|s| match s {
                Scanned::Valid(r) => IndexEntry {
                    custom_id: Some(r.custom_id),
                    line: r.line,
                    shard: None,
                },
                Scanned::Invalid(bad) => IndexEntry {
                    custom_id: bad.custom_id,
                    line: bad.line,
                    shard: None,
                },
            }));
        }
        Ok(if scanner.finish().is_ok() {
            entries
        } else {
            Vec::new()
        })
    }

    /// A batch's input file, line by line (see [`Lines`]).
    pub(super) async fn input_lines(&self, file: &str) -> Result<Lines<object_store::Object>> {
        let obj = self
            .objects
            .get(file)
            .await
            .with_context(|| format!("reading input file {file}"))?;
        Ok(Lines::new(obj))
    }

    /// Dispatch's second pass: every line of the input, scanned again, planned in windows of
    /// [`PLAN_WINDOW_LINES`], each window's lines entered in the ledger and the index, its
    /// invalid lines published as failed results and its shards to the work queue. Returns the
    /// tokens and shards published, and whether the batch stopped validating meanwhile
    /// (cancelled).
    pub(super) async fn publish_lines(
        &self,
        id: &str,
        rec: &BatchRecord,
        mut index: tokio::io::DuplexStream,
    ) -> Result<(u64, u32, bool)> {
        use tokio::io::AsyncWriteExt;
        let limits = self.settings.limits;
        let mut scanner = Scanner::again(rec.endpoint, &limits);
        let mut planner = Planner::new(id, &limits);
        let mut window: Vec<Scanned> = Vec::new();
        let (mut tokens, mut shards) = (0u64, 0u32);
        let mut acks = Vec::new();
        let mut lines = self.input_lines(&rec.input_file_id).await?;
        let mut more = true;
        while more {
            match lines.next().await? {
                Some((first, piece)) => {
                    let (back, scanned) = scan_piece(scanner, first, piece).await?;
                    scanner = back;
                    window.extend(scanned);
                }
                None => more = false,
            }
            if window.len() < PLAN_WINDOW_LINES && (more || window.is_empty()) {
                continue;
            }
            if self
                .batch(id)
                .is_none_or(|r| r.status != BatchStatus::Validating)
            {
                index.shutdown().await?;
                return Ok((tokens, shards, true));
            }
            let take = std::mem::take(&mut window);
            let tokenizer = self.settings.tokenizer.clone();
            let (back, w) = tokio::task::spawn_blocking(move || {
                let w = planner.plan(take, tokenizer.as_ref());
                (planner, w)
            })
            .await?;
            planner = back;
            tokens += w.tokens;
            shards += w.shards.len() as u32;
            // The ledger first: these lines' results may come back at once.
            if let Some(st) = self.lock().get_mut(id) {
                st.rec.ledger.insert_all(&w.index);
            }
            index.write_all(&encode_index(&w.index)).await?;
            let here = crate::telemetry::span_traceparent(&tracing::Span::current());
            let intake = here.clone().unwrap_or_else(|| batch_trace(id, &["intake"]));
            for r in &w.invalid {
                let msg_id = result_msg_id(id, &r.custom_id, r.line);
                acks.push(
                    publish(
                        &self.js,
                        result_subject(id),
                        msg_id,
                        serde_json::to_vec(r)?,
                        &intake,
                    )
                    .await?,
                );
                if acks.len() >= 1000 {
                    await_acks(&mut acks).await?;
                }
            }
            self.lease.fence()?;
            for s in &w.shards {
                let msg_id = shard_msg_id(id, s.shard);
                // The shard's span in the batch's trace; the worker's run of it is its child.
                let parent = here
                    .clone()
                    .unwrap_or_else(|| batch_trace(id, &[&s.shard.to_string()]));
                acks.push(
                    publish(
                        &self.js,
                        shard_subject(id),
                        msg_id,
                        serde_json::to_vec(s)?,
                        &parent,
                    )
                    .await?,
                );
                if acks.len() >= 256 {
                    await_acks(&mut acks).await?;
                }
            }
            self.counters.shards_published.inc_by(w.shards.len() as u64);
        }
        await_acks(&mut acks).await?;
        index.shutdown().await?;
        Ok((tokens, shards, false))
    }

    pub(super) async fn fail_validation(
        &self,
        id: &str,
        errors: Vec<(Option<usize>, LineError)>,
    ) -> Result<()> {
        tracing::info!(batch = %id, errors = errors.len(), "input file rejected");
        self.update(id, |st| {
            st.rec.transition(BatchStatus::Failed, now_s())?;
            st.rec.errors = errors;
            Ok::<_, crate::batch::TransitionError>(())
        })
        .await??;
        Ok(())
    }

    /// Starts finalization if every line has reported.
    pub(super) fn maybe_finish(self: &Arc<Self>, id: &str) {
        let start = {
            let mut map = self.lock();
            match map.get_mut(id) {
                Some(st)
                    if st.rec.status == BatchStatus::InProgress
                        && !st.closing
                        && st.rec.all_reported() =>
                {
                    st.closing = true;
                    true
                }
                _ => false,
            }
        };
        if start {
            self.spawn_finalize(id.to_string());
        }
    }

    /// Cancels a batch: stops dispatch at once and reports unfinished lines as cancelled.
    /// `Ok(None)`: no such batch. An error (the store did not take the change) leaves the
    /// batch as it was, in memory too; the caller may try again.
    pub async fn cancel(self: &Arc<Self>, id: &str) -> Result<Option<BatchRecord>> {
        let now = now_s();
        let cancelled = self
            .update_durably(id, |rec| {
                if matches!(
                    rec.status,
                    BatchStatus::Validating | BatchStatus::InProgress
                ) {
                    // Allowed from both states.
                    let _ = rec.transition(BatchStatus::Cancelling, now);
                    rec.ending = Some(BatchStatus::Cancelled);
                    true
                } else {
                    false
                }
            })
            .await?;
        let Some(cancelled) = cancelled else {
            return Ok(None);
        };
        let (start, rec) = {
            let mut map = self.lock();
            let Some(st) = map.get_mut(id) else {
                return Ok(None);
            };
            let start = cancelled && !st.closing;
            if cancelled {
                st.closing = true;
            }
            (start, st.rec.clone())
        };
        if start {
            self.purge_shards(id).await;
            self.spawn_finalize(id.to_string());
        }
        Ok(Some(rec))
    }

    pub(super) async fn purge_shards(&self, id: &str) {
        if self.lease.fence().is_err() {
            return;
        }
        match self.js.get_stream(SHARD_STREAM).await {
            Ok(s) => {
                if let Err(e) = s.purge().filter(shard_subject(id)).await {
                    tracing::warn!(batch = id, error = %e, "could not purge shards");
                }
            }
            Err(e) => tracing::warn!(batch = id, error = %e, "could not purge shards"),
        }
    }
}

/// Scans a piece of an input file (whole lines, the first numbered `first`) off the async
/// runtime: validation is CPU work.
pub(super) async fn scan_piece(
    mut scanner: Scanner,
    first: usize,
    piece: Vec<u8>,
) -> Result<(Scanner, Vec<Scanned>)> {
    Ok(tokio::task::spawn_blocking(move || {
        let (raw, _) = split_lines(&piece, first);
        let scanned = scanner.push(&raw);
        (scanner, scanned)
    })
    .await?)
}

/// Attempts at dispatching a batch before it fails (about 4 minutes of pauses).
pub(super) const DISPATCH_ATTEMPTS: u32 = 8;
