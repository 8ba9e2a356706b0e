//! A hostile but realistic user against a real cluster (nats-server, the coordinator, echo
//! workers): ids shaped like result groups or holding control characters, ids and lines over
//! every limit, a deleted input file, a store that refuses a cancel, forged results, idle and
//! slow HTTP connections, odd ids and headers. Each test is one finding of issue 12: nothing
//! is lost or duplicated, nothing panics, and maintenance (expiry) keeps running.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{chat_line, ids, Cluster};
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(120);

fn echo_worker(c: &mut Cluster) -> usize {
    c.start_worker(&["--engine", "echo"], &[])
}

/// Uploads `lines` and creates a batch for `endpoint`; returns the batch id.
fn create_batch_for(c: &Cluster, endpoint: &str, lines: &[String], window: &str) -> String {
    let (s, f) = c.upload((lines.join("\n") + "\n").as_bytes());
    assert_eq!(s, 200, "upload: {f}");
    let body = json!({"input_file_id": f["id"], "endpoint": endpoint, "completion_window": window});
    let (s, b) = c.call(
        c.request("POST", "/v1/batches"),
        Some(("application/json", body.to_string().into_bytes())),
    );
    assert_eq!(s, 200, "create batch: {b}");
    b["id"].as_str().expect("batch id").to_string()
}

