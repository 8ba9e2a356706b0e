//! The engine loop on a scripted model (no weights; `Engine::scripted`): its greedy next token
//! is `last + 1`, except that token 120 is followed by the end of sequence (2). Outputs are
//! known in advance, so admission, finishing, `n`, aborts, logprobs, prefix sharing and
//! preemption are checked exactly, in milliseconds. The numerics against HF transformers are
//! the reference tests' job (`reference.rs`).

use std::collections::HashMap;
use std::sync::Arc;

use gristmill_engine::{Engine, EngineOptions, Outcome, RunStats};
use gristmill_protocol::{codes, Endpoint, FinishReason, GenerationParams, Prompt, Request};

const EOS: u32 = 2;

fn engine() -> Engine {
    let next = Arc::new(|ctx: &[u32]| match ctx.last() {
        Some(120) => EOS,
        Some(&t) => t + 1,
        None => 3,
    });
    Engine::scripted(&gristmill_testkit::fixture("tiny-llama3"), next).expect("scripted engine")
}

fn request(id: &str, prompt: Vec<u32>, max_tokens: usize) -> Request {
    Request {
        custom_id: id.into(),
        line: 1,
        endpoint: Endpoint::Completions,
        model: None,
        prompt: Prompt::Tokens(prompt),
        params: GenerationParams {
            max_tokens: Some(max_tokens),
            temperature: 0.0,
            ..GenerationParams::default()
        },
    }
}

/// What the script generates after `prompt`, at most `max` tokens (the end of sequence
/// included when it comes).
fn expected(prompt: &[u32], max: usize) -> Vec<u32> {
    let mut out = Vec::new();
    let mut last = *prompt.last().expect("a prompt");
    while out.len() < max {
        let t = if last == 120 { EOS } else { last + 1 };
        out.push(t);
        if t == EOS {
            break;
        }
        last = t;
    }
    out
}

fn opts(kv_tokens: usize, prefix_caching: bool) -> EngineOptions {
    EngineOptions {
        max_num_seqs: 16,
        max_num_batched_tokens: 64,
        kv_cache_bytes: kv_tokens * 4,
        block_size: 4,
        enable_prefix_caching: prefix_caching,
    }
}

type Done = HashMap<String, (Vec<Vec<u32>>, Vec<FinishReason>)>;

fn run(engine: &Engine, reqs: Vec<Request>, opts: EngineOptions) -> (Done, RunStats) {
    let mut done = HashMap::new();
    let stats = engine.run(reqs, opts, |o| match o {
        Outcome::Done(c) => {
            let reasons = c.choices.iter().map(|ch| ch.finish_reason).collect();
            let tokens = c.choices.into_iter().map(|ch| ch.token_ids).collect();
            done.insert(c.custom_id, (tokens, reasons));
        }
        Outcome::Failed {
            custom_id, error, ..
        } => panic!("{custom_id}: {}", error.message),
    });
    (done, stats)
}

#[test]
fn outputs_follow_the_script_and_end_at_the_end_of_sequence_or_max_tokens() {
    let e = engine();
    let (done, _) = run(
        &e,
        vec![
            request("eos", vec![5, 110], 50),
            request("len", vec![7, 10], 5),
        ],
        opts(4096, true),
    );
    let (tokens, reasons) = &done["eos"];
    assert_eq!(tokens[0], expected(&[110], 50));
    assert_eq!(tokens[0].last(), Some(&EOS));
    assert_eq!(reasons[0], FinishReason::Stop);
    let (tokens, reasons) = &done["len"];
    assert_eq!(tokens[0], vec![11, 12, 13, 14, 15]);
    assert_eq!(reasons[0], FinishReason::Length);
}

#[test]
fn every_choice_of_n_is_generated() {
    let e = engine();
    let mut r = request("n", vec![30], 4);
    r.params.n = 3;
    let (done, _) = run(&e, vec![r], opts(4096, true));
    assert_eq!(done["n"].0, vec![vec![31, 32, 33, 34]; 3]);
}

