//! CPU kernels over the paged latent cache ([`crate::cache`]).
//!
//! - [`decode`]: [`absorbed_decode`], split-KV online-softmax attention in latent
//!   space for a batch of sequences of different lengths, rayon over
//!   (sequence, head group, split).
//! - `attend`: the one split-KV attention both read the paged rows with.
//! - [`absorb`]: [`LatentProjections`], `q̃ = W_UKᵀ q_nope` and `o = W_UV õ` per head.
//! - [`gqa`]: [`PagedGqaLayer`], an original GQA layer over paged `[K ; V]` rows.
//! - [`layer`]: [`PagedMlaLayer`], a whole decode step of an
//!   [`MlaAttention`](crate::mla::MlaAttention) layer from the paged cache.

pub mod absorb;
mod attend;
pub mod decode;
pub mod gqa;
pub mod layer;

#[cfg(test)]
mod tests;

pub use absorb::LatentProjections;
pub use decode::{absorbed_decode, absorbed_decode_into, DecodeParams, DecodeQuery};
pub use gqa::{paged_gqa_attention, GqaShape, PagedGqaLayer};
pub use layer::PagedMlaLayer;
