//! Structured outputs on the default model: every output of a constrained request belongs to
//! its constraint (checked with an independent JSON Schema validator), a cut-short output says
//! `length`, and a constrained request's tokens are the same alone as in a batch.

use std::collections::HashMap;

use gristmill_engine::{Completion, Engine, EngineOptions, Outcome, RunStats};
use gristmill_protocol::{
    ChatMessage, Constraint, Endpoint, FinishReason, GenerationParams, Prompt, Request,
};
use serde_json::{json, Value};

fn engine() -> Engine {
    Engine::load(&gristmill_testkit::default_model()).expect("default model loads")
}

fn chat(i: usize, content: &str, constraint: Constraint, params: GenerationParams) -> Request {
    Request {
        custom_id: format!("r{i}"),
        line: i + 1,
        endpoint: Endpoint::ChatCompletions,
        model: None,
        prompt: Prompt::Chat(vec![ChatMessage {
            role: "user".into(),
            content: content.into(),
        }]),
        params: GenerationParams {
            constraint: Some(constraint),
            ..params
        },
    }
}

fn sampled(i: usize, max_tokens: usize) -> GenerationParams {
    GenerationParams {
        max_tokens: Some(max_tokens),
        temperature: if i.is_multiple_of(3) { 0.0 } else { 0.9 },
        top_p: if i.is_multiple_of(2) { 0.95 } else { 1.0 },
        seed: Some(7000 + i as u64),
        ..GenerationParams::default()
    }
}

fn run(engine: &Engine, reqs: Vec<Request>) -> (HashMap<String, Completion>, RunStats) {
    run_with(engine, reqs, EngineOptions::default())
}

fn run_with(
    engine: &Engine,
    reqs: Vec<Request>,
    opts: EngineOptions,
) -> (HashMap<String, Completion>, RunStats) {
    let mut out = HashMap::new();
    let stats = engine.run(reqs, opts, |o| match o {
        Outcome::Done(c) => {
            out.insert(c.custom_id.clone(), c);
        }
        Outcome::Failed {
            custom_id, error, ..
        } => panic!("{custom_id} failed: {error:?}"),
    });
    (out, stats)
}

/// Schemas of the kinds OpenAI's strict mode allows: nested objects, arrays with `minItems`,
/// enums, `anyOf`, `$ref`/`$defs`, `additionalProperties: false`.
fn schemas() -> Vec<(&'static str, Value)> {
    vec![
        (
            "Describe a city as JSON.",
            json!({
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 24},
                    "population": {"type": "integer", "minimum": 0},
                    "coastal": {"type": "boolean"},
                    "location": {
                        "type": "object",
                        "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                        "required": ["lat", "lon"],
                        "additionalProperties": false
                    }
                },
                "required": ["name", "population", "coastal", "location"],
                "additionalProperties": false
            }),
        ),
        (
            "List some colours as JSON.",
            json!({
                "type": "object",
                "properties": {
                    "colours": {
                        "type": "array",
                        "items": {"enum": ["red", "green", "blue", "yellow"]},
                        "minItems": 2,
                        "maxItems": 5
                    }
                },
                "required": ["colours"],
                "additionalProperties": false
            }),
        ),
        (
            "Give a service manifest as JSON.",
            json!({
                "$defs": {
                    "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                    "file": {
                        "type": "object",
                        "properties": {
                            "path": {"type": "string", "pattern": "^[a-z]{1,8}\\.(go|py|rs)$"},
                            "lines": {"type": "integer", "minimum": 1, "maximum": 999}
                        },
                        "required": ["path", "lines"],
                        "additionalProperties": false
                    }
                },
                "type": "object",
                "properties": {
                    "kind": {"enum": ["web", "worker", "cron"]},
                    "port": {"anyOf": [{"$ref": "#/$defs/port"}, {"type": "null"}]},
                    "files": {"type": "array", "items": {"$ref": "#/$defs/file"}, "minItems": 1, "maxItems": 3}
                },
                "required": ["kind", "port", "files"],
                "additionalProperties": false
            }),
        ),
        (
            "Is water wet? Answer as JSON.",
            json!({
                "type": "object",
                "properties": {
                    "answer": {"anyOf": [{"type": "boolean"}, {"type": "string", "enum": ["unsure"]}]},
                    "confidence": {"type": "number", "minimum": 0, "maximum": 1}
                },
                "required": ["answer", "confidence"],
                "additionalProperties": false
            }),
        ),
    ]
}

