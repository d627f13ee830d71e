//! [`DecoderRunner`]: greedy generation for many requests at once over the paged
//! latent cache, on the CPU (continuous batching).
//!
//! ```text
//! add_request(prompt)  prefill alone, contiguous cache, materialized MLA
//!                      → copy each layer's rows [c ; RoPE(k_pe)] into the paged cache
//!                      → first token (emitted by the next step)
//! step()               every active request: embed its last token → per layer
//!                      x += PagedMlaLayer::decode_step(norm(x)); x += mlp(norm(x))
//!                      → norm → lm_head → argmax; one batch, each row at its own position
//! ```
//!
//! Requests added between steps join the next step's batch. A request finishes after
//! `max_new` tokens or after emitting one of its stop tokens (the stop token is
//! part of its output); its blocks go back to the cache at once.
//!
//! # Admission
//!
//! A request is admitted only if the blocks it could ever need
//! (`ceil((prompt + max_new − 1) / block_size)`) fit in the free blocks left after
//! every active request's remaining worst case. So [`DecoderRunner::step`] never runs
//! out of blocks, and a request that does not fit fails in
//! [`DecoderRunner::add_request`] with [`Error::CacheFull`], leaving the others as
//! they were.
//!
//! ```no_run
//! use mla_attention::{io::Checkpoint, runner::{DecoderRunner, RunnerConfig}};
//! let ckpt = Checkpoint::open("deepseek-v2-dense-dir")?;
//! let cfg = RunnerConfig { block_size: 16, num_blocks: 256 };
//! let mut runner = DecoderRunner::<f32>::load(&ckpt.spec, ckpt.weights.as_ref(), cfg)?;
//! let a = runner.add_request(vec![1, 2, 3], 8, vec![2])?;
//! runner.step()?;
//! let b = runner.add_request(vec![1, 5], 4, vec![])?; // joins the next step
//! let out = runner.run_to_completion()?;
//! println!("{:?} {:?}", out[&a], out[&b]);
//! # Ok::<(), mla_attention::Error>(())
//! ```

use std::collections::BTreeMap;

use candle_core::Tensor;

use crate::cache::{CacheConfig, LatentElem, LatentPagedCache, LayerWidth, SeqId};
use crate::config::ModelSpec;
use crate::cpu::PagedMlaLayer;
use crate::error::{Error, Result};
use crate::io::WeightSource;
use crate::mla::{load_mla_attention, MlaAttention, MlaForm};
use crate::model::decoder::load_layer_rest;
use crate::model::{Attention, Decoder};

/// A request handle, unique within one runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// Paged cache geometry of a [`DecoderRunner`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunnerConfig {
    /// Tokens per block.
    pub block_size: usize,
    /// Blocks in the pool (each holds `block_size` tokens of every layer).
    pub num_blocks: usize,
}

/// One admitted, unfinished request.
#[derive(Debug, Clone)]
struct Request {
    id: RequestId,
    seq: SeqId,
    /// Blocks it may ever hold (its admission reservation).
    max_blocks: usize,
    max_new: usize,
    stop: Vec<u32>,
    generated: Vec<u32>,
    /// The prefill's token, not yet emitted by a step.
    first_pending: bool,
}

impl Request {
    fn is_done(&self) -> bool {
        self.generated.len() >= self.max_new
            || self.generated.last().is_some_and(|t| self.stop.contains(t))
    }
}

/// Greedy batched generation over a [`LatentPagedCache`] for a decoder whose every
/// layer is MLA (see the [module docs](self)).
pub struct DecoderRunner<T: LatentElem = f32> {
    /// Layers in [`MlaForm::Materialized`] (prefill); norms, MLP, head are shared with
    /// the decode path.
    decoder: Decoder,
    paged: Vec<PagedMlaLayer>,
    cache: LatentPagedCache<T>,
    /// Admission order.
    active: Vec<Request>,
    finished: BTreeMap<RequestId, Vec<u32>>,
    next_id: u64,
}

