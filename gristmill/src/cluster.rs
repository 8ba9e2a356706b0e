//! `gristmill coordinator` and `gristmill worker`: the two long-running cluster processes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use gristmill_batch::intake::{byte_tokens, IntakeLimits, PromptTokens};
use gristmill_batch::shard::ShardLimits;
use gristmill_coordinator::http::HttpLimits;
use gristmill_coordinator::server::Settings;
use gristmill_coordinator::tenants::ApiKeys;
use gristmill_coordinator::Peer;
use gristmill_protocol::{Prompt, Request};
use gristmill_worker::node::{Generator, WorkerSettings};

use crate::nats::NatsArgs;

use crate::engine_args::EngineArgs;

#[derive(Debug, Args)]
pub struct CoordinatorArgs {
    /// Address the HTTP API listens on.
    #[arg(long, default_value = "127.0.0.1:8000", env = "GRISTMILL_LISTEN")]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub nats: NatsArgs,

    /// Require `Authorization: Bearer KEY` on every /v1 request (probes and /metrics stay open).
    /// One tenant; see --api-keys for several.
    #[arg(
        long,
        env = "GRISTMILL_API_KEY",
        hide_env_values = true,
        conflicts_with = "api_keys"
    )]
    pub api_key: Option<String>,

    /// File of API keys and their tenants, one `TENANT KEY` per line (`KEY` may be
    /// `sha256:<hex>` of the key); each tenant sees, reads, cancels and deletes only its own
    /// files and batches. `TENANT KEY read-only` admits a key that only reads (GET: the
    /// dashboard, listings, files), e.g. for people who watch. Lines starting with `#` are
    /// comments.
    #[arg(long, env = "GRISTMILL_API_KEYS")]
    pub api_keys: Option<PathBuf>,

    /// Serve the API to anyone, without a key. Without this flag the coordinator refuses to
    /// start when neither --api-key nor --api-keys is given (an unset `$GRISTMILL_API_KEY`
    /// would otherwise open every batch and file to whoever reaches the port).
    #[arg(long, env = "GRISTMILL_ALLOW_UNAUTHENTICATED")]
    pub allow_unauthenticated: bool,

    /// Model file or directory (or Hugging Face id, as `--model` takes) whose tokenizer weighs
    /// prompts and orders them by shared token prefix. Without it, prompts are weighed as
    /// bytes / 4 and ordered by shared text prefix.
    #[arg(long, env = "GRISTMILL_TOKENIZER")]
    pub tokenizer: Option<PathBuf>,

    /// Largest accepted input file, in bytes (at most 1 GiB: line numbers, blank lines
    /// included, are kept in 30 bits).
    #[arg(long, default_value_t = 200 << 20, env = "GRISTMILL_MAX_FILE_BYTES",
          value_parser = clap::value_parser!(u64).range(1..(1 << 30)))]
    pub max_file_bytes: u64,

    /// Most requests in one batch (at most 100 million).
    #[arg(long, default_value_t = 50_000, env = "GRISTMILL_MAX_LINES",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100_000_000))]
    pub max_lines: usize,

    /// Token budget of one shard (prompt plus max_tokens of its lines).
    #[arg(long, default_value_t = 65_536, env = "GRISTMILL_SHARD_MAX_TOKENS")]
    pub shard_max_tokens: u64,

    /// Most lines in one shard.
    #[arg(long, default_value_t = 512, env = "GRISTMILL_SHARD_MAX_LINES")]
    pub shard_max_lines: usize,

    /// Seconds a worker may hold a shard without an in-progress ack before it is redelivered.
    #[arg(long, default_value_t = 30.0, env = "GRISTMILL_ACK_WAIT")]
    pub ack_wait: f64,

    /// Deliveries of a shard before its unfinished lines become error lines.
    #[arg(long, default_value_t = 3, env = "GRISTMILL_MAX_DELIVER")]
    pub max_deliver: i64,

    /// JetStream replicas of the streams and buckets (3 on a 3-node NATS cluster).
    #[arg(long, default_value_t = 1, env = "GRISTMILL_REPLICAS")]
    pub replicas: usize,

    /// Run the autoscaling policy without applying it: log every change of the desired worker
    /// count and export `gristmill_autoscale_desired_replicas` on /metrics.
    #[arg(long, env = "GRISTMILL_AUTOSCALE_DRY_RUN")]
    pub autoscale_dry_run: bool,

    /// Apply the autoscaling policy: scale the worker StatefulSet (`--autoscale-statefulset`)
    /// through the Kubernetes API (in-cluster service account or kubeconfig). Only the leader
    /// coordinator scales.
    #[arg(long, env = "GRISTMILL_AUTOSCALE")]
    pub autoscale: bool,

    /// Autoscaling: the worker StatefulSet, as NAMESPACE/NAME.
    #[arg(
        long,
        default_value = "gristmill/gristmill-worker",
        env = "GRISTMILL_AUTOSCALE_STATEFULSET"
    )]
    pub autoscale_statefulset: String,

    /// Autoscaling: most workers.
    #[arg(long, default_value_t = 16, env = "GRISTMILL_AUTOSCALE_MAX_REPLICAS")]
    pub autoscale_max_replicas: u32,

    /// Autoscaling: fewest workers (0 lets an idle cluster release every GPU).
    #[arg(long, default_value_t = 0, env = "GRISTMILL_AUTOSCALE_MIN_REPLICAS")]
    pub autoscale_min_replicas: u32,

    /// Autoscaling: seconds an idle queue keeps its workers before going to the minimum.
    #[arg(long, default_value_t = 600.0, env = "GRISTMILL_AUTOSCALE_IDLE_S")]
    pub autoscale_idle_s: f64,

    /// Autoscaling: scale down only to the largest recommendation of this many seconds (as
    /// Kubernetes' HPA does), so a queue that dips briefly keeps its workers.
    #[arg(
        long,
        default_value_t = 300.0,
        env = "GRISTMILL_AUTOSCALE_STABILIZATION_S"
    )]
    pub autoscale_stabilization_s: f64,

    /// Autoscaling: seconds from a scale-up to a new worker taking work (node provisioning,
    /// image pull, model load); deadlines count it.
    #[arg(long, default_value_t = 180.0, env = "GRISTMILL_AUTOSCALE_STARTUP_S")]
    pub autoscale_startup_s: f64,

    /// Autoscaling: empty the queue within this many seconds even when no deadline asks for it.
    #[arg(
        long,
        default_value_t = 3600.0,
        env = "GRISTMILL_AUTOSCALE_TARGET_DRAIN_S"
    )]
    pub autoscale_target_drain_s: f64,

    /// Autoscaling: tokens per second of one worker (prompt plus max_tokens of the lines it
    /// finishes) until one has been measured.
    #[arg(
        long,
        default_value_t = 1000.0,
        env = "GRISTMILL_AUTOSCALE_WORKER_TOKENS_PER_S"
    )]
    pub autoscale_worker_tokens_per_s: f64,

    /// Autoscaling: seconds between decisions. Worker throughput is measured over the last six
    /// intervals in which shards waited (every worker busy), once three such intervals have
    /// passed, and then replaces `--autoscale-worker-tokens-per-s`.
    #[arg(long, default_value_t = 10.0, env = "GRISTMILL_AUTOSCALE_INTERVAL")]
    pub autoscale_interval: f64,

    /// Name of this coordinator in the leader lease; must differ between coordinators and stay
    /// the same across restarts of one [default: $POD_NAME or the host name, then the port].
    #[arg(long, env = "GRISTMILL_INSTANCE_ID")]
    pub instance_id: Option<String>,

    /// Base URL at which other coordinators reach this one's API, to forward requests to it
    /// while it leads [default: http://$POD_IP:PORT when listening on all addresses, else the
    /// listen address].
    #[arg(long, env = "GRISTMILL_ADVERTISE_URL")]
    pub advertise_url: Option<String>,

    /// Seconds a leader lease lives without renewal: how long standbys wait before taking over
    /// from a leader that died (a leader that shuts down cleanly hands over at once). The same
    /// on every coordinator of a cluster.
    #[arg(long, default_value_t = 15.0, env = "GRISTMILL_LEASE_TTL")]
    pub lease_ttl: f64,

    /// Seconds an HTTP client has to send a whole request head, counted from when the
    /// coordinator starts waiting for one: a connection that sends nothing, or leaves a
    /// keep-alive connection idle this long, is closed.
    #[arg(long, default_value_t = 30.0, env = "GRISTMILL_HTTP_HEADER_TIMEOUT")]
    pub http_header_timeout: f64,

    /// Seconds an HTTP connection may send and receive nothing while the coordinator waits to
    /// read from it (a stalled request body) before it is closed.
    #[arg(long, default_value_t = 120.0, env = "GRISTMILL_HTTP_IDLE_TIMEOUT")]
    pub http_idle_timeout: f64,

    /// Most bytes the file store in NATS may hold (uploads, output and error files, batch
    /// indexes); 0 means no limit but the server's. When it is full, uploads fail and finished
    /// batches wait in `finalizing` (saying so) until space is freed.
    #[arg(long, default_value_t = 0, env = "GRISTMILL_FILE_STORE_MAX_BYTES")]
    pub file_store_max_bytes: u64,

    /// HTTP connections open at once; more wait in the listen backlog until one closes.
    #[arg(long, default_value_t = 1024, env = "GRISTMILL_HTTP_MAX_CONNECTIONS")]
    pub http_max_connections: usize,
}

