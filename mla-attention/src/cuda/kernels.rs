//! [`MlaKernels`]: the compiled kernels of `kernels/*.cu` loaded into one CUDA
//! context, with the device limits the launchers need.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc;
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DeviceRepr, DriverError};
use cudarc::nvrtc::Ptx;

use crate::error::{Error, Result};

static TC_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/mla_decode_tc.fatbin"));
static GENERIC_FATBIN: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/mla_decode_generic.fatbin"));
static CACHE_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/mla_cache.fatbin"));

/// Largest `ceil(rank / 64)` the tensor-core kernel is instantiated for (rank ≤ 768);
/// 64-token tiles exist up to `TC_MAX_NT_T64` (rank ≤ 576).
pub(crate) const TC_MAX_NT: usize = 12;
pub(crate) const TC_MAX_NT_T64: usize = 9;
/// Threads per block of every decode kernel (`MLA_THREADS` in `mla_common.cuh`).
pub(crate) const THREADS: u32 = 256;
/// Heads per block of the generic kernel (`GENERIC_HG`).
pub(crate) const GENERIC_HEADS: usize = 16;

/// A CUDA driver error as this crate's error (candle's CUDA variant).
pub(crate) fn driver(e: DriverError) -> Error {
    Error::Candle(candle_core::Error::Cuda(Box::new(e)))
}

/// Offsets into the decode metadata buffer (`MetaOffsets` in `mla_common.cuh`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct MetaOffsets {
    pub split_off: i32,
    pub seqsplit_off: i32,
    pub seqblk_off: i32,
    pub blkid_off: i32,
}

// SAFETY: four i32 with C layout, identical to the kernels' struct.
unsafe impl DeviceRepr for MetaOffsets {}

/// Every kernel function, resolved once.
#[derive(Debug)]
pub(crate) struct Functions {
    /// `tc64[mt - 1][nt - 1]` / `tc32[..]`: tensor-core split kernel for 16·mt heads,
    /// rank ≤ 64·nt, tiles of 64 / 32 tokens.
    pub tc64: Vec<Vec<CudaFunction>>,
    pub tc32: Vec<Vec<CudaFunction>>,
    pub generic_f32: CudaFunction,
    pub generic_bf16: CudaFunction,
    pub combine: CudaFunction,
    pub scatter_f32: CudaFunction,
    pub scatter_bf16: CudaFunction,
    pub fill_f32: CudaFunction,
    pub fill_bf16: CudaFunction,
}

/// The MLA kernels loaded on one device, bound to one stream.
#[derive(Debug)]
pub struct MlaKernels {
    stream: Arc<CudaStream>,
    pub(crate) f: Functions,
    sm_count: usize,
    max_smem_bytes: usize,
    /// Development knob `MLA_TC_FORCE=m<1|2>t<32|64>`: force the tensor-core kernel's
    /// heads per block and tile where that kernel fits.
    pub(crate) tc_force: Option<(usize, usize)>,
}

impl MlaKernels {
    /// Load the kernels into `stream`'s context; every launch goes to `stream`.
    /// Use candle's stream (`CudaDevice::cuda_stream`) to mix with candle ops.
    pub fn new(stream: Arc<CudaStream>) -> Result<Arc<Self>> {
        let ctx = stream.context().clone();
        // Development knob: `MLA_KERNEL_DIR=dir` loads `dir/<name>.fatbin` instead of the
        // embedded build where that file exists (kernel variants compiled on the device,
        // same signatures).
        let dir = std::env::var_os("MLA_KERNEL_DIR").map(std::path::PathBuf::from);
        let load = |name: &str, bin: &[u8]| {
            let bytes = match dir.as_ref().map(|d| d.join(format!("{name}.fatbin"))) {
                Some(p) if p.exists() => std::fs::read(&p).map_err(|e| Error::io(p, e))?,
                _ => bin.to_vec(),
            };
            ctx.load_module(Ptx::from_binary(bytes)).map_err(driver)
        };
        let (tc_mod, gen_mod, cache_mod) = (
            load("mla_decode_tc", TC_FATBIN)?,
            load("mla_decode_generic", GENERIC_FATBIN)?,
            load("mla_cache", CACHE_FATBIN)?,
        );
        let attr = |a| ctx.attribute(a).map_err(driver);
        let sm_count = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize;
        let max_smem_bytes =
            attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?
                as usize;
        let get = |m: &Arc<CudaModule>, name: &str| -> Result<CudaFunction> {
            let f = m.load_function(name).map_err(driver)?;
            // Let every kernel use all the shared memory a block may opt into.
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                max_smem_bytes as i32,
            )
            .map_err(driver)?;
            Ok(f)
        };
        let tc = |tt: usize, max_nt: usize| {
            (1..=2)
                .map(|mt| {
                    (1..=max_nt)
                        .map(|nt| get(&tc_mod, &format!("mla_split_tc_m{mt}_n{nt}_t{tt}")))
                        .collect::<Result<Vec<_>>>()
                })
                .collect::<Result<Vec<_>>>()
        };
        let f = Functions {
            tc64: tc(64, TC_MAX_NT_T64)?,
            tc32: tc(32, TC_MAX_NT)?,
            generic_f32: get(&gen_mod, "mla_split_generic_f32")?,
            generic_bf16: get(&gen_mod, "mla_split_generic_bf16")?,
            combine: get(&gen_mod, "mla_combine")?,
            scatter_f32: get(&cache_mod, "mla_scatter_rows_f32")?,
            scatter_bf16: get(&cache_mod, "mla_scatter_rows_bf16")?,
            fill_f32: get(&cache_mod, "mla_fill_uniform_f32")?,
            fill_bf16: get(&cache_mod, "mla_fill_uniform_bf16")?,
        };
        let tc_force = std::env::var("MLA_TC_FORCE").ok().and_then(|v| {
            let (m, t) = v.strip_prefix('m')?.split_once('t')?;
            Some((m.parse().ok()?, t.parse().ok()?))
        });
        Ok(Arc::new(MlaKernels {
            stream,
            f,
            sm_count,
            max_smem_bytes,
            tc_force,
        }))
    }

    /// Kernels on device `ordinal`'s default stream (a context of its own, not
    /// candle's).
    pub fn on_device(ordinal: usize) -> Result<Arc<Self>> {
        let ctx = CudaContext::new(ordinal).map_err(driver)?;
        Self::new(ctx.default_stream())
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Streaming multiprocessors of the device.
    pub fn sm_count(&self) -> usize {
        self.sm_count
    }

    /// Shared memory one block may use (opt-in limit), bytes.
    pub fn max_smem_bytes(&self) -> usize {
        self.max_smem_bytes
    }

    /// Wait for everything queued on the stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(driver)
    }
}
