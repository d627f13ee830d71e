//! Healing on a tiny random model (format and math only; the quality runs use the real
//! SmolLM2 / Qwen weights, `scripts/heal.sh`): the KD term vanishes when student =
//! teacher, autograd gradients of one MLA layer match finite differences, the loss
//! falls, an interrupted and resumed run reproduces the uninterrupted curve, bad
//! inputs are refused without touching the output, no allocation made during an
//! update outlives it, and a data-parallel run over two replicas follows the one-device
//! curve.

use std::path::Path;

use candle_core::{Device, Tensor};
use care_convert::heal::data::{CorpusInfo, PackedCorpus};
use care_convert::heal::loss::distill_loss;
use care_convert::heal::student::{StudentParams, TrainScope};
use care_convert::heal::train::{HealOptions, Healer, Replica, ReplicaCopy, StepRecord};
use care_convert::heal::{prepare_output, write_healed};
use mla_attention::io::Checkpoint;
use mla_attention::model::Decoder;

mod common;
use common::{write_source, write_stock, Rng, VOCAB};

/// Heap allocations of the current thread while [`tracked::record`] runs, and which of
/// them are still live afterwards (other threads, i.e. the other tests, are not recorded).
mod tracked {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    const CAP: usize = 1 << 16;

    struct Table {
        len: usize,
        overflow: bool,
        /// (address, bytes); address 0: freed since.
        entries: [(usize, usize); CAP],
    }

    static TABLE: Mutex<Table> = Mutex::new(Table {
        len: 0,
        overflow: false,
        entries: [(0, 0); CAP],
    });
    /// Some thread is recording: deallocations must look the table up.
    static ACTIVE: AtomicBool = AtomicBool::new(false);
    thread_local! {
        static RECORDING: Cell<bool> = const { Cell::new(false) };
    }

    fn table() -> std::sync::MutexGuard<'static, Table> {
        TABLE.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn note(p: *mut u8, size: usize) {
        if !p.is_null() && RECORDING.with(Cell::get) {
            let mut t = table();
            if t.len == CAP {
                t.overflow = true;
            } else {
                let n = t.len;
                t.entries[n] = (p as usize, size);
                t.len += 1;
            }
        }
    }

    fn freed(p: *mut u8) {
        if ACTIVE.load(Ordering::Acquire) {
            let mut t = table();
            let n = t.len;
            if let Some(e) = t.entries[..n].iter_mut().find(|e| e.0 == p as usize) {
                *e = (0, 0);
            }
        }
    }

    pub struct Tracking;

    unsafe impl GlobalAlloc for Tracking {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            let p = System.alloc(l);
            note(p, l.size());
            p
        }
        unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
            let p = System.alloc_zeroed(l);
            note(p, l.size());
            p
        }
        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            freed(p);
            System.dealloc(p, l)
        }
        unsafe fn realloc(&self, p: *mut u8, l: Layout, size: usize) -> *mut u8 {
            freed(p);
            let q = System.realloc(p, l, size);
            note(q, size);
            q
        }
    }

    /// Run `f`; return the bytes it allocated (on this thread) that are still live.
    pub fn record<T>(f: impl FnOnce() -> T) -> (T, usize) {
        {
            let mut t = table();
            t.len = 0;
            t.overflow = false;
        }
        ACTIVE.store(true, Ordering::Release);
        RECORDING.with(|r| r.set(true));
        let out = f();
        RECORDING.with(|r| r.set(false));
        ACTIVE.store(false, Ordering::Release);
        let t = table();
        assert!(!t.overflow, "more than {CAP} allocations: raise CAP");
        let live = t.entries[..t.len].iter().map(|e| e.1).sum();
        (out, live)
    }
}

#[global_allocator]
static ALLOCATOR: tracked::Tracking = tracked::Tracking;

const SEQ: usize = 16;

