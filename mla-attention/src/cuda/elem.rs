//! [`CudaLatentElem`]: the cache element types the CUDA kernels take.

use candle_core::cuda_backend::cudarc::driver::{CudaFunction, DeviceRepr, ValidAsZeroBits};
use candle_core::cuda_backend::CudaDType;
use candle_core::WithDType;
use half::bf16;

use super::kernels::MlaKernels;
use crate::cache::LatentElem;

/// A [`LatentElem`] the CUDA kernels can read: `f32` (CUDA-core arithmetic) or
/// `bf16` (tensor cores when the row width allows, see [`super::decode`]).
pub trait CudaLatentElem:
    LatentElem + DeviceRepr + ValidAsZeroBits + Unpin + CudaDType + WithDType
{
    /// Whether the tensor-core split kernel reads this type.
    const TENSOR_CORES: bool;

    #[doc(hidden)]
    fn generic_kernel(k: &MlaKernels) -> &CudaFunction;
    #[doc(hidden)]
    fn scatter_kernel(k: &MlaKernels) -> &CudaFunction;
    #[doc(hidden)]
    fn fill_kernel(k: &MlaKernels) -> &CudaFunction;
}

impl CudaLatentElem for f32 {
    const TENSOR_CORES: bool = false;

    fn generic_kernel(k: &MlaKernels) -> &CudaFunction {
        &k.f.generic_f32
    }

    fn scatter_kernel(k: &MlaKernels) -> &CudaFunction {
        &k.f.scatter_f32
    }

    fn fill_kernel(k: &MlaKernels) -> &CudaFunction {
        &k.f.fill_f32
    }
}

impl CudaLatentElem for bf16 {
    const TENSOR_CORES: bool = true;

    fn generic_kernel(k: &MlaKernels) -> &CudaFunction {
        &k.f.generic_bf16
    }

    fn scatter_kernel(k: &MlaKernels) -> &CudaFunction {
        &k.f.scatter_bf16
    }

    fn fill_kernel(k: &MlaKernels) -> &CudaFunction {
        &k.f.fill_bf16
    }
}