impl<T: LatentElem> std::fmt::Debug for DecoderRunner<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecoderRunner")
            .field("layers", &self.paged.len())
            .field("active", &self.active.len())
            .field("free_blocks", &self.cache.free_blocks())
            .field("num_blocks", &self.cache.num_blocks())
            .finish()
    }
}

/// Index of the largest value (the first of equal ones).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

impl<T: LatentElem> DecoderRunner<T> {
    /// Load a stock DeepSeek-V2 (dense MLP) checkpoint: every layer's attention once,
    /// shared by the prefill decoder and the paged decode layers.
    pub fn load(spec: &ModelSpec, w: &dyn WeightSource, config: RunnerConfig) -> Result<Self> {
        if spec.mla.is_none() {
            return Err(Error::InvalidInput(
                "DecoderRunner needs a DeepSeek-V2 (MLA) model".into(),
            ));
        }
        let attns = (0..spec.num_layers)
            .map(|l| load_mla_attention(spec, w, l))
            .collect::<Result<Vec<_>>>()?;
        let layers = attns
            .iter()
            .enumerate()
            .map(|(l, a)| {
                let prefill = a.clone().with_form(MlaForm::Materialized);
                load_layer_rest(spec, w, l, Box::new(prefill))
            })
            .collect::<Result<Vec<_>>>()?;
        let decoder = Decoder::from_layers(spec.clone(), w, layers)?;
        Self::from_parts(decoder, attns, config)
    }

    /// A runner from a decoder and the MLA attention of each of its layers (the same
    /// weights the decoder's layers hold; the decoder is used for prefill, so its
    /// layers should compute a multi-token step, e.g. materialized or auto form).
    pub fn from_parts(
        decoder: Decoder,
        attns: Vec<MlaAttention>,
        config: RunnerConfig,
    ) -> Result<Self> {
        if attns.len() != decoder.layers.len() {
            return Err(Error::InvalidInput(format!(
                "DecoderRunner: {} MLA layers for a decoder of {} layers",
                attns.len(),
                decoder.layers.len()
            )));
        }
        for (l, (a, layer)) in attns.iter().zip(&decoder.layers).enumerate() {
            if a.hidden_size() != decoder.spec.hidden_size
                || Attention::cache_values_per_token(a) != layer.attn.cache_values_per_token()
            {
                return Err(Error::InvalidInput(format!(
                    "DecoderRunner: layer {l}: MLA layer (hidden {}, {} cached values) does \
                     not match the decoder (hidden {}, {} cached values)",
                    a.hidden_size(),
                    Attention::cache_values_per_token(a),
                    decoder.spec.hidden_size,
                    layer.attn.cache_values_per_token()
                )));
            }
        }
        let cache = LatentPagedCache::new(CacheConfig {
            block_size: config.block_size,
            num_blocks: config.num_blocks,
            layers: attns
                .iter()
                .map(|a| LayerWidth::of_shape(&a.shape()))
                .collect(),
        })?;
        let paged = attns
            .into_iter()
            .enumerate()
            .map(|(l, a)| PagedMlaLayer::new(a, l))
            .collect::<Result<Vec<_>>>()?;
        Ok(DecoderRunner {
            decoder,
            paged,
            cache,
            active: Vec::new(),
            finished: BTreeMap::new(),
            next_id: 0,
        })
    }

    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    pub fn cache(&self) -> &LatentPagedCache<T> {
        &self.cache
    }

    /// Bytes one cached token costs over all layers.
    pub fn cache_bytes_per_token(&self) -> usize {
        self.cache.bytes_per_token()
    }

    pub fn free_blocks(&self) -> usize {
        self.cache.free_blocks()
    }

    pub fn used_blocks(&self) -> usize {
        self.cache.used_blocks()
    }

    /// Free blocks not promised to active requests' remaining tokens: what a new
    /// request may take.
    pub fn admittable_blocks(&self) -> usize {
        self.cache
            .free_blocks()
            .saturating_sub(self.reserved_blocks())
    }

    /// Unfinished requests.
    pub fn num_active(&self) -> usize {
        self.active.len()
    }

