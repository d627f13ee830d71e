//! [`MlaAttention`]: DeepSeek-V2 Multi-Head Latent Attention with `q_lora_rank = null`,
//! in two numerically equal forms over one latent cache.
//!
//! Per token at position `pos` (symbols as in [`MlaShape`]):
//!
//! ```text
//! q_h = [q_nope,h ; q_pe,h]  = split(q_proj · x)                    d_nope + d_rope per head
//! [a_c ; a_pe]               = kv_a_proj_with_mqa · x (+ b)         r + d_rope
//! c    = RMSNorm(a_c) ⊙ γ                                           the latent, cached
//! k_pe = RoPE_pos(a_pe),  q_pe,h ← RoPE_pos(q_pe,h)                 one shared k_pe, cached
//! [W_UK,h ; W_UV,h]          = rows of kv_b_proj for head h         d_nope + d_v rows, r cols
//! ```
//!
//! **Materialized** (prefill): `k_h,s = [W_UK,h c_s ; k_pe,s]`, `v_h,s = W_UV,h c_s`, then
//! causal softmax attention per head with scale `s` and `o_h = Σ p v_h`.
//!
//! **Absorbed** (decode): `q̃_h = W_UK,hᵀ q_nope,h ∈ ℝʳ`; the score is
//! `s·(q̃_h·c_s + q_pe,h·k_pe,s)`: MQA with one key of width `r + d_rope` shared by all
//! heads and the value `c_s`, giving `õ_h = Σ p c_s` and `o_h = W_UV,h õ_h`.
//!
//! Both end in `o_proj · concat_h(o_h) (+ b)`. They agree because
//! `q_nope·(W_UK c) = (W_UKᵀ q_nope)·c` and `Σ p (W_UV c) = W_UV Σ p c`.

use candle_core::Tensor;

use super::config::{MlaShape, MlaSpec};
use super::rope::InterleavedRope;
use crate::error::{Error, Result};
use crate::model::attention::{grouped_causal_attention, linear, Attention, AttnInput, LayerCache};
use crate::model::RmsNorm;

/// Which computation [`MlaAttention::forward`] runs. All forms read and write the same
/// cache, so a sequence may switch form between steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MlaForm {
    /// Decompress every cached latent into per-head K/V (cheapest for long prompts).
    Materialized,
    /// Attend in latent space with W_UK/W_UV absorbed (cheapest for decode).
    Absorbed,
    /// Materialized for steps of more than one token, absorbed for single tokens.
    #[default]
    Auto,
}

/// The down half of a q-LoRA: `q_b_proj · RMSNorm(q_a_proj · x (+ b)) ⊙ γ_q`.
#[derive(Debug, Clone)]
pub struct QLoraWeights {
    /// `[q_lora_rank, hidden]`.
    pub q_a_proj: Tensor,
    /// `[q_lora_rank]`, present iff `attention_bias`.
    pub q_a_proj_bias: Option<Tensor>,
    /// `[q_lora_rank]`: γ_q.
    pub q_a_layernorm: Tensor,
}

/// The weights of one MLA layer in checkpoint layout (`[out, in]`, f32).
#[derive(Debug, Clone)]
pub struct MlaWeights {
    /// `[n_h·(d_nope + d_rope), hidden]` (with a q-LoRA: `q_b_proj`,
    /// `[n_h·(d_nope + d_rope), q_lora_rank]`), per head `d_nope` rows then `d_rope` rows.
    pub q_proj: Tensor,
    /// The q-LoRA's first half, iff `spec.q_lora_rank` is set.
    pub q_lora: Option<QLoraWeights>,
    /// `[r + d_rope, hidden]`: latent rows, then the shared RoPE key rows.
    pub kv_a_proj_with_mqa: Tensor,
    /// `[r + d_rope]`, present iff `attention_bias`.
    pub kv_a_proj_with_mqa_bias: Option<Tensor>,
    /// `[r]`: RMSNorm weight `γ` of the latent.
    pub kv_a_layernorm: Tensor,
    /// `[n_h·(d_nope + d_v), r]`, per head `d_nope` key rows then `d_v` value rows.
    pub kv_b_proj: Tensor,
    /// `[hidden, n_h·d_v]`.
    pub o_proj: Tensor,
    /// `[hidden]`, present iff `attention_bias`.
    pub o_proj_bias: Option<Tensor>,
}

