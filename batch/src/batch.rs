//! A batch's lifecycle, as OpenAI defines it, as a pure state machine.
//!
//! `validating → in_progress → finalizing → completed`, with `failed` (validation),
//! `cancelling → cancelled` and `expired` (the completion window ran out) on the side. Terminal
//! states never change again. Results are counted once per line through the batch's
//! [`Ledger`], so a result delivered twice (a worker crashed after publishing, its shard went to
//! another worker) is not counted twice, a result for a line the batch does not have is not
//! counted at all, and `completed + failed == total` holds once every line has reported.

use crate::ledger::{Ledger, Recorded};

use gristmill_protocol::{Endpoint, LineError};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub use gristmill_protocol::BatchStatus;

/// A transition the lifecycle does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("batch {id} cannot go from {from:?} to {to:?}")]
pub struct TransitionError {
    pub id: String,
    pub from: BatchStatus,
    pub to: BatchStatus,
}

/// Longest completion window accepted (OpenAI offers 24 h; longer jobs should be split).
pub const MAX_COMPLETION_WINDOW_S: u64 = 7 * 24 * 3600;

/// Parses a completion window such as `24h`, `6h`, `90m` or `3600s`.
pub fn parse_completion_window(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = num.parse().map_err(|_| {
        format!("completion_window {text:?} must look like \"24h\", \"90m\" or \"3600s\"")
    })?;
    let secs = match unit {
        "h" => n.saturating_mul(3600),
        "m" => n.saturating_mul(60),
        "s" => n,
        _ => {
            return Err(format!(
                "completion_window {text:?} must look like \"24h\", \"90m\" or \"3600s\""
            ))
        }
    };
    if secs == 0 || secs > MAX_COMPLETION_WINDOW_S {
        return Err(format!(
            "completion_window {text:?} must be between 1s and 168h"
        ));
    }
    Ok(secs)
}

/// Everything the coordinator keeps about one batch (stored in the batch KV bucket).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BatchRecord {
    pub id: String,
    pub endpoint: Endpoint,
    pub input_file_id: String,
    /// As the client sent it (`"24h"`).
    pub completion_window: String,
    pub status: BatchStatus,
    pub created_at: u64,
    pub expires_at: u64,
    pub in_progress_at: Option<u64>,
    pub finalizing_at: Option<u64>,
    pub completed_at: Option<u64>,
    pub failed_at: Option<u64>,
    pub expired_at: Option<u64>,
    pub cancelling_at: Option<u64>,
    pub cancelled_at: Option<u64>,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    /// Valid lines (those dispatched to workers) plus lines rejected by validation.
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
    /// File-level validation errors (`errors.data`), with the line they concern.
    pub errors: Vec<(Option<usize>, LineError)>,
    pub metadata: Option<Value>,
    /// Prompt plus `max_tokens` of every dispatched line (the shard planner's count).
    #[serde(default)]
    pub tokens: u64,
    /// Tokens of the prompts and completions of completed lines (OpenAI's batch `usage`).
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    /// Shards dispatched.
    #[serde(default)]
    pub shards: u32,
    /// Where `finalizing` or `cancelling` ends: `completed`, `cancelled` or `expired`.
    #[serde(default)]
    pub ending: Option<BatchStatus>,
    /// The tenant that owns the batch (not part of OpenAI's object; `None`: the default one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The batch's lines and which have reported. Not stored here: its lines come from the
    /// batch's index object, its reports (and the counts) from replaying the results stream.
    #[serde(skip)]
    pub ledger: Ledger,
}

