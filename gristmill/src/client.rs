//! `gristmill submit`, `status` and `cancel`: the client side of the coordinator's HTTP API
//! (the same endpoints the OpenAI SDKs call).

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

/// How long a request is retried while the coordinators fail over.
const RETRY_FOR: Duration = Duration::from_secs(60);
const FIRST_PAUSE: Duration = Duration::from_millis(250);

#[derive(Debug, Args)]
pub struct Connection {
    /// Base URL of the coordinator.
    #[arg(long, default_value = "http://127.0.0.1:8000", env = "GRISTMILL_URL")]
    pub url: String,

    /// API key, sent as `Authorization: Bearer KEY`.
    #[arg(long, env = "GRISTMILL_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

impl Connection {
    pub(crate) fn request(&self, method: &str, path: &str) -> ureq::Request {
        let url = format!("{}{path}", self.url.trim_end_matches('/'));
        let r = ureq::request(method, &url).timeout(Duration::from_secs(300));
        match &self.api_key {
            Some(k) if !k.is_empty() => r.set("Authorization", &format!("Bearer {k}")),
            _ => r,
        }
    }

    /// Sends a request. While coordinators fail over (a standby without a leader answers 503
    /// `no_leader`; a restarting coordinator refuses connections) it tries again for up to a
    /// minute: any request the coordinator says went nowhere, and reads (GET) after any 503 or
    /// connection error.
    pub(crate) fn call(
        &self,
        req: ureq::Request,
        body: Option<(&str, &[u8])>,
    ) -> Result<ureq::Response> {
        let url = req.url().to_string();
        let idempotent = req.method() == "GET";
        let deadline = Instant::now() + RETRY_FOR;
        let mut pause = FIRST_PAUSE;
        loop {
            let attempt = req.clone();
            let result = match body {
                Some((content_type, data)) => {
                    attempt.set("Content-Type", content_type).send_bytes(data)
                }
                None => attempt.call(),
            };
            let (error, retry) = match result {
                Ok(r) => return Ok(r),
                Err(ureq::Error::Status(code, r)) => {
                    let text = r.into_string().unwrap_or_default();
                    let v = serde_json::from_str::<Value>(&text).ok();
                    let went_nowhere =
                        v.as_ref().and_then(|v| v["error"]["code"].as_str()) == Some("no_leader");
                    let message = v
                        .as_ref()
                        .and_then(|v| v["error"]["message"].as_str().map(String::from))
                        .unwrap_or(text);
                    (
                        anyhow!("{url}: HTTP {code}: {message}"),
                        code == 503 && (went_nowhere || idempotent),
                    )
                }
                // ureq's message names the URL.
                Err(e) => (anyhow!("{e}"), idempotent),
            };
            if !retry || Instant::now() + pause > deadline {
                return Err(error);
            }
            if pause == FIRST_PAUSE {
                eprintln!(
                    "{error:#}; trying again for up to {} s",
                    RETRY_FOR.as_secs()
                );
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_secs(4));
        }
    }

    pub(crate) fn json(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let req = self.request(method, path);
        let bytes = body.map(|b| b.to_string().into_bytes());
        let r = self.call(req, bytes.as_deref().map(|b| ("application/json", b)))?;
        let text = r.into_string().context("reading the response")?;
        serde_json::from_str(&text)
            .with_context(|| format!("the coordinator's answer is not JSON: {text}"))
    }

    /// A file's content.
    fn content(&self, file_id: &str) -> Result<Vec<u8>> {
        let r = self.call(
            self.request("GET", &format!("/v1/files/{file_id}/content")),
            None,
        )?;
        let mut data = Vec::new();
        r.into_reader().read_to_end(&mut data)?;
        Ok(data)
    }

    fn download(&self, file_id: &str, to: &Path) -> Result<u64> {
        let data = self.content(file_id)?;
        std::fs::write(to, &data).with_context(|| format!("cannot write {}", to.display()))?;
        Ok(data.len() as u64)
    }
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The batch input: JSONL, one OpenAI batch request per line.
    pub input: PathBuf,

    /// Endpoint of every line [default: the `url` of the file's first line].
    #[arg(long)]
    pub endpoint: Option<String>,

    /// Time the batch may take, e.g. `24h`, `90m`, `3600s`.
    #[arg(long, default_value = "24h")]
    pub completion_window: String,

