//! The dashboard in a real browser: headless Chromium (Debian's package, installed by
//! `scripts/fetch-browser.sh`, which `make test` runs) driven over the DevTools protocol on a
//! pipe (`--remote-debugging-pipe`: no port, no websocket crate), against a real coordinator,
//! NATS and echo workers. Screenshots land in `target/dashboard/` for a person to look at.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{chat_line, send, Cluster};
use serde_json::{json, Value};

/// A headless Chromium and one page in it, driven over the DevTools protocol.
struct Browser {
    child: Child,
    to: std::fs::File,
    responses: mpsc::Receiver<Value>,
    /// Uncaught exceptions and console errors of the page.
    errors: Arc<Mutex<Vec<String>>>,
    next: u64,
    session: String,
    _profile: tempfile::TempDir,
}

fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("GRISTMILL_CHROMIUM") {
        return PathBuf::from(p);
    }
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "no headless browser: this test needs Chromium (`chromium` on PATH, or GRISTMILL_CHROMIUM); \
         scripts/fetch-browser.sh installs Debian's package (make test runs it)"
    );
}

/// A pipe whose ends are closed on exec (the child gets its copies through dup2).
fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

impl Browser {
    fn launch(width: u32, height: u32) -> Self {
        let profile = tempfile::tempdir().expect("profile dir");
        // Chromium reads commands from fd 3 and writes answers to fd 4, NUL-separated.
        let (cmd_read, cmd_write) = pipe();
        let (out_read, out_write) = pipe();
        let mut cmd = Command::new(chromium());
        cmd.args([
            "--headless=new",
            "--remote-debugging-pipe",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--mute-audio",
            &format!("--window-size={width},{height}"),
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()));
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            // Chromium refuses to run as root inside its sandbox.
            cmd.arg("--no-sandbox");
        }
        cmd.arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let (r, w) = (
            std::os::fd::AsRawFd::as_raw_fd(&cmd_read),
            std::os::fd::AsRawFd::as_raw_fd(&out_write),
        );
        // SAFETY: only async-signal-safe calls (dup2) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(r, 3) < 0 || libc::dup2(w, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("chromium starts");
        drop((cmd_read, out_write));
        let (tx, responses) = mpsc::channel();
        let errors = Arc::new(Mutex::new(Vec::new()));
        {
            let errors = errors.clone();
            let mut reader = BufReader::new(std::fs::File::from(out_read));
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                while reader.read_until(0, &mut buf).is_ok_and(|n| n > 0) {
                    if buf.last() == Some(&0) {
                        buf.pop();
                    }
                    if let Ok(v) = serde_json::from_slice::<Value>(&buf) {
                        match v["method"].as_str() {
                            Some("Runtime.exceptionThrown") => errors
                                .lock()
                                .expect("errors")
                                .push(v["params"]["exceptionDetails"].to_string()),
                            Some("Runtime.consoleAPICalled") if v["params"]["type"] == "error" => {
                                errors
                                    .lock()
                                    .expect("errors")
                                    .push(v["params"]["args"].to_string())
                            }
                            _ if v.get("id").is_some() => {
                                let _ = tx.send(v);
                            }
                            _ => {}
                        }
                    }
                    buf.clear();
                }
            });
        }
        let mut b = Browser {
            child,
            to: std::fs::File::from(cmd_write),
            responses,
            errors,
            next: 0,
            session: String::new(),
            _profile: profile,
        };
        let target = b.call("Target.createTarget", json!({"url": "about:blank"}));
        let attached = b.call(
            "Target.attachToTarget",
            json!({"targetId": target["targetId"], "flatten": true}),
        );
        b.session = attached["sessionId"]
            .as_str()
            .expect("a session id")
            .to_string();
        b.call("Runtime.enable", json!({}));
        b.call("Page.enable", json!({}));
        b.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        );
        b
    }

    /// Sends a command (to the page once attached) and waits for its answer.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        let mut bytes = serde_json::to_vec(&msg).expect("json");
        bytes.push(0);
        self.to.write_all(&bytes).expect("write to chromium");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self
                .responses
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("no answer from chromium to {method}: {e}"));
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {}", v["error"]);
                return v["result"].clone();
            }
        }
    }

    /// Loads `url` and waits until its document (and its deferred script) has loaded.
    fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url}));
        let want = serde_json::to_string(url).expect("json");
        self.wait(
            "the page to load",
            Duration::from_secs(30),
            &format!("location.href === {want} && document.readyState === 'complete'"),
        );
    }

    /// Evaluates `js`; `Err` with the exception when it throws.
    fn try_eval(&mut self, js: &str) -> Result<Value, Value> {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": js, "returnByValue": true, "awaitPromise": true}),
        );
        match r.get("exceptionDetails") {
            Some(e) => Err(e.clone()),
            None => Ok(r["result"]["value"].clone()),
        }
    }

    /// Evaluates `js` in the page and returns its value (promises awaited).
    fn eval(&mut self, js: &str) -> Value {
        self.try_eval(js).unwrap_or_else(|e| panic!("{js}: {e}"))
    }

    /// Waits until `js` evaluates to something other than null, false or undefined (an
    /// exception, say from an element not there yet, counts as not yet).
    fn wait(&mut self, what: &str, timeout: Duration, js: &str) -> Value {
        let start = Instant::now();
        loop {
            let last = match self.try_eval(js) {
                Ok(v) if !(v.is_null() || v == json!(false)) => return v,
                Ok(v) => v,
                Err(e) => e,
            };
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what} ({js}), last {last}; page errors: {:?}",
                self.errors.lock().expect("errors")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Clicks the element `selector` as a user would (a trusted mouse click at its centre).
    fn click(&mut self, selector: &str) {
        let sel = serde_json::to_string(selector).expect("json");
        let at = self.eval(&format!(
            "(() => {{ const e = document.querySelector({sel}); if (!e) return null; \
             e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); \
             if (!r.width || !r.height) return null; \
             return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
        ));
        let (x, y) = (at[0].as_f64(), at[1].as_f64());
        let (Some(x), Some(y)) = (x, y) else {
            panic!("nothing visible to click at {selector}");
        };
        for kind in ["mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}),
            );
        }
    }

    /// Types `text` into the focused element.
    fn type_text(&mut self, text: &str) {
        self.call("Input.insertText", json!({"text": text}));
    }

    fn screenshot(&mut self, path: &Path) {
        let r = self.call(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true}),
        );
        let png = base64_decode(r["data"].as_str().expect("screenshot data"));
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::write(path, png).expect("write screenshot");
        eprintln!("screenshot: {}", path.display());
    }

    fn page_errors(&self) -> Vec<String> {
        self.errors.lock().expect("errors").clone()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let bytes: Vec<u8> = s.bytes().filter(|b| *b != b'=' && *b != b'\n').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= value(*c) << (18 - 6 * i);
        }
        let take = chunk.len() - 1;
        out.extend_from_slice(&n.to_be_bytes()[1..1 + take]);
    }
    out
}