fn corpus(seed: u64, train: usize) -> PackedCorpus {
    // Tokens from a small repeating grammar so there is something to learn besides the
    // teacher: row i is an arithmetic progression mod VOCAB with a random start.
    let mut r = Rng::new(seed);
    let mut row = || -> Vec<u32> {
        let start = ((r.symmetric() + 1.0) * 40.0) as u32;
        let step = 1 + ((r.symmetric() + 1.0) * 3.0) as u32;
        (0..=SEQ as u32)
            .map(|i| (start + i * step) % VOCAB as u32)
            .collect()
    };
    PackedCorpus {
        info: CorpusInfo {
            sources: vec!["synthetic".into()],
            excluded: vec![],
            files_read: 0,
            seq_len: SEQ,
            seed,
            tokenizer: "tiny".into(),
        },
        train: (0..train).map(|_| row()).collect(),
        heldout: (0..8).map(|_| row()).collect(),
    }
}

fn options(tokens: u64) -> HealOptions {
    HealOptions {
        micro_batch: 4,
        grad_accum: 2,
        tokens,
        lr: 1e-2,
        min_lr_ratio: 0.1,
        warmup_ratio: 0.1,
        beta: 1.0,
        tau: 1.0,
        weight_decay: 0.01,
        adam_beta1: 0.9,
        adam_beta2: 0.95,
        clip: 1.0,
        scope: TrainScope::Attention,
        eval_every: 2,
        eval_sequences: 8,
        save_every: 0,
        seed: 7,
    }
}

fn models(root: &Path) -> (Decoder, std::path::PathBuf, std::path::PathBuf) {
    let src = root.join("llama");
    write_source(&src, false);
    let stock = root.join("mla");
    write_stock(&src, &stock, 4, 8);
    let teacher = mla_attention::load::load_decoder(&Checkpoint::open(&src).unwrap()).unwrap();
    (teacher, src, stock)
}

fn no_save(_: &StudentParams, _: &[StepRecord]) -> care_convert::Result<()> {
    Ok(())
}

#[test]
fn kd_term_is_zero_when_the_student_is_the_teacher() {
    let tmp = tempfile::tempdir().unwrap();
    let (teacher, src, _) = models(tmp.path());
    let student = StudentParams::open(&src, TrainScope::Attention, &Device::Cpu).unwrap();
    let data = corpus(1, 16);
    let mut h = Healer::new(
        &teacher,
        student,
        &data,
        options(2 * 8 * SEQ as u64),
        &tmp.path().join("state"),
        false,
    )
    .unwrap();
    let out = h.run(None, &mut |_, _| {}, &mut no_save).unwrap();
    let first = &out.records[1];
    // Zero up to f32 rounding: the teacher (no autograd) multiplies through the few-row
    // kernel, the student (autograd) through candle's matmul, so their logits may differ in
    // the last bits (seen: KD = −2.6e-9); a wrong KD is of the order of the CE.
    assert!(
        first.kd.abs() < 1e-6,
        "KD of identical models must vanish: {first:?}"
    );
    assert!(first.ce > 0.0 && (first.loss - first.ce).abs() < 1e-6);
}