/// DeepSeek-V2 MLA attention (see the module docs for the math). Cache: one entry
/// `(batch, 1, tokens, r + d_rope)` holding `[c ; RoPE(k_pe)]` per token.
#[derive(Debug, Clone)]
pub struct MlaAttention {
    spec: MlaSpec,
    weights: MlaWeights,
    hidden: usize,
    kv_norm: RmsNorm,
    q_norm: Option<RmsNorm>,
    /// `W_UK` per head, `(n_h, d_nope, r)`.
    w_uk: Tensor,
    /// `W_UVᵀ` per head, `(n_h, r, d_v)`.
    w_uv_t: Tensor,
    rope: InterleavedRope,
    softmax_scale: f64,
    form: MlaForm,
}

impl MlaAttention {
    /// Build a layer, checking every weight shape against `spec.shape` (the hidden size
    /// is read from `q_proj`). The form is [`MlaForm::Auto`]; see [`Self::with_form`].
    pub fn new(spec: &MlaSpec, weights: MlaWeights) -> Result<Self> {
        spec.validate()?;
        let s = spec.shape;
        let first = match &weights.q_lora {
            Some(q) => &q.q_a_proj,
            None => &weights.q_proj,
        };
        let hidden = match first.dims() {
            [_, h] => *h,
            d => {
                return Err(Error::InvalidInput(format!(
                    "MLA {} has shape {d:?}, expected [{}, hidden]",
                    if weights.q_lora.is_some() {
                        "q_a_proj"
                    } else {
                        "q_proj"
                    },
                    spec.q_lora_rank.unwrap_or(s.q_rows())
                )))
            }
        };
        let expect = |name: &str, t: &Tensor, want: &[usize]| -> Result<()> {
            if t.dims() == want {
                Ok(())
            } else {
                Err(Error::InvalidInput(format!(
                    "MLA {name} has shape {:?}, expected {want:?} (n_h {}, d_nope {}, \
                     d_rope {}, d_v {}, r {}, hidden {hidden})",
                    t.dims(),
                    s.num_heads,
                    s.qk_nope_head_dim,
                    s.qk_rope_head_dim,
                    s.v_head_dim,
                    s.kv_lora_rank
                )))
            }
        };
        let w = &weights;
        match (&w.q_lora, spec.q_lora_rank) {
            (None, None) => expect("q_proj", &w.q_proj, &[s.q_rows(), hidden])?,
            (Some(q), Some(rank)) => {
                expect("q_a_proj", &q.q_a_proj, &[rank, hidden])?;
                expect("q_a_layernorm", &q.q_a_layernorm, &[rank])?;
                expect("q_b_proj", &w.q_proj, &[s.q_rows(), rank])?;
                match (&q.q_a_proj_bias, spec.attention_bias) {
                    (Some(b), true) => expect("q_a_proj bias", b, &[rank])?,
                    (None, false) => {}
                    (got, want) => {
                        return Err(Error::InvalidInput(format!(
                            "MLA q_a_proj bias: present = {}, but attention_bias = {want}",
                            got.is_some()
                        )))
                    }
                }
            }
            (got, want) => {
                return Err(Error::InvalidInput(format!(
                    "MLA q-LoRA weights present = {}, but q_lora_rank = {want:?}",
                    got.is_some()
                )))
            }
        }
        expect(
            "kv_a_proj_with_mqa",
            &w.kv_a_proj_with_mqa,
            &[s.kv_a_rows(), hidden],
        )?;
        expect("kv_a_layernorm", &w.kv_a_layernorm, &[s.kv_lora_rank])?;
        expect("kv_b_proj", &w.kv_b_proj, &[s.kv_b_rows(), s.kv_lora_rank])?;
        expect("o_proj", &w.o_proj, &[hidden, s.o_cols()])?;
        for (name, bias, n) in [
            (
                "kv_a_proj_with_mqa bias",
                &w.kv_a_proj_with_mqa_bias,
                s.kv_a_rows(),
            ),
            ("o_proj bias", &w.o_proj_bias, hidden),
        ] {
            match (bias, spec.attention_bias) {
                (Some(b), true) => expect(name, b, &[n])?,
                (None, false) => {}
                (got, want) => {
                    return Err(Error::InvalidInput(format!(
                        "MLA {name}: present = {}, but attention_bias = {want}",
                        got.is_some()
                    )))
                }
            }
        }
        // (n_h·(d_nope + d_v), r) → (n_h, d_nope + d_v, r), then split per head.
        let (nh, dn, dv, r) = (
            s.num_heads,
            s.qk_nope_head_dim,
            s.v_head_dim,
            s.kv_lora_rank,
        );
        let kv_b = w.kv_b_proj.reshape((nh, dn + dv, r))?;
        let w_uk = kv_b.narrow(1, 0, dn)?.contiguous()?;
        let w_uv_t = kv_b.narrow(1, dn, dv)?.transpose(1, 2)?.contiguous()?;
        Ok(MlaAttention {
            spec: spec.clone(),
            kv_norm: RmsNorm {
                weight: weights.kv_a_layernorm.clone(),
                eps: spec.norm_eps,
            },
            q_norm: weights.q_lora.as_ref().map(|q| RmsNorm {
                weight: q.q_a_layernorm.clone(),
                eps: spec.norm_eps,
            }),
            weights,
            hidden,
            w_uk,
            w_uv_t,
            rope: InterleavedRope::from_spec(spec),
            softmax_scale: spec.softmax_scale(),
            form: MlaForm::Auto,
        })
    }

