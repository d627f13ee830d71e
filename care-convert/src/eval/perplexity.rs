//! Perplexity of a token stream in fixed-length windows.
//!
//! Windows start every `stride` tokens and hold up to `window` tokens; each window
//! scores only the targets the previous window did not (Hugging Face's sliding-window
//! recipe). With `stride == window` the windows do not overlap and the first token of
//! each window is context only. The very first token of the text is never a target.

use serde::{Deserialize, Serialize};

use super::score_row;
use crate::error::{Error, Result};
use mla_attention::model::Decoder;

/// Options of a perplexity run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PerplexityOptions {
    /// Tokens per forward pass.
    pub window: usize,
    /// Tokens between window starts; `None` means `window` (no overlap).
    pub stride: Option<usize>,
}

impl Default for PerplexityOptions {
    fn default() -> Self {
        PerplexityOptions {
            window: 512,
            stride: None,
        }
    }
}

impl PerplexityOptions {
    /// Check window ≥ 2 and 1 ≤ stride ≤ window.
    pub fn validate(&self) -> Result<()> {
        let stride = self.stride.unwrap_or(self.window);
        if self.window < 2 {
            return Err(Error::InvalidOption(format!(
                "window {} must be at least 2",
                self.window
            )));
        }
        if stride == 0 || stride > self.window {
            return Err(Error::InvalidOption(format!(
                "stride {stride} must be in 1..={} (the window)",
                self.window
            )));
        }
        Ok(())
    }
}

/// Result of a perplexity run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PerplexityResult {
    /// Tokens in the evaluated stream.
    pub tokens: usize,
    /// Targets scored (`tokens - 1` when every window is scored).
    pub scored: usize,
    pub windows: usize,
    /// Mean negative log-likelihood per scored token (nats).
    pub nll: f64,
    pub ppl: f64,
    /// Fraction of targets that are the model's argmax.
    pub top1_acc: f64,
}

/// Perplexity of `tokens` under `model`. `progress(done, total)` is called per window.
pub fn perplexity(
    model: &Decoder,
    tokens: &[u32],
    opts: &PerplexityOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<PerplexityResult> {
    let window = opts.window;
    let stride = opts.stride.unwrap_or(window);
    if window < 2 {
        return Err(Error::InvalidOption(format!(
            "window {window} must be at least 2"
        )));
    }
    if stride == 0 || stride > window {
        return Err(Error::InvalidOption(format!(
            "stride {stride} must be in 1..={window} (the window)"
        )));
    }
    if tokens.len() < 2 {
        return Err(Error::InvalidOption(format!(
            "need at least 2 tokens to score, got {}",
            tokens.len()
        )));
    }
    let n = tokens.len();
    let starts: Vec<usize> = (0..n - 1).step_by(stride).collect();
    let mut nll = 0f64;
    let mut hits = 0usize;
    let mut scored = 0usize;
    let mut prev_end = 0usize; // targets < prev_end are already scored
    let mut ran = 0usize;
    for (w, &begin) in starts.iter().enumerate() {
        let end = (begin + window).min(n);
        let first_target = prev_end.max(begin + 1);
        if first_target < end {
            let mut cache = model.new_cache();
            let hidden = model.forward_hidden(&tokens[begin..end - 1], &mut cache, None)?;
            // Row i predicts tokens[begin + i + 1]; keep rows whose target is new.
            let skip = first_target - 1 - begin;
            let rows = hidden.narrow(0, skip, end - first_target)?;
            let logits = model.logits(&rows)?.to_vec2::<f32>()?;
            for (row, &target) in logits.iter().zip(&tokens[first_target..end]) {
                let s = score_row(row, target).ok_or_else(|| {
                    Error::InvalidOption(format!("token {target} outside the vocabulary"))
                })?;
                if !s.logprob.is_finite() {
                    return Err(Error::NonFinite(format!(
                        "log-probability at window {w} (begin {begin})"
                    )));
                }
                nll -= s.logprob;
                hits += s.is_argmax as usize;
                scored += 1;
            }
        }
        prev_end = end;
        ran += 1;
        progress(w + 1, starts.len());
        if end == n {
            break;
        }
    }
    let mean = nll / scored as f64;
    Ok(PerplexityResult {
        tokens: n,
        scored,
        windows: ran,
        nll: mean,
        ppl: mean.exp(),
        top1_acc: hits as f64 / scored as f64,
    })
}
