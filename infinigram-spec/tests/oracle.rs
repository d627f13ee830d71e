//! Oracle test: the infini-gram 2.6.0 package (its `rust_indexing` builder and C++ engine)
//! indexes the same documents; counts, next-token distributions and ∞-gram suffix lengths
//! must agree on hundreds of random queries.
//!
//! Needs `python3` with `pip install infini-gram==2.6.0` (override the interpreter with
//! `INFINIGRAM_PYTHON`). Without it the test is skipped with a message, unless
//! `INFINIGRAM_ORACLE=require` is set (as CI does), in which case it fails.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

use infinigram_spec::{interop, NtdOptions};
use serde_json::{json, Value};

const VOCAB: u32 = 1000;
/// The end-of-document id given to infini-gram; never used in the corpus.
const EOS: u32 = VOCAB - 1;
/// Token of the one-token last document, used nowhere else (see `corpus`).
const LAST: u32 = VOCAB - 2;

use test_support::Rng;

/// Roughly Zipf-distributed token below `n`.
fn zipf(rng: &mut Rng, n: u64) -> u32 {
    ((n as f64).powf(rng.uniform()) - 1.0) as u32
}

/// Random documents over tokens below `LAST`, then the document `[LAST]`.
///
/// The last document avoids an infini-gram 2.6.0 engine bug: when an occurrence ends at the
/// very end of `tokenized` (end of file sorts first, the separator last), `ntd` sees the
/// same "end of document" next token at both ends of the range and reports every
/// continuation as EOS.
fn corpus(rng: &mut Rng) -> Vec<Vec<u32>> {
    // Phrases repeated across documents give long matches and skewed distributions.
    let phrases: Vec<Vec<u32>> = (0..40)
        .map(|_| {
            (0..2 + rng.below(12))
                .map(|_| zipf(rng, LAST as u64))
                .collect()
        })
        .collect();
    let mut docs: Vec<Vec<u32>> = (0..400)
        .map(|_| {
            let len = rng.below(1200) as usize;
            let mut doc = Vec::with_capacity(len + 16);
            while doc.len() < len {
                if rng.below(3) == 0 {
                    doc.extend_from_slice(&phrases[rng.below(40) as usize]);
                } else {
                    doc.push(zipf(rng, LAST as u64));
                }
            }
            doc
        })
        .collect();
    docs.push(vec![LAST]);
    docs
}

fn queries(rng: &mut Rng, docs: &[Vec<u32>]) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let mut ngrams = Vec::new();
    while ngrams.len() < 300 {
        let doc = &docs[rng.below(docs.len() as u64) as usize];
        let n = 1 + rng.below(8) as usize;
        match rng.below(4) {
            // Random ids, often absent.
            0 => ngrams.push((0..n).map(|_| rng.below(EOS as u64) as u32).collect()),
            _ if doc.len() > n => {
                let at = rng.below((doc.len() - n) as u64) as usize;
                ngrams.push(doc[at..at + n].to_vec());
            }
            _ => {}
        }
    }
    let mut contexts = Vec::new();
    while contexts.len() < 200 {
        let doc = &docs[rng.below(docs.len() as u64) as usize];
        if doc.len() < 24 {
            continue;
        }
        let at = rng.below((doc.len() - 24) as u64) as usize;
        let mut ctx = doc[at..at + 24].to_vec();
        // Perturb one token so the longest match is usually shorter than the context.
        let k = rng.below(24) as usize;
        ctx[k] = rng.below(EOS as u64) as u32;
        contexts.push(ctx);
    }
    (ngrams, contexts)
}

fn python() -> String {
    std::env::var("INFINIGRAM_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn ask(request: &Value) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/infinigram_oracle.py");
    let mut child = Command::new(python())
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start python");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "oracle script failed");
    serde_json::from_slice(&out.stdout).expect("oracle JSON")
}

fn their_ntd(v: &Value) -> BTreeMap<u32, u64> {
    v["next"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, c)| (k.parse().unwrap(), c.as_u64().unwrap()))
        .filter(|&(_, c)| c > 0)
        .collect()
}

fn our_ntd(next: &[infinigram_spec::NextCount]) -> BTreeMap<u32, u64> {
    let mut m = BTreeMap::new();
    for n in next {
        *m.entry(n.token.unwrap_or(EOS)).or_insert(0) += n.count;
    }
    m
}

