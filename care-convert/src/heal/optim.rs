//! AdamW (decoupled weight decay, Loshchilov & Hutter) over candle `Var`s, the learning
//! rate schedule (linear warmup, cosine decay to a floor) and global-norm clipping.
//! The moments live in `Var`s so a checkpoint can save and restore them exactly and an
//! update can overwrite them in place.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{Error, Result};

/// AdamW hyper-parameters (the learning rate comes from [`lr_at`] per step).
#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// AdamW state for a fixed, named list of parameters.
///
/// The moments are allocated once and overwritten in place by every update (as the
/// parameters are, by `Var::set`), so no tensor allocated during an update outlives it.
/// Fresh moment tensors per update (freed one update later) left the CPU heap flat, but on
/// CUDA, where cudarc allocates from the driver's stream-ordered pool, these long-lived
/// blocks (2 × the trainable bytes, placed each update among the freed activations of the
/// backward pass) are the likely cause of the ~0.5 GB per update growth to OOM seen while
/// healing Qwen2.5-0.5B: a live block keeps its pool chunk mapped.
#[derive(Debug)]
pub struct AdamW {
    pub config: AdamWConfig,
    /// Updates taken so far (the bias correction's `t`).
    pub step: u64,
    names: Vec<String>,
    m: Vec<Var>,
    v: Vec<Var>,
}

impl AdamW {
    pub fn new(config: AdamWConfig, params: &[(String, Var)]) -> Result<Self> {
        let zeros = |v: &Var| Var::zeros(v.shape(), v.dtype(), v.device());
        Ok(AdamW {
            config,
            step: 0,
            names: params.iter().map(|(n, _)| n.clone()).collect(),
            m: params
                .iter()
                .map(|(_, v)| zeros(v))
                .collect::<candle_core::Result<_>>()?,
            v: params
                .iter()
                .map(|(_, v)| zeros(v))
                .collect::<candle_core::Result<_>>()?,
        })
    }

