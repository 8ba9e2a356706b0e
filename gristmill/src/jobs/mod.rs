//! `gristmill migrate` and `gristmill scaffold`: the jobs users bring, as loops around the batch
//! engine — build one request per file or spec, send the ones the cache does not answer (to
//! the local engine or a coordinator), parse and apply the answers, verify them, retry the
//! failures with the verifier's output, and report. The pure parts are in
//! `gristmill-workflows`.

pub mod git;
pub mod migrate;
pub mod scaffold;
pub mod verify;

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use gristmill_batch::LineValidator;
use gristmill_engine::{Engine, EngineOptions, Outcome};
use gristmill_workflows::cache::{self, Cache, Entry};
use gristmill_workflows::report::Attempt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::client::Connection;
use crate::engine_args::EngineArgs;

/// Flags migrate and scaffold share: the model or coordinator, sampling, verification,
/// attempts, the cache and the report.
#[derive(Debug, Args)]
pub struct JobArgs {
    /// A command that checks an answer, run with `sh -c`. migrate: in a scratch worktree of the
    /// repository holding the candidate; with `{path}` in it, once per file (the path
    /// substituted, quoted), else once per round over all candidates (a failure blames the files
    /// its output names, or all of them). scaffold: in each tree, `{name}` substituted. Exit 0
    /// passes; otherwise the answer is retried with the command's output.
    #[arg(long, value_name = "CMD")]
    pub verify: Option<String>,

    /// Seconds a verifier may run before it (and everything it started) is killed and fails.
    #[arg(long, default_value_t = 600, value_name = "SECONDS")]
    pub verify_timeout: u64,

    /// Verifiers run at once: per-file verifiers (migrate, one scratch worktree each) and
    /// trees (scaffold) [default: the number of cores, at most 4].
    #[arg(long, value_name = "N")]
    pub verify_jobs: Option<usize>,

    /// Requests per file or tree at most: the first, then retries after an answer that does not
    /// parse, apply or verify (each a new request with a new seed and the error appended).
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub max_attempts: usize,

    /// Where the JSON report goes; an HTML page goes beside it (same name, `.html`).
    #[arg(long, value_name = "PATH.json")]
    pub report: Option<PathBuf>,

    /// Sampling temperature (the same seed gives the same answer at any temperature).
    #[arg(long, default_value_t = 0.2)]
    pub temperature: f64,

    /// Seed of the first attempt; attempt k uses SEED + k - 1.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Most tokens an answer may have (migrate sizes each file's budget from its length, up to
    /// this).
    #[arg(long, default_value_t = 4096, value_name = "N")]
    pub max_tokens: usize,

    /// The answer cache's folder (see the command's default). An answer is reused when the
    /// model, the prompt-format version and the whole request (file bytes, instruction,
    /// context, sampling, seed) are the same.
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,

    /// Neither read nor write the cache.
    #[arg(long)]
    pub no_cache: bool,

    /// Send the requests to this coordinator (as one batch per round) instead of running a
    /// model here.
    #[arg(long, value_name = "URL", conflicts_with = "model")]
    pub url: Option<String>,

    /// API key for --url, sent as `Authorization: Bearer KEY`.
    #[arg(
        long,
        env = "GRISTMILL_API_KEY",
        hide_env_values = true,
        requires = "url"
    )]
    pub api_key: Option<String>,

    /// What names the coordinator's model in cache keys [default: `coordinator URL`]. Change it
    /// when the cluster's model changes, or cached answers of the old model are reused.
    #[arg(long, value_name = "ID", requires = "url")]
    pub model_id: Option<String>,

    #[command(flatten)]
    pub engine: EngineArgs,

    /// Print nothing but errors and the final summary.
    #[arg(short, long)]
    pub quiet: bool,
}

impl JobArgs {
    pub fn check(&self) -> Result<()> {
        if self.max_attempts == 0 {
            bail!("--max-attempts must be at least 1");
        }
        if self.max_tokens == 0 {
            bail!("--max-tokens must be at least 1");
        }
        if !(0.0..=2.0).contains(&self.temperature) {
            bail!("--temperature must be between 0 and 2");
        }
        if self.verify_jobs == Some(0) {
            bail!("--verify-jobs must be at least 1");
        }
        if let Some(v) = &self.verify {
            if v.trim().is_empty() {
                bail!("--verify is empty");
            }
        }
        Ok(())
    }

