//! Logging every drafted token with its features and its fate.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use serde::Serialize;

use super::{Draft, TokenFeatures};
use crate::error::{Error, Result};

/// One drafted token.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DraftRecord {
    /// Caller's request id.
    pub request: u64,
    /// Verify step within the request.
    pub step: u64,
    /// Sequences in the verify step.
    pub batch_size: usize,
    /// Tokens of the draft submitted for verification.
    pub submitted_len: usize,
    /// Position in the draft, from 0.
    pub position: usize,
    pub token: u32,
    #[serde(flatten)]
    pub features: TokenFeatures,
    /// The policy submitted this token.
    pub submitted: bool,
    /// The verifier reached it (it was submitted and every token before it was accepted).
    pub verified: bool,
    /// It was accepted.
    pub accepted: bool,
}

/// A sink for drafted-token records.
pub trait DraftLog {
    fn record(&mut self, record: &DraftRecord) -> Result<()>;
    /// Pushes buffered records out.
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Discards records.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoLog;

impl DraftLog for NoLog {
    fn record(&mut self, _: &DraftRecord) -> Result<()> {
        Ok(())
    }
}

/// Keeps records in memory.
impl DraftLog for Vec<DraftRecord> {
    fn record(&mut self, record: &DraftRecord) -> Result<()> {
        self.push(record.clone());
        Ok(())
    }
}

/// Writes one JSON object per line.
#[derive(Debug)]
pub struct JsonlLog<W: Write> {
    out: W,
}

impl<W: Write> JsonlLog<W> {
    /// Logs to `out`.
    pub fn new(out: W) -> Self {
        JsonlLog { out }
    }

    /// The writer back (not flushed).
    pub fn into_inner(self) -> W {
        self.out
    }
}

impl JsonlLog<BufWriter<File>> {
    /// Creates (truncates) a log file.
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).map_err(|e| Error::io(path, e))?;
        Ok(JsonlLog::new(BufWriter::new(file)))
    }
}

impl<W: Write> DraftLog for JsonlLog<W> {
    fn record(&mut self, record: &DraftRecord) -> Result<()> {
        serde_json::to_writer(&mut self.out, record).map_err(|e| Error::Log(e.into()))?;
        self.out.write_all(b"\n").map_err(Error::Log)
    }

    fn flush(&mut self) -> Result<()> {
        self.out.flush().map_err(Error::Log)
    }
}

/// Where a verify step stands, for [`log_draft`]: the request, its step, the step's batch.
#[derive(Debug, Clone, Copy)]
pub struct StepInfo {
    pub request: u64,
    pub step: u64,
    pub batch_size: usize,
}

/// Records every token of `draft`: `submitted` of them were verified, `accepted` accepted.
pub fn log_draft(
    log: &mut dyn DraftLog,
    info: StepInfo,
    draft: &Draft,
    submitted: usize,
    accepted: usize,
) -> Result<()> {
    for (i, (&token, &features)) in draft.tokens.iter().zip(&draft.features).enumerate() {
        log.record(&DraftRecord {
            request: info.request,
            step: info.step,
            batch_size: info.batch_size,
            submitted_len: submitted,
            position: i,
            token,
            features,
            submitted: i < submitted,
            verified: i < submitted && i <= accepted,
            accepted: i < accepted,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Source;

    #[test]
    fn jsonl_lines() {
        let f = TokenFeatures {
            source: Source::Local,
            match_len: 3,
            count: 2,
            top_share: 0.5,
            depth: 1,
            prob: 0.5,
        };
        let d = Draft {
            tokens: vec![7, 8, 9],
            features: vec![
                f,
                TokenFeatures { depth: 2, ..f },
                TokenFeatures { depth: 3, ..f },
            ],
        };
        let mut log = JsonlLog::new(Vec::new());
        let info = StepInfo {
            request: 1,
            step: 4,
            batch_size: 2,
        };
        log_draft(&mut log, info, &d, 2, 1).unwrap();
        let text = String::from_utf8(log.into_inner()).unwrap();
        let rows: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0]["source"], "local");
        assert_eq!(rows[0]["match_len"], 3);
        let flags = |r: &serde_json::Value| {
            (
                r["submitted"].as_bool(),
                r["verified"].as_bool(),
                r["accepted"].as_bool(),
            )
        };
        assert_eq!(flags(&rows[0]), (Some(true), Some(true), Some(true)));
        assert_eq!(flags(&rows[1]), (Some(true), Some(true), Some(false)));
        assert_eq!(flags(&rows[2]), (Some(false), Some(false), Some(false)));
    }
}