    /// Tokens generated so far by an unfinished or finished (not yet taken) request.
    pub fn generated(&self, id: RequestId) -> Option<&[u32]> {
        self.active
            .iter()
            .find(|r| r.id == id)
            .map(|r| r.generated.as_slice())
            .or_else(|| self.finished.get(&id).map(Vec::as_slice))
    }

    /// Finished requests' outputs, removed from the runner.
    pub fn take_finished(&mut self) -> BTreeMap<RequestId, Vec<u32>> {
        std::mem::take(&mut self.finished)
    }

    /// Blocks the active requests may still allocate.
    fn reserved_blocks(&self) -> usize {
        self.active
            .iter()
            .map(|r| {
                let held = self.cache.block_table(r.seq).map_or(0, |t| t.blocks.len());
                r.max_blocks.saturating_sub(held)
            })
            .sum()
    }

    /// Admit a request: prefill `prompt` (contiguous, materialized), copy its latents
    /// into the paged cache and compute the first greedy token, which the next
    /// [`Self::step`] emits. Fails with [`Error::CacheFull`] if its worst case
    /// (`prompt + max_new − 1` tokens) does not fit beside the active requests'; on
    /// any error the runner is unchanged.
    pub fn add_request(
        &mut self,
        prompt: Vec<u32>,
        max_new: usize,
        stop: Vec<u32>,
    ) -> Result<RequestId> {
        if prompt.is_empty() || max_new == 0 {
            return Err(Error::InvalidInput(format!(
                "a request needs a prompt and max_new > 0, got {} prompt tokens, max_new {max_new}",
                prompt.len()
            )));
        }
        let bs = self.cache.block_size();
        let max_blocks = (prompt.len() + max_new - 1).div_ceil(bs);
        let avail = self.admittable_blocks();
        if max_blocks > avail {
            return Err(Error::CacheFull {
                layer: 0,
                needed_blocks: max_blocks,
                free_blocks: avail,
                total_blocks: self.cache.num_blocks(),
            });
        }
        let mut contiguous = self.decoder.new_cache();
        let hidden = self
            .decoder
            .forward_hidden(&prompt, &mut contiguous, None)?;
        let last = hidden.narrow(0, prompt.len() - 1, 1)?;
        let logits = self
            .decoder
            .logits(&last)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let first = argmax(&logits);

        let seq = self.cache.add_sequence();
        let copied = contiguous
            .layers
            .iter()
            .enumerate()
            .try_for_each(|(l, lc)| match lc.entries.as_slice() {
                [rows] => self.cache.append_tensor(seq, l, rows),
                other => Err(Error::InvalidInput(format!(
                    "layer {l}: prefill cache has {} entries, expected one MLA latent tensor",
                    other.len()
                ))),
            });
        if let Err(e) = copied {
            self.cache.free(seq)?;
            return Err(e);
        }
        let id = RequestId(self.next_id);
        self.next_id += 1;
        self.active.push(Request {
            id,
            seq,
            max_blocks,
            max_new,
            stop,
            generated: vec![first],
            first_pending: true,
        });
        Ok(id)
    }

    /// One greedy token for every active request, in admission order. Requests
    /// admitted since the last step emit their prefill token; the others decode one
    /// token together as one batch, each at its own position. Finished requests free
    /// their blocks. On error no request has advanced.
    pub fn step(&mut self) -> Result<Vec<(RequestId, u32)>> {
        let decoding: Vec<usize> = (0..self.active.len())
            .filter(|&i| !self.active[i].first_pending)
            .collect();
        let next = if decoding.is_empty() {
            Vec::new()
        } else {
            let seqs: Vec<SeqId> = decoding.iter().map(|&i| self.active[i].seq).collect();
            let last: Vec<u32> = decoding
                .iter()
                .map(|&i| {
                    *self.active[i]
                        .generated
                        .last()
                        .expect("one token at admission")
                })
                .collect();
            self.decode_batch(&last, &seqs)?
        };
        for (&i, &t) in decoding.iter().zip(&next) {
            self.active[i].generated.push(t);
        }
        let mut out = Vec::with_capacity(self.active.len());
        for r in &mut self.active {
            r.first_pending = false;
            out.push((r.id, *r.generated.last().expect("one token at admission")));
        }
        let mut kept = Vec::with_capacity(self.active.len());
        for r in std::mem::take(&mut self.active) {
            if r.is_done() {
                self.cache.free(r.seq)?;
                self.finished.insert(r.id, r.generated);
            } else {
                kept.push(r);
            }
        }
        self.active = kept;
        Ok(out)
    }

