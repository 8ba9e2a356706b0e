//! Finalization: a finished batch's results streamed into its output and error files.

use super::*;
use tracing::Instrument;

impl Coordinator {
    /// Writes the output and error files and ends the batch. Idempotent: file ids derive from
    /// the batch id, and the results are re-read from the stream. Every result is already
    /// durable in the results stream, so a finalization that fails (the store is full, say) is
    /// never given up: it is logged, counted (`gristmill_finalize_failures_total`) and retried
    /// with a growing pause (2 s, doubling to 60 s) until the store takes the files.
    pub(super) async fn finalize(self: Arc<Self>, id: String) {
        let mut pause = Duration::from_secs(2);
        loop {
            let span =
                tracing::info_span!("finalize", batch = %id, trace_id = %batch_trace_id(&id));
            crate::telemetry::under_batch(&span, &id);
            match self.try_finalize(&id).instrument(span).await {
                Ok(()) => {
                    if let Some(rec) = self.batch(&id).filter(|r| r.status.is_terminal()) {
                        crate::telemetry::emit_batch_root(&rec);
                    }
                    return;
                }
                Err(e) => {
                    self.counters.finalize_failures.inc();
                    tracing::error!(batch = %id, error = format!("{e:#}"), pause_s = pause.as_secs(), "finalization failed; retrying");
                    // Said on the batch object too, while it lasts (not the internal text).
                    let note = LineError::new(
                        FINALIZE_PENDING,
                        format!(
                            "the batch's results are all in, but its output files could not be \
                             stored yet (the file store may be full or unreachable); retrying every \
                             {} s at most",
                            pause.as_secs().max(60)
                        ),
                    );
                    if let Some(st) = self.lock().get_mut(&id) {
                        if !st.rec.status.is_terminal()
                            && !st
                                .rec
                                .errors
                                .iter()
                                .any(|(_, e)| e.code == FINALIZE_PENDING)
                        {
                            st.rec.errors.push((None, note));
                            st.dirty = true;
                        }
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(60));
                }
            }
        }
    }

    /// One attempt of [`Coordinator::finalize`], in its `finalize` span.
    pub(super) async fn try_finalize(&self, id: &str) -> Result<()> {
        let ending = self
            .update(id, |st| {
                let ending = st.rec.ending.unwrap_or(BatchStatus::Completed);
                st.rec.ending = Some(ending);
                if st.rec.status != BatchStatus::Finalizing {
                    st.rec.transition(BatchStatus::Finalizing, now_s())?;
                }
                Ok::<_, crate::batch::TransitionError>(ending)
            })
            .await??;
        let Some(rec) = self.batch(id) else {
            bail!("batch {id} vanished");
        };
        if let Some(st) = self.lock().get_mut(id) {
            st.rec.ledger.reset_written();
        }
        let owner = rec
            .owner
            .clone()
            .unwrap_or_else(|| crate::tenants::DEFAULT_TENANT.to_string());
        // The files are streamed into the object store as they are written: nothing but the
        // ledger and a window of each file is in memory, whatever the batch's size.
        let (out_w, mut out_r) = tokio::io::duplex(FILE_CHUNK);
        let (err_w, mut err_r) = tokio::io::duplex(FILE_CHUNK);
        let names = [format!("file-{id}-output"), format!("file-{id}-errors")];
        let put = |name: &str| object_store::ObjectMetadata {
            name: name.to_string(),
            chunk_size: Some(FILE_CHUNK),
            ..Default::default()
        };
        self.lease.fence()?;
        let (tally, out_info, err_info) = tokio::try_join!(
            self.write_files(id, ending, out_w, err_w),
            async {
                self.objects
                    .put(put(&names[0]), &mut out_r)
                    .await
                    .map_err(|e| anyhow!(e).context(format!("storing batch {id}'s output file")))
            },
            async {
                self.objects
                    .put(put(&names[1]), &mut err_r)
                    .await
                    .map_err(|e| anyhow!(e).context(format!("storing batch {id}'s error file")))
            },
        )?;
        // A file with no line is no file (OpenAI leaves its id null).
        let mut file_ids = [None, None];
        for (i, (name, lines, info)) in [
            (&names[0], tally.completed, out_info),
            (&names[1], tally.failed, err_info),
        ]
        .into_iter()
        .enumerate()
        {
            if lines == 0 {
                if let Err(e) = self.objects.delete(name).await {
                    tracing::debug!(batch = id, error = %e, "empty file already gone");
                }
                continue;
            }
            let filename = if i == 0 {
                format!("{id}_output.jsonl")
            } else {
                format!("{id}_error.jsonl")
            };
            let meta = FileObject {
                id: name.clone(),
                object: "file".into(),
                bytes: info.size as u64,
                created_at: now_s(),
                filename,
                purpose: "batch_output".into(),
                status: "processed".into(),
                expires_at: None,
                status_details: None,
                owner: (owner != crate::tenants::DEFAULT_TENANT).then(|| owner.clone()),
            };
            self.lease.fence()?;
            self.files_kv
                .put(name, serde_json::to_vec(&meta)?.into())
                .await
                .with_context(|| format!("storing file {name}'s metadata"))?;
            file_ids[i] = Some(name.clone());
        }
        let [output_file_id, error_file_id] = file_ids;
        let Tally {
            completed,
            failed,
            prompt_tokens,
            completion_tokens,
        } = tally;
        self.update(id, |st| {
            st.rec.output_file_id = output_file_id;
            st.rec.error_file_id = error_file_id;
            st.rec.completed = completed;
            st.rec.failed = failed;
            st.rec.prompt_tokens = prompt_tokens;
            st.rec.completion_tokens = completion_tokens;
            st.rec.errors.retain(|(_, e)| e.code != FINALIZE_PENDING);
            st.rec.total = completed + failed;
            // A finished batch's lines are not needed in memory any more.
            st.rec.ledger.clear();
            self.progress
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .forget(id);
            st.rec.transition(ending, now_s())
        })
        .await??;
        tracing::info!(batch = %id, ?ending, completed, failed, "batch finished");
        // Nothing of a finished batch is needed any more.
        self.purge_shards(id).await;
        if let Ok(s) = self.js.get_stream(RESULT_STREAM).await {
            if let Err(e) = s.purge().filter(result_subject(id)).await {
                tracing::warn!(batch = id, error = %e, "could not purge results");
            }
        }
        if let Err(e) = self.objects.delete(index_object(id)).await {
            tracing::debug!(batch = id, error = %e, "no index to delete");
        }
        trim_allocator();
        Ok(())
    }

