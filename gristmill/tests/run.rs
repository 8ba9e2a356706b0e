//! `gristmill run` end to end: the real binary, the default model, real files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use gristmill_testkit::default_model;
use serde_json::{json, Value};

fn fixture(name: &str) -> Value {
    let p = gristmill_testkit::fixture(name);
    serde_json::from_str(&std::fs::read_to_string(p).expect("fixture")).expect("json")
}

struct Run {
    out: Output,
    outputs: HashMap<String, Value>,
    errors: Vec<Value>,
}

fn run_lines(lines: &[String], extra: &[&str]) -> Run {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").expect("write input");
    let output = dir.path().join("out.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_gristmill"))
        .arg("run")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .arg("--model")
        .arg(default_model())
        .args(extra)
        .output()
        .expect("gristmill runs");
    assert!(
        out.status.success(),
        "gristmill run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = |p: PathBuf| -> Vec<Value> {
        std::fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .lines()
            .map(|l| serde_json::from_str(l).expect("output lines are JSON"))
            .collect()
    };
    let outputs = read(output)
        .into_iter()
        .map(|v| (v["custom_id"].as_str().expect("custom_id").to_string(), v))
        .collect();
    // The errors file exists exactly when a line failed.
    let errors_path = dir.path().join("out.errors.jsonl");
    let errors = if errors_path.exists() {
        read(errors_path)
    } else {
        Vec::new()
    };
    assert_eq!(
        dir.path().join("out.errors.jsonl").exists(),
        !errors.is_empty(),
        "an errors file only when something failed"
    );
    Run {
        out,
        outputs,
        errors,
    }
}

fn chat(id: &str, content: &str, body: Value) -> String {
    let mut b = json!({"model": "smollm2", "messages": [{"role": "user", "content": content}]});
    b.as_object_mut()
        .expect("object")
        .extend(body.as_object().expect("object").clone());
    json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions", "body": b}).to_string()
}

fn completion(id: &str, prompt: &str, body: Value) -> String {
    let mut b = json!({"model": "smollm2", "prompt": prompt});
    b.as_object_mut()
        .expect("object")
        .extend(body.as_object().expect("object").clone());
    json!({"custom_id": id, "method": "POST", "url": "/v1/completions", "body": b}).to_string()
}

fn text_of(v: &Value) -> String {
    let c = &v["response"]["body"]["choices"][0];
    c["message"]["content"]
        .as_str()
        .or(c["text"].as_str())
        .expect("text")
        .to_string()
}