fn shots() -> PathBuf {
    // CARGO_TARGET_TMPDIR is target/tmp; the screenshots go beside it.
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("dashboard");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    dir
}

/// A batch's row on the overview, as the page shows it: its data attributes and visible text.
const ROW_JS: &str = "((id) => { const r = document.querySelector(`tr[data-batch-id=\"${id}\"]`); \
    if (!r) return null; return {status: r.dataset.status, total: +r.dataset.total, \
    completed: +r.dataset.completed, failed: +r.dataset.failed, \
    shown: r.querySelector('.counts').textContent, \
    bar: +r.querySelector('[role=progressbar]').getAttribute('aria-valuenow')}; })";

fn counts(b: &Value) -> (u64, u64, u64) {
    let c = &b["request_counts"];
    (
        c["completed"].as_u64().unwrap_or(0),
        c["failed"].as_u64().unwrap_or(0),
        c["total"].as_u64().unwrap_or(0),
    )
}

fn number(text: &str) -> u64 {
    text.chars()
        .filter(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .unwrap_or(u64::MAX)
}

const FULL_KEY: &str = "dashboard-full-key-0123456789";
const VIEWER_KEY: &str = "dashboard-viewer-key-0123456789";
const LINES: usize = 20_000;

#[test]
fn the_dashboard_follows_a_20000_line_batch_in_a_real_browser() {
    let keys = tempfile::NamedTempFile::new().expect("keys file");
    std::fs::write(
        keys.path(),
        format!("ops {FULL_KEY}\nops {VIEWER_KEY} read-only\n"),
    )
    .expect("write keys");
    let keys_path = keys.path().display().to_string();
    let mut c = Cluster::start(&[
        "--api-keys",
        &keys_path,
        "--ack-wait",
        "3",
        "--shard-max-lines",
        "200",
        "--autoscale-dry-run",
        "--autoscale-interval",
        "2",
    ]);
    c.api_key = Some(FULL_KEY.to_string());
    for name in ["echo-a", "echo-b"] {
        c.start_worker(
            &[
                "--engine",
                "echo",
                "--echo-delay-ms",
                "2",
                "--max-inflight-shards",
                "2",
                "--name",
                name,
            ],
            &[],
        );
    }
    let lines: Vec<String> = (0..LINES)
        .map(|i| {
            chat_line(
                &format!("req-{i}"),
                &format!("echo line {i} of the dashboard test"),
                16,
                i as u64,
            )
        })
        .collect();
    let id = c.create_batch(&lines, "24h");
    let dir = shots();
    let mut b = Browser::launch(1440, 900);

    // The key is asked for once, typed into the form.
    b.navigate(&format!("{}/", c.url));
    b.wait(
        "the key form",
        Duration::from_secs(30),
        "!document.getElementById('login').hidden",
    );
    b.eval("document.getElementById('key').focus()");
    b.type_text(FULL_KEY);
    b.click("#key-form button[type=submit]");
    let row_js = format!("{ROW_JS}({})", json!(id));

    // Mid-batch, the page's numbers lie between the API's just before and just after.
    let first = b.wait(
        "the batch running on the page",
        Duration::from_secs(120),
        &format!("(() => {{ const r = {row_js}; return r && r.completed > 0 && r.completed < r.total ? r : null; }})()"),
    );
    // Two page updates after the API's first answer, the page's last fetch began after it.
    let before = counts(&c.batch(&id));
    for _ in 0..2 {
        let u = b.eval("document.body.dataset.updated || ''");
        b.wait(
            "a page update",
            Duration::from_secs(10),
            &format!("(document.body.dataset.updated || '') !== {u}"),
        );
    }
    let seen = b.eval(&row_js);
    let after = counts(&c.batch(&id));
    let page = (
        seen["completed"].as_u64().unwrap_or(0),
        seen["failed"].as_u64().unwrap_or(0),
        seen["total"].as_u64().unwrap_or(0),
    );
    assert_eq!(page.2, LINES as u64, "{seen}");
    assert!(
        before.0 + before.1 <= page.0 + page.1 && page.0 + page.1 <= after.0 + after.1,
        "page {page:?}, API before {before:?}, after {after:?}"
    );
    // The text shown is the same count.
    let shown = seen["shown"].as_str().unwrap_or("");
    let (done_text, total_text) = shown.split_once('/').unwrap_or((shown, ""));
    assert_eq!(
        (number(done_text), number(total_text)),
        (page.0 + page.1, page.2),
        "{seen}"
    );
    assert_eq!(seen["bar"].as_u64(), Some(page.0 + page.1), "{seen}");
    // The bar advances without a reload.
    let first_done = first["completed"].as_u64().unwrap_or(0);
    b.wait(
        "the progress bar to advance",
        Duration::from_secs(30),
        &format!("(() => {{ const r = {row_js}; return r && r.bar > {first_done}; }})()"),
    );
    b.screenshot(&dir.join("overview-running.png"));

    // One batch's page; a worker is killed and its shards come back on the other.
    b.eval(&format!("location.hash = '#/batch/{id}'"));
    b.wait(
        "the batch page",
        Duration::from_secs(30),
        "document.getElementById('batch-counts') && !document.getElementById('batch').hidden",
    );
    let running = b.wait(
        "a shard running on echo-a",
        Duration::from_secs(60),
        "[...document.querySelectorAll('#shards tr[data-status=running]')].some(r => r.textContent.includes('echo-a')) || null",
    );
    assert_eq!(running, json!(true));
    let (done, _, total) = counts(&c.batch(&id));
    assert!(
        done < total,
        "the batch finished before the kill; the test proves nothing"
    );
    c.workers[0].kill9();
    let redelivered = b.wait(
        "a redelivered shard on the page",
        Duration::from_secs(90),
        "(() => { const r = document.querySelector('#shards tr[data-deliveries]:not([data-deliveries=\"0\"]):not([data-deliveries=\"1\"])'); \
         return r ? {shard: +r.dataset.shard, deliveries: +r.dataset.deliveries, status: r.dataset.status, text: r.textContent} : null; })()",
    );
    assert!(
        redelivered["deliveries"].as_u64() >= Some(2),
        "{redelivered}"
    );
    b.screenshot(&dir.join("batch-redelivered.png"));
    let api = c.get(&format!("/v1/dashboard/batches/{id}"));
    assert!(
        api["shard_counts"]["redelivered"].as_u64() >= Some(1),
        "{}",
        api["shard_counts"]
    );
    assert!(api["history"].as_array().is_some_and(|h| h.len() >= 2));
    // What Grafana reads: the same facts on /metrics.
    let metrics = ureq::get(&format!("{}/metrics", c.url))
        .call()
        .expect("metrics")
        .into_string()
        .expect("text");
    let value = |prefix: &str| -> Option<f64> {
        metrics
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    assert!(
        value("gristmill_shard_redeliveries_total ") >= Some(1.0),
        "{metrics}"
    );
    assert!(
        value("gristmill_worker_completion_tokens_per_second{worker=\"echo-b\"} ") > Some(0.0),
        "{metrics}"
    );
    assert!(
        value(&format!(
            "gristmill_batch_deadline_seconds{{batch=\"{id}\"}} "
        )) > Some(0.0),
        "{metrics}"
    );
    assert!(
        value("gristmill_autoscale_current_replicas ").is_some(),
        "{metrics}"
    );
    assert!(
        metrics.contains("gristmill_http_request_duration_seconds_count{method=\"GET\",route=\"/v1/dashboard/batches/{id}\",code=\"2xx\"}"),
        "{metrics}"
    );

    // At the end, the overview's counts are the API's.
    b.eval("location.hash = '#/'");
    let end = b.wait(
        "the batch to complete on the page",
        Duration::from_secs(240),
        &format!(
            "(() => {{ const r = {row_js}; return r && r.status === 'completed' ? r : null; }})()"
        ),
    );
    let api = c.batch(&id);
    assert_eq!(api["status"], "completed", "{api}");
    assert_eq!(
        (
            end["completed"].as_u64(),
            end["failed"].as_u64(),
            end["total"].as_u64()
        ),
        (Some(LINES as u64), Some(0), Some(LINES as u64)),
        "{end}"
    );
    assert_eq!(counts(&api), (LINES as u64, 0, LINES as u64));
    let workers = b.eval(
        "[...document.querySelectorAll('#workers tr[data-worker]')].map(r => r.dataset.worker)",
    );
    assert!(
        workers
            .as_array()
            .is_some_and(|w| w.contains(&json!("echo-b"))),
        "{workers}"
    );
    let why = b.eval("document.getElementById('autoscale').textContent");
    assert!(
        why.as_str().is_some_and(|t| t.contains("Desired replicas")),
        "{why}"
    );
    b.screenshot(&dir.join("overview-completed.png"));

    // Cancel, confirmed in the dialog, with no worker left to run the batch.
    c.workers[1].kill9();
    let small: Vec<String> = (0..50)
        .map(|i| chat_line(&format!("c-{i}"), "never run", 8, 0))
        .collect();
    let doomed = c.create_batch(&small, "24h");
    c.wait_batch(&doomed, Duration::from_secs(60), "in progress", |v| {
        v["status"] == "in_progress"
    });
    b.eval(&format!("location.hash = '#/batch/{doomed}'"));
    let cancel = format!("#batch-counts button[data-cancel=\"{doomed}\"]");
    b.wait(
        "the cancel button",
        Duration::from_secs(30),
        &format!("document.querySelector({})", json!(cancel)),
    );
    b.click(&cancel);
    b.wait(
        "the confirmation dialog",
        Duration::from_secs(10),
        "document.getElementById('confirm').open",
    );
    b.screenshot(&dir.join("cancel-confirm.png"));
    b.click("#confirm-yes");
    c.wait_batch(&doomed, Duration::from_secs(60), "cancelled", |v| {
        v["status"] == "cancelled"
    });
    b.wait(
        "the page to show it cancelled",
        Duration::from_secs(30),
        "document.getElementById('batch-counts')?.dataset.status === 'cancelled'",
    );

    // A read-only key sees the batches without cancel buttons, and the API refuses it.
    let watched = c.create_batch(&small, "24h");
    c.wait_batch(&watched, Duration::from_secs(60), "in progress", |v| {
        v["status"] == "in_progress"
    });
    b.eval("location.hash = '#/'");
    b.click("#forget");
    b.wait(
        "the key form again",
        Duration::from_secs(10),
        "!document.getElementById('login').hidden",
    );
    b.eval("document.getElementById('key').focus()");
    b.type_text(VIEWER_KEY);
    b.click("#key-form button[type=submit]");
    b.wait(
        "the read-only overview",
        Duration::from_secs(30),
        &format!("document.getElementById('coordinator').textContent.includes('read-only') && document.querySelector('tr[data-batch-id=\"{watched}\"]')"),
    );
    assert_eq!(
        b.eval("document.querySelectorAll('button[data-cancel]').length"),
        json!(0)
    );
    let r = ureq::post(&format!("{}/v1/batches/{watched}/cancel", c.url))
        .set("Authorization", &format!("Bearer {VIEWER_KEY}"));
    let (status, body) = send(r, None);
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "read_only_key", "{body}");
    b.screenshot(&dir.join("overview-read-only.png"));

    // A wrong key is refused on the page with the API's message.
    b.click("#forget");
    b.eval("document.getElementById('key').focus()");
    b.type_text("not-a-key-at-all-0000");
    b.click("#key-form button[type=submit]");
    let msg = b.wait(
        "the refusal",
        Duration::from_secs(10),
        "document.getElementById('login-error').textContent || null",
    );
    assert!(
        msg.as_str()
            .is_some_and(|m| m.contains("Incorrect API key")),
        "{msg}"
    );

    let errors = b.page_errors();
    assert!(errors.is_empty(), "the page logged errors: {errors:?}");
}