fn metric(c: &Cluster, name: &str) -> Vec<(String, f64)> {
    let text = ureq::get(&format!("{}/metrics", c.url))
        .call()
        .expect("metrics")
        .into_string()
        .expect("text");
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// No supervised background task of the coordinator has panicked.
fn assert_no_panics(c: &Cluster) {
    let panics = metric(c, "gristmill_task_panics_total");
    assert!(!panics.is_empty(), "the metric is exported");
    assert!(
        panics.iter().all(|(_, v)| *v == 0.0),
        "{panics:?}\n{}",
        c.logs()
    );
}

/// Maintenance still runs: a batch nobody works on expires on time.
fn assert_expiry_runs(c: &mut Cluster) {
    for w in &mut c.workers {
        w.kill9();
    }
    let lines = vec![chat_line("late", "nobody runs this", 4, 1)];
    let id = c.create_batch(&lines, "2s");
    let b = c.wait_done(&id, Duration::from_secs(30));
    assert_eq!(b["status"], "expired", "{b}\n{}", c.logs());
}

/// Finding 1: a message of several results once had the id `{batch}/{first}+{n}`, which a
/// line whose `custom_id` is `c0+2` shares with the group `[c0, d0]`: JetStream dropped one as
/// a duplicate and the worker took that for success. 40 of these 60 lines were lost.
#[test]
fn ids_shaped_like_result_groups_lose_nothing() {
    let mut c = Cluster::start(&["--shard-max-lines", "2", "--shard-max-tokens", "100"]);
    let mut lines = Vec::new();
    for i in 0..20u32 {
        for (k, id, max_tokens) in [
            (0, format!("c{i}"), 10),
            (1, format!("d{i}"), 10),
            (2, format!("c{i}+2"), 500),
        ] {
            lines.push(
                json!({"custom_id": id, "method": "POST", "url": "/v1/completions",
                    "body": {"prompt": [1000 + 3 * i + k], "max_tokens": max_tokens}})
                .to_string(),
            );
        }
    }
    let id = create_batch_for(&c, "/v1/completions", &lines, "24h");
    echo_worker(&mut c);
    let b = c.wait_done(&id, LONG);
    assert_eq!(b["status"], "completed", "{b}\n{}", c.logs());
    let (out, err) = c.results(&b, &ids(&lines));
    assert!(err.is_empty(), "{err:?}");
    // Each line got its own answer (the echo of its own prompt), not a neighbour's.
    for i in 0..20u32 {
        for (k, id) in [
            (0, format!("c{i}")),
            (1, format!("d{i}")),
            (2, format!("c{i}+2")),
        ] {
            let text = out[&id]["response"]["body"]["choices"][0]["text"].clone();
            assert_eq!(text, json!((1000 + 3 * i + k).to_string()), "{id}");
        }
    }
    assert_no_panics(&c);
}

/// Findings 2 and 3: a `custom_id` with CR or LF went into a NATS header and panicked the
/// worker's shard task and then the coordinator's tick (expiry stopped for every batch); a
/// 100 kB one exceeded NATS's header limit and took its shard-mates down. Now ids are only
/// ever hashed into headers, and an id over the limit fails its own line.
#[test]
fn hostile_custom_ids_complete_and_maintenance_keeps_running() {
    let mut c = Cluster::start(&[]);
    let hostile = [
        "line\r\nbreak",
        "\n",
        "\r",
        "nul\u{0}byte",
        "X-Header: injected\r\n\r\nbody",
        "Nats-Msg-Id: x",
        "a+2",
        "a",
        "ünïcødé ✓",
        " ",
        "a/../../b",
        "gristmill.results.>",
    ];
    let mut lines: Vec<String> = hostile
        .iter()
        .map(|id| chat_line(id, &format!("echo {}", id.len()), 4, 1))
        .collect();
    let too_long = "x".repeat(100_000);
    let just_over = "y".repeat(513);
    lines.insert(3, chat_line(&too_long, "too long", 4, 1));
    lines.push(chat_line(&just_over, "just over", 4, 1));
    let id = c.create_batch(&lines, "24h");
    echo_worker(&mut c);
    let b = c.wait_done(&id, LONG);
    assert_eq!(b["status"], "completed", "{b}\n{}", c.logs());
    let out = c.file_lines(&b["output_file_id"]);
    let err = c.file_lines(&b["error_file_id"]);
    let done: HashMap<String, &Value> = out
        .iter()
        .map(|l| (l["custom_id"].as_str().expect("id").to_string(), l))
        .collect();
    assert_eq!(done.len(), hostile.len(), "{done:?}");
    for h in hostile {
        let l = done.get(h).unwrap_or_else(|| panic!("{h:?} has no output"));
        assert_eq!(
            l["response"]["body"]["choices"][0]["message"]["content"],
            format!("echo {}", h.len())
        );
    }
    assert_eq!(err.len(), 2, "{err:?}");
    let mut failed_lines: Vec<u64> = err
        .iter()
        .map(|e| e["line"].as_u64().expect("line"))
        .collect();
    failed_lines.sort();
    assert_eq!(failed_lines, vec![4, lines.len() as u64]);
    for e in &err {
        assert_eq!(
            e["custom_id"],
            Value::Null,
            "a too-long id is not echoed: {e}"
        );
        assert_eq!(e["error"]["param"], "custom_id", "{e}");
        assert!(
            e["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("the limit is 512 bytes")),
            "{e}"
        );
    }
    let counts = &b["request_counts"];
    assert_eq!(counts["total"].as_u64(), Some(lines.len() as u64));
    assert_eq!(counts["failed"].as_u64(), Some(2));
    assert!(!c.logs().contains("panicked"), "{}", c.logs());
    assert_no_panics(&c);
    assert_expiry_runs(&mut c);
}

/// Finding 4: a line larger than NATS's max_payload kept its batch in `validating` for ever,
/// failing to publish every 2 s. Now it is an error line and the rest completes.
#[test]
fn a_line_over_the_nats_payload_limit_is_an_error_line() {
    let mut c = Cluster::start(&[]);
    let huge = "z".repeat(2 << 20);
    let lines = vec![
        chat_line("small-1", "hello", 4, 1),
        chat_line("huge", &huge, 4, 1),
        chat_line("small-2", "there", 4, 1),
    ];
    let id = c.create_batch(&lines, "24h");
    echo_worker(&mut c);
    let b = c.wait_done(&id, LONG);
    assert_eq!(b["status"], "completed", "{b}\n{}", c.logs());
    let (out, err) = c.results(&b, &ids(&lines));
    assert_eq!(out.len(), 2);
    let e = &err["huge"];
    assert_eq!(e["error"]["code"], "line_too_large", "{e}");
    assert_eq!(e["line"], 2);
    assert_no_panics(&c);
}

/// Finding 5: deleting the input file of a running batch left it in `finalizing` for ever.
/// Now the delete is refused while the batch runs, and allowed once it has ended.
#[test]
fn the_input_file_of_a_running_batch_cannot_be_deleted() {
    let mut c = Cluster::start(&[]);
    let lines: Vec<String> = (0..5)
        .map(|i| chat_line(&format!("r{i}"), "hi", 4, 1))
        .collect();
    let id = c.create_batch(&lines, "24h");
    let input = c.batch(&id)["input_file_id"]
        .as_str()
        .expect("input file")
        .to_string();
    let (s, v) = c.call(c.request("DELETE", &format!("/v1/files/{input}")), None);
    assert_eq!(s, 409, "{v}");
    assert_eq!(v["error"]["code"], "file_in_use", "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains(&id)));
    echo_worker(&mut c);
    let b = c.wait_done(&id, LONG);
    assert_eq!(b["status"], "completed", "{b}");
    c.results(&b, &ids(&lines));
    let (s, v) = c.call(c.request("DELETE", &format!("/v1/files/{input}")), None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["deleted"], true);
}

/// Finding 7: a cancel whose store write failed answered 404 while memory already said
/// `cancelling`, and the batch never finalized. Now it is a 503 that changed nothing, and a
/// retry once the store is back cancels the batch.
#[test]
fn a_cancel_the_store_refuses_changes_nothing_and_can_be_retried() {
    // A long lease: the coordinator must outlive the NATS outage.
    let mut c = Cluster::start(&["--lease-ttl", "90"]);
    let lines: Vec<String> = (0..3)
        .map(|i| chat_line(&format!("r{i}"), "hi", 4, 1))
        .collect();
    let id = c.create_batch(&lines, "24h");
    c.wait_batch(&id, LONG, "dispatch", |b| b["status"] == "in_progress");
    c.nats.kill9();
    let (s, v) = c.call(c.request("POST", &format!("/v1/batches/{id}/cancel")), None);
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["error"]["code"], "store_unavailable", "{v}");
    assert_eq!(c.batch(&id)["status"], "in_progress", "nothing changed");
    c.restart_nats();
    let deadline = Instant::now() + Duration::from_secs(40);
    let (s, v) = loop {
        let (s, v) = c.call(c.request("POST", &format!("/v1/batches/{id}/cancel")), None);
        if s == 200 || Instant::now() > deadline {
            break (s, v);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(s, 200, "{v}\n{}", c.logs());
    let b = c.wait_done(&id, LONG);
    assert_eq!(b["status"], "cancelled", "{b}");
    let (_, err) = c.results(&b, &ids(&lines));
    assert!(err
        .values()
        .all(|e| e["error"]["code"] == "batch_cancelled"));
}

/// Finding 8: a worker whose NATS server was gone ignored SIGTERM for minutes.
#[test]
fn a_worker_without_nats_exits_on_sigterm() {
    let mut c = Cluster::start(&[]);
    let w = echo_worker(&mut c);
    c.wait_worker_ready(w);
    c.nats.kill9();
    std::thread::sleep(Duration::from_millis(500));
    c.workers[w].sigterm();
    let t = Instant::now();
    let status = c.workers[w].wait_exit(Duration::from_secs(15));
    assert!(status.success(), "{status:?}\n{}", c.workers[w].log_text());
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

/// Publishes `payload` on `subject` through a plain NATS connection (no JetStream client: what
/// anyone who can reach an open server can do).
fn nats_publish(url: &str, subject: &str, payload: &[u8]) {
    let addr = url.trim_start_matches("nats://");
    let stream = TcpStream::connect(addr).expect("connect to NATS");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut line = String::new();
    reader.read_line(&mut line).expect("INFO");
    assert!(line.starts_with("INFO"), "{line}");
    let mut w = stream;
    write!(w, "CONNECT {{\"verbose\":false,\"pedantic\":false}}\r\n").expect("write");
    write!(w, "PUB {subject} {}\r\n", payload.len()).expect("write");
    w.write_all(payload).expect("write");
    write!(w, "\r\nPING\r\n").expect("write");
    loop {
        line.clear();
        reader.read_line(&mut line).expect("PONG");
        assert!(!line.starts_with("-ERR"), "{line}");
        if line.starts_with("PONG") {
            break;
        }
    }
}

/// Finding 9: anyone on the results subject could finish a batch with invented ids, and the
/// real lines were in neither file. Now only a batch's own lines, from the shard that carried
/// them, count; the rest is rejected and counted.
#[test]
fn results_for_lines_a_batch_does_not_have_are_rejected() {
    let mut c = Cluster::start(&[]);
    let lines: Vec<String> = (0..5)
        .map(|i| chat_line(&format!("real{i}"), &format!("real text {i}"), 4, 1))
        .collect();
    let id = c.create_batch(&lines, "24h");
    c.wait_batch(&id, LONG, "dispatch", |b| b["status"] == "in_progress");
    let forged = |custom_id: &str, line: usize, shard: Option<u32>| {
        let mut r = json!({"batch_id": id, "custom_id": custom_id, "line": line,
            "outcome": {"kind": "completed", "body": {"forged": true}, "finish_reason": "stop",
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}});
        if let Some(s) = shard {
            r["shard"] = json!(s);
        }
        r
    };
    let mut group: Vec<Value> = (0..5)
        .map(|i| forged(&format!("invented{i}"), i + 1, Some(0)))
        .collect();
    group.push(forged("real0", 1, Some(99)));
    group.push(forged("real1", 2, None));
    group.push(forged("real2", 7, Some(0)));
    let payload = serde_json::to_vec(&group).expect("json");
    nats_publish(&c.nats_url, &format!("gristmill.results.{id}"), &payload);
    let start = Instant::now();
    loop {
        let rejected = metric(&c, "gristmill_rejected_results_total");
        if rejected.first().is_some_and(|(_, v)| *v == 8.0) {
            break;
        }
        assert!(start.elapsed() < LONG, "{rejected:?}\n{}", c.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    let b = c.batch(&id);
    assert_eq!(b["status"], "in_progress", "{b}");
    assert_eq!(b["request_counts"]["completed"], 0, "{b}");
    echo_worker(&mut c);
    let b = c.wait_done(&id, LONG);
    assert_eq!(b["status"], "completed", "{b}");
    let (out, _) = c.results(&b, &ids(&lines));
    for i in 0..5 {
        assert_eq!(
            out[&format!("real{i}")]["response"]["body"]["choices"][0]["message"]["content"],
            format!("real text {i}")
        );
    }
}

/// Reads from `s` until EOF or an error; whether the server closed it within `within`.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).expect("timeout");
    let mut buf = [0u8; 4096];
    let start = Instant::now();
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            // A 408 or the like before the close is fine.
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
        if start.elapsed() > within {
            return false;
        }
    }
}

/// Finding 10: idle and slow HTTP connections were never closed. Now a request head must
/// arrive within the header timeout, a stalled body within the idle timeout, and at most
/// `--http-max-connections` are open at once.
#[test]
fn idle_slow_and_excess_http_connections_are_closed() {
    let c = Cluster::start(&[
        "--http-header-timeout",
        "1",
        "--http-idle-timeout",
        "2",
        "--http-max-connections",
        "6",
    ]);
    let addr = c.url.trim_start_matches("http://").to_string();
    let connect = || TcpStream::connect(&addr).expect("connect");
    // Idle: nothing sent.
    let mut idle: Vec<TcpStream> = (0..3).map(|_| connect()).collect();
    // Slow head: a byte now and then, never finished.
    let mut slow = connect();
    slow.write_all(b"GET /v1/batches HTTP/1.1\r\n")
        .expect("write");
    // Stalled body: a whole head, then a part of the body it announced.
    let mut stalled = connect();
    stalled
        .write_all(
            b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 1000\r\n\r\n--b\r\n",
        )
        .expect("write");
    // Keep-alive left idle after a request.
    let mut kept = connect();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    // Six connections are open: a seventh request waits until one closes.
    let t = Instant::now();
    let (s, _) = c.call(c.request("GET", "/v1/batches"), None);
    assert_eq!(s, 200);
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(10),
        "the seventh connection waited {waited:?}"
    );
    for (what, s) in idle
        .iter_mut()
        .map(|s| ("idle", s))
        .chain([("slow head", &mut slow), ("kept alive", &mut kept)])
    {
        assert!(
            closed_within(s, Duration::from_secs(5)),
            "{what} stayed open"
        );
    }
    let _ = slow.write_all(b"Host: x\r\n");
    assert!(
        closed_within(&mut stalled, Duration::from_secs(6)),
        "a stalled body stayed open"
    );
    // The API still answers.
    let (s, _) = c.call(c.request("GET", "/v1/batches"), None);
    assert_eq!(s, 200);
}

/// Finding 13: odd ids reached NATS and came back as HTTP 500 with NATS's error text; a
/// lowercase `bearer` was taken for a missing key; two file parts kept the last silently; query
/// errors came back as plain text.
#[test]
fn odd_ids_schemes_forms_and_queries_get_openai_shaped_errors() {
    let c = Cluster::start(&["--api-key", "k3y"]);
    for path in [
        "/v1/files/a%2F..%2F..%2Fb",
        "/v1/files/file-x.y",
        "/v1/files/a%2F..%2F..%2Fb/content",
        "/v1/batches/batch_%2E%2E",
        "/v1/batches/..%2Fx",
        "/v1/files/file-%E2%9C%93",
    ] {
        for method in ["GET", "DELETE"] {
            if method == "DELETE" && path.contains("batches") {
                continue;
            }
            let (s, v) = c.call(c.request(method, path), None);
            let want = if method == "DELETE" && path.ends_with("/content") {
                405
            } else {
                404
            };
            assert_eq!(s, want, "{method} {path}: {v}");
            assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
            let text = v.to_string().to_lowercase();
            assert!(!text.contains("nats") && !text.contains("stream"), "{v}");
        }
    }
    let (s, v) = c.call(c.request("POST", "/v1/batches/batch_%0D%0A/cancel"), None);
    assert_eq!(s, 404, "{v}");
    // The bearer scheme in any case; other schemes are named as the problem.
    for (header, want) in [
        ("bearer k3y", 200),
        ("BEARER k3y", 200),
        ("Bearer  k3y ", 200),
        ("Basic k3y", 401),
        ("Bearer k3y2", 401),
        ("Bearer", 401),
    ] {
        let r = ureq::get(&format!("{}/v1/batches", c.url)).set("Authorization", header);
        let (s, v) = match r.call() {
            Ok(r) => (r.status(), Value::Null),
            Err(ureq::Error::Status(s, r)) => (
                s,
                serde_json::from_str(&r.into_string().unwrap_or_default()).unwrap_or(Value::Null),
            ),
            Err(e) => panic!("{e}"),
        };
        assert_eq!(s, want, "{header:?}: {v}");
        if header.starts_with("Basic") {
            assert!(
                v["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("must be `Bearer <key>`")),
                "{v}"
            );
        }
    }
    // Two file parts.
    let boundary = "b0undary";
    let part = |name: &str, file: Option<&str>, body: &str| {
        let disposition = match file {
            Some(f) => format!("form-data; name=\"{name}\"; filename=\"{f}\""),
            None => format!("form-data; name=\"{name}\""),
        };
        format!("--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n{body}\r\n")
    };
    let line = chat_line("a", "hi", 4, 1);
    let body = part("purpose", None, "batch")
        + &part("file", Some("one.jsonl"), &line)
        + &part("file", Some("two.jsonl"), &line)
        + &format!("--{boundary}--\r\n");
    let (s, v) = c.call(
        c.request("POST", "/v1/files"),
        Some((
            &format!("multipart/form-data; boundary={boundary}"),
            body.into_bytes(),
        )),
    );
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["param"], "file", "{v}");
    // Not multipart at all.
    let (s, v) = c.call(
        c.request("POST", "/v1/files"),
        Some(("application/json", b"{}".to_vec())),
    );
    assert_eq!(s, 400, "{v}");
    assert!(v["error"]["message"].is_string(), "{v}");
    // Query strings that do not deserialise.
    for q in ["limit=1&limit=2", "after=%FF%FE"] {
        let (s, v) = c.call(c.request("GET", &format!("/v1/batches?{q}")), None);
        assert_eq!(s, 400, "{q}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{q}: {v}");
    }
}

/// Finding 11: a full store made the coordinator exit, and the restarted one answered 503 to
/// everything. Now a batch whose output files do not fit waits in `finalizing`, says why on
/// the batch object and in a metric, the API stays up, and the batch completes once space is
/// freed.
#[test]
fn a_full_file_store_delays_finalization_until_space_returns() {
    let mut c = Cluster::start(&["--file-store-max-bytes", "3000000"]);
    let lines: Vec<String> = (0..20)
        .map(|i| {
            chat_line(
                &format!("big{i}"),
                &format!("{i} {}", "w".repeat(50_000)),
                4,
                1,
            )
        })
        .collect();
    let (s, filler) = c.upload(&vec![b'\n'; 1_400_000]);
    assert_eq!(s, 200, "{filler}");
    let id = c.create_batch(&lines, "24h");
    echo_worker(&mut c);
    let b = c.wait_batch(
        &id,
        LONG,
        "a finalization that cannot store its files",
        |b| {
            b["errors"]["data"]
                .as_array()
                .is_some_and(|d| d.iter().any(|e| e["code"] == "output_not_stored_yet"))
        },
    );
    assert_eq!(b["status"], "finalizing", "{b}");
    let failures = metric(&c, "gristmill_finalize_failures_total");
    assert!(
        failures.first().is_some_and(|(_, v)| *v >= 1.0),
        "{failures:?}"
    );
    // The API is up and the coordinator still leads.
    let (s, _) = c.call(c.request("GET", "/v1/batches"), None);
    assert_eq!(s, 200);
    let filler_id = filler["id"].as_str().expect("id");
    let (s, v) = c.call(c.request("DELETE", &format!("/v1/files/{filler_id}")), None);
    assert_eq!(s, 200, "{v}");
    let b = c.wait_done(&id, LONG);
    assert_eq!(b["status"], "completed", "{b}\n{}", c.logs());
    assert_eq!(b["errors"], Value::Null, "the note is gone: {b}");
    let (out, _) = c.results(&b, &ids(&lines));
    assert_eq!(out.len(), 20);
    assert_no_panics(&c);
}

/// Secured NATS: without credentials a client is refused; with the worker's it can take shards
/// and publish results (a batch completes through such a worker) but cannot publish shards or
/// read the file store.
#[test]
fn secured_nats_refuses_strangers_and_confines_workers() {
    let mut c = Cluster::start_secure(&[]);
    let lines: Vec<String> = (0..4)
        .map(|i| chat_line(&format!("s{i}"), &format!("secret prompt {i}"), 4, 1))
        .collect();
    let id = c.create_batch(&lines, "24h");
    echo_worker(&mut c);
    let b = c.wait_done(&id, LONG);
    assert_eq!(b["status"], "completed", "{b}\n{}", c.logs());
    c.results(&b, &ids(&lines));
    // The worker needed nothing its role does not allow.
    let log = c.workers[0].log_text();
    assert!(
        !log.to_lowercase().contains("permissions violation"),
        "{log}"
    );
    assert!(log.contains("connected to NATS"), "{log}");

    let security = c.security.as_ref().expect("secured");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let tls = |o: async_nats::ConnectOptions| {
            o.require_tls(true)
                .add_root_certificates(security.ca.clone())
                .add_client_certificate(security.client_cert.clone(), security.client_key.clone())
        };
        // No user: refused.
        let stranger = tls(async_nats::ConnectOptions::new())
            .connect(&c.nats_url)
            .await;
        assert!(stranger.is_err(), "a client without credentials connected");
        // No client certificate: refused by mutual TLS.
        let no_cert = async_nats::ConnectOptions::new()
            .require_tls(true)
            .add_root_certificates(security.ca.clone())
            .user_and_password("worker".into(), security.worker_password.clone())
            .connect(&c.nats_url)
            .await;
        assert!(no_cert.is_err(), "a client without a certificate connected");
        // The worker's credential.
        let (tx, mut violations) = tokio::sync::mpsc::unbounded_channel();
        let worker = tls(async_nats::ConnectOptions::new()
            .user_and_password("worker".into(), security.worker_password.clone())
            .event_callback(move |e| {
                let tx = tx.clone();
                async move {
                    if let async_nats::Event::ServerError(e) = e {
                        let _ = tx.send(e.to_string());
                    }
                }
            }))
        .connect(&c.nats_url)
        .await
        .expect("the worker's credential connects");
        let js = async_nats::jetstream::new(worker.clone());
        let shard = js
            .publish(format!("gristmill.shards.{id}"), "{}".into())
            .await;
        let stored = match shard {
            Ok(ack) => tokio::time::timeout(Duration::from_secs(5), ack)
                .await
                .is_ok_and(|a| a.is_ok()),
            Err(_) => false,
        };
        assert!(!stored, "a worker published a shard");
        let files = tokio::time::timeout(
            Duration::from_secs(10),
            js.get_object_store("gristmill_files"),
        )
        .await;
        assert!(
            !matches!(files, Ok(Ok(_))),
            "a worker opened the file store"
        );
        let seen = tokio::time::timeout(Duration::from_secs(5), violations.recv())
            .await
            .ok()
            .flatten()
            .unwrap_or_default();
        assert!(
            seen.to_lowercase().contains("permissions violation"),
            "{seen:?}"
        );
    });
}

/// Tenants: each API key's tenant sees, reads, cancels and deletes only its own files and
/// batches (404 for another's, as OpenAI answers), including the output files of its batches.
#[test]
fn tenants_see_only_their_own_files_and_batches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = dir.path().join("keys");
    // Bob's key is given hashed (sha256 of the key, as `sha256sum` prints it).
    let bob_hash = {
        let out = std::process::Command::new("sha256sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write as _;
                child
                    .stdin
                    .take()
                    .expect("stdin")
                    .write_all(b"bob-key-0123456789")?;
                child.wait_with_output()
            })
            .expect("sha256sum");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .expect("digest")
            .to_string()
    };
    std::fs::write(
        &keys,
        format!("# tenant key\nalice alice-key-0123456789\nbob sha256:{bob_hash}\n"),
    )
    .expect("keys file");
    let keys_arg = keys.display().to_string();
    let mut c = Cluster::start(&["--api-keys", &keys_arg]);
    let (alice, bob) = ("alice-key-0123456789", "bob-key-0123456789");
    // The helpers use the cluster's key: Alice's.
    c.api_key = Some(alice.into());
    let url = c.url.clone();
    let as_key = move |key: &str, method: &str, path: &str, body: Option<(&str, Vec<u8>)>| {
        let r = ureq::request(method, &format!("{url}{path}"))
            .timeout(Duration::from_secs(30))
            .set("Authorization", &format!("Bearer {key}"));
        common::send(r, body)
    };
    let lines: Vec<String> = (0..3)
        .map(|i| chat_line(&format!("a{i}"), "alice's secret", 4, 1))
        .collect();
    let id = c.create_batch(&lines, "24h");
    let input = c.batch(&id)["input_file_id"]
        .as_str()
        .expect("input")
        .to_string();
    // Bob sees nothing of it.
    let (s, v) = as_key(bob, "GET", "/v1/batches", None);
    assert_eq!(
        (s, v["data"].as_array().map(Vec::len)),
        (200, Some(0)),
        "{v}"
    );
    let (s, v) = as_key(bob, "GET", "/v1/files", None);
    assert_eq!(
        (s, v["data"].as_array().map(Vec::len)),
        (200, Some(0)),
        "{v}"
    );
    for (method, path) in [
        ("GET", format!("/v1/batches/{id}")),
        ("POST", format!("/v1/batches/{id}/cancel")),
        ("GET", format!("/v1/files/{input}")),
        ("GET", format!("/v1/files/{input}/content")),
        ("DELETE", format!("/v1/files/{input}")),
    ] {
        let (s, v) = as_key(bob, method, &path, None);
        assert_eq!(s, 404, "bob {method} {path}: {v}");
    }
    let body = json!({"input_file_id": input, "endpoint": "/v1/chat/completions", "completion_window": "24h"});
    let (s, v) = as_key(
        bob,
        "POST",
        "/v1/batches",
        Some(("application/json", body.to_string().into_bytes())),
    );
    assert_eq!(s, 404, "bob made a batch of alice's file: {v}");
    // Alice's batch runs and she reads its output; Bob cannot.
    echo_worker(&mut c);
    let b = c.wait_done(&id, LONG);
    assert_eq!(b["status"], "completed", "{b}");
    let (out, _) = c.results(&b, &ids(&lines));
    assert_eq!(out.len(), 3);
    let output = b["output_file_id"].as_str().expect("output").to_string();
    let (s, _) = as_key(bob, "GET", &format!("/v1/files/{output}/content"), None);
    assert_eq!(s, 404);
    let (s, v) = as_key(alice, "GET", "/v1/files", None);
    assert_eq!(s, 200);
    assert_eq!(
        v["data"].as_array().map(Vec::len),
        Some(2),
        "input and output: {v}"
    );
    assert!(
        v["data"][0].get("owner").is_none(),
        "the owner is not part of OpenAI's object: {v}"
    );
    // Unknown keys are refused.
    let (s, _) = as_key("mallory-key-0123456789", "GET", "/v1/batches", None);
    assert_eq!(s, 401);
    // A bad keys file stops the coordinator with the line named.
    std::fs::write(&keys, "alice\n").expect("keys file");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gristmill"))
        .args([
            "coordinator",
            "--nats",
            &c.nats_url,
            "--api-keys",
            &keys_arg,
        ])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 1: expected `TENANT KEY`"), "{err}");
    // No key at all (an unset or empty $GRISTMILL_API_KEY): it refuses to start, in one line,
    // unless told to serve everyone.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gristmill"))
        .args(["coordinator", "--nats", &c.nats_url])
        .env("GRISTMILL_API_KEY", "")
        .env_remove("GRISTMILL_ALLOW_UNAUTHENTICATED")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2), "refused: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("no API key") && err.contains("--allow-unauthenticated"),
        "{err}"
    );
}