#[test]
fn bad_lines_become_error_lines_and_the_rest_complete() {
    let long_prompt = "lorem ipsum ".repeat(5000);
    let lines = vec![
        chat("ok-chat", "Name a colour.", json!({"max_tokens": 5, "temperature": 0})),
        "this is not json".to_string(),
        json!({"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}).to_string(),
        completion("ok-completion", "Once upon a time", json!({"max_tokens": 6, "temperature": 0})),
        completion("ok-completion", "duplicate id", json!({"max_tokens": 2})),
        json!({"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}).to_string(),
        json!({"custom_id": "no-messages", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}).to_string(),
        json!({"custom_id": "no-prompt", "method": "POST", "url": "/v1/completions", "body": {"max_tokens": 3}}).to_string(),
        completion("wrong-type", "x", json!({"max_tokens": "ten"})),
        completion("cold", "x", json!({"temperature": -1})),
        completion("zero-tokens", "x", json!({"max_tokens": 0})),
        completion("too-long", &long_prompt, json!({"max_tokens": 4})),
        completion("ok-last", "The capital of France is", json!({"max_tokens": 4, "temperature": 0})),
    ];
    let r = run_lines(&lines, &[]);
    let mut ids: Vec<&str> = r.outputs.keys().map(String::as_str).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["ok-chat", "ok-completion", "ok-last"]);
    for v in r.outputs.values() {
        assert_eq!(v["response"]["status_code"], 200);
        assert!(v["error"].is_null());
        let usage = &v["response"]["body"]["usage"];
        assert!(usage["prompt_tokens"].as_u64().expect("prompt_tokens") > 0);
        assert_eq!(
            usage["total_tokens"].as_u64(),
            Some(
                usage["prompt_tokens"].as_u64().unwrap_or(0)
                    + usage["completion_tokens"].as_u64().unwrap_or(0)
            )
        );
    }
    assert_eq!(
        r.outputs["ok-chat"]["response"]["body"]["object"],
        "chat.completion"
    );
    assert_eq!(
        r.outputs["ok-completion"]["response"]["body"]["object"],
        "text_completion"
    );

    let expected: &[(usize, Option<&str>, &str, &str)] = &[
        (2, None, "invalid_json", "not valid JSON"),
        (3, None, "invalid_request", "custom_id is missing"),
        (
            5,
            Some("ok-completion"),
            "duplicate_custom_id",
            "already used",
        ),
        (6, Some("bad-url"), "invalid_url", "/v1/embeddings"),
        (
            7,
            Some("no-messages"),
            "invalid_request",
            "body.messages is missing",
        ),
        (
            8,
            Some("no-prompt"),
            "invalid_request",
            "body.prompt is missing",
        ),
        (
            9,
            Some("wrong-type"),
            "invalid_request",
            "body.max_tokens expected an integer, got a string",
        ),
        (
            10,
            Some("cold"),
            "invalid_request",
            "body.temperature must be between 0 and 2",
        ),
        (
            11,
            Some("zero-tokens"),
            "invalid_request",
            "body.max_tokens must be at least 1",
        ),
        (
            12,
            Some("too-long"),
            "context_length_exceeded",
            "the model's context is 8192 tokens",
        ),
    ];
    assert_eq!(
        r.errors.len(),
        expected.len(),
        "error lines: {:#?}",
        r.errors
    );
    for (line, id, code, needle) in expected {
        let e = r
            .errors
            .iter()
            .find(|e| e["line"] == *line)
            .unwrap_or_else(|| panic!("no error for line {line}"));
        assert_eq!(e["custom_id"].as_str(), *id, "line {line}");
        assert!(e["response"].is_null());
        assert_eq!(e["error"]["code"], *code, "line {line}: {e}");
        let msg = e["error"]["message"].as_str().expect("message");
        assert!(
            msg.contains(needle) && msg.contains(&format!("line {line}")),
            "line {line}: {msg}"
        );
    }
    let summary = String::from_utf8_lossy(&r.out.stdout);
    assert!(
        summary.contains("13 requests: 3 completed (") && summary.contains("), 10 failed"),
        "{summary}"
    );
}

#[test]
fn chat_output_and_usage_match_transformers() {
    let fx = fixture("smollm2_greedy.json");
    let engine_free_cases: Vec<&Value> = fx["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .filter(|c| c["kind"] == "chat")
        .collect();
    let tok = gristmill_engine::Engine::load(&default_model())
        .expect("model loads")
        .tokenizer;
    let mut lines = Vec::new();
    let mut want = HashMap::new();
    for (i, case) in engine_free_cases.iter().enumerate() {
        let id = format!("chat-{i}");
        let body = json!({"model": "smollm2", "messages": case["messages"], "max_tokens": 64, "temperature": 0});
        lines.push(
            json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions", "body": body})
                .to_string(),
        );
        let tokens: Vec<u32> = case["tokens"]
            .as_array()
            .expect("tokens")
            .iter()
            .map(|t| t.as_u64().expect("id") as u32)
            .collect();
        let margins: Vec<f64> = case["margins"]
            .as_array()
            .expect("m")
            .iter()
            .map(|m| m.as_f64().expect("f"))
            .collect();
        let prompt_len = case["ids"].as_array().expect("ids").len();
        want.insert(id, (tokens, margins, prompt_len));
    }
    let r = run_lines(&lines, &[]);
    for (id, (tokens, margins, prompt_len)) in want {
        let v = &r.outputs[&id];
        let usage = &v["response"]["body"]["usage"];
        assert_eq!(
            usage["prompt_tokens"].as_u64(),
            Some(prompt_len as u64),
            "{id}: prompt_tokens"
        );
        // Where the reference had no near-tie before its end of sequence, text and counts match.
        let end = tokens.iter().position(|&t| t == 2).map_or(64, |p| p + 1);
        if margins[..end].iter().all(|&m| m >= 0.05) {
            let text = tok.decode(&tokens[..end]).expect("decodes");
            assert_eq!(text_of(v), text, "{id}: text");
            assert_eq!(
                usage["completion_tokens"].as_u64(),
                Some(end as u64),
                "{id}: completion_tokens"
            );
            let reason = if end < 64 || tokens[63] == 2 {
                "stop"
            } else {
                "length"
            };
            assert_eq!(v["response"]["body"]["choices"][0]["finish_reason"], reason);
        }
    }
}

#[test]
fn seeded_and_greedy_outputs_do_not_depend_on_the_batch() {
    let probes = vec![
        completion(
            "probe-seeded",
            "A list of three fruits:",
            json!({"max_tokens": 24, "temperature": 0.9, "top_p": 0.95, "seed": 1234}),
        ),
        chat(
            "probe-greedy",
            "Write one sentence about rivers.",
            json!({"max_tokens": 24, "temperature": 0}),
        ),
        chat(
            "probe-topk",
            "Suggest a name for a cat.",
            json!({"max_tokens": 16, "temperature": 1.2, "top_k": 20, "seed": 7}),
        ),
    ];
    let alone = run_lines(&probes, &["--max-num-seqs", "1"]);
    let mut crowd: Vec<String> = (0..21)
        .map(|i| {
            completion(
                &format!("filler-{i}"),
                &format!("Filler request number {i} talks about"),
                json!({"max_tokens": 8 + i, "temperature": 0.7}),
            )
        })
        .collect();
    crowd.insert(5, probes[0].clone());
    crowd.insert(12, probes[1].clone());
    crowd.push(probes[2].clone());
    let batched = run_lines(
        &crowd,
        &["--max-num-seqs", "64", "--max-num-batched-tokens", "97"],
    );
    assert_eq!(batched.outputs.len(), 24);
    for id in ["probe-seeded", "probe-greedy", "probe-topk"] {
        assert_eq!(
            text_of(&alone.outputs[id]),
            text_of(&batched.outputs[id]),
            "{id} changed when batched"
        );
        assert_eq!(
            alone.outputs[id]["response"]["body"]["usage"],
            batched.outputs[id]["response"]["body"]["usage"],
            "{id}: usage changed when batched"
        );
    }
}

#[test]
fn stop_strings_cut_the_output_and_ignore_eos_runs_to_max_tokens() {
    let lines = vec![
        chat(
            "stop",
            "What is the capital of Japan?",
            json!({"max_tokens": 30, "temperature": 0, "stop": ["Tokyo"]}),
        ),
        chat(
            "eos",
            "What is the capital of Japan?",
            json!({"max_tokens": 30, "temperature": 0}),
        ),
        chat(
            "ignore-eos",
            "What is the capital of Japan?",
            json!({"max_tokens": 30, "temperature": 0, "ignore_eos": true}),
        ),
    ];
    let r = run_lines(&lines, &[]);
    let stop = &r.outputs["stop"]["response"]["body"];
    assert_eq!(text_of(&r.outputs["stop"]), "The capital of Japan is ");
    assert_eq!(stop["choices"][0]["finish_reason"], "stop");
    let eos = &r.outputs["eos"]["response"]["body"];
    assert_eq!(text_of(&r.outputs["eos"]), "The capital of Japan is Tokyo.");
    assert_eq!(eos["choices"][0]["finish_reason"], "stop");
    let ign = &r.outputs["ignore-eos"]["response"]["body"];
    assert_eq!(ign["usage"]["completion_tokens"], 30);
    assert_eq!(ign["choices"][0]["finish_reason"], "length");
    assert!(text_of(&r.outputs["ignore-eos"]).starts_with("The capital of Japan is Tokyo."));
}

#[test]
fn a_missing_or_corrupt_model_fails_fast_with_a_clear_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, completion("a", "hi", json!({})) + "\n").expect("write");
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"GGUF\x03\x00\x00\x00garbage").expect("write");
    for (model, needle) in [
        (dir.path().join("absent.gguf"), "does not exist"),
        (junk.clone(), "header ends early"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_gristmill"))
            .args(["run"])
            .arg(&input)
            .arg("--output")
            .arg(dir.path().join("o.jsonl"))
            .arg("--model")
            .arg(&model)
            .output()
            .expect("runs");
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&model.display().to_string()) && err.contains(needle),
            "{err}"
        );
    }
    let out = Command::new(env!("CARGO_BIN_EXE_gristmill"))
        .args(["run", "/nonexistent/input.jsonl", "--output"])
        .arg(dir.path().join("o.jsonl"))
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/input.jsonl"));
}