    /// How many verifiers run at once.
    pub fn verify_jobs(&self) -> usize {
        self.verify_jobs
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(4)))
    }

    pub fn verify_timeout(&self) -> Duration {
        Duration::from_secs(self.verify_timeout.max(1))
    }

    /// The local engine or the coordinator, and the model's identity for cache keys.
    pub fn runner(&self, cache_dir: PathBuf) -> Result<Runner> {
        if !self.quiet {
            if self.no_cache {
                eprintln!("answer cache: off (--no-cache)");
            } else {
                eprintln!("answer cache: {}", cache_dir.display());
            }
        }
        let cache = (!self.no_cache).then(|| Cache::new(cache_dir));
        let (backend, identity) = match &self.url {
            Some(url) => {
                let conn = Connection {
                    url: url.clone(),
                    api_key: self.api_key.clone(),
                };
                let id = self
                    .model_id
                    .clone()
                    .unwrap_or_else(|| format!("coordinator {}", url.trim_end_matches('/')));
                (Backend::Remote(conn), id)
            }
            None => {
                let opts = self.engine.options()?;
                let path = gristmill::hub::resolve_model(&self.engine.model)?;
                let name = if path.is_dir() {
                    path.file_name()
                } else {
                    path.file_stem()
                }
                .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
                let identity = format!(
                    "{name} sha256-sampled:{} precision={} kv={} tp={}",
                    fingerprint(&path)?,
                    self.engine.precision,
                    self.engine.backend().kv_value_name(),
                    self.engine.tensor_parallel_size
                );
                // Loaded at the first request the cache cannot answer: a re-run that changes
                // nothing does not wait for a large model to load.
                (
                    Backend::Local {
                        args: Box::new(self.engine.clone()),
                        opts,
                        engine: None,
                    },
                    identity,
                )
            }
        };
        Ok(Runner {
            backend,
            cache,
            identity,
            quiet: self.quiet,
        })
    }
}

/// A fingerprint of a model's files: for each (a GGUF file, or an HF directory's config,
/// tokenizer and safetensors), its name, its length and a SHA-256 of its bytes — all of them up
/// to 256 MiB, the first and last 32 MiB of larger ones (hashing 100 GB of weights on every run
/// would take minutes; a change in a checkpoint's size or ends is what changes do).
pub fn fingerprint(path: &Path) -> Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut files: Vec<PathBuf> = if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let n = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                n.ends_with(".safetensors") || n.ends_with(".gguf") || n.ends_with(".json")
            })
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    files.retain(|p| p.is_file());
    const WHOLE: u64 = 256 << 20;
    const END: u64 = 32 << 20;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for f in &files {
        let mut file =
            std::fs::File::open(f).with_context(|| format!("cannot open {}", f.display()))?;
        let len = file.metadata()?.len();
        ctx.update(
            f.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
                .as_bytes(),
        );
        ctx.update(&len.to_le_bytes());
        let mut buf = vec![0u8; 1 << 20];
        let mut feed = |file: &mut std::fs::File, mut n: u64| -> Result<()> {
            while n > 0 {
                let want = n.min(buf.len() as u64) as usize;
                let got = file.read(&mut buf[..want])?;
                if got == 0 {
                    break;
                }
                ctx.update(&buf[..got]);
                n -= got as u64;
            }
            Ok(())
        };
        if len <= WHOLE {
            feed(&mut file, len)?;
        } else {
            feed(&mut file, END)?;
            file.seek(SeekFrom::End(-(END as i64)))?;
            feed(&mut file, END)?;
        }
    }
    Ok(cache::hex(&ctx.finish().as_ref()[..12]))
}

pub enum Backend {
    Local {
        args: Box<EngineArgs>,
        opts: EngineOptions,
        engine: Option<Box<Engine>>,
    },
    Remote(Connection),
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Local { args, .. } => write!(f, "Local({})", args.model.display()),
            Backend::Remote(c) => write!(f, "Remote({})", c.url),
        }
    }
}

