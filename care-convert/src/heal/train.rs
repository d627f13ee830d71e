//! The healing loop: teacher logits on the fly, student forward and backward, gradient
//! accumulation, clipping, AdamW with warmup + cosine, held-out perplexity every N steps,
//! atomic resumable checkpoints.
//!
//! Determinism: the rows of update `s` are a pure function of `(seed, s)` (a seeded
//! permutation per epoch), and the checkpoint holds the f32 parameters and both Adam
//! moments, so an interrupted run resumed from a checkpoint continues with exactly the
//! numbers the uninterrupted run computes.
//!
//! Data parallelism ([`Healer::with_replicas`]): further copies of the teacher and the
//! student on other devices each take a contiguous block of an update's micro-batches
//! (one worker thread per device); their gradients are summed in device order on the
//! first device, which takes the one AdamW step, and the new weights are copied back.
//! The rows, the global batch and the schedule are those of the one-device run, so the
//! numbers agree up to the rounding of the summation order, and a checkpoint does not
//! depend on the device count (a run may resume on another).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::data::PackedCorpus;
use super::loss::{distill_loss, nll_sum};
use super::optim::{clip_global_norm, lr_at, AdamW, AdamWConfig};
use super::student::{StudentParams, TrainScope};
use crate::error::{Error, Result};
use crate::rng::SplitMix64;
use mla_attention::model::Decoder;

/// Everything that shapes the run. Two runs with equal options, data and models compute
/// the same numbers; a resume refuses a checkpoint written under other options.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HealOptions {
    /// Sequences per forward pass.
    pub micro_batch: usize,
    /// Forward passes per update.
    pub grad_accum: usize,
    /// Training tokens (targets) to consume; the number of updates follows.
    pub tokens: u64,
    pub lr: f64,
    /// The cosine ends at `lr · min_lr_ratio`.
    pub min_lr_ratio: f64,
    /// Fraction of the updates spent warming up linearly.
    pub warmup_ratio: f64,
    /// KD weight β and temperature τ.
    pub beta: f64,
    pub tau: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    /// Global gradient-norm clip (≤ 0: off).
    pub clip: f64,
    pub scope: TrainScope,
    /// Held-out perplexity every N updates (0: only at the start and the end).
    pub eval_every: u64,
    /// Held-out rows used by that evaluation.
    pub eval_sequences: usize,
    /// Checkpoint every N updates (0: only at the end).
    pub save_every: u64,
    pub seed: u64,
}

impl HealOptions {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidOption(m));
        if self.micro_batch == 0 || self.grad_accum == 0 {
            return bad("--batch and --grad-accum must be at least 1".into());
        }
        if self.tokens == 0 {
            return bad("--tokens must be positive".into());
        }
        if !(self.lr > 0.0 && self.lr < 1.0) {
            return bad(format!("--lr {} is outside (0, 1)", self.lr));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) || !(0.0..1.0).contains(&self.warmup_ratio) {
            return bad(format!(
                "--min-lr-ratio {} must lie in [0, 1] and --warmup {} in [0, 1)",
                self.min_lr_ratio, self.warmup_ratio
            ));
        }
        let all_ok = self.tau > 0.0 && self.beta >= 0.0 && self.weight_decay >= 0.0;
        if !all_ok {
            return bad(format!(
                "--tau {} must be > 0, --beta {} and --weight-decay {} ≥ 0",
                self.tau, self.beta, self.weight_decay
            ));
        }
        if !(0.0..1.0).contains(&self.adam_beta1) || !(0.0..1.0).contains(&self.adam_beta2) {
            return bad("Adam betas must lie in [0, 1)".into());
        }
        if self.eval_sequences == 0 {
            return bad("--eval-sequences must be at least 1".into());
        }
        Ok(())
    }
}

/// One logged update.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepRecord {
    /// Updates completed (1-based); 0 is the evaluation before training.
    pub step: u64,
    pub tokens: u64,
    pub lr: f64,
    /// NaN (JSON `null`) for the evaluation-only record of step 0.
    #[serde(deserialize_with = "nan_if_null")]
    pub loss: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub ce: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub kd: f64,
    pub grad_norm: f64,
    /// Held-out perplexity after this update, where evaluated.
    pub heldout_ppl: Option<f64>,
    /// Wall seconds of this update (not part of the determinism contract).
    pub secs: f64,
    /// Data-parallel runs only: wall seconds of this update spent moving gradients to
    /// the first device, summing them and copying the new weights back (the part of
    /// `secs` that one device does not spend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_secs: Option<f64>,
}

