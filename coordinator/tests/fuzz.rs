//! Hostile input files and upload forms: the JSONL validator with the shard planner, and the
//! Files API's multipart reader, fed their seeds and thousands of deterministic mutants of them
//! (`fuzz/mutate.rs`), never panic and never make an allocation over 256 MB; every input is
//! accepted, or refused with a message that names its line (or the form's problem). Inputs
//! that once failed live in `fuzz/corpus/{jsonl,multipart}/` and are replayed first.

#[path = "../../fuzz/mutate.rs"]
mod mutate;

use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::Body;
use axum::extract::{FromRequest, Multipart};
use axum::http::{header, Request};
use gristmill_batch::intake::{byte_tokens, intake, scan, IntakeLimits, Scanned};
use gristmill_batch::shard::ShardLimits;
use gristmill_coordinator::api::read_upload;
use gristmill_protocol::cluster::ResultOutcome;
use gristmill_protocol::Endpoint;

#[global_allocator]
static ALLOC: mutate::CappedAlloc = mutate::CappedAlloc;

fn seeds(target: &str) -> Vec<Vec<u8>> {
    mutate::corpus(target).into_iter().map(|(_, d)| d).collect()
}

#[test]
fn the_validator_accepts_or_rejects_every_line_with_a_message() {
    let limits = IntakeLimits {
        max_bytes: 1 << 20,
        max_lines: 64,
        max_line_bytes: 4096,
        shard: ShardLimits {
            max_tokens: 300,
            max_lines: 3,
            max_bytes: 4096,
        },
    };
    let dictionary: &[&[u8]] = &[
        b"\"",
        b"{",
        b"}",
        b"[",
        b"]",
        b",",
        b":",
        b"\\u0000",
        b"\\ud800",
        b"1e999",
        b"-1",
        b"null",
        b"true",
        b"\"custom_id\"",
        b"\"messages\"",
        b"\"prompt\"",
        b"\"max_tokens\"",
        b"\"n\":128",
        b"\n",
        b"\r\n",
        &[0xff, 0xfe],
        b"99999999999999999999",
        b"\"role\"",
        b"\"content\"",
        b"[{\"type\":\"text\",\"text\":\"x\"}]",
    ];
    let valid = AtomicUsize::new(0);
    mutate::run("jsonl", &seeds("jsonl"), 4000, dictionary, |bytes| {
        for endpoint in [Endpoint::ChatCompletions, Endpoint::Completions] {
            match scan(bytes, endpoint, &limits) {
                Ok(lines) => {
                    for l in &lines {
                        if matches!(l, Scanned::Valid(_)) {
                            valid.fetch_add(1, Ordering::Relaxed);
                        }
                        if let Scanned::Invalid(bad) = l {
                            let want = format!("line {}", bad.line);
                            assert!(bad.error.message.starts_with(&want), "{:?}", bad.error);
                        }
                    }
                }
                Err(errors) => {
                    assert!(!errors.is_empty());
                    assert!(errors.iter().all(|(_, e)| !e.message.is_empty()));
                }
            }
            if let Ok(work) = intake("batch_f", bytes, endpoint, &limits, &byte_tokens) {
                // Every line once in the index; every valid line in exactly one shard.
                let lines = scan(bytes, endpoint, &limits).map_or(0, |l| l.len());
                assert_eq!(work.index.len(), lines);
                let shipped: usize = work.shards.iter().map(|s| s.requests.len()).sum();
                assert_eq!(shipped + work.invalid.len(), work.index.len());
                for s in &work.shards {
                    assert!(serde_json::to_vec(s).map_or(0, |v| v.len()) < 4 * 4096);
                }
                for r in &work.invalid {
                    let ResultOutcome::Failed { error } = &r.outcome else {
                        panic!("an invalid line that completed")
                    };
                    assert!(!error.message.is_empty());
                }
            }
        }
    });
    // Mutants keep many lines valid: the checks run deep, not only on broken JSON.
    let valid = valid.into_inner();
    assert!(valid > 5000, "{valid} valid lines");
}

#[test]
fn the_upload_reader_takes_one_purpose_and_one_file_or_says_why_not() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dictionary: &[&[u8]] = &[
        b"--b0undary",
        b"--b0undary--",
        b"\r\n",
        b"\r\n\r\n",
        b"Content-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n\r\n",
        b"Content-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch",
        b"Content-Type: text/plain\r\n",
        b"filename*=UTF-8''%E2%9C%93",
    ];
    let accepted = AtomicUsize::new(0);
    mutate::run(
        "multipart",
        &seeds("multipart"),
        4000,
        dictionary,
        |bytes| {
            rt.block_on(async {
                let req = Request::builder()
                    .method("POST")
                    .uri("/v1/files")
                    .header(
                        header::CONTENT_TYPE,
                        "multipart/form-data; boundary=b0undary",
                    )
                    .body(Body::from(bytes.to_vec()))
                    .expect("request");
                let Ok(form) = Multipart::from_request(req, &()).await else {
                    return;
                };
                let mut stored = Vec::new();
                match read_upload(form, 4096, &mut stored).await {
                    Ok(up) => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                        assert!(["batch", "batch_output", "user_data", "evals"]
                            .contains(&up.purpose.as_str()));
                        assert!(up.bytes <= 4096);
                        assert_eq!(up.bytes as usize, stored.len());
                        assert!(up.filename.chars().count() <= 256);
                    }
                    Err(e) => {
                        assert!(e.status().is_client_error(), "{}", e.message());
                        assert!(!e.message().is_empty());
                    }
                }
            })
        },
    );
    let accepted = accepted.into_inner();
    assert!(accepted > 500, "{accepted} uploads accepted");
}