impl BatchRecord {
    /// A new batch in `validating`.
    pub fn new(
        id: String,
        endpoint: Endpoint,
        input_file_id: String,
        completion_window: String,
        window_s: u64,
        metadata: Option<Value>,
        now: u64,
    ) -> Self {
        Self {
            id,
            endpoint,
            input_file_id,
            completion_window,
            status: BatchStatus::Validating,
            created_at: now,
            expires_at: now + window_s,
            in_progress_at: None,
            finalizing_at: None,
            completed_at: None,
            failed_at: None,
            expired_at: None,
            cancelling_at: None,
            cancelled_at: None,
            output_file_id: None,
            error_file_id: None,
            total: 0,
            completed: 0,
            failed: 0,
            errors: Vec::new(),
            metadata,
            tokens: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            shards: 0,
            ending: None,
            owner: None,
            ledger: Ledger::open(),
        }
    }

    /// Moves to `to` at time `now`, stamping the matching `*_at` field.
    pub fn transition(&mut self, to: BatchStatus, now: u64) -> Result<(), TransitionError> {
        if !self.status.can_become(to) {
            return Err(TransitionError {
                id: self.id.clone(),
                from: self.status,
                to,
            });
        }
        let stamp = match to {
            BatchStatus::InProgress => &mut self.in_progress_at,
            BatchStatus::Finalizing => &mut self.finalizing_at,
            BatchStatus::Completed => &mut self.completed_at,
            BatchStatus::Failed => &mut self.failed_at,
            BatchStatus::Expired => &mut self.expired_at,
            BatchStatus::Cancelling => &mut self.cancelling_at,
            BatchStatus::Cancelled => &mut self.cancelled_at,
            BatchStatus::Validating => {
                return Err(TransitionError {
                    id: self.id.clone(),
                    from: self.status,
                    to,
                })
            }
        };
        *stamp = Some(now);
        self.status = to;
        Ok(())
    }

    /// Counts one line's result (line `line`, from `shard`) if it is the line's first; a repeat
    /// or a foreign result counts nothing.
    pub fn record(
        &mut self,
        custom_id: &str,
        line: usize,
        shard: Option<u32>,
        ok: bool,
    ) -> Recorded {
        let r = self.ledger.record(custom_id, line, shard);
        if r == Recorded::New {
            if ok {
                self.completed += 1;
            } else {
                self.failed += 1;
            }
        }
        r
    }

    /// Forgets every counted result (before replaying them after a restart).
    pub fn reset_counts(&mut self) {
        self.ledger.reset();
        self.completed = 0;
        self.failed = 0;
        self.prompt_tokens = 0;
        self.completion_tokens = 0;
    }

    /// Whether every line has a counted result.
    pub fn all_reported(&self) -> bool {
        self.completed + self.failed >= self.total
    }