/// serde_json writes NaN as `null`; read it back as NaN.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// What a checkpoint's `state.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HealState {
    pub options: HealOptions,
    pub seq_len: usize,
    pub corpus_tokenizer: String,
    /// Training rows and sources of the corpus: a resume must see the same data.
    #[serde(default)]
    pub corpus_rows: usize,
    #[serde(default)]
    pub corpus_sources: Vec<String>,
    pub step: u64,
    pub total_steps: u64,
    pub records: Vec<StepRecord>,
}

/// Where a run ended.
#[derive(Debug, Clone, Serialize)]
pub struct HealOutcome {
    pub steps_done: u64,
    pub total_steps: u64,
    pub finished: bool,
    pub resumed_from: Option<u64>,
    pub records: Vec<StepRecord>,
}

/// Another copy of the teacher and the student, on another device, for data parallelism
/// ([`Healer::with_replicas`]). Its student's trainable values are overwritten with the
/// first device's when it joins and after every update.
pub struct Replica<'a> {
    pub teacher: &'a Decoder,
    pub student: StudentParams,
}

/// How gradients and weights travel between the replicas' devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaCopy {
    /// `Tensor::to_device` straight to the other device (on CUDA a device-to-device copy
    /// on the destination's stream, with both devices synchronized around it).
    Direct,
    /// Through host memory: to the CPU, then to the destination.
    Host,
}

/// A healing run over one teacher, one student and one packed corpus. `state_dir` holds
/// the checkpoints (`step-NNNNNNNN/`); it is created if missing.
pub struct Healer<'a> {
    teacher: &'a Decoder,
    pub student: StudentParams,
    corpus: &'a PackedCorpus,
    opts: HealOptions,
    optimizer: AdamW,
    state: HealState,
    state_dir: PathBuf,
    device: Device,
    resumed_from: Option<u64>,
    /// The epoch whose permutation `order` holds.
    order_epoch: Option<u64>,
    order: Vec<usize>,
    /// Stop (with a checkpoint) before this instant: time-boxed runs resume later.
    deadline: Option<Instant>,
    /// Data parallelism: the replicas on the other devices (empty: one device).
    replicas: Vec<Replica<'a>>,
    copy: ReplicaCopy,
    /// Whether the replicas' gradients enter the sum (always, except in the test that
    /// shows the data-parallel test can fail).
    sum_replicas: bool,
}

impl<'a> Healer<'a> {
    /// Check that models and corpus fit together; resume from the newest checkpoint in
    /// `state_dir` if `resume` (refusing one written under other options).
    pub fn new(
        teacher: &'a Decoder,
        student: StudentParams,
        corpus: &'a PackedCorpus,
        opts: HealOptions,
        state_dir: &Path,
        resume: bool,
    ) -> Result<Self> {
        opts.validate()?;
        let (tv, sv) = (teacher.spec.vocab_size, student.spec.vocab_size);
        if tv != sv {
            return Err(Error::InvalidOption(format!(
                "teacher vocabulary {tv} ≠ student vocabulary {sv}: not the same model family"
            )));
        }
        if corpus.train.is_empty() || corpus.heldout.is_empty() {
            return Err(Error::InvalidOption(
                "the corpus needs training and held-out rows".into(),
            ));
        }
        if let Some(&bad) = corpus
            .train
            .iter()
            .chain(&corpus.heldout)
            .flatten()
            .find(|&&t| t as usize >= sv)
        {
            return Err(Error::InvalidOption(format!(
                "the corpus holds token id {bad}, outside the model's vocabulary ({sv}): \
                 packed with another tokenizer?"
            )));
        }
        let seq_len = corpus.info.seq_len;
        let per_step = (seq_len * opts.micro_batch * opts.grad_accum) as u64;
        let total_steps = opts.tokens.div_ceil(per_step);
        let device = student.device();
        let optimizer = AdamW::new(
            AdamWConfig {
                beta1: opts.adam_beta1,
                beta2: opts.adam_beta2,
                eps: 1e-8,
                weight_decay: opts.weight_decay,
            },
            &student.trainable,
        )?;
        let mut healer = Healer {
            teacher,
            student,
            corpus,
            state: HealState {
                options: opts.clone(),
                seq_len,
                corpus_tokenizer: corpus.info.tokenizer.clone(),
                corpus_rows: corpus.train.len(),
                corpus_sources: corpus.info.sources.clone(),
                step: 0,
                total_steps,
                records: Vec::new(),
            },
            opts,
            optimizer,
            state_dir: state_dir.to_path_buf(),
            device,
            resumed_from: None,
            order_epoch: None,
            order: Vec::new(),
            deadline: None,
            replicas: Vec::new(),
            copy: ReplicaCopy::Direct,
            sum_replicas: true,
        };
        if let Some(dir) = latest_checkpoint(state_dir)? {
            if !resume {
                return Err(Error::InvalidOption(format!(
                    "{} holds a healing checkpoint; pass --resume to continue it or choose \
                     another --out",
                    dir.display()
                )));
            }
            healer.load_checkpoint(&dir)?;
        }
        Ok(healer)
    }

