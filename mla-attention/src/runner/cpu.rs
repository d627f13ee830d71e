//! [`CpuPagedModel`]: the CPU side of the [`DecoderRunner`](super::DecoderRunner) — a
//! converted decoder on the CPU whose attention layers decode over a
//! [`LatentPagedCache`].
//!
//! Prefill runs the prompt alone through the decoder (contiguous cache; MLA in
//! materialized form) and copies each layer's latent rows into the paged cache. Decode
//! runs, per layer, [`PagedMlaLayer::decode_step`] for the whole batch (stock MLA), or
//! per sequence [`LowRankKvAttention::decode_over`] on its gathered latents (one-shot).

use candle_core::Tensor;

use super::layers::{cache_config, check_parts, load_parts, prefill_rows, RunnerLayer};
use super::{argmax, PagedModel, RunnerConfig};
use crate::cache::{LatentElem, LatentPagedCache, SeqId};
use crate::config::ModelSpec;
use crate::cpu::PagedMlaLayer;
use crate::error::Result;
use crate::io::WeightSource;
use crate::mla::MlaAttention;
use crate::model::{Decoder, LowRankKvAttention};

/// One layer's decode over the paged cache.
enum CpuLayer {
    Mla(Box<PagedMlaLayer>),
    LowRank(LowRankKvAttention),
}

/// A converted decoder (stock MLA or one-shot low rank) with its latents in a
/// [`LatentPagedCache`] of element type `T`, on the CPU.
pub struct CpuPagedModel<T: LatentElem = f32> {
    /// Prefill (MLA layers in materialized form); norms, MLP, head are shared with the
    /// decode path.
    decoder: Decoder,
    paged: Vec<CpuLayer>,
    cache: LatentPagedCache<T>,
}

/// One-shot layer `l`, one token per sequence: each sequence's latents gathered from
/// the blocks, K/V rebuilt, the token's own latent row appended. `x` `(b, 1, hidden)`.
fn low_rank_step<T: LatentElem>(
    attn: &LowRankKvAttention,
    decoder: &Decoder,
    l: usize,
    x: &Tensor,
    seqs: &[SeqId],
    cache: &mut LatentPagedCache<T>,
) -> Result<Tensor> {
    let width = cache.layer(l)?.width.width();
    let mut outs = Vec::with_capacity(seqs.len());
    for (i, &s) in seqs.iter().enumerate() {
        let rows = cache.gather(s, l)?;
        let tokens = rows.len() / width;
        let lat = Tensor::from_vec(rows, (1, 1, tokens, width), x.device())?;
        let (out, row) = attn.decode_over(&x.narrow(0, i, 1)?, &lat, &decoder.rope)?;
        let row = row.flatten_all()?.to_vec1::<f32>()?;
        cache.append(s, l, width, &row)?;
        outs.push(out);
    }
    Ok(Tensor::cat(&outs, 0)?)
}

