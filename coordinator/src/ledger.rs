//! A batch's ledger: which lines the batch has, which shard carries each, and which have
//! reported.
//!
//! Invariants of [`Ledger`]:
//! - a result counts only if it names a line of the batch (its `custom_id`, or its line number
//!   when the line had none), with that line's number, from the shard that carried the line
//!   (lines rejected at intake carry none: the coordinator published their results itself);
//! - each line counts once: the first result that counts is the line's result, any later one is
//!   a repeat (a redelivered shard) and anything else is foreign (a forged or misrouted result);
//! - an *open* ledger (a batch stored before ledgers existed, whose index is gone) knows no
//!   lines: it counts the first result of any key, as before.
//!
//! Lines are kept as 128-bit SHA-256 prefixes of their keys (24 bytes a line with the shard,
//! number and flag), not as the `custom_id`s themselves: a million-line batch costs tens of
//! megabytes, and the ids live in the batch's index object, read back only when a batch ends
//! with lines that never reported.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Shard number of a line rejected at intake (its result never travelled in a shard).
const NO_SHARD: u32 = u32::MAX;

/// A line's identity in the ledger: the first 128 bits of SHA-256 over its key.
type LineKey = u128;

/// The key a line's result is counted under: its `custom_id`, or its line number when it has
/// none (a line that is not JSON, say). `custom_id`s are unique per batch (a file-level check).
fn line_key(custom_id: &str, line: usize) -> LineKey {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    if custom_id.is_empty() {
        ctx.update(&[0]);
        ctx.update(&(line as u64).to_le_bytes());
    } else {
        ctx.update(&[1]);
        ctx.update(custom_id.as_bytes());
    }
    let d = ctx.finish();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d.as_ref()[..16]);
    u128::from_le_bytes(b)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    line: u32,
    shard: u32,
    reported: bool,
    /// Written to the output or error file by the finalization in progress.
    written: bool,
}

impl Slot {
    fn new(line: usize, shard: Option<u32>) -> Self {
        Self {
            line: line_u32(line),
            shard: shard.unwrap_or(NO_SHARD),
            reported: false,
            written: false,
        }
    }
}

/// One line of a batch as the index object stores it (one JSON object per line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    /// The line's `custom_id` (`None` when it had none that could be read or kept).
    #[serde(rename = "c", default, skip_serializing_if = "Option::is_none")]
    pub custom_id: Option<String>,
    #[serde(rename = "l")]
    pub line: usize,
    /// The shard that carries it (`None`: rejected at intake).
    #[serde(rename = "s", default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<u32>,
}

/// What counting one result did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// The line's first result: counted.
    New,
    /// The line had reported already: dropped.
    Repeat,
    /// Not a line of this batch, or not from the shard that carried it: dropped and counted as
    /// rejected.
    Foreign,
}

/// Which lines a batch has and which have reported (see the module's invariants).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ledger {
    slots: HashMap<LineKey, Slot>,
    /// No index: every key is accepted once (`slots` holds those seen).
    open: bool,
}

impl Default for Ledger {
    /// An open ledger (a record read back from the store has no lines until its index is).
    fn default() -> Self {
        Self::open()
    }
}

impl Ledger {
    /// A ledger that knows no lines and counts the first result of any key.
    pub fn open() -> Self {
        Self {
            slots: HashMap::new(),
            open: true,
        }
    }

    /// The ledger of a batch with these lines.
    pub fn from_index<'a>(entries: impl IntoIterator<Item = &'a IndexEntry>) -> Self {
        let mut ledger = Self {
            slots: HashMap::new(),
            open: false,
        };
        ledger.insert_all(entries);
        ledger
    }

    /// Adds lines to a ledger being built (dispatch enters each window's lines before their
    /// shards leave).
    pub fn insert_all<'a>(&mut self, entries: impl IntoIterator<Item = &'a IndexEntry>) {
        for e in entries {
            let key = line_key(e.custom_id.as_deref().unwrap_or(""), e.line);
            self.slots.insert(key, Slot::new(e.line, e.shard));
        }
    }

    /// The slot of (`custom_id`, `line`) if a result from `shard` belongs to it: in an open
    /// ledger every key gets one on first sight; otherwise the line must be the batch's and
    /// the shard the one that carried it.
    fn slot(&mut self, custom_id: &str, line: usize, shard: Option<u32>) -> Option<&mut Slot> {
        let key = line_key(custom_id, line);
        if self.open {
            return Some(
                self.slots
                    .entry(key)
                    .or_insert_with(|| Slot::new(line, shard)),
            );
        }
        self.slots
            .get_mut(&key)
            .filter(|s| s.line == line_u32(line) && s.shard == shard.unwrap_or(NO_SHARD))
    }

    /// Counts a result for (`custom_id`, `line`) from `shard`.
    pub fn record(&mut self, custom_id: &str, line: usize, shard: Option<u32>) -> Recorded {
        match self.slot(custom_id, line, shard) {
            Some(s) if s.reported => Recorded::Repeat,
            Some(s) => {
                s.reported = true;
                Recorded::New
            }
            None => Recorded::Foreign,
        }
    }

    /// Marks the line's result as written to a file by the finalization in progress; `true`
    /// for the first result of each of the batch's lines (the one counted), `false` for repeats
    /// and foreign results. Results are written in the order they were counted (stream order),
    /// so the result written is the result counted.
    pub fn write_once(&mut self, custom_id: &str, line: usize, shard: Option<u32>) -> bool {
        self.slot(custom_id, line, shard)
            .is_some_and(|s| !std::mem::replace(&mut s.written, true))
    }

    /// Whether the line with this key was written by the finalization in progress.
    pub fn is_written(&self, custom_id: &str, line: usize) -> bool {
        self.slots
            .get(&line_key(custom_id, line))
            .is_some_and(|s| s.written)
    }

    /// Forgets what a finalization wrote (before it starts again).
    pub fn reset_written(&mut self) {
        for s in self.slots.values_mut() {
            s.written = false;
        }
    }

    /// Whether the line with this key has reported.
    pub fn has_reported(&self, custom_id: &str, line: usize) -> bool {
        self.slots
            .get(&line_key(custom_id, line))
            .is_some_and(|s| s.reported)
    }

    /// Forgets every report (before the results are replayed after a restart).
    pub fn reset(&mut self) {
        if self.open {
            self.slots.clear();
        } else {
            for s in self.slots.values_mut() {
                s.reported = false;
            }
        }
    }

    /// Frees the ledger's memory (a finished batch).
    pub fn clear(&mut self) {
        *self = Self::open();
        self.slots.shrink_to_fit();
    }
}

