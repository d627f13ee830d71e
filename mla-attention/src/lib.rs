//! # mla-attention
//!
//! The serving half of the project: the Multi-Head Latent Attention forms that
//! `care-convert` produces, the paged KV cache (MLA latents or GQA `[K ; V]` rows), the
//! kernels over it on the CPU and CUDA, and the one engine that schedules requests and
//! verifies Infinigram drafts. Checkpoints, configs and the reference decoder come from
//! `care-model` (re-exported here as [`config`], [`io`], [`model`]).
//!
//! ```no_run
//! use mla_attention::{io::Checkpoint, load::load_decoder};
//! let ckpt = Checkpoint::open("SmolLM2-135M-Instruct.Q4_1.gguf")?;
//! let model = load_decoder(&ckpt)?; // GQA, one-shot low-rank or DeepSeek-V2 MLA
//! let ids = mla_attention::io::tokenizer::encode(ckpt.tokenizer()?, "Hello")?;
//! let logits = model.forward(&ids, &mut model.new_cache())?; // (seq, vocab)
//! # Ok::<(), mla_attention::Error>(())
//! ```
//!
//! Modules:
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
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod engine;
pub mod load;
pub mod mla;
pub mod runner;

use care_model::simd;
pub use care_model::{config, error, io, model, Error, Result};