    /// Step until no request is active; returns every finished request's tokens not
    /// taken before (see [`Self::take_finished`]).
    pub fn run_to_completion(&mut self) -> Result<BTreeMap<RequestId, Vec<u32>>> {
        while !self.active.is_empty() {
            self.step()?;
        }
        Ok(self.take_finished())
    }

    /// Feed `tokens[b]` to `seqs[b]`; greedy next tokens. All or nothing.
    fn decode_batch(&mut self, tokens: &[u32], seqs: &[SeqId]) -> Result<Vec<u32>> {
        let pos: Vec<usize> = seqs
            .iter()
            .map(|&s| self.cache.tokens(s, 0))
            .collect::<Result<_>>()?;
        match self.decode_layers(tokens, seqs) {
            Ok(next) => Ok(next),
            Err(e) => {
                for (&s, &p) in seqs.iter().zip(&pos) {
                    for l in 0..self.paged.len() {
                        if self.cache.tokens(s, l)? > p {
                            self.cache.truncate(s, l, p)?;
                        }
                    }
                }
                Err(e)
            }
        }
    }

    fn decode_layers(&mut self, tokens: &[u32], seqs: &[SeqId]) -> Result<Vec<u32>> {
        let d = &self.decoder;
        let vocab = d.spec.vocab_size;
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::InvalidInput(format!(
                "token id {bad} is outside the vocabulary (size {vocab})"
            )));
        }
        let b = tokens.len();
        // (1, b, hidden) → (b, 1, hidden): one row per sequence.
        let mut x = d.embed(tokens)?.reshape((b, 1, d.spec.hidden_size))?;
        for (layer, paged) in d.layers.iter().zip(&self.paged) {
            let h = layer.input_norm.forward(&x)?;
            let a = paged.decode_step(&h, seqs, &mut self.cache)?;
            x = (x + a)?;
            let m = layer.mlp.forward(&layer.post_norm.forward(&x)?)?;
            x = (x + m)?;
        }
        let logits: Tensor = d.logits(&d.norm.forward(&x)?.reshape((b, d.spec.hidden_size))?)?;
        let rows = logits.to_vec2::<f32>()?;
        Ok(rows.iter().map(|r| argmax(r)).collect())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    use super::*;
    use crate::io::Checkpoint;
    use crate::mla::MlaShape;

    const VOCAB: usize = 40;
    const HIDDEN: usize = 32;
    const LAYERS: usize = 2;
    const SHAPE: MlaShape = MlaShape {
        num_heads: 4,
        qk_nope_head_dim: 8,
        qk_rope_head_dim: 4,
        v_head_dim: 12,
        kv_lora_rank: 24,
    };

    /// Deterministic uniform values of standard deviation `std` (xorshift).
    struct Gen(u64);

    impl Gen {
        fn new(seed: u64) -> Self {
            Gen(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }

        fn tensor(&mut self, dims: &[usize], std: f32) -> Tensor {
            let n: usize = dims.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    self.0 ^= self.0 << 13;
                    self.0 ^= self.0 >> 7;
                    self.0 ^= self.0 << 17;
                    let u = ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
                    u * std * 3f32.sqrt()
                })
                .collect();
            Tensor::from_vec(v, dims, &candle_core::Device::Cpu).unwrap()
        }
    }

    /// A tiny dense DeepSeek-V2 HF directory with random weights.
    fn write_checkpoint(dir: &Path) {
        let cfg = serde_json::json!({
            "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
            "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 48,
            "moe_intermediate_size": 48, "num_hidden_layers": LAYERS,
            "num_attention_heads": SHAPE.num_heads, "num_key_value_heads": SHAPE.num_heads,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "attention_bias": false, "q_lora_rank": null,
            "kv_lora_rank": SHAPE.kv_lora_rank, "qk_nope_head_dim": SHAPE.qk_nope_head_dim,
            "qk_rope_head_dim": SHAPE.qk_rope_head_dim, "v_head_dim": SHAPE.v_head_dim,
            "n_routed_experts": null, "n_shared_experts": null, "first_k_dense_replace": LAYERS,
            "moe_layer_freq": 1, "n_group": 1, "topk_group": 1, "num_experts_per_tok": null,
            "hidden_act": "silu", "tie_word_embeddings": false, "rope_scaling": null,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"
        });
        let g = &mut Gen::new(23);
        let (h, f) = (HIDDEN, 48);
        let mut t: HashMap<String, Tensor> = HashMap::new();
        let ones = |g: &mut Gen, n: usize| (g.tensor(&[n], 0.1) + 1.0).unwrap();
        t.insert(
            "model.embed_tokens.weight".into(),
            g.tensor(&[VOCAB, h], 1.0),
        );
        // A peaked head keeps greedy choices far from ties.
        t.insert("lm_head.weight".into(), g.tensor(&[VOCAB, h], 0.6));
        t.insert("model.norm.weight".into(), ones(g, h));
        for l in 0..LAYERS {
            let p = format!("model.layers.{l}");
            let s = SHAPE;
            let inv = |n: usize| 1.0 / (n as f32).sqrt();
            let a = format!("{p}.self_attn");
            let q = g.tensor(&[s.q_rows(), h], inv(h));
            t.insert(format!("{a}.q_proj.weight"), q);
            let kv_a = g.tensor(&[s.kv_a_rows(), h], inv(h));
            t.insert(format!("{a}.kv_a_proj_with_mqa.weight"), kv_a);
            t.insert(
                format!("{a}.kv_a_layernorm.weight"),
                ones(g, s.kv_lora_rank),
            );
            let kv_b = g.tensor(&[s.kv_b_rows(), s.kv_lora_rank], inv(s.kv_lora_rank));
            t.insert(format!("{a}.kv_b_proj.weight"), kv_b);
            let o = g.tensor(&[h, s.o_cols()], inv(s.o_cols()));
            t.insert(format!("{a}.o_proj.weight"), o);
            t.insert(format!("{p}.input_layernorm.weight"), ones(g, h));
            t.insert(format!("{p}.post_attention_layernorm.weight"), ones(g, h));
            t.insert(format!("{p}.mlp.gate_proj.weight"), g.tensor(&[f, h], 0.2));
            t.insert(format!("{p}.mlp.up_proj.weight"), g.tensor(&[f, h], 0.2));
            t.insert(format!("{p}.mlp.down_proj.weight"), g.tensor(&[h, f], 0.15));
        }
        candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    }

    /// Greedy tokens of one request alone through `Decoder::forward`, contiguous cache.
    fn reference(model: &Decoder, prompt: &[u32], max_new: usize, stop: &[u32]) -> Vec<u32> {
        let mut cache = model.new_cache();
        let mut logits = model.forward(prompt, &mut cache).unwrap();
        let mut out = Vec::new();
        loop {
            let last = logits.dim(0).unwrap() - 1;
            let row = logits.get(last).unwrap().to_vec1::<f32>().unwrap();
            let t = argmax(&row);
            out.push(t);
            if out.len() == max_new || stop.contains(&t) {
                return out;
            }
            logits = model.forward(&[t], &mut cache).unwrap();
        }
    }

    fn setup(config: RunnerConfig) -> (tempfile::TempDir, Decoder, DecoderRunner) {
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path());
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        let model = Decoder::load(&ckpt).unwrap();
        let runner = DecoderRunner::load(&ckpt.spec, ckpt.weights.as_ref(), config).unwrap();
        (dir, model, runner)
    }

    #[test]
    fn continuous_batching_equals_requests_run_alone() {
        let (_dir, model, mut runner) = setup(RunnerConfig {
            block_size: 4,
            num_blocks: 16,
        });
        assert_eq!(
            runner.cache_bytes_per_token(),
            LAYERS * (SHAPE.kv_lora_rank + SHAPE.qk_rope_head_dim) * 4
        );
        let prompts: [Vec<u32>; 3] = [
            vec![3, 17, 5, 9, 30],
            vec![7, 1],
            vec![11, 4, 38, 2, 19, 6, 25],
        ];
        let max_new = [7, 5, 6];
        // Request 2 stops at the third token its reference generates.
        let stop2 = vec![reference(&model, &prompts[2], max_new[2], &[])[2]];
        let stops = [vec![], vec![], stop2];
        let want: Vec<Vec<u32>> = (0..3)
            .map(|i| reference(&model, &prompts[i], max_new[i], &stops[i]))
            .collect();
        assert!(want[2].len() <= 3);

        let a = runner
            .add_request(prompts[0].clone(), max_new[0], stops[0].clone())
            .unwrap();
        let b = runner
            .add_request(prompts[1].clone(), max_new[1], stops[1].clone())
            .unwrap();
        let mut streamed: BTreeMap<RequestId, Vec<u32>> = BTreeMap::new();
        for _ in 0..2 {
            let out = runner.step().unwrap();
            assert_eq!(out.len(), 2, "both requests emit one token per step");
            for (id, t) in out {
                streamed.entry(id).or_default().push(t);
            }
        }
        // Joins mid-way, at a different position than the others.
        let c = runner
            .add_request(prompts[2].clone(), max_new[2], stops[2].clone())
            .unwrap();
        assert!(runner.used_blocks() > 0);
        while runner.num_active() > 0 {
            for (id, t) in runner.step().unwrap() {
                streamed.entry(id).or_default().push(t);
            }
        }
        let done = runner.take_finished();
        for (i, id) in [a, b, c].into_iter().enumerate() {
            assert_eq!(done[&id], want[i], "request {i}");
            assert_eq!(streamed[&id], want[i], "request {i} streamed");
        }
        assert_eq!(runner.free_blocks(), 16);
        assert_eq!(runner.cache().num_sequences(), 0);
    }

    #[test]
    fn request_too_large_for_the_cache_errors_and_leaves_others_alone() {
        // 6 blocks of 4 tokens = 24 tokens.
        let (_dir, model, mut runner) = setup(RunnerConfig {
            block_size: 4,
            num_blocks: 6,
        });
        let p0 = vec![3, 17, 5, 9, 30];
        let p1 = vec![8, 12];
        let want0 = reference(&model, &p0, 6, &[]); // 10 tokens: 3 blocks
        let want1 = reference(&model, &p1, 5, &[]); // 6 tokens: 2 blocks
        let a = runner.add_request(p0, 6, vec![]).unwrap();
        runner.step().unwrap();
        let b = runner.add_request(p1, 5, vec![]).unwrap();
        assert_eq!(runner.admittable_blocks(), 1);
        let (free, used) = (runner.free_blocks(), runner.used_blocks());
        // Fits the free blocks now but not the others' reservations.
        let err = runner.add_request(vec![1, 2, 3], 3, vec![]).unwrap_err();
        assert!(
            matches!(
                err,
                Error::CacheFull {
                    needed_blocks: 2,
                    ..
                }
            ),
            "{err}"
        );
        // Larger than the whole cache.
        let err = runner.add_request(vec![5; 30], 1, vec![]).unwrap_err();
        assert!(matches!(err, Error::CacheFull { .. }), "{err}");
        assert!(runner.add_request(vec![], 3, vec![]).is_err());
        assert!(runner.add_request(vec![VOCAB as u32], 3, vec![]).is_err());
        assert_eq!((runner.free_blocks(), runner.used_blocks()), (free, used));
        assert_eq!(runner.num_active(), 2);
        // One block is left: a small request still fits.
        let c = runner.add_request(vec![4], 2, vec![]).unwrap();
        let done = runner.run_to_completion().unwrap();
        assert_eq!(done[&a], want0);
        assert_eq!(done[&b], want1);
        assert_eq!(done[&c], reference(&model, &[4], 2, &[]));
        assert_eq!(runner.free_blocks(), 6);
        assert_eq!(runner.used_blocks(), 0);
    }
}