/// Peak resident memory (VmHWM) of a running process, in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn ten_thousand_lines_stream_through_with_bounded_memory() {
    // The tiny fixture model keeps this fast; the engine and the streaming are the same.
    let model = gristmill_testkit::fixture("tiny-llama3");
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("big.jsonl");
    let mut text = String::new();
    for i in 0..10_000 {
        let prompt = format!("fn item_{i}() {{ println!(\"{i}\"); }}");
        text +=
            &json!({"custom_id": format!("item-{i}"), "method": "POST", "url": "/v1/completions",
                        "body": {"prompt": prompt, "max_tokens": 1 + i % 3, "temperature": 0}})
            .to_string();
        text.push('\n');
    }
    std::fs::write(&input, &text).expect("write");
    let output = dir.path().join("big-out.jsonl");
    let mut child = Command::new(env!("CARGO_BIN_EXE_gristmill"))
        .arg("run")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .arg("--model")
        .arg(&model)
        .args([
            "--max-num-seqs",
            "64",
            "--kv-cache-memory",
            "32MiB",
            "--quiet",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("gristmill starts");
    let mut peak = 0;
    let status = loop {
        if let Some(kib) = peak_rss_kib(child.id()) {
            peak = peak.max(kib);
        }
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(status.success());
    let out = std::fs::read_to_string(&output).expect("output");
    let mut ids: Vec<String> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).expect("json")["custom_id"]
                .as_str()
                .expect("id")
                .to_string()
        })
        .collect();
    assert_eq!(ids.len(), 10_000, "every line completes");
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 10_000, "no line is duplicated");
    // KV memory is bounded by --kv-cache-memory (32 MiB); requests are read as the engine needs
    // them and results written as they finish, so nothing else grows with the file.
    eprintln!("peak RSS {peak} KiB for 10,000 lines");
    assert!(peak < 150 * 1024, "peak RSS {peak} KiB");
}