/// Finding 8, second half: a worker draining its shards after SIGTERM (a long grace period)
/// exits at once on a second SIGTERM, and the coordinator still gets every line (the shard is
/// redelivered to the next worker).
#[test]
fn a_second_sigterm_ends_a_draining_worker_at_once() {
    let mut c = Cluster::start(&["--ack-wait", "2"]);
    let lines: Vec<String> = (0..2)
        .map(|i| {
            chat_line(
                &format!("long{i}"),
                "Count slowly from one to a thousand.",
                200,
                i,
            )
        })
        .collect();
    let id = c.create_batch(&lines, "24h");
    let w = c.start_worker(&["--grace", "600"], &[]);
    c.wait_worker_ready(w);
    // Let it take the shard, then ask it to stop: it drains (the grace period is long).
    std::thread::sleep(Duration::from_secs(2));
    c.workers[w].sigterm();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        c.workers[w].child.try_wait().expect("status").is_none(),
        "the worker drains rather than exiting on the first SIGTERM:\n{}",
        c.workers[w].log_text()
    );
    let t = Instant::now();
    c.workers[w].sigterm();
    let status = c.workers[w].wait_exit(Duration::from_secs(10));
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(status.code(), Some(130), "{}", c.workers[w].log_text());
    assert!(
        c.workers[w].log_text().contains("second stop signal"),
        "{}",
        c.workers[w].log_text()
    );
    // Another worker finishes the batch: nothing was lost.
    echo_worker(&mut c);
    let b = c.wait_done(&id, LONG);
    assert_eq!(b["status"], "completed", "{b}\n{}", c.logs());
    c.results(&b, &ids(&lines));
}

