//! Greedy continuations of chat prompts at both precisions (and at `fast` with an f32 KV cache,
//! to tell the f16 cache's share), for `bench/accuracy/run.sh`:
//! `cargo run --release -p gristmill-engine --example greedy -- PROMPTS.json TOKENS OUT.json`.
//!
//! PROMPTS.json is a list of user messages; each is rendered with the model's chat template and
//! continued for TOKENS tokens (end of sequence ignored) at temperature 0, on `$GRISTMILL_MODEL`
//! or the default model. OUT.json holds the prompts' token ids and each configuration's
//! generated ids (keys `exact`, `fast`, `fast f32 kv`).

use gristmill_engine::{CpuBackend, Engine, EngineOptions, KvCacheDtype, Outcome, Precision};
use gristmill_protocol::{ChatMessage, Endpoint, GenerationParams, Prompt, Request};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, prompts, tokens, out] = &args[..] else {
        eprintln!("usage: greedy PROMPTS.json TOKENS OUT.json");
        std::process::exit(2);
    };
    let prompts: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(prompts).expect("prompts file reads"))
            .expect("prompts file is a JSON list of strings");
    let tokens: usize = tokens.parse().expect("TOKENS is a number");
    let model = gristmill_engine::model_path_from_env();
    let mut result = serde_json::json!({ "model": model.display().to_string() });
    let configs = [
        ("exact", Precision::Exact, KvCacheDtype::Auto),
        ("fast", Precision::Fast, KvCacheDtype::Auto),
        ("fast f32 kv", Precision::Fast, KvCacheDtype::F32),
    ];
    for (name, precision, kv_cache_dtype) in configs {
        let backend = CpuBackend {
            precision,
            kv_cache_dtype,
        };
        let engine = Engine::load_parallel(&model, 1, backend).expect("the model loads");
        let ids: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| {
                let text = engine
                    .tokenizer
                    .apply_chat_template(&[ChatMessage {
                        role: "user".into(),
                        content: p.clone(),
                    }])
                    .expect("the chat template renders");
                engine
                    .tokenizer
                    .encode_prompt(&text)
                    .expect("the prompt encodes")
            })
            .collect();
        let reqs: Vec<Request> = ids
            .iter()
            .enumerate()
            .map(|(i, p)| Request {
                custom_id: i.to_string(),
                line: i + 1,
                endpoint: Endpoint::Completions,
                model: None,
                prompt: Prompt::Tokens(p.clone()),
                params: GenerationParams {
                    max_tokens: Some(tokens),
                    temperature: 0.0,
                    ignore_eos: true,
                    ..GenerationParams::default()
                },
            })
            .collect();
        let mut generated = vec![Vec::new(); ids.len()];
        engine.run(reqs, EngineOptions::default(), |o| match o {
            Outcome::Done(c) => {
                let i: usize = c.custom_id.parse().expect("our own ids");
                generated[i] = c.choices[0].token_ids.clone();
            }
            Outcome::Failed { error, .. } => panic!("a prompt failed: {}", error.message),
        });
        result["prompts"] = serde_json::json!(ids);
        result[name] = serde_json::json!(generated);
    }
    std::fs::write(out, serde_json::to_string(&result).expect("serialises")).expect("writes");
}