#[test]
fn every_schema_constrained_output_validates_against_its_schema() {
    let e = engine();
    let schemas = schemas();
    let reqs: Vec<Request> = (0..24)
        .map(|i| {
            let (prompt, schema) = &schemas[i % schemas.len()];
            chat(
                i,
                prompt,
                Constraint::JsonSchema {
                    schema: schema.clone(),
                },
                sampled(i, 160),
            )
        })
        .collect();
    let (out, stats) = run(&e, reqs);
    assert_eq!(out.len(), 24);
    let mut stopped = 0;
    for i in 0..24 {
        let c = &out[&format!("r{i}")];
        let ch = &c.choices[0];
        if ch.finish_reason == FinishReason::Length {
            continue;
        }
        stopped += 1;
        let (_, schema) = &schemas[i % schemas.len()];
        let value: Value = serde_json::from_str(&ch.text)
            .unwrap_or_else(|e| panic!("r{i}: not JSON ({e}): {:?}", ch.text));
        let validator = jsonschema::validator_for(schema).expect("the schema is valid");
        let errors: Vec<String> = validator
            .iter_errors(&value)
            .map(|e| e.to_string())
            .collect();
        assert!(
            errors.is_empty(),
            "r{i}: {:?} breaks its schema: {errors:?}",
            ch.text
        );
    }
    assert!(
        stopped >= 18,
        "only {stopped} of 24 outputs finished within 160 tokens"
    );
    assert!(stats.masks > 0 && stats.mask_time.as_nanos() > 0);
}

#[test]
fn json_mode_regex_and_choice_hold_with_n_and_seeds() {
    let e = engine();
    let reqs = vec![
        chat(
            0,
            "Describe a cat as JSON.",
            Constraint::JsonObject,
            GenerationParams {
                n: 3,
                ..sampled(1, 120)
            },
        ),
        chat(
            1,
            "What is the phone number of the office?",
            Constraint::Regex {
                pattern: r"\(\d{3}\) \d{3}-\d{4}".into(),
            },
            GenerationParams {
                n: 2,
                ..sampled(2, 40)
            },
        ),
        chat(
            2,
            "Is the sky green? Answer.",
            Constraint::Choice {
                choices: vec!["yes".into(), "no".into(), "it depends".into()],
            },
            GenerationParams {
                n: 4,
                ..sampled(4, 10)
            },
        ),
        chat(
            3,
            "Write a sum.",
            Constraint::Grammar {
                lark: "start: num \" + \" num (\" + \" num)?\nnum: /[1-9][0-9]?/".into(),
            },
            sampled(3, 40),
        ),
    ];
    let (out, _) = run(&e, reqs);
    for (id, c) in &out {
        for ch in &c.choices {
            let t = &ch.text;
            if id == "r0" && ch.finish_reason == FinishReason::Length {
                // Free-form JSON can run past max_tokens; what it holds then is a prefix.
                assert!(t.starts_with('{'), "{t:?}");
                continue;
            }
            // The other grammars are bounded well within max_tokens.
            assert_eq!(ch.finish_reason, FinishReason::Stop, "{id}: {t:?}");
            match id.as_str() {
                "r0" => assert!(
                    serde_json::from_str::<Value>(t).is_ok_and(|v| v.is_object()),
                    "{t:?}"
                ),
                "r1" => assert!(is_phone_number(t), "{t:?}"),
                "r2" => assert!(["yes", "no", "it depends"].contains(&t.as_str()), "{t:?}"),
                _ => assert!(
                    (2..=3).contains(&t.split(" + ").count())
                        && t.split(" + ")
                            .all(|n| n.parse::<u32>().is_ok_and(|n| (1..100).contains(&n))),
                    "{t:?}"
                ),
            }
        }
    }
    // Sampled choices of one request follow their own streams.
    let r0: Vec<&str> = out["r0"].choices.iter().map(|c| c.text.as_str()).collect();
    assert!(r0[0] != r0[1] || r0[1] != r0[2], "{r0:?}");
}

/// Whether `t` matches `\(\d{3}\) \d{3}-\d{4}` (checked by hand: no regex crate in the tests).
fn is_phone_number(t: &str) -> bool {
    let b = t.as_bytes();
    let d = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    b.len() == 14
        && b[0] == b'('
        && d(1..4)
        && &b[4..6] == b") "
        && d(6..9)
        && b[9] == b'-'
        && d(10..14)
}

#[test]
fn a_schema_cut_short_by_max_tokens_finishes_with_length() {
    let e = engine();
    let schema = json!({
        "type": "object",
        "properties": {"items": {"type": "array", "items": {"type": "integer"}, "minItems": 40}},
        "required": ["items"],
        "additionalProperties": false
    });
    let (out, _) = run(
        &e,
        vec![chat(
            0,
            "Count to forty as JSON.",
            Constraint::JsonSchema {
                schema: schema.clone(),
            },
            sampled(0, 12),
        )],
    );
    let ch = &out["r0"].choices[0];
    assert_eq!(ch.finish_reason, FinishReason::Length, "{:?}", ch.text);
    assert_eq!(ch.token_ids.len(), 12);
    assert!(ch.text.starts_with("{\"items\": ["), "{:?}", ch.text);
    assert!(
        serde_json::from_str::<Value>(&ch.text).is_err(),
        "{:?}",
        ch.text
    );
}