    /// The same layer computing in `form`.
    pub fn with_form(mut self, form: MlaForm) -> Self {
        self.form = form;
        self
    }

    pub fn form(&self) -> MlaForm {
        self.form
    }

    pub fn spec(&self) -> &MlaSpec {
        &self.spec
    }

    pub fn shape(&self) -> MlaShape {
        self.spec.shape
    }

    pub fn weights(&self) -> &MlaWeights {
        &self.weights
    }

    pub fn hidden_size(&self) -> usize {
        self.hidden
    }

    pub fn rope(&self) -> &InterleavedRope {
        &self.rope
    }

    pub fn softmax_scale(&self) -> f64 {
        self.softmax_scale
    }

    /// `W_UK` per head, `(n_h, d_nope, r)`: `q̃_h = q_nope,h · W_UK,h`.
    pub fn w_uk(&self) -> &Tensor {
        &self.w_uk
    }

    /// `W_UVᵀ` per head, `(n_h, r, d_v)`: `o_h = õ_h · W_UVᵀ_h`.
    pub fn w_uv_t(&self) -> &Tensor {
        &self.w_uv_t
    }

    /// The query projection of `x` `(…, hidden)` → `(…, n_h·(d_nope + d_rope))`, before
    /// RoPE: `q_proj · x`, or through the q-LoRA where the layer has one.
    pub fn queries(&self, x: &Tensor) -> Result<Tensor> {
        match (&self.weights.q_lora, &self.q_norm) {
            (Some(ql), Some(norm)) => {
                let a = linear(x, &ql.q_a_proj, ql.q_a_proj_bias.as_ref())?;
                linear(&norm.forward(&a)?, &self.weights.q_proj, None)
            }
            _ => linear(x, &self.weights.q_proj, None),
        }
    }

