//! Validation of OpenAI batch input lines.
//!
//! Every check names the field it is about (`body.temperature`) and the line it is on, so that a
//! user can fix a 10,000-line file from the error file alone. A bad line never stops the others:
//! [`LineValidator::validate`] returns an error for that line and keeps its state (the set of
//! `custom_id`s already seen) consistent for the next one. The structured-output fields
//! (`response_format`, `structured_outputs`, `guided_*`, `tools`) are read in `structured.rs`.

use std::collections::HashSet;

use gristmill_protocol::cluster::MAX_CUSTOM_ID_BYTES;
use gristmill_protocol::{
    codes, ChatMessage, Endpoint, GenerationParams, LineError, Prompt, Request, Tools,
};
use serde_json::{Map, Value};

mod structured;
use structured::forced_call;

/// A line that failed validation: its `custom_id` when one could be read, and why it failed.
#[derive(Debug, Clone, PartialEq)]
pub struct InvalidLine {
    pub line: usize,
    pub custom_id: Option<String>,
    pub error: LineError,
}

/// Validates the lines of one batch file in order; remembers `custom_id`s to reject duplicates.
#[derive(Debug, Default)]
pub struct LineValidator {
    seen: HashSet<String>,
}

/// Largest `max_tokens` accepted before the model's own context check.
const MAX_TOKENS_LIMIT: u64 = 1 << 20;

impl LineValidator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Validates one line (`line` is 1-based). Blank lines are the caller's to skip.
    pub fn validate(&mut self, line: usize, text: &str) -> Result<Request, InvalidLine> {
        let fail = |custom_id: Option<String>, error: LineError| InvalidLine {
            line,
            custom_id,
            error,
        };
        let value: Value = serde_json::from_str(text).map_err(|e| {
            fail(
                None,
                LineError::new(
                    codes::INVALID_JSON,
                    format!("line {line} is not valid JSON: {e}"),
                ),
            )
        })?;
        let Value::Object(obj) = value else {
            return Err(fail(
                None,
                LineError::new(
                    codes::INVALID_REQUEST,
                    format!(
                        "line {line}: expected a JSON object, got {}",
                        type_name(&value)
                    ),
                ),
            ));
        };
        let custom_id = match obj.get("custom_id") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::String(_)) => {
                return Err(fail(
                    None,
                    invalid(line, "custom_id", "must not be empty".into()),
                ))
            }
            Some(other) => {
                return Err(fail(
                    None,
                    invalid(
                        line,
                        "custom_id",
                        format!("expected a string, got {}", type_name(other)),
                    ),
                ))
            }
            None => {
                return Err(fail(
                    None,
                    invalid(
                        line,
                        "custom_id",
                        "is missing; every line needs a unique custom_id".into(),
                    ),
                ))
            }
        };
        if custom_id.len() > MAX_CUSTOM_ID_BYTES {
            // The id itself is not kept: the error line names the line.
            return Err(fail(
                None,
                invalid(
                    line,
                    "custom_id",
                    format!(
                        "is {} bytes long; the limit is {MAX_CUSTOM_ID_BYTES} bytes",
                        custom_id.len()
                    ),
                ),
            ));
        }
        let id = Some(custom_id.clone());
        if !self.seen.insert(custom_id.clone()) {
            return Err(fail(
                id,
                LineError::new(
                    codes::DUPLICATE_CUSTOM_ID,
                    format!(
                        "line {line}: custom_id {custom_id:?} was already used by an earlier line; \
                         custom_ids must be unique within a batch"
                    ),
                )
                .with_param("custom_id"),
            ));
        }
        parse_request(line, custom_id, &obj).map_err(|error| fail(id, error))
    }
}