    /// Make [`Healer::run`] stop, with a checkpoint, once one more update would likely
    /// end after `deadline` (judged from the last update's duration, with a margin for the
    /// evaluation and the checkpoint). The result does not depend on where it stops:
    /// resuming continues exactly.
    pub fn stop_by(&mut self, deadline: Instant) {
        self.deadline = Some(deadline);
    }

    /// Spread every update over the primary student's device and one more device per
    /// replica: the `grad_accum` micro-batches of an update go in contiguous blocks (sizes
    /// differing by at most one, the first devices taking the larger) to the devices in
    /// order, each device sums the gradients of its block, the first device sums the
    /// devices' sums in device order, clips, takes the AdamW step and evaluates, and the
    /// new weights are copied to the replicas. Refused unless every device gets at least
    /// one micro-batch and every replica holds the same models.
    pub fn with_replicas(mut self, replicas: Vec<Replica<'a>>, copy: ReplicaCopy) -> Result<Self> {
        let devices = 1 + replicas.len();
        if self.opts.grad_accum < devices {
            return Err(Error::InvalidOption(format!(
                "--grad-accum {} is smaller than the {devices} devices: every device needs at \
                 least one micro-batch per update (raise --grad-accum, or lower --batch to keep \
                 the tokens per update)",
                self.opts.grad_accum
            )));
        }
        let shapes = |s: &StudentParams| -> Vec<(String, Vec<usize>)> {
            s.trainable
                .iter()
                .map(|(n, v)| (n.clone(), v.dims().to_vec()))
                .collect()
        };
        let want = shapes(&self.student);
        for (i, r) in replicas.iter().enumerate() {
            if shapes(&r.student) != want
                || r.student.spec.vocab_size != self.student.spec.vocab_size
            {
                return Err(Error::InvalidOption(format!(
                    "replica {} holds another student (trainable tensors or vocabulary differ)",
                    i + 1
                )));
            }
            if r.teacher.spec.vocab_size != self.teacher.spec.vocab_size
                || r.teacher.spec.num_layers != self.teacher.spec.num_layers
                || r.teacher.spec.hidden_size != self.teacher.spec.hidden_size
            {
                return Err(Error::InvalidOption(format!(
                    "replica {} holds another teacher",
                    i + 1
                )));
            }
        }
        self.replicas = replicas;
        self.copy = copy;
        self.broadcast()?;
        Ok(self)
    }

    /// Devices the updates run on (1 + replicas).
    pub fn devices(&self) -> usize {
        1 + self.replicas.len()
    }

    /// Test hook: `false` drops the replicas' gradients (only the first device's block
    /// enters the update) — a wrong sum that the data-parallel test must detect.
    #[doc(hidden)]
    pub fn sum_replica_gradients(&mut self, on: bool) {
        self.sum_replicas = on;
    }

