//! Every query equals a brute-force scan on random small corpora, for single and multiple
//! shards and for all three token widths.

mod common;

use std::collections::BTreeMap;

use infinigram_spec::{ChainOptions, Error, NtdOptions, OpenOptions, TrieOptions};
use proptest::prelude::*;

/// Token ids used for the small alphabet, per vocabulary size (to exercise 2-, 3- and
/// 4-byte tokens and ids near the top of the vocabulary).
fn alphabet(vocab: u32) -> Vec<u32> {
    vec![0, 1, 2, 3, vocab / 2, vocab - 2, vocab - 1]
}

#[derive(Debug, Clone)]
struct Case {
    vocab: u32,
    docs: Vec<Vec<u32>>,
    queries: Vec<Vec<u32>>,
    stream: Vec<u32>,
    shard_tokens: u64,
}

fn case(vocabs: Vec<u32>) -> impl Strategy<Value = Case> {
    (prop::sample::select(vocabs), 2usize..7).prop_flat_map(|(vocab, used)| {
        let alpha = alphabet(vocab);
        // Symbols 0..used occur in documents; queries may also use unused ids.
        let doc_sym = prop::sample::select(alpha[..used.min(alpha.len())].to_vec());
        let any_sym = prop::sample::select(alpha.clone());
        (
            Just(vocab),
            prop::collection::vec(prop::collection::vec(doc_sym, 0..25), 1..8),
            prop::collection::vec(prop::collection::vec(any_sym.clone(), 0..7), 1..20),
            prop::collection::vec(any_sym, 0..40),
            prop::sample::select(vec![2u64, 8, 20, 1 << 20]),
        )
            .prop_map(|(vocab, docs, queries, stream, shard_tokens)| Case {
                vocab,
                // A shard must hold the longest document.
                shard_tokens: shard_tokens
                    .max(docs.iter().map(|d| d.len() as u64 + 1).max().unwrap_or(1))
                    .max(2),
                docs,
                queries,
                stream,
            })
    })
}

fn check_case(c: &Case) -> Result<(), TestCaseError> {
    let index = common::build(&c.docs, c.vocab, c.shard_tokens);
    let docs = &c.docs;
    prop_assert_eq!(index.doc_count(), docs.len() as u64);
    prop_assert_eq!(index.token_count(), common::count(docs, &[]));
    index
        .verify()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    for (d, doc) in docs.iter().enumerate() {
        prop_assert_eq!(index.document(d as u64), Some(doc.clone()));
    }
    let mut queries = c.queries.clone();
    queries.push(Vec::new());
    // Patterns taken from the corpus, including whole documents and too-long ones.
    for doc in docs {
        queries.push(doc.clone());
        let mut longer = doc.clone();
        longer.push(0);
        queries.push(longer);
        if doc.len() > 2 {
            queries.push(doc[1..doc.len() - 1].to_vec());
        }
    }
    for q in &queries {
        prop_assert_eq!(
            index.count(q).unwrap(),
            common::count(docs, q),
            "count {:?}",
            q
        );
        prop_assert_eq!(index.contains(q).unwrap(), common::count(docs, q) > 0);
        // Exact NTD.
        let exact = index
            .ntd(
                q,
                NtdOptions {
                    top_k: None,
                    max_support: 0,
                },
            )
            .unwrap();
        let got: BTreeMap<Option<u32>, u64> =
            exact.next.iter().map(|n| (n.token, n.count)).collect();
        prop_assert_eq!(&got, &common::ntd(docs, q), "ntd {:?}", q);
        prop_assert!(!exact.approx);
        prop_assert_eq!(exact.prompt_count, common::count(docs, q));
        // Sorted by count, and top-k is a prefix.
        prop_assert!(exact.next.windows(2).all(|w| w[0].count >= w[1].count));
        let top2 = index
            .ntd(
                q,
                NtdOptions {
                    top_k: Some(2),
                    max_support: 0,
                },
            )
            .unwrap();
        prop_assert_eq!(&top2.next[..], &exact.next[..exact.next.len().min(2)]);
        // Capped support: counts stay exact, nothing frequent is missed.
        let capped = index
            .ntd(
                q,
                NtdOptions {
                    top_k: None,
                    max_support: 3,
                },
            )
            .unwrap();
        let total = exact.prompt_count.max(1);
        for n in &capped.next {
            prop_assert_eq!(Some(&n.count), got.get(&n.token), "capped count {:?}", q);
        }
        for (tok, cnt) in &got {
            // Per shard a token is found when its run there reaches the stride; with S
            // shards a token of total count >= S * stride has such a run somewhere.
            let stride = total.div_ceil(3);
            if *cnt >= stride * index.shard_count() as u64 {
                prop_assert!(
                    capped.next.iter().any(|n| n.token == *tok),
                    "missed {:?}",
                    tok
                );
            }
        }
        // Occurrences and document ids.
        let mut occ: Vec<(u64, u64)> = index
            .occurrences(q, usize::MAX)
            .unwrap()
            .iter()
            .map(|o| (o.doc, o.offset))
            .collect();
        occ.sort();
        prop_assert_eq!(occ, common::positions(docs, q));
        // Longest suffix match, with and without a cap.
        for max_len in [usize::MAX, 2] {
            let m = index.longest_suffix(q, max_len).unwrap();
            let want = common::longest_suffix(docs, q, max_len);
            prop_assert_eq!(m.len(), want, "longest {:?} cap {}", q, max_len);
            let suffix = &q[q.len() - want..];
            prop_assert_eq!(m.count(), common::count(docs, suffix));
            prop_assert_eq!(m.matched_tokens(&index), suffix.to_vec());
            // Chain from the match.
            let chain = index.chain(
                &m,
                ChainOptions {
                    max_tokens: 5,
                    max_support: 0,
                    ..Default::default()
                },
            );
            let got: Vec<(u32, u64)> = chain.iter().map(|s| (s.token, s.count)).collect();
            prop_assert_eq!(
                got,
                common::chain(docs, suffix, 5),
                "chain after {:?}",
                suffix
            );
            // Trie: complete when the budget is large; every count is exact.
            let trie = index.trie(
                &m,
                TrieOptions {
                    max_depth: 3,
                    max_nodes: 10_000,
                    max_support: 0,
                    ..Default::default()
                },
            );
            let mut paths: Vec<Vec<u32>> = Vec::new();
            for (i, node) in trie.nodes.iter().enumerate() {
                let mut path: Vec<u32> = match node.parent {
                    Some(p) => {
                        prop_assert!(p < i);
                        prop_assert_eq!(trie.nodes[p].depth + 1, node.depth);
                        paths[p].clone()
                    }
                    None => Vec::new(),
                };
                path.push(node.token);
                let mut full = suffix.to_vec();
                full.extend_from_slice(&path);
                prop_assert_eq!(node.count, common::count(docs, &full));
                paths.push(path);
            }
            prop_assert!(trie.nodes.windows(2).all(|w| w[0].count >= w[1].count));
            let mut distinct = std::collections::BTreeSet::new();
            for (d, i) in common::positions(docs, suffix) {
                let doc = &docs[d as usize];
                let rest = &doc[i as usize + suffix.len()..];
                for l in 1..=rest.len().min(3) {
                    distinct.insert(rest[..l].to_vec());
                }
            }
            prop_assert_eq!(trie.nodes.len(), distinct.len());
        }
    }
    // Incremental matching over a stream equals the cold answer after every token.
    for max_len in [usize::MAX, 3] {
        let mut state = index.empty_match(max_len);
        for (i, &t) in c.stream.iter().enumerate() {
            let len = state.advance(&index, t).unwrap();
            let seen = &c.stream[..=i];
            let want = common::longest_suffix(docs, seen, max_len);
            prop_assert_eq!(len, want, "advance at {} cap {}", i, max_len);
            prop_assert_eq!(
                state.count(),
                common::count(docs, &seen[seen.len() - want..])
            );
            let cold = index.longest_suffix(seen, max_len).unwrap();
            prop_assert_eq!(&cold, &state);
        }
    }
    // Out-of-range tokens are errors, never panics.
    let out_of_range = matches!(index.count(&[c.vocab]), Err(Error::TokenOutOfRange { .. }));
    prop_assert!(out_of_range);
    prop_assert!(index.longest_suffix(&[0, c.vocab], 8).is_err());
    prop_assert!(index.empty_match(4).advance(&index, c.vocab).is_err());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn queries_match_brute_force(c in case(vec![5, 9, 65_535, 65_536, 70_000])) {
        check_case(&c)?;
    }
}