/// The first of the environment variables `vars` that is set, else the machine's host name.
fn env_or_host_name(vars: &[&str]) -> Option<String> {
    vars.iter()
        .find_map(|v| std::env::var(v).ok().filter(|h| !h.is_empty()))
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
}

/// This coordinator's name in the leader lease: `POD_NAME`, else `HOSTNAME`, else the
/// machine's host name, followed by the port it listens on.
fn default_identity(port: u16) -> String {
    let host = env_or_host_name(&["POD_NAME", "HOSTNAME"]).unwrap_or_else(|| "coordinator".into());
    format!("{host}:{port}")
}

/// Where other coordinators reach this one: the listen address, or `POD_IP` (else the host
/// name) when it listens on every address.
fn default_advertise_url(addr: SocketAddr) -> String {
    if !addr.ip().is_unspecified() {
        return format!("http://{addr}");
    }
    let host = match env_or_host_name(&["POD_IP"]) {
        Some(ip) if ip.parse::<std::net::Ipv6Addr>().is_ok() => format!("[{ip}]"),
        Some(host) => host,
        None => "localhost".into(),
    };
    format!("http://{host}:{}", addr.port())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

impl CoordinatorArgs {
    /// Parses a coordinator's command line without the program and subcommand names (as the
    /// in-process cluster tests start coordinators); the environment fills what it does not say.
    pub fn try_parse_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        #[derive(clap::Parser)]
        struct Command {
            #[command(flatten)]
            args: CoordinatorArgs,
        }
        let argv = std::iter::once(std::ffi::OsString::from("coordinator"))
            .chain(args.into_iter().map(Into::into));
        <Command as clap::Parser>::try_parse_from(argv).map(|c| c.args)
    }

    /// The coordinator's settings from its flags, or what is wrong with them.
    pub fn settings(&self) -> Result<Settings> {
        let args = self;
        if args.max_deliver < 1 {
            bail!("--max-deliver must be at least 1");
        }
        if let Some(u) = args.advertise_url.as_deref().filter(|u| !u.is_empty()) {
            if !u.starts_with("http://") {
                bail!("--advertise-url must be an http:// URL (coordinators talk plain HTTP to each other), got {u:?}");
            }
        }
        // Durations in seconds, and the least each may be.
        for (flag, v, least) in [
            ("--lease-ttl", args.lease_ttl, 1.0),
            ("--autoscale-idle-s", args.autoscale_idle_s, 0.0),
            (
                "--autoscale-stabilization-s",
                args.autoscale_stabilization_s,
                0.0,
            ),
            ("--autoscale-startup-s", args.autoscale_startup_s, 0.0),
            (
                "--autoscale-target-drain-s",
                args.autoscale_target_drain_s,
                0.0,
            ),
            ("--autoscale-interval", args.autoscale_interval, 0.5),
            ("--http-header-timeout", args.http_header_timeout, 0.1),
            ("--http-idle-timeout", args.http_idle_timeout, 0.1),
            ("--ack-wait", args.ack_wait, 1.0),
        ] {
            if !v.is_finite() || v < least {
                bail!("{flag} must be a number of seconds, at least {least}, got {v}");
            }
        }
        if args.autoscale_min_replicas > args.autoscale_max_replicas {
            bail!(
                "--autoscale-min-replicas ({}) is above --autoscale-max-replicas ({})",
                args.autoscale_min_replicas,
                args.autoscale_max_replicas
            );
        }
        if args.http_max_connections == 0 {
            bail!("--http-max-connections must be at least 1");
        }
        let tokenizer: Arc<PromptTokens> = match &args.tokenizer {
            None => Arc::new(byte_tokens),
            Some(p) => {
                let tok = gristmill_engine::load_tokenizer(&crate::hub::resolve_model(p)?)
                    .with_context(|| format!("cannot load a tokenizer from {}", p.display()))?;
                Arc::new(move |r: &Request| {
                    let ids = match &r.prompt {
                        Prompt::Chat(m) => tok
                            .apply_chat_template(m)
                            .ok()
                            .and_then(|t| tok.encode(&t).ok()),
                        Prompt::Text(t) => tok.encode_prompt(t).ok(),
                        Prompt::Tokens(ids) => Some(ids.clone()),
                    };
                    // A prompt the tokenizer refuses fails on the worker; weigh it as bytes here.
                    ids.unwrap_or_else(|| byte_tokens(r))
                })
            }
        };
        Ok(Settings {
            nats_url: crate::nats::redact(&args.nats.url),
            api_keys: match (
                &args.api_keys,
                args.api_key.as_deref().filter(|k| !k.is_empty()),
            ) {
                (Some(path), _) => {
                    Some(ApiKeys::load(path).map_err(|e| anyhow::anyhow!("--api-keys: {e}"))?)
                }
                (None, Some(key)) => Some(ApiKeys::single(key)),
                (None, None) if args.allow_unauthenticated => {
                    tracing::warn!(
                        "no API key: anyone who reaches {} may use the API (--allow-unauthenticated)",
                        args.listen
                    );
                    None
                }
                (None, None) => bail!(
                    "no API key: set GRISTMILL_API_KEY (or --api-key, or --api-keys FILE), or pass \
                     --allow-unauthenticated to serve the API to anyone"
                ),
            },
            limits: IntakeLimits {
                max_bytes: args.max_file_bytes,
                max_lines: args.max_lines,
                // Set from the NATS server's max_payload once connected.
                max_line_bytes: usize::MAX,
                shard: ShardLimits {
                    max_tokens: args.shard_max_tokens.max(1),
                    max_lines: args.shard_max_lines.max(1),
                    ..ShardLimits::default()
                },
            },
            ack_wait: Duration::from_secs_f64(args.ack_wait),
            max_deliver: args.max_deliver,
            replicas: args.replicas.max(1),
            tokenizer,
            autoscale_apply: if args.autoscale {
                let (ns, name) = args.autoscale_statefulset.split_once('/').ok_or_else(|| {
                    anyhow::anyhow!(
                        "--autoscale-statefulset {:?}: expected NAMESPACE/NAME",
                        args.autoscale_statefulset
                    )
                })?;
                Some((ns.to_string(), name.to_string()))
            } else {
                None
            },
            autoscale_interval: Duration::from_secs_f64(args.autoscale_interval),
            http: HttpLimits {
                header_timeout: Duration::from_secs_f64(args.http_header_timeout),
                idle_timeout: Duration::from_secs_f64(args.http_idle_timeout),
                max_connections: args.http_max_connections,
            },
            file_store_max_bytes: (args.file_store_max_bytes > 0)
                .then_some(args.file_store_max_bytes),
            autoscale_dry_run: (args.autoscale_dry_run || args.autoscale).then(|| {
                gristmill_batch::autoscale::Policy {
                    min_replicas: args.autoscale_min_replicas,
                    max_replicas: args.autoscale_max_replicas.max(1),
                    default_tokens_per_s: args.autoscale_worker_tokens_per_s.max(1.0),
                    scale_to_zero_after_s: args.autoscale_idle_s,
                    scale_down_stabilization_s: args.autoscale_stabilization_s,
                    startup_s: args.autoscale_startup_s,
                    target_drain_s: args.autoscale_target_drain_s,
                }
            }),
        })
    }
}

