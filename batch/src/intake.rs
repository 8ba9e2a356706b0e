//! Intake of a batch's input file: file-level checks, line validation, and the shard plan.
//!
//! Pure and synchronous (the coordinator runs it on a blocking thread): given the file's bytes,
//! it returns either the file-level errors that fail the whole batch in `validating`, or the
//! batch's work — one [`ShardMessage`] per planned shard and one failed [`ResultMessage`] per
//! invalid line (they travel through the results stream like any other result, so a restarted
//! coordinator finds them there).
//!
//! File-level errors (OpenAI fails the batch for these): an empty file, more lines than allowed,
//! a file over the size limit, a line whose `url` differs from the batch's endpoint, and a
//! repeated `custom_id` (the join key of the output must be unique; it is also what makes
//! redelivered results countable exactly once).

use std::collections::hash_map::{Entry, HashMap};

use rayon::prelude::*;

use gristmill_protocol::cluster::{ResultMessage, ResultOutcome, ShardMessage};
use gristmill_protocol::{codes, Endpoint, LineError, Request};

use crate::ledger::IndexEntry;
use crate::shard::{plan_shards, PlanLine, ShardLimits};
use crate::validate::{InvalidLine, LineValidator};

/// Limits on one input file.
#[derive(Debug, Clone, Copy)]
pub struct IntakeLimits {
    pub max_bytes: u64,
    pub max_lines: usize,
    /// Largest request (as it travels in a shard) accepted; a larger line is an error line.
    pub max_line_bytes: usize,
    pub shard: ShardLimits,
}

impl Default for IntakeLimits {
    fn default() -> Self {
        // OpenAI's own limits for one batch: 200 MB and 50,000 requests.
        Self {
            max_bytes: 200 << 20,
            max_lines: 50_000,
            max_line_bytes: usize::MAX,
            shard: ShardLimits::default(),
        }
    }
}

/// Room left in a NATS message for the shard's own fields and the headers.
const SHARD_ENVELOPE_BYTES: usize = 64 * 1024;

impl IntakeLimits {
    /// These limits with shards and lines that fit one NATS message of `max_payload` bytes (the
    /// server's limit, read at connect).
    pub fn within_max_payload(mut self, max_payload: usize) -> Self {
        let room = max_payload.saturating_sub(SHARD_ENVELOPE_BYTES).max(1024);
        self.shard.max_bytes = self.shard.max_bytes.min(room);
        self.max_line_bytes = self.max_line_bytes.min(self.shard.max_bytes);
        self
    }
}

/// File-level errors: `(line, error)`, the line when one is to blame.
pub type FileErrors = Vec<(Option<usize>, LineError)>;

/// Prompt token ids of a request, for ordering by shared prefix and weighing shards.
pub type PromptTokens = dyn Fn(&Request) -> Vec<u32> + Send + Sync;

/// One non-blank line of an input file.
#[derive(Debug)]
pub enum Scanned {
    Valid(Box<Request>),
    Invalid(InvalidLine),
}

/// The 128-bit identity of a `custom_id` (SHA-256 prefix), for the duplicate check.
fn id_key(custom_id: &str) -> u128 {
    let d = ring::digest::digest(&ring::digest::SHA256, custom_id.as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&d.as_ref()[..16]);
    u128::from_le_bytes(b)
}

/// The non-blank lines of `data` (1-based numbers from `first_line`, CR stripped), and the
/// number of lines `data` holds.
pub fn split_lines(data: &[u8], first_line: usize) -> (Vec<(usize, &[u8])>, usize) {
    let mut n = 0;
    let lines = data
        .split(|&b| b == b'\n')
        .enumerate()
        .map(|(i, raw)| {
            n = i + 1;
            (first_line + i, raw.strip_suffix(b"\r").unwrap_or(raw))
        })
        .filter(|(_, raw)| !raw.iter().all(u8::is_ascii_whitespace))
        .collect();
    (lines, n)
}

