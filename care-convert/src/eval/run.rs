//! One evaluation run over a model: perplexity texts then zero-shot tasks, with
//! progress reported through [`Progress`].

use std::path::PathBuf;
use std::time::Instant;

use super::multiple_choice::{load_requests, score_doc, summarize, task_path};
use super::perplexity::{perplexity, PerplexityOptions};
use super::report::{EvalReport, TextEval};
use crate::error::{Error, Result};
use mla_attention::io::tokenizer::encode;
use mla_attention::model::Decoder;

/// Receives progress of long loops (binaries draw bars; libraries never print).
pub trait Progress {
    fn start(&mut self, label: &str, total: usize);
    fn set(&mut self, done: usize);
    fn finish(&mut self);
}

/// Progress that goes nowhere.
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&mut self, _: &str, _: usize) {}
    fn set(&mut self, _: usize) {}
    fn finish(&mut self) {}
}

/// A task name and its request file.
pub type TaskFile = (String, PathBuf);

/// What to evaluate.
#[derive(Debug, Clone)]
pub struct EvalPlan {
    pub ppl_files: Vec<PathBuf>,
    /// Score only the first N tokens of each text.
    pub max_tokens: Option<usize>,
    pub ppl: PerplexityOptions,
    /// (task name, request file).
    pub tasks: Vec<TaskFile>,
    pub limit: Option<usize>,
    pub max_len: usize,
}

impl EvalPlan {
    /// Resolve task names under `tasks_dir` and check every input exists.
    pub fn resolve(
        ppl_files: Vec<PathBuf>,
        tasks: &[String],
        tasks_dir: &std::path::Path,
    ) -> Result<(Vec<PathBuf>, Vec<TaskFile>)> {
        let tasks = tasks
            .iter()
            .map(|t| Ok((t.clone(), task_path(tasks_dir, t)?)))
            .collect::<Result<Vec<_>>>()?;
        for (t, p) in &tasks {
            if !p.exists() {
                return Err(Error::BadData {
                    path: p.clone(),
                    reason: format!(
                        "request file of task {t} not found (run scripts/fetch_assets.py)"
                    ),
                });
            }
        }
        for f in &ppl_files {
            if !f.is_file() {
                return Err(Error::BadData {
                    path: f.clone(),
                    reason: "not a file".into(),
                });
            }
        }
        Ok((ppl_files, tasks))
    }
}

/// Text a model reads for perplexity: the file's tokens, BOS first if the tokenizer asks.
pub fn text_tokens(
    tok: &tokenizers::Tokenizer,
    path: &std::path::Path,
    bos: Option<u32>,
    max: Option<usize>,
) -> Result<Vec<u32>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut ids = encode(tok, &text)?;
    if let Some(b) = bos {
        ids.insert(0, b);
    }
    if let Some(m) = max {
        ids.truncate(m);
    }
    Ok(ids)
}

/// Evaluate `model` on `plan`. `bos`: prepended to texts when set; `prefix_token`
/// replaces an empty multiple-choice context.
pub fn evaluate(
    model: &Decoder,
    name: &str,
    tok: &tokenizers::Tokenizer,
    bos: Option<u32>,
    prefix_token: u32,
    plan: &EvalPlan,
    progress: &mut dyn Progress,
) -> Result<EvalReport> {
    let started = Instant::now();
    let mut ppl = Vec::new();
    for f in &plan.ppl_files {
        let ids = text_tokens(tok, f, bos, plan.max_tokens)?;
        let label = f
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("text")
            .to_string();
        progress.start(&label, 1);
        let result = perplexity(model, &ids, &plan.ppl, &mut |done, _total| {
            progress.set(done)
        })?;
        progress.finish();
        ppl.push(TextEval {
            source: f.display().to_string(),
            max_tokens: plan.max_tokens,
            options: plan.ppl.clone(),
            result,
        });
    }
    let mut tasks = Vec::new();
    for (task, path) in &plan.tasks {
        let docs = load_requests(path, plan.limit)?;
        progress.start(task, docs.len());
        let mut scores = Vec::with_capacity(docs.len());
        for (i, d) in docs.iter().enumerate() {
            scores.push(score_doc(model, tok, d, prefix_token, plan.max_len)?);
            progress.set(i + 1);
        }
        progress.finish();
        tasks.push(summarize(task, &scores));
    }
    let mc: Vec<_> = tasks
        .iter()
        .filter(|t| t.task != "lambada")
        .cloned()
        .collect();
    Ok(EvalReport {
        model: name.to_string(),
        architecture: format!("{:?}", model.spec.arch).to_lowercase(),
        kv_values_per_token: model.cache_values_per_token(),
        perplexity: ppl,
        average_acc: EvalReport::average(&mc),
        tasks,
        seconds: started.elapsed().as_secs_f64(),
    })
}
