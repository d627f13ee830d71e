//! Inputs: pre-tokenized `u32` streams and text corpora tokenized on the fly.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// Documents from a pre-tokenized file: little-endian `u32` token ids, each document
/// followed by `u32::MAX`. A last document without a trailing separator is kept. Read
/// streaming, so the file may be larger than memory.
pub struct TokenStream {
    path: PathBuf,
    reader: BufReader<File>,
    offset: u64,
    done: bool,
}

/// The document separator of [`TokenStream`] files.
pub const STREAM_SEPARATOR: u32 = u32::MAX;

impl TokenStream {
    /// Opens a token stream file.
    pub fn open(path: &Path) -> Result<TokenStream> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len % 4 != 0 {
            return Err(Error::TokenStream {
                path: path.to_path_buf(),
                offset: len,
                reason: "file size is not a multiple of 4 bytes".into(),
            });
        }
        Ok(TokenStream {
            path: path.to_path_buf(),
            reader: BufReader::with_capacity(1 << 20, file),
            offset: 0,
            done: false,
        })
    }

    fn next_doc(&mut self) -> Result<Option<Vec<u32>>> {
        let mut doc = Vec::new();
        let mut word = [0u8; 4];
        loop {
            match self.reader.read_exact(&mut word) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    self.done = true;
                    return Ok((!doc.is_empty()).then_some(doc));
                }
                Err(e) => return Err(Error::io(&self.path, e)),
            }
            self.offset += 4;
            match u32::from_le_bytes(word) {
                STREAM_SEPARATOR => return Ok(Some(doc)),
                t => doc.push(t),
            }
        }
    }
}

impl Iterator for TokenStream {
    type Item = Result<Vec<u32>>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        self.next_doc().transpose()
    }
}

/// All files under `inputs` (files are taken as they are, folders walked recursively,
/// symbolic links followed), keeping only names that end with one of `extensions` when
/// it is not empty. Sorted, so builds are reproducible.
pub fn collect_files(inputs: &[PathBuf], extensions: &[String]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for input in inputs {
        let meta = std::fs::metadata(input).map_err(|e| Error::io(input, e))?;
        if meta.is_dir() {
            walk(input, extensions, &mut out)?;
        } else {
            out.push(input.clone());
        }
    }
    Ok(out)
}

fn walk(dir: &Path, extensions: &[String], out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|e| Error::io(dir, e)))
        .collect::<Result<_>>()?;
    entries.sort();
    for path in entries {
        // Broken links and unreadable entries are skipped, as `find -L` would report them.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            walk(&path, extensions, out)?;
        } else if meta.is_file() {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default();
            if extensions.is_empty() || extensions.iter().any(|e| name.ends_with(e.as_str())) {
                out.push(path);
            }
        }
    }
    Ok(())
}

/// A text corpus tokenized on the fly: each file is one document, except `.jsonl` files,
/// where each line is a JSON object whose `"text"` field is one document. Files are read
/// and tokenized in parallel batches of about `batch_bytes`; documents come out in file
/// order.
pub struct TextCorpus {
    tokenizer: Tokenizer,
    tokenizer_path: PathBuf,
    files: std::vec::IntoIter<PathBuf>,
    batch_bytes: u64,
    ready: std::vec::IntoIter<Vec<u32>>,
    /// Bytes of text read so far.
    pub bytes_read: u64,
}

impl TextCorpus {
    /// Loads a `tokenizer.json` and prepares to tokenize `files`.
    pub fn new(tokenizer_path: &Path, files: Vec<PathBuf>) -> Result<TextCorpus> {
        let tokenizer =
            Tokenizer::from_file(tokenizer_path).map_err(|source| Error::Tokenizer {
                path: tokenizer_path.to_path_buf(),
                source,
            })?;
        Ok(TextCorpus {
            tokenizer,
            tokenizer_path: tokenizer_path.to_path_buf(),
            files: files.into_iter(),
            batch_bytes: 16 << 20,
            ready: Vec::new().into_iter(),
            bytes_read: 0,
        })
    }

