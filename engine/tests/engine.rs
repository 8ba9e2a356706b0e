//! The determinism contract and the scheduler's features on the default model: a request's
//! tokens are byte-identical alone or in a batch of 64, with chunked prefill, with prefix caching
//! on or off, and across preemptions when KV memory runs short — at both precisions.

use std::collections::HashMap;

use gristmill_engine::{Engine, EngineOptions, Outcome, Precision, RunStats};
use gristmill_protocol::{ChatMessage, Endpoint, GenerationParams, Prompt, Request};

fn engine() -> Engine {
    Engine::load(&gristmill_testkit::default_model()).expect("default model loads")
}

/// The default model at each precision.
fn engines() -> [(Precision, Engine); 2] {
    [Precision::Exact, Precision::Fast].map(|p| {
        let e = Engine::load_parallel(&gristmill_testkit::default_model(), 1, p)
            .expect("default model loads");
        (p, e)
    })
}

const TOPICS: &[&str] = &[
    "rivers",
    "databases",
    "bread",
    "volcanoes",
    "compilers",
    "jazz",
    "tides",
    "bees",
];

fn request(i: usize, shared_prefix: &str) -> Request {
    let params = GenerationParams {
        max_tokens: Some(6 + i % 11),
        temperature: if i.is_multiple_of(3) { 0.0 } else { 0.8 },
        top_p: if i.is_multiple_of(2) { 0.9 } else { 1.0 },
        top_k: if i % 4 == 1 { 40 } else { 0 },
        seed: Some(1000 + i as u64),
        ..GenerationParams::default()
    };
    let topic = TOPICS[i % TOPICS.len()];
    let (endpoint, prompt) = if i.is_multiple_of(2) {
        (
            Endpoint::ChatCompletions,
            Prompt::Chat(vec![ChatMessage {
                role: "user".into(),
                content: format!("{shared_prefix}Tell me one fact about {topic} (request {i})."),
            }]),
        )
    } else {
        (
            Endpoint::Completions,
            Prompt::Text(format!(
                "{shared_prefix}A short note on {topic}, number {i}:"
            )),
        )
    };
    Request {
        custom_id: format!("r{i}"),
        line: i + 1,
        endpoint,
        model: None,
        prompt,
        params,
    }
}

fn run(
    engine: &Engine,
    reqs: Vec<Request>,
    opts: EngineOptions,
) -> (HashMap<String, Vec<Vec<u32>>>, RunStats) {
    let mut out = HashMap::new();
    let stats = engine.run(reqs, opts, |o| match o {
        Outcome::Done(c) => {
            out.insert(
                c.custom_id,
                c.choices.into_iter().map(|ch| ch.token_ids).collect(),
            );
        }
        Outcome::Failed {
            custom_id, error, ..
        } => panic!("{custom_id} failed: {}", error.message),
    });
    (out, stats)
}

fn opts(max_num_seqs: usize, budget: usize) -> EngineOptions {
    EngineOptions {
        max_num_seqs,
        max_num_batched_tokens: budget,
        ..EngineOptions::default()
    }
}

#[test]
fn outputs_are_identical_alone_and_in_a_batch_of_64() {
    for (precision, engine) in engines() {
        alone_and_batched(precision, &engine);
    }
}

fn alone_and_batched(precision: Precision, engine: &Engine) {
    let batch: Vec<Request> = (0..64).map(|i| request(i, "")).collect();
    let (together, stats) = run(engine, batch.clone(), opts(64, 4096));
    assert_eq!(together.len(), 64);
    assert_eq!(stats.max_batch, 64, "all 64 ran in one step");
    // A few requests of each kind, each run entirely alone.
    for i in [0, 1, 2, 5, 30, 63] {
        let (alone, _) = run(engine, vec![batch[i].clone()], opts(1, 4096));
        assert_eq!(
            alone[&batch[i].custom_id], together[&batch[i].custom_id],
            "{precision}: request {i} changed when batched"
        );
    }
    // Small budgets split prompts into chunks and mix them with decoding: no change either.
    let (chunked, chunked_stats) = run(engine, batch, opts(16, 37));
    assert!(
        chunked_stats.steps > 2 * stats.steps,
        "a 37-token budget should need many more steps"
    );
    assert_eq!(
        chunked, together,
        "{precision}: chunked prefill changed an output"
    );
}

#[test]
fn prefix_caching_reuses_blocks_without_changing_outputs() {
    for (precision, engine) in engines() {
        prefix_caching(precision, &engine);
    }
}

