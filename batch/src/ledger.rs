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
//! Lines are kept as 128-bit SHA-256 prefixes of their keys, 24 bytes a line with the shard,
//! number and flags, not as the `custom_id`s themselves: a million-line batch costs 24 MB, and
//! the ids live in the batch's index object, read back only when a batch ends with lines that
//! never reported. The entries sit in one vector reserved for the whole batch at once, as
//! sorted runs (one per window that dispatch enters) searched by bisection: no hash table's
//! empty buckets, and no doubling of the table (and of the memory) as it grows.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Shard number of a line rejected at intake (its result never travelled in a shard).
const NO_SHARD: u32 = u32::MAX;

/// A line's identity in the ledger: the first 128 bits of SHA-256 over its key (two words, so
/// that an entry is aligned to 8 bytes and takes 24).
type LineKey = [u64; 2];

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
    let word = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&d.as_ref()[i * 8..i * 8 + 8]);
        u64::from_le_bytes(b)
    };
    [word(0), word(1)]
}

/// Flags kept in the top bits of a slot's line number (line numbers stay below 2^30: see
/// [`line_u32`]).
const REPORTED: u32 = 1 << 31;
/// Written to the output or error file by the finalization in progress.
const WRITTEN: u32 = 1 << 30;
const LINE_MASK: u32 = WRITTEN - 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    /// The line number, with [`REPORTED`] and [`WRITTEN`].
    line: u32,
    shard: u32,
}

impl Slot {
    fn new(line: usize, shard: Option<u32>) -> Self {
        Self {
            line: line_u32(line),
            shard: shard.unwrap_or(NO_SHARD),
        }
    }

    fn is(&self, flag: u32) -> bool {
        self.line & flag != 0
    }

    /// Sets `flag`; whether it was clear.
    fn set(&mut self, flag: u32) -> bool {
        let was = self.is(flag);
        self.line |= flag;
        !was
    }

