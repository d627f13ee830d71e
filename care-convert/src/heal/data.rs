//! Healing data: real text files tokenized, concatenated (documents separated by EOS)
//! and cut into packed sequences of `seq_len + 1` tokens (inputs and shifted targets).
//!
//! A packed corpus can be written to one binary file (`care-convert pack-data`), so the
//! tokenization runs once and the file travels to a GPU machine that has neither the
//! corpora nor the tokenizer's source. The file names the tokenizer by a fingerprint of
//! its vocabulary; training refuses a corpus packed with another tokenizer.
//!
//! Evaluation text must never be healed on: [`CorpusOptions::exclude`] names files that
//! are skipped wherever they appear under the sources.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::rng::SplitMix64;

/// File extensions read as text when a source is a directory.
pub const TEXT_EXTENSIONS: [&str; 6] = ["txt", "py", "rst", "md", "html", "json"];

const MAGIC: &[u8; 8] = b"CAREPACK";
const FORMAT_VERSION: u32 = 1;

/// What to pack.
#[derive(Debug, Clone)]
pub struct CorpusOptions {
    /// Files or directories (walked recursively, [`TEXT_EXTENSIONS`] only).
    pub sources: Vec<PathBuf>,
    /// Files never read (the evaluation texts), compared by canonical path.
    pub exclude: Vec<PathBuf>,
    /// Tokens per training sequence (each packed row holds `seq_len + 1`).
    pub seq_len: usize,
    /// Stop after this many training tokens (rows × seq_len), plus the held-out rows.
    pub max_tokens: u64,
    /// Rows kept apart for the evaluation during healing.
    pub heldout_sequences: usize,
    /// Shuffles the file order (which files make the budget) and the row order.
    pub seed: u64,
}

/// Provenance stored with a packed corpus.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CorpusInfo {
    pub sources: Vec<String>,
    pub excluded: Vec<String>,
    pub files_read: usize,
    pub seq_len: usize,
    pub seed: u64,
    /// Fingerprint of the tokenizer's vocabulary ([`tokenizer_fingerprint`]).
    pub tokenizer: String,
}

/// Packed rows: `train` for optimisation, `heldout` for the evaluation during healing.
#[derive(Debug, Clone)]
pub struct PackedCorpus {
    pub info: CorpusInfo,
    pub train: Vec<Vec<u32>>,
    pub heldout: Vec<Vec<u32>>,
}

impl PackedCorpus {
    /// Training tokens (targets) available.
    pub fn train_tokens(&self) -> u64 {
        (self.train.len() * self.info.seq_len) as u64
    }
}

/// sha256 over the vocabulary as `id\ttoken\n` lines in id order (added tokens
/// included): equal for the same tokenizer whether it was read from `tokenizer.json` or
/// rebuilt from GGUF metadata.
pub fn tokenizer_fingerprint(tok: &tokenizers::Tokenizer) -> String {
    let mut vocab: Vec<(u32, String)> = tok
        .get_vocab(true)
        .into_iter()
        .map(|(s, id)| (id, s))
        .collect();
    vocab.sort();
    let mut h = Sha256::new();
    for (id, s) in vocab {
        h.update(format!("{id}\t{s}\n").as_bytes());
    }
    format!("{:x}", h.finalize())
}

/// Every text file under `sources` (sorted), minus `exclude`.
pub fn list_files(sources: &[PathBuf], exclude: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let excluded: Vec<PathBuf> = exclude
        .iter()
        .map(|p| std::fs::canonicalize(p).map_err(|e| Error::io(p, e)))
        .collect::<Result<_>>()?;
    let mut files = Vec::new();
    for s in sources {
        let meta = std::fs::metadata(s).map_err(|e| Error::io(s, e))?;
        if meta.is_dir() {
            walk(s, &mut files)?;
        } else {
            files.push(s.clone());
        }
    }
    let mut kept = Vec::with_capacity(files.len());
    for f in files {
        let canon = std::fs::canonicalize(&f).map_err(|e| Error::io(&f, e))?;
        if !excluded.contains(&canon) {
            kept.push(f);
        }
    }
    kept.sort();
    kept.dedup();
    if kept.is_empty() {
        return Err(Error::InvalidOption(format!(
            "no text files ({}) under {}",
            TEXT_EXTENSIONS.join(", "),
            sources
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(kept)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out)?;
        } else if p
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| TEXT_EXTENSIONS.contains(&e))
        {
            out.push(p);
        }
    }
    Ok(())
}

