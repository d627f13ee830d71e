//! Between candle's CUDA tensors and this module's device buffers, without copies.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView};
use candle_core::cuda_backend::CudaStorage;
use candle_core::op::BackpropOp;
use candle_core::{Device, Storage, Tensor};

use super::CudaLatentElem;
use crate::error::{Error, Result};

/// `f` with a view of a contiguous CUDA tensor's data as `T`.
pub fn with_view<T: CudaLatentElem, R>(
    t: &Tensor,
    f: impl FnOnce(&CudaView<'_, T>) -> Result<R>,
) -> Result<R> {
    let t = t.to_dtype(T::DTYPE)?.contiguous()?;
    let (st, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*st else {
        return Err(Error::InvalidInput("expected a CUDA tensor".into()));
    };
    let (a, b) = layout
        .contiguous_offsets()
        .ok_or_else(|| Error::InvalidInput("tensor not contiguous".into()))?;
    let slice = cs.as_cuda_slice::<T>()?;
    f(&slice.slice(a..b))
}

/// A device buffer as a tensor of `shape` (no copy).
pub fn wrap<T: CudaLatentElem>(
    dev: &Device,
    s: CudaSlice<T>,
    shape: (usize, usize, usize),
) -> Result<Tensor> {
    let storage = CudaStorage::wrap_cuda_slice(s, dev.as_cuda_device()?.clone());
    Ok(Tensor::from_storage(
        Storage::Cuda(storage),
        shape,
        BackpropOp::none(),
        false,
    ))
}