    fn belongs(&self, line: usize, shard: Option<u32>) -> bool {
        self.line & LINE_MASK == line_u32(line) && self.shard == shard.unwrap_or(NO_SHARD)
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
    /// The batch's lines: sorted runs, one after another.
    lines: Vec<(LineKey, Slot)>,
    /// Where each run ends in `lines`.
    runs: Vec<usize>,
    /// No index: every key is accepted once, and those seen are kept here.
    open: Option<HashMap<LineKey, Slot>>,
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
            lines: Vec::new(),
            runs: Vec::new(),
            open: Some(HashMap::new()),
        }
    }

    /// The ledger of a batch of `lines` lines, before any is entered (memory for all of them
    /// is taken at once).
    pub fn with_capacity(lines: usize) -> Self {
        Self {
            lines: Vec::with_capacity(lines),
            runs: Vec::new(),
            open: None,
        }
    }

    /// The ledger of a batch with these lines.
    pub fn from_index(entries: &[IndexEntry]) -> Self {
        let mut ledger = Self::with_capacity(entries.len());
        ledger.insert_all(entries);
        ledger
    }

    /// Adds lines to a ledger being built, as one run (dispatch enters each window's lines
    /// before their shards leave).
    pub fn insert_all<'a>(&mut self, entries: impl IntoIterator<Item = &'a IndexEntry>) {
        let start = self.lines.len();
        self.lines.extend(entries.into_iter().map(|e| {
            (
                line_key(e.custom_id.as_deref().unwrap_or(""), e.line),
                Slot::new(e.line, e.shard),
            )
        }));
        if self.lines.len() > start {
            self.lines[start..].sort_unstable_by_key(|(k, _)| *k);
            self.runs.push(self.lines.len());
        }
    }

    /// The slot of (`custom_id`, `line`) if a result from `shard` belongs to it: in an open
    /// ledger every key gets one on first sight; otherwise the line must be the batch's and
    /// the shard the one that carried it.
    fn slot(&mut self, custom_id: &str, line: usize, shard: Option<u32>) -> Option<&mut Slot> {
        let key = line_key(custom_id, line);
        match &mut self.open {
            Some(seen) => Some(seen.entry(key).or_insert_with(|| Slot::new(line, shard))),
            None => position(&self.lines, &self.runs, &key)
                .map(|i| &mut self.lines[i].1)
                .filter(|s| s.belongs(line, shard)),
        }
    }

    /// Counts a result for (`custom_id`, `line`) from `shard`.
    pub fn record(&mut self, custom_id: &str, line: usize, shard: Option<u32>) -> Recorded {
        match self.slot(custom_id, line, shard) {
            Some(s) if s.is(REPORTED) => Recorded::Repeat,
            Some(s) => {
                s.set(REPORTED);
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
            .is_some_and(|s| s.set(WRITTEN))
    }

    fn flag(&self, custom_id: &str, line: usize, flag: u32) -> bool {
        let key = line_key(custom_id, line);
        match &self.open {
            Some(seen) => seen.get(&key).is_some_and(|s| s.is(flag)),
            None => {
                position(&self.lines, &self.runs, &key).is_some_and(|i| self.lines[i].1.is(flag))
            }
        }
    }

    /// Whether the line with this key was written by the finalization in progress.
    pub fn is_written(&self, custom_id: &str, line: usize) -> bool {
        self.flag(custom_id, line, WRITTEN)
    }

    /// Whether the line with this key has reported.
    pub fn has_reported(&self, custom_id: &str, line: usize) -> bool {
        self.flag(custom_id, line, REPORTED)
    }

    fn clear_flag(&mut self, flag: u32) {
        let slots = self.lines.iter_mut().map(|(_, s)| s);
        match &mut self.open {
            Some(seen) => seen.values_mut().for_each(|s| s.line &= !flag),
            None => slots.for_each(|s| s.line &= !flag),
        }
    }

    /// Lines and lines reported, per shard (lines rejected at intake, which no shard carries,
    /// are left out; an open ledger knows only the lines that reported).
    pub fn shard_counts(&self) -> std::collections::BTreeMap<u32, (u64, u64)> {
        let mut out = std::collections::BTreeMap::new();
        let slots: Box<dyn Iterator<Item = &Slot>> = match &self.open {
            Some(seen) => Box::new(seen.values()),
            None => Box::new(self.lines.iter().map(|(_, s)| s)),
        };
        for s in slots.filter(|s| s.shard != NO_SHARD) {
            let e: &mut (u64, u64) = out.entry(s.shard).or_default();
            e.0 += 1;
            e.1 += u64::from(s.is(REPORTED));
        }
        out
    }

    /// Forgets what a finalization wrote (before it starts again).
    pub fn reset_written(&mut self) {
        self.clear_flag(WRITTEN);
    }

    /// Forgets every report (before the results are replayed after a restart).
    pub fn reset(&mut self) {
        match &mut self.open {
            Some(seen) => seen.clear(),
            None => self.clear_flag(REPORTED),
        }
    }

    /// Frees the ledger's memory (a finished batch).
    pub fn clear(&mut self) {
        *self = Self::open();
    }
}

/// Where a key is in sorted runs (`runs`: where each ends in `lines`).
fn position(lines: &[(LineKey, Slot)], runs: &[usize], key: &LineKey) -> Option<usize> {
    let mut start = 0;
    for &end in runs {
        if let Ok(i) = lines[start..end].binary_search_by_key(key, |(k, _)| *k) {
            return Some(start + i);
        }
        start = end;
    }
    None
}

/// Line numbers are bounded by the intake limits (far below 2^30); saturate beyond (such a
/// line could not be told from another beyond the bound, and no batch has one).
fn line_u32(line: usize) -> u32 {
    u32::try_from(line).map_or(LINE_MASK, |l| l.min(LINE_MASK))
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
    fn shard_counts_say_lines_and_reports_per_shard() {
        let mut l = ledger();
        assert_eq!(
            l.shard_counts().into_iter().collect::<Vec<_>>(),
            [(0, (2, 0)), (1, (1, 0))]
        );
        l.record("a", 1, Some(0));
        l.record("a", 1, Some(0));
        l.record("", 3, None);
        assert_eq!(
            l.shard_counts().into_iter().collect::<Vec<_>>(),
            [(0, (2, 1)), (1, (1, 0))],
            "a repeat counts once; the intake-rejected line is no shard's"
        );
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
    fn lines_entered_window_by_window_are_found_in_every_run() {
        let mut l = Ledger::with_capacity(3000);
        let ids: Vec<String> = (0..3000).map(|i| format!("id-{i}")).collect();
        let entries: Vec<IndexEntry> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| entry(Some(id), i + 1, Some((i / 7) as u32)))
            .collect();
        for window in entries.chunks(1000) {
            l.insert_all(window);
        }
        assert_eq!(l.runs.len(), 3);
        assert_eq!(
            std::mem::size_of::<(LineKey, Slot)>(),
            24,
            "24 bytes a line"
        );
        assert_eq!(l.lines.capacity(), 3000, "memory taken once, never grown");
        // Every line once, from the last run back to the first.
        for e in entries.iter().rev() {
            let id = e.custom_id.as_deref().unwrap_or("");
            assert_eq!(l.record(id, e.line, e.shard), Recorded::New, "{id}");
            assert_eq!(l.record(id, e.line, e.shard), Recorded::Repeat, "{id}");
            assert_eq!(l.record(id, e.line + 1, e.shard), Recorded::Foreign);
        }
        assert_eq!(l.record("id-3000", 3001, Some(428)), Recorded::Foreign);
        assert!(l.write_once("id-0", 1, Some(0)) && l.is_written("id-0", 1));
        assert!(l.has_reported("id-2999", 3000) && !l.is_written("id-2999", 3000));
    }

    #[test]
    fn line_numbers_and_flags_share_a_word_without_mixing() {
        let max = LINE_MASK as usize;
        let mut l = Ledger::from_index(&[entry(Some("last"), max, Some(1))]);
        assert_eq!(l.record("last", max, Some(1)), Recorded::New);
        assert!(l.write_once("last", max, Some(1)));
        assert_eq!(l.record("last", max, Some(1)), Recorded::Repeat);
        assert!(l.has_reported("last", max) && l.is_written("last", max));
        l.reset_written();
        assert!(l.has_reported("last", max) && !l.is_written("last", max));
        assert_eq!(
            line_u32(usize::MAX),
            LINE_MASK,
            "beyond the bound saturates"
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
