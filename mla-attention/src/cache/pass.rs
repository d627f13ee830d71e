//! [`PassRows`]: which cached sequence and position each row of a model pass belongs to —
//! the bookkeeping the paged attention kernels and the paged models share.

use super::SeqId;
use crate::error::{Error, Result};

/// Every sequence of one pass at most once (`what` names the caller in the error).
pub fn check_distinct(seqs: &[SeqId], what: &str) -> Result<()> {
    let mut sorted = seqs.to_vec();
    sorted.sort();
    if sorted.windows(2).any(|w| w[0] == w[1]) {
        return Err(Error::InvalidInput(format!(
            "{what}: a sequence appears twice"
        )));
    }
    Ok(())
}

/// The rows of one pass: for row `r`, which sequence (index into the pass's `seqs`) and
/// which position; rows of a sequence are consecutive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassRows {
    pub seqs: Vec<SeqId>,
    /// Tokens each sequence held before the pass.
    pub starts: Vec<usize>,
    /// Rows of each sequence.
    pub lens: Vec<usize>,
    pub row_seq: Vec<usize>,
    pub row_pos: Vec<usize>,
}

impl PassRows {
    pub fn new(seqs: &[SeqId], starts: &[usize], lens: &[usize]) -> Self {
        let mut row_seq = Vec::new();
        let mut row_pos = Vec::new();
        for (i, (&s, &n)) in starts.iter().zip(lens).enumerate() {
            row_seq.extend(std::iter::repeat_n(i, n));
            row_pos.extend(s..s + n);
        }
        PassRows {
            seqs: seqs.to_vec(),
            starts: starts.to_vec(),
            lens: lens.to_vec(),
            row_seq,
            row_pos,
        }
    }

    pub fn rows(&self) -> usize {
        self.row_pos.len()
    }

    /// The first row of each sequence.
    pub fn offsets(&self) -> Vec<usize> {
        let mut off = Vec::with_capacity(self.lens.len());
        let mut o = 0;
        for &n in &self.lens {
            off.push(o);
            o += n;
        }
        off
    }
}