    /// The OpenAI `batch` object.
    pub fn to_openai(&self) -> Value {
        let errors = if self.errors.is_empty() {
            Value::Null
        } else {
            json!({
                "object": "list",
                "data": self.errors.iter().map(|(line, e)| json!({
                    "code": e.code, "message": e.message, "param": e.param, "line": line,
                })).collect::<Vec<_>>(),
            })
        };
        json!({
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint.as_str(),
            "errors": errors,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": self.in_progress_at,
            "expires_at": self.expires_at,
            "finalizing_at": self.finalizing_at,
            "completed_at": self.completed_at,
            "failed_at": self.failed_at,
            "expired_at": self.expired_at,
            "cancelling_at": self.cancelling_at,
            "cancelled_at": self.cancelled_at,
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "metadata": self.metadata,
            "usage": {
                "input_tokens": self.prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": self.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.prompt_tokens + self.completion_tokens,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use BatchStatus::*;

    fn batch() -> BatchRecord {
        BatchRecord::new(
            "batch_1".into(),
            Endpoint::ChatCompletions,
            "file-1".into(),
            "24h".into(),
            86_400,
            None,
            1000,
        )
    }

    #[test]
    fn the_lifecycle_allows_exactly_openais_transitions() {
        let all = [
            Validating, Failed, InProgress, Finalizing, Completed, Expired, Cancelling, Cancelled,
        ];
        let allowed = [
            (Validating, InProgress),
            (Validating, Failed),
            (Validating, Cancelling),
            (InProgress, Finalizing),
            (InProgress, Cancelling),
            (Finalizing, Completed),
            (Finalizing, Expired),
            (Finalizing, Cancelled),
            (Cancelling, Finalizing),
            (Cancelling, Cancelled),
        ];
        for from in all {
            for to in all {
                assert_eq!(
                    from.can_become(to),
                    allowed.contains(&(from, to)),
                    "{from:?} -> {to:?}"
                );
            }
            if from.is_terminal() {
                assert!(
                    all.iter().all(|&to| !from.can_become(to)),
                    "{from:?} is terminal"
                );
            }
        }
    }

    #[test]
    fn transitions_stamp_times_and_refuse_the_rest() {
        let mut b = batch();
        b.transition(InProgress, 1001)
            .expect("validating -> in_progress");
        b.transition(Finalizing, 1002)
            .expect("in_progress -> finalizing");
        b.transition(Completed, 1003)
            .expect("finalizing -> completed");
        assert_eq!(
            (b.in_progress_at, b.finalizing_at, b.completed_at),
            (Some(1001), Some(1002), Some(1003))
        );
        let e = b
            .transition(Cancelling, 1004)
            .expect_err("completed is terminal");
        assert_eq!(
            e.to_string(),
            "batch batch_1 cannot go from Completed to Cancelling"
        );
        assert_eq!(b.status, Completed);
    }

    #[test]
    fn duplicate_and_foreign_results_are_not_counted() {
        use crate::ledger::{IndexEntry, Recorded::*};
        let mut b = batch();
        b.total = 3;
        let entries: Vec<IndexEntry> = ["a", "b", "c"]
            .iter()
            .enumerate()
            .map(|(i, id)| IndexEntry {
                custom_id: Some(id.to_string()),
                line: i + 1,
                shard: Some(0),
            })
            .collect();
        b.ledger = Ledger::from_index(&entries);
        assert_eq!(b.record("a", 1, Some(0), true), New);
        assert_eq!(
            b.record("a", 1, Some(0), false),
            Repeat,
            "a redelivered result"
        );
        assert_eq!(
            b.record("x", 4, Some(0), true),
            Foreign,
            "not a line of the batch"
        );
        assert_eq!(b.record("b", 2, Some(0), false), New);
        assert!(!b.all_reported());
        assert_eq!(b.record("c", 3, Some(0), true), New);
        assert!(b.all_reported());
        assert_eq!((b.completed, b.failed), (2, 1));
    }

    #[test]
    fn the_openai_object_has_every_field() {
        let mut b = batch();
        b.total = 2;
        b.errors.push((
            Some(3),
            LineError::new("invalid_json", "line 3 is not valid JSON"),
        ));
        let v = b.to_openai();
        assert_eq!(v["object"], "batch");
        assert_eq!(v["status"], "validating");
        assert_eq!(v["endpoint"], "/v1/chat/completions");
        assert_eq!(v["expires_at"], 1000 + 86_400);
        assert_eq!(
            v["request_counts"],
            json!({"total": 2, "completed": 0, "failed": 0})
        );
        assert_eq!(v["errors"]["data"][0]["line"], 3);
        for field in [
            "in_progress_at",
            "finalizing_at",
            "completed_at",
            "failed_at",
            "expired_at",
            "cancelling_at",
            "cancelled_at",
            "output_file_id",
            "error_file_id",
            "metadata",
        ] {
            assert!(v.get(field).is_some(), "{field} missing");
        }
        let back: BatchRecord =
            serde_json::from_value(serde_json::to_value(&b).expect("ser")).expect("de");
        assert_eq!(back, b, "the stored record round-trips");
    }

    #[test]
    fn completion_windows_parse() {
        assert_eq!(parse_completion_window("24h"), Ok(86_400));
        assert_eq!(parse_completion_window("90m"), Ok(5_400));
        assert_eq!(parse_completion_window("45s"), Ok(45));
        for bad in ["", "24", "1d", "0h", "200h", "h"] {
            assert!(parse_completion_window(bad).is_err(), "{bad:?} accepted");
        }
    }
}
