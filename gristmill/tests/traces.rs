//! OpenTelemetry across processes: a coordinator and a worker (processes of the real binary)
//! export their spans over OTLP/HTTP to a collector stand-in in this test (a small HTTP server
//! decoding the protobuf bodies with the official OTLP message types), and one batch is one
//! trace: its root, the coordinator's dispatch and finalize under it, each worker's run of a
//! shard under dispatch, and the coordinator's count of that run's results under the run.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{chat_line, wait_for, Cluster};
use gristmill_protocol::cluster::{batch_trace_id, hex, span_id};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;

/// One span as the collector received it.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    trace: String,
    span: String,
    parent: String,
    attributes: Vec<(String, String)>,
}

type Spans = Arc<Mutex<Vec<Got>>>;

fn string_of(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

/// Answers OTLP/HTTP export requests on one connection (kept alive) until it closes.
fn serve(stream: TcpStream, spans: Spans) {
    let mut out = stream.try_clone().expect("clone");
    let mut r = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let (mut length, mut content_type) = (0usize, String::new());
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                match k.trim().to_ascii_lowercase().as_str() {
                    "content-length" => length = v.trim().parse().unwrap_or(0),
                    "content-type" => content_type = v.trim().to_string(),
                    _ => {}
                }
            }
        }
        let mut body = vec![0; length];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let ok = path == "/v1/traces" && content_type == "application/x-protobuf";
        if ok {
            let req = ExportTraceServiceRequest::decode(body.as_slice()).expect("OTLP protobuf");
            let mut got = spans.lock().expect("spans");
            for rs in req.resource_spans {
                let service = rs
                    .resource
                    .iter()
                    .flat_map(|r| r.attributes.iter())
                    .find(|kv| kv.key == "service.name")
                    .map(|kv| string_of(&kv.value))
                    .unwrap_or_default();
                for ss in rs.scope_spans {
                    for s in ss.spans {
                        got.push(Got {
                            service: service.clone(),
                            name: s.name,
                            trace: hex(&s.trace_id),
                            span: hex(&s.span_id),
                            parent: hex(&s.parent_span_id),
                            attributes: s
                                .attributes
                                .iter()
                                .map(|kv| (kv.key.clone(), string_of(&kv.value)))
                                .collect(),
                        });
                    }
                }
            }
        }
        let status = if ok { "200 OK" } else { "404 Not Found" };
        let answer = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n"
        );
        if out.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

/// The collector stand-in: its URL and what it received.
fn collector() -> (String, Spans) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let spans: Spans = Arc::default();
    let s = spans.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let s = s.clone();
            std::thread::spawn(move || serve(stream, s));
        }
    });
    (url, spans)
}

#[test]
fn one_batch_is_one_trace_across_coordinator_and_worker() {
    let (url, spans) = collector();
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", url.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
    ];
    let mut c = Cluster::start_with_env(&["--shard-max-lines", "4"], &env);
    c.start_worker(&["--engine", "echo", "--name", "traced-worker"], &env);
    let lines: Vec<String> = (0..10)
        .map(|i| chat_line(&format!("t-{i}"), "trace me", 8, 0))
        .collect();
    let id = c.create_batch(&lines, "24h");
    let b = c.wait_done(&id, Duration::from_secs(120));
    assert_eq!(b["status"], "completed", "{b}");
    let trace = batch_trace_id(&id);
    let root_id = span_id(&[&id]);

    // Everything arrives within a few export rounds (200 ms apart).
    let of_batch = || -> Vec<Got> {
        let got = spans.lock().expect("spans");
        got.iter().filter(|s| s.trace == trace).cloned().collect()
    };
    let got = wait_for("the batch's spans", Duration::from_secs(30), || {
        let got = of_batch();
        let n = |name: &str| got.iter().filter(|s| s.name == name).count();
        (n("batch") == 1
            && n("dispatch") >= 1
            && n("finalize") >= 1
            && n("shard") >= 3
            && n("results") >= 3)
            .then_some(got)
    });
    let names: Vec<(&str, &str)> = got
        .iter()
        .map(|s| (s.service.as_str(), s.name.as_str()))
        .collect();
    let one = |name: &str| -> &Got {
        let all: Vec<&Got> = got.iter().filter(|s| s.name == name).collect();
        assert_eq!(all.len(), 1, "one {name} span expected: {names:?}");
        all[0]
    };

    // The root: derived ids, no parent, exported by the coordinator when the batch ended.
    let root = one("batch");
    assert_eq!(
        (root.span.as_str(), root.parent.as_str()),
        (root_id.as_str(), "")
    );
    assert_eq!(root.service, "gristmill-coordinator");
    assert!(
        root.attributes
            .contains(&("batch.status".into(), "completed".into())),
        "{root:?}"
    );
    let dispatch = one("dispatch");
    let finalize = one("finalize");
    for s in [dispatch, finalize] {
        assert_eq!(
            (s.service.as_str(), s.parent.as_str()),
            ("gristmill-coordinator", root_id.as_str()),
            "{s:?}"
        );
    }
    // Each worker's run of a shard hangs under dispatch (the shard's traceparent)...
    let runs: Vec<&Got> = got.iter().filter(|s| s.name == "shard").collect();
    assert_eq!(runs.len(), 3, "three shards of 4, 4 and 2 lines: {names:?}");
    for r in &runs {
        assert_eq!(
            (r.service.as_str(), r.parent.as_str()),
            ("gristmill-worker", dispatch.span.as_str()),
            "{r:?}"
        );
    }
    // ...and the coordinator's count of each run's results under that run (its traceparent).
    let results: Vec<&Got> = got.iter().filter(|s| s.name == "results").collect();
    for r in &results {
        assert_eq!(r.service, "gristmill-coordinator");
        assert!(
            runs.iter().any(|run| run.span == r.parent),
            "results span {r:?} is no run's child"
        );
    }
    for run in &runs {
        assert!(
            results.iter().any(|r| r.parent == run.span),
            "no results under {run:?}"
        );
    }
    eprintln!("spans of the batch: {names:?}");
    // Every span id is unique (a derived id only for the root).
    let mut ids: Vec<&str> = got.iter().map(|s| s.span.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), got.len(), "{names:?}");
}

#[test]
fn an_otlp_protocol_we_do_not_speak_is_refused_by_name() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gristmill"))
        .args(["status", "--url", "http://127.0.0.1:9"])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("OTEL_EXPORTER_OTLP_PROTOCOL=grpc is not supported"),
        "{err}"
    );
    assert!(err.contains("http/protobuf"), "{err}");
}
