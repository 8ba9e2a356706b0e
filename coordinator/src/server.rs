//! The running coordinator: JetStream set-up, batch intake and dispatch, result collection,
//! finalization, cancellation, expiry, dead shards, and resumption after a restart.
//!
//! Everything durable lives in NATS (DESIGN §4): batch records in the [`BATCH_BUCKET`] KV
//! bucket, files in the [`FILE_BUCKET`] object store (their OpenAI metadata in
//! [`FILE_META_BUCKET`]), shards in the work-queue stream, results in the results stream. The
//! in-memory map of batches is a cache of the KV bucket plus the set of counted result keys,
//! which a restarted coordinator rebuilds by replaying the results stream from the start.
//! One coordinator acts at a time: it is started once this process holds the leader lease
//! ([`crate::lease`]) and checks the lease before each durable write.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::ledger::{decode_index, encode_index, IndexEntry, Ledger, Recorded};
use crate::tasks::{supervise, Lifetime, TaskPanics};
use anyhow::{anyhow, bail, Context as _, Result};
use async_nats::jetstream::{self, consumer, kv, object_store, stream};
use futures_util::StreamExt;
use gristmill_protocol::cluster::{
    decode_results, result_msg_id, result_subject, shard_msg_id, shard_subject, ProgressMessage,
    ResultMessage, ResultOutcome, ShardMessage, BATCH_BUCKET, FILE_BUCKET, FILE_META_BUCKET,
    PROGRESS_SUBJECT_PREFIX, RESULT_STREAM, RESULT_SUBJECT_PREFIX, SHARD_STREAM,
    SHARD_SUBJECT_PREFIX, WORKER_CONSUMER, WORKER_HEADER,
};
use gristmill_protocol::{codes, ErrorLine, LineError, OutputLine, ResponseEnvelope};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use crate::batch::{BatchRecord, BatchStatus};
use crate::intake::{
    split_lines, IntakeLimits, Planner, PromptTokens, Scanned, Scanner, PLAN_WINDOW_LINES,
};

/// Settings of a coordinator.
#[derive(Clone)]
pub struct Settings {
    /// The NATS URL, without credentials (for logs).
    pub nats_url: String,
    /// The API keys and their tenants (`None`: no authentication).
    pub api_keys: Option<crate::tenants::ApiKeys>,
    pub limits: IntakeLimits,
    /// How long a worker may hold a shard without an in-progress ack before it is redelivered.
    pub ack_wait: Duration,
    /// Deliveries of a shard before its lines become error lines.
    pub max_deliver: i64,
    /// JetStream replicas of streams and buckets (3 on a 3-node NATS cluster).
    pub replicas: usize,
    pub tokenizer: Arc<PromptTokens>,
    /// Run the autoscaling policy in dry-run mode: log each change of the desired worker
    /// count and export it as `gristmill_autoscale_desired_replicas` (not applied).
    pub autoscale_dry_run: Option<crate::autoscale::Policy>,
    /// Apply the policy's decisions to this worker StatefulSet (`namespace`, `name`) through
    /// the Kubernetes API (requires `autoscale_dry_run`'s policy to be set).
    pub autoscale_apply: Option<(String, String)>,
    /// How often the worker throughput is measured and the policy decides.
    pub autoscale_interval: Duration,
    /// Limits on HTTP connections.
    pub http: crate::http::HttpLimits,
    /// Most bytes the file object store may hold (uploads, outputs, batch indexes); `None`:
    /// only the server's own limits.
    pub file_store_max_bytes: Option<u64>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("nats_url", &self.nats_url)
            .field("api_keys", &self.api_keys)
            .field("limits", &self.limits)
            .field("ack_wait", &self.ack_wait)
            .field("max_deliver", &self.max_deliver)
            .field("replicas", &self.replicas)
            .finish()
    }
}

/// OpenAI's file object, stored in [`FILE_META_BUCKET`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileObject {
    pub id: String,
    pub object: String,
    pub bytes: u64,
    pub created_at: u64,
    pub filename: String,
    pub purpose: String,
    pub status: String,
    pub expires_at: Option<u64>,
    pub status_details: Option<String>,
    /// The tenant that owns the file (not part of OpenAI's object; `None`: the default one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

impl FileObject {
    /// OpenAI's file object (without the owner).
    pub fn to_openai(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(m) = v.as_object_mut() {
            m.remove("owner");
        }
        v
    }
}

/// Seconds since the Unix epoch, with the fraction (the throughput meter's clock).
pub fn now_s_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