fn prefix_caching(precision: Precision, engine: &Engine) {
    let prefix = "You are reviewing a Rust workspace with a coordinator, workers, kernels and a protocol crate. \
                  Answer briefly and precisely, in one sentence, without lists. ";
    let batch: Vec<Request> = (0..24).map(|i| request(i, prefix)).collect();
    let no_cache = EngineOptions {
        enable_prefix_caching: false,
        ..opts(8, 512)
    };
    let (plain, plain_stats) = run(engine, batch.clone(), no_cache);
    assert_eq!(plain_stats.scheduler.cached_tokens, 0);
    let (cached, stats) = run(engine, batch, opts(8, 512));
    assert_eq!(
        cached, plain,
        "{precision}: prefix caching changed an output"
    );
    let s = stats.scheduler;
    let rate = s.cached_tokens as f64 / s.prefill_tokens as f64;
    eprintln!(
        "prefix cache: {} of {} prompt tokens reused ({:.0}%)",
        s.cached_tokens,
        s.prefill_tokens,
        100.0 * rate
    );
    assert!(
        rate > 0.3,
        "expected the shared prefix to be reused, hit rate {rate:.2}"
    );
}

#[test]
fn preemption_under_memory_pressure_recomputes_to_the_same_outputs() {
    for (precision, engine) in engines() {
        preemption(precision, &engine);
    }
}

fn preemption(precision: Precision, engine: &Engine) {
    let batch: Vec<Request> = (0..16).map(|i| request(i, "")).collect();
    let (ample, _) = run(engine, batch.clone(), opts(16, 2048));
    // Room for 12 blocks of 16 positions: each request needs 3–4, so only a few fit at once.
    let tight = EngineOptions {
        kv_cache_bytes: 12 * 16 * engine.model.kv_bytes_per_token(),
        ..opts(16, 2048)
    };
    let (squeezed, stats) = run(engine, batch, tight);
    assert_eq!(stats.kv_blocks, 12);
    assert!(
        stats.scheduler.preemptions > 0,
        "the tight cache should force preemptions"
    );
    eprintln!("{} preemptions", stats.scheduler.preemptions);
    assert_eq!(
        squeezed, ample,
        "{precision}: recomputation after preemption changed an output"
    );
}

#[test]
fn a_request_larger_than_the_whole_cache_fails_alone() {
    let engine = engine();
    let mut big = request(1, "");
    big.params.max_tokens = Some(500);
    let small = request(2, "");
    let tight = EngineOptions {
        kv_cache_bytes: 8 * 16 * engine.model.kv_bytes_per_token(),
        ..opts(4, 2048)
    };
    let mut done = Vec::new();
    let mut failed = Vec::new();
    engine.run(vec![big, small], tight, |o| match o {
        Outcome::Done(c) => done.push(c.custom_id),
        Outcome::Failed {
            custom_id, error, ..
        } => failed.push((custom_id, error)),
    });
    assert_eq!(done, vec!["r2".to_string()]);
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].0, "r1");
    assert!(
        failed[0].1.message.contains("--kv-cache-memory"),
        "{}",
        failed[0].1.message
    );
}

#[test]
fn requests_arriving_on_a_channel_join_the_running_batch() {
    let engine = engine();
    let mut early = request(3, "");
    early.params.max_tokens = Some(80);
    early.params.ignore_eos = true;
    let mut late = request(6, "");
    late.params.max_tokens = Some(4);
    late.params.ignore_eos = true;
    let (alone, _) = run(&engine, vec![early.clone(), late.clone()], opts(8, 512));
    let (tx, rx) = std::sync::mpsc::channel();
    let sender = std::thread::spawn(move || {
        tx.send(((), early)).expect("engine is listening");
        std::thread::sleep(std::time::Duration::from_millis(400));
        tx.send(((), late)).expect("engine is listening");
        // Dropping tx closes the stream; the engine finishes what it has.
    });
    let mut order = Vec::new();
    let mut outputs = HashMap::new();
    engine.run_channel(
        rx,
        opts(8, 512),
        |_| false,
        |_| {},
        |(), o| match o {
            Outcome::Done(c) => {
                order.push(c.custom_id.clone());
                outputs.insert(
                    c.custom_id,
                    c.choices.into_iter().map(|ch| ch.token_ids).collect(),
                );
            }
            Outcome::Failed { error, .. } => panic!("{}", error.message),
        },
    );
    sender.join().expect("sender thread");
    assert_eq!(
        order,
        vec!["r6".to_string(), "r3".to_string()],
        "the late short request finished first"
    );
    assert_eq!(outputs, alone, "arrival timing changed an output");
}