fn parse_request(
    line: usize,
    custom_id: String,
    obj: &Map<String, Value>,
) -> Result<Request, LineError> {
    if let Some(method) = obj.get("method") {
        match method {
            Value::String(m) if m.eq_ignore_ascii_case("POST") => {}
            other => {
                return Err(invalid(
                    line,
                    "method",
                    format!("must be \"POST\", got {other}"),
                ));
            }
        }
    }
    let endpoint = match obj.get("url") {
        Some(Value::String(url)) => Endpoint::parse(url).ok_or_else(|| {
            LineError::new(
                codes::INVALID_URL,
                format!(
                    "line {line}: url {url:?} is not supported; use \"/v1/chat/completions\" or \
                     \"/v1/completions\""
                ),
            )
            .with_param("url")
        })?,
        Some(other) => {
            return Err(invalid(
                line,
                "url",
                format!("expected a string, got {}", type_name(other)),
            ))
        }
        None => return Err(invalid(line, "url", "is missing".into())),
    };
    let body = match obj.get("body") {
        Some(Value::Object(b)) => b,
        Some(other) => {
            return Err(invalid(
                line,
                "body",
                format!("expected an object, got {}", type_name(other)),
            ))
        }
        None => return Err(invalid(line, "body", "is missing".into())),
    };
    let f = Fields { line, body };
    let model = f.string("model")?;
    let prompt = match endpoint {
        Endpoint::ChatCompletions => Prompt::Chat(f.messages()?),
        Endpoint::Completions => f.prompt()?,
    };
    let params = f.params(endpoint)?;
    Ok(Request {
        custom_id,
        line,
        endpoint,
        model,
        prompt,
        params,
    })
}

