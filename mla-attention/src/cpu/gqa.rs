//! [`PagedGqaLayer`]: the attention of an original (unconverted) Llama / Qwen2 layer over a
//! paged cache, for passes of any number of rows per sequence.
//!
//! The cached row of layer `l` is `[K ; V]`, every KV head's RoPE'd key then every KV
//! head's value, `2 · n_kv · head_dim` values — the same bookkeeping as the MLA latents, a
//! wider row. A pass appends each row's `[K ; V]`, then every row attends, with the heads
//! of each KV group, over its sequence's rows up to and including its own position through
//! the shared paged attention ([`super::attend`]): a token's output is the same bits in a
//! one-row decode step and inside a verify pass of a draft.

use candle_core::{Device, Tensor};

use super::attend::{attend_paged, Attend, HeadGroup};
use crate::cache::PassRows;
use crate::cache::{LatentElem, LatentPagedCache, LayerBlocks, LayerWidth, SeqView};
use crate::error::{Error, Result};
use crate::model::attention::linear;
use crate::model::{GqaAttention, Rope};

/// A GQA layer bound to layer index `layer` of a paged cache.
#[derive(Debug, Clone)]
pub struct PagedGqaLayer {
    attn: GqaAttention,
    layer: usize,
}

/// Rotate each `dim`-wide head of `x` (HF half rotation) for position `pos`; the same f32
/// arithmetic as [`Rope::apply`].
fn rope_row(rope: &Rope, x: &mut [f32], dim: usize, pos: usize) {
    let half = dim / 2;
    let (cos, sin): (Vec<f32>, Vec<f32>) = rope
        .inv_freq()
        .iter()
        .map(|&f| {
            let a = pos as f64 * f;
            (a.cos() as f32, a.sin() as f32)
        })
        .unzip();
    for head in x.chunks_exact_mut(dim) {
        let (lo, hi) = head.split_at_mut(half);
        for i in 0..half {
            let (l, h) = (lo[i], hi[i]);
            lo[i] = l * cos[i] - h * sin[i];
            hi[i] = h * cos[i] + l * sin[i];
        }
    }
}

