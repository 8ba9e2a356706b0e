//! A small deterministic mutation fuzzer that runs on the stable toolchain, shared by the
//! replay tests (`coordinator/tests/fuzz.rs`, `engine/tests/fuzz.rs`; included with
//! `#[path]`). Each seed of a corpus is replayed as it is, then mutated a fixed number of times
//! from a fixed seed: bit flips, random bytes, insertions from a dictionary, deletions,
//! truncations, repeats, "interesting" integers at random offsets, and splices with another
//! seed. The same run finds the same inputs, so a failure names an input that can be saved
//! into `fuzz/corpus/<target>/` and replayed for ever.
//!
//! Also here: an allocator for the test binaries that refuses any single allocation over
//! [`MAX_ALLOCATION`] (the process aborts, naming the size), so "no unbounded allocation" is
//! checked, not hoped for.

#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Largest single allocation a parser may make while fuzzed (inputs are at most a few MB).
pub const MAX_ALLOCATION: usize = 256 << 20;

/// The system allocator, with [`MAX_ALLOCATION`] enforced and the largest request recorded.
pub struct CappedAlloc;

pub static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged, or refused with null (which
// `GlobalAlloc` allows).
unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded as received.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as received.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: forwarded as received.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// xorshift64*: small, fast, and the same everywhere.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: [u64; 12] = [
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
    1 << 40,
];

/// One mutant of `input`: one to four edits, words from `dictionary` among them.
pub fn mutate(rng: &mut Rng, input: &[u8], others: &[Vec<u8>], dictionary: &[&[u8]]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = v.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                v[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                v[i] = rng.next() as u8;
            }
            2 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                v.splice(i..i, bytes);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                v.drain(i..i + n);
            }
            4 => v.truncate(rng.below(len + 1)),
            5 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(256));
                let piece = v[i..i + n].to_vec();
                for _ in 0..1 + rng.below(8) {
                    v.splice(i..i, piece.iter().copied());
                }
            }
            6 if len >= 8 => {
                let width = [1, 2, 4, 8][rng.below(4)];
                let i = rng.below(len - width + 1);
                let value = INTERESTING[rng.below(INTERESTING.len())];
                v[i..i + width].copy_from_slice(&value.to_le_bytes()[..width]);
            }
            7 if !others.is_empty() => {
                let other = &others[rng.below(others.len())];
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                v.truncate(cut);
                v.extend_from_slice(&other[from..]);
            }
            _ if !dictionary.is_empty() => {
                let word = dictionary[rng.below(dictionary.len())];
                let i = rng.below(len + 1);
                v.splice(i..i, word.iter().copied());
            }
            _ => {}
        }
    }
    v
}

/// The files of `fuzz/corpus/<target>/`, sorted by name.
pub fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .map(|p| {
            let data = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, data)
        })
        .collect();
    files.sort();
    files
}

/// Runs `check` on every seed, then on `rounds` mutants of each; a panic names the input (its
/// bytes are written next to the target's corpus as `crash-<n>` to be kept as a regression).
pub fn run(
    target: &str,
    seeds: &[Vec<u8>],
    rounds: usize,
    dictionary: &[&[u8]],
    check: impl Fn(&[u8]),
) {
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15 ^ target.len() as u64);
    let mut inputs: Vec<Vec<u8>> = seeds.to_vec();
    for seed in seeds {
        for _ in 0..rounds {
            inputs.push(mutate(&mut rng, seed, seeds, dictionary));
        }
    }
    for (n, input) in inputs.iter().enumerate() {
        // A panic anywhere in `check` is the failure being looked for.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(input))).is_err() {
            let path = std::env::temp_dir().join(format!("gristmill-fuzz-{target}-crash-{n}"));
            let _ = std::fs::write(&path, input);
            panic!(
                "{target}: input {n} ({} bytes) panicked; saved to {} — copy it into fuzz/corpus/{target}/",
                input.len(),
                path.display()
            );
        }
    }
}
