//! The cluster worker: pulls shards from JetStream and feeds them into one engine.
//!
//! Several shards are in flight at once (`max_inflight_shards`), all feeding the same
//! continuous-batching engine, so one shard's tail overlaps the next one's start. Per shard:
//!
//! 1. its batch's record is read from the KV bucket: a cancelled or finished batch's shard is
//!    acknowledged and skipped;
//! 2. its requests go to the engine; every `ack_wait / 3` an in-progress ack keeps the shard
//!    from being redelivered, and the batch is checked again (a cancelled batch's requests are
//!    aborted in the engine);
//! 3. finished requests are published to the results stream as soon as they finish, those
//!    ready together in one message whose `Nats-Msg-Id` is a hash of the lines it reports
//!    ([`result_group_msg_id`]); a PubAck that says "duplicate" is accepted only if the stored
//!    message it names reports exactly the same lines;
//! 4. only after every result's PubAck has arrived is the shard acknowledged (double ack:
//!    the server confirms it).
//!
//! A crash anywhere before 4 leaves the shard unacknowledged: JetStream redelivers it after
//! `ack_wait`, and the results already published are deduplicated (by JetStream within its
//! window, by the coordinator beyond). A shard whose processing fails is naked for a retry; on
//! its last delivery (`max_deliver`) its unfinished lines are published as error lines and the
//! shard is terminated. On SIGTERM the worker stops pulling, lets in-flight shards finish
//! within the grace period, and naks the rest so that other workers take them at once; with
//! nothing in flight it exits at once (NATS reachable or not), and a second SIGTERM or SIGINT
//! exits immediately. A shard handler that panics naks its shard and is counted; an engine
//! thread that panics ends the process (exit code 70) so that the orchestrator restarts it.
//!
//! This file holds the set-up and the shard loop; `results` publishes and checks results,
//! `health` answers the probe and watches for stop signals.
mod error;
pub use error::WorkerError;
mod health;
mod results;
use health::*;
use results::*;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{anyhow, Result};
use async_nats::jetstream::{self, consumer, AckKind};
use futures_util::FutureExt;
use futures_util::StreamExt;
use gristmill_protocol::cluster::{
    batch_trace_id, decode_results, parse_traceparent, progress_subject, result_group_msg_id,
    result_msg_id, result_subject, span_id, traceparent, ProgressMessage, ResultMessage,
    ResultOutcome, ShardMessage, BATCH_BUCKET, MAX_RESULTS_PER_MESSAGE, MAX_RESULT_MESSAGE_BYTES,
    RESULT_STREAM, SHARD_STREAM, TRACEPARENT_HEADER, WORKER_CONSUMER, WORKER_HEADER,
};
use gristmill_protocol::{codes, FinishReason, LineError, Prompt, Request, Usage};
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::Instrument;

use gristmill_engine::engine::{Choice, Completion, Engine, EngineOptions, Outcome};
use gristmill_engine::response::{response_body, IdGen};

/// Environment variable naming a `custom_id` whose shard always fails (fault injection for the
/// delivery tests; never set it in production).
pub const ENV_CHAOS_FAIL_CUSTOM_ID: &str = "GRISTMILL_CHAOS_FAIL_CUSTOM_ID";
/// Environment variable naming a `custom_id` whose shard makes the worker process abort on
/// pick-up, as a crash would (fault injection for the delivery tests; never set it in
/// production).
pub const ENV_CHAOS_CRASH_CUSTOM_ID: &str = "GRISTMILL_CHAOS_CRASH_CUSTOM_ID";

/// What generates the completions.
#[derive(Debug)]
pub enum Generator {
    /// The model.
    Model(Arc<Engine>, EngineOptions),
    /// Answers every request with its own prompt, after `delay` (zero: at once): a benchmark
    /// mode that measures the coordinator and NATS without a model, and, slowed down, a batch
    /// that takes long enough to be watched (the dashboard's browser test). Clearly not
    /// generation.
    Echo { delay: Duration },
}

/// Settings of a worker.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Shards held at once.
    pub max_inflight_shards: usize,
    /// After SIGTERM, how long in-flight shards may take before they are released.
    pub grace: Duration,
    /// Name in logs and in the NATS connection.
    pub name: String,
    /// Where to answer health probes (`GET /healthz`: 200 while connected to NATS and not
    /// stopping, 503 otherwise), if anywhere.
    pub health_listen: Option<std::net::SocketAddr>,
}

