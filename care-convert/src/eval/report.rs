//! Evaluation reports: one JSON document for scripts and a markdown table for people.

use serde::{Deserialize, Serialize};

use super::multiple_choice::TaskResult;
use super::perplexity::{PerplexityOptions, PerplexityResult};

/// Perplexity on one text source.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TextEval {
    /// The file (or files) the text came from.
    pub source: String,
    /// Token cap applied before scoring (`None`: whole text).
    pub max_tokens: Option<usize>,
    pub options: PerplexityOptions,
    pub result: PerplexityResult,
}

/// Everything `care-convert eval` measured on one model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    pub model: String,
    pub architecture: String,
    /// Per-token KV-cache values over all layers (original GQA: `2·n_kv·d·L`).
    pub kv_values_per_token: usize,
    pub perplexity: Vec<TextEval>,
    pub tasks: Vec<TaskResult>,
    /// Mean `acc` over the multiple-choice tasks (excluding single-choice ones).
    pub average_acc: Option<f64>,
    pub seconds: f64,
}

impl EvalReport {
    /// Mean accuracy over `tasks`.
    pub fn average(tasks: &[TaskResult]) -> Option<f64> {
        if tasks.is_empty() {
            None
        } else {
            Some(tasks.iter().map(|t| t.acc).sum::<f64>() / tasks.len() as f64)
        }
    }

    /// A markdown rendering: one table for perplexity, one for tasks.
    pub fn to_markdown(&self) -> String {
        let mut s = format!("### {} ({})\n\n", self.model, self.architecture);
        if !self.perplexity.is_empty() {
            s.push_str("| text | tokens scored | window/stride | PPL | top-1 acc |\n|---|---:|---:|---:|---:|\n");
            for p in &self.perplexity {
                let stride = p.options.stride.unwrap_or(p.options.window);
                s.push_str(&format!(
                    "| {} | {} | {}/{} | {:.3} | {:.3} |\n",
                    p.source,
                    p.result.scored,
                    p.options.window,
                    stride,
                    p.result.ppl,
                    p.result.top1_acc
                ));
            }
            s.push('\n');
        }
        if !self.tasks.is_empty() {
            s.push_str(
                "| task | docs | acc | ± | acc_norm | ± |\n|---|---:|---:|---:|---:|---:|\n",
            );
            for t in &self.tasks {
                s.push_str(&format!(
                    "| {} | {} | {:.4} | {:.4} | {:.4} | {:.4} |\n",
                    t.task, t.docs, t.acc, t.acc_stderr, t.acc_norm, t.acc_norm_stderr
                ));
            }
            if let Some(a) = self.average_acc {
                s.push_str(&format!("| **average** | | {a:.4} | | | |\n"));
            }
        }
        s
    }
}
