//! The running coordinator: JetStream set-up, batch intake and dispatch, result collection,
//! finalization, cancellation, expiry, dead shards, and resumption after a restart.
//!
//! Everything durable lives in NATS (docs/architecture.md, docs/concepts/delivery-semantics.md):
//! batch records in the [`BATCH_BUCKET`] KV
//! bucket, files in the [`FILE_BUCKET`] object store (their OpenAI metadata in
//! [`FILE_META_BUCKET`]), shards in the work-queue stream, results in the results stream. The
//! in-memory map of batches is a cache of the KV bucket plus the set of counted result keys,
//! which a restarted coordinator rebuilds by replaying the results stream from the start.
//! One coordinator acts at a time: it is started once this process holds the leader lease
//! ([`crate::lease`]) and checks the lease before each durable write.
//!
//! One concern per file: this one holds the state, its set-up and the batch records;
//! `files` the object store; `dispatch` intake, dispatch and cancel; `collect` results,
//! progress reports and dead shards; `finalize` the output and error files; `tick` expiry,
//! throughput and autoscaling; `metrics` the Prometheus metrics.

mod collect;
mod dispatch;
mod files;
mod finalize;
mod metrics;

pub use metrics::{exposition, leader_registry, Counters};
mod tick;
mod watch;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::finalize::{Finalizer, Tally};
use crate::ledger::{decode_index, encode_index, IndexEntry, Ledger, Recorded};
use crate::tasks::{supervise, Lifetime, TaskPanics};
use anyhow::{anyhow, bail, Context as _, Result};
use async_nats::jetstream::{self, consumer, kv, object_store, stream};
use futures_util::StreamExt;
use gristmill_protocol::cluster::{batch_trace_id, span_id, traceparent, TRACEPARENT_HEADER};
use gristmill_protocol::cluster::{
    decode_results, result_msg_id, result_subject, shard_msg_id, shard_subject, ProgressMessage,
    ResultMessage, ResultOutcome, ShardMessage, BATCH_BUCKET, FILE_BUCKET, FILE_META_BUCKET,
    PROGRESS_SUBJECT_PREFIX, RESULT_STREAM, RESULT_SUBJECT_PREFIX, SHARD_STREAM,
    SHARD_SUBJECT_PREFIX, WORKER_CONSUMER, WORKER_HEADER,
};
use gristmill_protocol::LineError;
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
    /// What the dashboard shows of it (advisory, in memory).
    watch: watch::BatchWatch,
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
    /// The workers heard from lately (the dashboard's).
    workers: Mutex<crate::dashboard::Workers>,
    /// The autoscaler's last decision (the dashboard's).
    last_decision: Mutex<Option<watch::LastDecision>>,
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
            workers: Mutex::new(crate::dashboard::Workers::new(
                watch::WORKERS_WINDOW_S,
                watch::WORKERS_FORGET_S,
            )),
            last_decision: Mutex::new(None),
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
                tracing::info!(batch = %key, status = ?rec.status, "unfinished batch loaded; its results are counted again");
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
                    watch: Default::default(),
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
        self.lease.fence()?;
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
        self.lease.fence()?;
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

    /// Whether NATS is reachable now.
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
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

/// Chunks of files in the object store, and the write window of a file being streamed there.
const FILE_CHUNK: usize = 512 * 1024;

/// Name of a batch's index object in the file object store (not a file of the Files API).
fn index_object(batch_id: &str) -> String {
    format!("index-{batch_id}")
}

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

/// Publishes with a `Nats-Msg-Id` and the batch's W3C trace context (`traceparent`, see
/// [`batch_trace`]); returns the ack future.
pub async fn publish(
    js: &jetstream::Context,
    subject: String,
    msg_id: String,
    payload: Vec<u8>,
    traceparent: &str,
) -> Result<jetstream::context::PublishAckFuture> {
    js.send_publish(
        subject,
        jetstream::message::PublishMessage::build()
            .payload(payload.into())
            .message_id(msg_id)
            .header(TRACEPARENT_HEADER, traceparent),
    )
    .await
    .context("publishing")
}

/// The `traceparent` of something the coordinator publishes for a batch: the batch's trace,
/// and a span named by `what` within it (a shard, the intake's error lines…).
pub fn batch_trace(batch_id: &str, what: &[&str]) -> String {
    let mut parts = vec![batch_id];
    parts.extend_from_slice(what);
    traceparent(&batch_trace_id(batch_id), &span_id(&parts))
}

/// Awaits every ack in `acks`.
pub async fn await_acks(acks: &mut Vec<jetstream::context::PublishAckFuture>) -> Result<()> {
    for a in acks.drain(..) {
        a.await.context("waiting for a publish acknowledgement")?;
    }
    Ok(())
}