struct BatchState {
    rec: BatchRecord,
    /// Changed since last stored.
    dirty: bool,
    /// A finalization task owns the batch.
    closing: bool,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    pub results_completed: AtomicU64,
    pub results_failed: AtomicU64,
    pub duplicate_results: AtomicU64,
    /// Results for lines a batch does not have, or from a shard that did not carry the line.
    pub rejected_results: AtomicU64,
    /// Finalization attempts that failed (the store full or unreachable); each is retried.
    pub finalize_failures: AtomicU64,
    /// Dispatch attempts that failed; a batch whose dispatch keeps failing is failed.
    pub dispatch_failures: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub shards_published: AtomicU64,
    pub dead_shards: AtomicU64,
}

/// The coordinator's shared state.
pub struct Coordinator {
    pub settings: Settings,
    pub js: jetstream::Context,
    client: async_nats::Client,
    batches_kv: kv::Store,
    files_kv: kv::Store,
    objects: object_store::ObjectStore,
    batches: Mutex<HashMap<String, BatchState>>,
    save_lock: tokio::sync::Mutex<()>,
    pub counters: Counters,
    /// (when, completion tokens so far), one sample a second, for tokens/s.
    rate: Mutex<VecDeque<(Instant, u64)>>,
    /// The autoscaler's memory and last answer.
    autoscale: Mutex<(crate::autoscale::Memory, u32)>,
    /// Tokens per second of one worker, measured from live results.
    meter: Mutex<crate::autoscale::RateMeter>,
    /// Applies decisions to the worker StatefulSet, when `--autoscale` is on.
    scaler: Option<crate::kube_scale::WorkerScaler>,
    /// The leader lease this coordinator acts under.
    pub lease: Arc<crate::lease::Lease>,
    pub ready: AtomicBool,
    /// Panics of supervised background tasks.
    pub panics: Arc<TaskPanics>,
    /// Where the results collector resumes in the results stream (kept across its restarts).
    next_result_seq: AtomicU64,
    /// Workers' reports on the shards they run (advisory, for progress between results).
    progress: Mutex<crate::progress::Progress>,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Creates (or updates) the streams, the worker consumer and the buckets.
async fn set_up(
    js: &jetstream::Context,
    s: &Settings,
) -> Result<(kv::Store, kv::Store, object_store::ObjectStore)> {
    let dedupe = Duration::from_secs(120);
    js.create_or_update_stream(stream::Config {
        name: SHARD_STREAM.into(),
        subjects: vec![format!("{SHARD_SUBJECT_PREFIX}.>")],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        num_replicas: s.replicas,
        duplicate_window: dedupe,
        ..Default::default()
    })
    .await
    .context("creating the shard stream")?;
    js.create_or_update_stream(stream::Config {
        name: RESULT_STREAM.into(),
        subjects: vec![format!("{RESULT_SUBJECT_PREFIX}.>")],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        num_replicas: s.replicas,
        duplicate_window: dedupe,
        // Results of a finished batch are purged; this only bounds what a lost batch leaves.
        max_age: Duration::from_secs(8 * 24 * 3600),
        ..Default::default()
    })
    .await
    .context("creating the results stream")?;
    let shards = js.get_stream(SHARD_STREAM).await?;
    shards
        .create_consumer(consumer::pull::Config {
            durable_name: Some(WORKER_CONSUMER.into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: s.ack_wait,
            max_deliver: s.max_deliver,
            max_ack_pending: 10_000,
            ..Default::default()
        })
        .await
        .context("creating the worker consumer")?;
    let kv_config = |bucket: &str| kv::Config {
        bucket: bucket.into(),
        history: 1,
        storage: stream::StorageType::File,
        num_replicas: s.replicas,
        ..Default::default()
    };
    let batches = js
        .create_or_update_key_value(kv_config(BATCH_BUCKET))
        .await
        .context("creating the batch bucket")?;
    let files = js
        .create_or_update_key_value(kv_config(FILE_META_BUCKET))
        .await
        .context("creating the file metadata bucket")?;
    let max_bytes = s
        .file_store_max_bytes
        .map_or(-1, |b| i64::try_from(b).unwrap_or(i64::MAX));
    let objects = match js.get_object_store(FILE_BUCKET).await {
        Ok(o) => {
            // The limit may have changed since the bucket was made.
            let name = format!("OBJ_{FILE_BUCKET}");
            let mut st = js
                .get_stream(&name)
                .await
                .context("reading the file store")?;
            let mut config = st
                .info()
                .await
                .context("reading the file store")?
                .config
                .clone();
            if config.max_bytes != max_bytes {
                config.max_bytes = max_bytes;
                js.update_stream(config)
                    .await
                    .context("setting the file store's size limit")?;
            }
            o
        }
        Err(_) => js
            .create_object_store(object_store::Config {
                bucket: FILE_BUCKET.into(),
                storage: stream::StorageType::File,
                num_replicas: s.replicas,
                max_bytes,
                ..Default::default()
            })
            .await
            .context("creating the file object store")?,
    };
    Ok((batches, files, objects))
}

impl Coordinator {
    /// Sets up JetStream, loads every batch and starts the background loops. Call it once this
    /// process holds `lease` ([`crate::lease::Lease::acquire`]).
    pub async fn start(
        client: async_nats::Client,
        mut settings: Settings,
        lease: Arc<crate::lease::Lease>,
    ) -> Result<Arc<Self>> {
        // Shards and lines must fit in one message of this server.
        let max_payload = client.server_info().max_payload;
        settings.limits = settings.limits.within_max_payload(max_payload);
        tracing::info!(
            max_payload,
            max_line_bytes = settings.limits.max_line_bytes,
            "NATS message limit read"
        );
        let js = jetstream::new(client.clone());
        let (batches_kv, files_kv, objects) = set_up(&js, &settings).await?;
        let scaler = match &settings.autoscale_apply {
            Some((namespace, name)) => {
                let client = kube::Client::try_default()
                    .await
                    .context("--autoscale needs the Kubernetes API (in-cluster service account or a kubeconfig)")?;
                Some(crate::kube_scale::WorkerScaler::new(
                    client, namespace, name,
                ))
            }
            None => None,
        };
        let interval_s = settings.autoscale_interval.as_secs_f64();
        let this = Arc::new(Self {
            settings,
            js,
            client,
            batches_kv,
            files_kv,
            objects,
            batches: Mutex::new(HashMap::new()),
            save_lock: tokio::sync::Mutex::new(()),
            counters: Counters::default(),
            rate: Mutex::new(VecDeque::new()),
            autoscale: Mutex::new((crate::autoscale::Memory::default(), 0)),
            // Six decisions' worth of results, at least three of backlog before a measurement.
            meter: Mutex::new(crate::autoscale::RateMeter::new(
                6.0 * interval_s,
                3.0 * interval_s,
            )),
            scaler,
            lease,
            ready: AtomicBool::new(false),
            panics: Arc::new(TaskPanics::default()),
            next_result_seq: AtomicU64::new(1),
            progress: Mutex::new(crate::progress::Progress::default()),
        });
        let resume = this.load_batches().await?;
        this.spawn_forever("results", |c| c.collect_results());
        this.spawn_forever("dead_shards", |c| c.watch_dead_shards());
        this.spawn_forever("tick", |c| c.tick());
        this.spawn_forever("progress", |c| c.watch_progress());
        for (id, status) in resume {
            tracing::info!(batch = %id, ?status, "resuming batch");
            match status {
                BatchStatus::Validating => this.spawn_dispatch(id),
                BatchStatus::Finalizing | BatchStatus::Cancelling => this.spawn_finalize(id),
                _ => {}
            }
        }
        this.ready.store(true, Ordering::SeqCst);
        Ok(this)
    }

    /// Runs a background loop of this coordinator under supervision.
    fn spawn_forever<Fut>(self: &Arc<Self>, task: &'static str, f: fn(Arc<Self>) -> Fut)
    where
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let this = self.clone();
        supervise(task, Lifetime::Forever, self.panics.clone(), move || {
            f(this.clone())
        });
    }

    /// Runs one batch's task of this coordinator in the background, supervised.
    fn spawn_for_batch<Fut>(
        self: &Arc<Self>,
        task: &'static str,
        id: String,
        f: fn(Arc<Self>, String) -> Fut,
    ) where
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let this = self.clone();
        supervise(task, Lifetime::OneShot, self.panics.clone(), move || {
            f(this.clone(), id.clone())
        });
    }

    /// Validates and dispatches a batch in the background (supervised).
    fn spawn_dispatch(self: &Arc<Self>, id: String) {
        self.spawn_for_batch("dispatch", id, Self::dispatch);
    }

    /// Finalizes a batch in the background (supervised).
    fn spawn_finalize(self: &Arc<Self>, id: String) {
        self.spawn_for_batch("finalize", id, Self::finalize);
    }

    /// Loads every stored batch; returns those with work to resume.
    async fn load_batches(&self) -> Result<Vec<(String, BatchStatus)>> {
        let mut keys = self.batches_kv.keys().await?;
        let mut resume = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key?;
            let Some(value) = self.batches_kv.get(&key).await? else {
                continue;
            };
            let mut rec: BatchRecord = match serde_json::from_slice(&value) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(batch = %key, error = %e, "unreadable batch record; skipped");
                    continue;
                }
            };
            let closing = matches!(
                rec.status,
                BatchStatus::Finalizing | BatchStatus::Cancelling
            );
            if !rec.status.is_terminal() {
                // Counted again from the results stream, against the batch's own lines.
                rec.reset_counts();
                if rec.status != BatchStatus::Validating {
                    rec.ledger = self.load_ledger(&key).await?;
                }
                if rec.status != BatchStatus::InProgress {
                    resume.push((key.clone(), rec.status));
                }
            }
            self.lock().insert(
                key,
                BatchState {
                    rec,
                    dirty: false,
                    closing,
                },
            );
        }
        Ok(resume)
    }

    /// The ledger of a dispatched batch, from its index object (an open one, which counts any
    /// line once, for a batch dispatched before indexes existed).
    async fn load_ledger(&self, id: &str) -> Result<Ledger> {
        match self.read_index(id).await? {
            Some(entries) => Ok(Ledger::from_index(&entries)),
            None => {
                tracing::warn!(batch = %id, "no index object: results are counted without checking their lines");
                Ok(Ledger::open())
            }
        }
    }

    /// The index object of a batch, if it has one.
    async fn read_index(&self, id: &str) -> Result<Option<Vec<IndexEntry>>> {
        let mut obj = match self.objects.get(index_object(id)).await {
            Ok(o) => o,
            Err(e) if e.kind() == object_store::GetErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(anyhow!(e).context(format!("reading batch {id}'s index"))),
        };
        let mut data = Vec::new();
        obj.read_to_end(&mut data)
            .await
            .with_context(|| format!("reading batch {id}'s index"))?;
        let entries = decode_index(&data)
            .with_context(|| format!("batch {id}'s index object is unreadable"))?;
        Ok(Some(entries))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, BatchState>> {
        // A panic while holding the lock would be a bug; the map stays usable.
        self.batches.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The OpenAI batch object of a batch.
    pub fn batch(&self, id: &str) -> Option<BatchRecord> {
        self.lock().get(id).map(|s| s.rec.clone())
    }

    /// Every batch, newest first.
    pub fn list_batches(&self) -> Vec<BatchRecord> {
        let mut all: Vec<BatchRecord> = self.lock().values().map(|s| s.rec.clone()).collect();
        all.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        all
    }

    /// Stores a batch's record (serialised with other saves, so an older snapshot never
    /// overwrites a newer one).
    async fn save(&self, id: &str) -> Result<()> {
        let _guard = self.save_lock.lock().await;
        self.lease.fence();
        let rec = {
            let mut map = self.lock();
            let Some(st) = map.get_mut(id) else {
                return Ok(());
            };
            st.dirty = false;
            st.rec.clone()
        };
        let value = serde_json::to_vec(&rec)?;
        if let Err(e) = self.batches_kv.put(id, value.into()).await {
            // Try again at the next tick.
            if let Some(st) = self.lock().get_mut(id) {
                st.dirty = true;
            }
            return Err(anyhow!(e).context(format!("storing batch {id}")));
        }
        Ok(())
    }

    /// Applies `f` to a batch's record, then stores it.
    async fn update<T>(&self, id: &str, f: impl FnOnce(&mut BatchState) -> T) -> Result<T> {
        let out = {
            let mut map = self.lock();
            let st = map.get_mut(id).ok_or_else(|| anyhow!("no batch {id}"))?;
            f(st)
        };
        self.save(id).await?;
        Ok(out)
    }

    /// Changes a batch's record only once the change is stored: `f` runs on a copy, the copy
    /// is written, and only then does `f` run on the live record (so `f` must decide the same
    /// way twice; counts that change in between are kept). `None` if there is no such batch.
    async fn update_durably<T>(
        &self,
        id: &str,
        f: impl Fn(&mut BatchRecord) -> T,
    ) -> Result<Option<T>> {
        let _guard = self.save_lock.lock().await;
        self.lease.fence();
        let Some(mut copy) = self.batch(id) else {
            return Ok(None);
        };
        f(&mut copy);
        let value = serde_json::to_vec(&copy)?;
        self.batches_kv
            .put(id, value.into())
            .await
            .map_err(|e| anyhow!(e).context(format!("storing batch {id}")))?;
        let mut map = self.lock();
        Ok(map.get_mut(id).map(|st| f(&mut st.rec)))
    }

    // ---------------------------------------------------------------- files

    /// Stores the bytes `data` yields as object `id` (streamed in chunks; nothing of the
    /// file is held whole). Returns its size.
    pub async fn store_object(
        &self,
        id: &str,
        data: &mut (impl tokio::io::AsyncRead + Unpin),
    ) -> Result<u64> {
        self.lease.fence();
        let meta = object_store::ObjectMetadata {
            name: id.to_string(),
            // Fewer, larger chunks store a 30 MB file in a fraction of the time.
            chunk_size: Some(FILE_CHUNK),
            ..Default::default()
        };
        let info = self
            .objects
            .put(meta, data)
            .await
            .with_context(|| format!("storing file {id}"))?;
        Ok(info.size as u64)
    }

    /// Removes a stored object that never became a file (an upload refused after its bytes
    /// were stored).
    pub async fn discard_object(&self, id: &str) {
        if let Err(e) = self.objects.delete(id).await {
            tracing::warn!(file = id, error = %e, "could not remove the bytes of a refused upload");
        }
    }

    /// Makes stored object `id` a file of the Files API.
    pub async fn register_file(
        &self,
        id: String,
        filename: String,
        purpose: String,
        bytes: u64,
        owner: &str,
    ) -> Result<FileObject> {
        self.lease.fence();
        let meta = FileObject {
            id: id.clone(),
            object: "file".into(),
            bytes,
            created_at: now_s(),
            filename,
            purpose,
            status: "processed".into(),
            expires_at: None,
            status_details: None,
            owner: (owner != crate::tenants::DEFAULT_TENANT).then(|| owner.to_string()),
        };
        self.files_kv
            .put(&id, serde_json::to_vec(&meta)?.into())
            .await
            .with_context(|| format!("storing file {id}'s metadata"))?;
        Ok(meta)
    }

    pub async fn file(&self, id: &str) -> Result<Option<FileObject>> {
        if !valid_id(id) {
            return Ok(None);
        }
        Ok(match self.files_kv.get(id).await? {
            Some(v) => Some(serde_json::from_slice(&v)?),
            None => None,
        })
    }

    pub async fn list_files(&self) -> Result<Vec<FileObject>> {
        let mut keys = self.files_kv.keys().await?;
        let mut out = Vec::new();
        while let Some(k) = keys.next().await {
            if let Some(f) = self.file(&k?).await? {
                out.push(f);
            }
        }
        out.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        Ok(out)
    }

    /// A file's bytes, to be read as a stream (a multi-gigabyte output is never held whole).
    pub async fn file_reader(&self, id: &str) -> Result<object_store::Object> {
        self.objects
            .get(id)
            .await
            .with_context(|| format!("reading file {id}"))
    }

    /// A batch that is still running on this input file, if any.
    pub fn batch_using(&self, file_id: &str) -> Option<String> {
        self.lock()
            .values()
            .find(|s| !s.rec.status.is_terminal() && s.rec.input_file_id == file_id)
            .map(|s| s.rec.id.clone())
    }

    pub async fn delete_file(&self, id: &str) -> Result<bool> {
        if self.file(id).await?.is_none() {
            return Ok(false);
        }
        self.lease.fence();
        self.files_kv.delete(id).await?;
        if let Err(e) = self.objects.delete(id).await {
            tracing::warn!(file = id, error = %e, "file data already gone");
        }
        Ok(true)
    }

    // ---------------------------------------------------------------- batches

    /// Creates a batch in `validating` and starts its intake.
    pub async fn create_batch(self: &Arc<Self>, rec: BatchRecord) -> Result<BatchRecord> {
        let id = rec.id.clone();
        self.lock().insert(
            id.clone(),
            BatchState {
                rec: rec.clone(),
                dirty: true,
                closing: false,
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
    async fn dispatch(self: Arc<Self>, id: String) {
        let mut pause = Duration::from_secs(1);
        for attempt in 1..=DISPATCH_ATTEMPTS {
            let Err(e) = self.try_dispatch(&id).await else {
                return;
            };
            self.counters
                .dispatch_failures
                .fetch_add(1, Ordering::Relaxed);
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

    async fn try_dispatch(self: &Arc<Self>, id: &str) -> Result<()> {
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
        self.lease.fence();
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
    async fn input_entries(&self, rec: &BatchRecord) -> Result<Vec<IndexEntry>> {
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
    async fn input_lines(&self, file: &str) -> Result<Lines<object_store::Object>> {
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
    async fn publish_lines(
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
            for r in &w.invalid {
                let msg_id = result_msg_id(id, &r.custom_id, r.line);
                acks.push(
                    publish(&self.js, result_subject(id), msg_id, serde_json::to_vec(r)?).await?,
                );
                if acks.len() >= 1000 {
                    await_acks(&mut acks).await?;
                }
            }
            self.lease.fence();
            for s in &w.shards {
                let msg_id = shard_msg_id(id, s.shard);
                acks.push(
                    publish(&self.js, shard_subject(id), msg_id, serde_json::to_vec(s)?).await?,
                );
                if acks.len() >= 256 {
                    await_acks(&mut acks).await?;
                }
            }
            self.counters
                .shards_published
                .fetch_add(w.shards.len() as u64, Ordering::Relaxed);
        }
        await_acks(&mut acks).await?;
        index.shutdown().await?;
        Ok((tokens, shards, false))
    }

    async fn fail_validation(
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
    fn maybe_finish(self: &Arc<Self>, id: &str) {
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

    async fn purge_shards(&self, id: &str) {
        self.lease.fence();
        match self.js.get_stream(SHARD_STREAM).await {
            Ok(s) => {
                if let Err(e) = s.purge().filter(shard_subject(id)).await {
                    tracing::warn!(batch = id, error = %e, "could not purge shards");
                }
            }
            Err(e) => tracing::warn!(batch = id, error = %e, "could not purge shards"),
        }
    }

    /// Writes the output and error files and ends the batch. Idempotent: file ids derive from
    /// the batch id, and the results are re-read from the stream. Every result is already
    /// durable in the results stream, so a finalization that fails (the store is full, say) is
    /// never given up: it is logged, counted (`gristmill_finalize_failures_total`) and retried
    /// with a growing pause (2 s, doubling to 60 s) until the store takes the files.
    async fn finalize(self: Arc<Self>, id: String) {
        let mut pause = Duration::from_secs(2);
        loop {
            match self.try_finalize(&id).await {
                Ok(()) => return,
                Err(e) => {
                    self.counters
                        .finalize_failures
                        .fetch_add(1, Ordering::Relaxed);
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

    async fn try_finalize(&self, id: &str) -> Result<()> {
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
        self.lease.fence();
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
            self.lease.fence();
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
    async fn write_files(
        &self,
        id: &str,
        ending: BatchStatus,
        mut out: tokio::io::DuplexStream,
        mut err: tokio::io::DuplexStream,
    ) -> Result<Tally> {
        use tokio::io::AsyncWriteExt;
        let mut tally = Tally::default();
        let mut buf_out = Vec::with_capacity(FILE_CHUNK);
        let mut buf_err = Vec::with_capacity(FILE_CHUNK);
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
                    if !first {
                        continue;
                    }
                    match r.outcome {
                        ResultOutcome::Completed { body, usage, .. } => {
                            tally.completed += 1;
                            tally.prompt_tokens += usage.prompt_tokens as u64;
                            tally.completion_tokens += usage.completion_tokens as u64;
                            let l = OutputLine {
                                id: format!("batch_req_{}", nuid::next()),
                                custom_id: r.custom_id,
                                response: Some(ResponseEnvelope {
                                    status_code: 200,
                                    request_id: format!("req_{}", nuid::next()),
                                    body,
                                }),
                                error: None,
                            };
                            serde_json::to_writer(&mut buf_out, &l)?;
                            buf_out.push(b'\n');
                        }
                        ResultOutcome::Failed { error } => {
                            tally.failed += 1;
                            let custom_id = (!r.custom_id.is_empty()).then_some(r.custom_id);
                            write_error_line(&mut buf_err, custom_id, r.line, error)?;
                        }
                    }
                    if buf_out.len() >= FILE_CHUNK {
                        out.write_all(&buf_out).await?;
                        buf_out.clear();
                    }
                    if buf_err.len() >= FILE_CHUNK {
                        err.write_all(&buf_err).await?;
                        buf_err.clear();
                    }
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
        if tally.completed + tally.failed < rec.total || unfinished {
            let missing_error = |line: usize| match ending {
                BatchStatus::Cancelled => LineError::new(
                    codes::CANCELLED,
                    format!("line {line}: the batch was cancelled before this request ran"),
                ),
                BatchStatus::Expired => LineError::new(
                    codes::EXPIRED,
                    format!(
                        "line {line}: the batch's completion window ran out before this request ran"
                    ),
                ),
                _ => LineError::new(
                    codes::INTERNAL,
                    format!("line {line}: no result was recorded for this request"),
                ),
            };
            // An index shorter than the batch was cut short by the cancel that ends it.
            let entries = match self.read_index(id).await? {
                Some(entries) if rec.total > 0 && entries.len() as u64 >= rec.total => entries,
                _ => self.input_entries(&rec).await?,
            };
            for e in entries {
                let written = self.lock().get_mut(id).is_some_and(|st| {
                    st.rec
                        .ledger
                        .is_written(e.custom_id.as_deref().unwrap_or(""), e.line)
                });
                if written {
                    continue;
                }
                tally.failed += 1;
                write_error_line(&mut buf_err, e.custom_id, e.line, missing_error(e.line))?;
                if buf_err.len() >= FILE_CHUNK {
                    err.write_all(&buf_err).await?;
                    buf_err.clear();
                }
            }
        }
        out.write_all(&buf_out).await?;
        err.write_all(&buf_err).await?;
        out.shutdown().await?;
        err.shutdown().await?;
        Ok(tally)
    }

    /// Consumes the results stream from the start, forever, counting each line's first result.
    async fn collect_results(self: Arc<Self>) {
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

    async fn collect_from(self: &Arc<Self>) -> Result<()> {
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
    fn count(self: &Arc<Self>, results: Vec<ResultMessage>, source: Option<(&str, f64)>) {
        let mut finished: Vec<String> = Vec::new();
        let c = &self.counters;
        // Queue tokens these results retire: each line its share of its batch's weight.
        let mut retired = 0.0;
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
                        c.duplicate_results.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Recorded::Foreign => {
                        let n = c.rejected_results.fetch_add(1, Ordering::Relaxed) + 1;
                        // Logged while few; the metric counts them all.
                        if n <= 100 || n.is_power_of_two() {
                            tracing::warn!(batch = %r.batch_id, line = r.line, shard = ?r.shard, rejected = n, "a result for a line this batch does not have (or from a shard that did not carry it) was rejected");
                        }
                        continue;
                    }
                }
                st.dirty = true;
                if st.rec.total > 0 {
                    retired += st.rec.tokens as f64 / st.rec.total as f64;
                }
                st.rec.prompt_tokens += prompt;
                st.rec.completion_tokens += tokens;
                if ok {
                    c.results_completed.fetch_add(1, Ordering::Relaxed);
                } else {
                    c.results_failed.fetch_add(1, Ordering::Relaxed);
                }
                c.completion_tokens.fetch_add(tokens, Ordering::Relaxed);
                if !finished.contains(&r.batch_id) {
                    finished.push(r.batch_id.clone());
                }
            }
        }
        if let Some((worker, t)) = source {
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
    async fn bury_shard(&self, seq: u64) -> Result<()> {
        let stream = self.js.get_stream(SHARD_STREAM).await?;
        let msg = match stream.get_raw_message(seq).await {
            Ok(m) => m,
            // Already acknowledged or buried.
            Err(_) => return Ok(()),
        };
        let shard: ShardMessage = serde_json::from_slice(&msg.payload)
            .with_context(|| format!("shard at sequence {seq} is unreadable"))?;
        let n = self.settings.max_deliver;
        self.lease.fence();
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
                )
                .await?,
            );
        }
        await_acks(&mut acks).await?;
        stream.delete_message(seq).await.ok();
        self.counters.dead_shards.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(batch = %shard.batch_id, shard = shard.shard, "shard failed on every delivery; its lines are error lines");
        Ok(())
    }

    /// Listens for JetStream's max-deliveries advisories; a periodic sweep catches those sent
    /// while no coordinator was listening.
    /// Takes the workers' progress reports (core NATS, advisory).
    async fn watch_progress(self: Arc<Self>) {
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

    async fn watch_dead_shards(self: Arc<Self>) {
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
    async fn sweep_dead_shards(&self) -> Result<()> {
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

    /// Once a second: store changed records, expire overdue batches, sample tokens/s, and
    /// every 10 s sweep for dead shards.
    async fn tick(self: Arc<Self>) {
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
                rate.push_back((
                    Instant::now(),
                    self.counters.completion_tokens.load(Ordering::Relaxed),
                ));
                while rate.len() > 11 {
                    rate.pop_front();
                }
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
    async fn measure(&self) -> Option<f64> {
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
    async fn autoscale_tick(&self, measured_tokens_per_s: Option<f64>) {
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
        if d.replicas == current {
            return;
        }
        match &self.scaler {
            None => {
                tracing::info!(from = current, to = d.replicas, reason = ?d.reason, deadline_need = d.deadline_need, "autoscale (dry run): would scale the workers")
            }
            Some(scaler) => {
                self.lease.fence();
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

    /// Whether NATS is reachable now.
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
}

/// Scans a piece of an input file (whole lines, the first numbered `first`) off the async
/// runtime: validation is CPU work.
async fn scan_piece(
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

/// An object read in pieces of whole lines (about [`LINE_PIECE`] bytes each; a longer line
/// makes a longer piece), each with the number of its first line.
struct Lines<R> {
    reader: R,
    carry: Vec<u8>,
    next_line: usize,
    done: bool,
}

/// Bytes read from the store at once while streaming an input file.
const LINE_PIECE: usize = 4 << 20;

impl<R: tokio::io::AsyncRead + Unpin> Lines<R> {
    fn new(reader: R) -> Self {
        Self {
            reader,
            carry: Vec::new(),
            next_line: 1,
            done: false,
        }
    }

    async fn next(&mut self) -> Result<Option<(usize, Vec<u8>)>> {
        if self.done {
            return Ok(None);
        }
        let mut buf = std::mem::take(&mut self.carry);
        loop {
            let start = buf.len();
            buf.resize(start + LINE_PIECE, 0);
            let n = self.reader.read(&mut buf[start..]).await?;
            buf.truncate(start + n);
            if n == 0 {
                self.done = true;
                if buf.is_empty() {
                    return Ok(None);
                }
                break;
            }
            if let Some(pos) = buf[start..].iter().rposition(|&b| b == b'\n') {
                self.carry = buf.split_off(start + pos + 1);
                break;
            }
        }
        let first = self.next_line;
        self.next_line += buf.iter().filter(|&&b| b == b'\n').count();
        Ok(Some((first, buf)))
    }
}

/// glibc's allocator keeps freed memory in per-thread arenas and, once a large block has been
/// freed, serves later large blocks from them too (its mmap threshold rises) and rarely gives
/// them back: after a million-line batch the coordinator held 4x what it used. Fewer arenas,
/// a fixed mmap threshold (buffers of 256 kB and more are mapped and unmapped), and a trim once
/// a batch's transient allocations are gone keep its RSS near what it uses
/// (docs/benchmarks.md: 1,000,000 lines, peak 615 MB -> about 300 MB).
pub fn limit_allocator_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets tuning parameters of the C allocator; called at start-up.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

/// Returns the allocator's free memory to the system (see [`limit_allocator_arenas`]).
fn trim_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free pages of the C allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What a finalization wrote.
#[derive(Debug, Default)]
struct Tally {
    completed: u64,
    failed: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
}

/// Chunks of files in the object store, and the write window of a file being streamed there.
const FILE_CHUNK: usize = 512 * 1024;

/// Appends one error line (`ErrorLine`) to `buf`.
fn write_error_line(
    buf: &mut Vec<u8>,
    custom_id: Option<String>,
    line: usize,
    error: LineError,
) -> Result<()> {
    let l = ErrorLine {
        id: format!("batch_req_{}", nuid::next()),
        custom_id,
        response: None,
        error,
        line,
    };
    serde_json::to_writer(&mut *buf, &l)?;
    buf.push(b'\n');
    Ok(())
}

/// Name of a batch's index object in the file object store (not a file of the Files API).
fn index_object(batch_id: &str) -> String {
    format!("index-{batch_id}")
}

/// Code of the note a batch carries while its output files cannot be stored.
const FINALIZE_PENDING: &str = "output_not_stored_yet";

/// Attempts at dispatching a batch before it fails (about 4 minutes of pauses).
const DISPATCH_ATTEMPTS: u32 = 8;

const ALL_STATUSES: [BatchStatus; 8] = [
    BatchStatus::Validating,
    BatchStatus::Failed,
    BatchStatus::InProgress,
    BatchStatus::Finalizing,
    BatchStatus::Completed,
    BatchStatus::Expired,
    BatchStatus::Cancelling,
    BatchStatus::Cancelled,
];

pub fn status_name(s: BatchStatus) -> &'static str {
    match s {
        BatchStatus::Validating => "validating",
        BatchStatus::Failed => "failed",
        BatchStatus::InProgress => "in_progress",
        BatchStatus::Finalizing => "finalizing",
        BatchStatus::Completed => "completed",
        BatchStatus::Expired => "expired",
        BatchStatus::Cancelling => "cancelling",
        BatchStatus::Cancelled => "cancelled",
    }
}

/// Whether `id` can be an id of ours (they come from URLs): `file-` or `batch_` and then
/// letters, digits, `-` and `_` only — nothing NATS would read as a token separator, wildcard
/// or path.
pub fn valid_id(id: &str) -> bool {
    (id.starts_with("file-") || id.starts_with("batch_"))
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

/// Publishes with a `Nats-Msg-Id`; returns the ack future.
pub async fn publish(
    js: &jetstream::Context,
    subject: String,
    msg_id: String,
    payload: Vec<u8>,
) -> Result<jetstream::context::PublishAckFuture> {
    js.send_publish(
        subject,
        jetstream::message::PublishMessage::build()
            .payload(payload.into())
            .message_id(msg_id),
    )
    .await
    .context("publishing")
}

/// Awaits every ack in `acks`.
pub async fn await_acks(acks: &mut Vec<jetstream::context::PublishAckFuture>) -> Result<()> {
    for a in acks.drain(..) {
        a.await.context("waiting for a publish acknowledgement")?;
    }
    Ok(())
}