#[test]
fn logprobs_match_transformers_in_both_formats() {
    let fx = fixture("smollm2_logits.json");
    let case = &fx["cases"][0];
    let prompt = case["prompt"].as_str().expect("prompt");
    let last = case["positions"]
        .as_array()
        .expect("positions")
        .last()
        .expect("a position");
    let lse = last["logsumexp"].as_f64().expect("lse");
    let want: Vec<f64> = last["top_logits"]
        .as_array()
        .expect("top")
        .iter()
        .take(3)
        .map(|v| v.as_f64().expect("f") - lse)
        .collect();
    let lines = vec![
        completion(
            "legacy",
            prompt,
            json!({"max_tokens": 1, "temperature": 0, "logprobs": 3}),
        ),
        chat(
            "chat",
            "Name a colour.",
            json!({"max_tokens": 4, "temperature": 0, "logprobs": true, "top_logprobs": 2}),
        ),
        chat(
            "plain",
            "Name a colour.",
            json!({"max_tokens": 2, "temperature": 0}),
        ),
        completion(
            "two",
            prompt,
            json!({"max_tokens": 3, "temperature": 0.8, "seed": 5, "n": 2, "logprobs": 1}),
        ),
    ];
    // At `exact`, the HF-exact path: `fast` (int8 activations, an f16 KV cache) moves
    // logprobs by a few 1e-3 (bench/accuracy measures its greedy agreement instead).
    let r = run_lines(&lines, &["--precision", "exact"]);
    let lp = &r.outputs["legacy"]["response"]["body"]["choices"][0]["logprobs"];
    let got = lp["token_logprobs"][0].as_f64().expect("logprob");
    assert!(
        (got - want[0]).abs() < 2e-3,
        "sampled token logprob {got} vs transformers {}",
        want[0]
    );
    let top: Vec<f64> = lp["top_logprobs"][0]
        .as_object()
        .expect("dict")
        .values()
        .map(|v| v.as_f64().expect("f"))
        .collect();
    assert_eq!(top.len(), 3);
    for (g, w) in top.iter().zip(&want) {
        assert!((g - w).abs() < 2e-3, "top logprob {g} vs transformers {w}");
    }
    assert_eq!(lp["text_offset"][0], 0);
    assert_eq!(
        lp["tokens"][0].as_str(),
        Some(text_of(&r.outputs["legacy"]).as_str())
    );

    let content = r.outputs["chat"]["response"]["body"]["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("content")
        .clone();
    let joined: String = content
        .iter()
        .map(|e| e["token"].as_str().expect("token"))
        .collect();
    assert_eq!(
        joined,
        text_of(&r.outputs["chat"]),
        "chat logprob tokens spell the output"
    );
    for e in &content {
        assert_eq!(e["top_logprobs"].as_array().expect("top").len(), 2);
        let bytes: Vec<u8> = e["bytes"]
            .as_array()
            .expect("bytes")
            .iter()
            .map(|b| b.as_u64().expect("byte") as u8)
            .collect();
        assert_eq!(bytes, e["token"].as_str().expect("token").as_bytes());
        assert!(e["logprob"].as_f64().expect("lp") <= 0.0);
    }
    assert!(r.outputs["plain"]["response"]["body"]["choices"][0]["logprobs"].is_null());
    let two = &r.outputs["two"]["response"]["body"];
    let choices = two["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 2);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["logprobs"]["tokens"].as_array().map(Vec::len), Some(3));
    }
    assert_eq!(two["usage"]["completion_tokens"], 6);
}

#[test]
fn tensor_parallel_size_splits_the_model_and_refuses_impossible_splits() {
    let lines: Vec<String> = (0..3)
        .map(|i| {
            json!({"custom_id": format!("tp-{i}"), "method": "POST", "url": "/v1/chat/completions",
                "body": {"messages": [{"role": "user", "content": format!("Name a fruit ({i}).")}],
                         "max_tokens": 6, "temperature": 0.8, "seed": i}})
            .to_string()
        })
        .collect();
    let r = run_lines(&lines, &["--tensor-parallel-size", "3"]);
    assert_eq!(r.outputs.len(), 3, "{:?}", r.errors);
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, lines.join("\n")).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_gristmill"))
        .arg("run")
        .arg(&input)
        .arg("--output")
        .arg(dir.path().join("out.jsonl"))
        .arg("--model")
        .arg(default_model())
        .args(["--tensor-parallel-size", "2"])
        .output()
        .expect("gristmill runs");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("num_attention_heads = 9 is not divisible by 2")
            && stderr.contains("sizes that work for this model: 1, 3"),
        "{stderr}"
    );
}