    /// The tokenizer's vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The tokenizer's fingerprint ([`tokenizer_hash`]).
    pub fn tokenizer_hash(&self) -> Result<[u8; 32]> {
        tokenizer_hash(&self.tokenizer_path)
    }

    fn next_batch(&mut self) -> Result<bool> {
        let mut batch = Vec::new();
        let mut bytes = 0u64;
        while bytes < self.batch_bytes {
            let Some(path) = self.files.next() else { break };
            bytes += std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            batch.push(path);
        }
        if batch.is_empty() {
            return Ok(false);
        }
        let docs: Vec<Vec<Vec<u32>>> = batch
            .par_iter()
            .map(|path| self.tokenize_file(path))
            .collect::<Result<_>>()?;
        self.bytes_read += bytes;
        self.ready = docs.into_iter().flatten().collect::<Vec<_>>().into_iter();
        Ok(true)
    }

    fn tokenize_file(&self, path: &Path) -> Result<Vec<Vec<u32>>> {
        let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let text = String::from_utf8_lossy(&raw);
        let encode = |text: &str| -> Result<Vec<u32>> {
            let enc =
                self.tokenizer
                    .encode_fast(text, false)
                    .map_err(|source| Error::Tokenizer {
                        path: path.to_path_buf(),
                        source,
                    })?;
            Ok(enc.get_ids().to_vec())
        };
        if path.extension().is_some_and(|e| e == "jsonl") {
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(|line| {
                    let v: serde_json::Value =
                        serde_json::from_str(line).map_err(|e| Error::Tokenizer {
                            path: path.to_path_buf(),
                            source: Box::new(e),
                        })?;
                    encode(v.get("text").and_then(|t| t.as_str()).unwrap_or(""))
                })
                .collect()
        } else {
            Ok(vec![encode(&text)?])
        }
    }
}