    /// Metadata as KEY=VALUE (repeatable).
    #[arg(long = "metadata", value_name = "KEY=VALUE")]
    pub metadata: Vec<String>,

    /// Wait for the batch to end, showing progress, then download its output and error files.
    #[arg(long)]
    pub wait: bool,

    /// Where the output file goes with --wait [default: INPUT with `.output.jsonl`].
    #[arg(short, long)]
    pub output: Option<PathBuf>,

    /// Where the error file goes with --wait [default: INPUT with `.errors.jsonl`].
    #[arg(long)]
    pub errors: Option<PathBuf>,

    #[command(flatten)]
    pub conn: Connection,
}

fn sibling(input: &Path, suffix: &str) -> PathBuf {
    let stem = input
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "batch".into());
    input.with_file_name(format!("{stem}{suffix}"))
}

fn multipart(filename: &str, data: &[u8]) -> (String, Vec<u8>) {
    let boundary = format!(
        "gristmill-{:016x}",
        data.len() as u64 ^ 0x5bd1_e995_1234_abcd
    );
    let mut body = Vec::with_capacity(data.len() + 512);
    body.extend(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
        )
        .bytes(),
    );
    body.extend(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{}\"\r\nContent-Type: application/jsonl\r\n\r\n",
            filename.replace('"', "_")
        )
        .bytes(),
    );
    body.extend_from_slice(data);
    body.extend(format!("\r\n--{boundary}--\r\n").bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

pub fn submit(args: SubmitArgs) -> Result<()> {
    let data = std::fs::read(&args.input)
        .with_context(|| format!("cannot read {}", args.input.display()))?;
    let endpoint = match &args.endpoint {
        Some(e) => e.clone(),
        None => data
            .split(|&b| b == b'\n')
            .find(|l| !l.iter().all(u8::is_ascii_whitespace))
            .and_then(|l| serde_json::from_slice::<Value>(l).ok())
            .and_then(|v| v["url"].as_str().map(String::from))
            .ok_or_else(|| {
                anyhow!(
                    "cannot tell the endpoint from the first line of {}: pass --endpoint",
                    args.input.display()
                )
            })?,
    };
    let mut metadata = serde_json::Map::new();
    for kv in &args.metadata {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow!("--metadata {kv:?}: expected KEY=VALUE"))?;
        metadata.insert(k.to_string(), Value::String(v.to_string()));
    }
    let conn = &args.conn;
    let filename = args
        .input
        .file_name()
        .map_or("batch.jsonl".into(), |n| n.to_string_lossy().into_owned());
    let id = create_batch(
        conn,
        &filename,
        &data,
        &endpoint,
        &args.completion_window,
        metadata,
    )?;
    println!("{id}");
    if !args.wait {
        return Ok(());
    }
    let batch = wait(conn, &id)?;
    let status = batch["status"].as_str().unwrap_or("?");
    let counts = &batch["request_counts"];
    eprintln!(
        "batch {id} {status}: {} completed, {} failed of {}",
        counts["completed"], counts["failed"], counts["total"]
    );
    if let Some(errors) = batch["errors"]["data"].as_array() {
        for e in errors {
            let line = e["line"]
                .as_u64()
                .map(|l| format!("line {l}: "))
                .unwrap_or_default();
            eprintln!(
                "  {line}{} ({})",
                e["message"].as_str().unwrap_or(""),
                e["code"].as_str().unwrap_or("")
            );
        }
    }
    let output = args
        .output
        .unwrap_or_else(|| sibling(&args.input, ".output.jsonl"));
    let errors = args
        .errors
        .unwrap_or_else(|| sibling(&args.input, ".errors.jsonl"));
    // As `gristmill run`: an errors file exists only when a line failed (a stale one from an
    // earlier batch at the same path is removed, so it cannot be mistaken for this one's).
    for (key, path) in [("output_file_id", &output), ("error_file_id", &errors)] {
        if let Some(fid) = batch[key].as_str() {
            let n = conn.download(fid, path)?;
            eprintln!("wrote {} ({})", path.display(), plural(n, "byte"));
        } else if key == "error_file_id" && path.exists() {
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove the stale {}", path.display()))?;
        }
    }
    match status {
        "completed" => Ok(()),
        other => bail!("batch {id} ended {other}"),
    }
}

