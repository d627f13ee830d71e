//! Healing: a short distillation fine-tune of a converted (student) model against the
//! original (teacher), `L = CE + β·τ²·KL(teacher ‖ student)`, with candle's autograd.
//!
//! The pieces, in data-path order: [`data`] packs real text into rows (never the
//! evaluation texts), [`student`] opens the converted checkpoint with its trainable
//! tensors as `Var`s, [`loss`] and [`optim`] are the objective and AdamW, [`train`] runs
//! the loop with resumable checkpoints, and this module writes the healed checkpoint:
//! the student's own files (config, tokenizer, `care.json` gaining a `healing` record)
//! with the trained weights — the same format, so every loader of the student (ours,
//! mistral.rs, HF transformers) loads the healed model unchanged.

pub mod data;
pub mod loss;
pub mod optim;
pub mod plot;
pub mod student;
pub mod train;

use std::path::Path;

use candle_core::DType;

use crate::error::{Error, Result};
use crate::export::{write_atomically, write_file_atomically};
use student::StudentParams;
use train::StepRecord;

/// Create `out` as a copy of the student directory (weights included, so `out` is a
/// loadable checkpoint from the start; [`write_healed`] replaces them), atomically. A
/// no-op if `out` already is one.
pub fn prepare_output(student_dir: &Path, out: &Path) -> Result<()> {
    if out.join("config.json").exists() {
        return Ok(());
    }
    write_atomically(out, |tmp| {
        for e in std::fs::read_dir(student_dir).map_err(|e| Error::io(student_dir, e))? {
            let p = e.map_err(|e| Error::io(student_dir, e))?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if p.is_file() && !name.ends_with(".png") {
                std::fs::copy(&p, tmp.join(name)).map_err(|e| Error::io(&p, e))?;
            }
        }
        Ok(())
    })
}

/// Write the current student weights (`model.safetensors`, in `dtype`) and `care.json`
/// with `healing` added, each through a temporary file and a rename.
pub fn write_healed(
    out: &Path,
    student: &StudentParams,
    dtype: DType,
    healing: &serde_json::Value,
) -> Result<()> {
    let st = out.join("model.safetensors");
    let tmp = out.join(".model.safetensors.partial");
    candle_core::safetensors::save(&student.all_tensors(dtype)?, &tmp).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::BadData {
            path: tmp.clone(),
            reason: e.to_string(),
        }
    })?;
    std::fs::rename(&tmp, &st).map_err(|e| Error::io(&st, e))?;
    let care = student.dir.join("care.json");
    let mut record = match std::fs::read_to_string(&care) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| Error::BadData {
            path: care.clone(),
            reason: e.to_string(),
        })?,
        Err(_) => serde_json::json!({}),
    };
    if let Some(obj) = record.as_object_mut() {
        obj.insert("healing".into(), healing.clone());
    }
    let text = serde_json::to_string_pretty(&record).map_err(|e| Error::BadData {
        path: care.clone(),
        reason: e.to_string(),
    })?;
    write_file_atomically(&out.join("care.json"), text.as_bytes())
}

/// `heal/log.jsonl` (one record per line) and `heal/loss.png` under `out`.
pub fn write_log(out: &Path, records: &[StepRecord], title: &str) -> Result<()> {
    let dir = out.join("heal");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let mut lines = String::new();
    for r in records {
        lines.push_str(&serde_json::to_string(r).map_err(|e| Error::BadData {
            path: dir.join("log.jsonl"),
            reason: e.to_string(),
        })?);
        lines.push('\n');
    }
    write_file_atomically(&dir.join("log.jsonl"), lines.as_bytes())?;
    plot::plot_loss_png(records, title, &dir.join("loss.png"))
}
