//! The paged KV cache's block pool, with automatic prefix caching.
//!
//! The KV memory is cut into `num_blocks` blocks of `block_size` token positions. A sequence owns
//! a *block table* (the blocks holding its positions, in order); blocks are reference-counted so
//! that sequences with a common prefix share them.
//!
//! Invariants of [`BlockPool`]:
//! - every block is either *in use* (`ref_count > 0`, not in the free list) or *free*
//!   (`ref_count == 0`, in the free list exactly once);
//! - a block with a prefix hash is in `cached` under that hash, and `cached` maps every hash to a
//!   block that carries it; a free block may keep its hash (it is *evictable*), and loses it only
//!   when it is handed out again;
//! - the free list hands out blocks without a hash first, then cached blocks in least-recently
//!   released order (LRU eviction).
//!
//! A full block's hash chains its parent's hash with its token ids, so equal hashes mean equal
//! whole prefixes, not just equal blocks. The hash is SHA-256: a hit is trusted without
//! comparing tokens, so the hash must be collision-resistant — a 64-bit hash can collide by
//! accident at scale or on purpose (vLLM's CVE-2025-25183), and a collision would serve one
//! prompt's KV to another (another tenant's, even) and silently change its output.

use std::collections::{BTreeSet, HashMap};

/// Index of a block in the pool.
pub type BlockId = u32;

/// The prefix hash of a full block (SHA-256).
pub type BlockHash = [u8; 32];

