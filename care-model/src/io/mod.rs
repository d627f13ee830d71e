//! Checkpoint loading. Whatever the file format, later stages see one
//! [`WeightSource`]: f32 CPU tensors under Hugging Face names, in Hugging Face layout
//! (`[out, in]` linear weights, rotate-half RoPE order in `q_proj`/`k_proj`).
//!
//! - [`gguf`]: validated GGUF reader; [`GgufWeights`] maps llama.cpp names to HF names
//!   and undoes the llama-arch Q/K row permutation.
//! - [`safetensors`]: HF directories (`config.json` + `*.safetensors`, mmapped).
//! - [`tokenizer`]: `tokenizer.json` rebuilt from GGUF metadata.

pub mod gguf;
mod gguf_weights;
pub mod safetensors;
pub mod tokenizer;

use std::path::{Path, PathBuf};

use candle_core::Tensor;

use crate::config::ModelSpec;
use crate::error::{Error, Result};

pub use gguf_weights::{permute_qk, spec_from_gguf, unpermute_qk, GgufWeights};
pub use safetensors::SafetensorsWeights;

/// The asset cache that `scripts/fetch_assets.py` fills: `$CARE_ASSETS`, else
/// `~/.cache/care-assets`. Tests, benches, examples and CLI defaults read from here.
pub fn asset_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("CARE_ASSETS") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("care-assets")
}

/// Tensors of a checkpoint by their Hugging Face name, dequantized to f32 on the CPU.
pub trait WeightSource: Send + Sync {
    /// The file or directory the weights come from (for error messages).
    fn path(&self) -> &Path;
    /// Whether a tensor of this name exists.
    fn contains(&self, name: &str) -> bool;
    /// The tensor as f32 in HF layout. Missing names are [`Error::MissingTensor`].
    fn tensor(&self, name: &str) -> Result<Tensor>;
}

/// Another [`WeightSource`] with every tensor moved to `device`, and cast to `dtype`
/// where one is given (a teacher or a runner's weights on a GPU, in bf16).
pub struct OnDevice<'a> {
    pub inner: &'a dyn WeightSource,
    pub device: candle_core::Device,
    pub dtype: Option<candle_core::DType>,
}

impl WeightSource for OnDevice<'_> {
    fn path(&self) -> &Path {
        self.inner.path()
    }

    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }

    fn tensor(&self, name: &str) -> Result<Tensor> {
        let t = self.inner.tensor(name)?.to_device(&self.device)?;
        Ok(match self.dtype {
            Some(d) => t.to_dtype(d)?,
            None => t,
        })
    }
}

/// Load `name` and check its shape, naming both in the error.
pub fn load_checked(src: &dyn WeightSource, name: &str, expected: &[usize]) -> Result<Tensor> {
    let t = src.tensor(name)?;
    if t.dims() != expected {
        return Err(Error::ShapeMismatch {
            path: src.path().to_path_buf(),
            tensor: name.to_string(),
            got: t.dims().to_vec(),
            expected: expected.to_vec(),
        });
    }
    Ok(t)
}

/// A loaded checkpoint: its resolved spec, its weights and (if available) its tokenizer.
pub struct Checkpoint {
    pub path: PathBuf,
    pub spec: ModelSpec,
    pub weights: Box<dyn WeightSource>,
    pub tokenizer: Option<tokenizers::Tokenizer>,
    /// Whether the tokenizer wants a BOS token prepended (GGUF `add_bos_token`).
    pub add_bos: bool,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("spec", &self.spec)
            .field("has_tokenizer", &self.tokenizer.is_some())
            .finish()
    }
}

impl Checkpoint {
    /// Open a `.gguf` file or an HF directory (`config.json` + safetensors
    /// [+ `tokenizer.json`]). The format is chosen by what `path` is.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if path.is_dir() {
            let (spec, weights) = SafetensorsWeights::open_dir(path)?;
            let tok_path = path.join("tokenizer.json");
            let tokenizer = if tok_path.exists() {
                Some(
                    tokenizers::Tokenizer::from_file(&tok_path)
                        .map_err(|e| Error::Tokenizer(format!("{}: {e}", tok_path.display())))?,
                )
            } else {
                None
            };
            Ok(Checkpoint {
                path: path.to_path_buf(),
                spec,
                weights: Box::new(weights),
                tokenizer,
                add_bos: false,
            })
        } else {
            let file = gguf::GgufFile::open(path)?;
            let spec = spec_from_gguf(&file)?;
            let tokenizer = tokenizer::from_gguf(&file)?;
            let add_bos = file
                .get("tokenizer.ggml.add_bos_token")
                .and_then(gguf::Value::as_bool)
                .unwrap_or(false);
            let weights = GgufWeights::new(file, &spec)?;
            Ok(Checkpoint {
                path: path.to_path_buf(),
                spec,
                weights: Box::new(weights),
                tokenizer: Some(tokenizer),
                add_bos,
            })
        }
    }

    /// The tokenizer, or an error saying the checkpoint has none.
    pub fn tokenizer(&self) -> Result<&tokenizers::Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            Error::Tokenizer(format!(
                "{} has no tokenizer.json (pass one explicitly)",
                self.path.display()
            ))
        })
    }
}
