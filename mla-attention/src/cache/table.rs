//! [`BlockTable`]: which blocks hold a sequence, and how many tokens each layer has
//! written; [`SeqView`]: the borrowed (blocks, tokens) pair a decode reads.

use super::BlockId;

/// The blocks of one sequence, in token order: token `t` of any layer lives in
/// `blocks[t / block_size]` at slot `t % block_size`.
///
/// Layers fill the blocks independently (a decoder appends layer 0's row before
/// layer 1's), so each layer has its own token count; the table holds
/// `ceil(max_l tokens_l / block_size)` blocks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockTable {
    pub(crate) blocks: Vec<BlockId>,
    pub(crate) layer_tokens: Vec<usize>,
}

impl BlockTable {
    pub(crate) fn new(num_layers: usize) -> Self {
        BlockTable {
            blocks: Vec::new(),
            layer_tokens: vec![0; num_layers],
        }
    }

    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    /// Tokens written to each layer.
    pub fn layer_tokens(&self) -> &[usize] {
        &self.layer_tokens
    }

    /// Tokens of the most advanced layer (what the blocks must cover).
    pub fn max_tokens(&self) -> usize {
        self.layer_tokens.iter().copied().max().unwrap_or(0)
    }
}

/// One sequence as a decode kernel sees it: the first `tokens` rows of `blocks`.
/// Built by [`LatentPagedCache::view`](super::LatentPagedCache::view), or by hand
/// from an external block table; the decode checks every id before reading.
#[derive(Debug, Clone, Copy)]
pub struct SeqView<'a> {
    pub blocks: &'a [BlockId],
    pub tokens: usize,
}
