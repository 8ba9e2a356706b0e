//! A validated generation request: what a batch line asks for once its JSON has been checked.

use serde::{Deserialize, Serialize};

/// The two OpenAI endpoints a batch line may target.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub enum Endpoint {
    #[serde(rename = "/v1/chat/completions")]
    ChatCompletions,
    #[serde(rename = "/v1/completions")]
    Completions,
}

impl Endpoint {
    pub fn parse(url: &str) -> Option<Self> {
        match url {
            "/v1/chat/completions" => Some(Self::ChatCompletions),
            "/v1/completions" => Some(Self::Completions),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ChatCompletions => "/v1/chat/completions",
            Self::Completions => "/v1/completions",
        }
    }
}

/// One chat message with its content flattened to text.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// What the model is asked to continue.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum Prompt {
    /// Chat messages, rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
    /// Raw text for `/v1/completions`.
    Text(String),
    /// Pre-tokenized ids for `/v1/completions` (`"prompt": [1, 2, 3]`).
    Tokens(Vec<u32>),
}

/// Sampling and stopping parameters of one request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GenerationParams {
    /// Upper bound on generated tokens; `None` means "up to the model's context".
    pub max_tokens: Option<usize>,
    /// 0 means greedy.
    pub temperature: f32,
    /// 1.0 disables nucleus sampling.
    pub top_p: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// Seed of the request's own random stream; `None` draws one.
    pub seed: Option<u64>,
    /// Generation stops before any of these strings; they are not part of the output.
    pub stop: Vec<String>,
    /// Keep generating past the end-of-sequence token (benchmarks).
    pub ignore_eos: bool,
    /// Return each generated token's log-probability and this many most likely alternatives
    /// (`None`: no logprobs).
    #[serde(default)]
    pub logprobs: Option<usize>,
    /// OpenAI's penalties: each generated token's logit is lowered by `frequency_penalty` times
    /// its count so far, and by `presence_penalty` once it has appeared.
    #[serde(default)]
    pub frequency_penalty: f32,
    #[serde(default)]
    pub presence_penalty: f32,
    /// Completions to generate for the prompt (OpenAI's `n`).
    #[serde(default = "one")]
    pub n: usize,
    /// What the output must match (structured outputs), enforced token by token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraint: Option<Constraint>,
    /// The chat request's `tools` and `tool_choice`. A forced call also sets `constraint` to
    /// the call's JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Tools>,
}

/// OpenAI's `tools` with a `tool_choice` Gristmill can honour exactly.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Tools {
    /// The `tools` entries as given (`{"type": "function", "function": {...}}`), passed to the
    /// chat template as `tools`, as HF's `apply_chat_template` does.
    pub definitions: Vec<serde_json::Value>,
    pub choice: ToolChoice,
}

/// Whether and which tool the output calls.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ToolChoice {
    /// No call: the tools are only shown to the model.
    None,
    /// One call of any of the tools: the output is `{"name": …, "arguments": {…}}`.
    Required,
    /// One call of this function: the output is its arguments.
    Function(String),
}

/// A structured-output constraint: the grammar a request's output must belong to.
///
/// Batch lines spell it as OpenAI's `response_format` or as vLLM's `structured_outputs` object
/// (or its older `guided_*` fields); validation turns each into one of these.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Constraint {
    /// A JSON value valid against the JSON Schema.
    JsonSchema { schema: serde_json::Value },
    /// Any JSON object (OpenAI's JSON mode).
    JsonObject,
    /// Text matching the regular expression as a whole.
    Regex { pattern: String },
    /// Exactly one of these strings.
    Choice { choices: Vec<String> },
    /// Text derived from a grammar in llguidance's Lark dialect.
    Grammar { lark: String },
}

impl Constraint {
    /// A short name for logs and errors: `json_schema`, `regex`, ...
    pub fn kind(&self) -> &'static str {
        match self {
            Self::JsonSchema { .. } => "json_schema",
            Self::JsonObject => "json_object",
            Self::Regex { .. } => "regex",
            Self::Choice { .. } => "choice",
            Self::Grammar { .. } => "grammar",
        }
    }
}

fn one() -> usize {
    1
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            max_tokens: None,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            stop: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            n: 1,
            constraint: None,
            tools: None,
        }
    }
}

/// A batch line that passed validation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Request {
    pub custom_id: String,
    /// 1-based line number in the input file.
    pub line: usize,
    pub endpoint: Endpoint,
    /// The `model` the line named (echoed back in the response body).
    pub model: Option<String>,
    pub prompt: Prompt,
    pub params: GenerationParams,
}