struct Fields<'a> {
    line: usize,
    body: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn err(&self, field: &str, msg: String) -> LineError {
        invalid(self.line, &format!("body.{field}"), msg)
    }

    fn present(&self, field: &str) -> Option<&Value> {
        self.body.get(field).filter(|v| !v.is_null())
    }

    fn string(&self, field: &str) -> Result<Option<String>, LineError> {
        match self.present(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(self.err(
                field,
                format!("expected a string, got {}", type_name(other)),
            )),
        }
    }

    fn number(&self, field: &str) -> Result<Option<f64>, LineError> {
        match self.present(field) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(other) => Err(self.err(
                field,
                format!("expected a number, got {}", type_name(other)),
            )),
        }
    }

    fn integer(&self, field: &str) -> Result<Option<i64>, LineError> {
        match self.present(field) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_i64() {
                Some(i) => Ok(Some(i)),
                None => match n.as_u64() {
                    Some(_) => Ok(Some(i64::MAX)),
                    None => Err(self.err(field, format!("expected an integer, got {n}"))),
                },
            },
            Some(other) => Err(self.err(
                field,
                format!("expected an integer, got {}", type_name(other)),
            )),
        }
    }

    fn bool(&self, field: &str) -> Result<Option<bool>, LineError> {
        match self.present(field) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.err(
                field,
                format!("expected a boolean, got {}", type_name(other)),
            )),
        }
    }

    /// Chat: `logprobs: true` with `top_logprobs` 0–20; completions: `logprobs` 0–5.
    fn logprobs(&self, endpoint: Endpoint) -> Result<Option<usize>, LineError> {
        match endpoint {
            Endpoint::ChatCompletions => {
                let on = self.bool("logprobs")?.unwrap_or(false);
                let top = self.integer("top_logprobs")?;
                match (on, top) {
                    (false, Some(_)) => {
                        Err(self.err("top_logprobs", "needs \"logprobs\": true".into()))
                    }
                    (false, None) => Ok(None),
                    (true, None) => Ok(Some(0)),
                    (true, Some(t)) if (0..=20).contains(&t) => Ok(Some(t as usize)),
                    (true, Some(t)) => {
                        Err(self.err("top_logprobs", format!("must be between 0 and 20, got {t}")))
                    }
                }
            }
            Endpoint::Completions => match self.integer("logprobs")? {
                None => Ok(None),
                Some(t) if (0..=5).contains(&t) => Ok(Some(t as usize)),
                Some(t) => Err(self.err("logprobs", format!("must be between 0 and 5, got {t}"))),
            },
        }
    }

    fn messages(&self) -> Result<Vec<ChatMessage>, LineError> {
        let list = match self.present("messages") {
            None => {
                return Err(self.err(
                    "messages",
                    "is missing; /v1/chat/completions needs a list of {role, content} messages"
                        .into(),
                ))
            }
            Some(Value::Array(list)) => list,
            Some(other) => {
                return Err(self.err(
                    "messages",
                    format!("expected an array, got {}", type_name(other)),
                ))
            }
        };
        if list.is_empty() {
            return Err(self.err("messages", "must contain at least one message".into()));
        }
        list.iter()
            .enumerate()
            .map(|(i, m)| {
                let field = format!("messages[{i}]");
                let Value::Object(m) = m else {
                    return Err(self.err(&field, format!("expected an object, got {}", type_name(m))));
                };
                let role = match m.get("role") {
                    Some(Value::String(r)) if !r.is_empty() => r.clone(),
                    Some(other) => {
                        return Err(self.err(
                            &format!("{field}.role"),
                            format!("expected a non-empty string, got {other}"),
                        ))
                    }
                    None => return Err(self.err(&format!("{field}.role"), "is missing".into())),
                };
                let content = match m.get("content") {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Null) | None if role == "assistant" => String::new(),
                    Some(Value::Array(parts)) => {
                        let mut text = String::new();
                        for (j, part) in parts.iter().enumerate() {
                            let pfield = format!("{field}.content[{j}]");
                            match (part.get("type").and_then(Value::as_str), part.get("text")) {
                                (Some("text"), Some(Value::String(t))) => text.push_str(t),
                                (Some("text"), _) => {
                                    return Err(self.err(&pfield, "a text part needs a string \"text\"".into()))
                                }
                                (Some(kind), _) => {
                                    return Err(self.err(
                                        &pfield,
                                        format!("content parts of type {kind:?} are not supported; only \"text\""),
                                    ))
                                }
                                (None, _) => {
                                    return Err(self.err(&pfield, "expected an object with \"type\": \"text\"".into()))
                                }
                            }
                        }
                        text
                    }
                    Some(other) => {
                        return Err(self.err(
                            &format!("{field}.content"),
                            format!("expected a string or an array of text parts, got {}", type_name(other)),
                        ))
                    }
                    None => return Err(self.err(&format!("{field}.content"), "is missing".into())),
                };
                Ok(ChatMessage { role, content })
            })
            .collect()
    }

    fn prompt(&self) -> Result<Prompt, LineError> {
        match self.present("prompt") {
            None => Err(self.err("prompt", "is missing; /v1/completions needs a prompt string".into())),
            Some(Value::String(s)) => Ok(Prompt::Text(s.clone())),
            Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => {
                Ok(Prompt::Text(items[0].as_str().unwrap_or_default().to_string()))
            }
            Some(Value::Array(items)) if !items.is_empty() && items.iter().all(Value::is_number) => {
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        v.as_u64().and_then(|t| u32::try_from(t).ok()).ok_or_else(|| {
                            self.err(&format!("prompt[{i}]"), format!("expected a token id, got {v}"))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map(Prompt::Tokens)
            }
            Some(Value::Array(_)) => Err(self.err(
                "prompt",
                "a batch line takes one prompt: a string, a one-element list of strings, or a list of token ids"
                    .into(),
            )),
            Some(other) => Err(self.err("prompt", format!("expected a string, got {}", type_name(other)))),
        }
    }

    fn params(&self, endpoint: Endpoint) -> Result<GenerationParams, LineError> {
        let mut p = GenerationParams::default();
        let max_tokens = match self.integer("max_completion_tokens")? {
            Some(v) => Some(("max_completion_tokens", v)),
            None => self.integer("max_tokens")?.map(|v| ("max_tokens", v)),
        };
        if let Some((field, v)) = max_tokens {
            if v < 1 {
                return Err(self.err(field, format!("must be at least 1, got {v}")));
            }
            p.max_tokens = Some(v.min(MAX_TOKENS_LIMIT as i64) as usize);
        }
        if let Some(t) = self.number("temperature")? {
            if !(0.0..=2.0).contains(&t) {
                return Err(self.err("temperature", format!("must be between 0 and 2, got {t}")));
            }
            p.temperature = t as f32;
        }
        if let Some(v) = self.number("top_p")? {
            if !(v > 0.0 && v <= 1.0) {
                return Err(self.err("top_p", format!("must be in (0, 1], got {v}")));
            }
            p.top_p = v as f32;
        }
        if let Some(v) = self.integer("top_k")? {
            // vLLM spells "disabled" as -1 and 0.
            if v < -1 {
                return Err(self.err(
                    "top_k",
                    format!("must be -1, 0 (disabled) or positive, got {v}"),
                ));
            }
            p.top_k = v.max(0) as usize;
        }
        if let Some(v) = self.integer("seed")? {
            p.seed = Some(v as u64);
        }
        p.stop = match self.present("stop") {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(self.err(
                        &format!("stop[{i}]"),
                        format!("expected a string, got {}", type_name(other)),
                    )),
                })
                .collect::<Result<_, _>>()?,
            Some(other) => {
                return Err(self.err(
                    "stop",
                    format!(
                        "expected a string or an array of strings, got {}",
                        type_name(other)
                    ),
                ))
            }
        };
        if p.stop.len() > 4 {
            return Err(self.err(
                "stop",
                format!("at most 4 stop strings, got {}", p.stop.len()),
            ));
        }
        if p.stop.iter().any(String::is_empty) {
            return Err(self.err("stop", "stop strings must not be empty".into()));
        }
        p.ignore_eos = self.bool("ignore_eos")?.unwrap_or(false);
        if let Some(n) = self.integer("n")? {
            if !(1..=128).contains(&n) {
                return Err(self.err("n", format!("must be between 1 and 128, got {n}")));
            }
            p.n = n as usize;
        }
        if self.bool("stream")? == Some(true) {
            return Err(self.err("stream", "streaming is not available in batch mode".into()));
        }
        p.logprobs = self.logprobs(endpoint)?;
        p.constraint = self.constraint()?;
        p.tools = self.tools(endpoint)?;
        if let Some(Tools {
            choice,
            definitions,
        }) = &p.tools
        {
            if let Some(c) = forced_call(choice, definitions) {
                if p.constraint.is_some() {
                    return Err(self.err(
                        "tool_choice",
                        "forces a tool call, and the line also constrains its output \
                         (response_format or structured_outputs); give only one"
                            .into(),
                    ));
                }
                p.constraint = Some(self.compiles("tool_choice", c)?);
            }
        }
        for (field, slot) in [
            ("frequency_penalty", &mut p.frequency_penalty),
            ("presence_penalty", &mut p.presence_penalty),
        ] {
            if let Some(v) = self.number(field)? {
                if !(-2.0..=2.0).contains(&v) {
                    return Err(self.err(field, format!("must be between -2 and 2, got {v}")));
                }
                *slot = v as f32;
            }
        }
        Ok(p)
    }
}