    /// Copy the primary student's trainable values into every replica (in parallel, one
    /// thread per replica).
    fn broadcast(&self) -> Result<()> {
        if self.replicas.is_empty() {
            return Ok(());
        }
        let params: Vec<Tensor> = match self.copy {
            ReplicaCopy::Direct => {
                // The copies read the values on the replicas' streams.
                self.device.synchronize()?;
                self.student
                    .trainable
                    .iter()
                    .map(|(_, v)| v.as_tensor().detach())
                    .collect()
            }
            ReplicaCopy::Host => self
                .student
                .trainable
                .iter()
                .map(|(_, v)| Ok(v.as_tensor().detach().to_device(&Device::Cpu)?.copy()?))
                .collect::<Result<_>>()?,
        };
        let params = &params;
        let results: Vec<Result<()>> = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .replicas
                .iter()
                .map(|r| {
                    scope.spawn(move || -> Result<()> {
                        let dev = r.student.device();
                        for ((_, var), p) in r.student.trainable.iter().zip(params) {
                            var.set(&p.to_device(&dev)?)?;
                        }
                        dev.synchronize()?;
                        Ok(())
                    })
                })
                .collect();
            handles.into_iter().map(join_worker).collect()
        });
        results.into_iter().collect()
    }

    pub fn total_steps(&self) -> u64 {
        self.state.total_steps
    }

    pub fn step(&self) -> u64 {
        self.state.step
    }

    pub fn records(&self) -> &[StepRecord] {
        &self.state.records
    }

    /// Row index (into `corpus.train`) of the `k`-th row consumed.
    fn row(&mut self, k: u64) -> usize {
        let n = self.corpus.train.len() as u64;
        let epoch = k / n;
        if self.order_epoch != Some(epoch) {
            self.order = (0..n as usize).collect();
            SplitMix64::new(self.opts.seed ^ epoch.wrapping_mul(0x9E37_79B9))
                .shuffle(&mut self.order);
            self.order_epoch = Some(epoch);
        }
        self.order[(k % n) as usize]
    }

    /// Inputs and targets of a batch of rows.
    fn batch(&self, rows: &[usize], data: &[Vec<u32>]) -> Result<(Vec<Vec<u32>>, Tensor)> {
        let mb = MicroBatch::new(rows, data, self.state.seq_len);
        let targets = mb.targets(&self.device)?;
        Ok((mb.inputs, targets))
    }

    /// Logits `(b·t, vocab)` of `model` on `inputs`.
    fn logits(model: &Decoder, inputs: &[Vec<u32>]) -> Result<Tensor> {
        let rows: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
        let h = model.forward_hidden_batch(&rows, &mut model.new_cache(), None)?;
        let (b, t, d) = h.dims3()?;
        Ok(model.logits(&h.reshape((b * t, d))?)?)
    }

    /// Perplexity of the student on the first `eval_sequences` held-out rows.
    pub fn heldout_ppl(&self) -> Result<f64> {
        let model = self.student.decoder_detached()?;
        let n = self.opts.eval_sequences.min(self.corpus.heldout.len());
        let idx: Vec<usize> = (0..n).collect();
        let mut nll = 0.0;
        let mut count = 0usize;
        for chunk in idx.chunks(self.opts.micro_batch) {
            let (inputs, targets) = self.batch(chunk, &self.corpus.heldout)?;
            nll += nll_sum(&Self::logits(&model, &inputs)?, &targets)?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
            count += targets.elem_count();
        }
        let ppl = (nll / count as f64).exp();
        if !ppl.is_finite() {
            return Err(Error::NonFinite("the held-out perplexity".into()));
        }
        Ok(ppl)
    }

    /// One update (gradient accumulation over `grad_accum` micro-batches, spread over the
    /// devices when there are replicas).
    fn update(&mut self) -> Result<StepRecord> {
        let started = Instant::now();
        let s = self.state.step;
        let o = self.opts.clone();
        let seq_len = self.state.seq_len;
        let mut micro = Vec::with_capacity(o.grad_accum);
        for m in 0..o.grad_accum {
            let first = (s * o.grad_accum as u64 + m as u64) * o.micro_batch as u64;
            let rows: Vec<usize> = (0..o.micro_batch as u64)
                .map(|i| self.row(first + i))
                .collect();
            micro.push(MicroBatch::new(&rows, &self.corpus.train, seq_len));
        }
        let (mut grads, losses, sync_secs) = if self.replicas.is_empty() {
            let part = accumulate(self.teacher, &self.student, &micro, &o)?;
            (part.grads, part.losses, None)
        } else {
            let (part, secs) = self.accumulate_parallel(&micro, &o)?;
            (part.grads, part.losses, Some(secs))
        };
        // Losses summed in micro-batch order, as on one device.
        let (mut loss, mut ce, mut kd) = (0.0, 0.0, 0.0);
        for (l, c, k) in losses {
            loss += l;
            ce += c / o.grad_accum as f64;
            kd += k / o.grad_accum as f64;
        }
        let grad_norm = clip_global_norm(&mut grads, o.clip)?;
        let warmup = (o.warmup_ratio * self.state.total_steps as f64).round() as u64;
        let lr = lr_at(s, self.state.total_steps, warmup, o.lr, o.min_lr_ratio);
        self.optimizer.update(&self.student.trainable, &grads, lr)?;
        drop(grads);
        let sync_secs = match sync_secs {
            Some(secs) => {
                let t = Instant::now();
                self.broadcast()?;
                Some(secs + t.elapsed().as_secs_f64())
            }
            None => None,
        };
        self.state.step += 1;
        let per_step = (seq_len * o.micro_batch * o.grad_accum) as u64;
        Ok(StepRecord {
            step: self.state.step,
            tokens: self.state.step * per_step,
            lr,
            loss,
            ce,
            kd,
            grad_norm,
            heldout_ppl: None,
            secs: started.elapsed().as_secs_f64(),
            sync_secs,
        })
    }

    /// The micro-batches of one update over all devices: per-device gradient sums moved
    /// to the first device and summed there in device order, the per-micro-batch losses in
    /// micro-batch order, and the seconds spent moving and summing.
    fn accumulate_parallel(&self, micro: &[MicroBatch], o: &HealOptions) -> Result<(Partial, f64)> {
        let devices = self.devices();
        let (base, extra) = (micro.len() / devices, micro.len() % devices);
        let mut blocks = Vec::with_capacity(devices);
        let mut at = 0;
        for d in 0..devices {
            let n = base + usize::from(d < extra);
            blocks.push(&micro[at..at + n]);
            at += n;
        }
        let primary = &self.device;
        let copy = self.copy;
        let workers: Vec<(&Decoder, &StudentParams)> =
            std::iter::once((self.teacher, &self.student))
                .chain(self.replicas.iter().map(|r| (r.teacher, &r.student)))
                .collect();
        let parts: Vec<Result<(Partial, f64)>> = std::thread::scope(|scope| {
            let handles: Vec<_> = workers
                .iter()
                .zip(&blocks)
                .enumerate()
                .map(|(d, (&(teacher, student), block))| {
                    scope.spawn(move || -> Result<(Partial, f64)> {
                        let mut part = accumulate(teacher, student, block, o)?;
                        let t = Instant::now();
                        if d > 0 {
                            part.grads = move_to(&part.grads, &student.device(), primary, copy)?;
                        }
                        Ok((part, t.elapsed().as_secs_f64()))
                    })
                })
                .collect();
            handles.into_iter().map(join_worker).collect()
        });
        let mut sum: Option<Vec<Tensor>> = None;
        let mut losses = Vec::with_capacity(micro.len());
        let mut move_secs = 0.0f64;
        for part in parts {
            let (part, secs) = part?;
            move_secs = move_secs.max(secs);
            losses.extend(part.losses);
            sum = Some(match sum {
                None => part.grads,
                Some(acc) if self.sum_replicas => acc
                    .iter()
                    .zip(&part.grads)
                    .map(|(a, g)| Ok((a + g)?))
                    .collect::<Result<_>>()?,
                Some(acc) => acc,
            });
        }
        let t = Instant::now();
        let sum = sum.ok_or_else(|| Error::InvalidOption("no device to heal on".into()))?;
        primary.synchronize()?;
        let secs = move_secs + t.elapsed().as_secs_f64();
        Ok((Partial { grads: sum, losses }, secs))
    }

    /// Train until the budget is spent or `stop_after` more updates ran, evaluating and
    /// checkpointing on schedule (and always at the end). `on_step` sees every record.
    /// `on_save` runs after every checkpoint (the CLI writes the healed model there).
    pub fn run(
        &mut self,
        stop_after: Option<u64>,
        on_step: &mut dyn FnMut(&StepRecord, u64),
        on_save: &mut dyn FnMut(&StudentParams, &[StepRecord]) -> Result<()>,
    ) -> Result<HealOutcome> {
        let total = self.state.total_steps;
        if self.state.records.is_empty() {
            let ppl = self.heldout_ppl()?;
            let r = StepRecord {
                step: 0,
                tokens: 0,
                lr: 0.0,
                loss: f64::NAN,
                ce: f64::NAN,
                kd: f64::NAN,
                grad_norm: 0.0,
                heldout_ppl: Some(ppl),
                secs: 0.0,
                sync_secs: None,
            };
            on_step(&r, total);
            self.state.records.push(r);
        }
        let limit = stop_after.map_or(total, |n| (self.state.step + n).min(total));
        while self.state.step < limit {
            let mut r = self.update()?;
            let secs = r.secs;
            let last = r.step == total;
            if last || (self.opts.eval_every > 0 && r.step.is_multiple_of(self.opts.eval_every)) {
                r.heldout_ppl = Some(self.heldout_ppl()?);
            }
            on_step(&r, total);
            self.state.records.push(r);
            let step = self.state.step;
            let next_update = Duration::from_secs_f64(secs * 1.5 + 5.0);
            let out_of_time = self
                .deadline
                .is_some_and(|d| Instant::now() + next_update >= d);
            if step == limit
                || out_of_time
                || (self.opts.save_every > 0 && step.is_multiple_of(self.opts.save_every))
            {
                self.save_checkpoint()?;
                on_save(&self.student, &self.state.records)?;
            }
            if out_of_time {
                break;
            }
        }
        Ok(HealOutcome {
            steps_done: self.state.step,
            total_steps: total,
            finished: self.state.step == total,
            resumed_from: self.resumed_from,
            records: self.state.records.clone(),
        })
    }

    /// `state_dir/step-NNNNNNNN/`: parameters (f32), Adam moments, state.json — written
    /// into a temporary directory and renamed, then older checkpoints are removed.
    fn save_checkpoint(&self) -> Result<()> {
        std::fs::create_dir_all(&self.state_dir).map_err(|e| Error::io(&self.state_dir, e))?;
        let name = format!("step-{:08}", self.state.step);
        let dir = self.state_dir.join(&name);
        let tmp = self.state_dir.join(format!(".{name}.partial"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let result = (|| {
            save_tensors(
                &self.student.trainable_tensors()?,
                &tmp.join("params.safetensors"),
            )?;
            save_tensors(
                &self.optimizer.state_tensors()?,
                &tmp.join("optimizer.safetensors"),
            )?;
            let json = serde_json::to_string_pretty(&self.state).map_err(|e| Error::BadData {
                path: tmp.join("state.json"),
                reason: e.to_string(),
            })?;
            let p = tmp.join("state.json");
            std::fs::write(&p, json).map_err(|e| Error::io(&p, e))?;
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::rename(&tmp, &dir).map_err(|e| Error::io(&dir, e))
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
            return result;
        }
        for old in checkpoints(&self.state_dir)? {
            if old != dir {
                let _ = std::fs::remove_dir_all(&old);
            }
        }
        Ok(())
    }

    fn load_checkpoint(&mut self, dir: &Path) -> Result<()> {
        let p = dir.join("state.json");
        let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
        let state: HealState = serde_json::from_str(&text).map_err(|e| Error::BadData {
            path: p.clone(),
            reason: e.to_string(),
        })?;
        if state.options != self.opts
            || state.seq_len != self.state.seq_len
            || state.corpus_tokenizer != self.state.corpus_tokenizer
            || state.corpus_rows != self.state.corpus_rows
            || state.corpus_sources != self.state.corpus_sources
        {
            return Err(Error::InvalidOption(format!(
                "{} was written with other options or data ({}); resume with the same \
                 flags and corpus, or start a new --out",
                dir.display(),
                serde_json::to_string(&state.options).unwrap_or_default()
            )));
        }
        let params = load_tensors(&dir.join("params.safetensors"), &self.device)?;
        self.student.restore(&params)?;
        let moments = load_tensors(&dir.join("optimizer.safetensors"), &self.device)?;
        self.optimizer.restore(state.step, &moments)?;
        self.resumed_from = Some(state.step);
        self.state = state;
        self.broadcast()
    }
}

/// The rows of one micro-batch, on the host.
struct MicroBatch {
    inputs: Vec<Vec<u32>>,
    targets: Vec<u32>,
}

impl MicroBatch {
    fn new(rows: &[usize], data: &[Vec<u32>], seq_len: usize) -> Self {
        MicroBatch {
            inputs: rows.iter().map(|&r| data[r][..seq_len].to_vec()).collect(),
            targets: rows.iter().flat_map(|&r| data[r][1..].to_vec()).collect(),
        }
    }

    fn targets(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            self.targets.clone(),
            self.targets.len(),
            device,
        )?)
    }
}

