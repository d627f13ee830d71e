//! A deterministic toy target model for tests and demos: its logits are a fixed hash of the
//! last `order` tokens of the context, so it is a random `order`-gram model with a KV-cache
//! style state (`forward` appends, `rollback` truncates).

use super::generate::TargetModel;

/// A target whose logits at each position hash the last `order` tokens.
#[derive(Debug, Clone)]
pub struct HashTarget {
    /// Vocabulary size (logit row length).
    pub vocab: usize,
    /// Context tokens the logits depend on.
    pub order: usize,
    /// Logit scale: larger is peakier.
    pub scale: f32,
    /// Hash seed.
    pub seed: u64,
    context: Vec<u32>,
    /// Tokens passed to `forward` over the model's life.
    pub tokens_processed: usize,
    /// `forward` calls.
    pub calls: usize,
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl HashTarget {
    /// A fresh model with an empty state.
    pub fn new(vocab: usize, order: usize, scale: f32, seed: u64) -> Self {
        HashTarget {
            vocab: vocab.max(1),
            order,
            scale,
            seed,
            context: Vec::new(),
            tokens_processed: 0,
            calls: 0,
        }
    }

    /// The tokens in the state.
    pub fn context(&self) -> &[u32] {
        &self.context
    }

    /// Logits after a context.
    pub fn logits_after(&self, context: &[u32]) -> Vec<f32> {
        let from = context.len().saturating_sub(self.order);
        let h = context[from..]
            .iter()
            .fold(mix(self.seed), |h, &t| mix(h ^ t as u64));
        (0..self.vocab)
            .map(|v| {
                let r = mix(h ^ (v as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93));
                // Uniform in [0, 1), cubed so that a few tokens dominate.
                let u = (r >> 40) as f32 / (1u64 << 24) as f32;
                self.scale * u * u * u
            })
            .collect()
    }
}

impl TargetModel for HashTarget {
    fn forward(&mut self, new_tokens: &[u32]) -> Vec<Vec<f32>> {
        self.calls += 1;
        self.tokens_processed += new_tokens.len();
        new_tokens
            .iter()
            .map(|&t| {
                self.context.push(t);
                self.logits_after(&self.context)
            })
            .collect()
    }

    fn rollback(&mut self, n_tokens: usize) {
        let keep = self.context.len().saturating_sub(n_tokens);
        self.context.truncate(keep);
    }
}