    /// One update of every parameter with its gradient (same order as at construction).
    pub fn update(&mut self, params: &[(String, Var)], grads: &[Tensor], lr: f64) -> Result<()> {
        if params.len() != self.m.len() || grads.len() != self.m.len() {
            return Err(Error::InvalidOption(format!(
                "optimizer holds {} parameters, got {} parameters and {} gradients",
                self.m.len(),
                params.len(),
                grads.len()
            )));
        }
        self.step += 1;
        let c = self.config;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for (i, ((_, p), g)) in params.iter().zip(grads).enumerate() {
            // Detached reads: the update itself must not be recorded for autograd.
            let (m_var, v_var) = (&self.m[i], &self.v[i]);
            let m = ((m_var.as_tensor().detach() * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((v_var.as_tensor().detach() * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let m_hat = (&m / bc1)?;
            let v_hat = (&v / bc2)?;
            let adam = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            let decayed = (p.as_tensor().detach() * (1.0 - lr * c.weight_decay))?;
            // In place (see the type's doc): the new values are temporaries of this update.
            p.set(&(decayed - (adam * lr)?)?)?;
            m_var.set(&m)?;
            v_var.set(&v)?;
        }
        Ok(())
    }

    /// A snapshot of the moments as named tensors (`m.<name>`, `v.<name>`) on the CPU for a
    /// checkpoint. A copy: the next update overwrites the moments in place, and on the CPU a
    /// moved tensor would share their storage.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let snapshot = |v: &Var| v.as_tensor().detach().to_device(&Device::Cpu)?.copy();
        let mut out = HashMap::new();
        for (i, n) in self.names.iter().enumerate() {
            out.insert(format!("m.{n}"), snapshot(&self.m[i])?);
            out.insert(format!("v.{n}"), snapshot(&self.v[i])?);
        }
        Ok(out)
    }

    /// Restore moments saved by [`Self::state_tensors`] after `step` updates.
    pub fn restore(&mut self, step: u64, saved: &HashMap<String, Tensor>) -> Result<()> {
        for (i, n) in self.names.iter().enumerate() {
            for (slot, kind) in [(&self.m[i], "m"), (&self.v[i], "v")] {
                let key = format!("{kind}.{n}");
                let t = saved.get(&key).ok_or_else(|| {
                    Error::InvalidOption(format!(
                        "the optimizer checkpoint has no {key} (trained with other parameters?)"
                    ))
                })?;
                if t.dims() != slot.dims() {
                    return Err(Error::InvalidOption(format!(
                        "optimizer checkpoint {key} has shape {:?}, parameter has {:?}",
                        t.dims(),
                        slot.dims()
                    )));
                }
                slot.set(&t.to_dtype(DType::F32)?.to_device(slot.device())?)?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Learning rate at update `step` (0-based) of `total`: linear warmup over `warmup` steps
/// to `peak`, then cosine decay to `peak·floor` at the last step.
pub fn lr_at(step: u64, total: u64, warmup: u64, peak: f64, floor: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / span as f64).min(1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    peak * (floor + (1.0 - floor) * cosine)
}

/// Scale `grads` in place so their global L2 norm is at most `max_norm` (≤ 0: no clip).
/// Returns the norm before clipping; a non-finite norm is an error (nothing updated).
pub fn clip_global_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut sq = 0.0f64;
    for g in grads.iter() {
        sq += g
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
    }
    let norm = sq.sqrt();
    if !norm.is_finite() {
        return Err(Error::NonFinite("the gradients".into()));
    }
    if max_norm > 0.0 && norm > max_norm {
        let s = max_norm / norm;
        for g in grads.iter_mut() {
            *g = (&*g * s)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let lr = |s| lr_at(s, 100, 10, 1e-3, 0.1);
        assert!((lr(0) - 1e-4).abs() < 1e-12);
        assert!((lr(9) - 1e-3).abs() < 1e-12);
        assert!((lr(10) - 1e-3).abs() < 1e-12);
        assert!((lr(55) - 0.55e-3).abs() < 1e-9);
        assert!((lr(100) - 1e-4).abs() < 1e-12);
        assert!((1..100).all(|s| lr(s + 10) <= lr(s + 9) + 1e-15));
    }

    #[test]
    fn adamw_first_step_moves_each_weight_by_lr_times_sign_and_minimizes_a_quadratic() {
        let p =
            Var::from_tensor(&Tensor::new(&[1.0f32, -2.0, 3.0], &Device::Cpu).unwrap()).unwrap();
        let params = vec![("w".to_string(), p.clone())];
        let cfg = AdamWConfig {
            weight_decay: 0.0,
            ..Default::default()
        };
        let mut opt = AdamW::new(cfg, &params).unwrap();
        // Gradient of ½‖w‖² is w: the first Adam step is lr·sign(g).
        let g = p.as_tensor().clone();
        opt.update(&params, &[g], 0.1).unwrap();
        let w = p.as_tensor().to_vec1::<f32>().unwrap();
        for (a, b) in w.iter().zip([0.9f32, -1.9, 2.9]) {
            assert!((a - b).abs() < 1e-5, "{w:?}");
        }
        for s in 0..300 {
            let g = p.as_tensor().clone();
            opt.update(&params, &[g], lr_at(s, 300, 0, 0.1, 0.0))
                .unwrap();
        }
        let w = p.as_tensor().to_vec1::<f32>().unwrap();
        assert!(w.iter().all(|x| x.abs() < 0.05), "{w:?}");
    }

    #[test]
    fn clipping_scales_to_the_max_norm_and_rejects_nan() {
        let mut g = vec![Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap()];
        let n = clip_global_norm(&mut g, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-9);
        let v = g[0].to_vec1::<f32>().unwrap();
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
        let mut bad = vec![Tensor::new(&[f32::NAN], &Device::Cpu).unwrap()];
        assert!(clip_global_norm(&mut bad, 1.0).is_err());
    }
}