#[test]
fn constrained_requests_are_the_same_alone_and_in_a_batch_and_plain_ones_pay_nothing() {
    let e = engine();
    let schemas = schemas();
    let batch: Vec<Request> = (0..16)
        .map(|i| {
            let (prompt, schema) = &schemas[i % schemas.len()];
            let mut r = chat(
                i,
                prompt,
                Constraint::JsonSchema {
                    schema: schema.clone(),
                },
                sampled(i, 48),
            );
            // Half constrained, half not, mixed in one batch.
            if i % 2 == 1 {
                r.params.constraint = None;
            }
            r
        })
        .collect();
    let (together, _) = run(&e, batch.clone());
    for r in batch
        .iter()
        .filter(|r| r.params.constraint.is_some())
        .take(4)
    {
        let (alone, _) = run(&e, vec![r.clone()]);
        assert_eq!(
            alone[&r.custom_id].choices[0].token_ids, together[&r.custom_id].choices[0].token_ids,
            "{} differs alone",
            r.custom_id
        );
    }
    let plain: Vec<Request> = batch
        .into_iter()
        .filter(|r| r.params.constraint.is_none())
        .collect();
    let (_, stats) = run(&e, plain);
    assert_eq!((stats.masks, stats.mask_time.as_nanos()), (0, 0));
}

/// The bytes llguidance is given for each token are the bytes the tokenizer decodes it to:
/// byte-level BPE (the default model, an HF checkpoint) and SentencePiece with byte fallback.
#[test]
fn token_bytes_agree_with_the_tokenizers_own_decoding() {
    let models = [
        gristmill_testkit::default_model(),
        gristmill_testkit::fixture("tiny-llama3"),
        gristmill_testkit::fixture("tiny-spm-llama.gguf"),
        gristmill_testkit::fixture("tiny-spm-gemma3.gguf"),
    ];
    for path in models {
        let tok = gristmill_engine::load_tokenizer(&path).expect("tokenizer loads");
        let n = tok.vocab_size();
        let bytes = tok.token_bytes(n);
        let specials = bytes.iter().filter(|b| b.first() == Some(&0xFF)).count();
        assert!(specials > 0, "{}: no special token marked", path.display());
        let plain: Vec<u32> = (0..n as u32)
            .filter(|&i| bytes[i as usize].first().is_some_and(|&b| b != 0xFF))
            .collect();
        let mut state = 12345u64;
        let mut checked = 0;
        for _ in 0..2000 {
            let ids: Vec<u32> = (0..3)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    plain[(state >> 33) as usize % plain.len()]
                })
                .collect();
            let joined: Vec<u8> = ids
                .iter()
                .flat_map(|&i| bytes[i as usize].clone())
                .collect();
            let Ok(joined) = String::from_utf8(joined) else {
                continue; // a multi-byte character cut between tokens: decoders differ there
            };
            let decoded = tok.decode(&ids).expect("decodes");
            // SentencePiece decoders drop the space mark of the first token.
            assert!(
                decoded == joined || joined.strip_prefix(' ') == Some(decoded.as_str()),
                "{}: {ids:?} decodes to {decoded:?}, bytes say {joined:?}",
                path.display()
            );
            checked += 1;
        }
        assert!(
            checked > 100,
            "{}: only {checked} sequences checked",
            path.display()
        );
    }
}

/// Preemption under memory pressure and chunked prefill recompute a constrained sequence's KV
/// cache; its guide keeps its place, so the outputs are the same as with room to spare.
#[test]
fn constrained_outputs_survive_preemption_and_chunked_prefill() {
    let e = engine();
    let schemas = schemas();
    let batch: Vec<Request> = (0..8)
        .map(|i| {
            let (prompt, schema) = &schemas[i % schemas.len()];
            chat(
                i,
                prompt,
                Constraint::JsonSchema {
                    schema: schema.clone(),
                },
                sampled(i, 40),
            )
        })
        .collect();
    let (ample, _) = run(&e, batch.clone());
    let tight = EngineOptions {
        max_num_seqs: 8,
        max_num_batched_tokens: 24,
        // Room for 14 blocks of 16 positions: each request needs about 6.
        kv_cache_bytes: 14 * 16 * e.model.kv_bytes_per_token(),
        ..EngineOptions::default()
    };
    let (squeezed, stats) = run_with(&e, batch, tight);
    assert!(
        stats.scheduler.preemptions > 0,
        "the tight cache should force preemptions"
    );
    for (id, c) in &ample {
        assert_eq!(
            squeezed[id].choices[0].token_ids, c.choices[0].token_ids,
            "{id} changed under preemption"
        );
    }
}