/// Tokenize files in a seeded random order until the budget is met, then cut rows.
/// `progress(tokens_so_far, budget)`.
pub fn pack(
    tok: &tokenizers::Tokenizer,
    eos: Option<u32>,
    opts: &CorpusOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<PackedCorpus> {
    if opts.seq_len < 2 {
        return Err(Error::InvalidOption(format!(
            "sequence length {} is too short (at least 2)",
            opts.seq_len
        )));
    }
    if opts.max_tokens == 0 {
        return Err(Error::InvalidOption("token budget is 0".into()));
    }
    let mut files = list_files(&opts.sources, &opts.exclude)?;
    SplitMix64::new(opts.seed).shuffle(&mut files);
    let row = opts.seq_len + 1;
    let want = opts.max_tokens + (opts.heldout_sequences * opts.seq_len) as u64;
    let mut stream: Vec<u32> = Vec::new();
    let mut files_read = 0;
    for f in &files {
        if (stream.len() / row * opts.seq_len) as u64 >= want {
            break;
        }
        let bytes = std::fs::read(f).map_err(|e| Error::io(f, e))?;
        // Non-UTF-8 files (a few in any source tree) are skipped, not guessed at.
        let Ok(text) = String::from_utf8(bytes) else {
            continue;
        };
        if text.trim().is_empty() {
            continue;
        }
        let enc = tok.encode(text, false).map_err(|e| Error::BadData {
            path: f.clone(),
            reason: format!("tokenizing: {e}"),
        })?;
        stream.extend_from_slice(enc.get_ids());
        if let Some(e) = eos {
            stream.push(e);
        }
        files_read += 1;
        progress(((stream.len() / row) * opts.seq_len) as u64, want);
    }
    let mut rows: Vec<Vec<u32>> = stream.chunks_exact(row).map(<[u32]>::to_vec).collect();
    if rows.len() <= opts.heldout_sequences {
        return Err(Error::InvalidOption(format!(
            "the sources hold only {} rows of {row} tokens; {} are held out",
            rows.len(),
            opts.heldout_sequences
        )));
    }
    SplitMix64::new(opts.seed ^ 0x5EED).shuffle(&mut rows);
    let heldout = rows.split_off(rows.len() - opts.heldout_sequences);
    let max_rows = (opts.max_tokens as usize).div_ceil(opts.seq_len);
    rows.truncate(max_rows);
    Ok(PackedCorpus {
        info: CorpusInfo {
            sources: opts
                .sources
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
            excluded: opts
                .exclude
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
            files_read,
            seq_len: opts.seq_len,
            seed: opts.seed,
            tokenizer: tokenizer_fingerprint(tok),
        },
        train: rows,
        heldout,
    })
}

/// Write `corpus` to `path` (temporary file, then rename).
///
/// Layout (little endian): `CAREPACK`, u32 version, u32 bytes per token (2 or 4),
/// u64 info-JSON length, the JSON, u64 train rows, u64 held-out rows, then the rows.
pub fn write_corpus(path: &Path, corpus: &PackedCorpus) -> Result<()> {
    let max = corpus
        .train
        .iter()
        .chain(&corpus.heldout)
        .flat_map(|r| r.iter())
        .copied()
        .max()
        .unwrap_or(0);
    let width: u32 = if max <= u16::MAX as u32 { 2 } else { 4 };
    let info = serde_json::to_vec(&corpus.info).map_err(|e| Error::BadData {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut buf = Vec::new();
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    buf.extend_from_slice(&width.to_le_bytes());
    buf.extend_from_slice(&(info.len() as u64).to_le_bytes());
    buf.extend_from_slice(&info);
    buf.extend_from_slice(&(corpus.train.len() as u64).to_le_bytes());
    buf.extend_from_slice(&(corpus.heldout.len() as u64).to_le_bytes());
    for &t in corpus.train.iter().chain(&corpus.heldout).flatten() {
        if width == 2 {
            buf.extend_from_slice(&(t as u16).to_le_bytes());
        } else {
            buf.extend_from_slice(&t.to_le_bytes());
        }
    }
    crate::export::write_file_atomically(path, &buf)
}

/// Read a corpus written by [`write_corpus`], checking every length.
pub fn read_corpus(path: &Path) -> Result<PackedCorpus> {
    let bad = |reason: String| Error::BadData {
        path: path.to_path_buf(),
        reason,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| Error::io(path, e))?;
    let mut at = 0usize;
    let mut take = |n: usize| -> Result<&[u8]> {
        let s = bytes
            .get(at..at + n)
            .ok_or_else(|| bad(format!("truncated at byte {at} (file has {})", bytes.len())))?;
        at += n;
        Ok(s)
    };
    if take(8)? != MAGIC {
        return Err(bad("not a packed corpus (magic CAREPACK missing)".into()));
    }
    let u32_at = |s: &[u8]| u32::from_le_bytes(s.try_into().expect("4 bytes"));
    let u64_at = |s: &[u8]| u64::from_le_bytes(s.try_into().expect("8 bytes"));
    let version = u32_at(take(4)?);
    if version != FORMAT_VERSION {
        return Err(bad(format!(
            "format version {version}, this build reads {FORMAT_VERSION}"
        )));
    }
    let width = u32_at(take(4)?) as usize;
    if width != 2 && width != 4 {
        return Err(bad(format!("{width} bytes per token (expected 2 or 4)")));
    }
    let info_len = u64_at(take(8)?) as usize;
    let info: CorpusInfo =
        serde_json::from_slice(take(info_len)?).map_err(|e| bad(format!("corpus info: {e}")))?;
    let n_train = u64_at(take(8)?) as usize;
    let n_held = u64_at(take(8)?) as usize;
    let row = info.seq_len + 1;
    let need = (n_train + n_held)
        .checked_mul(row)
        .and_then(|n| n.checked_mul(width))
        .ok_or_else(|| bad("row counts overflow".into()))?;
    let body = take(need)?;
    let tokens: Vec<u32> = if width == 2 {
        body.chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
            .collect()
    } else {
        body.chunks_exact(4).map(u32_at).collect()
    };
    if at != bytes.len() {
        return Err(bad(format!(
            "{} trailing bytes after the rows",
            bytes.len() - at
        )));
    }
    let mut rows: Vec<Vec<u32>> = tokens.chunks_exact(row).map(<[u32]>::to_vec).collect();
    let heldout = rows.split_off(n_train);
    Ok(PackedCorpus {
        info,
        train: rows,
        heldout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus(width_big: bool) -> PackedCorpus {
        let hi = if width_big { 70_000 } else { 60_000 };
        PackedCorpus {
            info: CorpusInfo {
                sources: vec!["a".into()],
                excluded: vec![],
                files_read: 1,
                seq_len: 3,
                seed: 1,
                tokenizer: "abc".into(),
            },
            train: vec![vec![1, 2, 3, hi], vec![5, 6, 7, 8]],
            heldout: vec![vec![9, 10, 11, 12]],
        }
    }

    #[test]
    fn corpus_file_round_trips_in_both_widths_and_rejects_damage() {
        let dir = tempfile::tempdir().unwrap();
        for big in [false, true] {
            let p = dir.path().join(format!("c{big}.tokens"));
            let c = corpus(big);
            write_corpus(&p, &c).unwrap();
            let r = read_corpus(&p).unwrap();
            assert_eq!(r.train, c.train);
            assert_eq!(r.heldout, c.heldout);
            assert_eq!(r.info, c.info);
            let bytes = std::fs::read(&p).unwrap();
            std::fs::write(&p, &bytes[..bytes.len() - 1]).unwrap();
            assert!(read_corpus(&p)
                .unwrap_err()
                .to_string()
                .contains("truncated"));
            let mut extra = bytes.clone();
            extra.push(0);
            std::fs::write(&p, &extra).unwrap();
            assert!(read_corpus(&p)
                .unwrap_err()
                .to_string()
                .contains("trailing"));
            let mut magic = bytes.clone();
            magic[0] = b'X';
            std::fs::write(&p, &magic).unwrap();
            assert!(read_corpus(&p).unwrap_err().to_string().contains("magic"));
        }
    }

    #[test]
    fn shuffle_is_a_seeded_permutation() {
        let mut a: Vec<u32> = (0..100).collect();
        let mut b = a.clone();
        SplitMix64::new(3).shuffle(&mut a);
        SplitMix64::new(3).shuffle(&mut b);
        assert_eq!(a, b);
        assert_ne!(a, (0..100).collect::<Vec<_>>());
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn excluded_files_are_never_listed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sub")).unwrap();
        for n in ["a.txt", "sub/b.py", "sub/c.bin", "eval.txt"] {
            std::fs::write(dir.path().join(n), "x").unwrap();
        }
        let files = list_files(&[dir.path().into()], &[dir.path().join("eval.txt")]).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.strip_prefix(dir.path()).unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["a.txt", "sub/b.py"]);
        let err = list_files(
            &[dir.path().join("sub/c.bin")],
            &[dir.path().join("sub/c.bin")],
        );
        assert!(err.unwrap_err().to_string().contains("no text files"));
    }
}