/// Shapes of a paged GQA attention.
#[derive(Debug, Clone, Copy)]
pub struct GqaShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// Attention of every row of a pass over the paged `[K ; V]` rows: `q` `(rows, n_h, d)`
/// (RoPE'd), `views[r]` the rows row `r` sees; returns `(rows, n_h, d)`.
pub fn paged_gqa_attention<T: LatentElem>(
    layer: &LayerBlocks<'_, T>,
    views: &[SeqView<'_>],
    q: &[f32],
    shape: GqaShape,
) -> Result<Vec<f32>> {
    let GqaShape {
        num_heads: nh,
        num_kv_heads: nkv,
        head_dim: d,
    } = shape;
    if nkv == 0 || nh % nkv != 0 || layer.width.width() != 2 * nkv * d {
        return Err(Error::WidthMismatch {
            layer: layer.layer,
            what: "GQA [K ; V] row",
            got: layer.width.width(),
            expected: 2 * nkv * d,
        });
    }
    if q.len() != views.len() * nh * d {
        return Err(Error::WidthMismatch {
            layer: layer.layer,
            what: "GQA queries",
            got: q.len(),
            expected: views.len() * nh * d,
        });
    }
    for v in views {
        if v.tokens == 0 {
            return Err(Error::InvalidInput(format!(
                "layer {}: a row has no cached keys to attend to",
                layer.layer
            )));
        }
        layer.check(v)?;
    }
    let group = nh / nkv;
    // A KV head's query heads read its key and value slices of every row.
    let groups: Vec<HeadGroup> = (0..nkv)
        .map(|g| HeadGroup {
            heads: g * group..(g + 1) * group,
            key: g * d,
            value: (nkv + g) * d,
        })
        .collect();
    let mut out = vec![0.0f32; q.len()];
    let attend = Attend {
        q,
        num_heads: nh,
        key_dim: d,
        value_dim: d,
        scale: 1.0 / (d as f32).sqrt(),
        groups: &groups,
        split_tokens: SPLIT_TOKENS,
    };
    attend_paged(layer, views, &attend, &mut out);
    Ok(out)
}

/// Keys per split-KV task of the paged GQA attention.
const SPLIT_TOKENS: usize = 256;

impl PagedGqaLayer {
    pub fn new(attn: GqaAttention, layer: usize) -> Self {
        PagedGqaLayer { attn, layer }
    }

    /// The cached row of this layer: `[K ; V]`.
    pub fn width(&self) -> LayerWidth {
        LayerWidth {
            rank: 2 * self.attn.num_kv_heads * self.attn.head_dim,
            rope: 0,
        }
    }

    /// `x (rows, 1, hidden)` → `(rows, 1, hidden)` for the rows of `pass`: appends each
    /// row's `[K ; V]`, then attends. On error no sequence of this layer is changed.
    pub fn forward_rows<T: LatentElem>(
        &self,
        x: &Tensor,
        rope: &Rope,
        pass: &PassRows,
        cache: &mut LatentPagedCache<T>,
    ) -> Result<Tensor> {
        let a = &self.attn;
        let (nh, nkv, d) = (a.num_heads, a.num_kv_heads, a.head_dim);
        let rows = pass.rows();
        let lw = cache.layer(self.layer)?.width;
        if lw != self.width() {
            return Err(Error::WidthMismatch {
                layer: self.layer,
                what: "GQA layer [K ; V] vs cache layer",
                got: self.width().width(),
                expected: lw.width(),
            });
        }
        let flat = |t: Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
        let mut q = flat(linear(x, &a.q_proj, a.q_bias.as_ref())?)?;
        let mut k = flat(linear(x, &a.k_proj, a.k_bias.as_ref())?)?;
        let v = flat(linear(x, &a.v_proj, a.v_bias.as_ref())?)?;
        let mut kv = Vec::with_capacity(rows * 2 * nkv * d);
        for (r, &pos) in pass.row_pos.iter().enumerate() {
            rope_row(rope, &mut q[r * nh * d..][..nh * d], d, pos);
            rope_row(rope, &mut k[r * nkv * d..][..nkv * d], d, pos);
            kv.extend_from_slice(&k[r * nkv * d..][..nkv * d]);
            kv.extend_from_slice(&v[r * nkv * d..][..nkv * d]);
        }
        let w = 2 * nkv * d;
        append_segments(cache, self.layer, pass, w, &kv)?;
        let out = {
            let views = row_views(cache, self.layer, pass)?;
            paged_gqa_attention(
                &cache.layer(self.layer)?,
                &views,
                &q,
                GqaShape {
                    num_heads: nh,
                    num_kv_heads: nkv,
                    head_dim: d,
                },
            )
        };
        let out = match out {
            Ok(o) => o,
            Err(e) => {
                undo_segments(cache, self.layer, pass);
                return Err(e);
            }
        };
        let o = Tensor::from_vec(out, (rows, 1, nh * d), &Device::Cpu)?.to_device(x.device())?;
        linear(&o, &a.o_proj, None)
    }
}

/// Append each sequence's rows of the pass (`rows` `(pass rows, width)`) to `layer`, all
/// or none.
pub(crate) fn append_segments<T: LatentElem>(
    cache: &mut LatentPagedCache<T>,
    layer: usize,
    pass: &PassRows,
    width: usize,
    rows: &[f32],
) -> Result<()> {
    let offsets = pass.offsets();
    for (i, &s) in pass.seqs.iter().enumerate() {
        let seg = &rows[offsets[i] * width..][..pass.lens[i] * width];
        if let Err(e) = cache.append(s, layer, width, seg) {
            let done = PassRows::new(&pass.seqs[..i], &pass.starts[..i], &pass.lens[..i]);
            undo_segments(cache, layer, &done);
            return Err(e);
        }
    }
    Ok(())
}

/// Roll the pass's sequences back to where they started in `layer`.
pub(crate) fn undo_segments<T: LatentElem>(
    cache: &mut LatentPagedCache<T>,
    layer: usize,
    pass: &PassRows,
) {
    for (&s, &p) in pass.seqs.iter().zip(&pass.starts) {
        // Appended to above, so the sequence exists and holds at least `p` rows.
        let _ = cache.truncate(s, layer, p);
    }
}

/// What each row of the pass sees in `layer`: its sequence's rows up to its own position.
pub(crate) fn row_views<'a, T: LatentElem>(
    cache: &'a LatentPagedCache<T>,
    layer: usize,
    pass: &PassRows,
) -> Result<Vec<SeqView<'a>>> {
    pass.row_seq
        .iter()
        .zip(&pass.row_pos)
        .map(|(&i, &pos)| {
            let v = cache.view(pass.seqs[i], layer)?;
            Ok(SeqView {
                blocks: v.blocks,
                tokens: pos + 1,
            })
        })
        .collect()
}
