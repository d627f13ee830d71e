//! `care-convert heal` and `care-convert pack-data`: argument checks, progress and
//! output around `care_convert::heal`.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::{
    CorpusArgs, Format, HealArgs, PackDataArgs, PlotLossArgs, ReplicaCopyArg, TrainWhat,
};
use care_convert::heal::data::{pack, read_corpus, tokenizer_fingerprint, CorpusOptions};
use care_convert::heal::data::{write_corpus, PackedCorpus};
use care_convert::heal::plot::plot_loss_png;
use care_convert::heal::student::{StudentParams, TrainScope};
use care_convert::heal::train::{HealOptions, Healer, Replica, ReplicaCopy, StepRecord};
use care_convert::heal::{prepare_output, write_healed, write_log};
use mla_attention::io::Checkpoint;
use mla_attention::io::OnDevice;
use mla_attention::model::Decoder;

fn device(spec: &str, flag: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal: usize = match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .with_context(|| format!("{flag} {s}: expected cuda:N"))?,
                None => 0,
            };
            if !candle_core::utils::cuda_is_available() {
                bail!("{flag} {s}: this build has no CUDA (build with --features cuda)");
            }
            Ok(Device::new_cuda(ordinal)
                .with_context(|| format!("{flag}: opening CUDA device {ordinal}"))?)
        }
        other => bail!("{flag} {other}: expected cpu, cuda or cuda:N"),
    }
}

/// The devices of `--devices LIST` (or the one of `--device`), in order.
fn devices(a: &HealArgs) -> Result<(Vec<Device>, String)> {
    let Some(list) = &a.devices else {
        return Ok((vec![device(&a.device, "--device")?], a.device.clone()));
    };
    let specs: Vec<&str> = list.split(',').map(str::trim).collect();
    if specs.iter().any(|s| s.is_empty()) {
        bail!("--devices {list}: expected a comma-separated list such as cuda:0,cuda:1");
    }
    let mut seen = Vec::new();
    for s in &specs {
        let canonical = if *s == "cuda" { "cuda:0" } else { s };
        if canonical != "cpu" && seen.contains(&canonical) {
            bail!("--devices {list}: {canonical} is listed twice (one replica per GPU)");
        }
        seen.push(canonical);
    }
    let devs = specs
        .iter()
        .map(|s| device(s, "--devices"))
        .collect::<Result<Vec<_>>>()?;
    if devs.iter().any(Device::is_cuda) && !devs.iter().all(Device::is_cuda) {
        bail!("--devices {list}: mixes CPU and CUDA devices");
    }
    Ok((devs, specs.join(",")))
}

fn corpus_options(c: &CorpusArgs, tokens: u64, seed: u64) -> Result<CorpusOptions> {
    if c.sources.is_empty() {
        bail!("no healing text: pass --source PATH (repeatable) or --data FILE");
    }
    Ok(CorpusOptions {
        sources: c.sources.clone(),
        exclude: c.exclude.clone(),
        seq_len: c.seq_len,
        max_tokens: tokens,
        heldout_sequences: c.heldout,
        seed,
    })
}

fn pack_with_bar(
    tok: &tokenizers::Tokenizer,
    eos: Option<u32>,
    opts: &CorpusOptions,
    quiet: bool,
) -> Result<PackedCorpus> {
    let pb = crate::bar(opts.max_tokens, "tokenize".into(), quiet);
    let corpus = pack(tok, eos, opts, &mut |done, want| {
        pb.set_length(want);
        pb.set_position(done.min(want));
    })?;
    pb.finish_and_clear();
    Ok(corpus)
}

