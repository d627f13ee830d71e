//! # care-model
//!
//! The bottom of the runtime stack: real checkpoints (GGUF or Hugging Face safetensors
//! directories), their configuration, the GGUF → `tokenizer.json` rebuild, and the
//! reference decoder forward on the CPU (Llama / Qwen2 with GQA, or the one-shot low-rank
//! form). `mla-attention` adds the MLA layers, the paged cache, its kernels and the
//! engine on top; nothing here knows about them.
//!
//! ```no_run
//! use care_model::{io::Checkpoint, model::Decoder};
//! let ckpt = Checkpoint::open("SmolLM2-135M-Instruct.Q4_1.gguf")?;
//! let model = Decoder::load(&ckpt)?;
//! let ids = care_model::io::tokenizer::encode(ckpt.tokenizer()?, "Hello")?;
//! let logits = model.forward(&ids, &mut model.new_cache())?; // (seq, vocab)
//! # Ok::<(), care_model::Error>(())
//! ```
//!
//! Modules:
//! - [`config`]: `config.json` mirror ([`config::HfConfig`]) and resolved [`config::ModelSpec`]
//!   (with the DeepSeek-V2 MLA fields in [`config::mla`]).
//! - [`io`]: validated GGUF and safetensors readers, GGUF → `tokenizer.json`.
//! - [`model`]: RMSNorm, SwiGLU, RoPE, the [`model::Attention`] trait, GQA and low-rank
//!   attention, the decoder, and the few-row matmul its linear layers use.
//! - [`simd`]: the SIMD lanes (AVX-512, AVX2 + FMA, portable) shared by the CPU kernels.

pub mod config;
pub mod error;
pub mod io;
pub mod model;
pub mod simd;

pub use error::{Error, Result};