/// The README's demo (issue 13): the example batch gives text a new user can read. Most
/// requests end on their own (not at `max_tokens`), and no result falls into a loop (one
/// line of words repeated over and over, as a 135M model does when asked for too much).
#[test]
fn the_demo_batch_ends_on_its_own_without_loops() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/scaffold.jsonl");
    let lines: Vec<String> = std::fs::read_to_string(&example)
        .expect("examples/scaffold.jsonl")
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(lines.len(), 12);
    let r = run_lines(&lines, &["--show", "3"]);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.outputs.len(), 12);
    let mut stopped = 0;
    for (id, v) in &r.outputs {
        let choice = &v["response"]["body"]["choices"][0];
        if choice["finish_reason"] == "stop" {
            stopped += 1;
        }
        let text = choice["message"]["content"].as_str().expect("content");
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for l in text.lines().map(str::trim) {
            if l.chars().filter(|c| c.is_alphanumeric()).count() >= 4 {
                *seen.entry(l).or_default() += 1;
            }
        }
        let worst = seen.iter().max_by_key(|(_, n)| **n);
        assert!(
            worst.is_none_or(|(_, n)| *n <= 3),
            "{id} repeats {worst:?}:\n{text}"
        );
    }
    assert!(stopped >= 9, "only {stopped} of 12 finished on their own");
    let err = String::from_utf8_lossy(&r.out.stderr);
    assert_eq!(
        err.matches("── scaffold-").count(),
        3,
        "--show 3 prints three results: {err}"
    );
    let summary = String::from_utf8_lossy(&r.out.stdout);
    assert!(
        summary.contains(&format!(
            "12 requests: 12 completed ({stopped} finished on their own"
        )),
        "{summary}"
    );
}

