//! Split scheduling for the CUDA decode: which thread block reads which tokens.
//!
//! A decode step of a batch is cut into splits, each a run of one sequence's tokens.
//! One thread block handles one split (for one head group), so the number of splits
//! sets how much of the GPU a step fills. The rule ([`split_tokens_for`]): aim for
//! about one split per multiprocessor over the whole batch (long sequences get
//! several, so even batch 1 fills the GPU), but never more than
//! [`MAX_SPLIT_TOKENS`] tokens per split (more splits smooth out the last wave), and
//! never fewer than one 64-token tile. Each sequence's splits are then made equal.
//!
//! The plan is flattened into one `u32` buffer (layout in `kernels/mla_common.cuh`,
//! `MetaOffsets`), uploaded once per step and shared by every layer.

use crate::cache::SeqView;
use crate::error::{Error, Result};

use super::kernels::MetaOffsets;

/// Largest split the automatic rule makes (tokens). With splits of at most 4096
/// tokens a 32 × 64K batch gives 512 blocks, ~4 waves on 132 SMs; untuned beyond that.
pub const MAX_SPLIT_TOKENS: usize = 4096;
/// Token tile of the tensor-core kernel; automatic splits are multiples of it.
pub const TILE_TOKENS: usize = 64;

/// How a [`super::CudaMlaDecoder`] cuts sequences into splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SplitPolicy {
    /// About one split per multiprocessor over the batch (see the module docs).
    #[default]
    Auto,
    /// Splits of at most this many tokens (tests use small values to force many
    /// splits and tails).
    Fixed(usize),
}

/// The splits of one step, host side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SplitPlan {
    /// `(sequence, first token, end token)` per split, sequence-major.
    pub splits: Vec<(u32, u32, u32)>,
    /// Splits of sequence `b`: `seq_splits[b]..seq_splits[b + 1]`.
    pub seq_splits: Vec<u32>,
}

impl SplitPlan {
    pub fn num_splits(&self) -> usize {
        self.splits.len()
    }

    /// Most splits any one sequence has.
    pub fn max_splits_per_seq(&self) -> usize {
        self.seq_splits
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .max()
            .unwrap_or(0)
    }

    /// Whether any sequence has more than one split (then the combine kernel runs).
    pub fn needs_combine(&self) -> bool {
        self.seq_splits.windows(2).any(|w| w[1] - w[0] > 1)
    }
}

/// Target split length for a batch of `lens` on `sm_count` multiprocessors.
pub fn split_tokens_for(lens: &[usize], sm_count: usize) -> usize {
    let total: usize = lens.iter().sum();
    let per_sm = total.div_ceil(sm_count.max(1));
    per_sm
        .div_ceil(TILE_TOKENS)
        .max(1)
        .saturating_mul(TILE_TOKENS)
        .min(MAX_SPLIT_TOKENS)
}

/// Cut each sequence into `round(len / target)` (at least one) equal splits,
/// rounded up to whole tiles when the split is longer than a tile.
pub(crate) fn plan_splits(lens: &[usize], target: usize) -> SplitPlan {
    let target = target.max(1);
    let mut splits = Vec::new();
    let mut seq_splits = vec![0u32];
    for (b, &len) in lens.iter().enumerate() {
        let n = ((len + target / 2) / target).max(1);
        let mut each = len.div_ceil(n);
        if each > TILE_TOKENS {
            each = each.div_ceil(TILE_TOKENS) * TILE_TOKENS;
        }
        let mut t = 0;
        while t < len {
            let e = (t + each).min(len);
            splits.push((b as u32, t as u32, e as u32));
            t = e;
        }
        seq_splits.push(splits.len() as u32);
    }
    SplitPlan { splits, seq_splits }
}

/// The metadata buffer of a plan and its offsets (see `mla_common.cuh`).
pub(crate) fn encode(views: &[SeqView<'_>], plan: &SplitPlan) -> Result<(Vec<u32>, MetaOffsets)> {
    let b = views.len();
    let mut meta = Vec::with_capacity(plan.splits.len() * 3 + 2 * (b + 1));
    for &(s, t0, t1) in &plan.splits {
        meta.extend([s, t0, t1]);
    }
    let seqsplit_off = meta.len();
    meta.extend(&plan.seq_splits);
    let seqblk_off = meta.len();
    let mut at = 0u32;
    for v in views {
        meta.push(at);
        at = at
            .checked_add(v.blocks.len() as u32)
            .ok_or_else(|| Error::InvalidInput("decode plan: too many blocks".into()))?;
    }
    meta.push(at);
    let blkid_off = meta.len();
    for v in views {
        meta.extend(v.blocks);
    }
    let off = |n: usize| {
        i32::try_from(n).map_err(|_| Error::InvalidInput("decode plan exceeds i32 offsets".into()))
    };
    let offsets = MetaOffsets {
        split_off: 0,
        seqsplit_off: off(seqsplit_off)?,
        seqblk_off: off(seqblk_off)?,
        blkid_off: off(blkid_off)?,
    };
    off(meta.len())?;
    Ok((meta, offsets))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_splits_fill_the_gpu_and_cover_every_token() {
        for (lens, sm) in [
            (vec![32768], 132),
            (vec![4096], 132),
            (vec![16384; 32], 132),
            (vec![65536; 32], 132),
            (vec![1, 63, 64, 65, 1000, 5000], 132),
            (vec![7], 4),
        ] {
            let plan = plan_splits(&lens, split_tokens_for(&lens, sm));
            for (b, &len) in lens.iter().enumerate() {
                let (s0, s1) = (plan.seq_splits[b] as usize, plan.seq_splits[b + 1] as usize);
                assert!(s1 > s0, "sequence {b} has a split");
                let mut t = 0;
                for &(s, a, e) in &plan.splits[s0..s1] {
                    assert_eq!((s as usize, a as usize), (b, t), "splits tile the sequence");
                    assert!(e > a);
                    t = e as usize;
                }
                assert_eq!(t, len);
            }
            let total: usize = lens.iter().sum();
            if total >= sm * TILE_TOKENS * 4 {
                assert!(
                    plan.num_splits() >= sm * 9 / 10,
                    "{lens:?}: {}",
                    plan.num_splits()
                );
            }
        }
    }

    #[test]
    fn batch_one_32k_gets_about_one_split_per_sm() {
        let plan = plan_splits(&[32768], split_tokens_for(&[32768], 132));
        assert_eq!(plan.num_splits(), 128);
        assert!(plan.needs_combine());
        let single = plan_splits(&[50, 10], 64);
        assert!(!single.needs_combine());
    }
}