/// Serves one coordinator with `settings` (from [`CoordinatorArgs::settings`]) on `listener`
/// until `shutdown` resolves: connects to NATS and runs [`gristmill_coordinator::run`] (what
/// `gristmill coordinator` does once it listens).
pub async fn serve_coordinator(
    args: CoordinatorArgs,
    settings: Settings,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let addr = listener.local_addr()?;
    let peer = Peer {
        identity: args
            .instance_id
            .clone()
            .filter(|i| !i.is_empty())
            .unwrap_or_else(|| default_identity(addr.port())),
        advertise_url: args
            .advertise_url
            .clone()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| default_advertise_url(addr)),
        lease_ttl: Duration::from_secs_f64(args.lease_ttl),
    };
    let client = args.nats.connect("gristmill-coordinator").await?;
    Ok(gristmill_coordinator::run(listener, client, settings, peer, shutdown).await?)
}

pub fn coordinator(args: CoordinatorArgs) -> Result<()> {
    gristmill_coordinator::server::limit_allocator_arenas();
    let settings = args.settings()?;
    runtime()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        // Tests and scripts read this line to find the port of `--listen 127.0.0.1:0`.
        eprintln!(
            "gristmill coordinator listening on http://{}",
            listener.local_addr()?
        );
        serve_coordinator(args, settings, listener, shutdown_signal()).await
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EngineKind {
    /// The model (`--model`).
    Model,
    /// Benchmark mode: answer every request with its own prompt, at once, without a model.
    Echo,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub nats: NatsArgs,

    /// What generates completions: the model, or the `echo` benchmark mode.
    #[arg(long, value_enum, default_value_t = EngineKind::Model, env = "GRISTMILL_ENGINE")]
    pub engine: EngineKind,

    /// With `--engine echo`: milliseconds each request waits before its answer (one at a
    /// time), to make an echo batch take a while, e.g. to watch it on the dashboard.
    #[arg(long, default_value_t = 0.0, env = "GRISTMILL_ECHO_DELAY_MS")]
    pub echo_delay_ms: f64,

    /// Shards held at once, all feeding one continuous batch.
    #[arg(long, default_value_t = 4, env = "GRISTMILL_MAX_INFLIGHT_SHARDS")]
    pub max_inflight_shards: usize,

    /// Seconds after SIGTERM for in-flight shards to finish before they are released to other
    /// workers.
    #[arg(long, default_value_t = 60.0, env = "GRISTMILL_GRACE")]
    pub grace: f64,

    /// Name in logs and in the NATS connection [default: worker-<pid>].
    #[arg(long, env = "GRISTMILL_WORKER_NAME")]
    pub name: Option<String>,

    /// Answer health probes on this address (`GET /healthz`: 200 while connected to NATS and
    /// not stopping), e.g. `0.0.0.0:8080` for Kubernetes liveness and readiness probes.
    #[arg(long, env = "GRISTMILL_HEALTH_LISTEN")]
    pub health_listen: Option<std::net::SocketAddr>,

    #[command(flatten)]
    pub engine_args: EngineArgs,
}

pub fn worker(args: WorkerArgs) -> Result<()> {
    if !args.grace.is_finite() || args.grace < 0.0 {
        bail!("--grace must be a number of seconds, got {}", args.grace);
    }
    if !(0.0..=60_000.0).contains(&args.echo_delay_ms) {
        bail!(
            "--echo-delay-ms must be from 0 to 60000 milliseconds, got {}",
            args.echo_delay_ms
        );
    }
    let generator = match args.engine {
        EngineKind::Echo => Generator::Echo {
            delay: Duration::from_secs_f64(args.echo_delay_ms / 1000.0),
        },
        EngineKind::Model => {
            let opts = args.engine_args.options()?;
            let start = std::time::Instant::now();
            let engine = args.engine_args.load_engine()?;
            let line = args
                .engine_args
                .describe(&engine, start.elapsed().as_secs_f64());
            tracing::info!("{line}");
            Generator::Model(Arc::new(engine), opts)
        }
    };
    let name = args
        .name
        .unwrap_or_else(|| format!("worker-{}", std::process::id()));
    // The name travels in a NATS header of every results message.
    if name.is_empty() || name.len() > 128 || !name.bytes().all(|b| b.is_ascii_graphic()) {
        bail!("--name must be 1 to 128 printable ASCII characters without spaces, got {name:?}");
    }
    let settings = WorkerSettings {
        max_inflight_shards: args.max_inflight_shards.max(1),
        grace: Duration::from_secs_f64(args.grace),
        name,
        health_listen: args.health_listen,
    };
    let runtime = runtime()?;
    let r = runtime.block_on(async move {
        let client = args.nats.connect(&settings.name).await?;
        Ok(gristmill_worker::node::serve(client, settings, generator).await?)
    });
    // Stopped early (a second signal, a panicked engine): what is still in flight is dropped,
    // not waited for.
    runtime.shutdown_timeout(Duration::from_secs(1));
    r
}
