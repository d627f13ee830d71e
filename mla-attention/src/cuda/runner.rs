//! [`CudaPagedModel`]: the GPU [`PagedModel`] of the [`Engine`](crate::engine::Engine) — a converted checkpoint on
//! one CUDA device, its latents in a [`CudaLatentCache`]; stock MLA layers decode
//! through [`CudaMlaDecoder`], one-shot low-rank layers rebuild K/V from each
//! sequence's latents gathered on the device ([`LowRankKvAttention::decode_over`]).
//!
//! The dense parts (norms, projections, MLP, head) are candle ops on the device
//! (cuBLAS); per layer and pass (one row per sequence for a decode step, `1 + k` rows
//! for a sequence whose draft of `k` tokens is verified):
//!
//! ```text
//! h = norm(x)                   q = queries(h) → [q_nope ; RoPE_pos(q_pe)]   (b, n_h, ·)
//! [c ; RoPE_pos(k_pe)] = latents_at(h, pos) → append_pass (each row to its sequence)
//! q̃ = W_UKᵀ q_nope (per head)   õ = our split-KV decode, each row over its sequence's
//!                               blocks up to its own position               (b, n_h, r)
//! o = o_proj(W_UV õ)            x += o;  x += mlp(norm(x))
//! ```
//!
//! then norm and head on the device; the logits go to the engine, which picks tokens
//! and verifies drafts as for every paged model. Prefill runs the prompt through the
//! same decoder (materialized MLA) in chunks of [`CudaRunnerOptions::prefill_chunk`]
//! tokens, so the score matrix stays `chunk × prompt` per head however long the prompt,
//! and copies each layer's latent rows into the paged cache on the device.
//!
//! ```no_run
//! use mla_attention::{io::Checkpoint, runner::RunnerConfig};
//! use mla_attention::engine::{Engine, EngineConfig, GenerationRequest};
//! use mla_attention::cuda::{CudaPagedModel, CudaRunnerOptions};
//! let ckpt = Checkpoint::open("deepseek-v2-dense-dir")?;
//! let cfg = RunnerConfig { block_size: 64, num_blocks: 4096 };
//! let model = CudaPagedModel::<half::bf16>::load(&ckpt.spec, ckpt.weights.as_ref(), cfg,
//!     CudaRunnerOptions::default())?;
//! let mut engine = Engine::new(model, EngineConfig::default());
//! let id = engine.submit(GenerationRequest::greedy(vec![1, 2, 3], 16))?;
//! let out = engine.run_to_completion()?;
//! # Ok::<(), mla_attention::Error>(())
//! ```

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::interop::{with_view, wrap};
use super::{CudaDecodeQuery, CudaLatentCache, CudaLatentElem, CudaMlaDecoder, MlaKernels};
use crate::cache::{PassRows, SeqId, SeqView};
use crate::config::ModelSpec;
use crate::error::{Error, Result};
use crate::io::{OnDevice, WeightSource};
use crate::mla::{MlaAttention, MlaShape};
use crate::model::{Decoder, LowRankKvAttention};
use crate::runner::layers::{cache_config, check_parts, load_parts, prefill_rows, RunnerLayer};
use crate::runner::{check_pass, PagedModel, RunnerConfig};

/// Most rows one sequence brings to a pass (a token and its draft) when every layer is
/// stock MLA.
pub const MAX_SEGMENT_ROWS: usize = 32;

/// How a [`CudaPagedModel`] holds its weights and runs prefill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaRunnerOptions {
    /// CUDA device ordinal.
    pub device: usize,
    /// Weight and activation dtype (`F32`, or `BF16` for speed).
    pub dtype: DType,
    /// Prompt tokens per prefill pass (bounds prefill memory for long prompts).
    pub prefill_chunk: usize,
}

impl Default for CudaRunnerOptions {
    fn default() -> Self {
        CudaRunnerOptions {
            device: 0,
            dtype: DType::BF16,
            prefill_chunk: 2048,
        }
    }
}

/// A converted decoder (stock MLA or one-shot low rank) on one GPU over a paged latent
/// cache of element `T`.
pub struct CudaPagedModel<T: CudaLatentElem> {
    decoder: Decoder,
    attns: Vec<RunnerLayer>,
    cache: CudaLatentCache<T>,
    dec: CudaMlaDecoder,
    device: Device,
    options: CudaRunnerOptions,
}

