//! The student's weights as trainable candle `Var`s plus frozen tensors, and the
//! [`WeightSource`] views that build a [`Decoder`] over them.
//!
//! The decoder is rebuilt from the current values for every optimizer step (building is
//! cheap next to a forward pass), so no layer can hold a stale copy of a parameter.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{Error, Result};
use mla_attention::config::ModelSpec;
use mla_attention::io::safetensors::SafetensorsWeights;
use mla_attention::io::WeightSource;
use mla_attention::model::Decoder;

/// Which student tensors train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainScope {
    /// The attention projections (everything under `self_attn.` that is a 2-D weight:
    /// q / q_a / q_b, kv_a_proj_with_mqa, kv_b_proj, o_proj, or the one-shot latent
    /// factors). Norms, biases (they hold the exact-fold anchors) and the rest stay.
    Attention,
    /// Every tensor of the checkpoint.
    All,
}

impl TrainScope {
    pub fn trains(self, name: &str, dims: &[usize]) -> bool {
        match self {
            TrainScope::All => true,
            TrainScope::Attention => {
                name.contains(".self_attn.") && name.ends_with(".weight") && dims.len() == 2
            }
        }
    }
}

/// A student checkpoint opened for training.
pub struct StudentParams {
    pub dir: PathBuf,
    pub spec: ModelSpec,
    /// Sorted by name; the optimizer and checkpoints use this order.
    pub trainable: Vec<(String, Var)>,
    pub frozen: BTreeMap<String, Tensor>,
}

impl StudentParams {
    /// Open a safetensors checkpoint directory (as `care-convert mla` / `convert` write
    /// them) and move every tensor to `device` as f32.
    pub fn open(dir: &Path, scope: TrainScope, device: &Device) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::InvalidOption(format!(
                "the student must be a converted checkpoint directory (config.json + \
                 safetensors), got {}",
                dir.display()
            )));
        }
        let (spec, weights) = SafetensorsWeights::open_dir(dir)?;
        let mut trainable = Vec::new();
        let mut frozen = BTreeMap::new();
        for name in weights.names().map(str::to_string).collect::<Vec<_>>() {
            let t = weights.tensor(&name)?.to_device(device)?;
            if scope.trains(&name, t.dims()) {
                trainable.push((name, Var::from_tensor(&t)?));
            } else {
                frozen.insert(name, t);
            }
        }
        if trainable.is_empty() {
            return Err(Error::InvalidOption(format!(
                "{}: no tensor matches the training scope {scope:?}",
                dir.display()
            )));
        }
        Ok(StudentParams {
            dir: dir.to_path_buf(),
            spec,
            trainable,
            frozen,
        })
    }

    /// The device the trainable values live on.
    pub fn device(&self) -> Device {
        self.trainable
            .first()
            .map_or(Device::Cpu, |(_, v)| v.device().clone())
    }

    /// Number of trainable values.
    pub fn trainable_count(&self) -> usize {
        self.trainable
            .iter()
            .map(|(_, v)| v.as_tensor().elem_count())
            .sum()
    }

    /// A decoder whose trainable weights are the `Var`s themselves (gradients reach them).
    pub fn decoder(&self) -> Result<Decoder> {
        Ok(mla_attention::load::load_decoder_weights(
            &self.spec,
            &self.view(false),
        )?)
    }

    /// A decoder over detached copies (evaluation: records no graph).
    pub fn decoder_detached(&self) -> Result<Decoder> {
        Ok(mla_attention::load::load_decoder_weights(
            &self.spec,
            &self.view(true),
        )?)
    }

    fn view(&self, detached: bool) -> MapWeights {
        let mut map: HashMap<String, Tensor> = self
            .frozen
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (n, v) in &self.trainable {
            let t = if detached {
                v.as_tensor().detach()
            } else {
                v.as_tensor().clone()
            };
            map.insert(n.clone(), t);
        }
        MapWeights {
            path: self.dir.clone(),
            map,
        }
    }

    /// Every tensor (current values) in `dtype` on the CPU, for export.
    pub fn all_tensors(&self, dtype: DType) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (n, t) in self.frozen.iter().map(|(n, t)| (n, t.clone())).chain(
            self.trainable
                .iter()
                .map(|(n, v)| (n, v.as_tensor().detach())),
        ) {
            out.insert(n.clone(), t.to_device(&Device::Cpu)?.to_dtype(dtype)?);
        }
        Ok(out)
    }

    /// A snapshot of the trainable values in f32 on the CPU (exact resume). A copy: on the
    /// CPU a moved tensor would share the `Var`'s storage and follow later updates.
    pub fn trainable_tensors(&self) -> Result<HashMap<String, Tensor>> {
        self.trainable
            .iter()
            .map(|(n, v)| {
                Ok((
                    n.clone(),
                    v.as_tensor().detach().to_device(&Device::Cpu)?.copy()?,
                ))
            })
            .collect()
    }

    /// Overwrite the trainable values from a checkpoint written by
    /// [`Self::trainable_tensors`].
    pub fn restore(&self, saved: &HashMap<String, Tensor>) -> Result<()> {
        for (n, v) in &self.trainable {
            let t = saved.get(n).ok_or_else(|| {
                Error::InvalidOption(format!("the healing checkpoint has no parameter {n}"))
            })?;
            if t.dims() != v.dims() {
                return Err(Error::InvalidOption(format!(
                    "healing checkpoint parameter {n} has shape {:?}, the student {:?}",
                    t.dims(),
                    v.dims()
                )));
            }
            v.set(&t.to_dtype(DType::F32)?.to_device(v.device())?)?;
        }
        Ok(())
    }
}

/// Named tensors as a [`WeightSource`].
pub struct MapWeights {
    pub path: PathBuf,
    pub map: HashMap<String, Tensor>,
}

impl WeightSource for MapWeights {
    fn path(&self) -> &Path {
        &self.path
    }

    fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    fn tensor(&self, name: &str) -> mla_attention::Result<Tensor> {
        self.map
            .get(name)
            .cloned()
            .ok_or_else(|| mla_attention::Error::MissingTensor {
                path: self.path.clone(),
                tensor: name.to_string(),
            })
    }
}