/// What one device computed for its block of micro-batches: the sum of their gradients
/// (in block order) and each micro-batch's (loss / grad_accum, CE, KD).
struct Partial {
    grads: Vec<Tensor>,
    losses: Vec<(f64, f64, f64)>,
}

/// Forward and backward of `block` on the device of `student`, gradients summed in order.
fn accumulate(
    teacher: &Decoder,
    student: &StudentParams,
    block: &[MicroBatch],
    o: &HealOptions,
) -> Result<Partial> {
    let device = student.device();
    let model = student.decoder()?;
    let mut sums: Vec<Option<Tensor>> = vec![None; student.trainable.len()];
    let mut losses = Vec::with_capacity(block.len());
    for mb in block {
        let targets = mb.targets(&device)?;
        let teacher_logits = Healer::logits(teacher, &mb.inputs)?.detach();
        let student_logits = Healer::logits(&model, &mb.inputs)?;
        let l = distill_loss(&student_logits, &teacher_logits, &targets, o.beta, o.tau)?;
        let scaled = (&l.total / o.grad_accum as f64)?;
        let scaled_value = scaled
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
        losses.push((scaled_value, l.ce, l.kd));
        let grads = scaled.backward()?;
        for (slot, (name, var)) in sums.iter_mut().zip(&student.trainable) {
            let g = grads.get(var.as_tensor()).ok_or_else(|| {
                Error::InvalidOption(format!(
                    "parameter {name} receives no gradient (not used by the forward pass)"
                ))
            })?;
            // Detached: a gradient computed from tracked tensors carries their graph,
            // and the Adam moments would keep every step's forward graph alive.
            let g = g.detach();
            *slot = Some(match slot.take() {
                Some(acc) => (acc + g)?,
                None => g,
            });
        }
    }
    let grads = sums
        .into_iter()
        .map(|g| g.ok_or_else(|| Error::InvalidOption("an empty block of micro-batches".into())))
        .collect::<Result<_>>()?;
    Ok(Partial { grads, losses })
}