#[test]
fn autograd_gradients_of_an_mla_layer_match_finite_differences() {
    let tmp = tempfile::tempdir().unwrap();
    let (teacher, _, stock) = models(tmp.path());
    let student = StudentParams::open(&stock, TrainScope::Attention, &Device::Cpu).unwrap();
    let data = corpus(2, 4);
    let inputs: Vec<&[u32]> = data.train.iter().map(|r| &r[..SEQ]).collect();
    let targets: Vec<u32> = data.train.iter().flat_map(|r| r[1..].to_vec()).collect();
    let targets = Tensor::from_vec(targets, inputs.len() * SEQ, &Device::Cpu).unwrap();
    let logits = |m: &Decoder| {
        let h = m
            .forward_hidden_batch(&inputs, &mut m.new_cache(), None)
            .unwrap();
        m.logits(&h.reshape((inputs.len() * SEQ, h.dim(2).unwrap())).unwrap())
            .unwrap()
    };
    let t_logits = logits(&teacher);
    let loss_of = |m: &Decoder| {
        let l = distill_loss(&logits(m), &t_logits, &targets, 1.0, 2.0).unwrap();
        l.total
            .to_dtype(candle_core::DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let model = student.decoder().unwrap();
    let l = distill_loss(&logits(&model), &t_logits, &targets, 1.0, 2.0).unwrap();
    let grads = l.total.backward().unwrap();
    let mut r = Rng::new(99);
    for name in [
        "model.layers.0.self_attn.kv_b_proj.weight",
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
    ] {
        let (_, var) = student
            .trainable
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name} is not trainable"));
        let g = grads.get(var.as_tensor()).expect("gradient").clone();
        let g_norm = g.sqr().unwrap().sum_all().unwrap().sqrt().unwrap();
        let g_norm_v = g_norm.to_scalar::<f32>().unwrap() as f64;
        assert!(g_norm_v > 0.0, "{name}: zero gradient");
        let w0 = var.as_tensor().detach().copy().unwrap();
        // Directional derivatives ⟨∇L, D⟩ vs (L(W + εD) − L(W − εD)) / 2ε along the
        // gradient's own direction (checks its length) and a random unit direction
        // (checks its direction), the error measured against ‖∇L‖.
        let random = r.symmetric_tensor(w0.dims(), 1.0);
        let random_norm = random.sqr().unwrap().sum_all().unwrap().sqrt().unwrap();
        for (what, d) in [
            ("gradient", g.broadcast_div(&g_norm).unwrap()),
            ("random", random.broadcast_div(&random_norm).unwrap()),
        ] {
            let analytic = (&g * &d)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
            let eps = 1e-2;
            var.set(&(&w0 + (&d * eps).unwrap()).unwrap()).unwrap();
            let plus = loss_of(&student.decoder_detached().unwrap());
            var.set(&(&w0 - (&d * eps).unwrap()).unwrap()).unwrap();
            let minus = loss_of(&student.decoder_detached().unwrap());
            var.set(&w0).unwrap();
            let numeric = (plus - minus) / (2.0 * eps);
            let rel = (analytic - numeric).abs() / g_norm_v;
            assert!(
                rel < 1e-2,
                "{name} along the {what} direction: autograd {analytic:.6} vs finite \
                 differences {numeric:.6} (error {rel:.2e} of ‖∇L‖ = {g_norm_v:.4})"
            );
        }
    }
}

#[test]
fn loss_falls_and_an_interrupted_run_resumes_onto_the_same_curve() {
    let tmp = tempfile::tempdir().unwrap();
    let (teacher, _, stock) = models(tmp.path());
    let data = corpus(3, 64);
    let opts = options(30 * 8 * SEQ as u64);

    let student = StudentParams::open(&stock, TrainScope::Attention, &Device::Cpu).unwrap();
    let whole_dir = tmp.path().join("whole");
    let mut h = Healer::new(&teacher, student, &data, opts.clone(), &whole_dir, false).unwrap();
    assert_eq!(h.total_steps(), 30);
    let whole = h.run(None, &mut |_, _| {}, &mut no_save).unwrap();
    assert!(whole.finished);
    let losses: Vec<f64> = whole.records[1..].iter().map(|r| r.loss).collect();
    let head: f64 = losses[..3].iter().sum::<f64>() / 3.0;
    let tail: f64 = losses[losses.len() - 3..].iter().sum::<f64>() / 3.0;
    assert!(tail < 0.9 * head, "loss did not fall: {losses:?}");
    let ppl: Vec<f64> = whole.records.iter().filter_map(|r| r.heldout_ppl).collect();
    assert!(
        ppl.last().unwrap() < &ppl[0],
        "held-out PPL did not fall: {ppl:?}"
    );

    // The same run, stopped by a deadline already passed (after one update, with a
    // checkpoint), resumed for 4 more updates (a checkpoint at 5), then resumed to the end.
    let split_dir = tmp.path().join("split");
    let student = StudentParams::open(&stock, TrainScope::Attention, &Device::Cpu).unwrap();
    let mut h = Healer::new(&teacher, student, &data, opts.clone(), &split_dir, false).unwrap();
    h.stop_by(std::time::Instant::now());
    let first = h.run(None, &mut |_, _| {}, &mut no_save).unwrap();
    assert!(
        !first.finished && first.steps_done == 1,
        "{}",
        first.steps_done
    );
    drop(h);
    let student = StudentParams::open(&stock, TrainScope::Attention, &Device::Cpu).unwrap();
    let mut h = Healer::new(&teacher, student, &data, opts.clone(), &split_dir, true).unwrap();
    assert_eq!(h.step(), 1);
    let part = h.run(Some(4), &mut |_, _| {}, &mut no_save).unwrap();
    assert!(!part.finished && part.steps_done == 5);
    drop(h);
    // Without --resume an existing checkpoint is refused…
    let student = StudentParams::open(&stock, TrainScope::Attention, &Device::Cpu).unwrap();
    let e = Healer::new(&teacher, student, &data, opts.clone(), &split_dir, false)
        .err()
        .expect("refused");
    assert!(e.to_string().contains("--resume"), "{e}");
    // …and so is resuming under other options.
    let student = StudentParams::open(&stock, TrainScope::Attention, &Device::Cpu).unwrap();
    let mut other = opts.clone();
    other.lr = 1e-3;
    let e = Healer::new(&teacher, student, &data, other, &split_dir, true)
        .err()
        .expect("refused");
    assert!(e.to_string().contains("other options"), "{e}");
    // …and resuming on other data.
    let student = StudentParams::open(&stock, TrainScope::Attention, &Device::Cpu).unwrap();
    let other_data = corpus(3, 63);
    let e = Healer::new(
        &teacher,
        student,
        &other_data,
        opts.clone(),
        &split_dir,
        true,
    )
    .err()
    .expect("refused");
    assert!(e.to_string().contains("other options or data"), "{e}");
    let student = StudentParams::open(&stock, TrainScope::Attention, &Device::Cpu).unwrap();
    let mut h = Healer::new(&teacher, student, &data, opts, &split_dir, true).unwrap();
    assert_eq!(h.step(), 5);
    let resumed = h.run(None, &mut |_, _| {}, &mut no_save).unwrap();
    assert_eq!(resumed.resumed_from, Some(5));
    assert_eq!(resumed.records.len(), whole.records.len());
    for (a, b) in whole.records.iter().zip(&resumed.records) {
        assert_eq!(a.step, b.step);
        for (x, y) in [
            (a.loss, b.loss),
            (a.ce, b.ce),
            (a.kd, b.kd),
            (a.grad_norm, b.grad_norm),
            (a.heldout_ppl.unwrap_or(0.0), b.heldout_ppl.unwrap_or(0.0)),
        ] {
            assert!(
                (x.is_nan() && y.is_nan()) || (x - y).abs() <= 1e-9 * x.abs().max(1.0),
                "step {}: uninterrupted {x} vs resumed {y}",
                a.step
            );
        }
    }
}

#[test]
fn healed_checkpoint_keeps_the_student_format_and_bad_inputs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (teacher, _, stock) = models(tmp.path());
    let data = corpus(4, 16);
    let student = StudentParams::open(&stock, TrainScope::Attention, &Device::Cpu).unwrap();
    let out = tmp.path().join("healed");
    prepare_output(&stock, &out).unwrap();
    // Before any update the output already loads (as the student).
    mla_attention::load::load_decoder(&Checkpoint::open(&out).unwrap()).unwrap();
    let mut h = Healer::new(
        &teacher,
        student,
        &data,
        options(2 * 8 * SEQ as u64),
        &out.join("heal"),
        false,
    )
    .unwrap();
    let done = h.run(None, &mut |_, _| {}, &mut no_save).unwrap();
    let record = serde_json::json!({"steps": done.steps_done});
    write_healed(&out, &h.student, candle_core::DType::F32, &record).unwrap();
    // The healed directory loads like the student and computes with the trained values.
    let healed = mla_attention::load::load_decoder(&Checkpoint::open(&out).unwrap()).unwrap();
    let trained = h.student.decoder_detached().unwrap();
    let toks: Vec<u32> = (0..12).map(|i| (i * 7 + 1) % VOCAB as u32).collect();
    let a = healed.forward(&toks, &mut healed.new_cache()).unwrap();
    let b = trained.forward(&toks, &mut trained.new_cache()).unwrap();
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    let care: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("care.json")).unwrap()).unwrap();
    assert_eq!(care["healing"]["steps"], 2);
    assert!(
        care.get("conversion").is_some(),
        "the conversion record is kept"
    );

    // Token ids outside the vocabulary: another tokenizer's corpus.
    let mut bad = corpus(5, 16);
    bad.train[3][2] = VOCAB as u32 + 5;
    let student = StudentParams::open(&stock, TrainScope::Attention, &Device::Cpu).unwrap();
    let e = Healer::new(
        &teacher,
        student,
        &bad,
        options(256),
        &tmp.path().join("x"),
        false,
    )
    .err()
    .expect("refused");
    assert!(e.to_string().contains("another tokenizer"), "{e}");
    // A GGUF file or a missing path is not a student directory.
    let e = StudentParams::open(&tmp.path().join("nope"), TrainScope::All, &Device::Cpu)
        .err()
        .expect("refused");
    assert!(e.to_string().contains("checkpoint directory"), "{e}");
    // Out-of-range options.
    let mut o = options(256);
    o.lr = 0.0;
    assert!(o.validate().is_err());
    o = options(256);
    o.tau = -1.0;
    assert!(o.validate().is_err());
    assert!(
        !tmp.path().join("x").exists(),
        "nothing written for refused runs"
    );
}

