//! # mla-attention
//!
//! The runtime half of the project: it loads real checkpoints (GGUF or Hugging Face
//! safetensors directories) into a reference decoder forward on the CPU, and hosts
//! the Multi-Head Latent Attention forms that `care-convert` produces.
//!
//! ```no_run
//! use mla_attention::{io::Checkpoint, model::Decoder};
//! let ckpt = Checkpoint::open("SmolLM2-135M-Instruct.Q4_1.gguf")?;
//! let model = Decoder::load(&ckpt)?;
//! let ids = mla_attention::io::tokenizer::encode(ckpt.tokenizer()?, "Hello")?;
//! let logits = model.forward(&ids, &mut model.new_cache())?; // (seq, vocab)
//! # Ok::<(), mla_attention::Error>(())
//! ```
//!
//! Modules:
//! - [`config`]: `config.json` mirror ([`config::HfConfig`]) and resolved [`config::ModelSpec`].
//! - [`io`]: validated GGUF and safetensors readers, GGUF → `tokenizer.json`.
//! - [`model`]: RMSNorm, SwiGLU, RoPE, the [`model::Attention`] trait, GQA attention, decoder.
//! - [`mla`]: the reference MLA attention (DeepSeek-V2 layout), its RoPE and loading.
//! - [`load`]: a checkpoint into a [`model::Decoder`] whatever its attention kind.
//! - [`cache`]: [`cache::LatentPagedCache`], the paged cache (MLA latents, or GQA `[K ; V]`
//!   rows) with per-layer widths.
//! - [`cpu`]: attention over the paged cache on the CPU: absorbed MLA decode
//!   ([`cpu::absorbed_decode`]) and paged GQA ([`cpu::paged_gqa_attention`]).
//! - [`runner`]: [`runner::PagedModel`], a decoder over the paged cache (original GQA,
//!   stock MLA, one-shot) on the CPU, and on CUDA with feature `cuda`.
//! - [`engine`]: [`engine::Engine`], the one scheduler: admission by free blocks,
//!   continuous batching, Infinigram drafting verified in one pass, stop rules.
//! - `cuda` (feature `cuda`): the paged cache in device memory and CUDA decode kernels.

pub mod cache;
pub mod config;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod engine;
pub mod error;
pub mod io;
pub mod load;
pub mod mla;
pub mod model;
pub mod runner;
mod simd;

pub use error::{Error, Result};
