//! Brute-force reference answers over a list of documents.
#![allow(dead_code)]

use std::collections::BTreeMap;

use infinigram_spec::{BuildConfig, Index, IndexBuilder};

/// Starting positions (doc, offset) of every occurrence of `p`; the empty pattern occurs at
/// every token.
pub fn positions(docs: &[Vec<u32>], p: &[u32]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for (d, doc) in docs.iter().enumerate() {
        if p.is_empty() {
            out.extend((0..doc.len()).map(|i| (d as u64, i as u64)));
            continue;
        }
        if doc.len() < p.len() {
            continue;
        }
        for i in 0..=doc.len() - p.len() {
            if &doc[i..i + p.len()] == p {
                out.push((d as u64, i as u64));
            }
        }
    }
    out
}

pub fn count(docs: &[Vec<u32>], p: &[u32]) -> u64 {
    positions(docs, p).len() as u64
}

/// Next token after each occurrence (`None`: end of document) → count.
pub fn ntd(docs: &[Vec<u32>], p: &[u32]) -> BTreeMap<Option<u32>, u64> {
    let mut out = BTreeMap::new();
    for (d, i) in positions(docs, p) {
        let doc = &docs[d as usize];
        let next = doc.get(i as usize + p.len()).copied();
        *out.entry(next).or_insert(0) += 1;
    }
    out
}

/// Length of the longest suffix of `ctx` (at most `max_len`) that occurs.
pub fn longest_suffix(docs: &[Vec<u32>], ctx: &[u32], max_len: usize) -> usize {
    let mut best = 0;
    for l in 1..=ctx.len().min(max_len) {
        if count(docs, &ctx[ctx.len() - l..]) > 0 {
            best = l;
        } else {
            break;
        }
    }
    best
}

/// Greedy chain: most frequent next token (ties: smallest id), stopping at end of document.
pub fn chain(docs: &[Vec<u32>], matched: &[u32], max_tokens: usize) -> Vec<(u32, u64)> {
    let mut path = matched.to_vec();
    let mut out = Vec::new();
    while out.len() < max_tokens {
        let dist = ntd(docs, &path);
        let best = dist
            .iter()
            .max_by(|a, b| {
                a.1.cmp(b.1).then_with(|| {
                    // smaller token wins ties; end of document (None) loses them
                    let ka = a.0.map(|t| t as u64).unwrap_or(u64::MAX);
                    let kb = b.0.map(|t| t as u64).unwrap_or(u64::MAX);
                    kb.cmp(&ka)
                })
            })
            .map(|(k, v)| (*k, *v));
        match best {
            Some((Some(t), c)) => {
                out.push((t, c));
                path.push(t);
            }
            _ => break,
        }
    }
    out
}

/// Builds an in-memory index.
pub fn build(docs: &[Vec<u32>], vocab_size: u32, shard_tokens: u64) -> Index<Vec<u8>> {
    let mut config = BuildConfig::new(vocab_size);
    config.shard_tokens = shard_tokens;
    config.jobs = 2;
    IndexBuilder::new(config)
        .expect("valid config")
        .build_in_memory(docs.iter().cloned().map(Ok))
        .expect("build")
}
