//! The method × KV-budget comparison table.

use serde::{Deserialize, Serialize};

use crate::convert::ConversionSummary;
use crate::eval::report::EvalReport;

/// One row: a converted model (or the original, `method = "original"`) and its scores.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompareRow {
    pub method: String,
    pub kv_keep: f64,
    pub report: EvalReport,
    pub conversion: Option<ConversionSummary>,
}

/// Markdown table: one row per configuration; PPL per text, acc per task, average.
pub fn markdown_table(rows: &[CompareRow]) -> String {
    let Some(first) = rows.first() else {
        return String::new();
    };
    let texts: Vec<String> = first
        .report
        .perplexity
        .iter()
        .map(|p| {
            std::path::Path::new(&p.source)
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or(&p.source)
                .to_string()
        })
        .collect();
    let tasks: Vec<String> = first.report.tasks.iter().map(|t| t.task.clone()).collect();
    let mut s = String::from("| KV kept | method | KV values/token |");
    for t in &texts {
        s.push_str(&format!(" PPL {t} |"));
    }
    for t in &tasks {
        s.push_str(&format!(" {t} |"));
    }
    if !tasks.is_empty() {
        s.push_str(" avg acc |");
    }
    s.push_str("\n|---:|---|---:|");
    for _ in 0..texts.len() + tasks.len() + usize::from(!tasks.is_empty()) {
        s.push_str("---:|");
    }
    s.push('\n');
    for r in rows {
        s.push_str(&format!(
            "| {:.1}% | {} | {} |",
            r.kv_keep * 100.0,
            r.method,
            r.report.kv_values_per_token
        ));
        for p in &r.report.perplexity {
            s.push_str(&format!(" {:.2} |", p.result.ppl));
        }
        for t in &r.report.tasks {
            s.push_str(&format!(" {:.3} |", t.acc));
        }
        if let Some(a) = r.report.average_acc {
            s.push_str(&format!(" {a:.3} |"));
        }
        s.push('\n');
    }
    s
}
