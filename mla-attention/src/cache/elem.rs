//! [`LatentElem`]: the element types a [`LatentPagedCache`](super::LatentPagedCache) can
//! store. Values enter as f32 and the decode reads them back as f32.

use half::bf16;

use super::LayerBlocks;

/// A layer's pool with its element type named at run time: the CPU attention matches on
/// it, so its kernels are compiled (and optimized) once in this crate rather than
/// monomorphized in every caller's crate at the caller's optimization level.
#[derive(Debug, Clone, Copy)]
pub enum AnyLayerBlocks<'a> {
    F32(LayerBlocks<'a, f32>),
    Bf16(LayerBlocks<'a, bf16>),
}

/// A storage type for cached latents: `f32` (exact) or `bf16` (half the bytes,
/// round-to-nearest-even on write).
pub trait LatentElem: Copy + Default + Send + Sync + std::fmt::Debug + 'static {
    /// Bytes one value occupies in the cache.
    const BYTES: usize;
    /// Name for messages and bench ids (`"f32"`, `"bf16"`).
    const NAME: &'static str;

    fn from_f32(v: f32) -> Self;

    fn to_f32(self) -> f32;

    /// `row` as f32: borrowed as is for `f32`, converted into `scratch` otherwise.
    /// The decode calls this once per cached row, so every head of a task reuses it.
    fn row_as_f32<'a>(row: &'a [Self], scratch: &'a mut Vec<f32>) -> &'a [f32];

    /// `layer` with its element type as a value, for the kernels' one dispatch.
    fn erase(layer: LayerBlocks<'_, Self>) -> AnyLayerBlocks<'_>;
}

impl LatentElem for f32 {
    const BYTES: usize = 4;
    const NAME: &'static str = "f32";

    #[inline]
    fn from_f32(v: f32) -> Self {
        v
    }

    #[inline]
    fn to_f32(self) -> f32 {
        self
    }

    #[inline]
    fn row_as_f32<'a>(row: &'a [Self], _scratch: &'a mut Vec<f32>) -> &'a [f32] {
        row
    }

    fn erase(layer: LayerBlocks<'_, Self>) -> AnyLayerBlocks<'_> {
        AnyLayerBlocks::F32(layer)
    }
}

impl LatentElem for bf16 {
    const BYTES: usize = 2;
    const NAME: &'static str = "bf16";

    #[inline]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }

    #[inline]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }

    #[inline]
    fn row_as_f32<'a>(row: &'a [Self], scratch: &'a mut Vec<f32>) -> &'a [f32] {
        scratch.clear();
        scratch.extend(row.iter().map(|v| v.to_f32()));
        scratch
    }

    fn erase(layer: LayerBlocks<'_, Self>) -> AnyLayerBlocks<'_> {
        AnyLayerBlocks::Bf16(layer)
    }
}