#[test]
fn agrees_with_infini_gram() {
    let required = std::env::var("INFINIGRAM_ORACLE").is_ok_and(|v| v == "require");
    let Some(rust_indexing) = interop::find_rust_indexing(&python()) else {
        assert!(
            !required,
            "INFINIGRAM_ORACLE=require but infini-gram is not importable"
        );
        eprintln!("SKIPPED agrees_with_infini_gram: `pip install infini-gram==2.6.0` to run it");
        return;
    };
    let mut rng = Rng::new(0x9E37_79B9_7F4A_7C15);
    let docs = corpus(&mut rng);
    let (ngrams, contexts) = queries(&mut rng, &docs);

    let tmp = tempfile::tempdir().unwrap();
    // INFINIGRAM_ORACLE_KEEP=1 keeps infini-gram's index for debugging.
    let dir_path = if std::env::var_os("INFINIGRAM_ORACLE_KEEP").is_some() {
        tmp.keep()
    } else {
        tmp.path().to_path_buf()
    };
    eprintln!("oracle index in {}", dir_path.display());
    let dir = &dir_path;
    let size = interop::write_v4(dir, docs.iter().map(|d| d.as_slice()), 2).unwrap();
    assert!(size > 2 * 100_000, "big enough for two make-part ranges");
    interop::build_v4_table(&rust_indexing, dir, 2, 2).unwrap();
    // Several shards on our side: results must add up to the single-shard oracle.
    let ours = common::build(&docs, VOCAB, 100_000);
    assert!(ours.shard_count() >= 3);

    let big = 1u64 << 40; // exact distributions on both sides
    let request = json!({
        "index_dir": dir, "token_dtype": "u16", "eos": EOS, "vocab_size": VOCAB,
        "tasks": [
            {"op": "count", "queries": ngrams},
            {"op": "ntd", "queries": ngrams, "max_support": big},
            {"op": "infgram_ntd", "queries": contexts, "max_support": big},
        ]
    });
    let reply = ask(&request);
    let results = reply["results"].as_array().unwrap();
    let (counts, ntds, infgrams) = (
        &results[0]["answers"],
        &results[1]["answers"],
        &results[2]["answers"],
    );

    let mut nonzero = 0;
    for (i, q) in ngrams.iter().enumerate() {
        let c = ours.count(q).unwrap();
        assert_eq!(c, counts[i].as_u64().unwrap(), "count {q:?}");
        assert_eq!(c, common::count(&docs, q), "brute count {q:?}");
        nonzero += (c > 0) as usize;
        let ntd = ours
            .ntd(
                q,
                NtdOptions {
                    top_k: None,
                    max_support: 0,
                },
            )
            .unwrap();
        assert_eq!(ntd.prompt_count, ntds[i]["prompt_cnt"].as_u64().unwrap());
        assert_eq!(our_ntd(&ntd.next), their_ntd(&ntds[i]), "ntd {q:?}");
    }
    assert!(nonzero > 150, "most n-grams should occur ({nonzero})");

    let mut lengths = Vec::new();
    for (i, ctx) in contexts.iter().enumerate() {
        let m = ours.longest_suffix(ctx, usize::MAX).unwrap();
        let theirs = &infgrams[i];
        assert_eq!(
            m.len() as u64,
            theirs["suffix_len"].as_u64().unwrap(),
            "suffix {ctx:?}"
        );
        lengths.push(m.len());
        if !m.is_empty() {
            let ntd = ours.ntd_of_ranges(
                m.ranges(),
                m.len(),
                NtdOptions {
                    top_k: None,
                    max_support: 0,
                },
            );
            assert_eq!(ntd.prompt_count, theirs["prompt_cnt"].as_u64().unwrap());
            assert_eq!(our_ntd(&ntd.next), their_ntd(theirs), "infgram ntd {ctx:?}");
        }
    }
    lengths.sort();
    assert!(
        lengths[lengths.len() / 2] >= 2,
        "median match length {lengths:?}"
    );
    eprintln!(
        "oracle: {} n-grams ({nonzero} present) and {} contexts agree",
        ngrams.len(),
        contexts.len()
    );
}
