//! Benchmark: build and query infinigram-spec beside infini-gram 2.6.0 on a real corpus.
//!
//! Tokenizes the corpus (default: `$CARE_ASSETS/data/{sotu, python3.11-docs,
//! cpython3.11-stdlib, exllamav2-cal}`), holds out every `--held-out-every`-th document,
//! builds our index (one shard, then two shards in parallel) and infini-gram's (its
//! `rust_indexing`, 2 processes), and times count, NTD, cold longest match on 32-token
//! held-out contexts, ∞-gram NTD and incremental advance on both engines in the same run.
//! Prints a markdown table; `--json-out` also writes the numbers.
//!
//! ```text
//! cargo run --release -p infinigram-spec --bin infinigram-bench -- \
//!     --tokenizer ~/.cache/care-assets/models/smollm2-135m-instruct/tokenizer.json
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use infinigram_spec::build::{collect_files, TextCorpus};
use infinigram_spec::spec::Rng;
use infinigram_spec::{
    interop, BuildConfig, Index, IndexBuilder, NoProgress, NtdOptions, OpenOptions,
};
use serde_json::{json, Value};

#[derive(Parser)]
struct Args {
    /// tokenizer.json used to tokenize the corpus.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Without --tokenizer: train a stand-in byte-level BPE of this vocabulary size on the
    /// corpus (first ~24 MB of files) and use it.
    #[arg(long)]
    train_bpe: Option<usize>,
    /// Corpus files or folders (default: the fetched assets).
    #[arg(long)]
    corpus: Vec<PathBuf>,
    /// Leave out files whose path contains this (repeatable; e.g. `site-packages`).
    #[arg(long)]
    exclude: Vec<String>,
    /// Working folder for indexes.
    #[arg(long, default_value = "target/infinigram-bench")]
    work_dir: PathBuf,
    /// Queries per type.
    #[arg(long, default_value_t = 2000)]
    queries: usize,
    /// Every n-th document is held out of the index and used for queries.
    #[arg(long, default_value_t = 50)]
    held_out_every: usize,
    /// Skip infini-gram (when the package is not installed).
    #[arg(long)]
    skip_infinigram: bool,
    /// Python with infini-gram 2.6.0 installed.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Write all numbers as JSON here.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

/// Uniform in `0..n` from the sampler's generator (any seeded stream does).
fn below(rng: &mut Rng, n: usize) -> usize {
    (rng.next_u64() % n.max(1) as u64) as usize
}

/// p50, p99 and mean of per-query nanoseconds, in microseconds.
fn stats(ns: &mut [u64]) -> Value {
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() - 1) as f64 * q) as usize] as f64 / 1e3;
    let mean = ns.iter().sum::<u64>() as f64 / ns.len().max(1) as f64 / 1e3;
    json!({"p50_us": at(0.5), "p99_us": at(0.99), "mean_us": mean, "n": ns.len()})
}

fn time_each<Q>(queries: &[Q], mut f: impl FnMut(&Q)) -> Vec<u64> {
    for q in queries.iter().take(200) {
        f(q); // warm caches and page cache
    }
    queries
        .iter()
        .map(|q| {
            let t = Instant::now();
            f(q);
            t.elapsed().as_nanos() as u64
        })
        .collect()
}

fn default_corpus() -> anyhow::Result<Vec<PathBuf>> {
    let root = std::env::var_os("CARE_ASSETS")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/care-assets")))
        .context("set CARE_ASSETS or HOME")?;
    let dirs: Vec<PathBuf> = [
        "sotu",
        "python3.11-docs",
        "cpython3.11-stdlib",
        "exllamav2-cal",
    ]
    .iter()
    .map(|d| root.join("data").join(d))
    .collect();
    if let Some(missing) = dirs.iter().find(|d| !d.exists()) {
        bail!(
            "{} is missing: run scripts/fetch_assets.py",
            missing.display()
        );
    }
    Ok(dirs)
}

fn train_bpe(files: &[PathBuf], vocab: usize, out: &Path) -> anyhow::Result<()> {
    use tokenizers::decoders::DecoderWrapper;
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::normalizers::NormalizerWrapper;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::PreTokenizerWrapper;
    use tokenizers::processors::PostProcessorWrapper;
    use tokenizers::{TokenizerBuilder, TokenizerImpl};
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tok: TokenizerImpl<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    > = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(ByteLevel::default())))
        .with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())))
        .build()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    // Spread the training sample over the corpus: every k-th file up to ~24 MB.
    let total: u64 = files
        .iter()
        .filter_map(|f| f.metadata().ok())
        .map(|m| m.len())
        .sum();
    let step = (total / (24 << 20)).max(1) as usize;
    let sample: Vec<String> = files
        .iter()
        .step_by(step)
        .filter(|f| std::fs::read_to_string(f).is_ok()) // the trainer needs UTF-8
        .map(|f| f.to_string_lossy().into_owned())
        .collect();
    tok.train_from_files(&mut trainer, sample)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    tok.save(out, false).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