/// Uploads a batch file and creates its batch; the batch's id.
pub(crate) fn create_batch(
    conn: &Connection,
    filename: &str,
    data: &[u8],
    endpoint: &str,
    completion_window: &str,
    metadata: serde_json::Map<String, Value>,
) -> Result<String> {
    let (content_type, body) = multipart(filename, data);
    let file: Value = {
        let r = conn.call(
            conn.request("POST", "/v1/files"),
            Some((&content_type, &body)),
        )?;
        serde_json::from_str(&r.into_string()?)?
    };
    let file_id = file["id"]
        .as_str()
        .ok_or_else(|| anyhow!("no file id in {file}"))?;
    let mut create = serde_json::json!({
        "input_file_id": file_id, "endpoint": endpoint, "completion_window": completion_window,
    });
    if !metadata.is_empty() {
        create["metadata"] = Value::Object(metadata);
    }
    let batch = conn.json("POST", "/v1/batches", Some(&create))?;
    Ok(batch["id"]
        .as_str()
        .ok_or_else(|| anyhow!("no batch id in {batch}"))?
        .to_string())
}

/// Runs a batch file through a coordinator to its end (a progress bar on a terminal); the
/// ended batch with its output and error lines.
pub(crate) fn run_batch(
    conn: &Connection,
    filename: &str,
    data: &[u8],
    endpoint: &str,
) -> Result<(Value, Vec<Value>)> {
    let id = create_batch(conn, filename, data, endpoint, "24h", Default::default())?;
    let batch = wait(conn, &id)?;
    let mut lines = Vec::new();
    for key in ["output_file_id", "error_file_id"] {
        if let Some(fid) = batch[key].as_str() {
            let data = conn.content(fid)?;
            for line in data.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                lines.push(
                    serde_json::from_slice(line)
                        .with_context(|| format!("batch {id}: a result line is not JSON"))?,
                );
            }
        }
    }
    Ok((batch, lines))
}

/// Polls a batch until it ends, with a progress bar on a terminal.
fn wait(conn: &Connection, id: &str) -> Result<Value> {
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{bar:40}] {pos}/{len} requests {prefix} | {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(500));
        bar
    });
    let started = Instant::now();
    let mut last_log = Instant::now();
    let mut samples: std::collections::VecDeque<(Instant, u64)> = Default::default();
    let mut shown = 0u64;
    loop {
        let b = conn.json("GET", &format!("/v1/batches/{id}"), None)?;
        let status = b["status"].as_str().unwrap_or("?").to_string();
        let c = &b["request_counts"];
        let (total, done, failed) = (
            c["total"].as_u64().unwrap_or(0),
            c["completed"].as_u64().unwrap_or(0) + c["failed"].as_u64().unwrap_or(0),
            c["failed"].as_u64().unwrap_or(0),
        );
        // Finished lines' tokens, plus what the workers say the running lines have generated
        // (never shown going backwards: a redelivered shard starts its count again).
        let counted = b["usage"]["output_tokens"].as_u64().unwrap_or(0);
        let running = b["progress"]["running_output_tokens"].as_u64().unwrap_or(0);
        let tokens = shown.max(counted + running);
        shown = tokens;
        samples.push_back((Instant::now(), tokens));
        while samples.len() > 20 {
            samples.pop_front();
        }
        let rate = match (samples.front(), samples.back()) {
            (Some(a), Some(z)) if z.0 > a.0 => {
                z.1.saturating_sub(a.1) as f64 / (z.0 - a.0).as_secs_f64()
            }
            _ => 0.0,
        };
        let msg = format!("{status}, {}, {rate:.1} tok/s", plural(tokens, "token"));
        if let Some(bar) = &bar {
            bar.set_length(total);
            bar.set_position(done);
            if failed > 0 {
                bar.set_prefix(format!("{failed} failed"));
            }
            bar.set_message(msg);
        } else if last_log.elapsed() > Duration::from_secs(5) {
            last_log = Instant::now();
            eprintln!(
                "progress: {done}/{total} requests ({failed} failed), {msg}, {:.0} s",
                started.elapsed().as_secs_f64()
            );
        }
        if matches!(
            status.as_str(),
            "completed" | "failed" | "expired" | "cancelled"
        ) {
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            return Ok(b);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// A batch id; without one, the latest batches are listed.
    pub id: Option<String>,

    /// How many batches to list.
    #[arg(long, default_value_t = 20)]
    pub limit: usize,

    #[command(flatten)]
    pub conn: Connection,
}

pub fn status(args: StatusArgs) -> Result<()> {
    if let Some(id) = &args.id {
        let b = args.conn.json("GET", &format!("/v1/batches/{id}"), None)?;
        println!("{}", serde_json::to_string_pretty(&b)?);
        return Ok(());
    }
    let list = args.conn.json(
        "GET",
        &format!("/v1/batches?limit={}", args.limit.clamp(1, 100)),
        None,
    )?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let rows: Vec<[String; 6]> = list["data"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            let c = &b["request_counts"];
            let n = |k: &str| c[k].as_u64().unwrap_or(0).to_string();
            [
                b["id"].as_str().unwrap_or("").to_string(),
                b["status"].as_str().unwrap_or("").to_string(),
                n("total"),
                n("completed"),
                n("failed"),
                b["created_at"]
                    .as_u64()
                    .map_or_else(String::new, |t| ago(now.saturating_sub(t))),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            ["id", "status", "total", "completed", "failed", "created"],
            &rows
        )
    );
    Ok(())
}

/// A text table: each column as wide as its widest cell, the counts right-aligned under their
/// headers.
fn table(header: [&str; 6], rows: &[[String; 6]]) -> String {
    let mut width: [usize; 6] = header.map(str::len);
    for row in rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let right = |i: usize| (2..=4).contains(&i);
    let line = |cells: [&str; 6]| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let pad = width[i].saturating_sub(cell.chars().count());
            if i > 0 {
                out.push_str("  ");
            }
            if right(i) {
                out.push_str(&" ".repeat(pad));
                out.push_str(cell);
            } else {
                out.push_str(cell);
                // No trailing spaces after the last column.
                if i + 1 < cells.len() {
                    out.push_str(&" ".repeat(pad));
                }
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(header);
    for row in rows {
        out.push_str(&line(row.each_ref().map(String::as_str)));
    }
    out
}

/// How long ago, in the largest unit that fits: `40 s ago`, `3 min ago`, `5 h ago`, `2 days ago`.
fn ago(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs} s ago"),
        60..=3599 => format!("{} min ago", secs / 60),
        3600..=86_399 => format!("{} h ago", secs / 3600),
        _ => format!("{} ago", plural(secs / 86_400, "day")),
    }
}