type Tag = u64;

/// Routes engine outcomes back to the shard that sent the request.
#[derive(Default)]
struct Router {
    routes: Mutex<HashMap<Tag, mpsc::UnboundedSender<Outcome>>>,
    aborted: RwLock<HashSet<Tag>>,
    /// Tokens generated so far under each tag (one shard's delivery).
    tokens: Mutex<HashMap<Tag, u64>>,
}

struct Shared {
    js: jetstream::Context,
    /// The results stream, to read back a message a "duplicate" PubAck names.
    results: jetstream::stream::Stream,
    /// Largest results message the server takes (its `max_payload`, less room for headers).
    max_message_bytes: usize,
    /// Shard handlers that panicked (their shards were released).
    panics: AtomicU64,
    batches: jetstream::kv::Store,
    to_engine: std::sync::mpsc::Sender<(Tag, Request)>,
    router: Arc<Router>,
    next_tag: AtomicU64,
    ack_wait: Duration,
    max_deliver: i64,
    model_name: String,
    /// This worker's name, sent with its results (the coordinator measures throughput by it).
    name: String,
    chaos_fail: Option<String>,
    /// Fires when in-flight shards must be released.
    release: watch::Receiver<bool>,
    /// Reply subjects of the shards held now: naked at exit if their handler has not finished.
    held: Mutex<HashMap<Tag, async_nats::Subject>>,
}

/// Why a shard could not be finished.
enum ShardError {
    /// The shard itself failed (counts toward `max_deliver`).
    Failed(String),
    /// NATS was unreachable: redelivery will retry; not the shard's fault.
    Transport(anyhow::Error),
    /// Released on shutdown.
    Released,
}

