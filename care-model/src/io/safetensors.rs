//! Hugging Face checkpoint directories: `config.json` plus one `model.safetensors`, or
//! shards listed in `model.safetensors.index.json`. Files are memory-mapped; bf16/f16
//! tensors are converted to f32 when loaded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use super::WeightSource;
use crate::config::{HfConfig, ModelSpec};
use crate::error::{Error, Result};

/// Memory-mapped safetensors shards with a name → shard routing table.
pub struct SafetensorsWeights {
    dir: PathBuf,
    shards: Vec<(PathBuf, MmapedSafetensors)>,
    route: BTreeMap<String, usize>,
}

impl SafetensorsWeights {
    /// Open `dir/config.json` and the safetensors files it ships with.
    pub fn open_dir(dir: &Path) -> Result<(ModelSpec, Self)> {
        let cfg_path = dir.join("config.json");
        let spec = HfConfig::from_file(&cfg_path)?.into_spec(&cfg_path)?;
        let weights = Self::open_files(dir, &shard_files(dir)?)?;
        Ok((spec, weights))
    }

    /// Open the given safetensors files; `dir` names the checkpoint in errors.
    pub fn open_files(dir: &Path, files: &[PathBuf]) -> Result<Self> {
        let mut shards = Vec::with_capacity(files.len());
        let mut route = BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            // SAFETY: read-only map; the checkpoint must not change while it is open
            // (documented on `Checkpoint::open`). safetensors validates the header
            // (lengths, offsets, dtypes) against the file size before any access.
            let st = unsafe { MmapedSafetensors::new(f) }
                .map_err(|e| Error::malformed(f, "safetensors", e.to_string()))?;
            for (name, _) in st.tensors() {
                route.insert(name, i);
            }
            shards.push((f.clone(), st));
        }
        Ok(SafetensorsWeights {
            dir: dir.to_path_buf(),
            shards,
            route,
        })
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.route.keys().map(String::as_str)
    }
}

/// The safetensors files of a directory: from the index if there is one, else
/// `model.safetensors`, else every `*.safetensors` file.
fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::malformed(&index, "safetensors index", e.to_string()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| {
                Error::malformed(&index, "safetensors index", "no `weight_map` object")
            })?;
        let mut files: Vec<String> = Vec::new();
        for (tensor, f) in map {
            let f = f.as_str().ok_or_else(|| {
                Error::malformed(
                    &index,
                    "safetensors index",
                    format!("weight_map[`{tensor}`] is not a file name"),
                )
            })?;
            if f.contains('/') || f.contains("..") {
                return Err(Error::malformed(
                    &index,
                    "safetensors index",
                    format!("weight_map[`{tensor}`] = `{f}` leaves the directory"),
                ));
            }
            if !files.iter().any(|x| x == f) {
                files.push(f.to_string());
            }
        }
        files.sort();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::MissingTensor {
            path: dir.to_path_buf(),
            tensor: "(no *.safetensors file in the directory)".into(),
        });
    }
    Ok(files)
}

impl WeightSource for SafetensorsWeights {
    fn path(&self) -> &Path {
        &self.dir
    }

    fn contains(&self, name: &str) -> bool {
        self.route.contains_key(name)
    }

    fn tensor(&self, name: &str) -> Result<Tensor> {
        let &i = self.route.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.dir.clone(),
            tensor: name.to_string(),
        })?;
        let (file, st) = &self.shards[i];
        let t = st
            .load(name, &Device::Cpu)
            .map_err(|e| Error::malformed(file, "safetensors", format!("tensor `{name}`: {e}")))?;
        match t.dtype() {
            DType::F32 | DType::F16 | DType::BF16 | DType::F64 => Ok(t.to_dtype(DType::F32)?),
            other => Err(Error::UnsupportedDType {
                path: file.clone(),
                tensor: name.to_string(),
                dtype: format!("{other:?}"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_and_garbage_files_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tensor::arange(0f32, 12., &Device::Cpu)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        let p = dir.path().join("model.safetensors");
        candle_core::safetensors::save(
            &BTreeMap::from([("w".to_string(), t)]).into_iter().collect(),
            &p,
        )
        .unwrap();
        let full = std::fs::read(&p).unwrap();
        let ok = SafetensorsWeights::open_files(dir.path(), std::slice::from_ref(&p)).unwrap();
        assert_eq!(ok.tensor("w").unwrap().dims(), &[3, 4]);
        let err = ok.tensor("v").unwrap_err().to_string();
        assert!(err.contains("missing tensor `v`"), "{err}");
        for cut in [0, 5, 8, 20, full.len() - 1] {
            std::fs::write(&p, &full[..cut]).unwrap();
            let err = SafetensorsWeights::open_files(dir.path(), std::slice::from_ref(&p))
                .err()
                .unwrap_or_else(|| panic!("cut at {cut} accepted"));
            assert!(err.to_string().contains("model.safetensors"), "{err}");
        }
    }

    #[test]
    fn index_that_escapes_the_directory_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            r#"{"weight_map": {"w": "../etc/passwd"}}"#,
        )
        .unwrap();
        let err = shard_files(dir.path()).unwrap_err().to_string();
        assert!(err.contains("leaves the directory"), "{err}");
        std::fs::write(dir.path().join("model.safetensors.index.json"), "{not json").unwrap();
        let err = shard_files(dir.path()).unwrap_err().to_string();
        assert!(err.contains("malformed safetensors index"), "{err}");
    }
}
