//! `--mode runner`: the one engine ([`Engine`]) on the GPU
//! ([`CudaPagedModel`]) for real converted checkpoints.
//!
//! Checks: the CUDA runner (f32 weights, f32 cache) generates the same greedy tokens as
//! the CPU runner (f32) with requests joining mid-way, on random stock DeepSeek-V2
//! checkpoints (plain and q-LoRA with biases, the converted-Qwen2 form), random one-shot
//! checkpoints (separate latents, shared latent, Qwen2 biases) and every `--model`; bf16 weights and cache are compared and reported; a request larger than
//! the cache is refused and the others finish unchanged.
//! Bench: bf16 weights and cache, every `--ctx` × `--batch`: prefill tokens/s, then
//! decode ms/step and tokens/s with every request active.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::DType;
use half::bf16;
use mla_attention::cuda::{CudaLatentElem, CudaPagedModel, CudaRunnerOptions};
use mla_attention::engine::{Engine, EngineConfig, GenerationRequest, RequestId};
use mla_attention::io::Checkpoint;
use mla_attention::runner::{CpuPagedModel, PagedModel, RunnerConfig};
use test_support::fixture::{RandomDeepseek, RandomOneShot};

const BLOCK: usize = 64;

#[derive(Debug, Clone, serde::Serialize)]
pub struct RunnerCheck {
    pub model: String,
    /// "cuda f32/f32" (weights/cache) or "cuda bf16/bf16".
    pub variant: String,
    pub requests: usize,
    pub tokens: usize,
    /// Tokens equal to the CPU runner's, position by position.
    pub equal_tokens: usize,
    /// Per request: index of the first token that differs (None = identical).
    pub first_divergence: Vec<Option<usize>>,
    /// Whether this variant must match exactly (f32) or is reported (bf16).
    pub must_match: bool,
    pub passed: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RunnerCell {
    pub model: String,
    pub ctx: usize,
    pub batch: usize,
    pub prefill_tokens_per_s: f64,
    pub decode_ms_per_step: f64,
    pub decode_tokens_per_s: f64,
    pub kv_bytes_per_token: usize,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct RunnerReport {
    pub checks: Vec<RunnerCheck>,
    pub bad_input: Vec<String>,
    pub cells: Vec<RunnerCell>,
    pub failures: usize,
}

/// Prompts: token windows of a text (if the model has a tokenizer and `text` exists),
/// else deterministic ids.
struct Prompts {
    ids: Vec<u32>,
}

impl Prompts {
    fn new(ckpt: &Checkpoint, text: Option<&Path>) -> Result<Self> {
        let vocab = ckpt.spec.vocab_size as u64;
        if let (Ok(tok), Some(path)) = (ckpt.tokenizer(), text) {
            let s = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let ids = mla_attention::io::tokenizer::encode(tok, &s)?;
            if ids.len() >= 256 {
                return Ok(Prompts { ids });
            }
        }
        let mut rng = test_support::Rng::new(0x2545_F491_4F6C_DD1D);
        let ids = (0..65536).map(|_| rng.below(vocab) as u32).collect();
        Ok(Prompts { ids })
    }

    /// Request `i`'s prompt of `len` tokens (windows wrap around the text).
    fn get(&self, i: usize, len: usize) -> Vec<u32> {
        let n = self.ids.len();
        let start = (i * 977) % n;
        (0..len).map(|k| self.ids[(start + k) % n]).collect()
    }
}

/// Run the same schedule on any runner: requests 0 and 1 at once, request 2 after two
/// steps; greedy tokens per request.
fn schedule<M: PagedModel>(
    runner: &mut Engine<M>,
    prompts: &[Vec<u32>],
    max_new: usize,
) -> Result<Vec<Vec<u32>>> {
    let mut ids: Vec<RequestId> = Vec::new();
    for p in &prompts[..2] {
        ids.push(runner.submit(GenerationRequest::greedy(p.clone(), max_new))?);
    }
    runner.step()?;
    runner.step()?;
    for p in &prompts[2..] {
        ids.push(runner.submit(GenerationRequest::greedy(p.clone(), max_new))?);
    }
    let done: BTreeMap<RequestId, Vec<u32>> = runner.run_to_completion()?;
    Ok(ids.iter().map(|id| done[id].clone()).collect())
}

fn compare(
    model: &str,
    variant: &str,
    want: &[Vec<u32>],
    got: &[Vec<u32>],
    must_match: bool,
) -> RunnerCheck {
    let mut equal = 0;
    let mut first = Vec::new();
    for (w, g) in want.iter().zip(got) {
        equal += w.iter().zip(g).filter(|(a, b)| a == b).count();
        first.push(
            w.iter()
                .zip(g)
                .position(|(a, b)| a != b)
                .or((w.len() != g.len()).then(|| w.len().min(g.len()))),
        );
    }
    let tokens = want.iter().map(Vec::len).sum();
    let passed = !must_match || first.iter().all(Option::is_none);
    RunnerCheck {
        model: model.into(),
        variant: variant.into(),
        requests: want.len(),
        tokens,
        equal_tokens: equal,
        first_divergence: first,
        must_match,
        passed,
    }
}

fn cuda_runner<T: CudaLatentElem>(
    ckpt: &Checkpoint,
    num_blocks: usize,
    dtype: DType,
) -> Result<Engine<CudaPagedModel<T>>> {
    let cfg = RunnerConfig {
        block_size: BLOCK,
        num_blocks,
    };
    let opts = CudaRunnerOptions {
        dtype,
        ..Default::default()
    };
    let model = CudaPagedModel::<T>::load(&ckpt.spec, ckpt.weights.as_ref(), cfg, opts)?;
    Ok(Engine::new(model, EngineConfig::default()))
}

/// CPU f32 vs CUDA f32/f32 (must match) and CUDA bf16/bf16 (reported).
fn check_model(
    rep: &mut RunnerReport,
    name: &str,
    ckpt: &Checkpoint,
    text: Option<&Path>,
    prompt_len: usize,
    max_new: usize,
) -> Result<()> {
    let prompts = Prompts::new(ckpt, text)?;
    let ps: Vec<Vec<u32>> = (0..3).map(|i| prompts.get(i, prompt_len + 7 * i)).collect();
    let blocks = 3 * (prompt_len + 14 + max_new).div_ceil(BLOCK) + 4;
    let t = Instant::now();
    let cpu_model: CpuPagedModel = CpuPagedModel::load(
        &ckpt.spec,
        ckpt.weights.as_ref(),
        RunnerConfig {
            block_size: BLOCK,
            num_blocks: blocks,
        },
    )?;
    let mut cpu = Engine::new(cpu_model, EngineConfig::default());
    let want = schedule(&mut cpu, &ps, max_new)?;
    eprintln!(
        "runner check {name}: CPU reference in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let got = schedule(
        &mut cuda_runner::<f32>(ckpt, blocks, DType::F32)?,
        &ps,
        max_new,
    )?;
    let c = compare(name, "cuda f32/f32", &want, &got, true);
    eprintln!("runner check {name} f32: {c:?}");
    rep.checks.push(c);
    let got = schedule(
        &mut cuda_runner::<bf16>(ckpt, blocks, DType::BF16)?,
        &ps,
        max_new,
    )?;
    let c = compare(name, "cuda bf16/bf16", &want, &got, false);
    eprintln!("runner check {name} bf16: {c:?}");
    rep.checks.push(c);
    Ok(())
}

/// A request larger than the cache is refused; the admitted ones finish as alone.
fn bad_input(rep: &mut RunnerReport, ckpt: &Checkpoint) -> Result<()> {
    let mut r = cuda_runner::<f32>(ckpt, 3, DType::F32)?; // 3 blocks of 64 tokens
    let alone = {
        let mut r1 = cuda_runner::<f32>(ckpt, 3, DType::F32)?;
        let id = r1.submit(GenerationRequest::greedy(vec![3, 5, 7, 9], 20))?;
        r1.run_to_completion()?.remove(&id).context("finished")?
    };
    let a = r.submit(GenerationRequest::greedy(vec![3, 5, 7, 9], 20))?;
    r.step()?;
    let mut ok = true;
    match r.submit(GenerationRequest::greedy(vec![1; 200], 10)) {
        Err(mla_attention::Error::CacheFull { .. }) => {}
        other => {
            ok = false;
            rep.bad_input.push(format!(
                "oversized request: expected CacheFull, got {other:?}"
            ));
        }
    }
    let vocab = ckpt.spec.vocab_size as u32;
    if r.submit(GenerationRequest::greedy(vec![vocab], 2)).is_ok() {
        ok = false;
        rep.bad_input
            .push("out-of-vocabulary prompt accepted".into());
    }
    let out = r.run_to_completion()?.remove(&a).context("finished")?;
    if out != alone {
        ok = false;
        rep.bad_input
            .push("the admitted request changed after refused requests".into());
    }
    if r.model().free_blocks() != 3 {
        ok = false;
        rep.bad_input.push(format!(
            "{} of 3 blocks free at the end",
            r.model().free_blocks()
        ));
    }
    if ok {
        rep.bad_input.push("ok: oversized and out-of-vocabulary requests refused, the admitted one unchanged, all blocks back".into());
    } else {
        rep.failures += 1;
    }
    Ok(())
}

fn bench_cells(
    rep: &mut RunnerReport,
    name: &str,
    ckpt: &Checkpoint,
    text: Option<&Path>,
    ctxs: &[usize],
    batches: &[usize],
    new: usize,
) -> Result<()> {
    let prompts = Prompts::new(ckpt, text)?;
    let max_b = *batches.iter().max().unwrap_or(&1);
    let max_ctx = *ctxs.iter().max().unwrap_or(&1);
    let blocks = max_b * (max_ctx + new).div_ceil(BLOCK) + 8;
    let mut r = cuda_runner::<bf16>(ckpt, blocks, DType::BF16)?;
    // Warm-up (kernel loading, cuBLAS handles).
    let id = r.submit(GenerationRequest::greedy(prompts.get(0, 64), 4))?;
    r.run_to_completion()?.remove(&id);
    for &ctx in ctxs {
        for &b in batches {
            let t = Instant::now();
            for i in 0..b {
                r.submit(GenerationRequest::greedy(prompts.get(i, ctx), new))?;
            }
            r.step()?; // emits the prefill tokens (synchronises)
            let prefill_s = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let mut steps = 0;
            while !r.is_idle() {
                r.step()?;
                steps += 1;
            }
            let ms = t.elapsed().as_secs_f64() * 1e3 / steps.max(1) as f64;
            r.take_finished();
            let cell = RunnerCell {
                model: name.into(),
                ctx,
                batch: b,
                prefill_tokens_per_s: (b * ctx) as f64 / prefill_s,
                decode_ms_per_step: ms,
                decode_tokens_per_s: b as f64 * 1e3 / ms,
                kv_bytes_per_token: r.model().bytes_per_token(),
            };
            eprintln!(
                "runner bench {name} ctx {ctx} batch {b}: prefill {:.0} tok/s, decode {:.2} ms/step, {:.0} tok/s",
                cell.prefill_tokens_per_s, cell.decode_ms_per_step, cell.decode_tokens_per_s
            );
            rep.cells.push(cell);
        }
    }
    Ok(())
}

/// Writes a random checkpoint into a directory.
type WriteFixture<'a> = &'a dyn Fn(&Path) -> mla_attention::Result<()>;

pub struct RunnerArgs<'a> {
    pub models: &'a [PathBuf],
    pub text: Option<&'a Path>,
    pub ctxs: &'a [usize],
    pub batches: &'a [usize],
    pub new: usize,
    pub quick: bool,
}

pub fn run(a: &RunnerArgs<'_>) -> Result<RunnerReport> {
    let mut rep = RunnerReport::default();
    let dir = std::env::temp_dir().join("mla-runner-fixtures");
    let one_shot = RandomOneShot::tiny();
    let fixtures: [(&str, WriteFixture<'_>); 5] = [
        ("random tiny", &|d| RandomDeepseek::tiny().write(d)),
        ("random tiny, q-LoRA + biases", &|d| {
            RandomDeepseek {
                q_lora_rank: Some(33),
                attention_bias: true,
                ..RandomDeepseek::tiny()
            }
            .write(d)
        }),
        ("random one-shot, separate latents", &|d| one_shot.write(d)),
        ("random one-shot, shared latent", &|d| {
            RandomOneShot {
                shared: true,
                ranks: (7, 7),
                ..one_shot.clone()
            }
            .write(d)
        }),
        ("random one-shot, Qwen2 biases", &|d| {
            RandomOneShot {
                qwen2: true,
                ..one_shot.clone()
            }
            .write(d)
        }),
    ];
    for (name, write) in fixtures {
        let d = dir.join(name.replace([' ', ',', '+', '-'], "_"));
        std::fs::create_dir_all(&d)?;
        write(&d)?;
        let ckpt = Checkpoint::open(&d)?;
        check_model(&mut rep, name, &ckpt, None, 37, 24)?;
        if name == "random tiny" {
            bad_input(&mut rep, &ckpt)?;
        }
    }
    for m in a.models {
        let name = m
            .file_name()
            .map_or_else(|| m.display().to_string(), |n| n.to_string_lossy().into());
        let ckpt = Checkpoint::open(m).with_context(|| format!("opening {}", m.display()))?;
        let (plen, new) = if a.quick { (48, 16) } else { (96, 48) };
        check_model(&mut rep, &name, &ckpt, a.text, plen, new)?;
        bench_cells(&mut rep, &name, &ckpt, a.text, a.ctxs, a.batches, a.new)?;
    }
    rep.failures += rep.checks.iter().filter(|c| !c.passed).count();
    Ok(rep)
}