/// Hash of a full block: SHA-256 over the parent block's hash (none for the first block) and
/// the block's token ids, little-endian.
pub fn block_hash(parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    match parent {
        Some(p) => {
            ctx.update(&[1]);
            ctx.update(&p);
        }
        None => ctx.update(&[0]),
    }
    for t in tokens {
        ctx.update(&t.to_le_bytes());
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Reference-counted KV blocks with an LRU prefix cache. Pure bookkeeping: no KV data lives here.
#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    ref_count: Vec<u32>,
    hash_of: Vec<Option<BlockHash>>,
    cached: HashMap<BlockHash, BlockId>,
    /// Free blocks ordered by (release stamp, id); stamp 0 for blocks without a hash.
    free: BTreeSet<(u64, BlockId)>,
    stamp_of: Vec<u64>,
    clock: u64,
}

impl BlockPool {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "block size must be positive");
        Self {
            block_size,
            ref_count: vec![0; num_blocks],
            hash_of: vec![None; num_blocks],
            cached: HashMap::new(),
            free: (0..num_blocks as BlockId).map(|b| (0, b)).collect(),
            stamp_of: vec![0; num_blocks],
            clock: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_count.len()
    }

    /// Blocks that can be handed out now (free, cached or not).
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Blocks needed to hold `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Takes a free block (evicting its cached prefix, if any) with one reference.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let (stamp, b) = self.free.pop_first()?;
        debug_assert_eq!(stamp, self.stamp_of[b as usize]);
        if let Some(h) = self.hash_of[b as usize].take() {
            self.cached.remove(&h);
        }
        self.ref_count[b as usize] = 1;
        Some(b)
    }

    /// Takes a reference to the cached block with this prefix hash, if there is one.
    pub fn lookup(&mut self, hash: BlockHash) -> Option<BlockId> {
        let b = *self.cached.get(&hash)?;
        let i = b as usize;
        if self.ref_count[i] == 0 {
            self.free.remove(&(self.stamp_of[i], b));
        }
        self.ref_count[i] += 1;
        Some(b)
    }

    /// Whether a block with this prefix hash is cached (no reference taken).
    pub fn is_cached(&self, hash: BlockHash) -> bool {
        self.cached.contains_key(&hash)
    }

    /// Records that an in-use block is full and holds the prefix with this hash. If another block
    /// already holds it, this one stays unhashed (it is freed normally later).
    pub fn commit(&mut self, block: BlockId, hash: BlockHash) {
        let i = block as usize;
        debug_assert!(self.ref_count[i] > 0, "commit of a free block");
        if self.hash_of[i].is_some() || self.cached.contains_key(&hash) {
            return;
        }
        self.hash_of[i] = Some(hash);
        self.cached.insert(hash, block);
    }

    /// Drops one reference; a block that reaches zero becomes free (and stays cached if hashed).
    pub fn release(&mut self, block: BlockId) {
        let i = block as usize;
        assert!(self.ref_count[i] > 0, "release of free block {block}");
        self.ref_count[i] -= 1;
        if self.ref_count[i] == 0 {
            let stamp = if self.hash_of[i].is_some() {
                self.clock += 1;
                self.clock
            } else {
                0
            };
            self.stamp_of[i] = stamp;
            self.free.insert((stamp, block));
        }
    }

    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.ref_count[block as usize]
    }

    /// Checks every invariant of the module doc (tests and debug builds).
    pub fn check_invariants(&self) {
        for (i, &rc) in self.ref_count.iter().enumerate() {
            let in_free = self.free.contains(&(self.stamp_of[i], i as BlockId));
            assert_eq!(
                rc == 0,
                in_free,
                "block {i}: ref_count {rc}, in free list {in_free}"
            );
            if let Some(h) = self.hash_of[i] {
                assert_eq!(
                    self.cached.get(&h),
                    Some(&(i as BlockId)),
                    "block {i}: hash not in cache map"
                );
            }
        }
        assert_eq!(
            self.free.len(),
            self.ref_count.iter().filter(|&&r| r == 0).count()
        );
        for (h, &b) in &self.cached {
            assert_eq!(
                self.hash_of[b as usize],
                Some(*h),
                "cache map points at a block without that hash"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sha256(00 01000000 02000000)`, computed with Python's hashlib.
    const HASH_OF_1_2: &str = "f64ec6aeff74ab2ec8b028c776a3b3f9be625617a26723900b440416ba72c7ec";

    #[test]
    fn allocate_release_and_exhaustion() {
        let mut p = BlockPool::new(3, 4);
        let a = p.allocate().expect("free block");
        let b = p.allocate().expect("free block");
        let c = p.allocate().expect("free block");
        assert_eq!(p.allocate(), None, "pool of 3 is exhausted");
        assert_eq!(p.num_free(), 0);
        p.release(b);
        assert_eq!(p.allocate(), Some(b));
        for x in [a, b, c] {
            p.release(x);
        }
        assert_eq!(p.num_free(), 3);
        p.check_invariants();
    }

    #[test]
    fn cached_blocks_are_shared_and_evicted_least_recently_released_first() {
        let mut p = BlockPool::new(3, 2);
        let h1 = block_hash(None, &[1, 2]);
        let h2 = block_hash(Some(h1), &[3, 4]);
        let (a, b) = (p.allocate().expect("a"), p.allocate().expect("b"));
        p.commit(a, h1);
        p.commit(b, h2);
        // A second sequence with the same prefix shares the block.
        assert_eq!(p.lookup(h1), Some(a));
        assert_eq!(p.ref_count(a), 2);
        p.release(a);
        p.release(a);
        p.release(b); // a released before b: a is the LRU cached block
        p.check_invariants();
        // The never-hashed block goes first, then the least recently released cached one.
        let fresh = p.allocate().expect("unhashed block");
        assert!(fresh != a && fresh != b);
        assert_eq!(p.allocate(), Some(a), "LRU cached block evicted next");
        assert!(!p.is_cached(h1), "evicted hash is gone");
        assert!(p.is_cached(h2));
        assert_eq!(p.lookup(h2), Some(b), "a free cached block can be revived");
        p.check_invariants();
    }

    #[test]
    fn hashes_chain_the_whole_prefix() {
        let a = block_hash(Some(block_hash(None, &[1, 2])), &[3, 4]);
        let b = block_hash(Some(block_hash(None, &[9, 9])), &[3, 4]);
        assert_ne!(a, b, "same block after different prefixes must differ");
        // The first block and a block after a parent never share a hash, nor do blocks whose
        // tokens differ only in how they split into bytes.
        assert_ne!(
            block_hash(None, &[1, 2]),
            block_hash(Some([0; 32]), &[1, 2])
        );
        assert_ne!(block_hash(None, &[0x0100]), block_hash(None, &[0x01, 0x00]));
        // SHA-256 of 0x00 then 1u32, 2u32 little-endian: the hash is a known one, not a 64-bit
        // SipHash (whose collisions served one prompt's KV to another).
        let hex = gristmill_protocol::cluster::hex(&block_hash(None, &[1, 2]));
        assert_eq!(hex, HASH_OF_1_2);
    }

    #[test]
    fn duplicate_commit_keeps_the_first_block() {
        let mut p = BlockPool::new(2, 2);
        let h = block_hash(None, &[5, 6]);
        let (a, b) = (p.allocate().expect("a"), p.allocate().expect("b"));
        p.commit(a, h);
        p.commit(b, h);
        assert_eq!(p.lookup(h), Some(a));
        p.release(a);
        p.release(a);
        p.release(b);
        p.check_invariants();
    }
}
