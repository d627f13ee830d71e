//! [`CpuPagedModel`]: a decoder on the CPU whose attention layers run over a
//! [`LatentPagedCache`] — original GQA (`[K ; V]` rows), stock MLA (absorbed decode over
//! `[c ; k_pe]` rows) or one-shot low rank (latents, K/V rebuilt).
//!
//! A pass ([`PagedModel::forward`]) runs every row of every sequence through the paged
//! layers at once: embedding, norms, projections and MLP over all rows (the few-row
//! kernel, row by row bit-identical), attention per row over its sequence's blocks.
//! Prefill is the same passes over the prompt in chunks (no logits), so a prompt's cached
//! rows do not depend on how it was cut; only the one-shot low-rank form prefills through
//! the reference decoder's contiguous cache.

use candle_core::Tensor;

use super::layers::{cache_config, check_parts, load_parts, prefill_rows, RunnerLayer};
use super::{check_pass, PagedModel, PassRows, RunnerConfig};
use crate::cache::{LatentElem, LatentPagedCache, SeqId};
use crate::config::ModelSpec;
use crate::cpu::{PagedGqaLayer, PagedMlaLayer};
use crate::error::Result;
use crate::io::WeightSource;
use crate::mla::MlaAttention;
use crate::model::{Decoder, LowRankKvAttention};

/// One layer's attention over the paged cache.
enum CpuLayer {
    Gqa(PagedGqaLayer),
    Mla(Box<PagedMlaLayer>),
    LowRank(LowRankKvAttention),
}

/// A decoder (original GQA, stock MLA or one-shot low rank) with its K/V state in a
/// [`LatentPagedCache`] of element type `T`, on the CPU.
pub struct CpuPagedModel<T: LatentElem = f32> {
    /// Prefill (MLA layers in materialized form); norms, MLP, head are shared with the
    /// paged passes.
    decoder: Decoder,
    layers: Vec<RunnerLayer>,
    paged: Vec<CpuLayer>,
    cache: LatentPagedCache<T>,
}

/// One-shot layer `l` over the rows of `pass`, one row at a time in order: the row's
/// sequence's latents gathered from the blocks, K/V rebuilt, the row's own latent
/// appended (so the next row of the segment sees it). `x` `(rows, 1, hidden)`.
fn low_rank_rows<T: LatentElem>(
    attn: &LowRankKvAttention,
    decoder: &Decoder,
    l: usize,
    x: &Tensor,
    pass: &PassRows,
    cache: &mut LatentPagedCache<T>,
) -> Result<Tensor> {
    let width = cache.layer(l)?.width.width();
    let mut outs = Vec::with_capacity(pass.rows());
    for (r, &i) in pass.row_seq.iter().enumerate() {
        let s = pass.seqs[i];
        let rows = cache.gather(s, l)?;
        let tokens = rows.len() / width;
        let lat = Tensor::from_vec(rows, (1, 1, tokens, width), x.device())?;
        let (out, row) = attn.decode_over(&x.narrow(0, r, 1)?, &lat, &decoder.rope)?;
        let row = row.flatten_all()?.to_vec1::<f32>()?;
        cache.append(s, l, width, &row)?;
        outs.push(out);
    }
    Ok(Tensor::cat(&outs, 0)?)
}

impl<T: LatentElem> CpuPagedModel<T> {
    /// Load a checkpoint: original Llama/Qwen2 (GQA), stock DeepSeek-V2 (dense MLP) or
    /// one-shot low rank; every layer's attention once, shared by the prefill decoder and
    /// the paged passes.
    pub fn load(spec: &ModelSpec, w: &dyn WeightSource, config: RunnerConfig) -> Result<Self> {
        let (decoder, layers) = load_parts(spec, w)?;
        Self::from_layers(decoder, layers, config)
    }

    /// A model from a decoder and the MLA attention of each of its layers (the same
    /// weights the decoder's layers hold; the decoder is used for prefill, so its
    /// layers should compute a multi-token step, e.g. materialized or auto form).
    pub fn from_parts(
        decoder: Decoder,
        attns: Vec<MlaAttention>,
        config: RunnerConfig,
    ) -> Result<Self> {
        Self::from_layers(
            decoder,
            attns
                .into_iter()
                .map(|a| RunnerLayer::Mla(Box::new(a)))
                .collect(),
            config,
        )
    }