/// The optimizer state lives across updates; everything an update allocates must die with
/// it. Fresh Adam moments per update (2 × the trainable bytes, freed one update later)
/// left the heap flat on the CPU, but on CUDA's stream-ordered pool they kept chunks of
/// freed activations mapped: Qwen2.5-0.5B healing grew ~0.5 GB per update until OOM.
#[test]
fn no_allocation_made_during_an_update_outlives_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (teacher, _, stock) = models(tmp.path());
    let data = corpus(5, 32);
    let student = StudentParams::open(&stock, TrainScope::Attention, &Device::Cpu).unwrap();
    let trainable_bytes = student.trainable_count() * 4;
    let opts = options(100 * 8 * SEQ as u64);
    let mut h = Healer::new(&teacher, student, &data, opts, &tmp.path().join("s"), false).unwrap();
    // The first call also evaluates the start; later ones are one update (with an
    // evaluation every other update and a checkpoint) each.
    h.run(Some(1), &mut |_, _| {}, &mut no_save).unwrap();
    for _ in 0..4 {
        let (out, live) = tracked::record(|| h.run(Some(1), &mut |_, _| {}, &mut no_save));
        out.unwrap();
        // What may survive: the growth of the record list (a few hundred bytes).
        assert!(
            live < trainable_bytes / 8,
            "update {}: {live} bytes allocated during the update are still live \
             ({trainable_bytes} trainable bytes)",
            h.step()
        );
    }
}