impl<T: CudaLatentElem> CudaPagedModel<T> {
    /// Load a converted checkpoint (stock DeepSeek-V2 with dense MLP, or one-shot low
    /// rank) onto the device of `options`, in its dtype, with a cache of `config`'s
    /// geometry (each layer its own width).
    pub fn load(
        spec: &ModelSpec,
        w: &dyn WeightSource,
        config: RunnerConfig,
        options: CudaRunnerOptions,
    ) -> Result<Self> {
        if !matches!(options.dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(Error::InvalidInput(format!(
                "CUDA runner dtype {:?}: use f32, bf16 or f16",
                options.dtype
            )));
        }
        if options.prefill_chunk == 0 {
            return Err(Error::InvalidInput("prefill_chunk must be > 0".into()));
        }
        let device = Device::new_cuda(options.device)?;
        let on_dev = OnDevice {
            inner: w,
            device: device.clone(),
            dtype: Some(options.dtype),
        };
        let (decoder, attns) = load_parts(spec, &on_dev)?;
        if attns.iter().any(|a| matches!(a, RunnerLayer::Gqa(_))) {
            return Err(Error::InvalidInput(format!(
                "{}: an original GQA checkpoint; the CUDA paged model decodes converted \
                 checkpoints (stock MLA from `care-convert mla`, one-shot latents from \
                 `care-convert convert`); GQA runs on the CPU paged model",
                w.path().display()
            )));
        }
        check_parts(&decoder, &attns)?;
        let kernels = MlaKernels::new(device.as_cuda_device()?.cuda_stream())?;
        let cache = CudaLatentCache::new(kernels.clone(), cache_config(&attns, config))?;
        Ok(CudaPagedModel {
            decoder,
            attns,
            dec: CudaMlaDecoder::new(kernels),
            cache,
            device,
            options,
        })
    }

    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    pub fn cache(&self) -> &CudaLatentCache<T> {
        &self.cache
    }

    pub fn kernels(&self) -> &Arc<MlaKernels> {
        self.cache.kernels()
    }

    pub fn options(&self) -> CudaRunnerOptions {
        self.options
    }

    /// One layer of a pass: `h` `(rows, 1, hidden)`, rows as `pass` lays them out →
    /// `(rows, 1, hidden)`; appends each row's latent row to its sequence.
    fn attention(&mut self, l: usize, h: &Tensor, pass: &PassRows) -> Result<Tensor> {
        match &self.attns[l] {
            RunnerLayer::Mla(a) => {
                let a = a.clone();
                self.mla_attention(&a, l, h, pass)
            }
            RunnerLayer::LowRank(a) => {
                let a = a.clone();
                // One row per sequence: `max_segment_rows` is 1 with one-shot layers.
                self.low_rank_attention(&a, l, h, &pass.seqs)
            }
            RunnerLayer::Gqa(_) => Err(Error::InvalidInput(
                "GQA layers are refused when the CUDA paged model loads".into(),
            )),
        }
    }

    /// One-shot layer: per sequence, its latents gathered on the device, K/V rebuilt, the
    /// token's own latent row appended.
    fn low_rank_attention(
        &mut self,
        attn: &LowRankKvAttention,
        l: usize,
        h: &Tensor,
        seqs: &[SeqId],
    ) -> Result<Tensor> {
        let width = self.cache.layer_widths()[l].width();
        let mut outs = Vec::with_capacity(seqs.len());
        for (i, &s) in seqs.iter().enumerate() {
            let tokens = self.cache.tokens(s, l)?;
            let rows = self.cache.gather_device(s, l)?;
            let lat = wrap::<T>(&self.device, rows, (1, tokens, width))?
                .to_dtype(self.options.dtype)?
                .reshape((1, 1, tokens, width))?;
            let (out, row) = attn.decode_over(&h.narrow(0, i, 1)?, &lat, &self.decoder.rope)?;
            with_view::<T, _>(&row, |v| self.cache.append_device(s, l, v))?;
            outs.push(out);
        }
        Ok(Tensor::cat(&outs, 0)?)
    }

