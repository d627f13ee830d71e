//! The benchmark prompts: HumanEval (raw completion, or as a chat instruction) and MT-Bench
//! (chat), short, full and long.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::client::Prompt;

/// Prompt length class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Length {
    Short,
    /// The benchmark's own prompt (HumanEval: the full prompt; MT-Bench: the question).
    Full,
    Long,
}

impl Length {
    pub fn name(self) -> &'static str {
        match self {
            Length::Short => "short",
            Length::Full => "full",
            Length::Long => "long",
        }
    }
}

fn read_jsonl(path: &Path) -> Result<Vec<Value>> {
    let mut text = String::new();
    let file = std::fs::File::open(path).with_context(|| path.display().to_string())?;
    if path.extension().is_some_and(|e| e == "gz") {
        flate2::read::GzDecoder::new(file).read_to_string(&mut text)?;
    } else {
        std::io::BufReader::new(file).read_to_string(&mut text)?;
    }
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("{}: bad line", path.display())))
        .collect()
}

/// HumanEval problems as completion prompts.
///
/// - short: everything up to and including the `def` line (imports and signature, no
///   docstring);
/// - long: the previous problem's prompt and canonical solution, then the full prompt.
pub fn humaneval(path: &Path, length: Length) -> Result<Vec<Prompt>> {
    let rows = read_jsonl(path)?;
    let text = |v: &Value, k: &str| v[k].as_str().unwrap_or_default().to_string();
    Ok(rows
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let prompt = text(row, "prompt");
            match length {
                Length::Full => Prompt::Text(prompt),
                Length::Short => {
                    let mut out = String::new();
                    for line in prompt.lines() {
                        out.push_str(line);
                        out.push('\n');
                        if line.trim_start().starts_with("def ") {
                            break;
                        }
                    }
                    Prompt::Text(out)
                }
                Length::Long => {
                    let prev = &rows[(i + rows.len() - 1) % rows.len()];
                    Prompt::Text(format!(
                        "{}{}\n\n{prompt}",
                        text(prev, "prompt"),
                        text(prev, "canonical_solution")
                    ))
                }
            }
        })
        .collect())
}

/// HumanEval problems as chat requests, the way instruction-tuned models are usually asked
/// for HumanEval (EvalPlus's instruct setting, in our words): the problem (at `length`, as in
/// [`humaneval`]) in a Python code block, with the instruction to return the whole function.
pub fn humaneval_chat(path: &Path, length: Length) -> Result<Vec<Prompt>> {
    Ok(humaneval(path, length)?
        .into_iter()
        .map(|p| {
            let code = p.text();
            Prompt::Chat(vec![(
                "user".to_string(),
                format!(
                    "Complete this Python function and return the whole function, \
                     signature included, in one ```python code block.\n\n```python\n{code}```"
                ),
            )])
        })
        .collect())
}

/// MT-Bench first-turn questions as chat prompts.
///
/// - short: the question alone;
/// - long: ~1 500 characters of a State of the Union address (one per question, in file-name
///   order) as context, then the question.
pub fn mtbench(questions: &Path, sotu_dir: &Path, length: Length) -> Result<Vec<Prompt>> {
    let rows = read_jsonl(questions)?;
    let mut speeches: Vec<_> = std::fs::read_dir(sotu_dir)
        .with_context(|| sotu_dir.display().to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    speeches.sort();
    rows.iter()
        .enumerate()
        .map(|(i, row)| {
            let q = row["turns"][0].as_str().unwrap_or_default().to_string();
            let user = match length {
                Length::Short | Length::Full => q,
                Length::Long => {
                    let path = &speeches[(i * 7) % speeches.len().max(1)];
                    let speech = std::fs::read_to_string(path)?;
                    let excerpt: String = speech.chars().take(1500).collect();
                    format!("Context (a speech):\n{excerpt}\n\nTask: {q}")
                }
            };
            Ok(Prompt::Chat(vec![("user".to_string(), user)]))
        })
        .collect()
}
