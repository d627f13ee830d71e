//! CUDA half of the paged MLA decode (feature `cuda`): the latent cache in device
//! memory and absorbed decode kernels for any `kv_lora_rank` / rope width.
//!
//! - [`kernels`]: [`MlaKernels`], the fatbins of `kernels/*.cu` (built by `build.rs`
//!   with nvcc) loaded on one stream.
//! - [`cache`]: [`CudaLatentCache`], the [`LatentPagedCache`](crate::cache::LatentPagedCache)
//!   rules (blocks, block tables, per-layer widths, copy-on-write sharing, exact byte
//!   accounting, errors before changes) with device pools.
//! - [`plan`]: how a batch is cut into splits (flash-decoding) so one long sequence
//!   fills the GPU.
//! - [`decode`]: [`CudaMlaDecoder`], split kernels (tensor cores for bf16, CUDA cores
//!   otherwise) plus the log-sum-exp combine.
//! - [`runner`]: [`CudaPagedModel`], a stock DeepSeek-V2 checkpoint on the GPU for the
//!   one-engine scheduler ([`Engine`](crate::engine::Engine)).
//!
//! ```no_run
//! use mla_attention::cache::{CacheConfig, LayerWidth};
//! use mla_attention::cuda::{CudaDecodeQuery, CudaLatentCache, CudaMlaDecoder, MlaKernels};
//! let k = MlaKernels::on_device(0)?;
//! let layers = vec![LayerWidth { rank: 512, rope: 64 }];
//! let mut cache = CudaLatentCache::<half::bf16>::new(k.clone(), CacheConfig { block_size: 32, num_blocks: 1024, layers })?;
//! let seq = cache.add_sequence();
//! cache.append(seq, 0, 576, &vec![0.1; 576 * 100])?;
//! let mut dec = CudaMlaDecoder::new(k.clone());
//! dec.plan_for(&cache, &[seq], 0)?;
//! let q_lat = k.stream().clone_htod(&vec![half::bf16::from_f32(0.01); 16 * 512]).unwrap();
//! let q_pe = k.stream().clone_htod(&vec![half::bf16::from_f32(0.01); 16 * 64]).unwrap();
//! let q = CudaDecodeQuery { q_lat: &q_lat.as_view(), q_pe: &q_pe.as_view(), num_heads: 16, scale: 0.07 };
//! let o_lat = dec.decode(&cache, 0, &q)?; // (1, 16, 512) f32
//! # Ok::<(), mla_attention::Error>(())
//! ```

pub mod cache;
pub mod decode;
pub mod elem;
pub mod interop;
pub mod kernels;
pub mod plan;
pub mod runner;

pub use cache::CudaLatentCache;
pub use decode::{CudaDecodeQuery, CudaMlaDecoder, KernelChoice, KernelPlan};
pub use elem::CudaLatentElem;
pub use kernels::MlaKernels;
pub use plan::SplitPolicy;
pub use runner::{CudaPagedModel, CudaRunnerOptions, MAX_SEGMENT_ROWS};
