//! What travels between the coordinator and the workers over NATS JetStream, and the names of
//! the streams, subjects, consumers and buckets it travels on.
//!
//! Delivery rules these types serve (DESIGN §4): a shard is published with
//! `Nats-Msg-Id` = [`shard_msg_id`], each result with [`result_msg_id`], so JetStream drops
//! duplicates of either within its dedupe window, and the coordinator drops duplicate results by
//! `custom_id` beyond it.

use serde::{Deserialize, Serialize};

use crate::{FinishReason, LineError, Request, Usage};

/// Work-queue stream holding shards until a worker acknowledges them.
pub const SHARD_STREAM: &str = "GRISTMILL_SHARDS";
/// Subject prefix of shards: `gristmill.shards.{batch_id}`.
pub const SHARD_SUBJECT_PREFIX: &str = "gristmill.shards";
/// The durable pull consumer every worker shares.
pub const WORKER_CONSUMER: &str = "gristmill-workers";
/// Stream holding per-request results.
pub const RESULT_STREAM: &str = "GRISTMILL_RESULTS";
/// Subject prefix of results: `gristmill.results.{batch_id}`.
pub const RESULT_SUBJECT_PREFIX: &str = "gristmill.results";
/// Key-value bucket of batch state, keyed by batch id.
pub const BATCH_BUCKET: &str = "gristmill_batches";
/// Object store bucket of uploaded and produced files, keyed by file id.
pub const FILE_BUCKET: &str = "gristmill_files";
/// Key-value bucket of file metadata (OpenAI's file object), keyed by file id.
pub const FILE_META_BUCKET: &str = "gristmill_file_meta";
/// Key-value bucket of the coordinators' leader lease (`max_age` = the lease's TTL).
pub const LEADER_BUCKET: &str = "gristmill_leader";
/// The lease's key in [`LEADER_BUCKET`]; its value is the leader's identity.
pub const LEASE_KEY: &str = "coordinator";
/// NATS header on results messages naming the worker that produced them.
pub const WORKER_HEADER: &str = "Gristmill-Worker";

/// Subject a batch's shards are published on.
pub fn shard_subject(batch_id: &str) -> String {
    format!("{SHARD_SUBJECT_PREFIX}.{batch_id}")
}

/// Subject a batch's results are published on.
pub fn result_subject(batch_id: &str) -> String {
    format!("{RESULT_SUBJECT_PREFIX}.{batch_id}")
}

/// `Nats-Msg-Id` of a shard: a coordinator that republishes after a crash is deduplicated.
pub fn shard_msg_id(batch_id: &str, shard: u32) -> String {
    format!("{batch_id}/{shard}")
}

/// `Nats-Msg-Id` of a result: a worker that republishes after redelivery is deduplicated.
pub fn result_msg_id(batch_id: &str, custom_id: &str) -> String {
    format!("{batch_id}/{custom_id}")
}

/// Most results in one results-stream message: a worker publishes the results that are ready
/// together (an echo worker finishes a whole shard at once; a model finishes a few per step).
pub const MAX_RESULTS_PER_MESSAGE: usize = 64;
/// Stop adding results to a message past this many bytes (NATS's default payload limit is 1 MB).
pub const MAX_RESULT_MESSAGE_BYTES: usize = 512 * 1024;

/// `Nats-Msg-Id` of a message holding `n` results starting with `first_custom_id`: a single
/// result keeps [`result_msg_id`]. A redelivered shard that republishes the same group is
/// dropped by JetStream; any other repeat is dropped by the coordinator, which counts each
/// `custom_id` once.
pub fn result_group_msg_id(batch_id: &str, first_custom_id: &str, n: usize) -> String {
    if n == 1 {
        result_msg_id(batch_id, first_custom_id)
    } else {
        format!("{batch_id}/{first_custom_id}+{n}")
    }
}

/// Reads a results-stream message: a JSON array of results, or a single result object.
pub fn decode_results(payload: &[u8]) -> Result<Vec<ResultMessage>, serde_json::Error> {
    match payload.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => serde_json::from_slice(payload),
        _ => serde_json::from_slice(payload).map(|r| vec![r]),
    }
}

