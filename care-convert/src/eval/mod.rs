//! Evaluation on real text and real benchmark requests.
//!
//! - [`perplexity`]: token-level NLL over a text file in fixed windows (stride option).
//! - [`multiple_choice`]: zero-shot ranking of OLMES `requests.jsonl.gz` files (the
//!   lm-evaluation-harness protocol), with `acc` and `acc_norm`.
//! - [`report`]: JSON and markdown output.

pub mod multiple_choice;
pub mod perplexity;
pub mod report;
pub mod run;

/// Log-softmax statistics of one logits row for one target token.
#[derive(Debug, Clone, Copy)]
pub struct TokenScore {
    /// `log p(target)`.
    pub logprob: f64,
    /// Whether the target is the row's argmax.
    pub is_argmax: bool,
}

/// Score `target` under `row` (unnormalized logits) in f64.
pub fn score_row(row: &[f32], target: u32) -> Option<TokenScore> {
    let t = target as usize;
    if t >= row.len() {
        return None;
    }
    let mut max = f32::NEG_INFINITY;
    let mut arg = 0usize;
    for (i, &v) in row.iter().enumerate() {
        if v > max {
            max = v;
            arg = i;
        }
    }
    let max = max as f64;
    let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    let logprob = row[t] as f64 - max - sum.ln();
    Some(TokenScore {
        logprob,
        is_argmax: arg == t,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_row_is_log_softmax() {
        let row = [1.0f32, 2.0, 3.0];
        let z: f64 = row.iter().map(|&v| (v as f64).exp()).sum();
        let s = score_row(&row, 0).unwrap();
        assert!((s.logprob - (1.0 - z.ln())).abs() < 1e-12);
        assert!(!s.is_argmax);
        assert!(score_row(&row, 2).unwrap().is_argmax);
        assert!(score_row(&row, 3).is_none());
    }
}
