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
//! - [`runner`]: continuous-batching greedy generation over the paged latent cache (CPU,
//!   and CUDA with feature `cuda`).
//! - [`cache`]: [`cache::LatentPagedCache`], the paged MLA latent cache.
//! - [`cpu`]: absorbed MLA decode over the paged cache ([`cpu::absorbed_decode`]).
//! - `cuda` (feature `cuda`): the paged cache in device memory and CUDA decode kernels.

pub mod cache;
pub mod config;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod io;
pub mod mla;
pub mod model;
pub mod runner;

pub use error::{Error, Result};
