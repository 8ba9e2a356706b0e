//! Finalization's pure half: a finished batch's results and unfinished lines turned into the
//! lines of its output and error files.
//!
//! The coordinator reads the results stream in the order results were counted and asks the
//! batch's [`Ledger`] which result is each line's first ([`Ledger::write_once`]); it hands those
//! to a [`Finalizer`], then every line of the batch's index the ledger has not seen written
//! ([`Ledger::is_written`]) as [`Finalizer::missing`]. The finalizer fills two buffers the
//! caller drains into the object store whenever they pass a chunk's size. Invariants: every
//! line of the batch ends in exactly one of the two files; a completed result goes to the
//! output file, a failed one and a missing line to the error file with its line number.

use gristmill_protocol::cluster::{ResultMessage, ResultOutcome};
use gristmill_protocol::{codes, BatchStatus, ErrorLine, IdGen, LineError, OutputLine};

use crate::ledger::IndexEntry;

/// What a finalization wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub completed: u64,
    pub failed: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// Builds a batch's output and error files line by line (see the module's invariants).
#[derive(Debug)]
pub struct Finalizer {
    ids: IdGen,
    pub tally: Tally,
    /// Output lines not yet taken by the caller.
    pub out: Vec<u8>,
    /// Error lines not yet taken by the caller.
    pub err: Vec<u8>,
}

impl Default for Finalizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Finalizer {
    pub fn new() -> Self {
        Self {
            ids: IdGen::new(),
            tally: Tally::default(),
            out: Vec::new(),
            err: Vec::new(),
        }
    }

    /// Writes the first result of one of the batch's lines.
    pub fn result(&mut self, r: ResultMessage) -> serde_json::Result<()> {
        match r.outcome {
            ResultOutcome::Completed { body, usage, .. } => {
                self.tally.completed += 1;
                self.tally.prompt_tokens += usage.prompt_tokens as u64;
                self.tally.completion_tokens += usage.completion_tokens as u64;
                let l = OutputLine::completed(r.custom_id, body, &mut self.ids);
                serde_json::to_writer(&mut self.out, &l)?;
                self.out.push(b'\n');
            }
            ResultOutcome::Failed { error } => {
                let custom_id = (!r.custom_id.is_empty()).then_some(r.custom_id);
                self.error(custom_id, r.line, error)?;
            }
        }
        Ok(())
    }

    /// Writes the error line of a line of the batch that has no result: the batch ended
    /// `ending` before it ran.
    pub fn missing(&mut self, e: IndexEntry, ending: BatchStatus) -> serde_json::Result<()> {
        let error = missing_error(e.line, ending);
        self.error(e.custom_id, e.line, error)
    }

    fn error(
        &mut self,
        custom_id: Option<String>,
        line: usize,
        error: LineError,
    ) -> serde_json::Result<()> {
        self.tally.failed += 1;
        let l = ErrorLine::failed(custom_id, line, error, &mut self.ids);
        serde_json::to_writer(&mut self.err, &l)?;
        self.err.push(b'\n');
        Ok(())
    }

    /// Takes the output lines written so far if they are at least `min` bytes.
    pub fn take_out(&mut self, min: usize) -> Option<Vec<u8>> {
        (self.out.len() >= min.max(1)).then(|| std::mem::take(&mut self.out))
    }

    /// Takes the error lines written so far if they are at least `min` bytes.
    pub fn take_err(&mut self, min: usize) -> Option<Vec<u8>> {
        (self.err.len() >= min.max(1)).then(|| std::mem::take(&mut self.err))
    }
}