/// Largest difference of the numbers two runs logged (loss, CE, KD, gradient norm,
/// held-out perplexity) over all updates, relative to the value or to 1 if that is larger
/// (the KD term is ~0.05 nats here: its f32 rounding is absolute, not relative).
fn max_rel_diff(a: &[StepRecord], b: &[StepRecord]) -> f64 {
    assert_eq!(a.len(), b.len(), "runs of different lengths");
    let mut worst = 0.0f64;
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.step, y.step);
        assert_eq!(x.tokens, y.tokens);
        assert_eq!(x.heldout_ppl.is_some(), y.heldout_ppl.is_some());
        for (u, v) in [
            (x.loss, y.loss),
            (x.ce, y.ce),
            (x.kd, y.kd),
            (x.grad_norm, y.grad_norm),
            (x.heldout_ppl.unwrap_or(0.0), y.heldout_ppl.unwrap_or(0.0)),
        ] {
            if !(u.is_nan() && v.is_nan()) {
                worst = worst.max((u - v).abs() / u.abs().max(1.0));
            }
        }
    }
    worst
}

/// Data parallelism on CPU "replicas" (each its own teacher and student): two replicas
/// splitting 4 micro-batches 2 + 2, and three splitting 5 as 2 + 2 + 1, follow the
/// one-device loss curve to 1e-6 relative (only the order in which the gradients are
/// summed differs: (g0+g1)+(g2+g3) instead of ((g0+g1)+g2)+g3), repeat exactly, and a
/// checkpoint of a two-replica run resumes on one device onto the same curve. Dropping the
/// other replicas' gradients (the hook) misses the curve by far more than the tolerance,
/// so the comparison can fail.
#[test]
fn data_parallel_replicas_follow_the_one_device_curve() {
    let tmp = tempfile::tempdir().unwrap();
    let (teacher, src, stock) = models(tmp.path());
    let more: Vec<Decoder> = (0..2)
        .map(|_| mla_attention::load::load_decoder(&Checkpoint::open(&src).unwrap()).unwrap())
        .collect();
    let data = corpus(6, 64);
    let open = || StudentParams::open(&stock, TrainScope::Attention, &Device::Cpu).unwrap();
    let run = |opts: &HealOptions, replicas: usize, dir: &str, sum: bool, stop: Option<u64>| {
        let mut h = Healer::new(
            &teacher,
            open(),
            &data,
            opts.clone(),
            &tmp.path().join(dir),
            false,
        )
        .unwrap();
        if replicas > 1 {
            let r = more[..replicas - 1]
                .iter()
                .map(|teacher| Replica {
                    teacher,
                    student: open(),
                })
                .collect();
            h = h.with_replicas(r, ReplicaCopy::Host).unwrap();
        }
        assert_eq!(h.devices(), replicas);
        h.sum_replica_gradients(sum);
        h.run(stop, &mut |_, _| {}, &mut no_save).unwrap()
    };
    for (replicas, accum) in [(2, 4), (3, 5)] {
        let mut opts = options(10 * (2 * accum * SEQ) as u64);
        opts.micro_batch = 2;
        opts.grad_accum = accum;
        let tag = format!("{replicas}x{accum}");
        let one = run(&opts, 1, &format!("one-{tag}"), true, None);
        assert_eq!(one.records.len(), 11);
        assert!(one.records.iter().all(|r| r.sync_secs.is_none()));
        let dp = run(&opts, replicas, &format!("dp-{tag}"), true, None);
        assert!(dp.finished);
        assert!(dp.records[1..].iter().all(|r| r.sync_secs.is_some()));
        let diff = max_rel_diff(&one.records, &dp.records);
        let loss_diff = one.records[1..]
            .iter()
            .zip(&dp.records[1..])
            .map(|(a, b)| (a.loss - b.loss).abs() / a.loss.abs())
            .fold(0.0f64, f64::max);
        eprintln!(
            "{replicas} replicas, {accum} micro-batches vs one device: loss curve {loss_diff:.3e} \
             relative, all logged numbers {diff:.3e}"
        );
        assert!(loss_diff < 1e-6, "loss curve: {loss_diff:.3e}");
        assert!(diff < 1e-6, "{replicas} replicas vs one device: {diff:.3e}");
        // Deterministic for a fixed seed and device count: bit for bit.
        let again = run(&opts, replicas, &format!("again-{tag}"), true, None);
        assert_eq!(max_rel_diff(&dp.records, &again.records), 0.0);
        // The test can fail: without the other replicas' gradients the curve departs.
        let wrong = run(&opts, replicas, &format!("wrong-{tag}"), false, None);
        let off = max_rel_diff(&one.records, &wrong.records);
        eprintln!(
            "{replicas} replicas without the others' gradients: max relative difference {off:.3e}"
        );
        assert!(
            off > 1e-3,
            "dropping gradients changed the curve by only {off:.3e}"
        );
        if replicas == 2 {
            // Checkpoints do not depend on the device count: 4 updates on two replicas,
            // the rest on one device.
            let split = run(&opts, 2, &format!("split-{tag}"), true, Some(4));
            assert_eq!(split.steps_done, 4);
            let mut h = Healer::new(
                &teacher,
                open(),
                &data,
                opts.clone(),
                &tmp.path().join(format!("split-{tag}")),
                true,
            )
            .unwrap();
            assert_eq!(h.step(), 4);
            let rest = h.run(None, &mut |_, _| {}, &mut no_save).unwrap();
            let diff = max_rel_diff(&one.records, &rest.records);
            eprintln!("resumed on one device: max relative difference {diff:.3e}");
            assert!(diff < 1e-6, "resumed on one device: {diff:.3e}");
        }
    }
    // Every device needs a micro-batch per update.
    let mut few = options(256);
    few.grad_accum = 1;
    let e = Healer::new(&teacher, open(), &data, few, &tmp.path().join("few"), false)
        .unwrap()
        .with_replicas(
            vec![Replica {
                teacher: &more[0],
                student: open(),
            }],
            ReplicaCopy::Direct,
        )
        .err()
        .expect("refused");
    assert!(e.to_string().contains("--grad-accum 1"), "{e}");
}

