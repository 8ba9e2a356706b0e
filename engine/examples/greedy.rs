//! Greedy continuations of chat prompts at both precisions, for `bench/accuracy/run.sh`:
//! `cargo run --release -p gristmill-engine --example greedy -- PROMPTS.json TOKENS OUT.json`.
//!
//! PROMPTS.json is a list of user messages; each is rendered with the model's chat template and
//! continued for TOKENS tokens (end of sequence ignored) at temperature 0, on `$GRISTMILL_MODEL`
//! or the default model. OUT.json holds the prompts' token ids and each precision's generated
//! ids.

use gristmill_engine::{Engine, EngineOptions, Outcome, Precision};
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
    for precision in [Precision::Exact, Precision::Fast] {
        let engine = Engine::load_parallel(&model, 1, precision).expect("the model loads");
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
        result[precision.name()] = serde_json::json!(generated);
    }
    std::fs::write(out, serde_json::to_string(&result).expect("serialises")).expect("writes");
}