#[test]
fn structured_outputs_hold_through_gristmill_run_and_a_bad_schema_is_an_error_line() {
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "tier": {"enum": ["web", "worker"]},
            "ports": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 65535}, "minItems": 1, "maxItems": 2}
        },
        "required": ["name", "tier", "ports"],
        "additionalProperties": false
    });
    let lines = vec![
        chat(
            "schema",
            "Describe a web service as JSON.",
            json!({"max_tokens": 60, "seed": 3, "response_format": {"type": "json_schema",
                "json_schema": {"name": "service", "strict": true, "schema": schema}}}),
        ),
        chat(
            "bad-schema",
            "x",
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                "schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/gone"}}, "required": ["a"]}}}}),
        ),
        chat(
            "mode",
            "Give me a JSON object about a dog.",
            json!({"max_tokens": 60, "temperature": 0, "response_format": {"type": "json_object"}}),
        ),
        completion(
            "choice",
            "The best colour is",
            json!({"max_tokens": 8, "structured_outputs": {"choice": ["red", "blue"]}}),
        ),
        chat(
            "regex",
            "When?",
            json!({"max_tokens": 20, "guided_regex": "[0-9]{4}-[0-9]{2}-[0-9]{2}"}),
        ),
    ];
    let r = run_lines(&lines, &[]);
    assert_eq!(
        r.outputs.len(),
        4,
        "{}",
        String::from_utf8_lossy(&r.out.stderr)
    );
    assert_eq!(r.errors.len(), 1);
    let e = &r.errors[0];
    assert_eq!(e["custom_id"], "bad-schema");
    assert_eq!(e["error"]["code"], "invalid_request");
    let msg = e["error"]["message"].as_str().expect("message");
    assert!(
        msg.starts_with("line 2: body.response_format.json_schema.schema cannot be enforced"),
        "{msg}"
    );
    let finish =
        |id: &str| r.outputs[id]["response"]["body"]["choices"][0]["finish_reason"].clone();
    if finish("schema") == "stop" {
        let v: Value =
            serde_json::from_str(&text_of(&r.outputs["schema"])).expect("schema output parses");
        assert!(
            ["web", "worker"].contains(&v["tier"].as_str().expect("tier")),
            "{v}"
        );
        assert!(
            v["name"].as_str().is_some_and(|n| n.chars().count() <= 20),
            "{v}"
        );
    }
    if finish("mode") == "stop" {
        let m: Value =
            serde_json::from_str(&text_of(&r.outputs["mode"])).expect("json_object parses");
        assert!(m.is_object(), "{m}");
    }
    assert!(["red", "blue"].contains(&text_of(&r.outputs["choice"]).as_str()));
    let date = text_of(&r.outputs["regex"]);
    assert!(
        date.len() == 10
            && date.chars().enumerate().all(|(i, c)| if i == 4 || i == 7 {
                c == '-'
            } else {
                c.is_ascii_digit()
            }),
        "{date:?}"
    );
}

