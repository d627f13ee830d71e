//! [`PagedMlaLayer`]: one decode step of an [`MlaAttention`] layer for a batch of
//! sequences of different lengths, with the latents in a [`LatentPagedCache`].
//! Numerically the [`MlaForm::Absorbed`](crate::mla::MlaForm::Absorbed) form, batched
//! over sequences at different positions.

use candle_core::{DType, Device, Tensor};

use super::absorb::LatentProjections;
use super::decode::{absorbed_decode, DecodeParams, DecodeQuery};
use super::gqa::{append_segments, row_views, undo_segments};
use crate::cache::pass::check_distinct;
use crate::cache::PassRows;
use crate::cache::{LatentElem, LatentPagedCache, LayerWidth, SeqId};
use crate::error::{Error, Result};
use crate::mla::{MlaAttention, MlaShape};
use crate::model::attention::linear;

/// An MLA layer bound to layer index `layer` of a paged cache.
#[derive(Debug, Clone)]
pub struct PagedMlaLayer {
    attn: MlaAttention,
    proj: LatentProjections,
    layer: usize,
    params: DecodeParams,
}

impl PagedMlaLayer {
    pub fn new(attn: MlaAttention, layer: usize) -> Result<Self> {
        let proj = LatentProjections::from_layer(&attn)?;
        Ok(PagedMlaLayer {
            attn,
            proj,
            layer,
            params: DecodeParams::default(),
        })
    }

    pub fn with_params(mut self, params: DecodeParams) -> Self {
        self.params = params;
        self
    }

    pub fn attention(&self) -> &MlaAttention {
        &self.attn
    }

    /// `x (batch, 1, hidden)` → `(batch, 1, hidden)`. Row `b` is the next token of
    /// `seqs[b]` (distinct ids), at position = its tokens already cached in this
    /// layer. Appends each sequence's latent row, then attends over all its rows.
    /// On error no sequence is changed.
    pub fn decode_step<T: LatentElem>(
        &self,
        x: &Tensor,
        seqs: &[SeqId],
        cache: &mut LatentPagedCache<T>,
    ) -> Result<Tensor> {
        let (b, one, _hidden) = x.dims3()?;
        if one != 1 || b != seqs.len() {
            return Err(Error::InvalidInput(format!(
                "paged MLA decode takes (batch = {} sequences, 1, hidden), got {:?}",
                seqs.len(),
                x.dims()
            )));
        }
        check_distinct(seqs, "paged MLA decode")?;
        let starts: Vec<usize> = seqs
            .iter()
            .map(|&s| cache.tokens(s, self.layer))
            .collect::<Result<_>>()?;
        self.forward_rows(x, &PassRows::new(seqs, &starts, &vec![1; b]), cache)
    }

    /// `x (rows, 1, hidden)` → `(rows, 1, hidden)` for the rows of `pass` (each sequence's
    /// rows consecutive, at positions from its tokens cached in this layer): appends every
    /// row's latent, then each row attends over its sequence's rows up to its own. On error
    /// no sequence is changed.
    pub fn forward_rows<T: LatentElem>(
        &self,
        x: &Tensor,
        pass: &PassRows,
        cache: &mut LatentPagedCache<T>,
    ) -> Result<Tensor> {
        let (b, one, _hidden) = x.dims3()?;
        if one != 1 || b != pass.rows() {
            return Err(Error::InvalidInput(format!(
                "paged MLA pass takes ({} rows, 1, hidden), got {:?}",
                pass.rows(),
                x.dims()
            )));
        }
        let MlaShape {
            num_heads: nh,
            qk_nope_head_dim: dn,
            qk_rope_head_dim: dr,
            v_head_dim: dv,
            kv_lora_rank: r,
        } = self.attn.shape();
        let lw = cache.layer(self.layer)?.width;
        if lw != LayerWidth::of_shape(&self.attn.shape()) {
            return Err(Error::WidthMismatch {
                layer: self.layer,
                what: "MLA layer rank + rope vs cache layer",
                got: r + dr,
                expected: lw.width(),
            });
        }
        let pos = &pass.row_pos;
        // Queries: (b, 1, n_h·(d_nope + d_rope)) → (b, n_h, d_nope + d_rope).
        let q = self.attn.queries(x)?.reshape((b, nh, dn + dr))?;
        let q_nope = q.narrow(2, 0, dn)?.flatten_all()?.to_vec1::<f32>()?;
        let q_pe = self
            .attn
            .rope()
            .apply_at(&q.narrow(2, dn, dr)?.contiguous()?, pos)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let latents = self
            .attn
            .latents_at(x, pos)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        append_segments(cache, self.layer, pass, r + dr, &latents)?;
        let q_lat = self.proj.absorb_queries(&q_nope)?;
        let query = DecodeQuery {
            q_lat: &q_lat,
            q_pe: &q_pe,
            num_heads: nh,
            scale: self.attn.softmax_scale() as f32,
        };
        let o_lat = {
            let views = row_views(cache, self.layer, pass)?;
            absorbed_decode(&cache.layer(self.layer)?, &views, &query, &self.params)
        };
        let o_lat = match o_lat {
            Ok(o) => o,
            Err(e) => {
                undo_segments(cache, self.layer, pass);
                return Err(e);
            }
        };
        let o = self.proj.apply_w_uv(&o_lat)?;
        let o = Tensor::from_vec(o, (b, 1, nh * dv), &Device::Cpu)?.to_device(x.device())?;
        let w = self.attn.weights();
        linear(&o, &w.o_proj, w.o_proj_bias.as_ref())
    }
}