/// A word-level tokenizer over the tiny model's vocabulary (`w0` … `w96`), for the CLI.
fn write_tokenizer(dir: &Path) {
    let vocab: serde_json::Map<String, serde_json::Value> = (0..VOCAB)
        .map(|i| (format!("w{i}"), serde_json::json!(i)))
        .collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
}

/// The CLI end to end: `heal --devices cpu,cpu` (teacher and student loaded per device in
/// parallel, two replicas) logs the curve of `heal --device cpu` to 1e-6, records the
/// device list, and refuses a device list longer than --grad-accum.
#[test]
fn cli_data_parallel_run_matches_the_one_device_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, src, stock) = models(tmp.path());
    write_tokenizer(&src);
    write_tokenizer(&stock);
    // Text from the same progressions as `corpus`, as words.
    let mut r = Rng::new(21);
    let mut text = String::new();
    for _ in 0..400 {
        let start = ((r.symmetric() + 1.0) * 40.0) as usize;
        let step = 1 + ((r.symmetric() + 1.0) * 3.0) as usize;
        for i in 0..24 {
            text.push_str(&format!("w{} ", (start + i * step) % VOCAB));
        }
        text.push('\n');
    }
    let source = tmp.path().join("text.txt");
    std::fs::write(&source, text).unwrap();
    let heal = |out: &str, devices: &[&str], accum: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_care-convert"))
            .args(["heal", "--quiet", "--format", "json", "--teacher"])
            .arg(&src)
            .arg("--student")
            .arg(&stock)
            .arg("--source")
            .arg(&source)
            .args([
                "--seq-len",
                "16",
                "--heldout",
                "4",
                "--tokens",
                "640",
                "--batch",
                "2",
            ])
            .args(["--grad-accum", accum, "--lr", "1e-2", "--eval-every", "2"])
            .args(["--eval-sequences", "4", "--out"])
            .arg(tmp.path().join(out))
            .args(devices)
            .output()
            .unwrap()
    };
    let log = |out: &str| -> Vec<StepRecord> {
        std::fs::read_to_string(tmp.path().join(out).join("heal/log.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let one = heal("one", &["--device", "cpu"], "4");
    assert!(
        one.status.success(),
        "{}",
        String::from_utf8_lossy(&one.stderr)
    );
    let two = heal("two", &["--devices", "cpu,cpu"], "4");
    assert!(
        two.status.success(),
        "{}",
        String::from_utf8_lossy(&two.stderr)
    );
    let (a, b) = (log("one"), log("two"));
    assert_eq!(a.len(), 6, "5 updates of 2 × 4 × 16 tokens + the start");
    let diff = max_rel_diff(&a, &b);
    eprintln!("CLI, two CPU replicas vs one device: max relative difference {diff:.3e}");
    assert!(diff < 1e-6, "{diff:.3e}");
    assert!(b[1..].iter().all(|r| r.sync_secs.is_some()));
    let care: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("two").join("care.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(care["healing"]["device"], "cpu,cpu");
    assert_eq!(care["healing"]["data_parallel_devices"], 2);
    let few = heal("few", &["--devices", "cpu,cpu,cpu"], "2");
    assert!(!few.status.success());
    let err = String::from_utf8_lossy(&few.stderr);
    assert!(err.contains("--grad-accum is 2"), "{err}");
    assert!(
        !tmp.path().join("few").exists(),
        "nothing written for a refused run"
    );
}