/// Validates a file's lines as they arrive, in order, in as many pieces as suits the caller
/// (the coordinator streams the file from the object store), keeping only what the file-level
/// checks need: one 128-bit key and a line number per `custom_id`, and the first
/// [`MAX_FILE_ERRORS`] problems.
///
/// File-level errors (OpenAI fails the batch for these): an empty file, more lines than allowed,
/// a line whose `url` differs from the batch's endpoint, a repeated `custom_id`.
#[derive(Debug)]
pub struct Scanner {
    endpoint: Endpoint,
    max_lines: usize,
    /// The first line of each `custom_id` (`None`: no duplicate check, see [`Scanner::again`]).
    ids: Option<HashMap<u128, usize>>,
    errors: FileErrors,
    unlisted: usize,
    lines: usize,
}

impl Scanner {
    pub fn new(endpoint: Endpoint, limits: &IntakeLimits) -> Self {
        Self {
            endpoint,
            max_lines: limits.max_lines,
            ids: Some(HashMap::new()),
            errors: FileErrors::new(),
            unlisted: 0,
            lines: 0,
        }
    }

    /// A scanner for a second pass over a file that passed its file-level checks (the stored
    /// file cannot change): it validates lines but keeps no `custom_id`s, which in a
    /// million-line batch would take tens of megabytes beside the batch's ledger.
    pub fn again(endpoint: Endpoint, limits: &IntakeLimits) -> Self {
        Self {
            ids: None,
            ..Self::new(endpoint, limits)
        }
    }

    /// Validates the next non-blank lines (in file order; in parallel, each on its own) and
    /// checks them against the file so far. Lines past `max_lines` are not returned.
    pub fn push(&mut self, raw: &[(usize, &[u8])]) -> Vec<Scanned> {
        let room = self.max_lines.saturating_sub(self.lines);
        if raw.len() > room {
            if room > 0 || self.lines == self.max_lines {
                let line = raw[room].0;
                self.errors.push((
                    Some(line),
                    LineError::new(
                        "too_many_lines",
                        format!(
                            "the input file has more than {} requests (line {line} is over the \
                             limit): split it into several batches",
                            self.max_lines
                        ),
                    ),
                ));
            }
            self.lines = self.max_lines + 1;
        } else {
            self.lines += raw.len();
        }
        let raw = &raw[..raw.len().min(room)];
        let scanned: Vec<Scanned> = raw
            .par_iter()
            .map(|&(line, raw)| match std::str::from_utf8(raw) {
                Err(e) => Scanned::Invalid(InvalidLine {
                    line,
                    custom_id: None,
                    error: LineError::new(
                        codes::INVALID_JSON,
                        format!("line {line} is not UTF-8 text: {e}"),
                    ),
                }),
                Ok(text) => match LineValidator::new().validate(line, text) {
                    Ok(req) => Scanned::Valid(Box::new(req)),
                    Err(bad) => Scanned::Invalid(bad),
                },
            })
            .collect();
        for s in &scanned {
            let (id, line) = match s {
                Scanned::Valid(r) => (Some(r.custom_id.as_str()), r.line),
                Scanned::Invalid(bad) => (bad.custom_id.as_deref(), bad.line),
            };
            // custom_ids are the join key of the output and what results are counted by.
            let first = match (id, &mut self.ids) {
                (Some(id), Some(ids)) => match ids.entry(id_key(id)) {
                    Entry::Occupied(e) => Some(*e.get()),
                    Entry::Vacant(e) => {
                        e.insert(line);
                        None
                    }
                },
                _ => None,
            };
            if let (Some(first), Some(id)) = (first, id) {
                let shown: String = id.chars().take(64).collect();
                self.note((
                    Some(line),
                    LineError::new(
                        codes::DUPLICATE_CUSTOM_ID,
                        format!(
                            "line {line}: custom_id {shown:?} was already used by line \
                             {first}; custom_ids must be unique within a batch"
                        ),
                    )
                    .with_param("custom_id"),
                ));
            }
            if let Scanned::Valid(req) = s {
                if req.endpoint != self.endpoint {
                    self.note((
                        Some(line),
                        LineError::new(
                            "mismatched_endpoint",
                            format!(
                                "line {line}: url is {:?}, but the batch was created for {:?}; \
                                 every line of a batch must use the batch's endpoint",
                                req.endpoint.as_str(),
                                self.endpoint.as_str()
                            ),
                        )
                        .with_param("url"),
                    ));
                }
            }
        }
        scanned
    }

