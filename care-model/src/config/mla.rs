//! The MLA layer's configuration: [`MlaShape`] (head layout), [`YarnScaling`] and
//! [`MlaSpec`] (everything an `mla_attention::mla::MlaAttention` needs besides its
//! weights), and [`DeepseekV2Fields`], the DeepSeek-V2 keys of `config.json` that
//! [`HfConfig`](crate::config::HfConfig) flattens in.
//!
//! Field meanings follow HF `DeepseekV2Config` (and mistral.rs 0.8.1's
//! `DeepSeekV2Config`, which parses the same keys).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Head layout of one MLA layer (DeepSeek-V2 names):
///
/// ```text
/// q_proj              [n_h·(d_nope + d_rope), hidden]   per head: d_nope rows, then d_rope rows
/// kv_a_proj_with_mqa  [r + d_rope, hidden]              latent c (r), then shared k_pe (d_rope)
/// kv_a_layernorm      [r]
/// kv_b_proj           [n_h·(d_nope + d_v), r]           per head: d_nope k rows, then d_v v rows
/// o_proj              [hidden, n_h·d_v]
/// cache per token     r + d_rope                        [c ; RoPE(k_pe)]
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MlaShape {
    /// `n_h`: query heads (each also has its own decompressed K/V head).
    pub num_heads: usize,
    /// `d_nope`: per-head query/key width without position information.
    pub qk_nope_head_dim: usize,
    /// `d_rope`: per-head query width and shared key width that carry RoPE (even).
    pub qk_rope_head_dim: usize,
    /// `d_v`: per-head value width.
    pub v_head_dim: usize,
    /// `r`: width of the cached latent `c`.
    pub kv_lora_rank: usize,
}

impl MlaShape {
    /// Check that every width is positive and the RoPE width is even.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("num_heads", self.num_heads),
            ("qk_nope_head_dim", self.qk_nope_head_dim),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("v_head_dim", self.v_head_dim),
            ("kv_lora_rank", self.kv_lora_rank),
        ] {
            if v == 0 {
                return Err(Error::InvalidInput(format!("MLA {name} must be positive")));
            }
        }
        if !self.qk_rope_head_dim.is_multiple_of(2) {
            return Err(Error::InvalidInput(format!(
                "MLA qk_rope_head_dim {} must be even (RoPE rotates pairs)",
                self.qk_rope_head_dim
            )));
        }
        Ok(())
    }

    /// `d_nope + d_rope`: the query/key head width that sets the softmax scale.
    pub fn q_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Rows of `q_proj`: `n_h·(d_nope + d_rope)`.
    pub fn q_rows(&self) -> usize {
        self.num_heads * self.q_head_dim()
    }

    /// Rows of `kv_a_proj_with_mqa`: `r + d_rope`.
    pub fn kv_a_rows(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }

    /// Rows of `kv_b_proj`: `n_h·(d_nope + d_v)`.
    pub fn kv_b_rows(&self) -> usize {
        self.num_heads * (self.qk_nope_head_dim + self.v_head_dim)
    }

    /// Columns of `o_proj`: `n_h·d_v`.
    pub fn o_cols(&self) -> usize {
        self.num_heads * self.v_head_dim
    }

    /// Cached values per token per layer: `r + d_rope`.
    pub fn cache_values_per_token(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }
}

/// DeepSeek's YaRN RoPE scaling (`rope_scaling.type == "yarn"`), HF defaults in
/// brackets.
///
/// For pair `i < d_rope/2` with `f_i = θ^(-2i/d_rope)`:
///
/// ```text
/// low  = max(0,          floor(corr(beta_fast)))      corr(n) = d_rope·ln(L / (2π n)) / (2 ln θ)
/// high = min(d_rope − 1, ceil(corr(beta_slow)))       L = original_max_position_embeddings
/// ramp_i = clamp((i − low) / (high − low), 0, 1)      (high += 0.001 if equal)
/// inv_freq_i = f_i·(1 − ramp_i) + (f_i / factor)·ramp_i
/// cos/sin ×= m(factor, mscale) / m(factor, mscale_all_dim)
/// softmax scale ×= m(factor, mscale_all_dim)²   (only if mscale_all_dim ≠ 0)
/// m(s, k) = 1 if s ≤ 1, else 0.1·k·ln(s) + 1
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct YarnScaling {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    /// [32]
    pub beta_fast: f64,
    /// [1]
    pub beta_slow: f64,
    /// [1]
    pub mscale: f64,
    /// [0]
    pub mscale_all_dim: f64,
}