fn invalid(line: usize, field: &str, msg: String) -> LineError {
    LineError::new(
        codes::INVALID_REQUEST,
        format!("line {line}: {field} {msg}"),
    )
    .with_param(field)
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn check(lines: &[&str]) -> Vec<Result<Request, InvalidLine>> {
        let mut v = LineValidator::new();
        lines
            .iter()
            .enumerate()
            .map(|(i, l)| v.validate(i + 1, l))
            .collect()
    }

    pub(super) fn err(text: &str) -> LineError {
        check(&[text])
            .remove(0)
            .expect_err("line should be rejected")
            .error
    }

    #[test]
    fn accepts_chat_and_completion_lines() {
        let out = check(&[
            r#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":5,"temperature":0,"stop":"\n","seed":7}}"#,
            r#"{"custom_id":"b","method":"POST","url":"/v1/completions","body":{"prompt":"once","max_completion_tokens":3,"top_p":0.9,"top_k":40,"ignore_eos":true}}"#,
        ]);
        let a = out[0].as_ref().expect("chat line is valid");
        assert_eq!(a.endpoint, Endpoint::ChatCompletions);
        assert_eq!(a.params.max_tokens, Some(5));
        assert_eq!(a.params.temperature, 0.0);
        assert_eq!(a.params.stop, vec!["\n".to_string()]);
        assert_eq!(a.params.seed, Some(7));
        assert_eq!(a.model.as_deref(), Some("m"));
        let b = out[1].as_ref().expect("completion line is valid");
        assert_eq!(b.prompt, Prompt::Text("once".into()));
        assert_eq!(
            (b.params.max_tokens, b.params.top_k, b.params.ignore_eos),
            (Some(3), 40, true)
        );
        assert!((b.params.top_p - 0.9).abs() < 1e-6);
        assert_eq!(b.line, 2);
    }

    #[test]
    fn content_parts_are_joined() {
        let r = check(&[r#"{"custom_id":"a","url":"/v1/chat/completions","body":{"messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}}"#])
            .remove(0)
            .expect("valid");
        assert_eq!(
            r.prompt,
            Prompt::Chat(vec![ChatMessage {
                role: "user".into(),
                content: "ab".into()
            }])
        );
    }

    #[test]
    fn each_bad_line_names_its_problem() {
        let cases: &[(&str, &str, &str)] = &[
            ("{not json", codes::INVALID_JSON, "not valid JSON"),
            ("[1,2]", codes::INVALID_REQUEST, "expected a JSON object"),
            (
                r#"{"url":"/v1/completions","body":{"prompt":"x"}}"#,
                codes::INVALID_REQUEST,
                "custom_id is missing",
            ),
            (
                r#"{"custom_id":5,"url":"/v1/completions","body":{"prompt":"x"}}"#,
                codes::INVALID_REQUEST,
                "custom_id expected a string, got a number",
            ),
            (
                r#"{"custom_id":"a","url":"/v1/embeddings","body":{"input":"x"}}"#,
                codes::INVALID_URL,
                "\"/v1/embeddings\" is not supported",
            ),
            (
                r#"{"custom_id":"a","url":"/v1/chat/completions","body":{"model":"m"}}"#,
                codes::INVALID_REQUEST,
                "body.messages is missing",
            ),
            (
                r#"{"custom_id":"a","url":"/v1/completions","body":{}}"#,
                codes::INVALID_REQUEST,
                "body.prompt is missing",
            ),
            (
                r#"{"custom_id":"a","url":"/v1/completions","body":{"prompt":"x","temperature":"hot"}}"#,
                codes::INVALID_REQUEST,
                "body.temperature expected a number, got a string",
            ),
            (
                r#"{"custom_id":"a","url":"/v1/completions","body":{"prompt":"x","temperature":-0.5}}"#,
                codes::INVALID_REQUEST,
                "body.temperature must be between 0 and 2, got -0.5",
            ),
            (
                r#"{"custom_id":"a","url":"/v1/completions","body":{"prompt":"x","max_tokens":0}}"#,
                codes::INVALID_REQUEST,
                "body.max_tokens must be at least 1, got 0",
            ),
            (
                r#"{"custom_id":"a","url":"/v1/completions","body":{"prompt":"x","max_tokens":2.5}}"#,
                codes::INVALID_REQUEST,
                "body.max_tokens expected an integer",
            ),
            (
                r#"{"custom_id":"a","url":"/v1/chat/completions","body":{"messages":"hi"}}"#,
                codes::INVALID_REQUEST,
                "body.messages expected an array, got a string",
            ),
            (
                r#"{"custom_id":"a","url":"/v1/chat/completions","body":{"messages":[{"content":"hi"}]}}"#,
                codes::INVALID_REQUEST,
                "body.messages[0].role is missing",
            ),
            (
                r#"{"custom_id":"a","url":"/v1/completions","body":{"prompt":"x","stop":[1]}}"#,
                codes::INVALID_REQUEST,
                "body.stop[0] expected a string",
            ),
            (
                r#"{"custom_id":"a","url":"/v1/completions","body":{"prompt":"x","n":0}}"#,
                codes::INVALID_REQUEST,
                "body.n must be between 1 and 128, got 0",
            ),
            (
                r#"{"custom_id":"a","method":"GET","url":"/v1/completions","body":{"prompt":"x"}}"#,
                codes::INVALID_REQUEST,
                "method must be \"POST\"",
            ),
        ];
        for (line, code, needle) in cases {
            let e = err(line);
            assert_eq!(e.code, *code, "{line}: {e:?}");
            assert!(
                e.message.contains(needle),
                "{line}: message {:?} lacks {needle:?}",
                e.message
            );
            assert!(
                e.message.starts_with("line 1"),
                "{:?} does not name the line",
                e.message
            );
        }
    }

    #[test]
    fn custom_ids_over_the_limit_fail_their_line_and_hostile_text_is_kept_as_is() {
        let line = |id: &str| {
            serde_json::json!({"custom_id": id, "url": "/v1/completions", "body": {"prompt": "x"}})
                .to_string()
        };
        let long = "x".repeat(MAX_CUSTOM_ID_BYTES + 1);
        let fits = "y".repeat(MAX_CUSTOM_ID_BYTES);
        let out = check(&[&line(&long), &line(&fits), &line("a\r\nX-Evil: 1\u{0}")]);
        let e = out[0].as_ref().expect_err("too long");
        assert_eq!(e.error.param.as_deref(), Some("custom_id"));
        assert!(
            e.error.message.contains("513 bytes"),
            "{:?}",
            e.error.message
        );
        assert_eq!(e.custom_id, None, "a too-long id is not carried around");
        assert_eq!(out[1].as_ref().expect("at the limit").custom_id, fits);
        // Control characters are legal JSON text: the id is data, never a header.
        assert_eq!(
            out[2].as_ref().expect("valid").custom_id,
            "a\r\nX-Evil: 1\u{0}"
        );
    }

    #[test]
    fn duplicate_custom_id_is_rejected_and_first_kept() {
        let line = r#"{"custom_id":"same","url":"/v1/completions","body":{"prompt":"x"}}"#;
        let out = check(&[line, line]);
        assert!(out[0].is_ok());
        let e = out[1].as_ref().expect_err("second use is a duplicate");
        assert_eq!(e.error.code, codes::DUPLICATE_CUSTOM_ID);
        assert_eq!(e.custom_id.as_deref(), Some("same"));
        assert!(e.error.message.contains("line 2"));
    }

    #[test]
    fn logprobs_follow_each_endpoint() {
        let chat = |extra: &str| {
            check(&[&format!(r#"{{"custom_id":"a","url":"/v1/chat/completions","body":{{"messages":[{{"role":"user","content":"hi"}}]{extra}}}}}"#)]).remove(0)
        };
        assert_eq!(chat("").expect("valid").params.logprobs, None);
        assert_eq!(
            chat(r#","logprobs":true"#).expect("valid").params.logprobs,
            Some(0)
        );
        assert_eq!(
            chat(r#","logprobs":true,"top_logprobs":5"#)
                .expect("valid")
                .params
                .logprobs,
            Some(5)
        );
        assert!(chat(r#","top_logprobs":5"#)
            .expect_err("needs logprobs")
            .error
            .message
            .contains("needs"));
        assert!(chat(r#","logprobs":true,"top_logprobs":21"#).is_err());
        let comp = |extra: &str| {
            check(&[&format!(
                r#"{{"custom_id":"a","url":"/v1/completions","body":{{"prompt":"x"{extra}}}}}"#
            )])
            .remove(0)
        };
        assert_eq!(
            comp(r#","logprobs":3"#).expect("valid").params.logprobs,
            Some(3)
        );
        assert!(comp(r#","logprobs":6"#).is_err());
        assert!(
            comp(r#","logprobs":true"#).is_err(),
            "completions take an integer"
        );
    }

    #[test]
    fn penalties_are_read_and_bounded() {
        let r = check(&[r#"{"custom_id":"a","url":"/v1/completions","body":{"prompt":"x","frequency_penalty":0.5,"presence_penalty":-1}}"#])
            .remove(0)
            .expect("valid");
        assert_eq!(
            (r.params.frequency_penalty, r.params.presence_penalty),
            (0.5, -1.0)
        );
        let e = err(
            r#"{"custom_id":"a","url":"/v1/completions","body":{"prompt":"x","presence_penalty":3}}"#,
        );
        assert!(
            e.message
                .contains("body.presence_penalty must be between -2 and 2"),
            "{}",
            e.message
        );
    }

    #[test]
    fn token_prompts_are_accepted() {
        let r = check(&[r#"{"custom_id":"a","url":"/v1/completions","body":{"prompt":[1,2,3]}}"#])
            .remove(0)
            .expect("valid");
        assert_eq!(r.prompt, Prompt::Tokens(vec![1, 2, 3]));
    }
}
