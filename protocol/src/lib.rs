//! Wire types shared by every Gristmill component.
//!
//! The batch formats are OpenAI's: an input line is
//! `{"custom_id", "method": "POST", "url", "body"}`, an output line is
//! `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}` and an
//! error line is `{"id", "custom_id", "response": null, "error": {"code", "message"}, "line"}`.
//! This crate holds only data and names; no I/O, no async runtime, no CUDA.

use serde::{Deserialize, Serialize};

pub mod cluster;
pub mod request;

pub use request::{ChatMessage, Endpoint, GenerationParams, Prompt, Request};

/// Environment variable that overrides the cache folder (`~/.cache/gristmill` by default).
pub const ENV_CACHE_DIR: &str = "GRISTMILL_CACHE_DIR";
/// File name of the default model inside `<cache>/models/`.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// One line of a batch output file: a request that completed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OutputLine {
    pub id: String,
    pub custom_id: String,
    pub response: Option<ResponseEnvelope>,
    pub error: Option<LineError>,
}

/// The HTTP-like envelope around a response body, as in OpenAI batch output.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResponseEnvelope {
    pub status_code: u16,
    pub request_id: String,
    pub body: serde_json::Value,
}

/// One line of a batch error file: a request that could not be served.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorLine {
    pub id: String,
    /// The request's `custom_id`, or `null` when the line had none (or was not JSON).
    pub custom_id: Option<String>,
    pub response: Option<ResponseEnvelope>,
    pub error: LineError,
    /// 1-based line number in the input file.
    pub line: usize,
}

/// A machine-readable code and a human message, as in OpenAI's error objects.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LineError {
    pub code: String,
    pub message: String,
    /// The field the error is about (`body.temperature`), when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
}

impl LineError {
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.to_string(),
            message: message.into(),
            param: None,
        }
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }
}

/// Why generation stopped, as OpenAI spells it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the model's context was reached.
    Length,
}

/// Token counts of one request.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// Stable error codes used in error lines.
pub mod codes {
    pub const INVALID_JSON: &str = "invalid_json";
    pub const INVALID_REQUEST: &str = "invalid_request";
    pub const DUPLICATE_CUSTOM_ID: &str = "duplicate_custom_id";
    pub const INVALID_URL: &str = "invalid_url";
    pub const CONTEXT_LENGTH_EXCEEDED: &str = "context_length_exceeded";
    pub const TEMPLATE_ERROR: &str = "chat_template_error";
    pub const INTERNAL: &str = "internal_error";
    /// The batch was cancelled before the line finished.
    pub const CANCELLED: &str = "batch_cancelled";
    /// The batch's completion window ran out before the line finished.
    pub const EXPIRED: &str = "batch_expired";
    /// The line's shard failed on every delivery (`max_deliver`).
    pub const SHARD_FAILED: &str = "shard_failed";
    /// The line is larger than one NATS message can carry.
    pub const LINE_TOO_LARGE: &str = "line_too_large";
    /// The line's response is larger than one NATS message can carry.
    pub const RESPONSE_TOO_LARGE: &str = "response_too_large";
}
