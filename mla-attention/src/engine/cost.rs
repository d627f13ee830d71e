//! [`measure_step_cost`]: the calibrated policy's step-time model, timed on the loaded
//! model through the same passes the engine runs.

use std::time::Instant;

use infinigram_spec::spec::{StepCost, STEP_COST_ROWS};

use crate::error::{Error, Result};
use crate::runner::PagedModel;

/// Best of three passes of `segments` after `seqs`' cached context, in seconds (each pass
/// rolled back).
fn time_pass<M: PagedModel>(
    model: &mut M,
    seqs: &[crate::cache::SeqId],
    segments: &[Vec<u32>],
) -> Result<f64> {
    let starts: Vec<usize> = seqs
        .iter()
        .map(|&s| model.tokens(s))
        .collect::<Result<_>>()?;
    let segs: Vec<&[u32]> = segments.iter().map(Vec::as_slice).collect();
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        let logits = model.forward(seqs, &segs)?;
        logits.argmax(1)?.to_vec1::<u32>()?;
        best = best.min(t.elapsed().as_secs_f64());
        for (&s, &p) in seqs.iter().zip(&starts) {
            model.rollback(s, p)?;
        }
    }
    Ok(best)
}

/// [`StepCost`] of `model` after a 64-token context: a pass of one sequence with each of
/// [`STEP_COST_ROWS`] rows (capped at the model's segment limit), and of 4 sequences × 1
/// row against 1 × 4. Needs room for 4 sequences of 64 tokens plus a 64-row pass.
pub fn measure_step_cost<M: PagedModel>(model: &mut M) -> Result<StepCost> {
    let vocab = model.vocab_size() as u32;
    let ctx: Vec<u32> = (0..64u32).map(|i| (100 + i) % vocab.max(1)).collect();
    let probe = 200 % vocab.max(1);
    let mut seqs = Vec::new();
    let result = (|| {
        for _ in 0..4 {
            seqs.push(model.prefill(&ctx)?);
        }
        let max_rows = model.max_segment_rows();
        let mut passes = [0.0; STEP_COST_ROWS.len()];
        for (i, &rows) in STEP_COST_ROWS.iter().enumerate() {
            passes[i] = if rows <= max_rows {
                time_pass(model, &seqs[..1], &[vec![probe; rows]])?
            } else {
                f64::INFINITY
            };
        }
        // More rows never take less time; a noisy sample must not make the curve dip.
        for i in 1..passes.len() {
            passes[i] = passes[i].max(passes[i - 1]);
        }
        let t41 = time_pass(model, &seqs, &vec![vec![probe]; 4])?;
        let t14 = time_pass(model, &seqs[..1], &[vec![probe; 4]])?;
        if !passes[0].is_finite() || !t41.is_finite() {
            return Err(Error::InvalidInput(
                "could not time a pass of the model".into(),
            ));
        }
        let cost = StepCost {
            passes: passes.map(|x| x.clamp(1e-6, 1e6)),
            per_sequence: ((t41 - t14) / 3.0).max(0.0),
        };
        Ok(cost)
    })();
    for s in seqs {
        model.free(s)?;
    }
    result
}