pub fn run_pack_data(a: PackDataArgs) -> Result<()> {
    if a.out.exists() {
        bail!("{} already exists; choose another --out", a.out.display());
    }
    let ckpt =
        Checkpoint::open(&a.model).with_context(|| format!("opening {}", a.model.display()))?;
    let opts = corpus_options(&a.corpus, a.tokens, a.seed)?;
    let corpus = pack_with_bar(ckpt.tokenizer()?, ckpt.spec.eos_token_id, &opts, a.quiet)?;
    write_corpus(&a.out, &corpus)?;
    eprintln!(
        "wrote {}: {} training rows × {} tokens ({} tokens) + {} held out, from {} files",
        a.out.display(),
        corpus.train.len(),
        corpus.info.seq_len,
        corpus.train_tokens(),
        corpus.heldout.len(),
        corpus.info.files_read
    );
    Ok(())
}

pub fn run_heal(a: HealArgs) -> Result<()> {
    let started = Instant::now();
    let (devs, device_names) = devices(&a)?;
    let dev = devs[0].clone();
    #[cfg(feature = "cuda")]
    if devs.len() > 1 && a.replica_copy == ReplicaCopyArg::Direct {
        for d in &devs {
            if let Device::Cuda(c) = d {
                // SAFETY: candle runs every device on one stream, and the data-parallel copies
                // synchronize both devices around every cross-device copy (train.rs,
                // `move_to` and `broadcast`). With cudarc's per-slice event tracking on, a
                // peer copy records the source's event on the destination's stream — an
                // event of another context, which fails (CUDA_ERROR_INVALID_CONTEXT, kept in
                // the destination context's error state). Nothing is allocated yet.
                unsafe { c.disable_event_tracking() };
            }
        }
    }
    if devs.len() > a.grad_accum {
        bail!(
            "--devices lists {} devices but --grad-accum is {}: every device needs at least \
             one micro-batch per update (raise --grad-accum, or lower --batch to keep the \
             tokens per update)",
            devs.len(),
            a.grad_accum
        );
    }
    if a.tf32 {
        if !dev.is_cuda() {
            bail!("--tf32 applies to CUDA matrix products; the device is {device_names}");
        }
        candle_core::cuda::set_gemm_reduced_precision_f32(true);
    }
    let opts = HealOptions {
        micro_batch: a.batch,
        grad_accum: a.grad_accum,
        tokens: a.tokens,
        lr: a.lr,
        min_lr_ratio: a.min_lr_ratio,
        warmup_ratio: a.warmup,
        beta: a.beta,
        tau: a.tau,
        weight_decay: a.weight_decay,
        adam_beta1: 0.9,
        adam_beta2: 0.95,
        clip: a.clip,
        scope: match a.train {
            TrainWhat::Attention => TrainScope::Attention,
            TrainWhat::All => TrainScope::All,
        },
        eval_every: a.eval_every,
        eval_sequences: a.eval_sequences,
        save_every: a.save_every,
        seed: a.seed,
    };
    opts.validate()?;
    let state_dir = a.out.join("heal");
    if a.out.exists() && !a.resume {
        bail!(
            "{} already exists; pass --resume to continue its healing or choose another --out",
            a.out.display()
        );
    }
    // Student first: its tokenizer defines the data.
    let student = StudentParams::open(&a.student, opts.scope, &dev)
        .with_context(|| format!("opening the student {}", a.student.display()))?;
    let student_ckpt = Checkpoint::open(&a.student)?;
    let tok = student_ckpt
        .tokenizer()
        .with_context(|| format!("{}: the student has no tokenizer.json", a.student.display()))?;
    let corpus = match &a.data {
        Some(p) => {
            let c = read_corpus(p)?;
            let want = tokenizer_fingerprint(tok);
            if c.info.tokenizer != want {
                bail!(
                    "{} was packed with another tokenizer (vocabulary fingerprint {} ≠ the \
                     student's {want})",
                    p.display(),
                    c.info.tokenizer
                );
            }
            c
        }
        None => {
            let o = corpus_options(&a.corpus, a.tokens, a.seed)?;
            pack_with_bar(tok, student_ckpt.spec.eos_token_id, &o, a.quiet)?
        }
    };
    if corpus.train_tokens() < a.tokens {
        eprintln!(
            "note: the corpus holds {} training tokens, fewer than --tokens {}; rows repeat \
             (epochs reshuffle)",
            corpus.train_tokens(),
            a.tokens
        );
    }
    let teacher_ckpt =
        Checkpoint::open(&a.teacher).with_context(|| format!("opening {}", a.teacher.display()))?;
    // A teacher on every device and, for data parallelism, a student on every further
    // device, loaded in parallel (one thread per device).
    let loading = Instant::now();
    let load = |d: &Device, with_student: bool| -> Result<(Decoder, Option<StudentParams>)> {
        let on_dev = OnDevice {
            inner: teacher_ckpt.weights.as_ref(),
            device: d.clone(),
            dtype: None,
        };
        let teacher = mla_attention::load::load_decoder_weights(&teacher_ckpt.spec, &on_dev)
            .with_context(|| format!("loading the teacher {}", a.teacher.display()))?;
        let student = if with_student {
            Some(
                StudentParams::open(&a.student, opts.scope, d)
                    .with_context(|| format!("opening the student {}", a.student.display()))?,
            )
        } else {
            None
        };
        Ok((teacher, student))
    };
    let loaded: Vec<Result<(Decoder, Option<StudentParams>)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = devs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let load = &load;
                scope.spawn(move || load(d, i > 0))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| bail!("a model-loading thread panicked"))
            })
            .collect()
    });
    let mut teachers = Vec::with_capacity(devs.len());
    let mut replica_students = Vec::new();
    for l in loaded {
        let (t, s) = l?;
        teachers.push(t);
        replica_students.extend(s);
    }
    if devs.len() > 1 {
        eprintln!(
            "loaded the teacher on {} devices and {} more students in {:.1} s",
            devs.len(),
            devs.len() - 1,
            loading.elapsed().as_secs_f64()
        );
    }
    let (teacher, replica_teachers) = teachers
        .split_first()
        .context("no device to heal on (--device or --devices)")?;
    prepare_output(&a.student, &a.out)?;
    let mut healer = Healer::new(
        teacher,
        student,
        &corpus,
        opts.clone(),
        &state_dir,
        a.resume,
    )?;
    if devs.len() > 1 {
        let replicas = replica_teachers
            .iter()
            .zip(replica_students)
            .map(|(teacher, student)| Replica { teacher, student })
            .collect();
        let copy = match a.replica_copy {
            ReplicaCopyArg::Direct => ReplicaCopy::Direct,
            ReplicaCopyArg::Host => ReplicaCopy::Host,
        };
        healer = healer.with_replicas(replicas, copy)?;
    }
    if let Some(secs) = a.time_limit {
        healer.stop_by(started + std::time::Duration::from_secs(secs));
    }
    let total = healer.total_steps();
    let title = format!(
        "healing {} ({} tokens)",
        a.student
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        human(a.tokens)
    );
    eprintln!(
        "healing {} ← teacher {}: {} trainable values, {} updates × {} tokens on {}{}",
        a.student.display(),
        a.teacher.display(),
        healer.student.trainable_count(),
        total,
        corpus.info.seq_len * a.batch * a.grad_accum,
        device_names,
        if healer.step() > 0 {
            format!(", resuming at update {}", healer.step())
        } else {
            String::new()
        }
    );
    let pb = if a.quiet {
        ProgressBar::hidden()
    } else {
        let pb = ProgressBar::new(total);
        pb.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} eta {eta}")
                .expect("static template")
                .progress_chars("=> "),
        );
        pb.set_position(healer.step());
        pb
    };
    let mut last_ppl = None;
    let tokens_per_update = (corpus.info.seq_len * a.batch * a.grad_accum) as f64;
    let mut on_step = |r: &StepRecord, _total: u64| {
        if r.heldout_ppl.is_some() {
            last_ppl = r.heldout_ppl;
        }
        let tps = if r.secs > 0.0 {
            tokens_per_update / r.secs
        } else {
            0.0
        };
        pb.set_position(r.step);
        pb.set_message(format!(
            "loss {:.3} (CE {:.3} KD {:.3}) ppl {} {:.0} tok/s",
            r.loss,
            r.ce,
            r.kd,
            last_ppl.map_or("-".into(), |p| format!("{p:.2}")),
            tps
        ));
        if r.heldout_ppl.is_some() {
            pb.println(format!(
                "update {:>6} tokens {:>10} loss {:>7.4} held-out PPL {:.3}",
                r.step,
                r.tokens,
                r.loss,
                r.heldout_ppl.unwrap_or(f64::NAN)
            ));
        }
    };
    let record = |records: &[StepRecord], done: u64| -> serde_json::Value {
        serde_json::json!({
            "teacher": a.teacher.display().to_string(),
            "student": a.student.display().to_string(),
            "options": opts,
            "seq_len": corpus.info.seq_len,
            "corpus": corpus.info,
            "updates_done": done,
            "updates_total": total,
            "tokens_done": done as f64 * tokens_per_update,
            "heldout_ppl_start": records.first().and_then(|r| r.heldout_ppl),
            "heldout_ppl_last": records.iter().rev().find_map(|r| r.heldout_ppl),
            "device": device_names,
            "data_parallel_devices": devs.len(),
            "matmul_precision": if a.tf32 { "tf32" } else { "f32" },
        })
    };
    let dtype = a.dtype.dtype();
    let mut on_save = |s: &StudentParams, records: &[StepRecord]| {
        let done = records.last().map_or(0, |r| r.step);
        write_healed(&a.out, s, dtype, &record(records, done))?;
        write_log(&a.out, records, &title)
    };
    let outcome = healer.run(a.stop_after, &mut on_step, &mut on_save)?;
    pb.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let summary = serde_json::json!({
        "out": a.out.display().to_string(),
        "finished": outcome.finished,
        "updates_done": outcome.steps_done,
        "updates_total": outcome.total_steps,
        "resumed_from": outcome.resumed_from,
        "tokens_done": outcome.steps_done as f64 * tokens_per_update,
        "heldout_ppl_start": outcome.records.first().and_then(|r| r.heldout_ppl),
        "heldout_ppl_last": outcome.records.iter().rev().find_map(|r| r.heldout_ppl),
        "last_loss": outcome.records.last().map(|r| r.loss),
        "seconds": secs,
    });
    match a.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&summary)?),
        Format::Markdown => {
            println!(
                "| updates | tokens | held-out PPL start | held-out PPL now | last loss | wall s |"
            );
            println!("|---|---|---|---|---|---|");
            println!(
                "| {}/{} | {} | {} | {} | {} | {:.0} |",
                outcome.steps_done,
                outcome.total_steps,
                human((outcome.steps_done as f64 * tokens_per_update) as u64),
                fmt_opt(summary["heldout_ppl_start"].as_f64()),
                fmt_opt(summary["heldout_ppl_last"].as_f64()),
                fmt_opt(summary["last_loss"].as_f64()),
                secs
            );
            if !outcome.finished {
                println!(
                    "\nstopped early; continue with the same flags plus --resume ({})",
                    Path::new(&a.out).display()
                );
            }
        }
    }
    Ok(())
}

pub fn run_plot_loss(a: PlotLossArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.records)
        .with_context(|| format!("reading {}", a.records.display()))?;
    let records: Vec<StepRecord> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| {
                format!(
                    "{} line {}: not a healing record",
                    a.records.display(),
                    i + 1
                )
            })
        })
        .collect::<Result<_>>()?;
    if records.is_empty() {
        bail!("{} holds no records", a.records.display());
    }
    plot_loss_png(&records, &a.title, &a.out)?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.3}"))
}

fn human(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}k", n as f64 / 1e3),
        n => n.to_string(),
    }
}