    /// Stock MLA layer: absorbed decode of every row of the pass through our kernel.
    /// Row `j` of a sequence's segment is one query of the kernel over the sequence's
    /// blocks cut at its own position (`start + j + 1` tokens): causal inside the
    /// segment, all rows in one launch.
    fn mla_attention(
        &mut self,
        attn: &MlaAttention,
        l: usize,
        h: &Tensor,
        pass: &PassRows,
    ) -> Result<Tensor> {
        let MlaShape {
            num_heads: nh,
            qk_nope_head_dim: dn,
            qk_rope_head_dim: dr,
            v_head_dim: dv,
            kv_lora_rank: r,
        } = attn.shape();
        let (b, pos) = (pass.rows(), &pass.row_pos);
        let q = attn.queries(h)?.reshape((b, nh, dn + dr))?;
        let q_pe = attn
            .rope()
            .apply_at(&q.narrow(2, dn, dr)?.contiguous()?, pos)?;
        let rows = attn.latents_at(h, pos)?;
        with_view::<T, _>(&rows, |v| {
            self.cache.append_pass(&pass.seqs, &pass.lens, l, v)
        })?;
        if l == 0 || !matches!(self.attns[l - 1], RunnerLayer::Mla(_)) {
            // Every layer holds the same token counts, so one plan serves the pass.
            let tables = pass
                .seqs
                .iter()
                .map(|&s| self.cache.view(s, l))
                .collect::<Result<Vec<_>>>()?;
            let views: Vec<SeqView<'_>> = pass
                .row_seq
                .iter()
                .zip(pos)
                .map(|(&i, &p)| SeqView {
                    blocks: tables[i].blocks,
                    tokens: p + 1,
                })
                .collect();
            for v in &views {
                self.cache.check_view(l, v)?;
            }
            let (bs, nb) = (self.cache.block_size(), self.cache.num_blocks());
            self.dec.plan_views(&views, bs, nb)?;
        }
        // q̃_h = q_nope,h · W_UK,h: (n_h, b, d_nope) x (n_h, d_nope, r) → (b, n_h, r).
        let q_nope = q.narrow(2, 0, dn)?.transpose(0, 1)?.contiguous()?;
        let q_lat = q_nope.matmul(attn.w_uk())?.transpose(0, 1)?;
        let scale = attn.softmax_scale() as f32;
        let (cache, dec) = (&self.cache, &mut self.dec);
        let o_lat = with_view::<T, _>(&q_lat, |ql| {
            with_view::<T, _>(&q_pe, |qp| {
                let q = CudaDecodeQuery {
                    q_lat: ql,
                    q_pe: qp,
                    num_heads: nh,
                    scale,
                };
                dec.decode(cache, l, &q)
            })
        })?;
        let o_lat = wrap::<f32>(&self.device, o_lat, (b, nh, r))?.to_dtype(self.options.dtype)?;
        // o_h = õ_h · W_UVᵀ_h: (n_h, b, r) x (n_h, r, d_v) → (b, 1, n_h·d_v).
        let o = o_lat
            .transpose(0, 1)?
            .contiguous()?
            .matmul(attn.w_uv_t())?
            .transpose(0, 1)?
            .reshape((b, 1, nh * dv))?;
        let w = attn.weights();
        crate::model::attention::linear(&o, &w.o_proj, w.o_proj_bias.as_ref())
    }

    /// Logits `(rows, vocab)` (f32, on the device) of every row of `pass`.
    fn decode_layers(&mut self, tokens: &[u32], pass: &PassRows) -> Result<Tensor> {
        let b = tokens.len();
        let hidden = self.decoder.spec.hidden_size;
        let mut x = self.decoder.embed(tokens)?.reshape((b, 1, hidden))?;
        for l in 0..self.attns.len() {
            let h = self.decoder.layers[l].input_norm.forward(&x)?;
            let a = self.attention(l, &h, pass)?;
            x = (x + a)?;
            let layer = &self.decoder.layers[l];
            let m = layer.mlp.forward(&layer.post_norm.forward(&x)?)?;
            x = (x + m)?;
        }
        let d = &self.decoder;
        let logits = d.logits(&d.norm.forward(&x)?.reshape((b, hidden))?)?;
        Ok(logits.to_dtype(DType::F32)?)
    }
}

impl<T: CudaLatentElem> PagedModel for CudaPagedModel<T> {
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

    /// [`MAX_SEGMENT_ROWS`] when every layer is stock MLA (verification in the split
    /// kernel); 1 with one-shot layers, which rebuild K/V per sequence and row.
    fn max_segment_rows(&self) -> usize {
        if self.attns.iter().all(|a| matches!(a, RunnerLayer::Mla(_))) {
            MAX_SEGMENT_ROWS
        } else {
            1
        }
    }

    fn prefill(&mut self, tokens: &[u32]) -> Result<SeqId> {
        if tokens.is_empty() {
            return Ok(self.cache.add_sequence());
        }
        let mut contiguous = self.decoder.new_cache();
        for chunk in tokens.chunks(self.options.prefill_chunk) {
            self.decoder.forward_hidden(chunk, &mut contiguous, None)?;
        }
        let seq = self.cache.add_sequence();
        let copied = contiguous
            .layers
            .iter()
            .zip(&self.attns)
            .enumerate()
            .try_for_each(|(l, (lc, layer))| {
                with_view::<T, _>(&prefill_rows(layer, l, lc)?, |v| {
                    self.cache.append_device(seq, l, v)
                })
            });
        if let Err(e) = copied {
            self.cache.free(seq)?;
            return Err(e);
        }
        Ok(seq)
    }

    fn tokens(&self, seq: SeqId) -> Result<usize> {
        self.cache.tokens(seq, 0)
    }

    fn rollback(&mut self, seq: SeqId, tokens: usize) -> Result<()> {
        for l in 0..self.attns.len() {
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
        self.decode_layers(&tokens, &pass).or_else(|e| {
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