fn infinigram(python: &str, request: &Value) -> anyhow::Result<Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/infinigram_oracle.py");
    let mut child = Command::new(python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting python")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(request.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("infini-gram script failed");
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.work_dir)?;
    let roots = if args.corpus.is_empty() {
        default_corpus()?
    } else {
        args.corpus.clone()
    };
    let exts = [".py", ".txt", ".utf8"].map(String::from);
    let files: Vec<PathBuf> = collect_files(&roots, &exts)?
        .into_iter()
        .filter(|f| {
            !args
                .exclude
                .iter()
                .any(|x| f.to_string_lossy().contains(x.as_str()))
        })
        .collect();
    let tokenizer = match (&args.tokenizer, args.train_bpe) {
        (Some(t), _) => t.clone(),
        (None, Some(v)) => {
            let out = args.work_dir.join(format!("stand-in-bpe-{v}.json"));
            if !out.exists() {
                eprintln!("training a stand-in byte-level BPE ({v} ids)...");
                train_bpe(&files, v, &out)?;
            }
            out
        }
        (None, None) => bail!("give --tokenizer or --train-bpe"),
    };

    // Tokenize.
    let t = Instant::now();
    let corpus = TextCorpus::new(&tokenizer, files.clone())?;
    let vocab = corpus.vocab_size() as u32;
    let hash = corpus.tokenizer_hash()?;
    let docs: Vec<Vec<u32>> = corpus.collect::<Result<_, _>>()?;
    let tokenize_s = t.elapsed().as_secs_f64();
    let bytes_in: u64 = files
        .iter()
        .filter_map(|f| f.metadata().ok())
        .map(|m| m.len())
        .sum();
    let every = args.held_out_every.max(2);
    let (mut indexed, mut held) = (Vec::new(), Vec::new());
    for (i, d) in docs.into_iter().enumerate() {
        if i % every == every - 1 {
            held.push(d)
        } else {
            indexed.push(d)
        }
    }
    let n_tokens: u64 = indexed.iter().map(|d| d.len() as u64).sum();
    eprintln!("{} files, {:.1} MB, {n_tokens} indexed tokens, vocab {vocab}, tokenized in {tokenize_s:.1} s", files.len(), bytes_in as f64 / 1e6);

    // Build ours: one shard (the query index) and two shards in parallel.
    let mut config = BuildConfig::new(vocab);
    config.tokenizer_hash = hash;
    config.jobs = 2;
    let path1 = args.work_dir.join("ours-1shard.igs");
    let b1 = IndexBuilder::new(config.clone())?.build_file(
        &path1,
        indexed.iter().cloned().map(Ok),
        &NoProgress,
    )?;
    let longest_doc = indexed
        .iter()
        .map(|d| d.len() as u64 + 1)
        .max()
        .unwrap_or(1);
    // Two shards: half the slots plus room for the document that crosses the middle.
    config.shard_tokens = (n_tokens + indexed.len() as u64).div_ceil(2) + longest_doc;
    let path2 = args.work_dir.join("ours-2shards.igs");
    let b2 = IndexBuilder::new(config)?.build_file(
        &path2,
        indexed.iter().cloned().map(Ok),
        &NoProgress,
    )?;
    eprintln!(
        "ours: 1 shard {:.2} s, 2 shards {:.2} s",
        b1.seconds, b2.seconds
    );

    // Queries from held-out text.
    let mut rng = Rng::new(0x2545F4914F6CDD1D);
    let held_long: Vec<&Vec<u32>> = held.iter().filter(|d| d.len() > 40).collect();
    if held_long.is_empty() {
        bail!("no held-out documents longer than 40 tokens");
    }
    let mut window = |n: usize| -> Vec<u32> {
        let d = held_long[below(&mut rng, held_long.len())];
        let at = below(&mut rng, d.len() - n);
        d[at..at + n].to_vec()
    };
    let count_q: Vec<Vec<u32>> = (0..args.queries).map(|i| window(1 + i % 8)).collect();
    let ntd_q: Vec<Vec<u32>> = (0..args.queries).map(|i| window(1 + i % 4)).collect();
    let ctx_q: Vec<Vec<u32>> = (0..args.queries).map(|_| window(32)).collect();
    // Held-out documents streamed token by token (about `--queries` × 2 tokens).
    let mut stream: Vec<&[u32]> = Vec::new();
    let mut stream_tokens = 0usize;
    for d in held.iter().skip(1).step_by(3) {
        let take = d.len().min(2 * args.queries - stream_tokens);
        stream.push(&d[..take]);
        stream_tokens += take;
        if stream_tokens >= 2 * args.queries {
            break;
        }
    }

    let mut report = json!({
        "corpus_files": files.len(), "corpus_bytes": bytes_in, "vocab_size": vocab,
        "tokenizer": tokenizer, "indexed_tokens": n_tokens, "held_out_docs": held.len(),
        "tokenize_seconds": tokenize_s, "ours_build_1shard": b1, "ours_build_2shards": b2,
    });
    let mut ours = serde_json::Map::new();
    for (label, path) in [("1shard", &path1), ("2shards", &path2)] {
        let index = Index::open(path, OpenOptions::default())?;
        let opts = NtdOptions {
            top_k: None,
            max_support: 1000,
        };
        let mut r = serde_json::Map::new();
        r.insert(
            "count".into(),
            stats(&mut time_each(&count_q, |q| {
                index.count(q).ok();
            })),
        );
        r.insert(
            "ntd".into(),
            stats(&mut time_each(&ntd_q, |q| {
                index.ntd(q, opts).ok();
            })),
        );
        r.insert(
            "longest".into(),
            stats(&mut time_each(&ctx_q, |q| {
                index.longest_suffix(q, usize::MAX).ok();
            })),
        );
        r.insert(
            "infgram_ntd".into(),
            stats(&mut time_each(&ctx_q, |q| {
                if let Ok(m) = index.longest_suffix(q, usize::MAX) {
                    index.ntd_of_ranges(m.ranges(), m.len(), opts);
                }
            })),
        );
        let mut ns = Vec::with_capacity(stream_tokens);
        let mut lens = 0usize;
        for doc in &stream {
            let mut state = index.empty_match(usize::MAX);
            for &t in doc.iter() {
                let s = Instant::now();
                lens += state.advance(&index, t).unwrap_or(0);
                ns.push(s.elapsed().as_nanos() as u64);
            }
        }
        let mut adv = stats(&mut ns);
        adv["mean_match_len"] = json!(lens as f64 / stream_tokens.max(1) as f64);
        r.insert("advance".into(), adv);
        ours.insert(label.into(), Value::Object(r));
    }
    report["ours"] = Value::Object(ours);

    if !args.skip_infinigram {
        let bench = Baseline {
            args: &args,
            indexed: &indexed,
            stream: &stream,
            count_q: &count_q,
            ntd_q: &ntd_q,
            ctx_q: &ctx_q,
            path: &path1,
            vocab,
            n_tokens,
        };
        report["infinigram"] = run_infinigram(&bench).unwrap_or_else(|e| {
            eprintln!("infini-gram failed: {e:#}");
            json!({ "error": format!("{e:#}") })
        });
    }
    print_table(&report);
    if let Some(p) = &args.json_out {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}

