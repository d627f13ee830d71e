//! End-to-end runs of the `infinigram` binary with a word-level tokenizer written by the
//! test (no network).

use std::path::Path;
use std::process::Command;

use serde_json::Value;

const WORDS: [&str; 8] = ["[UNK]", "the", "cat", "sat", "on", "mat", "a", "dog"];

fn write_tokenizer(path: &Path) {
    let vocab: serde_json::Map<String, Value> = WORDS
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), Value::from(i)))
        .collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    std::fs::write(path, tok.to_string()).unwrap();
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_infinigram"))
        .args(args)
        .output()
        .expect("run infinigram");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(args: &[&str]) -> Value {
    let (ok, stdout, stderr) = run(args);
    assert!(ok, "{args:?} failed: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout}"))
}

#[test]
fn build_query_stats_from_text() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tok = d.join("tokenizer.json");
    write_tokenizer(&tok);
    let corpus = d.join("corpus");
    std::fs::create_dir_all(corpus.join("sub")).unwrap();
    std::fs::write(corpus.join("a.txt"), "the cat sat on the mat").unwrap();
    std::fs::write(corpus.join("sub/b.txt"), "the cat sat on a dog").unwrap();
    std::fs::write(
        corpus.join("c.jsonl"),
        "{\"text\": \"a cat sat\"}\n{\"text\": \"the dog\"}\n",
    )
    .unwrap();
    std::fs::write(corpus.join("skip.md"), "the the the").unwrap();
    let index = d.join("idx.igs");
    let (i, t) = (index.to_str().unwrap(), tok.to_str().unwrap());
    let c = corpus.to_str().unwrap();
    let summary = json(&[
        "build",
        c,
        "-o",
        i,
        "--tokenizer",
        t,
        "--extension",
        ".txt",
        "--extension",
        ".jsonl",
        "--json",
        "--shard-tokens",
        "8",
    ]);
    // a.txt 6 + b.txt 6 + 3 + 2 tokens; 4 documents; shards of at most 8 slots.
    assert_eq!(summary["tokens"], 17);
    assert_eq!(summary["docs"], 4);
    assert_eq!(summary["shards"], 3);

    let q = |op: &str, text: &str| {
        json(&[
            "query",
            "-i",
            i,
            "--tokenizer",
            t,
            "--op",
            op,
            "--text",
            text,
            "--json",
        ])
    };
    assert_eq!(q("count", "cat sat")["count"], 3);
    assert_eq!(q("count", "the")["count"], 4);
    let ntd = q("ntd", "cat sat");
    assert_eq!(ntd["prompt_count"], 3);
    assert_eq!(ntd["next"][0]["text"], "on");
    assert_eq!(ntd["next"][0]["count"], 2);
    assert_eq!(ntd["next"][1]["text"], "<end of document>");
    let longest = q("longest", "dog the cat sat");
    assert_eq!(longest["suffix_len"], 3);
    assert_eq!(longest["count"], 2);
    let chain = q("chain", "the cat");
    let words: Vec<&str> = chain["chain"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["text"].as_str().unwrap())
        .collect();
    assert_eq!(&words[..2], &["sat", "on"]);
    let trie = q("trie", "sat on");
    assert_eq!(trie["count"], 2);
    assert_eq!(trie["nodes"].as_array().unwrap().len(), 4); // the mat / a dog
    let docs = q("docs", "dog");
    assert_eq!(docs["count"], 2);
    let mut ids: Vec<u64> = docs["occurrences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["doc"].as_u64().unwrap())
        .collect();
    ids.sort();
    // Sorted file order: a.txt, c.jsonl (two documents), sub/b.txt.
    assert_eq!(ids, vec![2, 3]);
    let by_ids = json(&["query", "-i", i, "--tokens", "2,3", "--json"]);
    assert_eq!(by_ids["count"], 3);

    let stats = json(&["stats", "-i", i, "--verify", "--json"]);
    assert_eq!(stats["tokens"], 17);
    assert_eq!(stats["vocab_size"], 8);
    assert_eq!(stats["token_width"], 2);
    assert_eq!(stats["shards"].as_array().unwrap().len(), 3);
    assert_eq!(stats["tokenizer_fingerprint"].as_str().unwrap().len(), 64);

    // Errors exit with 2 and name the problem.
    let (ok, _, err) = run(&["query", "-i", i, "--tokens", "8"]);
    assert!(!ok && err.contains("out of range"), "{err}");
    std::fs::write(&index, b"garbage").unwrap();
    let (ok, _, err) = run(&["stats", "-i", i]);
    assert!(
        !ok && err.contains("idx.igs") && err.contains("header"),
        "{err}"
    );
}

#[test]
fn build_from_token_stream() {
    let dir = tempfile::tempdir().unwrap();
    let stream = dir.path().join("t.u32");
    let words: Vec<u32> = vec![5, 6, 7, u32::MAX, 6, 7, u32::MAX, 7];
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    std::fs::write(&stream, bytes).unwrap();
    let index = dir.path().join("t.igs");
    let (s, i) = (stream.to_str().unwrap(), index.to_str().unwrap());
    let summary = json(&[
        "build",
        s,
        "-o",
        i,
        "--input-format",
        "tokens",
        "--vocab-size",
        "100000",
        "--json",
    ]);
    assert_eq!(summary["tokens"], 6);
    assert_eq!(summary["docs"], 3);
    assert_eq!(summary["token_width"], 3);
    assert_eq!(
        json(&["query", "-i", i, "--tokens", "6,7", "--json"])["count"],
        2
    );
    let (ok, _, err) = run(&["build", s, "-o", i, "--input-format", "tokens"]);
    assert!(!ok && err.contains("--vocab-size"), "{err}");
}

#[test]
fn query_with_another_tokenizer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tok = d.join("tokenizer.json");
    write_tokenizer(&tok);
    // Same vocabulary, different file: a different tokenizer as far as the index knows.
    let other = d.join("other.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&tok).unwrap()).unwrap();
    v["pre_tokenizer"] = serde_json::json!({"type": "WhitespaceSplit"});
    std::fs::write(&other, v.to_string()).unwrap();
    std::fs::write(d.join("a.txt"), "the cat sat on the mat").unwrap();
    let index = d.join("idx.igs");
    let (i, t, o) = (
        index.to_str().unwrap(),
        tok.to_str().unwrap(),
        other.to_str().unwrap(),
    );
    let a = d.join("a.txt");
    let (ok, _, err) = run(&["build", a.to_str().unwrap(), "-o", i, "--tokenizer", t]);
    assert!(ok, "{err}");
    let count_with = |tokenizer: &str| {
        run(&[
            "query",
            "--index",
            i,
            "--op",
            "count",
            "--text",
            "the cat",
            "--tokenizer",
            tokenizer,
        ])
    };
    let (ok, _, _) = count_with(t);
    assert!(ok);
    let (ok, _, err) = count_with(o);
    assert!(!ok, "mismatched tokenizer accepted");
    assert!(err.contains("built with another tokenizer"), "{err}");
    // The same tokenizer in another file layout (pretty-printed, keys reordered) is accepted.
    let same = d.join("same.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&tok).unwrap()).unwrap();
    std::fs::write(&same, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    let (ok, _, err) = count_with(same.to_str().unwrap());
    assert!(ok, "the same tokenizer refused: {err}");
}