impl From<anyhow::Error> for ShardError {
    fn from(e: anyhow::Error) -> Self {
        ShardError::Transport(e)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs a worker on `client` (connected by the caller, with its credentials and TLS) until
/// SIGTERM or Ctrl-C, then drains. Returns early with [`WorkerError::EnginePanicked`] or
/// [`WorkerError::Interrupted`], for the caller to exit with their code.
pub async fn serve(
    client: async_nats::Client,
    settings: WorkerSettings,
    generator: Generator,
) -> Result<(), WorkerError> {
    let js = jetstream::new(client);
    // The coordinator creates the streams and the consumer; wait for them.
    let consumer: consumer::PullConsumer = loop {
        match js.get_stream(SHARD_STREAM).await {
            Ok(s) => match s.get_consumer(WORKER_CONSUMER).await {
                Ok(c) => break c,
                Err(e) => {
                    tracing::info!(error = %e, "waiting for the coordinator to create the worker consumer")
                }
            },
            Err(e) => {
                tracing::info!(error = %e, "waiting for the coordinator to create the shard stream")
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let batches = loop {
        match js.get_key_value(BATCH_BUCKET).await {
            Ok(kv) => break kv,
            Err(e) => tracing::info!(error = %e, "waiting for the batch bucket"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let results = js
        .get_stream(RESULT_STREAM)
        .await
        .map_err(WorkerError::NoResultsStream)?;
    let max_message_bytes = max_message_bytes(&js.client());
    let config = &consumer.cached_info().config;
    let (ack_wait, max_deliver) = (config.ack_wait, config.max_deliver);

    let router = Arc::new(Router::default());
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<(Tag, Outcome)>();
    let (to_engine, from_workers) = std::sync::mpsc::channel::<(Tag, Request)>();
    // The engine thread's panic and a second stop signal end `serve` at once.
    let (fatal_tx, mut fatal) = mpsc::unbounded_channel::<WorkerError>();
    let model_name = match &generator {
        Generator::Model(e, _) => e.model_name.clone(),
        Generator::Echo { .. } => "echo".to_string(),
    };
    {
        let router = router.clone();
        let fatal_tx = fatal_tx.clone();
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                // A panic in the engine leaves every shard of this worker without results: end
                // the process so that the orchestrator restarts it, rather than limp on.
                let run = std::panic::AssertUnwindSafe(move || match generator {
                    Generator::Model(engine, opts) => {
                        let stats = engine.run_channel(
                            from_workers,
                            opts,
                            |tag| {
                                router
                                    .aborted
                                    .read()
                                    .map(|a| a.contains(tag))
                                    .unwrap_or(false)
                            },
                            |tag| *lock(&router.tokens).entry(*tag).or_insert(0) += 1,
                            |tag, o| {
                                let _ = out_tx.send((tag, o));
                            },
                        );
                        tracing::info!(steps = stats.steps, "engine stopped");
                    }
                    Generator::Echo { delay } => {
                        for (tag, req) in from_workers {
                            if !delay.is_zero() {
                                std::thread::sleep(delay);
                            }
                            let _ = out_tx.send((tag, echo(req)));
                        }
                    }
                });
                if std::panic::catch_unwind(run).is_err() {
                    tracing::error!(
                        "the engine thread panicked; exiting so that the worker is restarted"
                    );
                    let _ = fatal_tx.send(WorkerError::EnginePanicked);
                }
            })
            .map_err(WorkerError::EngineThread)?;
    }
    {
        let router = router.clone();
        tokio::spawn(async move {
            while let Some((tag, o)) = out_rx.recv().await {
                if let Some(tx) = lock(&router.routes).get(&tag) {
                    let _ = tx.send(o);
                }
            }
        });
    }
    let (release_tx, release) = watch::channel(false);
    let shared = Arc::new(Shared {
        js,
        results,
        max_message_bytes,
        panics: AtomicU64::new(0),
        batches,
        to_engine,
        router,
        next_tag: AtomicU64::new(1),
        ack_wait,
        max_deliver,
        model_name,
        name: settings.name.clone(),
        chaos_fail: std::env::var(ENV_CHAOS_FAIL_CUSTOM_ID)
            .ok()
            .filter(|s| !s.is_empty()),
        release,
        held: Mutex::new(HashMap::new()),
    });
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some(addr) = settings.health_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| WorkerError::HealthListen { addr, source })?;
        tokio::spawn(health(listener, shared.js.client(), stopping.clone()));
    }
    tracing::info!(name = %settings.name, ?ack_wait, max_deliver, "worker ready");

    let work = run(shared, consumer, settings, release_tx, stopping, fatal_tx);
    tokio::select! {
        () = work => Ok(()),
        Some(e) = fatal.recv() => Err(e),
    }
}

/// Takes shards until a stop signal, then drains them within the grace period.
async fn run(
    shared: Arc<Shared>,
    consumer: consumer::PullConsumer,
    settings: WorkerSettings,
    release_tx: watch::Sender<bool>,
    stopping: Arc<std::sync::atomic::AtomicBool>,
    fatal_tx: mpsc::UnboundedSender<WorkerError>,
) {
    let slots = Arc::new(Semaphore::new(settings.max_inflight_shards.max(1)));
    let mut stop = Box::pin(async {
        shutdown_signal().await;
        // A second SIGTERM or SIGINT ends `serve` at once, whatever it is waiting for.
        tokio::spawn(async move {
            shutdown_signal().await;
            tracing::warn!("second stop signal: exiting now");
            let _ = fatal_tx.send(WorkerError::Interrupted);
        });
    });
    loop {
        let permit = tokio::select! {
            _ = &mut stop => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                // Never closed; if it were, nothing more could be taken.
                Err(_) => break,
            },
        };
        let batch = consumer
            .batch()
            .max_messages(1)
            .expires(Duration::from_secs(1))
            .messages();
        let mut pull = Box::pin(async {
            let mut b = batch.await?;
            b.next().await.transpose()
        });
        let (msg, stopping) = tokio::select! {
            // The pull request stays open on the server until it expires: wait for it, so that a
            // shard delivered into it is released rather than left to time out (but not for
            // long: a server that is gone answers nothing).
            _ = &mut stop => (
                tokio::time::timeout(Duration::from_secs(2), pull)
                    .await
                    .unwrap_or(Ok(None)),
                true,
            ),
            m = &mut pull => (m, false),
        };
        if stopping {
            if let Ok(Some(m)) = msg {
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), m.ack_with(AckKind::Nak(None)))
                        .await;
            }
            break;
        }
        match msg {
            Ok(Some(msg)) => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let reply = msg.reply.clone();
                    let handled = std::panic::AssertUnwindSafe(handle(shared.clone(), msg))
                        .catch_unwind()
                        .await;
                    if handled.is_err() {
                        // The shard goes back to the queue (and counts toward max_deliver).
                        let n = shared.panics.fetch_add(1, Ordering::Relaxed) + 1;
                        tracing::error!(
                            panics = n,
                            "a shard handler panicked; its shard is released"
                        );
                        if let Some(reply) = reply {
                            let _ = shared
                                .js
                                .client()
                                .publish(reply, bytes::Bytes::from_static(b"-NAK"))
                                .await;
                        }
                    }
                    drop(permit);
                });
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "pulling a shard failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    stopping.store(true, Ordering::SeqCst);
    let inflight = settings.max_inflight_shards.max(1) as u32;
    tracing::info!(grace = ?settings.grace, "stopping: no new shards; finishing those in flight");
    let drained = tokio::time::timeout(settings.grace, slots.acquire_many(inflight)).await;
    if drained.is_err() {
        tracing::warn!("grace period over: releasing unfinished shards");
        let _ = release_tx.send(true);
        // Each handler naks its shard and returns.
        let _ = tokio::time::timeout(Duration::from_secs(5), slots.acquire_many(inflight)).await;
    }
    // Shards whose handler is still busy (in a publish, say) are released here.
    let client = shared.js.client();
    let left: Vec<async_nats::Subject> = lock(&shared.held).drain().map(|(_, r)| r).collect();
    for reply in left {
        let nak = client.publish(reply, bytes::Bytes::from_static(b"-NAK"));
        let _ = tokio::time::timeout(Duration::from_secs(1), nak).await;
    }
    // Acks and naks are buffered by the client: send them before the process exits (if the
    // server is there to take them; unacknowledged shards are redelivered after ack_wait).
    match tokio::time::timeout(Duration::from_secs(5), shared.js.client().flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "could not flush the last acknowledgements"),
        Err(_) => tracing::warn!("NATS did not take the last acknowledgements within 5 s"),
    }
    tracing::info!("worker stopped");
}