/// What the infini-gram baseline needs from `main`.
struct Baseline<'a> {
    args: &'a Args,
    indexed: &'a [Vec<u32>],
    stream: &'a [&'a [u32]],
    count_q: &'a [Vec<u32>],
    ntd_q: &'a [Vec<u32>],
    ctx_q: &'a [Vec<u32>],
    /// Our one-shard index, to compare answers.
    path: &'a Path,
    vocab: u32,
    n_tokens: u64,
}

/// Builds infini-gram's index of the same documents and times the same queries.
fn run_infinigram(b: &Baseline<'_>) -> anyhow::Result<Value> {
    let exe = interop::find_rust_indexing(&b.args.python).context("infini-gram not installed")?;
    let dir = b.args.work_dir.join("infinigram");
    let _ = std::fs::remove_dir_all(&dir);
    let width = if b.vocab <= 65_535 { 2 } else { 4 };
    interop::write_v4(&dir, b.indexed.iter().map(|d| d.as_slice()), width)?;
    let build = interop::build_v4_table(&exe, &dir, width, 2)?.as_secs_f64();
    let bytes: u64 = ["tokenized.0", "table.0", "offset.0"]
        .iter()
        .filter_map(|f| dir.join(f).metadata().ok())
        .map(|m| m.len())
        .sum();
    eprintln!("infini-gram: built in {build:.2} s");
    let stream_ctx: Vec<Vec<u32>> = b
        .stream
        .iter()
        .flat_map(|d| (1..=d.len()).map(move |i| d[i.saturating_sub(32)..i].to_vec()))
        .collect();
    let eos = b.vocab.min(if width == 2 { 65_535 } else { u32::MAX }) - 1;
    let request = json!({
        "index_dir": dir, "token_dtype": if width == 2 { "u16" } else { "u32" },
        "eos": eos, "vocab_size": if width == 2 { 65_535 } else { b.vocab },
        "tasks": [
            {"op": "count", "queries": b.count_q, "time": true},
            {"op": "ntd", "queries": b.ntd_q, "max_support": 1000, "time": true},
            {"op": "infgram_prob", "queries": b.ctx_q, "time": true},
            {"op": "infgram_ntd", "queries": b.ctx_q, "max_support": 1000, "time": true},
            {"op": "infgram_prob", "queries": stream_ctx, "time": true},
        ]
    });
    let reply = infinigram(&b.args.python, &request)?;
    let res = reply["results"].as_array().context("results")?;
    let ns = |i: usize| -> Vec<u64> {
        res[i]["ns"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default()
    };
    // Same answers on real data.
    let index = Index::open(b.path, OpenOptions::default())?;
    let count_mismatch = b
        .count_q
        .iter()
        .enumerate()
        .filter(|(i, q)| Some(index.count(q).unwrap_or(u64::MAX)) != res[0]["answers"][*i].as_u64())
        .count();
    let longest_mismatch = b
        .ctx_q
        .iter()
        .enumerate()
        .filter(|(i, q)| {
            let ours = index
                .longest_suffix(q, usize::MAX)
                .map(|m| m.len() as u64)
                .ok();
            ours != res[2]["answers"][*i]["suffix_len"].as_u64()
        })
        .count();
    Ok(json!({
        "build_seconds": build, "bytes": bytes, "bytes_per_token": bytes as f64 / b.n_tokens as f64,
        "count": stats(&mut ns(0)), "ntd": stats(&mut ns(1)), "longest": stats(&mut ns(2)),
        "infgram_ntd": stats(&mut ns(3)), "advance": stats(&mut ns(4)),
        "count_mismatches": count_mismatch, "longest_mismatches": longest_mismatch,
    }))
}

fn print_table(r: &Value) {
    let f = |v: &Value| {
        v.as_f64()
            .map(|x| format!("{x:.2}"))
            .unwrap_or_else(|| "–".into())
    };
    let n = r["indexed_tokens"].as_f64().unwrap_or(0.0);
    println!(
        "corpus: {} files, {:.1} MB, {} indexed tokens, vocab {}",
        r["corpus_files"],
        r["corpus_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        r["indexed_tokens"],
        r["vocab_size"]
    );
    println!("\n| build | seconds | M tokens/s | bytes/token |\n|---|---|---|---|");
    for (label, b) in [
        ("ours, 1 shard", &r["ours_build_1shard"]),
        ("ours, 2 shards in parallel", &r["ours_build_2shards"]),
    ] {
        let s = b["seconds"].as_f64().unwrap_or(f64::NAN);
        println!(
            "| {label} | {:.2} | {:.2} | {} |",
            s,
            n / s / 1e6,
            f(&b["bytes_per_token"])
        );
    }
    let failed = &r["infinigram"]["error"];
    let ig = if failed.is_null() {
        &r["infinigram"]
    } else {
        &Value::Null
    };
    if !failed.is_null() {
        println!(
            "| infini-gram rust_indexing | failed: {} | – | – |",
            failed.as_str().unwrap_or("?")
        );
    }
    if !ig.is_null() {
        let s = ig["build_seconds"].as_f64().unwrap_or(f64::NAN);
        println!(
            "| infini-gram rust_indexing (2 processes) | {s:.2} | {:.2} | {} |",
            n / s / 1e6,
            f(&ig["bytes_per_token"])
        );
    }
    println!("\n| query (µs) | ours 1 shard p50 / p99 | ours 2 shards p50 / p99 | infini-gram p50 / p99 |\n|---|---|---|---|");
    for (key, label) in [
        ("count", "count (1–8-gram)"),
        ("ntd", "NTD (1–4-token prompt, max_support 1000)"),
        ("longest", "cold longest match (32-token context)"),
        ("infgram_ntd", "∞-gram NTD (32-token context)"),
        ("advance", "incremental advance, per token"),
    ] {
        let cell = |v: &Value| format!("{} / {}", f(&v[key]["p50_us"]), f(&v[key]["p99_us"]));
        println!(
            "| {label} | {} | {} | {} |",
            cell(&r["ours"]["1shard"]),
            cell(&r["ours"]["2shards"]),
            if ig.is_null() { "–".into() } else { cell(ig) }
        );
    }
    if !ig.is_null() {
        println!(
            "\nanswers differing from infini-gram: {} counts, {} longest-match lengths",
            ig["count_mismatches"], ig["longest_mismatches"]
        );
    }
}