#[test]
fn shared_prefixes_and_preemption_change_no_output() {
    let e = engine();
    // 40 requests: a shared 24-token prefix, then 1 to 8 tokens of their own.
    let prefix: Vec<u32> = (200..224).collect();
    let reqs = || -> Vec<Request> {
        (0..40)
            .map(|i| {
                let mut p = prefix.clone();
                p.extend((0..1 + i % 8).map(|k| 40 + (i * 7 + k) as u32 % 60));
                request(&format!("r{i}"), p, 12 + i % 9)
            })
            .collect()
    };
    let want: HashMap<String, Vec<u32>> = reqs()
        .into_iter()
        .map(|r| {
            let Prompt::Tokens(p) = &r.prompt else {
                unreachable!()
            };
            let max = r.params.max_tokens.unwrap_or(0);
            (r.custom_id.clone(), expected(p, max))
        })
        .collect();
    let (roomy, stats) = run(&e, reqs(), opts(8192, true));
    assert!(
        stats.scheduler.cached_tokens > 0,
        "the prefix is shared: {stats:?}"
    );
    assert_eq!(stats.scheduler.preemptions, 0);
    // KV memory for about 3 of the 16 sequences in flight: they are preempted and recomputed.
    let (tight, stats) = run(&e, reqs(), opts(160, false));
    assert!(stats.scheduler.preemptions > 0, "{stats:?}");
    for (name, done) in [("roomy", &roomy), ("tight", &tight)] {
        assert_eq!(done.len(), 40);
        for (id, tokens) in &want {
            assert_eq!(&done[id].0[0], tokens, "{id} ({name})");
        }
    }
}

#[test]
fn an_aborted_request_reports_cancelled_and_its_neighbour_is_untouched() {
    let e = engine();
    let (tx, rx) = std::sync::mpsc::channel();
    tx.send((1u32, request("keep", vec![20], 40)))
        .expect("send");
    tx.send((2u32, request("stop", vec![130], 60)))
        .expect("send");
    drop(tx);
    let mut steps = 0;
    let mut tokens: HashMap<u32, usize> = HashMap::new();
    let mut outcomes = Vec::new();
    e.run_channel(
        rx,
        opts(4096, true),
        |tag| {
            steps += 1;
            *tag == 2 && steps > 10
        },
        |tag| *tokens.entry(*tag).or_insert(0) += 1,
        |tag, o| outcomes.push((tag, o)),
    );
    assert_eq!(outcomes.len(), 2);
    for (tag, o) in outcomes {
        match (tag, o) {
            (1, Outcome::Done(c)) => {
                assert_eq!(c.choices[0].token_ids, expected(&[20], 40));
                assert_eq!(tokens[&1], c.usage.completion_tokens);
            }
            (2, Outcome::Failed { error, .. }) => {
                assert_eq!(error.code, codes::CANCELLED);
                assert!(tokens[&2] < 60, "stopped early");
            }
            (t, o) => panic!("tag {t}: {o:?}"),
        }
    }
}

#[test]
fn logprobs_are_those_of_the_scripted_logits() {
    let e = engine();
    let mut r = request("lp", vec![40], 3);
    r.params.logprobs = Some(2);
    let mut got = None;
    e.run(vec![r], opts(4096, true), |o| {
        if let Outcome::Done(c) = o {
            got = c.choices[0].logprobs.clone();
        }
    });
    let lps = got.expect("logprobs");
    assert_eq!(lps.len(), 3);
    // Logits: 10 on the chosen token, 0 on the 319 others.
    let vocab = 320.0f64;
    let want = (10.0 - (10f64.exp() + (vocab - 1.0)).ln()) as f32;
    for lp in &lps {
        assert!((lp.logprob - want).abs() < 1e-4, "{} vs {want}", lp.logprob);
        assert_eq!(lp.top.len(), 2);
        assert!(
            (lp.top[0].1 - want).abs() < 1e-4,
            "the chosen token is the most likely"
        );
        assert!(lp.top[1].1 < lp.top[0].1);
    }
}
