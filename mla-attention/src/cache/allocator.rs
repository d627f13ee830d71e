//! [`BlockAllocator`]: a free list of block ids with a reference count per block.
//!
//! A block id names the same slot in every layer's pool (see the
//! [module docs](super)), so one allocator serves all layers. A block is free iff its
//! count is zero; forks share blocks by raising counts, and a block returns to the
//! free list when the last sequence holding it lets go.

use super::BlockId;

#[derive(Debug, Clone)]
pub struct BlockAllocator {
    /// Free ids, popped from the back; initialized so that ids come out ascending.
    free: Vec<BlockId>,
    /// Sequences (block-table entries) holding each block.
    refcount: Vec<u32>,
}

impl BlockAllocator {
    /// An allocator over `num_blocks` free blocks.
    pub fn new(num_blocks: usize) -> Self {
        BlockAllocator {
            free: (0..num_blocks as BlockId).rev().collect(),
            refcount: vec![0; num_blocks],
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.refcount.len()
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    pub fn used_blocks(&self) -> usize {
        self.num_blocks() - self.free_blocks()
    }

    /// Holders of `block` (0 = free). Out-of-range ids read as 0.
    pub fn refcount(&self, block: BlockId) -> u32 {
        self.refcount.get(block as usize).copied().unwrap_or(0)
    }

    /// Take a free block with count 1, or `None` when none is left. Callers check
    /// [`Self::free_blocks`] before mutating anything, so `None` here is a bug.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let id = self.free.pop()?;
        self.refcount[id as usize] = 1;
        Some(id)
    }

    /// One more holder of an allocated block.
    pub fn retain(&mut self, block: BlockId) {
        let rc = &mut self.refcount[block as usize];
        debug_assert!(*rc > 0, "retain of free block {block}");
        *rc += 1;
    }

    /// One holder fewer; the block is freed when none is left.
    pub fn release(&mut self, block: BlockId) {
        let rc = &mut self.refcount[block as usize];
        debug_assert!(*rc > 0, "release of free block {block}");
        *rc -= 1;
        if *rc == 0 {
            self.free.push(block);
        }
    }
}