#[test]
fn forced_tool_calls_come_back_as_tool_calls() {
    let tools = json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 30}}, "required": ["zone"], "additionalProperties": false}}}
    ]);
    let lines = vec![
        chat(
            "named",
            "What is the weather in Paris?",
            json!({"max_tokens": 40, "temperature": 0, "tools": tools,
                   "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
        ),
        chat(
            "required",
            "What time is it in Tokyo?",
            json!({"max_tokens": 50, "temperature": 0, "tools": tools, "tool_choice": "required"}),
        ),
        chat("auto", "Hi", json!({"tools": tools})),
    ];
    let r = run_lines(&lines, &[]);
    assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
    assert_eq!(r.errors[0]["custom_id"], "auto");
    let call = |id: &str| {
        let c = &r.outputs[id]["response"]["body"]["choices"][0];
        assert!(c["message"]["content"].is_null(), "{c}");
        let calls = c["message"]["tool_calls"].as_array().expect("tool_calls");
        assert_eq!(calls.len(), 1, "{c}");
        assert!(calls[0]["id"]
            .as_str()
            .is_some_and(|s| s.starts_with("call_")));
        assert_eq!(calls[0]["type"], "function");
        let name = calls[0]["function"]["name"]
            .as_str()
            .expect("name")
            .to_string();
        let args: Value = serde_json::from_str(
            calls[0]["function"]["arguments"]
                .as_str()
                .expect("arguments string"),
        )
        .expect("arguments are JSON");
        (name, args, c["finish_reason"].clone())
    };
    let (name, args, finish) = call("named");
    assert_eq!((name.as_str(), finish), ("get_weather", json!("stop")));
    assert!(
        args["city"].is_string()
            && ["celsius", "fahrenheit"].contains(&args["unit"].as_str().unwrap_or("")),
        "{args}"
    );
    let (name, args, finish) = call("required");
    assert_eq!(finish, json!("tool_calls"));
    match name.as_str() {
        "get_weather" => assert!(args["city"].is_string(), "{args}"),
        "get_time" => assert!(args["zone"].is_string(), "{args}"),
        other => panic!("called {other}"),
    }
}

#[test]
fn json_logs_are_one_object_per_line_on_every_subcommand() {
    // A worker waiting for a NATS that is not there logs at info; in JSON, line by line.
    let mut child = Command::new(env!("CARGO_BIN_EXE_gristmill"))
        .args([
            "worker",
            "--log-format",
            "json",
            "--engine",
            "echo",
            "--nats",
            "nats://127.0.0.1:1",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("worker starts");
    let stderr = child.stderr.take().expect("stderr");
    let mut first = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stderr), &mut first)
        .expect("a log line");
    child.kill().expect("kill");
    child.wait().expect("wait");
    let v: Value = serde_json::from_str(&first).unwrap_or_else(|e| panic!("{e}: {first:?}"));
    assert_eq!(v["level"], "INFO", "{v}");
    assert_eq!(v["fields"]["message"], "waiting for NATS", "{v}");
    assert!(v["timestamp"].is_string() && v["target"].is_string(), "{v}");

    // The reason a process ends is a JSON line too, whatever the subcommand.
    let out = Command::new(env!("CARGO_BIN_EXE_gristmill"))
        .args(["run", "/nonexistent/batch.jsonl", "-o", "/dev/null"])
        .env("GRISTMILL_LOG_FORMAT", "json")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    let last: Value = serde_json::from_str(text.lines().last().expect("a line"))
        .unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(last["level"], "ERROR", "{last}");
    assert!(
        last["fields"]["error"]
            .as_str()
            .expect("error")
            .contains("/nonexistent/batch.jsonl"),
        "{last}"
    );
}

/// `--device` and `--load-format` as a user meets them on a build without CUDA: a GPU asked
/// for is refused with the build that has one, bad values are named, `auto` and `cpu` run, and
/// a model made of its config.json alone (`--load-format dummy`) runs end to end.
#[test]
fn device_and_load_format_flags_say_what_they_need() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        completion("a", "hi", json!({"max_tokens": 3})) + "\n",
    )
    .expect("write");
    let tiny = gristmill_testkit::fixture("tiny-llama3");
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_gristmill"))
            .arg("run")
            .arg(&input)
            .arg("--output")
            .arg(dir.path().join("o.jsonl"))
            .arg("--model")
            .arg(&tiny)
            .args(extra)
            .output()
            .expect("runs")
    };
    for (flags, needle) in [
        (&["--device", "cuda"][..], "needs a build with CUDA support"),
        (&["--device", "cuda:1"][..], "--features cuda"),
        (
            &["--device", "tpu"][..],
            "expected auto, cpu, cuda or cuda:N",
        ),
        (
            &["--gpu-memory-utilization", "1.5"][..],
            "--gpu-memory-utilization must be in (0, 1]",
        ),
        (
            &["--load-format", "pickle"][..],
            "possible values: auto, dummy",
        ),
    ] {
        let out = run(flags);
        assert_eq!(out.status.code(), Some(2), "{flags:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{flags:?}: {err}");
    }
    for flags in [&["--device", "cpu"][..], &["--device", "auto"][..]] {
        let out = run(flags);
        assert!(
            out.status.success(),
            "{flags:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = run(&["--load-format", "dummy"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: Value = serde_json::from_str(
        std::fs::read_to_string(dir.path().join("o.jsonl"))
            .expect("output")
            .lines()
            .next()
            .expect("a line"),
    )
    .expect("json");
    assert_eq!(line["response"]["body"]["usage"]["completion_tokens"], 3);
    // A GGUF file has no config.json to make a model from.
    let out = Command::new(env!("CARGO_BIN_EXE_gristmill"))
        .arg("run")
        .arg(&input)
        .arg("--output")
        .arg(dir.path().join("o.jsonl"))
        .arg("--model")
        .arg(default_model())
        .args(["--load-format", "dummy"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs an HF directory with config.json"));
}
