//! OpenAI response bodies and batch output lines built from engine outcomes.

pub use gristmill_protocol::IdGen;
use gristmill_protocol::{Endpoint, ErrorLine, FinishReason, LineError, OutputLine, ToolChoice};
use serde_json::json;

use crate::engine::{Completion, OutputLogprob};

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `choices[0].logprobs` of a chat completion.
fn chat_logprobs(lps: &[OutputLogprob]) -> serde_json::Value {
    let entry =
        |text: &str, lp: f32| json!({"token": text, "logprob": lp, "bytes": text.as_bytes()});
    json!({
        "content": lps.iter().map(|l| {
            let mut e = entry(&l.text, l.logprob);
            e["top_logprobs"] = l.top.iter().map(|(t, lp)| entry(t, *lp)).collect();
            e
        }).collect::<Vec<_>>(),
        "refusal": null,
    })
}

/// `choices[0].logprobs` of a legacy completion.
fn completion_logprobs(lps: &[OutputLogprob]) -> serde_json::Value {
    json!({
        "tokens": lps.iter().map(|l| &l.text).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
        "top_logprobs": lps.iter().map(|l| {
            l.top.iter().map(|(t, lp)| (t.clone(), json!(lp))).collect::<serde_json::Map<_, _>>()
        }).collect::<Vec<_>>(),
        "text_offset": lps.iter().map(|l| l.offset).collect::<Vec<_>>(),
    })
}

/// The `function` object (`{"name", "arguments"}`, arguments as a JSON string) of a forced
/// tool call, and its finish reason as OpenAI reports it (`stop` for a named function,
/// `tool_calls` for `"required"`). `None` when there is no forced call or the output is not a
/// complete call (cut by `max_tokens` or a stop string): the text is then the message content.
fn tool_call(
    choice: Option<&ToolChoice>,
    ch: &crate::engine::Choice,
) -> Option<(serde_json::Value, &'static str)> {
    if ch.finish_reason != FinishReason::Stop {
        return None;
    }
    let value: serde_json::Value = serde_json::from_str(&ch.text).ok()?;
    match choice? {
        ToolChoice::None => None,
        ToolChoice::Function(name) => Some((
            json!({"name": name, "arguments": value.to_string()}),
            "stop",
        )),
        ToolChoice::Required => {
            let name = value.get("name")?.as_str()?;
            let arguments = value.get("arguments")?;
            Some((
                json!({"name": name, "arguments": arguments.to_string()}),
                "tool_calls",
            ))
        }
    }
}

/// The `chat.completion` or `text_completion` body of a finished request.
pub fn response_body(c: &Completion, default_model: &str, ids: &mut IdGen) -> serde_json::Value {
    let model = c.model.as_deref().unwrap_or(default_model);
    match c.endpoint {
        Endpoint::ChatCompletions => json!({
            "id": ids.next("chatcmpl-"),
            "object": "chat.completion",
            "created": unix_now(),
            "model": model,
            "choices": c.choices.iter().enumerate().map(|(i, ch)| {
                let (message, finish_reason) = match tool_call(c.tool_choice.as_ref(), ch) {
                    Some((call, finish)) => (
                        json!({"role": "assistant", "content": null, "refusal": null,
                               "tool_calls": [{"id": ids.next("call_"), "type": "function", "function": call}]}),
                        json!(finish),
                    ),
                    None => (
                        json!({"role": "assistant", "content": ch.text, "refusal": null}),
                        json!(ch.finish_reason),
                    ),
                };
                json!({
                    "index": i,
                    "message": message,
                    "logprobs": ch.logprobs.as_deref().map(chat_logprobs),
                    "finish_reason": finish_reason,
                })
            }).collect::<Vec<_>>(),
            "usage": c.usage,
            "system_fingerprint": format!("gristmill-{}", env!("CARGO_PKG_VERSION")),
        }),
        Endpoint::Completions => json!({
            "id": ids.next("cmpl-"),
            "object": "text_completion",
            "created": unix_now(),
            "model": model,
            "choices": c.choices.iter().enumerate().map(|(i, ch)| json!({
                "index": i,
                "text": ch.text,
                "logprobs": ch.logprobs.as_deref().map(completion_logprobs),
                "finish_reason": ch.finish_reason,
            })).collect::<Vec<_>>(),
            "usage": c.usage,
            "system_fingerprint": format!("gristmill-{}", env!("CARGO_PKG_VERSION")),
        }),
    }
}

/// A batch output line for a finished request.
pub fn output_line(c: &Completion, default_model: &str, ids: &mut IdGen) -> OutputLine {
    let body = response_body(c, default_model, ids);
    OutputLine::completed(c.custom_id.clone(), body, ids)
}

/// A batch error line for a request that failed at `line`.
pub fn error_line(
    custom_id: Option<String>,
    line: usize,
    error: LineError,
    ids: &mut IdGen,
) -> ErrorLine {
    ErrorLine::failed(custom_id, line, error, ids)
}
