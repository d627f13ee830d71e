//! [`CpuPagedModel`]: the CPU side of the [`DecoderRunner`](super::DecoderRunner) — a
//! decoder on the CPU whose MLA layers decode over a [`LatentPagedCache`].
//!
//! Prefill runs the prompt alone through the decoder (materialized MLA, contiguous
//! cache) and copies each layer's latent rows into the paged cache; decode runs
//! [`PagedMlaLayer::decode_step`] per layer for the whole batch.

use candle_core::Tensor;

use super::{argmax, PagedModel, RunnerConfig};
use crate::cache::{CacheConfig, LatentElem, LatentPagedCache, LayerWidth, SeqId};
use crate::config::ModelSpec;
use crate::cpu::PagedMlaLayer;
use crate::error::{Error, Result};
use crate::io::WeightSource;
use crate::mla::{load_mla_attention, MlaAttention, MlaForm};
use crate::model::decoder::load_layer_rest;
use crate::model::{Attention, Decoder};

/// A decoder whose every layer is MLA, with its latents in a [`LatentPagedCache`] of
/// element type `T`, on the CPU.
pub struct CpuPagedModel<T: LatentElem = f32> {
    /// Layers in [`MlaForm::Materialized`] (prefill); norms, MLP, head are shared with
    /// the decode path.
    decoder: Decoder,
    paged: Vec<PagedMlaLayer>,
    cache: LatentPagedCache<T>,
}

/// Check that `attns` are the MLA layers of `decoder` (same count, hidden size and
/// cached values per token).
pub(crate) fn check_parts(decoder: &Decoder, attns: &[MlaAttention]) -> Result<()> {
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
    Ok(())
}

/// Every layer's MLA attention of a stock DeepSeek-V2 (dense MLP) checkpoint, and the
/// decoder around them with the same layers in materialized form (for prefill).
pub(crate) fn load_parts(
    spec: &ModelSpec,
    w: &dyn WeightSource,
) -> Result<(Decoder, Vec<MlaAttention>)> {
    if spec.mla.is_none() {
        return Err(Error::InvalidInput(format!(
            "{}: the paged runner needs a DeepSeek-V2 (MLA) checkpoint; this one is {:?} \
             (convert it with `care-convert mla`)",
            w.path().display(),
            spec.arch
        )));
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
    Ok((decoder, attns))
}

/// The paged cache geometry for `attns` (each layer's own width).
pub(crate) fn cache_config(attns: &[MlaAttention], config: RunnerConfig) -> CacheConfig {
    CacheConfig {
        block_size: config.block_size,
        num_blocks: config.num_blocks,
        layers: attns
            .iter()
            .map(|a| LayerWidth::of_shape(&a.shape()))
            .collect(),
    }
}

impl<T: LatentElem> CpuPagedModel<T> {
    /// Load a stock DeepSeek-V2 (dense MLP) checkpoint: every layer's attention once,
    /// shared by the prefill decoder and the paged decode layers.
    pub fn load(spec: &ModelSpec, w: &dyn WeightSource, config: RunnerConfig) -> Result<Self> {
        let (decoder, attns) = load_parts(spec, w)?;
        Self::from_parts(decoder, attns, config)
    }

    /// A model from a decoder and the MLA attention of each of its layers (the same
    /// weights the decoder's layers hold; the decoder is used for prefill, so its
    /// layers should compute a multi-token step, e.g. materialized or auto form).
    pub fn from_parts(
        decoder: Decoder,
        attns: Vec<MlaAttention>,
        config: RunnerConfig,
    ) -> Result<Self> {
        check_parts(&decoder, &attns)?;
        let cache = LatentPagedCache::new(cache_config(&attns, config))?;
        let paged = attns
            .into_iter()
            .enumerate()
            .map(|(l, a)| PagedMlaLayer::new(a, l))
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
        Ok((seq, first))
    }

    fn decode(&mut self, tokens: &[u32], seqs: &[SeqId]) -> Result<Vec<u32>> {
        let vocab = self.decoder.spec.vocab_size;
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::InvalidInput(format!(
                "token id {bad} is outside the vocabulary (size {vocab})"
            )));
        }
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

    fn free(&mut self, seq: SeqId) -> Result<()> {
        self.cache.free(seq)
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::io::Checkpoint;
    use crate::runner::{DecoderRunner, RequestId};
    use std::collections::BTreeMap;

    use crate::mla::fixture::RandomDeepseek;

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