/// One shard, from delivery to acknowledgement.
async fn handle(shared: Arc<Shared>, msg: jetstream::Message) {
    let delivered = msg.info().map(|i| i.delivered).unwrap_or(1);
    let shard: ShardMessage = match serde_json::from_slice(&msg.payload) {
        Ok(s) => s,
        Err(e) => {
            // Nothing can be done with it: its lines are unknown. The coordinator's dead-shard
            // path cannot read it either, so say so loudly.
            tracing::error!(subject = %msg.subject, error = %e, "unreadable shard terminated");
            let _ = msg.ack_with(AckKind::Term).await;
            return;
        }
    };
    // The batch's trace (from the coordinator's `traceparent`, else derived as it derives it)
    // and this run's span in it: everything logged below carries the trace id, and the
    // results go back with this run as their parent.
    let trace_id = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(TRACEPARENT_HEADER))
        .and_then(|v| parse_traceparent(v.as_str()).map(|(t, _)| t.to_string()))
        .unwrap_or_else(|| batch_trace_id(&shard.batch_id));
    let run = span_id(&[
        &shard.batch_id,
        &shard.shard.to_string(),
        &shared.name,
        &delivered.to_string(),
    ]);
    let span = tracing::info_span!("shard", batch = %shard.batch_id, shard = shard.shard, delivery = delivered, worker = %shared.name, trace_id = %trace_id);
    // When spans are exported, this run is a child of the coordinator's span named in the
    // shard's `traceparent`, and the results name this run's span in theirs.
    if let Some(cx) = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(TRACEPARENT_HEADER))
        .and_then(|v| gristmill_protocol::otel::remote_context(v.as_str()))
    {
        let _ = tracing_opentelemetry::OpenTelemetrySpanExt::set_parent(&span, cx);
    }
    let trace = gristmill_protocol::otel::span_traceparent(&span)
        .unwrap_or_else(|| traceparent(&trace_id, &run));
    handle_shard(shared, msg, shard, delivered, trace)
        .instrument(span)
        .await
}