    /// Problems past the first [`MAX_FILE_ERRORS`] are counted, not listed (a million-line
    /// file on the wrong endpoint must not make a million-entry batch record).
    fn note(&mut self, e: (Option<usize>, LineError)) {
        if self.errors.len() < MAX_FILE_ERRORS {
            self.errors.push(e);
        } else {
            self.unlisted += 1;
        }
    }

    /// The number of requests, or the file-level errors that fail the batch.
    pub fn finish(self) -> Result<u64, FileErrors> {
        let mut errors = self.errors;
        if self.lines == 0 && errors.is_empty() {
            errors.push((
                None,
                LineError::new(
                    "empty_file",
                    "the input file has no requests: expected one JSON request per line",
                ),
            ));
        }
        if errors.is_empty() {
            return Ok(self.lines as u64);
        }
        errors.sort_by_key(|(line, _)| *line);
        if self.unlisted > 0 {
            errors.push((
                None,
                LineError::new(
                    "too_many_errors",
                    format!(
                        "{} more lines have problems like those above; only the first \
                         {MAX_FILE_ERRORS} are listed",
                        self.unlisted
                    ),
                ),
            ));
        }
        Err(errors)
    }
}

/// File-level problems listed in a failed batch's `errors` (the rest are counted).
pub const MAX_FILE_ERRORS: usize = 100;

/// The error of a file over the size limit.
pub fn file_too_large(bytes: u64, limits: &IntakeLimits) -> FileErrors {
    vec![(
        None,
        LineError::new(
            "file_too_large",
            format!(
                "the input file is {bytes} bytes; the limit is {} bytes: split it into several batches",
                limits.max_bytes
            ),
        ),
    )]
}

/// Validates every line of a whole file; file-level errors if the file as a whole is
/// unacceptable.
pub fn scan(
    data: &[u8],
    endpoint: Endpoint,
    limits: &IntakeLimits,
) -> Result<Vec<Scanned>, FileErrors> {
    if data.len() as u64 > limits.max_bytes {
        return Err(file_too_large(data.len() as u64, limits));
    }
    let mut scanner = Scanner::new(endpoint, limits);
    let (raw, _) = split_lines(data, 1);
    let lines = scanner.push(&raw);
    scanner.finish().map(|_| lines)
}

/// Lines planned together: prompts that share a prefix within a window share shards. The
/// coordinator streams a batch through windows of this many lines, so its memory does not grow
/// with the batch; prefixes that recur across windows are still served by the workers' prefix
/// caches.
pub const PLAN_WINDOW_LINES: usize = 65_536;

/// One planned window of a batch.
#[derive(Debug, Default)]
pub struct Window {
    /// Prompt plus `max_tokens` of its shards' lines.
    pub tokens: u64,
    pub shards: Vec<ShardMessage>,
    /// One failed result per invalid line.
    pub invalid: Vec<ResultMessage>,
    /// Every line of the window, with the shard that carries it.
    pub index: Vec<IndexEntry>,
}

/// Cuts a batch's lines into shards, window by window, numbering shards across windows.
#[derive(Debug)]
pub struct Planner {
    batch_id: String,
    limits: IntakeLimits,
    next_shard: u32,
}

impl Planner {
    pub fn new(batch_id: &str, limits: &IntakeLimits) -> Self {
        Self {
            batch_id: batch_id.to_string(),
            limits: *limits,
            next_shard: 0,
        }
    }