/// `1 line`, `2 lines`.
pub fn plural(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_table_aligns_counts_under_their_headers() {
        let rows = [
            [
                "batch_abc".to_string(),
                "completed".into(),
                "12".into(),
                "12".into(),
                "0".into(),
                ago(185),
            ],
            [
                "batch_longer_id_0123".to_string(),
                "in_progress".into(),
                "1000000".into(),
                "5".into(),
                "1".into(),
                ago(7200),
            ],
        ];
        let t = table(
            ["id", "status", "total", "completed", "failed", "created"],
            &rows,
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        // Every count column ends at the same character as its header.
        for col in ["total", "completed", "failed"] {
            let end = lines[0].find(col).expect("header") + col.len();
            for (l, want) in lines[1..]
                .iter()
                .zip([["12", "12", "0"], ["1000000", "5", "1"]])
            {
                let i = ["total", "completed", "failed"]
                    .iter()
                    .position(|c| *c == col)
                    .expect("col");
                assert_eq!(&l[end - want[i].len()..end], want[i], "{col} in {l:?}");
                assert_eq!(l.as_bytes().get(end), Some(&b' '), "{col} in {l:?}");
            }
        }
        assert!(
            lines[1].ends_with("3 min ago") && lines[2].ends_with("2 h ago"),
            "{t}"
        );
    }

    #[test]
    fn counts_and_times_read_as_english() {
        assert_eq!(plural(1, "line"), "1 line");
        assert_eq!(plural(0, "token"), "0 tokens");
        assert_eq!(ago(0), "0 s ago");
        assert_eq!(ago(86_400), "1 day ago");
        assert_eq!(ago(3 * 86_400 + 5), "3 days ago");
    }
}

#[derive(Debug, Args)]
pub struct CancelArgs {
    /// The batch to cancel.
    pub id: String,

    #[command(flatten)]
    pub conn: Connection,
}

pub fn cancel(args: CancelArgs) -> Result<()> {
    let b = args
        .conn
        .json("POST", &format!("/v1/batches/{}/cancel", args.id), None)?;
    println!(
        "{} {}",
        b["id"].as_str().unwrap_or(""),
        b["status"].as_str().unwrap_or("")
    );
    Ok(())
}