impl YarnScaling {
    /// `m(s, k)`: YaRN's attention-temperature factor.
    pub fn get_mscale(scale: f64, mscale: f64) -> f64 {
        if scale <= 1.0 {
            1.0
        } else {
            0.1 * mscale * scale.ln() + 1.0
        }
    }

    /// Factor applied to the cos/sin tables.
    pub fn cos_sin_factor(&self) -> f64 {
        Self::get_mscale(self.factor, self.mscale)
            / Self::get_mscale(self.factor, self.mscale_all_dim)
    }

    /// Factor applied to the softmax scale.
    pub fn softmax_factor(&self) -> f64 {
        if self.mscale_all_dim == 0.0 {
            1.0
        } else {
            Self::get_mscale(self.factor, self.mscale_all_dim).powi(2)
        }
    }

    /// The inverse frequencies of `dim` rotary dimensions (`dim/2` pairs) for `theta`.
    pub fn inv_freq(&self, theta: f64, dim: usize) -> Vec<f64> {
        let corr = |rotations: f64| {
            dim as f64
                * (self.original_max_position_embeddings as f64
                    / (rotations * 2.0 * std::f64::consts::PI))
                    .ln()
                / (2.0 * theta.ln())
        };
        let low = corr(self.beta_fast).floor().max(0.0);
        let mut high = corr(self.beta_slow).ceil().min(dim as f64 - 1.0);
        if low == high {
            high += 0.001;
        }
        (0..dim / 2)
            .map(|i| {
                let f = theta.powf(-2.0 * i as f64 / dim as f64);
                let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                f * (1.0 - ramp) + f / self.factor * ramp
            })
            .collect()
    }
}

/// How the MLA RoPE frequencies are modified, if at all.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum MlaRopeScaling {
    /// Plain RoPE: `inv_freq_i = θ^(-2i/d_rope)`.
    None,
    /// DeepSeek YaRN.
    Yarn(YarnScaling),
}

/// Everything an MLA layer needs besides its weights. Built once from `config.json`
/// ([`DeepseekV2Fields::resolve`]) or by hand.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MlaSpec {
    pub shape: MlaShape,
    /// RoPE base θ of the `d_rope` dimensions.
    pub rope_theta: f64,
    pub rope_scaling: MlaRopeScaling,
    /// Epsilon of `kv_a_layernorm`. We use `rms_norm_eps` as mistral.rs and vLLM do;
    /// HF's DeepseekV2 modeling code builds that norm with its default 1e-6 instead.
    pub norm_eps: f64,
    /// `attention_bias`: biases on `kv_a_proj_with_mqa`, `o_proj` and (with a q-LoRA)
    /// `q_a_proj`, as in HF and mistral.rs; `q_proj`/`q_b_proj` and `kv_b_proj` never
    /// have one.
    pub attention_bias: bool,
    /// `q_lora_rank`: queries through `q_b_proj · RMSNorm(q_a_proj · x)` instead of a
    /// plain `q_proj` (DeepSeek's q-LoRA; `None` = plain).
    #[serde(default)]
    pub q_lora_rank: Option<usize>,
}

impl MlaSpec {
    /// Softmax scale: `1/√(d_nope + d_rope)`, times the YaRN factor if configured.
    pub fn softmax_scale(&self) -> f64 {
        let base = 1.0 / (self.shape.q_head_dim() as f64).sqrt();
        match &self.rope_scaling {
            MlaRopeScaling::None => base,
            MlaRopeScaling::Yarn(y) => base * y.softmax_factor(),
        }
    }