proptest! {
    // 4-byte tokens: libsais allocates one bucket per symbol, so keep this small.
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    #[test]
    fn queries_match_brute_force_wide_tokens(c in case(vec![(1 << 24) + 3])) {
        check_case(&c)?;
    }
}

#[test]
fn file_round_trip_equals_memory() {
    let docs = vec![vec![1u32, 2, 3, 1, 2], vec![], vec![2, 3, 3, 1]];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.igs");
    let mut config = infinigram_spec::BuildConfig::new(4);
    config.shard_tokens = 6;
    let builder = infinigram_spec::IndexBuilder::new(config).unwrap();
    let summary = builder
        .build_file(
            &path,
            docs.iter().cloned().map(Ok),
            &infinigram_spec::NoProgress,
        )
        .unwrap();
    assert_eq!(summary.tokens, 9);
    assert_eq!(summary.docs, 3);
    assert_eq!(summary.shards, 2);
    let file = infinigram_spec::Index::open(&path, OpenOptions { verify: true }).unwrap();
    let mem = common::build(&docs, 4, 6);
    assert_eq!(std::fs::read(&path).unwrap(), mem.as_bytes());
    assert_eq!(file.count(&[1, 2]).unwrap(), 2);
    // No temporary file is left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn config_and_input_errors() {
    use infinigram_spec::{BuildConfig, IndexBuilder};
    assert!(matches!(
        IndexBuilder::new(BuildConfig::new(0)),
        Err(Error::VocabTooLarge { .. })
    ));
    let mut c = BuildConfig::new(10);
    c.shard_tokens = 1;
    assert!(matches!(IndexBuilder::new(c), Err(Error::ShardSize { .. })));
    let mut c = BuildConfig::new(10);
    c.shard_tokens = 4;
    let b = IndexBuilder::new(c).unwrap();
    let r = b.build_in_memory(vec![Ok(vec![1, 2, 3, 4])].into_iter());
    assert!(matches!(
        r,
        Err(Error::DocumentTooLarge {
            doc: 0,
            tokens: 4,
            ..
        })
    ));
    let r = b.build_in_memory(vec![Ok(vec![1, 10])].into_iter());
    assert!(matches!(r, Err(Error::TokenOutOfRange { token: 10, .. })));
    let r = b.build_in_memory(Vec::new().into_iter());
    assert!(matches!(r, Err(Error::NoInput)));
}