    fn from_layers(
        decoder: Decoder,
        layers: Vec<RunnerLayer>,
        config: RunnerConfig,
    ) -> Result<Self> {
        check_parts(&decoder, &layers)?;
        let cache = LatentPagedCache::new(cache_config(&layers, config))?;
        let paged = layers
            .iter()
            .enumerate()
            .map(|(l, a)| match a {
                RunnerLayer::Gqa(a) => Ok(CpuLayer::Gqa(PagedGqaLayer::new(a.clone(), l))),
                RunnerLayer::Mla(a) => Ok(CpuLayer::Mla(Box::new(PagedMlaLayer::new(
                    (**a).clone(),
                    l,
                )?))),
                RunnerLayer::LowRank(a) => Ok(CpuLayer::LowRank(a.clone())),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(CpuPagedModel {
            decoder,
            layers,
            paged,
            cache,
        })
    }

    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    pub fn cache(&self) -> &LatentPagedCache<T> {
        &self.cache
    }

    /// Every layer over the rows of `pass` (appending their cache rows): the hidden states
    /// `(rows, 1, hidden)` before the final norm.
    fn run_layers(&mut self, tokens: &[u32], pass: &PassRows) -> Result<Tensor> {
        let d = &self.decoder;
        let rows = tokens.len();
        // (1, rows, hidden) → (rows, 1, hidden): one row per token.
        let mut x = d.embed(tokens)?.reshape((rows, 1, d.spec.hidden_size))?;
        for (l, (layer, paged)) in d.layers.iter().zip(&self.paged).enumerate() {
            let h = layer.input_norm.forward(&x)?;
            let a = match paged {
                CpuLayer::Gqa(g) => g.forward_rows(&h, &d.rope, pass, &mut self.cache)?,
                CpuLayer::Mla(p) => p.forward_rows(&h, pass, &mut self.cache)?,
                CpuLayer::LowRank(a) => low_rank_rows(a, d, l, &h, pass, &mut self.cache)?,
            };
            x = (x + a)?;
            let m = layer.mlp.forward(&layer.post_norm.forward(&x)?)?;
            x = (x + m)?;
        }
        Ok(x)
    }

    fn forward_rows(&mut self, tokens: &[u32], pass: &PassRows) -> Result<Tensor> {
        let x = self.run_layers(tokens, pass)?;
        let d = &self.decoder;
        d.logits(
            &d.norm
                .forward(&x)?
                .reshape((tokens.len(), d.spec.hidden_size))?,
        )
    }

    /// The one-shot form's prefill: the decoder over the whole prompt (contiguous cache),
    /// its rows copied into the paged cache — its paged layer rebuilds K/V row by row,
    /// which is quadratic in copies over a long prompt.
    fn prefill_contiguous(&mut self, seq: SeqId, tokens: &[u32]) -> Result<()> {
        let mut contiguous = self.decoder.new_cache();
        self.decoder.forward_hidden(tokens, &mut contiguous, None)?;
        contiguous
            .layers
            .iter()
            .zip(&self.layers)
            .enumerate()
            .try_for_each(|(l, (lc, layer))| {
                self.cache
                    .append_tensor(seq, l, &prefill_rows(layer, l, lc)?)
            })
    }

    /// The prompt through the paged layers in chunks of [`PREFILL_CHUNK`] rows, with the
    /// same kernels as a decode step (no logits): the cached rows are the bits decoding the
    /// prompt token by token would have written.
    fn prefill_paged(&mut self, seq: SeqId, tokens: &[u32]) -> Result<()> {
        let mut start = 0;
        for chunk in tokens.chunks(PREFILL_CHUNK) {
            let pass = PassRows::new(&[seq], &[start], &[chunk.len()]);
            self.run_layers(chunk, &pass)?;
            start += chunk.len();
        }
        Ok(())
    }
}

/// Prompt rows per prefill pass (the few-row kernel's largest pass).
const PREFILL_CHUNK: usize = crate::model::few_rows::MAX_ROWS;

impl<T: LatentElem> PagedModel for CpuPagedModel<T> {
    fn block_size(&self) -> usize {
        self.cache.block_size()
    }

    fn num_blocks(&self) -> usize {
        self.cache.num_blocks()
    }

    fn free_blocks(&self) -> usize {
        self.cache.free_blocks()
    }

    fn used_blocks(&self) -> usize {
        self.cache.used_blocks()
    }

    fn held_blocks(&self, seq: SeqId) -> usize {
        self.cache.block_table(seq).map_or(0, |t| t.blocks.len())
    }

    fn num_sequences(&self) -> usize {
        self.cache.num_sequences()
    }

    fn bytes_per_token(&self) -> usize {
        self.cache.bytes_per_token()
    }

    fn vocab_size(&self) -> usize {
        self.decoder.spec.vocab_size
    }

    fn max_context(&self) -> usize {
        self.decoder.spec.max_position_embeddings
    }

    fn max_segment_rows(&self) -> usize {
        crate::model::few_rows::MAX_ROWS
    }

    fn prefill(&mut self, tokens: &[u32]) -> Result<SeqId> {
        let seq = self.cache.add_sequence();
        if tokens.is_empty() {
            return Ok(seq);
        }
        let one_shot = self.paged.iter().any(|l| matches!(l, CpuLayer::LowRank(_)));
        let done = if one_shot {
            self.prefill_contiguous(seq, tokens)
        } else {
            self.prefill_paged(seq, tokens)
        };
        if let Err(e) = done {
            self.cache.free(seq)?;
            return Err(e);
        }
        Ok(seq)
    }

    fn tokens(&self, seq: SeqId) -> Result<usize> {
        self.cache.tokens(seq, 0)
    }

    fn rollback(&mut self, seq: SeqId, tokens: usize) -> Result<()> {
        for l in 0..self.paged.len() {
            if self.cache.tokens(seq, l)? > tokens {
                self.cache.truncate(seq, l, tokens)?;
            }
        }
        Ok(())
    }

    fn forward(&mut self, seqs: &[SeqId], segments: &[&[u32]]) -> Result<Tensor> {
        check_pass(seqs, segments, self.vocab_size(), self.max_segment_rows())?;
        let starts: Vec<usize> = seqs
            .iter()
            .map(|&s| self.tokens(s))
            .collect::<Result<_>>()?;
        let lens: Vec<usize> = segments.iter().map(|s| s.len()).collect();
        let pass = PassRows::new(seqs, &starts, &lens);
        let tokens: Vec<u32> = segments.iter().flat_map(|s| s.iter().copied()).collect();
        self.forward_rows(&tokens, &pass).or_else(|e| {
            for (&s, &p) in seqs.iter().zip(&starts) {
                self.rollback(s, p)?;
            }
            Err(e)
        })
    }

    fn free(&mut self, seq: SeqId) -> Result<()> {
        self.cache.free(seq)
    }
}