    /// Writes a batch's output and error lines into `out` and `err`: the first result of each
    /// of its lines, in the order the results stream holds them (the order they were counted),
    /// then an error line for every line of the index without a result (`batch_cancelled`,
    /// `batch_expired`, or `internal_error` should it ever happen otherwise).
    pub(super) async fn write_files(
        &self,
        id: &str,
        ending: BatchStatus,
        mut out: tokio::io::DuplexStream,
        mut err: tokio::io::DuplexStream,
    ) -> Result<Tally> {
        use tokio::io::AsyncWriteExt;
        let mut fin = Finalizer::new();
        let stream = self.js.get_stream(RESULT_STREAM).await?;
        let mut consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: result_subject(id),
                ..Default::default()
            })
            .await?;
        let mut pending = consumer.info().await?.num_pending;
        if pending > 0 {
            let mut messages = consumer.messages().await?;
            while let Some(m) = messages.next().await {
                let m = m?;
                pending = m.info().map(|i| i.pending).unwrap_or(0);
                let results = match decode_results(&m.payload) {
                    Ok(rs) => rs,
                    Err(e) => {
                        tracing::error!(batch = id, error = %e, "unreadable result skipped");
                        Vec::new()
                    }
                };
                // Which results are their line's first: one lock for the whole message.
                let firsts: Vec<bool> = {
                    let mut map = self.lock();
                    match map.get_mut(id) {
                        Some(st) => results
                            .iter()
                            .map(|r| st.rec.ledger.write_once(&r.custom_id, r.line, r.shard))
                            .collect(),
                        None => vec![false; results.len()],
                    }
                };
                for (r, first) in results.into_iter().zip(firsts) {
                    if first {
                        fin.result(r)?;
                    }
                }
                if let Some(b) = fin.take_out(FILE_CHUNK) {
                    out.write_all(&b).await?;
                }
                if let Some(b) = fin.take_err(FILE_CHUNK) {
                    err.write_all(&b).await?;
                }
                if pending == 0 {
                    break;
                }
            }
        }
        // Lines without a result: named by the batch's index, or by its input file when the
        // index is not there (cancelled or expired while still being dispatched; dispatched
        // before indexes existed).
        let Some(rec) = self.batch(id) else {
            bail!("batch {id} vanished");
        };
        let unfinished = rec.ending.is_some_and(|e| e != BatchStatus::Completed);
        if fin.tally.completed + fin.tally.failed < rec.total || unfinished {
            // An index shorter than the batch was cut short by the cancel that ends it.
            let entries = match self.read_index(id).await? {
                Some(entries) if rec.total > 0 && entries.len() as u64 >= rec.total => entries,
                _ => self.input_entries(&rec).await?,
            };
            for e in entries {
                let written = self.lock().get(id).is_some_and(|st| {
                    st.rec
                        .ledger
                        .is_written(e.custom_id.as_deref().unwrap_or(""), e.line)
                });
                if !written {
                    fin.missing(e, ending)?;
                }
                if let Some(b) = fin.take_err(FILE_CHUNK) {
                    err.write_all(&b).await?;
                }
            }
        }
        out.write_all(&fin.out).await?;
        err.write_all(&fin.err).await?;
        out.shutdown().await?;
        err.shutdown().await?;
        Ok(fin.tally)
    }
}

/// Code of the note a batch carries while its output files cannot be stored.
pub(super) const FINALIZE_PENDING: &str = "output_not_stored_yet";