/// One request: a chat body without `model` (the same body goes to the local engine and to a
/// coordinator, and keys the cache).
#[derive(Debug, Clone)]
pub struct Ask {
    pub body: Value,
}

/// A model's answer to an [`Ask`], or why there is none.
#[derive(Debug, Clone)]
pub struct Reply {
    pub answer: Result<Entry, String>,
    pub cached: bool,
}

#[derive(Debug)]
pub struct Runner {
    pub backend: Backend,
    pub cache: Option<Cache>,
    /// The model's identity in cache keys.
    pub identity: String,
    quiet: bool,
}

impl Runner {
    /// Answers every ask, in order: from the cache, else from one batch of the rest.
    pub fn ask(&mut self, asks: &[Ask], what: &str) -> Result<Vec<Reply>> {
        let keys: Vec<String> = asks
            .iter()
            .map(|a| cache::key(&self.identity, &a.body))
            .collect();
        let mut replies: Vec<Option<Reply>> = keys
            .iter()
            .map(|k| {
                self.cache.as_ref().and_then(|c| c.get(k)).map(|e| Reply {
                    answer: Ok(e),
                    cached: true,
                })
            })
            .collect();
        let misses: Vec<usize> = (0..asks.len()).filter(|&i| replies[i].is_none()).collect();
        if !self.quiet {
            eprintln!(
                "{what}: {} to send, {} from the cache",
                crate::client::plural(misses.len() as u64, "request"),
                asks.len() - misses.len()
            );
        }
        if !misses.is_empty() {
            let lines: Vec<(String, String)> = misses
                .iter()
                .map(|&i| {
                    let id = format!("req-{i}");
                    let line = json!({
                        "custom_id": id, "method": "POST", "url": "/v1/chat/completions",
                        "body": asks[i].body,
                    });
                    (id, line.to_string())
                })
                .collect();
            let mut got = match &mut self.backend {
                Backend::Local { args, opts, engine } => {
                    let engine = match engine {
                        Some(e) => e,
                        None => {
                            let started = std::time::Instant::now();
                            let e = args.load_engine()?;
                            if !self.quiet {
                                eprintln!("{}", args.describe(&e, started.elapsed().as_secs_f64()));
                            }
                            engine.insert(Box::new(e))
                        }
                    };
                    run_local(engine, *opts, &lines, self.quiet)
                }
                Backend::Remote(conn) => run_remote(conn, &lines)?,
            };
            for &i in &misses {
                let answer = got
                    .remove(&format!("req-{i}"))
                    .unwrap_or_else(|| Err("no result came back for this request".into()));
                if let (Ok(e), Some(c)) = (&answer, &self.cache) {
                    if let Err(err) = c.put(&keys[i], e) {
                        tracing::warn!("cannot write the cache in {}: {err}", c.dir().display());
                    }
                }
                replies[i] = Some(Reply {
                    answer,
                    cached: false,
                });
            }
        }
        // Every index was filled from the cache or from the batch just above.
        Ok(replies.into_iter().flatten().collect())
    }
}

impl Runner {
    /// Sends one attempt's requests (bodies built with `seed`); per request, its attempt record
    /// (tokens, finish reason, whether cached; `outcome` left for the caller unless the request
    /// failed) and the answer's text, or the failure already written into the record.
    pub fn attempt(
        &mut self,
        attempt: usize,
        of: usize,
        seed: u64,
        bodies: Vec<Value>,
    ) -> Result<Vec<(Attempt, Result<String, String>)>> {
        let asks: Vec<Ask> = bodies.into_iter().map(|body| Ask { body }).collect();
        let replies = self.ask(&asks, &format!("attempt {attempt} of {of}"))?;
        Ok(replies
            .into_iter()
            .map(|reply| {
                let mut rec = Attempt {
                    attempt,
                    seed,
                    cached: reply.cached,
                    prompt_tokens: 0,
                    completion_tokens: 0,
                    finish_reason: "error".into(),
                    outcome: String::new(),
                    verify_exit: None,
                };
                let text = match reply.answer {
                    Ok(e) => {
                        rec.prompt_tokens = e.prompt_tokens;
                        rec.completion_tokens = e.completion_tokens;
                        rec.finish_reason = e.finish_reason;
                        Ok(e.text)
                    }
                    Err(message) => {
                        rec.outcome = format!("request failed: {message}");
                        Err(rec.outcome.clone())
                    }
                };
                (rec, text)
            })
            .collect())
    }
}