    /// Plans one window of scanned lines: invalid lines and lines too large for one message
    /// become failed results, the rest shards.
    pub fn plan(&mut self, lines: Vec<Scanned>, tokens: &PromptTokens) -> Window {
        let fail = |custom_id: Option<String>, line: usize, error: LineError| ResultMessage {
            batch_id: self.batch_id.clone(),
            custom_id: custom_id.unwrap_or_default(),
            line,
            shard: None,
            outcome: ResultOutcome::Failed { error },
        };
        let mut valid = Vec::new();
        let mut invalid = Vec::new();
        for s in lines {
            match s {
                Scanned::Valid(r) => valid.push(*r),
                Scanned::Invalid(bad) => invalid.push(fail(bad.custom_id, bad.line, bad.error)),
            }
        }
        // Each valid line's size as it travels in a shard: one over the limit cannot travel.
        let sizes: Vec<usize> = valid
            .par_iter()
            .map(|r| serde_json::to_vec(r).map_or(usize::MAX, |v| v.len() + 1))
            .collect();
        let max_line_bytes = self.limits.max_line_bytes;
        let (valid, sizes): (Vec<Request>, Vec<usize>) = valid
            .into_iter()
            .zip(sizes)
            .filter_map(|(r, bytes)| {
                if bytes <= max_line_bytes {
                    return Some((r, bytes));
                }
                let error = LineError::new(
                    codes::LINE_TOO_LARGE,
                    format!(
                        "line {}: the request is {bytes} bytes; the limit is {max_line_bytes} \
                         bytes (what one NATS message carries): shorten the prompt",
                        r.line
                    ),
                );
                invalid.push(fail(Some(r.custom_id), r.line, error));
                None
            })
            .unzip();
        let plan_lines: Vec<PlanLine> = valid
            .par_iter()
            .zip(&sizes)
            .enumerate()
            .map(|(index, (r, &bytes))| PlanLine {
                index,
                prompt: tokens(r),
                max_new_tokens: r.params.max_tokens.unwrap_or(256) as u64
                    * r.params.n.max(1) as u64,
                bytes,
            })
            .collect();
        let plans = plan_shards(plan_lines, self.limits.shard);
        let mut slots: Vec<Option<Request>> = valid.into_iter().map(Some).collect();
        let mut window = Window::default();
        for p in plans {
            window.tokens += p.tokens;
            let shard = ShardMessage {
                batch_id: self.batch_id.clone(),
                shard: self.next_shard,
                tokens: p.tokens,
                // Every index is in exactly one plan (the planner's invariant).
                requests: p.lines.iter().filter_map(|&k| slots[k].take()).collect(),
            };
            self.next_shard += 1;
            window.shards.push(shard);
        }
        window.index = invalid
            .iter()
            .map(|r| IndexEntry {
                custom_id: (!r.custom_id.is_empty()).then(|| r.custom_id.clone()),
                line: r.line,
                shard: None,
            })
            .chain(window.shards.iter().flat_map(|s| {
                s.requests.iter().map(|r| IndexEntry {
                    custom_id: Some(r.custom_id.clone()),
                    line: r.line,
                    shard: Some(s.shard),
                })
            }))
            .collect();
        window.index.sort_by_key(|e| e.line);
        window.invalid = invalid;
        window
    }
}

/// Validates a whole file and plans its shards in one window (tests, small files; the
/// coordinator streams through [`Scanner`] and [`Planner`] instead). The window's index has
/// one entry per request of the file.
pub fn intake(
    batch_id: &str,
    data: &[u8],
    endpoint: Endpoint,
    limits: &IntakeLimits,
    tokens: &PromptTokens,
) -> Result<Window, FileErrors> {
    let lines = scan(data, endpoint, limits)?;
    Ok(Planner::new(batch_id, limits).plan(lines, tokens))
}