/// A unit of work: some validated lines of one batch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShardMessage {
    pub batch_id: String,
    pub shard: u32,
    /// Prompt plus `max_tokens` of every line, as the coordinator counted them (for autoscaling
    /// and progress; the worker recounts with its own tokenizer).
    pub tokens: u64,
    pub requests: Vec<Request>,
}

impl ShardMessage {
    /// The error result of one of this shard's lines after the shard failed on every one of
    /// its `attempts` deliveries (published by the worker on the last one, or by the coordinator
    /// when the worker died each time).
    pub fn failed_line(&self, req: &Request, attempts: i64, reason: &str) -> ResultMessage {
        ResultMessage {
            batch_id: self.batch_id.clone(),
            custom_id: req.custom_id.clone(),
            line: req.line,
            outcome: ResultOutcome::Failed {
                error: LineError::new(
                    crate::codes::SHARD_FAILED,
                    format!(
                        "line {}: failed after {attempts} attempts: {reason}",
                        req.line
                    ),
                ),
            },
        }
    }
}

/// What became of one line, published by a worker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResultMessage {
    pub batch_id: String,
    pub custom_id: String,
    /// 1-based line in the batch's input file.
    pub line: usize,
    pub outcome: ResultOutcome,
}

/// A completed request or the reason it failed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ResultOutcome {
    Completed {
        /// The `chat.completion` or `text_completion` body.
        body: serde_json::Value,
        finish_reason: FinishReason,
        usage: Usage,
    },
    Failed {
        error: LineError,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Endpoint, GenerationParams, Prompt};

    #[test]
    fn names_are_stable() {
        assert_eq!(shard_subject("batch_1"), "gristmill.shards.batch_1");
        assert_eq!(result_subject("batch_1"), "gristmill.results.batch_1");
        assert_eq!(shard_msg_id("batch_1", 7), "batch_1/7");
        assert_eq!(result_msg_id("batch_1", "a/b"), "batch_1/a/b");
    }

    #[test]
    fn results_decode_as_a_group_or_alone() {
        let r = ResultMessage {
            batch_id: "b".into(),
            custom_id: "a".into(),
            line: 3,
            outcome: ResultOutcome::Failed {
                error: LineError::new("x", "y"),
            },
        };
        let one = serde_json::to_vec(&r).expect("serialises");
        let many = serde_json::to_vec(&vec![r.clone(), r.clone()]).expect("serialises");
        assert_eq!(decode_results(&one).expect("one"), vec![r.clone()]);
        assert_eq!(decode_results(&many).expect("many"), vec![r.clone(), r]);
        assert!(decode_results(b"nonsense").is_err());
        assert_eq!(result_group_msg_id("b", "a", 1), "b/a");
        assert_eq!(result_group_msg_id("b", "a", 5), "b/a+5");
    }

    #[test]
    fn messages_round_trip_through_json() {
        let shard = ShardMessage {
            batch_id: "batch_1".into(),
            shard: 3,
            tokens: 42,
            requests: vec![Request {
                custom_id: "a".into(),
                line: 1,
                endpoint: Endpoint::Completions,
                model: None,
                prompt: Prompt::Text("hi".into()),
                params: GenerationParams::default(),
            }],
        };
        let text = serde_json::to_string(&shard).expect("serialises");
        assert_eq!(
            serde_json::from_str::<ShardMessage>(&text).expect("parses"),
            shard
        );
        let result = ResultMessage {
            batch_id: "batch_1".into(),
            custom_id: "a".into(),
            line: 1,
            outcome: ResultOutcome::Failed {
                error: LineError::new("invalid_request", "bad"),
            },
        };
        let v = serde_json::to_value(&result).expect("serialises");
        assert_eq!(v["outcome"]["kind"], "failed");
        assert_eq!(
            serde_json::from_value::<ResultMessage>(v).expect("parses"),
            result
        );
    }
}