#[test]
fn n_choices_share_the_prompt_and_the_first_equals_n_1() {
    let engine = engine();
    let mut one = request(4, "");
    one.params.temperature = 0.9;
    one.params.max_tokens = Some(12);
    one.params.ignore_eos = true;
    let mut three = one.clone();
    three.params.n = 3;
    three.custom_id = "three".into();
    let mut completions = Vec::new();
    let stats = engine.run(vec![one, three], opts(8, 512), |o| match o {
        Outcome::Done(c) => completions.push(c),
        Outcome::Failed { error, .. } => panic!("{}", error.message),
    });
    completions.sort_by_key(|c| c.custom_id.clone());
    let (r4, three) = (&completions[0], &completions[1]);
    assert_eq!(three.choices.len(), 3);
    assert_eq!(
        three.choices[0].token_ids, r4.choices[0].token_ids,
        "choice 0 of n = 3 equals n = 1"
    );
    assert_ne!(
        three.choices[1].token_ids, three.choices[2].token_ids,
        "other choices sample independently"
    );
    assert_eq!(three.usage.prompt_tokens, r4.usage.prompt_tokens);
    assert_eq!(three.usage.completion_tokens, 36);
    assert!(
        stats.scheduler.cached_tokens > 0,
        "the choices share the prompt's KV blocks"
    );
}

#[test]
fn a_token_beyond_the_models_embeddings_fails_the_line_not_the_process() {
    // A tiny checkpoint whose tokenizer knows one more token than the model embeds.
    let src =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-llama3");
    let dir = tempfile::tempdir().expect("tempdir");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.path().join(f)).expect("copy");
    }
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).expect("read"))
            .expect("json");
    let extra = serde_json::json!({"id": 400, "content": "<|extra|>", "single_word": false, "lstrip": false,
        "rstrip": false, "normalized": false, "special": true});
    tok["added_tokens"]
        .as_array_mut()
        .expect("added tokens")
        .push(extra);
    std::fs::write(dir.path().join("tokenizer.json"), tok.to_string()).expect("write");
    let engine = Engine::load(dir.path()).expect("loads");
    let mut bad = request(1, "");
    bad.prompt = Prompt::Text("hello <|extra|>".into());
    let mut good = request(3, "");
    good.prompt = Prompt::Text("hello".into());
    let mut outcomes = Vec::new();
    engine.run(vec![bad, good], opts(4, 256), |o| outcomes.push(o));
    assert_eq!(outcomes.len(), 2);
    let failed = outcomes.iter().find_map(|o| match o {
        Outcome::Failed { error, .. } => Some(error.message.clone()),
        Outcome::Done(_) => None,
    });
    let msg = failed.expect("the bad line fails");
    assert!(
        msg.contains("but the model has only 320 embeddings"),
        "{msg}"
    );
    assert!(outcomes
        .iter()
        .any(|o| matches!(o, Outcome::Done(c) if c.custom_id == "r3")));
}

#[test]
fn an_aborted_request_stops_and_the_others_are_unchanged() {
    let engine = engine();
    let mut keep = request(2, "");
    keep.params.max_tokens = Some(8);
    let mut stop = request(4, "");
    stop.params.max_tokens = Some(200);
    stop.params.ignore_eos = true;
    let (alone, _) = run(&engine, vec![keep.clone()], opts(8, 512));
    let (tx, rx) = std::sync::mpsc::channel();
    tx.send((1u32, keep)).expect("engine is listening");
    tx.send((2u32, stop)).expect("engine is listening");
    drop(tx);
    let mut steps = 0;
    let mut outcomes = Vec::new();
    let mut tokens: HashMap<u32, usize> = HashMap::new();
    engine.run_channel(
        rx,
        opts(8, 512),
        // Tag 2 is aborted after a few steps, while it is still generating.
        |tag| {
            steps += 1;
            *tag == 2 && steps > 20
        },
        |tag| *tokens.entry(*tag).or_insert(0) += 1,
        |tag, o| outcomes.push((tag, o)),
    );
    assert_eq!(outcomes.len(), 2);
    for (tag, o) in outcomes {
        match (tag, o) {
            (1, Outcome::Done(c)) => {
                assert_eq!(
                    vec![c.choices[0].token_ids.clone()],
                    alone["r2"],
                    "aborting a neighbour changed an output"
                );
                assert_eq!(
                    tokens[&1], c.usage.completion_tokens,
                    "every generated token is reported under its request's tag"
                );
            }
            (2, Outcome::Failed { error, .. }) => {
                assert_eq!(error.code, gristmill_protocol::codes::CANCELLED);
                assert!(tokens[&2] > 0, "the aborted request generated some tokens");
            }
            (t, o) => panic!("unexpected outcome for tag {t}: {o:?}"),
        }
    }
}
