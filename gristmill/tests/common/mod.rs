//! A real cluster on loopback for tests: one `nats-server` per test (its own port and store
//! folder), coordinators started in-process through the same code as `gristmill coordinator`
//! (or as processes of the real binary where a test signals them), worker processes of the real
//! binary, HTTP with ureq.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use gristmill_testkit::default_model;
use serde_json::{json, Value};

pub fn tools_bin(name: &str) -> PathBuf {
    let cache = std::env::var_os("GRISTMILL_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/gristmill")
        });
    let p = cache.join("tools-venv/bin").join(name);
    assert!(
        p.exists(),
        "{} is missing: run `make test` or scripts/fetch-tools.sh first",
        p.display()
    );
    p
}

/// A child process killed (SIGKILL) when dropped.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    /// Sends a signal by name (`TERM`, `STOP`, `CONT`).
    pub fn signal(&self, name: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status();
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s;
            }
            assert!(
                start.elapsed() < timeout,
                "process did not exit within {timeout:?}; its log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A coordinator running in this test process, on its own runtime, with its logs kept.
pub struct InProcess {
    runtime: Option<tokio::runtime::Runtime>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// `Some` once the coordinator returned: its error, if any.
    exited: std::sync::Arc<std::sync::Mutex<Option<Result<(), String>>>>,
    log: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

/// A log buffer for tracing's fmt layer.
#[derive(Clone)]
struct LogBuffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl InProcess {
    /// Starts `gristmill coordinator ARGS` in this process on 127.0.0.1, an unused port;
    /// returns it with its URL.
    pub fn start(args: Vec<String>) -> (Self, String) {
        use std::sync::{Arc, Mutex};
        let cli = gristmill::cluster::CoordinatorArgs::try_parse_args(&args)
            .unwrap_or_else(|e| panic!("coordinator flags {args:?}: {e}"));
        let settings = cli
            .settings()
            .unwrap_or_else(|e| panic!("coordinator flags {args:?}: {e:#}"));
        let log = Arc::new(Mutex::new(Vec::new()));
        let writer = LogBuffer(log.clone());
        let dispatch: tracing::Dispatch = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info,async_nats=warn"))
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish()
            .into();
        let on_start = dispatch.clone();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            // Every thread of this runtime logs into this coordinator's buffer, for good
            // (the guard is leaked: the thread ends with the runtime).
            .on_thread_start(move || {
                std::mem::forget(tracing::dispatcher::set_default(&on_start));
            })
            .build()
            .expect("a runtime for the coordinator");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("a loopback port");
        let url = format!("http://{}", listener.local_addr().expect("bound address"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let exited = Arc::new(Mutex::new(None));
        let done = exited.clone();
        runtime.spawn(async move {
            let r = gristmill::cluster::serve_coordinator(cli, settings, listener, async {
                let _ = stopped.await;
            })
            .await;
            if let Err(e) = &r {
                tracing::error!("coordinator stopped: {e:#}");
            }
            *done.lock().unwrap_or_else(|p| p.into_inner()) = Some(r.map_err(|e| format!("{e:#}")));
        });
        let node = InProcess {
            runtime: Some(runtime),
            stop: Some(stop),
            exited,
            log,
        };
        (node, url)
    }

    /// Stops it as a crash would: every task dropped at once, the lease left to expire.
    pub fn crash(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }

    /// Asks it to stop cleanly (as SIGTERM does): it hands the lease over and drains.
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&self.log.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.crash();
    }
}

/// A coordinator: in this process, or a process of the binary (for tests that signal it).
pub enum Node {
    InProcess(InProcess),
    Process(Proc),
}

impl From<Proc> for Node {
    fn from(p: Proc) -> Self {
        Node::Process(p)
    }
}

impl Node {
    /// Stops it at once, without a clean shutdown.
    pub fn kill9(&mut self) {
        match self {
            Node::InProcess(n) => n.crash(),
            Node::Process(p) => p.kill9(),
        }
    }

    /// A clean shutdown.
    pub fn sigterm(&mut self) {
        match self {
            Node::InProcess(n) => n.stop(),
            Node::Process(p) => p.sigterm(),
        }
    }

    /// The process, for signals and exit codes; panics for an in-process coordinator.
    pub fn process(&mut self) -> &mut Proc {
        match self {
            Node::Process(p) => p,
            Node::InProcess(_) => {
                panic!("this test signals its coordinator: start it with Cluster::start_processes")
            }
        }
    }

    pub fn log_text(&self) -> String {
        match self {
            Node::InProcess(n) => n.log_text(),
            Node::Process(p) => p.log_text(),
        }
    }
}

/// TLS certificates (a CA, the server's, one client certificate) and per-role users for a
/// nats-server that requires both, made fresh for each test.
pub struct NatsSecurity {
    pub config: PathBuf,
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub coordinator_password: String,
    pub worker_password: String,
}

/// What a worker may do on NATS, as the shipped k8s/base/nats.yaml says it (so the tests
/// exercise the policy that deploys): take shards, read batch records, publish results (and
/// read one back). Nothing else: no shard publishing, no file store.
fn worker_permissions() -> String {
    let yaml = include_str!("../../../k8s/base/nats.yaml");
    let start = yaml
        .find("permissions: {")
        .expect("k8s/base/nats.yaml has the worker's permissions")
        + "permissions: ".len();
    let mut depth = 0;
    for (i, ch) in yaml[start..].char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return yaml[start..=start + i].to_string();
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced braces in k8s/base/nats.yaml's worker permissions");
}

impl NatsSecurity {
    pub fn new(dir: &Path) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let write = |name: &str, text: String| {
            let p = dir.join(name);
            std::fs::write(&p, text).expect("write a certificate");
            p
        };
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let signed = |names: Vec<String>| {
            let key = KeyPair::generate().expect("key");
            let cert = CertificateParams::new(names)
                .expect("params")
                .signed_by(&key, &ca_cert, &ca_key)
                .expect("certificate");
            (cert.pem(), key.serialize_pem())
        };
        let ca = write("ca.pem", ca_cert.pem());
        let (server_pem, server_key) = signed(vec!["127.0.0.1".into(), "localhost".into()]);
        let server_cert = write("server.pem", server_pem);
        let server_key = write("server-key.pem", server_key);
        let (client_pem, client_key) = signed(vec!["gristmill-client".into()]);
        let client_cert = write("client.pem", client_pem);
        let client_key = write("client-key.pem", client_key);
        let coordinator_password = format!("c-{}", std::process::id());
        let worker_password = format!("w-{}", std::process::id());
        let config = write(
            "nats.conf",
            format!(
                r#"
tls {{
  cert_file: "{}"
  key_file: "{}"
  ca_file: "{}"
  verify: true
}}
authorization {{
  users = [
    {{ user: coordinator, password: "{coordinator_password}" }}
    {{ user: worker, password: "{worker_password}", permissions: {} }}
  ]
}}
"#,
                server_cert.display(),
                server_key.display(),
                ca.display(),
                worker_permissions()
            ),
        );
        Self {
            config,
            ca,
            client_cert,
            client_key,
            coordinator_password,
            worker_password,
        }
    }

    /// The TLS flags of a client.
    pub fn tls_args(&self) -> Vec<String> {
        vec![
            "--nats-tls-ca".into(),
            self.ca.display().to_string(),
            "--nats-tls-cert".into(),
            self.client_cert.display().to_string(),
            "--nats-tls-key".into(),
            self.client_key.display().to_string(),
        ]
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nats: Proc,
    pub nats_url: String,
    /// TLS and users on NATS, when the cluster runs secured.
    pub security: Option<NatsSecurity>,
    port: u16,
    pub coordinator: Option<Node>,
    pub url: String,
    pub workers: Vec<Proc>,
    pub api_key: Option<String>,
    coordinator_args: Vec<String>,
    /// Environment variables of every coordinator started.
    pub coordinator_env: Vec<(String, String)>,
    /// Coordinators run as processes of the binary (to be signalled, or to get environment
    /// variables), not in the test process.
    coordinator_processes: bool,
    n: usize,
}

pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Cluster {
    /// Starts nats-server and a coordinator with `args` added to its command line.
    pub fn start(args: &[&str]) -> Self {
        Self::start_full(args, &[], false, false)
    }

    /// As [`Cluster::start`], with coordinators as processes of the binary with environment
    /// variables `env` (tests that signal a coordinator or give it an environment).
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_full(args, env, false, true)
    }

    /// As [`Cluster::start`], with coordinators as processes of the binary.
    pub fn start_processes(args: &[&str]) -> Self {
        Self::start_full(args, &[], false, true)
    }

    /// As [`Cluster::start`], with NATS requiring mutual TLS and a user per role (the
    /// coordinator's password given by environment variable, the workers' by flag).
    pub fn start_secure(args: &[&str]) -> Self {
        Self::start_full(args, &[], true, false)
    }

    fn start_full(args: &[&str], env: &[(&str, &str)], secure: bool, processes: bool) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let security = secure.then(|| NatsSecurity::new(dir.path()));
        let config = security.as_ref().map(|s| s.config.clone());
        let (nats, port) = start_nats(dir.path(), None, config.as_deref());
        let scheme = if secure { "tls" } else { "nats" };
        let mut c = Cluster {
            nats,
            nats_url: format!("{scheme}://127.0.0.1:{port}"),
            security,
            port,
            coordinator: None,
            url: String::new(),
            workers: Vec::new(),
            api_key: None,
            coordinator_args: args.iter().map(|s| s.to_string()).collect(),
            coordinator_env: Vec::new(),
            coordinator_processes: processes,
            n: 0,
            dir,
        };
        c.coordinator_env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if let Some(i) = args.iter().position(|a| *a == "--api-key") {
            c.api_key = args.get(i + 1).map(|s| s.to_string());
        }
        c.start_coordinator();
        c
    }

    fn log(&mut self, name: &str) -> PathBuf {
        self.n += 1;
        self.dir.path().join(format!("{}-{name}.log", self.n))
    }

    /// Starts the coordinator (identity `test-coordinator`, the same across restarts) and
    /// waits until it leads.
    pub fn start_coordinator(&mut self) {
        let (node, url) = if self.coordinator_processes {
            let (proc, url) = self.spawn_coordinator("test-coordinator", &[]);
            (Node::Process(proc), url)
        } else {
            let mut args: Vec<String> = ["--nats", &self.nats_url, "--instance-id"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            args.push("test-coordinator".into());
            if let Some(s) = &self.security {
                args.extend(s.tls_args());
                args.extend(["--nats-user".into(), "coordinator".into()]);
                args.extend(["--nats-password".into(), s.coordinator_password.clone()]);
            }
            args.extend(self.coordinator_args.iter().cloned());
            if !args.iter().any(|a| a == "--api-key" || a == "--api-keys") {
                // Tests that use keys pass them; the rest run open on loopback.
                args.push("--allow-unauthenticated".into());
            }
            let (node, url) = InProcess::start(args);
            (Node::InProcess(node), url)
        };
        self.url = url;
        self.coordinator = Some(node);
        self.wait_leading(&self.url.clone(), Duration::from_secs(60));
    }

    /// Waits until the coordinator at `url` holds the leader lease (its /metrics say so).
    pub fn wait_leading(&self, url: &str, timeout: Duration) {
        wait_for("the coordinator to lead", timeout, || {
            ureq::get(&format!("{url}/metrics"))
                .timeout(Duration::from_secs(5))
                .call()
                .ok()?
                .into_string()
                .ok()
                .filter(|m| m.lines().any(|l| l == "gristmill_coordinator_leader 1"))
        });
    }

    /// Starts another coordinator process named `id` with the cluster's and `extra` arguments;
    /// returns it with its URL once it listens (it may stand by).
    pub fn spawn_coordinator(&mut self, id: &str, extra: &[&str]) -> (Proc, String) {
        let log = self.log("coordinator");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gristmill"));
        cmd.args([
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--nats",
            &self.nats_url,
            "--instance-id",
            id,
        ]);
        if let Some(s) = &self.security {
            cmd.args(s.tls_args())
                .args(["--nats-user", "coordinator"])
                .env("GRISTMILL_NATS_PASSWORD", &s.coordinator_password);
        }
        let child = cmd
            .args(&self.coordinator_args)
            .args(extra)
            .envs(self.coordinator_env.iter().map(|(k, v)| (k, v)))
            .env("GRISTMILL_LOG", "info,async_nats=warn")
            .env("NO_COLOR", "1")
            // Tests that use keys pass them; the rest run open on loopback.
            .env("GRISTMILL_ALLOW_UNAUTHENTICATED", "true")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("coordinator starts");
        let proc = Proc { child, log };
        let url = wait_for("the coordinator to listen", Duration::from_secs(30), || {
            let text = proc.log_text();
            text.lines()
                .find_map(|l| l.split("listening on ").nth(1))
                .map(|u| u.trim().to_string())
        });
        (proc, url)
    }

    pub fn kill_coordinator(&mut self) {
        if let Some(mut c) = self.coordinator.take() {
            c.kill9();
        }
    }

    /// Starts a worker on the default model with `args` and `env` added.
    pub fn start_worker(&mut self, args: &[&str], env: &[(&str, &str)]) -> usize {
        let log = self.log("worker");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gristmill"));
        cmd.args(["worker", "--nats", &self.nats_url, "--threads", "1"]);
        if let Some(s) = &self.security {
            cmd.args(s.tls_args()).args([
                "--nats-user",
                "worker",
                "--nats-password",
                &s.worker_password,
            ]);
        }
        cmd.arg("--model")
            .arg(default_model())
            .args(args)
            .env("GRISTMILL_LOG", "info,async_nats=warn")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("worker starts");
        self.workers.push(Proc { child, log });
        self.workers.len() - 1
    }

    /// Kills nats-server (SIGKILL) and starts it again on the same port and store.
    pub fn restart_nats(&mut self) {
        self.nats.kill9();
        let config = self.security.as_ref().map(|s| s.config.clone());
        let (nats, _) = start_nats(self.dir.path(), Some(self.port), config.as_deref());
        self.nats = nats;
    }

    pub fn request(&self, method: &str, path: &str) -> ureq::Request {
        let r =
            ureq::request(method, &format!("{}{path}", self.url)).timeout(Duration::from_secs(60));
        match &self.api_key {
            Some(k) => r.set("Authorization", &format!("Bearer {k}")),
            None => r,
        }
    }

    /// Sends a request; returns status and JSON body (errors included).
    pub fn call(&self, req: ureq::Request, body: Option<(&str, Vec<u8>)>) -> (u16, Value) {
        send(req, body)
    }

    /// Waits until worker `w` says it is ready.
    pub fn wait_worker_ready(&self, w: usize) {
        wait_for("the worker to be ready", Duration::from_secs(120), || {
            self.workers[w]
                .log_text()
                .contains("worker ready")
                .then_some(())
        });
    }

    pub fn get(&self, path: &str) -> Value {
        let (s, v) = self.call(self.request("GET", path), None);
        assert_eq!(s, 200, "GET {path}: {v}");
        v
    }

    pub fn upload(&self, data: &[u8]) -> (u16, Value) {
        let boundary = "gristmilltestboundary";
        let mut body = Vec::new();
        body.extend(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            )
            .bytes(),
        );
        body.extend(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\r\n").bytes());
        body.extend_from_slice(data);
        body.extend(format!("\r\n--{boundary}--\r\n").bytes());
        self.call(
            self.request("POST", "/v1/files"),
            Some((&format!("multipart/form-data; boundary={boundary}"), body)),
        )
    }

    /// Uploads `lines` and creates a batch; returns the batch id.
    pub fn create_batch(&self, lines: &[String], window: &str) -> String {
        let (s, f) = self.upload((lines.join("\n") + "\n").as_bytes());
        assert_eq!(s, 200, "upload: {f}");
        let body = json!({"input_file_id": f["id"], "endpoint": "/v1/chat/completions", "completion_window": window});
        let (s, b) = self.call(
            self.request("POST", "/v1/batches"),
            Some(("application/json", body.to_string().into_bytes())),
        );
        assert_eq!(s, 200, "create batch: {b}");
        b["id"].as_str().expect("batch id").to_string()
    }

    pub fn batch(&self, id: &str) -> Value {
        self.get(&format!("/v1/batches/{id}"))
    }

    /// Polls until `pred` holds for the batch object.
    pub fn wait_batch(
        &self,
        id: &str,
        timeout: Duration,
        what: &str,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Value {
        wait_for(what, timeout, || {
            // The coordinator may be restarting: treat transport errors as "not yet".
            let r = ureq::request("GET", &format!("{}/v1/batches/{id}", self.url))
                .timeout(Duration::from_secs(5));
            let r = match &self.api_key {
                Some(k) => r.set("Authorization", &format!("Bearer {k}")),
                None => r,
            };
            let v: Value = serde_json::from_str(&r.call().ok()?.into_string().ok()?).ok()?;
            pred(&v).then_some(v)
        })
    }

    pub fn wait_done(&self, id: &str, timeout: Duration) -> Value {
        let b = self.wait_batch(id, timeout, "the batch to end", |b| {
            matches!(
                b["status"].as_str(),
                Some("completed" | "failed" | "expired" | "cancelled")
            )
        });
        b
    }

    pub fn file_lines(&self, id: &Value) -> Vec<Value> {
        let Some(id) = id.as_str() else {
            return Vec::new();
        };
        let resp = self
            .request("GET", &format!("/v1/files/{id}/content"))
            .call()
            .expect("file content");
        // Streamed: a large output file is over ureq's 10 MB `into_string` limit.
        std::io::BufRead::lines(std::io::BufReader::new(resp.into_reader()))
            .map(|l| serde_json::from_str(&l.expect("text")).expect("JSONL"))
            .collect()
    }

    /// Output and error lines of a finished batch, checking that every `custom_id` of
    /// `expected` appears exactly once across both files and that the counts add up.
    pub fn results(
        &self,
        b: &Value,
        expected: &[String],
    ) -> (HashMap<String, Value>, HashMap<String, Value>) {
        let out = self.file_lines(&b["output_file_id"]);
        let err = self.file_lines(&b["error_file_id"]);
        let mut seen: HashMap<String, usize> = HashMap::new();
        for l in out.iter().chain(&err) {
            *seen
                .entry(l["custom_id"].as_str().unwrap_or("").to_string())
                .or_default() += 1;
        }
        for id in expected {
            assert_eq!(
                seen.get(id),
                Some(&1),
                "custom_id {id} appears {:?} times",
                seen.get(id)
            );
        }
        assert_eq!(
            seen.len(),
            expected.len(),
            "unexpected custom_ids: {seen:?}"
        );
        let c = &b["request_counts"];
        assert_eq!(c["completed"].as_u64(), Some(out.len() as u64), "{b}");
        assert_eq!(c["failed"].as_u64(), Some(err.len() as u64), "{b}");
        assert_eq!(c["total"].as_u64(), Some(expected.len() as u64), "{b}");
        let by_id = |v: Vec<Value>| {
            v.into_iter()
                .map(|l| (l["custom_id"].as_str().unwrap_or("").to_string(), l))
                .collect::<HashMap<_, _>>()
        };
        (by_id(out), by_id(err))
    }

    pub fn logs(&self) -> String {
        let mut s = format!("--- nats\n{}", self.nats.log_text());
        if let Some(c) = &self.coordinator {
            s += &format!("--- coordinator\n{}", c.log_text());
        }
        for w in &self.workers {
            s += &format!("--- worker\n{}", w.log_text());
        }
        s
    }
}

fn start_nats(dir: &Path, port: Option<u16>, config: Option<&Path>) -> (Proc, u16) {
    let ports_dir = dir.join(format!("ports-{}", port.unwrap_or(0)));
    std::fs::create_dir_all(&ports_dir).expect("ports dir");
    let log = dir.join(format!("nats-{}.log", port.unwrap_or(0)));
    let port_arg = port.map_or("-1".to_string(), |p| p.to_string());
    let mut cmd = Command::new(tools_bin("nats-server"));
    if let Some(c) = config {
        cmd.arg("-c").arg(c);
    }
    let child = cmd
        .args(["-js", "-a", "127.0.0.1", "-p", &port_arg, "-sd"])
        .arg(dir.join("jetstream"))
        .arg("--ports_file_dir")
        .arg(&ports_dir)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("nats-server starts");
    let proc = Proc { child, log };
    let port = wait_for("nats-server's ports file", Duration::from_secs(20), || {
        let entry = std::fs::read_dir(&ports_dir).ok()?.flatten().next()?;
        let v: Value = serde_json::from_str(&std::fs::read_to_string(entry.path()).ok()?).ok()?;
        let url = v["nats"][0].as_str()?;
        url.rsplit(':').next()?.parse::<u16>().ok()
    });
    (proc, port)
}

/// Sends a request; returns status and JSON body (errors included).
pub fn send(req: ureq::Request, body: Option<(&str, Vec<u8>)>) -> (u16, Value) {
    let result = match body {
        Some((ct, data)) => req.set("Content-Type", ct).send_bytes(&data),
        None => req.call(),
    };
    let resp = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("HTTP transport error: {e}"),
    };
    let status = resp.status();
    let text = resp.into_string().expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// A chat line with a seed, so its output is reproducible.
pub fn chat_line(id: &str, content: &str, max_tokens: usize, seed: u64) -> String {
    json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": "SmolLM2-135M-Instruct",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens, "temperature": 0.7, "seed": seed,
    }})
    .to_string()
}

pub fn ids(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l).expect("json")["custom_id"]
                .as_str()
                .expect("id")
                .to_string()
        })
        .collect()
}
