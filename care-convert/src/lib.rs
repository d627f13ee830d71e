//! # care-convert
//!
//! Conversion of Grouped-Query-Attention models into Multi-Head Latent Attention
//! (CARE: covariance-aware, rank-adaptive), and the evaluation harness that judges
//! every conversion on real text and real benchmarks.
//!
//! The data path reads in one direction: load (`mla_attention::io`) → calibrate →
//! factorize → allocate ranks → assemble ([`convert`] one-shot, [`stock`] DeepSeek-V2 MLA)
//! → export → evaluate ([`eval`]). [`heal`] then fine-tunes an exported checkpoint against
//! the original (distillation) and writes it back in the same format.
//!
//! ```no_run
//! use care_convert::eval::perplexity::{perplexity, PerplexityOptions};
//! use mla_attention::{io::{tokenizer::encode, Checkpoint}, model::Decoder};
//! let ckpt = Checkpoint::open("model.gguf")?;
//! let model = mla_attention::load::load_decoder(&ckpt)?;
//! let ids = encode(ckpt.tokenizer()?, &std::fs::read_to_string("speech.txt").unwrap())?;
//! let r = perplexity(&model, &ids[..512], &PerplexityOptions::default(), &mut |_, _| {})?;
//! println!("PPL {:.2}", r.ppl);
//! # Ok::<(), care_convert::Error>(())
//! ```

pub mod calibrate;
pub mod compare;
pub mod convert;
pub mod error;
pub mod eval;
pub mod export;
pub mod factorize;
pub mod heal;
pub mod jobs;
mod png_plot;
pub mod ranks;
pub mod rng;
pub mod stock;

pub use error::{Error, Result};