/// The error of a line without a result in a batch that ended `ending`.
pub fn missing_error(line: usize, ending: BatchStatus) -> LineError {
    match ending {
        BatchStatus::Cancelled => LineError::new(
            codes::CANCELLED,
            format!("line {line}: the batch was cancelled before this request ran"),
        ),
        BatchStatus::Expired => LineError::new(
            codes::EXPIRED,
            format!("line {line}: the batch's completion window ran out before this request ran"),
        ),
        _ => LineError::new(
            codes::INTERNAL,
            format!("line {line}: no result was recorded for this request"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Ledger;
    use gristmill_protocol::{FinishReason, Usage};
    use serde_json::{json, Value};

    fn entry(id: &str, line: usize, shard: u32) -> IndexEntry {
        IndexEntry {
            custom_id: Some(id.into()),
            line,
            shard: Some(shard),
        }
    }

    fn done(id: &str, line: usize, shard: u32, text: &str) -> ResultMessage {
        ResultMessage {
            batch_id: "batch_x".into(),
            custom_id: id.into(),
            line,
            shard: Some(shard),
            outcome: ResultOutcome::Completed {
                body: json!({"choices": [{"text": text}]}),
                finish_reason: FinishReason::Stop,
                usage: Usage {
                    prompt_tokens: 3,
                    completion_tokens: 2,
                    total_tokens: 5,
                },
            },
        }
    }

    fn failed(id: &str, line: usize, shard: u32) -> ResultMessage {
        ResultMessage {
            outcome: ResultOutcome::Failed {
                error: LineError::new(codes::SHARD_FAILED, format!("line {line}: boom")),
            },
            ..done(id, line, shard, "")
        }
    }

    fn lines(buf: &[u8]) -> Vec<Value> {
        buf.split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).expect("JSON line"))
            .collect()
    }

    /// Runs a finalization the way the coordinator does: results in stream order, firsts
    /// decided by the ledger, then the index's unwritten lines.
    fn finalize(
        index: &[IndexEntry],
        stream: Vec<ResultMessage>,
        ending: BatchStatus,
    ) -> (Vec<Value>, Vec<Value>, Tally) {
        let mut ledger = Ledger::from_index(index);
        let mut f = Finalizer::new();
        for r in stream {
            if ledger.write_once(&r.custom_id, r.line, r.shard) {
                f.result(r).expect("writes");
            }
        }
        for e in index {
            if !ledger.is_written(e.custom_id.as_deref().unwrap_or(""), e.line) {
                f.missing(e.clone(), ending).expect("writes");
            }
        }
        (lines(&f.out), lines(&f.err), f.tally)
    }

    #[test]
    fn every_line_ends_in_exactly_one_file() {
        let index = [
            entry("a", 1, 0),
            entry("b", 2, 0),
            entry("c", 3, 1),
            entry("d", 4, 1),
        ];
        let stream = vec![
            done("a", 1, 0, "first"),
            done("a", 1, 0, "a redelivered repeat"),
            done("forged", 9, 0, "not a line of the batch"),
            failed("c", 3, 1),
            done("b", 2, 1, "from a shard that did not carry b"),
        ];
        let (out, err, tally) = finalize(&index, stream, BatchStatus::Cancelled);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0]["custom_id"], "a");
        assert_eq!(out[0]["response"]["body"]["choices"][0]["text"], "first");
        let by_line: Vec<(u64, &str)> = err
            .iter()
            .map(|e| {
                (
                    e["line"].as_u64().expect("line"),
                    e["error"]["code"].as_str().expect("code"),
                )
            })
            .collect();
        assert_eq!(
            by_line,
            [
                (3, codes::SHARD_FAILED),
                (2, codes::CANCELLED),
                (4, codes::CANCELLED)
            ]
        );
        assert_eq!(
            tally,
            Tally {
                completed: 1,
                failed: 3,
                prompt_tokens: 3,
                completion_tokens: 2
            }
        );
    }

    #[test]
    fn missing_lines_say_why_the_batch_ended() {
        let table = [
            (BatchStatus::Cancelled, codes::CANCELLED, "cancelled"),
            (BatchStatus::Expired, codes::EXPIRED, "completion window"),
            (BatchStatus::Completed, codes::INTERNAL, "no result"),
        ];
        for (ending, code, words) in table {
            let (out, err, _) = finalize(&[entry("x", 7, 0)], Vec::new(), ending);
            assert!(out.is_empty());
            assert_eq!(err[0]["error"]["code"], code, "{ending:?}");
            let msg = err[0]["error"]["message"].as_str().expect("message");
            assert!(msg.starts_with("line 7: ") && msg.contains(words), "{msg}");
            assert_eq!(err[0]["custom_id"], "x");
        }
    }

    #[test]
    fn a_failed_line_without_an_id_reports_null() {
        let index = [IndexEntry {
            custom_id: None,
            line: 5,
            shard: None,
        }];
        let mut r = failed("", 5, 0);
        r.shard = None;
        let (out, err, tally) = finalize(&index, vec![r], BatchStatus::Completed);
        assert!(out.is_empty());
        assert_eq!(err.len(), 1);
        assert!(err[0]["custom_id"].is_null());
        assert_eq!(tally.failed, 1);
    }

    #[test]
    fn buffers_are_taken_once_they_pass_the_chunk_size() {
        let mut f = Finalizer::new();
        assert!(f.take_out(1).is_none(), "nothing written");
        f.result(done("a", 1, 0, "x")).expect("writes");
        assert!(f.take_out(1 << 20).is_none(), "under the chunk size");
        let taken = f.take_out(1).expect("over");
        assert!(taken.ends_with(b"\n") && f.out.is_empty());
    }
}