    /// Check shape and numeric fields.
    pub fn validate(&self) -> Result<()> {
        self.shape.validate()?;
        if self.q_lora_rank == Some(0) {
            return Err(Error::InvalidInput(
                "MLA q_lora_rank must be positive".into(),
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(Error::InvalidInput(format!(
                "MLA rope_theta {} must be > 1",
                self.rope_theta
            )));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(Error::InvalidInput(format!(
                "MLA norm eps {} must be > 0",
                self.norm_eps
            )));
        }
        if let MlaRopeScaling::Yarn(y) = &self.rope_scaling {
            let finite = [
                y.factor,
                y.beta_fast,
                y.beta_slow,
                y.mscale,
                y.mscale_all_dim,
            ]
            .iter()
            .all(|v| v.is_finite());
            if !finite || y.factor <= 0.0 || y.beta_fast <= 0.0 || y.beta_slow <= 0.0 {
                return Err(Error::InvalidInput(format!(
                    "YaRN factor and betas must be finite and positive: {y:?}"
                )));
            }
            if y.original_max_position_embeddings == 0 {
                return Err(Error::InvalidInput(
                    "YaRN original_max_position_embeddings must be positive".into(),
                ));
            }
        }
        Ok(())
    }
}

/// The DeepSeek-V2 keys of `config.json` (flattened into
/// [`HfConfig`](crate::config::HfConfig); absent keys are `None`). MoE keys beyond
/// those that decide whether a layer is dense are ignored.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct DeepseekV2Fields {
    #[serde(default)]
    pub kv_lora_rank: Option<usize>,
    #[serde(default)]
    pub q_lora_rank: Option<usize>,
    #[serde(default)]
    pub qk_nope_head_dim: Option<usize>,
    #[serde(default)]
    pub qk_rope_head_dim: Option<usize>,
    #[serde(default)]
    pub v_head_dim: Option<usize>,
    #[serde(default)]
    pub n_routed_experts: Option<usize>,
    #[serde(default)]
    pub first_k_dense_replace: Option<usize>,
    #[serde(default)]
    pub moe_layer_freq: Option<usize>,
}

/// The `config.json` values [`DeepseekV2Fields::resolve`] reads besides its own.
#[derive(Debug, Clone, Copy)]
pub struct DeepseekV2Context<'a> {
    pub num_heads: usize,
    pub num_layers: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub attention_bias: bool,
    pub rope_scaling: Option<&'a serde_json::Value>,
}

impl DeepseekV2Fields {
    /// Resolve into an [`MlaSpec`], refusing what this crate does not run: MoE layers. `path` names the file in errors.
    ///
    /// A layer is MoE (as in HF and mistral.rs) iff `n_routed_experts` is set and
    /// `layer ≥ first_k_dense_replace` and `layer % moe_layer_freq == 0`; we also treat
    /// `n_routed_experts: 0` as dense.
    pub fn resolve(&self, cx: DeepseekV2Context<'_>, path: &Path) -> Result<MlaSpec> {
        let bad = |reason: String| Error::InvalidConfig {
            path: path.to_path_buf(),
            reason,
        };
        let req = |name: &str, v: Option<usize>| {
            v.ok_or_else(|| bad(format!("{name} is required for deepseek_v2")))
        };
        if let Some(moe) = self.first_moe_layer(cx.num_layers) {
            return Err(bad(format!(
                "layer {moe} is a mixture-of-experts layer (n_routed_experts = {:?}, \
                 first_k_dense_replace = {:?}); only dense MLPs are supported",
                self.n_routed_experts, self.first_k_dense_replace
            )));
        }
        let rope_scaling = match cx.rope_scaling {
            None | Some(serde_json::Value::Null) => MlaRopeScaling::None,
            Some(v) => parse_yarn(v).map_err(bad)?,
        };
        let spec = MlaSpec {
            shape: MlaShape {
                num_heads: cx.num_heads,
                qk_nope_head_dim: req("qk_nope_head_dim", self.qk_nope_head_dim)?,
                qk_rope_head_dim: req("qk_rope_head_dim", self.qk_rope_head_dim)?,
                v_head_dim: req("v_head_dim", self.v_head_dim)?,
                kv_lora_rank: req("kv_lora_rank", self.kv_lora_rank)?,
            },
            rope_theta: cx.rope_theta,
            rope_scaling,
            norm_eps: cx.rms_norm_eps,
            attention_bias: cx.attention_bias,
            q_lora_rank: self.q_lora_rank,
        };
        spec.validate().map_err(|e| bad(e.to_string()))?;
        Ok(spec)
    }