/// Line numbers are bounded by the intake limits (far below 2^32); saturate beyond.
fn line_u32(line: usize) -> u32 {
    u32::try_from(line).unwrap_or(u32::MAX - 1)
}

/// The index object of a batch: one [`IndexEntry`] per line, as JSON lines.
pub fn encode_index(entries: &[IndexEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * 32);
    for e in entries {
        // Serialising plain strings and numbers cannot fail.
        if serde_json::to_writer(&mut out, e).is_ok() {
            out.push(b'\n');
        }
    }
    out
}

/// Reads an index object written by [`encode_index`].
pub fn decode_index(data: &[u8]) -> Result<Vec<IndexEntry>, serde_json::Error> {
    data.split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(serde_json::from_slice)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(custom_id: Option<&str>, line: usize, shard: Option<u32>) -> IndexEntry {
        IndexEntry {
            custom_id: custom_id.map(String::from),
            line,
            shard,
        }
    }

    fn ledger() -> Ledger {
        Ledger::from_index(&[
            entry(Some("a"), 1, Some(0)),
            entry(Some("b"), 2, Some(1)),
            entry(None, 3, None),
            entry(Some("c0+2"), 4, Some(0)),
        ])
    }

    #[test]
    fn results_count_once_and_only_for_the_batchs_own_lines_from_their_shard() {
        use Recorded::*;
        let mut l = ledger();
        let table: &[(&str, usize, Option<u32>, Recorded, &str)] = &[
            ("a", 1, Some(0), New, "a line from its shard"),
            ("a", 1, Some(0), Repeat, "the same line again (redelivery)"),
            (
                "a",
                1,
                Some(1),
                Foreign,
                "from a shard that did not carry it",
            ),
            ("b", 2, None, Foreign, "claims intake rejected it"),
            ("b", 9, Some(1), Foreign, "with another line number"),
            (
                "invented",
                5,
                Some(0),
                Foreign,
                "an id the batch does not have",
            ),
            ("", 3, None, New, "a line without a custom_id, by number"),
            ("", 4, None, Foreign, "another line number without an id"),
            ("c0+2", 4, Some(0), New, "an id shaped like an old group id"),
            ("b", 2, Some(1), New, "b from its shard"),
        ];
        for &(id, line, shard, want, why) in table {
            assert_eq!(l.record(id, line, shard), want, "{why}");
        }
        assert!(l.has_reported("a", 1) && l.has_reported("", 3));
        assert!(!l.has_reported("invented", 5));
        // Writing the files: each line once, only the batch's own.
        assert!(l.write_once("a", 1, Some(0)));
        assert!(!l.write_once("a", 1, Some(0)), "a repeat is not written");
        assert!(!l.write_once("invented", 5, Some(0)));
        assert!(
            !l.write_once("a", 1, Some(1)),
            "nor a result from another shard"
        );
        assert!(l.is_written("a", 1) && !l.is_written("b", 2));
        l.reset_written();
        assert!(!l.is_written("a", 1));
        l.reset();
        assert!(!l.has_reported("a", 1));
        assert_eq!(
            l.record("a", 1, Some(0)),
            New,
            "counted again after a reset"
        );
    }

    #[test]
    fn an_open_ledger_counts_the_first_result_of_any_key() {
        let mut l = Ledger::open();
        assert_eq!(l.record("x", 1, Some(3)), Recorded::New);
        assert_eq!(l.record("x", 1, Some(4)), Recorded::Repeat);
        assert_eq!(l.record("anything", 7, None), Recorded::New);
        l.reset();
        assert_eq!(l.record("x", 1, Some(3)), Recorded::New);
    }

    #[test]
    fn the_index_round_trips() {
        let entries = vec![
            entry(Some("a\r\nb"), 1, Some(0)),
            entry(None, 2, None),
            entry(Some("\u{1}"), 3, Some(7)),
        ];
        let data = encode_index(&entries);
        assert_eq!(decode_index(&data).expect("decodes"), entries);
        assert_eq!(
            data.iter().filter(|&&b| b == b'\n').count(),
            3,
            "one line each"
        );
        assert!(decode_index(b"{\"l\":1}\nnot json\n").is_err());
    }
}