impl Iterator for TextCorpus {
    type Item = Result<Vec<u32>>;
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(doc) = self.ready.next() {
                return Some(Ok(doc));
            }
            match self.next_batch() {
                Ok(true) => continue,
                Ok(false) => return None,
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// The identity of a tokenizer that an index records: SHA-256 over a canonical form of
/// what decides token ids — the model (type, vocabulary, merges, options), the added tokens,
/// the normalizer and the pre-tokenizer. The file is read through the tokenizers library and
/// written back before hashing, with object keys sorted, so the same tokenizer gives the
/// same fingerprint whether its file is pretty-printed, stores merges as `"a b"` or
/// `["a", "b"]`, or orders its keys differently (a converted checkpoint's `tokenizer.json`
/// against the original's).
pub fn tokenizer_hash(path: &Path) -> Result<[u8; 32]> {
    let tokenizer = Tokenizer::from_file(path).map_err(|source| Error::Tokenizer {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |source: tokenizers::Error| Error::Tokenizer {
        path: path.to_path_buf(),
        source,
    };
    let json = tokenizer.to_string(false).map_err(bad)?;
    let v: serde_json::Value =
        serde_json::from_str(&json).map_err(|e| bad(Box::new(e) as tokenizers::Error))?;
    let mut h = Sha256::new();
    for key in ["model", "added_tokens", "normalizer", "pre_tokenizer"] {
        h.update(key.as_bytes());
        h.update(b"=");
        canonical_json(&v[key], &mut h);
        h.update(b"\n");
    }
    Ok(h.finalize().into())
}

/// Whether an index that recorded `recorded` was built with another tokenizer than the one
/// at `path`: `None` when it matches — by fingerprint ([`tokenizer_hash`]) or, for indexes
/// written before fingerprints, by the SHA-256 of the file's bytes; an index that recorded
/// nothing (all zeros) matches any — otherwise the file's fingerprint, for the message.
pub fn tokenizer_mismatch(recorded: &[u8; 32], path: &Path) -> Result<Option<[u8; 32]>> {
    if *recorded == [0u8; 32] {
        return Ok(None);
    }
    let fingerprint = tokenizer_hash(path)?;
    if *recorded == fingerprint {
        return Ok(None);
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok((*recorded != <[u8; 32]>::from(Sha256::digest(&bytes))).then_some(fingerprint))
}

/// `v` as JSON with object keys sorted, into `h`.
fn canonical_json(v: &serde_json::Value, h: &mut Sha256) {
    use serde_json::Value;
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            h.update(b"{");
            for k in keys {
                canonical_json(&Value::String(k.clone()), h);
                h.update(b":");
                canonical_json(&m[k], h);
                h.update(b",");
            }
            h.update(b"}");
        }
        Value::Array(a) => {
            h.update(b"[");
            for x in a {
                canonical_json(x, h);
                h.update(b",");
            }
            h.update(b"]");
        }
        other => h.update(other.to_string().as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_stream_documents_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.u32");
        let words = [1u32, 2, STREAM_SEPARATOR, STREAM_SEPARATOR, 3];
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        std::fs::write(&path, &bytes).unwrap();
        let docs: Vec<Vec<u32>> = TokenStream::open(&path)
            .unwrap()
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(docs, vec![vec![1, 2], vec![], vec![3]]);
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        let err = TokenStream::open(&path).err().unwrap();
        assert!(
            matches!(err, Error::TokenStream { offset: 19, .. }),
            "{err}"
        );
    }

    /// A byte-level BPE tokenizer file over `vocab` with `merges` as `"a b"` strings or as
    /// pairs.
    fn bpe_file(path: &Path, vocab: &[&str], merges_as_pairs: bool, pretty: bool) {
        let vocab: serde_json::Map<String, serde_json::Value> = vocab
            .iter()
            .enumerate()
            .map(|(i, w)| (w.to_string(), serde_json::Value::from(i)))
            .collect();
        let merges = if merges_as_pairs {
            serde_json::json!([["a", "b"], ["ab", "c"]])
        } else {
            serde_json::json!(["a b", "ab c"])
        };
        let v = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [{"id": 0, "content": "<s>", "single_word": false, "lstrip": false,
                              "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null, "decoder": null,
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "vocab": vocab, "merges": merges}
        });
        let text = if pretty {
            serde_json::to_string_pretty(&v).unwrap()
        } else {
            v.to_string()
        };
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn the_same_tokenizer_stored_differently_has_one_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let vocab = ["<s>", "a", "b", "c", "ab", "abc"];
        bpe_file(&d.join("strings.json"), &vocab, false, false);
        bpe_file(&d.join("pairs.json"), &vocab, true, true);
        let a = tokenizer_hash(&d.join("strings.json")).unwrap();
        let b = tokenizer_hash(&d.join("pairs.json")).unwrap();
        assert_eq!(a, b, "merges as strings vs pairs, compact vs pretty");
        assert_eq!(tokenizer_mismatch(&a, &d.join("pairs.json")).unwrap(), None);
        // An index of the old format recorded the file's bytes: still accepted.
        let bytes: [u8; 32] = Sha256::digest(std::fs::read(d.join("strings.json")).unwrap()).into();
        assert_eq!(
            tokenizer_mismatch(&bytes, &d.join("strings.json")).unwrap(),
            None
        );
        assert_eq!(
            tokenizer_mismatch(&[0; 32], &d.join("strings.json")).unwrap(),
            None
        );
        // Another vocabulary (ids of two tokens swapped) is another tokenizer.
        bpe_file(
            &d.join("other.json"),
            &["<s>", "b", "a", "c", "ab", "abc"],
            false,
            false,
        );
        let c = tokenizer_hash(&d.join("other.json")).unwrap();
        assert_ne!(a, c);
        assert_eq!(
            tokenizer_mismatch(&a, &d.join("other.json")).unwrap(),
            Some(c)
        );
        // Not a tokenizer: an error, not a mismatch.
        std::fs::write(d.join("bad.json"), "{}").unwrap();
        assert!(tokenizer_hash(&d.join("bad.json")).is_err());
    }

    #[test]
    fn collect_files_filters_and_sorts() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("b")).unwrap();
        for f in ["b/x.py", "a.py", "c.txt"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        let files = collect_files(&[dir.path().to_path_buf()], &[".py".to_string()]).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|f| {
                f.strip_prefix(dir.path())
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(names, vec!["a.py", "b/x.py"]);
        assert!(collect_files(&[dir.path().join("missing")], &[]).is_err());
    }
}