async fn handle_shard(
    shared: Arc<Shared>,
    msg: jetstream::Message,
    shard: ShardMessage,
    delivered: i64,
    trace: String,
) {
    let (batch_id, shard_no) = (shard.batch_id.clone(), shard.shard);
    let tag = shared.next_tag.fetch_add(1, Ordering::Relaxed);
    if let Some(reply) = msg.reply.clone() {
        lock(&shared.held).insert(tag, reply);
    }
    let mut published = HashSet::new();
    let started = std::time::Instant::now();
    tracing::info!(batch = %batch_id, shard = shard_no, lines = shard.requests.len(), delivery = delivered, "shard started");
    let result = run_shard(&shared, &msg, &shard, tag, &trace, &mut published).await;
    lock(&shared.held).remove(&tag);
    lock(&shared.router.routes).remove(&tag);
    let generated = lock(&shared.router.tokens).remove(&tag).unwrap_or(0);
    if let Ok(mut a) = shared.router.aborted.write() {
        a.remove(&tag);
    }
    report_progress(&shared, &shard, delivered, 0, true).await;
    match result {
        Ok(()) => {
            tracing::info!(
                batch = %batch_id,
                shard = shard_no,
                lines = shard.requests.len(),
                tokens = generated,
                secs = format!("{:.1}", started.elapsed().as_secs_f64()),
                "shard finished"
            );
            if let Err(e) = msg.double_ack().await {
                tracing::warn!(batch = %batch_id, shard = shard_no, error = %e, "ack failed; the shard will be redelivered and its results deduplicated");
            }
        }
        Err(ShardError::Released) => {
            let _ = msg.ack_with(AckKind::Nak(None)).await;
            tracing::info!(batch = %batch_id, shard = shard_no, "released unfinished shard");
        }
        Err(ShardError::Transport(e)) => {
            tracing::warn!(batch = %batch_id, shard = shard_no, error = format!("{e:#}"), "NATS error; the shard will be redelivered");
            let _ = msg
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
        }
        Err(ShardError::Failed(reason))
            if delivered >= shared.max_deliver && shared.max_deliver > 0 =>
        {
            tracing::error!(batch = %batch_id, shard = shard_no, delivered, %reason, "shard failed on its last delivery; its lines become error lines");
            let outcome = fail_rest(&shared, &shard, &published, delivered, &reason).await;
            match outcome {
                Ok(()) => {
                    let _ = msg.ack_with(AckKind::Term).await;
                }
                Err(e) => tracing::warn!(
                    error = format!("{e:#}"),
                    "could not publish the error lines; the coordinator will"
                ),
            }
        }
        Err(ShardError::Failed(reason)) => {
            tracing::warn!(batch = %batch_id, shard = shard_no, delivered, %reason, "shard failed; it will be retried");
            let _ = msg
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
        }
    }
}

/// How often a running shard's progress is reported.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Publishes a shard's progress on core NATS (advisory: a lost report only delays the
/// coordinator's view; nothing is counted from it).
async fn report_progress(
    shared: &Shared,
    shard: &ShardMessage,
    delivery: i64,
    running_tokens: u64,
    done: bool,
) {
    let report = ProgressMessage {
        batch_id: shard.batch_id.clone(),
        shard: shard.shard,
        worker: shared.name.clone(),
        running_tokens,
        done,
        delivery: u32::try_from(delivery).unwrap_or(0),
    };
    let Ok(payload) = serde_json::to_vec(&report) else {
        return;
    };
    let subject = progress_subject(&shard.batch_id);
    if let Err(e) = shared.js.client().publish(subject, payload.into()).await {
        tracing::debug!(error = %e, "progress report not sent");
    }
}

/// Whether a batch still wants its shards run (not cancelled, not finished).
async fn batch_is_live(shared: &Shared, batch_id: &str) -> bool {
    match shared.batches.get(batch_id).await {
        Ok(Some(v)) => {
            /// The part of a batch record a worker reads.
            #[derive(serde::Deserialize)]
            struct Record {
                status: gristmill_protocol::BatchStatus,
            }
            // A record this worker cannot read (a newer coordinator's): run the shard.
            serde_json::from_slice::<Record>(&v).map_or(true, |r| r.status.wants_shards_run())
        }
        // Unknown batch (deleted) or NATS trouble: run it; results are deduplicated anyway.
        _ => true,
    }
}

