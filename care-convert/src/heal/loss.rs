//! The healing loss: `L = CE(student, next token) + β·τ²·KL(p_T^τ ‖ p_S^τ)`, with
//! `p^τ = softmax(z/τ)` (Hinton et al.'s τ² keeps the KD gradient's scale independent of
//! τ). Both terms are means over positions.

use candle_core::{Tensor, D};

use crate::error::{Error, Result};

/// The loss as a differentiable scalar plus its parts as numbers for the log.
#[derive(Debug)]
pub struct DistillLoss {
    /// `ce + β·τ²·kd`, a 0-dim tensor that tracks gradients.
    pub total: Tensor,
    pub ce: f64,
    pub kd: f64,
}

/// `log softmax` over the last dim; the max shift is a constant for the gradient.
pub fn log_softmax(z: &Tensor) -> Result<Tensor> {
    let max = z.max_keepdim(D::Minus1)?.detach();
    let shifted = z.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// Summed negative log-likelihood of `targets` `(n,)` under `logits` `(n, vocab)`.
pub fn nll_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let picked = log_softmax(logits)?.gather(&targets.unsqueeze(1)?, 1)?;
    Ok(picked.sum_all()?.neg()?)
}

/// Loss of `student` logits `(n, vocab)` against `teacher` logits `(n, vocab)` (treated as
/// constants) and next-token `targets` `(n,)` u32.
pub fn distill_loss(
    student: &Tensor,
    teacher: &Tensor,
    targets: &Tensor,
    beta: f64,
    tau: f64,
) -> Result<DistillLoss> {
    if student.dims() != teacher.dims() {
        return Err(Error::InvalidOption(format!(
            "student logits {:?} and teacher logits {:?} differ in shape (same vocabulary?)",
            student.dims(),
            teacher.dims()
        )));
    }
    if !(tau > 0.0 && tau.is_finite() && beta >= 0.0 && beta.is_finite()) {
        return Err(Error::InvalidOption(format!(
            "KD temperature must be > 0 and weight ≥ 0 (got τ = {tau}, β = {beta})"
        )));
    }
    let n = student.dim(0)?;
    let ce = (nll_sum(student, targets)? / n as f64)?;
    let (total, kd) = if beta > 0.0 {
        let logp_s = log_softmax(&(student / tau)?)?;
        let logp_t = log_softmax(&(teacher.detach() / tau)?)?;
        let p_t = logp_t.exp()?;
        let kd = ((p_t * (logp_t - logp_s)?)?.sum_all()? / n as f64)?;
        let total = (&ce + (&kd * (beta * tau * tau))?)?;
        (
            total,
            kd.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?,
        )
    } else {
        (ce.clone(), 0.0)
    };
    let ce_v = ce.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    if !ce_v.is_finite() || !kd.is_finite() {
        return Err(Error::NonFinite(format!(
            "the healing loss (CE {ce_v}, KD {kd})"
        )));
    }
    Ok(DistillLoss {
        total,
        ce: ce_v,
        kd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32], shape: (usize, usize)) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn ce_matches_a_hand_computation_and_kd_vanishes_for_equal_logits() {
        let z = t(&[1.0, 2.0, 0.5, -1.0, 0.0, 3.0], (2, 3));
        let targets = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
        let l = distill_loss(&z, &z, &targets, 1.0, 2.0).unwrap();
        let lse = |v: &[f64]| v.iter().map(|x| x.exp()).sum::<f64>().ln();
        let want = ((lse(&[1.0, 2.0, 0.5]) - 2.0) + (lse(&[-1.0, 0.0, 3.0]) - 3.0)) / 2.0;
        assert!((l.ce - want).abs() < 1e-6, "{} vs {want}", l.ce);
        assert_eq!(l.kd, 0.0);
        let total = l.total.to_scalar::<f32>().unwrap() as f64;
        assert!((total - want).abs() < 1e-6);
    }

    #[test]
    fn kd_is_the_tempered_kl_times_tau_squared() {
        let s = t(&[0.0, 1.0, 2.0], (1, 3));
        let te = t(&[2.0, 1.0, 0.0], (1, 3));
        let targets = Tensor::new(&[0u32], &Device::Cpu).unwrap();
        let tau = 2.0;
        let l = distill_loss(&s, &te, &targets, 0.5, tau).unwrap();
        let soft = |v: [f64; 3]| {
            let e: Vec<f64> = v.iter().map(|x| (x / tau).exp()).collect();
            let z: f64 = e.iter().sum();
            e.into_iter().map(|x| x / z).collect::<Vec<_>>()
        };
        let (ps, pt) = (soft([0.0, 1.0, 2.0]), soft([2.0, 1.0, 0.0]));
        let kl: f64 = (0..3).map(|i| pt[i] * (pt[i] / ps[i]).ln()).sum();
        assert!((l.kd - kl).abs() < 1e-6, "{} vs {kl}", l.kd);
        let total = l.total.to_scalar::<f32>().unwrap() as f64;
        assert!((total - (l.ce + 0.5 * tau * tau * kl)).abs() < 1e-5);
    }

    #[test]
    fn bad_shapes_temperatures_and_nan_logits_are_errors() {
        let z = t(&[0.0, 1.0], (1, 2));
        let targets = Tensor::new(&[0u32], &Device::Cpu).unwrap();
        let other = t(&[0.0, 1.0, 2.0], (1, 3));
        assert!(distill_loss(&z, &other, &targets, 1.0, 1.0).is_err());
        assert!(distill_loss(&z, &z, &targets, 1.0, 0.0).is_err());
        let nan = t(&[f32::NAN, 1.0], (1, 2));
        let e = distill_loss(&nan, &z, &targets, 1.0, 1.0).unwrap_err();
        assert!(e.to_string().contains("non-finite"), "{e}");
    }
}