/// The seed of attempt `attempt` (from 1).
pub fn seed_of(args: &JobArgs, attempt: usize) -> u64 {
    args.seed + attempt as u64 - 1
}

/// `f` over `items` on one thread per worker (a scratch worktree, or nothing), each thread
/// taking the next item when it is free; the results in the items' order.
pub fn parallel<W: Sync, T: Sync, R: Send>(
    workers: &[W],
    items: &[T],
    bar: Option<&ProgressBar>,
    f: impl Fn(&W, &T) -> R + Sync,
) -> Vec<R> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: std::sync::Mutex<Vec<Option<R>>> =
        std::sync::Mutex::new((0..items.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for w in workers.iter().take(items.len().max(1)) {
            let (next, results, f) = (&next, &results, &f);
            scope.spawn(move || loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(item) = items.get(i) else {
                    break;
                };
                let r = f(w, item);
                // A poisoned lock means another verifier thread panicked; its panic is
                // re-raised when the scope ends.
                if let Ok(mut slots) = results.lock() {
                    slots[i] = Some(r);
                }
                if let Some(b) = bar {
                    b.inc(1);
                }
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        // Every index below items.len() was taken by one thread and filled.
        .flatten()
        .collect()
}

/// A bar (on a terminal) counting requests as they finish.
pub fn bar(len: usize, unit: &str, quiet: bool) -> Option<ProgressBar> {
    (!quiet && std::io::stderr().is_terminal()).then(|| {
        let b = ProgressBar::new(len as u64);
        b.set_style(
            ProgressStyle::with_template(&format!(
                "{{elapsed_precise}} [{{bar:40}}] {{pos}}/{{len}} {unit} | {{msg}}"
            ))
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b.enable_steady_tick(Duration::from_millis(500));
        b
    })
}

type Answers = HashMap<String, Result<Entry, String>>;

fn run_local(
    engine: &Engine,
    opts: EngineOptions,
    lines: &[(String, String)],
    quiet: bool,
) -> Answers {
    let mut out = Answers::new();
    let mut validator = LineValidator::new();
    let mut requests = Vec::with_capacity(lines.len());
    for (n, (id, line)) in lines.iter().enumerate() {
        match validator.validate(n + 1, line) {
            Ok(r) => requests.push(r),
            Err(bad) => {
                out.insert(id.clone(), Err(bad.error.message));
            }
        }
    }
    let bar = bar(requests.len(), "requests", quiet);
    let started = std::time::Instant::now();
    let mut tokens = 0u64;
    engine.run(requests, opts, |o| {
        match o {
            Outcome::Done(c) => {
                let text = c
                    .choices
                    .first()
                    .map(|ch| ch.text.clone())
                    .unwrap_or_default();
                let finish = c
                    .choices
                    .first()
                    .map_or("stop", |ch| match ch.finish_reason {
                        gristmill_protocol::FinishReason::Stop => "stop",
                        gristmill_protocol::FinishReason::Length => "length",
                    })
                    .to_string();
                tokens += c.usage.completion_tokens as u64;
                out.insert(
                    c.custom_id,
                    Ok(Entry {
                        text,
                        finish_reason: finish,
                        prompt_tokens: c.usage.prompt_tokens as u64,
                        completion_tokens: c.usage.completion_tokens as u64,
                    }),
                );
            }
            Outcome::Failed {
                custom_id, error, ..
            } => {
                out.insert(custom_id, Err(error.message));
            }
        }
        if let Some(b) = &bar {
            b.inc(1);
            let rate = tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
            b.set_message(format!("{tokens} tokens generated, {rate:.0} tok/s"));
        }
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    out
}

fn run_remote(conn: &Connection, lines: &[(String, String)]) -> Result<Answers> {
    let data: String = lines.iter().map(|(_, l)| format!("{l}\n")).collect();
    let (batch, results) = crate::client::run_batch(
        conn,
        "gristmill-job.jsonl",
        data.as_bytes(),
        "/v1/chat/completions",
    )?;
    let status = batch["status"].as_str().unwrap_or("?");
    if status != "completed" {
        bail!(
            "batch {} ended {status}",
            batch["id"].as_str().unwrap_or("?")
        );
    }
    let mut out = Answers::new();
    for v in results {
        let Some(id) = v["custom_id"].as_str() else {
            continue;
        };
        let body = &v["response"]["body"];
        let choice = &body["choices"][0];
        let answer = match choice["message"]["content"].as_str() {
            Some(text) if v["error"].is_null() => Ok(Entry {
                text: text.to_string(),
                finish_reason: choice["finish_reason"]
                    .as_str()
                    .unwrap_or("stop")
                    .to_string(),
                prompt_tokens: body["usage"]["prompt_tokens"].as_u64().unwrap_or(0),
                completion_tokens: body["usage"]["completion_tokens"].as_u64().unwrap_or(0),
            }),
            _ => Err(v["error"]["message"]
                .as_str()
                .or_else(|| body["error"]["message"].as_str())
                .unwrap_or("the request failed without a message")
                .to_string()),
        };
        out.insert(id.to_string(), answer);
    }
    Ok(out)
}

/// Writes the JSON report and the HTML page beside it.
pub fn write_report(report: &gristmill_workflows::report::Report, path: &Path) -> Result<PathBuf> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(path, report.to_json() + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    let html = path.with_extension("html");
    std::fs::write(&html, report.to_html())
        .with_context(|| format!("cannot write {}", html.display()))?;
    Ok(html)
}

/// Records the shared settings of a run in its report.
pub fn record_settings(args: &JobArgs, settings: &mut serde_json::Map<String, Value>) {
    settings.insert("verify".into(), json!(args.verify));
    settings.insert("max_attempts".into(), args.max_attempts.into());
    settings.insert("temperature".into(), args.temperature.into());
    settings.insert("seed".into(), args.seed.into());
}

/// The last line a run prints: its counts, requests and tokens, then `tail`.
pub fn summary_line(
    command: &str,
    noun: &str,
    applied: &str,
    s: &gristmill_workflows::report::Summary,
    tail: &str,
) -> String {
    use crate::client::plural;
    format!(
        "{command}: {}: {} {applied}, {} unchanged, {} failed; {} sent, {} from the cache; {} prompt + {} generated tokens; {tail}",
        plural(s.total as u64, noun),
        s.applied,
        s.no_change,
        s.failed,
        plural(s.requests_sent as u64, "request"),
        s.cache_hits,
        s.prompt_tokens,
        s.completion_tokens,
    )
}

/// The usual request body of a job: chat messages, sampling, a constraint.
pub fn body(
    messages: &[Value],
    args: &JobArgs,
    seed: u64,
    max_tokens: usize,
    constraint: Value,
) -> Value {
    let mut b = json!({
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": args.temperature,
        "seed": seed,
    });
    if let (Some(obj), Some(c)) = (b.as_object_mut(), constraint.as_object()) {
        for (k, v) in c {
            obj.insert(k.clone(), v.clone());
        }
    }
    b
}

#[cfg(test)]
mod tests {
    #[test]
    fn parallel_work_comes_back_in_order_from_every_worker() {
        let workers = [10, 20, 30];
        let items: Vec<u64> = (0..50).collect();
        let used = std::sync::Mutex::new(std::collections::HashSet::new());
        let out = super::parallel(&workers, &items, None, |w, &x| {
            used.lock().expect("lock").insert(*w);
            std::thread::sleep(std::time::Duration::from_millis(2));
            x * 2
        });
        assert_eq!(out, items.iter().map(|x| x * 2).collect::<Vec<_>>());
        assert!(
            used.lock().expect("lock").len() > 1,
            "more than one worker took items"
        );
        assert!(super::parallel(&workers, &[] as &[u64], None, |_, &x| x).is_empty());
    }
}
