//! What travels between the coordinator and the workers over NATS JetStream, and the names of
//! the streams, subjects, consumers and buckets it travels on.
//!
//! Delivery rules these types serve (docs/concepts/delivery-semantics.md): a shard is published with
//! `Nats-Msg-Id` = [`shard_msg_id`], each group of results with [`result_group_msg_id`] (a hash
//! of the lines it reports), so JetStream drops repeats of either within its dedupe window, and
//! the coordinator drops repeated results by line beyond it. No user text goes into a header or
//! a subject: batch ids are the coordinator's own, `custom_id`s only ever enter a hash.

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

/// NATS header carrying a W3C trace context (`traceparent`) from the coordinator to the worker
/// with each shard, and back with each results message, so that one batch's path can be
/// followed across processes in the logs (its `trace_id` is in every span of its work).
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// The W3C trace id of a batch: the first 16 bytes of SHA-256 over its id, as 32 hex digits.
/// Derived, not stored: every process (and a restarted coordinator) computes the same one.
pub fn batch_trace_id(batch_id: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, batch_id.as_bytes());
    hex(&d.as_ref()[..16])
}

/// A W3C span id (16 hex digits) for `what` within a batch's trace (a shard, a worker's run of
/// a shard): the first 8 bytes of SHA-256 over the parts.
pub fn span_id(parts: &[&str]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(p.as_bytes());
        ctx.update(&[0]);
    }
    hex(&ctx.finish().as_ref()[..8])
}

/// A `traceparent` header value: version 00, sampled.
pub fn traceparent(trace_id: &str, span_id: &str) -> String {
    format!("00-{trace_id}-{span_id}-01")
}

/// The (trace id, parent span id) of a `traceparent` value, if it is one.
pub fn parse_traceparent(value: &str) -> Option<(&str, &str)> {
    let mut parts = value.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex_of = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (version == "00"
        && hex_of(trace, 32)
        && hex_of(span, 16)
        && hex_of(flags, 2)
        && parts.next().is_none()
        && trace != "00000000000000000000000000000000"
        && span != "0000000000000000")
        .then_some((trace, span))
}

/// Lower-case hex digits of `bytes` (digests in ids and trace contexts).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Core NATS subjects (not a stream: nothing is kept) on which workers report the progress of
/// the shards they run, about once a second.
pub const PROGRESS_SUBJECT_PREFIX: &str = "gristmill.progress";

/// Subject of a batch's progress reports.
pub fn progress_subject(batch_id: &str) -> String {
    format!("{PROGRESS_SUBJECT_PREFIX}.{batch_id}")
}

/// A worker's report on a shard it is running: tokens generated so far for lines that have not
/// finished (finished lines are counted from their results). Advisory: reports may be lost or
/// late; the coordinator forgets a report after a few seconds without news, and the counts of
/// the batch stay those of its results.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProgressMessage {
    pub batch_id: String,
    pub shard: u32,
    pub worker: String,
    /// Completion tokens generated so far by the shard's unfinished lines.
    pub running_tokens: u64,
    /// The shard ended on this worker (its last report).
    #[serde(default)]
    pub done: bool,
    /// Which delivery of the shard this is (1: the first; 0 from workers that predate it).
    #[serde(default)]
    pub delivery: u32,
}

/// `Nats-Msg-Id` of a shard: a coordinator that republishes after a crash is deduplicated.
pub fn shard_msg_id(batch_id: &str, shard: u32) -> String {
    format!("{batch_id}/{shard}")
}

/// Most results in one results-stream message: a worker publishes the results that are ready
/// together (an echo worker finishes a whole shard at once; a model finishes a few per step).
pub const MAX_RESULTS_PER_MESSAGE: usize = 64;
/// Stop adding results to a message past this many bytes (NATS's default payload limit is 1 MB).
pub const MAX_RESULT_MESSAGE_BYTES: usize = 512 * 1024;

/// Longest `custom_id` accepted, in bytes (UTF-8). It travels in every shard and result and is
/// kept per line by the coordinator; a longer one is an error line for that line only.
pub const MAX_CUSTOM_ID_BYTES: usize = 512;

/// `Nats-Msg-Id` of a results message: `{batch}/r-{sha256}` over the `(custom_id, line)` of
/// every result it holds, in order, each length-prefixed — one-to-one with the lines it
/// reports, whatever text a `custom_id` holds (user text never reaches a header), so two
/// different groups never share an id and JetStream drops only a true repeat (a redelivered
/// shard publishing the same group again).
pub fn result_group_msg_id<'a>(
    batch_id: &str,
    lines: impl IntoIterator<Item = (&'a str, usize)>,
) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for (custom_id, line) in lines {
        ctx.update(&(custom_id.len() as u64).to_le_bytes());
        ctx.update(custom_id.as_bytes());
        ctx.update(&(line as u64).to_le_bytes());
    }
    format!("{batch_id}/r-{}", hex(ctx.finish().as_ref()))
}