    /// The cache rows of one token per batch row, each at its own position: `x`
    /// `(batch, 1, hidden)`, row `b` at `positions[b]` → `(batch, r + d_rope)`.
    pub fn latents_at(&self, x: &Tensor, positions: &[usize]) -> Result<Tensor> {
        let (b, _one, _hidden) = x.dims3()?;
        let MlaShape {
            qk_rope_head_dim: dr,
            kv_lora_rank: r,
            ..
        } = self.spec.shape;
        let w = &self.weights;
        let a = linear(x, &w.kv_a_proj_with_mqa, w.kv_a_proj_with_mqa_bias.as_ref())?
            .reshape((b, r + dr))?;
        let c = self.kv_norm.forward(&a.narrow(1, 0, r)?.contiguous()?)?;
        let k_pe = a.narrow(1, r, dr)?.reshape((b, 1, dr))?;
        let k_pe = self.rope.apply_at(&k_pe, positions)?.reshape((b, dr))?;
        Ok(Tensor::cat(&[c, k_pe], 1)?)
    }

    /// The cache rows of `x` `(batch, seq, hidden)` at positions `start..start + seq`:
    /// `(batch, 1, seq, r + d_rope)` = `[RMSNorm(a_c) ⊙ γ ; RoPE(a_pe)]`.
    pub fn latents(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let (b, t, _hidden) = x.dims3()?;
        let MlaShape {
            qk_rope_head_dim: dr,
            kv_lora_rank: r,
            ..
        } = self.spec.shape;
        let w = &self.weights;
        let a = linear(x, &w.kv_a_proj_with_mqa, w.kv_a_proj_with_mqa_bias.as_ref())?;
        let c = self.kv_norm.forward(&a.narrow(2, 0, r)?.contiguous()?)?;
        let k_pe = a.narrow(2, r, dr)?.reshape((b, 1, t, dr))?;
        let k_pe = self.rope.apply(&k_pe, start)?;
        Ok(Tensor::cat(&[c.reshape((b, 1, t, r))?, k_pe], 3)?)
    }

    /// Check `x` and the cache before touching either.
    fn check_inputs(&self, x: &Tensor, cache: &LayerCache) -> Result<(usize, usize)> {
        let (b, t, hidden) = x.dims3().map_err(|_| {
            Error::InvalidInput(format!(
                "MLA input has shape {:?}, expected (batch, seq, hidden)",
                x.dims()
            ))
        })?;
        if hidden != self.hidden {
            return Err(Error::InvalidInput(format!(
                "MLA input has hidden size {hidden}, the layer has {}",
                self.hidden
            )));
        }
        let width = self.spec.shape.cache_values_per_token();
        match cache.entries.as_slice() {
            [] => {}
            [e] if e.dims().len() == 4 && e.dims()[..2] == [b, 1] && e.dims()[3] == width => {}
            other => {
                let dims: Vec<&[usize]> = other.iter().map(|e| e.dims()).collect();
                return Err(Error::InvalidInput(format!(
                    "MLA cache holds {dims:?}, expected one (batch {b}, 1, tokens, {width}) \
                     entry (was it written by another attention?)"
                )));
            }
        }
        Ok((b, t))
    }

    /// Materialized attention. `q_nope (b, n_h, t, d_nope)`, `q_pe (b, n_h, t, d_rope)`,
    /// `kv (b, 1, T, r + d_rope)` → `(b, n_h, t, d_v)`.
    fn materialized(&self, q_nope: &Tensor, q_pe: &Tensor, kv: &Tensor) -> Result<Tensor> {
        let (b, _one, total, _width) = kv.dims4()?;
        let MlaShape {
            num_heads: nh,
            qk_nope_head_dim: dn,
            qk_rope_head_dim: dr,
            v_head_dim: dv,
            kv_lora_rank: r,
        } = self.spec.shape;
        // Decompress all cached latents: (b, T, r) → (b, T, n_h·(d_nope + d_v))
        // → (b, n_h, T, d_nope + d_v).
        let c = kv.narrow(3, 0, r)?.reshape((b, total, r))?;
        let kv_heads = linear(&c, &self.weights.kv_b_proj, None)?
            .reshape((b, total, nh, dn + dv))?
            .transpose(1, 2)?;
        let k_nope = kv_heads.narrow(3, 0, dn)?;
        let v = kv_heads.narrow(3, dn, dv)?.contiguous()?;
        // The one RoPE key is shared by every head.
        let k_pe = kv
            .narrow(3, r, dr)?
            .broadcast_as((b, nh, total, dr))?
            .contiguous()?;
        let k = Tensor::cat(&[k_nope.contiguous()?, k_pe], 3)?;
        let q = Tensor::cat(&[q_nope, q_pe], 3)?;
        grouped_causal_attention(&q, &k, &v, self.softmax_scale)
    }