/// Prompt "tokens" without a tokenizer: the prompt's UTF-8 bytes, four to a token. Orders
/// prompts by shared text prefix just as well; token counts are estimates.
pub fn byte_tokens(req: &Request) -> Vec<u32> {
    use gristmill_protocol::Prompt;
    let bytes: Vec<u8> = match &req.prompt {
        Prompt::Text(t) => t.as_bytes().to_vec(),
        Prompt::Tokens(ids) => return ids.clone(),
        Prompt::Chat(messages) => messages
            .iter()
            .flat_map(|m| {
                m.role
                    .bytes()
                    .chain([0])
                    .chain(m.content.bytes())
                    .chain([0])
            })
            .collect(),
    };
    bytes
        .chunks(4)
        .map(|c| c.iter().fold(0u32, |acc, &b| (acc << 8) | b as u32))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat_line(id: &str, content: &str) -> String {
        serde_json::json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 8}})
        .to_string()
    }

    fn limits() -> IntakeLimits {
        IntakeLimits {
            max_bytes: 1 << 20,
            max_lines: 10,
            max_line_bytes: usize::MAX,
            shard: ShardLimits {
                max_tokens: 40,
                max_lines: 100,
                max_bytes: 1 << 20,
            },
        }
    }

    #[test]
    fn invalid_lines_become_failed_results_and_the_rest_is_sharded() {
        let file = [
            chat_line("a", "template one: alpha"),
            "{not json".to_string(),
            String::new(),
            chat_line("b", "template one: beta"),
            r#"{"custom_id": "c", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}}"#.to_string(),
        ]
        .join("\n");
        let got = intake(
            "batch_x",
            file.as_bytes(),
            Endpoint::ChatCompletions,
            &limits(),
            &byte_tokens,
        )
        .expect("file is acceptable");
        assert_eq!(got.index.len(), 4, "the blank line is not a request");
        let bad: Vec<(usize, &str)> = got
            .invalid
            .iter()
            .map(|r| (r.line, r.custom_id.as_str()))
            .collect();
        assert_eq!(bad, vec![(2, ""), (5, "c")]);
        let ids: Vec<Vec<&str>> = got
            .shards
            .iter()
            .map(|s| s.requests.iter().map(|r| r.custom_id.as_str()).collect())
            .collect();
        let mut flat: Vec<&str> = ids.concat();
        flat.sort();
        assert_eq!(
            flat,
            vec!["a", "b"],
            "every valid line in exactly one shard"
        );
        assert_eq!(got.tokens, got.shards.iter().map(|s| s.tokens).sum::<u64>());
        assert!(got.shards.iter().all(|s| s.batch_id == "batch_x"));
        // The index names every line once, in order, with the shard that carries it.
        let index: Vec<(usize, Option<&str>, bool)> = got
            .index
            .iter()
            .map(|e| (e.line, e.custom_id.as_deref(), e.shard.is_some()))
            .collect();
        assert_eq!(
            index,
            vec![
                (1, Some("a"), true),
                (2, None, false),
                (4, Some("b"), true),
                (5, Some("c"), false)
            ]
        );
        for s in &got.shards {
            for r in &s.requests {
                assert!(got
                    .index
                    .iter()
                    .any(|e| e.line == r.line && e.shard == Some(s.shard)));
            }
        }
    }

    /// A line larger than one NATS message is an error line of its own; the rest still runs
    /// (it once kept the batch in `validating` forever, failing to publish every 2 s).
    #[test]
    fn a_line_over_the_message_limit_is_an_error_line() {
        let file = [
            chat_line("small", "hello"),
            chat_line("huge", &"x".repeat(300_000)),
            chat_line("small2", "there"),
        ]
        .join("\n");
        let limits = limits().within_max_payload(256 * 1024);
        assert_eq!(limits.max_line_bytes, 192 * 1024);
        assert_eq!(limits.shard.max_bytes, 192 * 1024);
        let got = intake(
            "b",
            file.as_bytes(),
            Endpoint::ChatCompletions,
            &limits,
            &byte_tokens,
        )
        .expect("file is acceptable");
        assert_eq!(got.index.len(), 3);
        assert_eq!(got.invalid.len(), 1);
        let bad = &got.invalid[0];
        assert_eq!((bad.line, bad.custom_id.as_str()), (2, "huge"));
        let ResultOutcome::Failed { error } = &bad.outcome else {
            panic!("a failed result")
        };
        assert_eq!(error.code, codes::LINE_TOO_LARGE);
        assert!(error.message.starts_with("line 2:"), "{}", error.message);
        let shipped: usize = got.shards.iter().map(|s| s.requests.len()).sum();
        assert_eq!(shipped, 2);
        assert!(got
            .shards
            .iter()
            .all(|s| serde_json::to_vec(s).expect("json").len() < 256 * 1024));
    }

    #[test]
    fn file_level_problems_fail_the_batch_with_their_lines() {
        let cases: Vec<(String, &str, Option<usize>)> = vec![
            (String::new(), "empty_file", None),
            ("\n \n".into(), "empty_file", None),
            (
                [chat_line("a", "x"), chat_line("a", "y")].join("\n"),
                codes::DUPLICATE_CUSTOM_ID,
                Some(2),
            ),
            (
                [
                    chat_line("a", "x"),
                    r#"{"custom_id": "b", "method": "POST", "url": "/v1/completions", "body": {"prompt": "p"}}"#.into(),
                ]
                .join("\n"),
                "mismatched_endpoint",
                Some(2),
            ),
            (
                (0..11).map(|i| chat_line(&i.to_string(), "x")).collect::<Vec<_>>().join("\n"),
                "too_many_lines",
                Some(11),
            ),
            ("x".repeat((1 << 20) + 1), "file_too_large", None),
        ];
        // A file whose every line has the same problem lists the first hundred and counts
        // the rest.
        let many: Vec<String> = (0..300)
            .map(|i| {
                format!(r#"{{"custom_id":"{i}","url":"/v1/completions","body":{{"prompt":"p"}}}}"#)
            })
            .collect();
        let mut big = limits();
        big.max_lines = 1000;
        let errs = scan(many.join("\n").as_bytes(), Endpoint::ChatCompletions, &big)
            .expect_err("mismatched endpoints");
        assert_eq!(errs.len(), MAX_FILE_ERRORS + 1);
        assert_eq!(errs[99].0, Some(100));
        assert_eq!(errs[100].1.code, "too_many_errors");
        assert!(
            errs[100].1.message.starts_with("200 more lines"),
            "{:?}",
            errs[100]
        );
        for (file, code, line) in cases {
            let errs = scan(file.as_bytes(), Endpoint::ChatCompletions, &limits()).expect_err(code);
            assert_eq!(errs[0].1.code, code, "{errs:?}");
            assert_eq!(errs[0].0, line, "{errs:?}");
            assert!(!errs[0].1.message.is_empty());
        }
    }

    #[test]
    fn shared_prefixes_share_shards_and_shards_respect_the_budget() {
        let file: Vec<String> = (0..8)
            .map(|i| {
                let template = if i % 2 == 0 {
                    "AAAA template"
                } else {
                    "ZZZZ template"
                };
                chat_line(&format!("r{i}"), &format!("{template} {i}"))
            })
            .collect();
        let got = intake(
            "b",
            file.join("\n").as_bytes(),
            Endpoint::ChatCompletions,
            &limits(),
            &byte_tokens,
        )
        .expect("valid");
        for s in &got.shards {
            assert!(
                s.tokens <= 40 || s.requests.len() == 1,
                "{} tokens",
                s.tokens
            );
            let firsts: std::collections::HashSet<bool> = s
                .requests
                .iter()
                .map(|r| r.custom_id[1..].parse::<u32>().unwrap_or(0) % 2 == 0)
                .collect();
            assert_eq!(firsts.len(), 1, "a shard mixes the two templates");
        }
    }
}