    /// The first MoE layer under the HF/mistral.rs rule, if any.
    fn first_moe_layer(&self, num_layers: usize) -> Option<usize> {
        let experts = self.n_routed_experts.unwrap_or(0);
        let first = self.first_k_dense_replace.unwrap_or(0);
        let freq = self.moe_layer_freq.unwrap_or(1).max(1);
        if experts == 0 {
            return None;
        }
        (first..num_layers).find(|l| l.is_multiple_of(freq))
    }
}

/// `rope_scaling` of a DeepSeek-V2 config: `default` or `yarn`.
fn parse_yarn(v: &serde_json::Value) -> std::result::Result<MlaRopeScaling, String> {
    let kind = v
        .get("type")
        .or_else(|| v.get("rope_type"))
        .and_then(|t| t.as_str())
        .unwrap_or("");
    match kind {
        "default" => Ok(MlaRopeScaling::None),
        "yarn" => {
            let num = |k: &str, default: Option<f64>| {
                match v.get(k) {
                    None | Some(serde_json::Value::Null) => default,
                    Some(x) => x.as_f64(),
                }
                .ok_or_else(|| format!("rope_scaling.{k} missing or not a number for yarn"))
            };
            let factor = num("factor", None)?;
            let orig = num("original_max_position_embeddings", None)?;
            if !(orig >= 1.0 && orig.fract() == 0.0) {
                return Err(format!(
                    "rope_scaling.original_max_position_embeddings {orig} is not a positive integer"
                ));
            }
            Ok(MlaRopeScaling::Yarn(YarnScaling {
                factor,
                original_max_position_embeddings: orig as usize,
                beta_fast: num("beta_fast", Some(32.0))?,
                beta_slow: num("beta_slow", Some(1.0))?,
                mscale: num("mscale", Some(1.0))?,
                mscale_all_dim: num("mscale_all_dim", Some(0.0))?,
            }))
        }
        other => Err(format!(
            "rope_scaling type `{other}` is not supported for deepseek_v2 (supported: yarn)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DeepSeek-V2's own YaRN settings (d_rope 64, θ 1e4, factor 40, L 4096, betas
    /// 32/1, mscale = mscale_all_dim = 0.707): `corr(32) = 10.47 → low 10`,
    /// `corr(1) = 22.51 → high 23`.
    #[test]
    fn yarn_matches_deepseek_v2_numbers() {
        let y = YarnScaling {
            factor: 40.0,
            original_max_position_embeddings: 4096,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: 0.707,
            mscale_all_dim: 0.707,
        };
        let f = y.inv_freq(10_000.0, 64);
        let plain = |i: usize| 10_000f64.powf(-2.0 * i as f64 / 64.0);
        assert_eq!(f.len(), 32);
        for (i, &fi) in f.iter().enumerate() {
            let ramp = ((i as f64 - 10.0) / 13.0).clamp(0.0, 1.0);
            let want = plain(i) * (1.0 - ramp) + plain(i) / 40.0 * ramp;
            assert!(
                (fi - want).abs() <= 1e-15 * plain(0),
                "pair {i}: {fi} vs {want}"
            );
        }
        assert_eq!(f[9], plain(9), "pairs below `low` are unscaled");
        assert!(
            (f[31] - plain(31) / 40.0).abs() < 1e-18,
            "pairs above `high` / factor"
        );
        assert!((y.cos_sin_factor() - 1.0).abs() < 1e-15);
        let m = 0.1 * 0.707 * 40f64.ln() + 1.0;
        assert!((y.softmax_factor() - m * m).abs() < 1e-12);
        assert!((y.softmax_factor() - 1.58964).abs() < 1e-4);
    }

    #[test]
    fn moe_is_refused_and_q_lora_accepted() {
        let cx = DeepseekV2Context {
            num_heads: 2,
            num_layers: 4,
            rope_theta: 1e4,
            rms_norm_eps: 1e-6,
            attention_bias: false,
            rope_scaling: None,
        };
        let dense = DeepseekV2Fields {
            kv_lora_rank: Some(8),
            qk_nope_head_dim: Some(4),
            qk_rope_head_dim: Some(4),
            v_head_dim: Some(4),
            ..Default::default()
        };
        let p = Path::new("config.json");
        assert_eq!(dense.resolve(cx, p).unwrap().shape.kv_lora_rank, 8);
        let all_dense = DeepseekV2Fields {
            n_routed_experts: Some(64),
            first_k_dense_replace: Some(4),
            ..dense.clone()
        };
        assert!(
            all_dense.resolve(cx, p).is_ok(),
            "first_k_dense_replace = L"
        );
        let moe = DeepseekV2Fields {
            first_k_dense_replace: Some(1),
            moe_layer_freq: Some(2),
            ..all_dense.clone()
        };
        let err = moe.resolve(cx, p).unwrap_err().to_string();
        assert!(err.contains("layer 2 is a mixture-of-experts"), "{err}");
        let qlora = DeepseekV2Fields {
            q_lora_rank: Some(16),
            ..dense.clone()
        };
        assert_eq!(qlora.resolve(cx, p).unwrap().q_lora_rank, Some(16));
        let zero = DeepseekV2Fields {
            q_lora_rank: Some(0),
            ..dense.clone()
        };
        let err = zero.resolve(cx, p).unwrap_err().to_string();
        assert!(err.contains("q_lora_rank"), "{err}");
        let odd = DeepseekV2Fields {
            qk_rope_head_dim: Some(3),
            ..dense.clone()
        };
        let err = odd.resolve(cx, p).unwrap_err().to_string();
        assert!(err.contains("must be even"), "{err}");
        let missing = DeepseekV2Fields {
            v_head_dim: None,
            ..dense
        };
        let err = missing.resolve(cx, p).unwrap_err().to_string();
        assert!(err.contains("v_head_dim is required"), "{err}");
    }

    #[test]
    fn rope_scaling_parses_yarn_and_rejects_others() {
        let v = serde_json::json!({"type": "yarn", "factor": 8.0,
            "original_max_position_embeddings": 8192, "beta_fast": 4, "beta_slow": 1,
            "mscale": 1.0, "mscale_all_dim": 1.0});
        let MlaRopeScaling::Yarn(y) = parse_yarn(&v).unwrap() else {
            panic!("not yarn")
        };
        assert_eq!((y.factor, y.beta_fast, y.mscale_all_dim), (8.0, 4.0, 1.0));
        let d = parse_yarn(&serde_json::json!({"type": "yarn", "factor": 2.0,
            "original_max_position_embeddings": 100}))
        .unwrap();
        assert!(
            matches!(d, MlaRopeScaling::Yarn(y) if y.beta_fast == 32.0 && y.mscale_all_dim == 0.0)
        );
        let err =
            parse_yarn(&serde_json::json!({"rope_type": "llama3", "factor": 8.0})).unwrap_err();
        assert!(err.contains("`llama3` is not supported"), "{err}");
        let err = parse_yarn(&serde_json::json!({"type": "yarn"})).unwrap_err();
        assert!(err.contains("rope_scaling.factor"), "{err}");
    }
}
