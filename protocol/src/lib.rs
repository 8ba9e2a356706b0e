//! Wire types shared by every Gristmill component.
//!
//! The batch formats are OpenAI's: an input line is
//! `{"custom_id", "method": "POST", "url", "body"}`, an output line is
//! `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}` and an
//! error line is `{"id", "custom_id", "response": null, "error": {"code", "message"}, "line"}`.
//! This crate holds only data and names; no I/O, no async runtime, no CUDA.

use serde::{Deserialize, Serialize};

pub mod cluster;
#[cfg(feature = "otel")]
pub mod otel;
pub mod request;

pub use request::{
    ChatMessage, Constraint, Endpoint, GenerationParams, Prompt, Request, ToolChoice, Tools,
};

/// Environment variable that overrides the cache folder (`~/.cache/gristmill` by default).
pub const ENV_CACHE_DIR: &str = "GRISTMILL_CACHE_DIR";
/// File name of the default model inside `<cache>/models/`.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The cache folder: `$GRISTMILL_CACHE_DIR`, else `$HOME/.cache/gristmill`.
pub fn cache_dir() -> std::path::PathBuf {
    if let Some(d) = std::env::var_os(ENV_CACHE_DIR) {
        return std::path::PathBuf::from(d);
    }
    let home = std::env::var_os("HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from("."));
    home.join(".cache").join("gristmill")
}

/// Where the default model lives once `scripts/fetch-model.sh` has run.
pub fn default_model_path() -> std::path::PathBuf {
    cache_dir().join("models").join(DEFAULT_MODEL_FILE)
}

/// The model named by `$GRISTMILL_MODEL`, else the default model's path (which may not exist).
pub fn model_path_from_env() -> std::path::PathBuf {
    std::env::var_os("GRISTMILL_MODEL")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(default_model_path)
}

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

impl OutputLine {
    /// The output line of a request that completed with `body` (its `chat.completion` or
    /// `text_completion` object). The one place output lines are built: `gristmill run` and
    /// the coordinator's finalization both call it, so a file gives the same lines either way.
    pub fn completed(custom_id: String, body: serde_json::Value, ids: &mut IdGen) -> Self {
        Self {
            id: ids.next("batch_req_"),
            custom_id,
            response: Some(ResponseEnvelope {
                status_code: 200,
                request_id: ids.next("req_"),
                body,
            }),
            error: None,
        }
    }
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

impl ErrorLine {
    /// The error line of the request at `line` (the one place error lines are built).
    pub fn failed(
        custom_id: Option<String>,
        line: usize,
        error: LineError,
        ids: &mut IdGen,
    ) -> Self {
        Self {
            id: ids.next("batch_req_"),
            custom_id,
            response: None,
            error,
            line,
        }
    }
}

/// Short random-looking ids (`batch_req_…`, `chatcmpl-…`): unique within a process and across
/// processes started at different times; not secrets.
#[derive(Debug)]
pub struct IdGen {
    state: u64,
}

impl IdGen {
    pub fn new() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Self {
            state: t ^ (u64::from(std::process::id()) << 32),
        }
    }

    pub fn next(&mut self, prefix: &str) -> String {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        format!("{prefix}{:016x}", z ^ (z >> 31))
    }
}

impl Default for IdGen {
    fn default() -> Self {
        Self::new()
    }
}

/// OpenAI's batch statuses, and the lifecycle between them. The coordinator stores them in the
/// batch records the workers read (a shard of a batch that is no longer running is skipped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchStatus {
    Validating,
    Failed,
    InProgress,
    Finalizing,
    Completed,
    Expired,
    Cancelling,
    Cancelled,
}

impl BatchStatus {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Failed | Self::Completed | Self::Expired | Self::Cancelled
        )
    }

    /// Whether the lifecycle allows going from `self` to `to`.
    pub fn can_become(self, to: BatchStatus) -> bool {
        use BatchStatus::*;
        matches!(
            (self, to),
            (Validating, InProgress | Failed | Cancelling)
                | (InProgress, Finalizing | Cancelling)
                | (Finalizing, Completed | Expired | Cancelled)
                | (Cancelling, Finalizing | Cancelled)
        )
    }

    /// Whether the batch's shards should still run (it is being validated or is in progress).
    pub fn wants_shards_run(self) -> bool {
        matches!(self, Self::Validating | Self::InProgress)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_statuses_are_openais_names_and_only_live_ones_run_shards() {
        let table = [
            (BatchStatus::Validating, "validating", true),
            (BatchStatus::InProgress, "in_progress", true),
            (BatchStatus::Finalizing, "finalizing", false),
            (BatchStatus::Cancelling, "cancelling", false),
            (BatchStatus::Cancelled, "cancelled", false),
            (BatchStatus::Completed, "completed", false),
            (BatchStatus::Expired, "expired", false),
            (BatchStatus::Failed, "failed", false),
        ];
        for (s, name, runs) in table {
            assert_eq!(serde_json::to_value(s).expect("serialises"), name);
            assert_eq!(
                serde_json::from_value::<BatchStatus>(name.into()).expect("parses"),
                s
            );
            assert_eq!(s.wants_shards_run(), runs, "{name}");
        }
    }

    #[test]
    fn output_and_error_lines_have_openais_shape() {
        let mut ids = IdGen::new();
        let out = OutputLine::completed("a".into(), serde_json::json!({"x": 1}), &mut ids);
        let v = serde_json::to_value(&out).expect("serialises");
        assert!(v["id"]
            .as_str()
            .is_some_and(|s| s.starts_with("batch_req_")));
        assert!(v["response"]["request_id"]
            .as_str()
            .is_some_and(|s| s.starts_with("req_")));
        assert_eq!(v["response"]["status_code"], 200);
        assert_eq!(v["response"]["body"]["x"], 1);
        assert!(v["error"].is_null());
        let err = ErrorLine::failed(
            None,
            7,
            LineError::new("invalid_json", "line 7: no"),
            &mut ids,
        );
        let v = serde_json::to_value(&err).expect("serialises");
        assert!(v["custom_id"].is_null() && v["response"].is_null());
        assert_eq!(v["line"], 7);
        assert_eq!(v["error"]["code"], "invalid_json");
        assert_ne!(out.id, err.id, "ids differ");
    }
}