/// `tensors` (on `from`) as new tensors on `to`, the copies complete on return.
fn move_to(
    tensors: &[Tensor],
    from: &Device,
    to: &Device,
    copy: ReplicaCopy,
) -> Result<Vec<Tensor>> {
    from.synchronize()?;
    let moved = tensors
        .iter()
        .map(|t| match copy {
            ReplicaCopy::Direct => Ok(t.to_device(to)?),
            ReplicaCopy::Host => Ok(t.to_device(&Device::Cpu)?.to_device(to)?),
        })
        .collect::<Result<Vec<_>>>()?;
    // The copies run on the destination's stream: done before the sources can be freed.
    to.synchronize()?;
    Ok(moved)
}

/// A worker thread's result; a panic becomes an error.
fn join_worker<T>(h: std::thread::ScopedJoinHandle<'_, Result<T>>) -> Result<T> {
    h.join().unwrap_or_else(|e| {
        let what = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Err(Error::InvalidOption(format!(
            "a data-parallel worker thread panicked: {what}"
        )))
    })
}

fn save_tensors(t: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    candle_core::safetensors::save(t, path).map_err(|e| Error::BadData {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn load_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device).map_err(|e| Error::BadData {
        path: path.to_path_buf(),
        reason: format!("healing checkpoint: {e}"),
    })
}

/// Complete checkpoint directories in `state_dir`, oldest first.
fn checkpoints(state_dir: &Path) -> Result<Vec<PathBuf>> {
    if !state_dir.exists() {
        return Ok(Vec::new());
    }
    let mut v: Vec<PathBuf> = std::fs::read_dir(state_dir)
        .map_err(|e| Error::io(state_dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("step-"))
                && p.join("state.json").exists()
        })
        .collect();
    v.sort();
    Ok(v)
}

/// The newest complete checkpoint, if any.
pub fn latest_checkpoint(state_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(checkpoints(state_dir)?.pop())
}
