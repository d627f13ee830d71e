//! The reference decoder and its replaceable attention.

pub mod attention;
pub mod decoder;
pub mod few_rows;
pub mod lowrank;
pub mod rope;

pub use attention::{Attention, AttnInput, GqaAttention, LayerCache};
pub use decoder::{Decoder, DecoderCache, DecoderLayer, ForwardObserver, Mlp, RmsNorm};
pub use lowrank::{LatentFactors, LatentKv, LowRankKvAttention};
pub use rope::Rope;