    /// Absorbed attention; same shapes as [`Self::materialized`].
    fn absorbed(&self, q_nope: &Tensor, q_pe: &Tensor, kv: &Tensor) -> Result<Tensor> {
        let (b, nh, t, _dn) = q_nope.dims4()?;
        let r = self.spec.shape.kv_lora_rank;
        // q̃_h = W_UK,hᵀ q_nope,h: heads lead so each head is one matmul,
        // (n_h, b·t, d_nope)·(n_h, d_nope, r) → (n_h, b·t, r) → (b, n_h, t, r).
        let per_head = |x: &Tensor, w: &Tensor| -> Result<Tensor> {
            let d = x.dim(3)?;
            let y = x
                .transpose(0, 1)?
                .contiguous()?
                .reshape((nh, b * t, d))?
                .matmul(w)?;
            let out = y.dim(2)?;
            Ok(y.reshape((nh, b, t, out))?.transpose(0, 1)?.contiguous()?)
        };
        let q_lat = per_head(q_nope, &self.w_uk)?;
        // MQA over the cache: key [c ; k_pe] (width r + d_rope), value c (width r).
        let q = Tensor::cat(&[&q_lat, q_pe], 3)?;
        let c = kv.narrow(3, 0, r)?.contiguous()?;
        let o_lat = grouped_causal_attention(&q, kv, &c, self.softmax_scale)?;
        // o_h = W_UV,h õ_h: (b, n_h, t, r) → (b, n_h, t, d_v).
        per_head(&o_lat, &self.w_uv_t)
    }
}

impl Attention for MlaAttention {
    /// `x (batch, seq, hidden)` → `(batch, seq, hidden)`; appends `seq` latent rows.
    /// Positions are `input.start_pos..`; `input.rope` (the decoder's rotate-half RoPE)
    /// is not used: MLA rotates its own `d_rope` dims with [`InterleavedRope`].
    fn forward(&self, input: &AttnInput<'_>, cache: &mut LayerCache) -> Result<Tensor> {
        let x = input.x;
        let (b, t) = self.check_inputs(x, cache)?;
        let MlaShape {
            num_heads: nh,
            qk_nope_head_dim: dn,
            qk_rope_head_dim: dr,
            v_head_dim: dv,
            ..
        } = self.spec.shape;
        // (b, t, n_h·(d_nope + d_rope)) → (b, n_h, t, d_nope + d_rope)
        let q = self
            .queries(x)?
            .reshape((b, t, nh, dn + dr))?
            .transpose(1, 2)?;
        let q_nope = q.narrow(3, 0, dn)?.contiguous()?;
        let q_pe = self
            .rope
            .apply(&q.narrow(3, dn, dr)?.contiguous()?, input.start_pos)?;
        let new = self.latents(x, input.start_pos)?;
        let kv = cache
            .append(vec![new])?
            .pop()
            .expect("the MLA cache has exactly one entry");
        let form = match self.form {
            MlaForm::Auto if t > 1 => MlaForm::Materialized,
            MlaForm::Auto => MlaForm::Absorbed,
            f => f,
        };
        let out = match form {
            MlaForm::Absorbed => self.absorbed(&q_nope, &q_pe, &kv)?,
            _ => self.materialized(&q_nope, &q_pe, &kv)?,
        };
        // (b, n_h, t, d_v) → (b, t, n_h·d_v)
        let out = out.transpose(1, 2)?.reshape((b, t, nh * dv))?;
        linear(
            &out,
            &self.weights.o_proj,
            self.weights.o_proj_bias.as_ref(),
        )
    }

    fn cache_values_per_token(&self) -> usize {
        self.spec.shape.cache_values_per_token()
    }
}