/// `Nats-Msg-Id` of a message holding one result (a group of one).
pub fn result_msg_id(batch_id: &str, custom_id: &str, line: usize) -> String {
    result_group_msg_id(batch_id, [(custom_id, line)])
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
            shard: Some(self.shard),
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
    /// The shard that carried the line (`None` for lines rejected at intake, which the
    /// coordinator publishes itself). The coordinator counts a result only for a line of the
    /// batch, from the shard that carried it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<u32>,
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

    #[test]
    fn trace_contexts_are_w3c_shaped_and_derived_from_the_batch() {
        let t = batch_trace_id("batch_abc");
        assert_eq!(t.len(), 32);
        assert_eq!(t, batch_trace_id("batch_abc"), "the same in every process");
        assert_ne!(t, batch_trace_id("batch_abd"));
        let s = span_id(&["batch_abc", "3"]);
        assert_eq!(s.len(), 16);
        assert_ne!(s, span_id(&["batch_abc3"]), "parts are delimited");
        let tp = traceparent(&t, &s);
        assert_eq!(parse_traceparent(&tp), Some((t.as_str(), s.as_str())));
        for bad in [
            "",
            "01-00000000000000000000000000000001-0000000000000001-01",
            "00-00000000000000000000000000000000-0000000000000001-01",
            "00-abc-0000000000000001-01",
            "00-00000000000000000000000000000001-000000000000000g-01",
            "00-00000000000000000000000000000001-0000000000000001-01-x",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad:?}");
        }
    }
    use crate::{Endpoint, GenerationParams, Prompt};

    /// The ids that once collided (`{first}+{n}` against a `custom_id` spelled like one), and
    /// hostile ids: every distinct group gets its own id, and no id holds a control character.
    #[test]
    fn result_ids_are_one_to_one_with_the_lines_they_report() {
        let groups: Vec<Vec<(&str, usize)>> = vec![
            vec![("c0", 1), ("d0", 2)],
            vec![("c0+2", 3)],
            vec![("c0", 1)],
            vec![("c0", 2)],
            vec![("d0", 2), ("c0", 1)],
            vec![("a", 1), ("c", 3)],
            vec![("a", 1), ("b", 2)],
            vec![("a\r\nX-Evil: 1", 1)],
            vec![("", 7)],
            vec![("", 8)],
            vec![("ab", 1), ("", 1)],
            vec![("a", 1), ("b", 1)],
        ];
        let mut seen = std::collections::HashMap::new();
        for g in &groups {
            let id = result_group_msg_id("batch_1", g.iter().copied());
            assert!(id.bytes().all(|b| b.is_ascii_graphic()), "{id:?}");
            assert!(id.len() < 128);
            if let Some(other) = seen.insert(id.clone(), g) {
                panic!("{g:?} and {other:?} share the id {id}");
            }
        }
    }

    #[test]
    fn names_are_stable() {
        assert_eq!(shard_subject("batch_1"), "gristmill.shards.batch_1");
        assert_eq!(result_subject("batch_1"), "gristmill.results.batch_1");
        assert_eq!(shard_msg_id("batch_1", 7), "batch_1/7");
        // sha256 of le64(3) "a/b" le64(1)
        assert_eq!(
            result_msg_id("batch_1", "a/b", 1),
            "batch_1/r-c253020ff932fd58100c4cbfe5cc230fe46b89f7f8d45ff7578edee86b541f9d"
        );
    }

    #[test]
    fn results_decode_as_a_group_or_alone() {
        let r = ResultMessage {
            batch_id: "b".into(),
            custom_id: "a".into(),
            line: 3,
            shard: Some(2),
            outcome: ResultOutcome::Failed {
                error: LineError::new("x", "y"),
            },
        };
        let one = serde_json::to_vec(&r).expect("serialises");
        let many = serde_json::to_vec(&vec![r.clone(), r.clone()]).expect("serialises");
        assert_eq!(decode_results(&one).expect("one"), vec![r.clone()]);
        assert_eq!(decode_results(&many).expect("many"), vec![r.clone(), r]);
        assert!(decode_results(b"nonsense").is_err());
        assert_eq!(
            result_group_msg_id("b", [("a", 1)]),
            result_msg_id("b", "a", 1)
        );
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
            shard: None,
            outcome: ResultOutcome::Failed {
                error: LineError::new("invalid_request", "bad"),
            },
        };
        let v = serde_json::to_value(&result).expect("serialises");
        assert_eq!(v["outcome"]["kind"], "failed");
        assert!(v.get("shard").is_none(), "no shard, no field: {v}");
        assert_eq!(
            serde_json::from_value::<ResultMessage>(v).expect("parses"),
            result
        );
    }
}