/// A batch cancelled while its input is still being validated and dispatched reports every
/// line as cancelled, whenever the cancel lands: during the file-level pass, between the
/// passes, or while windows are published (its index is incomplete then, and the input file
/// names the lines). Small batches cancelled at once hit the moments between passes; a large
/// one is cancelled during its passes.
#[test]
fn a_batch_cancelled_while_it_is_dispatched_reports_every_line() {
    let c = Cluster::start(&["--max-lines", "200000"]);
    let batch = |n: usize| -> Vec<String> {
        (0..n)
            .map(|i| {
                json!({"custom_id": format!("q{i}"), "url": "/v1/chat/completions",
                    "body": {"messages": [{"role": "user", "content": format!("line {i}")}], "max_tokens": 4}})
                .to_string()
            })
            .collect()
    };
    let small = batch(40);
    let large = batch(150_000);
    let rounds: Vec<(&Vec<String>, u64)> = (0..12)
        .map(|_| (&small, 0))
        .chain([(&large, 0), (&large, 700)])
        .collect();
    for (lines, delay_ms) in rounds {
        let n = lines.len();
        let id = c.create_batch(lines, "24h");
        std::thread::sleep(Duration::from_millis(delay_ms));
        let (s, v) = c.call(c.request("POST", &format!("/v1/batches/{id}/cancel")), None);
        assert_eq!(s, 200, "{v}");
        let b = c.wait_done(&id, LONG);
        assert_eq!(b["status"], "cancelled", "{b}");
        let counts = &b["request_counts"];
        assert_eq!(
            counts["total"].as_u64(),
            Some(n as u64),
            "{n} lines, {delay_ms} ms: {b}"
        );
        assert_eq!(counts["failed"].as_u64(), Some(n as u64), "{b}");
        let err = c.file_lines(&b["error_file_id"]);
        assert_eq!(err.len(), n);
        let mut seen = std::collections::HashSet::new();
        for e in &err {
            assert_eq!(e["error"]["code"], "batch_cancelled", "{e}");
            assert!(seen.insert(e["custom_id"].as_str().expect("id").to_string()));
        }
    }
    assert_no_panics(&c);
}