impl<T: LatentElem> CpuPagedModel<T> {
    /// Load a converted checkpoint: stock DeepSeek-V2 (dense MLP) or one-shot low rank
    /// (Llama/Qwen2 with latent factors); every layer's attention once, shared by the
    /// prefill decoder and the paged decode.
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
            .into_iter()
            .enumerate()
            .map(|(l, a)| match a {
                RunnerLayer::Mla(a) => Ok(CpuLayer::Mla(Box::new(PagedMlaLayer::new(*a, l)?))),
                RunnerLayer::LowRank(a) => Ok(CpuLayer::LowRank(a)),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(CpuPagedModel {
            decoder,
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

    fn decode_layers(&mut self, tokens: &[u32], seqs: &[SeqId]) -> Result<Vec<u32>> {
        let d = &self.decoder;
        let b = tokens.len();
        // (1, b, hidden) → (b, 1, hidden): one row per sequence.
        let mut x = d.embed(tokens)?.reshape((b, 1, d.spec.hidden_size))?;
        for (l, (layer, paged)) in d.layers.iter().zip(&self.paged).enumerate() {
            let h = layer.input_norm.forward(&x)?;
            let a = match paged {
                CpuLayer::Mla(p) => p.decode_step(&h, seqs, &mut self.cache)?,
                CpuLayer::LowRank(a) => low_rank_step(a, d, l, &h, seqs, &mut self.cache)?,
            };
            x = (x + a)?;
            let m = layer.mlp.forward(&layer.post_norm.forward(&x)?)?;
            x = (x + m)?;
        }
        let logits: Tensor = d.logits(&d.norm.forward(&x)?.reshape((b, d.spec.hidden_size))?)?;
        let rows = logits.to_vec2::<f32>()?;
        Ok(rows.iter().map(|r| argmax(r)).collect())
    }
}

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

    fn prefill(&mut self, prompt: &[u32]) -> Result<(SeqId, u32)> {
        let mut contiguous = self.decoder.new_cache();
        let hidden = self.decoder.forward_hidden(prompt, &mut contiguous, None)?;
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
            .try_for_each(|(l, lc)| self.cache.append_tensor(seq, l, &prefill_rows(l, lc)?));
        if let Err(e) = copied {
            self.cache.free(seq)?;
            return Err(e);
        }
        Ok((seq, first))
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

    fn decode_step(&mut self, tokens: &[u32], seqs: &[SeqId], _pos: &[usize]) -> Result<Vec<u32>> {
        self.decode_layers(tokens, seqs)
    }

    fn free(&mut self, seq: SeqId) -> Result<()> {
        self.cache.free(seq)
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::io::Checkpoint;
    use crate::runner::{DecoderRunner, RequestId};
    use crate::Error;
    use std::collections::BTreeMap;

    use crate::mla::fixture::{RandomDeepseek, RandomOneShot};

    const VOCAB: usize = 40;
    const LAYERS: usize = 2;

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

    fn setup_with(
        fixture: &RandomDeepseek,
        config: RunnerConfig,
    ) -> (tempfile::TempDir, Decoder, DecoderRunner) {
        let dir = tempfile::tempdir().unwrap();
        fixture.write(dir.path()).unwrap();
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        let model = Decoder::load(&ckpt).unwrap();
        let runner = DecoderRunner::load(&ckpt.spec, ckpt.weights.as_ref(), config).unwrap();
        (dir, model, runner)
    }

    fn setup(config: RunnerConfig) -> (tempfile::TempDir, Decoder, DecoderRunner) {
        setup_with(&RandomDeepseek::tiny(), config)
    }

    /// One-shot checkpoints (separate latents, a shared latent, Qwen2 biases): the
    /// cache holds exactly the latents, and continuous batching gives the decoder's
    /// tokens.
    #[test]
    fn one_shot_checkpoints_decode_like_the_decoder() {
        let tiny = RandomOneShot::tiny();
        for fixture in [
            tiny.clone(),
            RandomOneShot {
                shared: true,
                ranks: (7, 7),
                ..tiny.clone()
            },
            RandomOneShot {
                qwen2: true,
                ..tiny.clone()
            },
        ] {
            let dir = tempfile::tempdir().unwrap();
            fixture.write(dir.path()).unwrap();
            let ckpt = Checkpoint::open(dir.path()).unwrap();
            let model = Decoder::load(&ckpt).unwrap();
            let mut runner: DecoderRunner = DecoderRunner::load(
                &ckpt.spec,
                ckpt.weights.as_ref(),
                RunnerConfig {
                    block_size: 4,
                    num_blocks: 16,
                },
            )
            .unwrap();
            let per_layer = if fixture.shared {
                fixture.ranks.0
            } else {
                fixture.ranks.0 + fixture.ranks.1
            };
            assert_eq!(
                runner.cache_bytes_per_token(),
                fixture.layers * per_layer * 4
            );
            let prompts = [vec![3u32, 17, 5, 9, 30], vec![7, 1], vec![11, 4, 38, 2, 19]];
            let a = runner.add_request(prompts[0].clone(), 6, vec![]).unwrap();
            let b = runner.add_request(prompts[1].clone(), 5, vec![]).unwrap();
            runner.step().unwrap();
            runner.step().unwrap();
            let c = runner.add_request(prompts[2].clone(), 4, vec![]).unwrap();
            let done = runner.run_to_completion().unwrap();
            for (id, (p, n)) in [a, b, c].into_iter().zip(prompts.iter().zip([6, 5, 4])) {
                assert_eq!(done[&id], reference(&model, p, n, &[]), "{fixture:?}");
            }
            assert_eq!(runner.free_blocks(), 16);
        }
    }

    /// A q-LoRA with biases (the form of a converted Qwen2): the runner's decode
    /// projects queries through it, as the decoder does.
    #[test]
    fn q_lora_with_biases_decodes_like_the_decoder() {
        let fixture = RandomDeepseek {
            q_lora_rank: Some(20),
            attention_bias: true,
            ..RandomDeepseek::tiny()
        };
        let (_dir, model, mut runner) = setup_with(
            &fixture,
            RunnerConfig {
                block_size: 4,
                num_blocks: 16,
            },
        );
        let prompts = [vec![3u32, 17, 5, 9, 30], vec![7, 1, 22]];
        let ids: Vec<RequestId> = prompts
            .iter()
            .map(|p| runner.add_request(p.clone(), 6, vec![]).unwrap())
            .collect();
        let done = runner.run_to_completion().unwrap();
        for (p, id) in prompts.iter().zip(ids) {
            assert_eq!(done[&id], reference(&model, p, 6, &[]));
        }
    }

    #[test]
    fn continuous_batching_equals_requests_run_alone() {
        let (_dir, model, mut runner) = setup(RunnerConfig {
            block_size: 4,
            num_blocks: 16,
        });
        let shape = RandomDeepseek::tiny().shape;
        assert_eq!(
            runner.cache_bytes_per_token(),
            LAYERS * (shape.kv_lora_rank + shape.qk_rope_head_dim) * 4
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