async fn run_shard(
    shared: &Shared,
    msg: &jetstream::Message,
    shard: &ShardMessage,
    tag: Tag,
    trace: &str,
    published: &mut HashSet<String>,
) -> Result<(), ShardError> {
    if !batch_is_live(shared, &shard.batch_id).await {
        tracing::info!(batch = %shard.batch_id, shard = shard.shard, "batch no longer running; shard skipped");
        return Ok(());
    }
    if let Ok(id) = std::env::var(ENV_CHAOS_CRASH_CUSTOM_ID) {
        if shard.requests.iter().any(|r| r.custom_id == id) {
            tracing::error!("fault injected by {ENV_CHAOS_CRASH_CUSTOM_ID}={id}: aborting");
            std::process::abort();
        }
    }
    if let Some(id) = &shared.chaos_fail {
        if shard.requests.iter().any(|r| &r.custom_id == id) {
            return Err(ShardError::Failed(format!(
                "fault injected by {ENV_CHAOS_FAIL_CUSTOM_ID}={id}"
            )));
        }
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    lock(&shared.router.routes).insert(tag, tx);
    let lines: HashMap<&str, &Request> = shard
        .requests
        .iter()
        .map(|r| (r.custom_id.as_str(), r))
        .collect();
    for r in &shard.requests {
        shared
            .to_engine
            .send((tag, r.clone()))
            .map_err(|_| ShardError::Failed("the engine has stopped".into()))?;
    }
    let mut ids = IdGen::new();
    let mut acks = Vec::new();
    let mut remaining = shard.requests.len();
    let mut heartbeat =
        tokio::time::interval((shared.ack_wait / 3).max(Duration::from_millis(100)));
    heartbeat.tick().await;
    let mut progress = tokio::time::interval(PROGRESS_EVERY);
    progress.tick().await;
    // Completion tokens of the lines finished so far.
    let mut finished_tokens = 0u64;
    // The first report says at once which worker took the shard, and on which delivery.
    let delivery = msg.info().map(|i| i.delivered).unwrap_or(1);
    report_progress(shared, shard, delivery, 0, false).await;
    let mut release = shared.release.clone();
    while remaining > 0 {
        tokio::select! {
            o = rx.recv() => {
                let Some(o) = o else {
                    return Err(ShardError::Failed("the engine has stopped".into()));
                };
                // Everything finished by now travels in one message.
                let mut group = Vec::new();
                let mut bytes = 0;
                let mut next = Some(o);
                while let Some(o) = next.take() {
                    if let Outcome::Done(c) = &o {
                        finished_tokens += c.usage.completion_tokens as u64;
                    }
                    let result = to_result(shard, o, &shared.model_name, &mut ids);
                    if lines.contains_key(result.custom_id.as_str()) {
                        let (result, size) = fit_result(result, shared.max_message_bytes);
                        bytes += size;
                        group.push(result);
                    }
                    let budget = MAX_RESULT_MESSAGE_BYTES.min(shared.max_message_bytes / 2);
                    if group.len() < MAX_RESULTS_PER_MESSAGE && bytes < budget {
                        next = rx.try_recv().ok();
                    }
                }
                if group.is_empty() {
                    continue;
                }
                remaining = remaining.saturating_sub(group.len());
                let keys: Vec<(String, usize)> =
                    group.iter().map(|r| (r.custom_id.clone(), r.line)).collect();
                let msg_id = result_group_msg_id(
                    &shard.batch_id,
                    keys.iter().map(|(c, l)| (c.as_str(), *l)),
                );
                let payload = serde_json::to_vec(&group).map_err(|e| ShardError::Failed(e.to_string()))?;
                let ack = shared
                    .js
                    .send_publish(
                        result_subject(&shard.batch_id),
                        jetstream::message::PublishMessage::build()
                            .payload(payload.into())
                            .message_id(msg_id)
                            .header(WORKER_HEADER, shared.name.as_str())
                            .header(TRACEPARENT_HEADER, trace),
                    )
                    .await
                    .map_err(|e| ShardError::Transport(anyhow!(e)))?;
                acks.push((keys, ack));
                if acks.len() >= 256 {
                    await_acks(shared, &mut acks, published).await?;
                }
            }
            _ = progress.tick() => {
                // Every second, changed or not: the report also says which worker holds the
                // shard (the coordinator forgets reports that are not renewed).
                let generated = lock(&shared.router.tokens).get(&tag).copied().unwrap_or(0);
                let running = generated.saturating_sub(finished_tokens);
                report_progress(shared, shard, delivery, running, false).await;
            }
            _ = heartbeat.tick() => {
                msg.ack_with(AckKind::Progress).await.map_err(|e| ShardError::Transport(anyhow!(e)))?;
                if !batch_is_live(shared, &shard.batch_id).await {
                    if let Ok(mut a) = shared.router.aborted.write() {
                        a.insert(tag);
                    }
                }
            }
            _ = release.changed() => return Err(ShardError::Released),
        }
    }
    await_acks(shared, &mut acks, published).await
}
