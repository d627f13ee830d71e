//! Acceptance statistics of a serving engine (what `GET /v1/infinigram/stats` shows): drafted,
//! verified and accepted tokens by match length, n-gram count, depth and source.

use std::sync::Mutex;

use super::Source;
use super::TokenFeatures;
use serde::Serialize;

/// Buckets of the tables: `0`, `1`, `2–3`, `4–7`, … (log2), the last open-ended.
const MATCH_BUCKETS: usize = 9;
const COUNT_BUCKETS: usize = 14;
const DEPTH_BUCKETS: usize = 16;

fn log2_bucket(x: u64, buckets: usize) -> usize {
    if x == 0 {
        0
    } else {
        ((64 - x.leading_zeros()) as usize).min(buckets - 1)
    }
}

fn bucket_label(b: usize, buckets: usize) -> (u64, Option<u64>) {
    match b {
        0 => (0, Some(0)),
        _ => {
            let lo = 1u64 << (b - 1);
            let hi = (b + 1 < buckets).then(|| (1u64 << b) - 1);
            (lo, hi)
        }
    }
}

/// One row of an acceptance table. `verified` counts drafted tokens the verifier reached
/// (every earlier token of the draft was accepted); `accepted / verified` is the conditional
/// acceptance rate.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct BucketRow {
    pub lo: u64,
    /// Inclusive upper end; `None` for the open last bucket.
    pub hi: Option<u64>,
    pub drafted: u64,
    pub verified: u64,
    pub accepted: u64,
}

/// Everything `/v1/infinigram/stats` reports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StatsSnapshot {
    /// Requests decoded speculatively / plainly since startup.
    pub requests_drafted: u64,
    pub requests_plain: u64,
    /// Verify steps of drafting requests (one target pass each).
    pub steps: u64,
    /// Drafted tokens submitted for verification (the policy's `k`, summed).
    pub slots: u64,
    /// Submitted drafted tokens (= `slots`; per-bucket rows below split them).
    pub drafted_tokens: u64,
    /// Drafted tokens accepted.
    pub accepted_tokens: u64,
    /// Tokens emitted by those steps (accepted drafts plus the target's own token each).
    pub emitted_tokens: u64,
    /// `emitted_tokens / steps`.
    pub tokens_per_step: f64,
    /// `accepted_tokens / drafted_tokens`.
    pub acceptance_rate: f64,
    pub by_match_len: Vec<BucketRow>,
    pub by_count: Vec<BucketRow>,
    pub by_depth: Vec<BucketRow>,
    /// Drafted-token counts by source: corpus index, request's own tokens.
    pub by_source: [BucketRow; 2],
}

fn table(buckets: usize) -> Vec<BucketRow> {
    (0..buckets)
        .map(|b| {
            let (lo, hi) = bucket_label(b, buckets);
            BucketRow {
                lo,
                hi,
                ..Default::default()
            }
        })
        .collect()
}

/// The accumulating statistics.
#[derive(Debug)]
pub struct SpecStats {
    inner: Mutex<StatsSnapshot>,
}

impl Default for SpecStats {
    fn default() -> Self {
        SpecStats {
            inner: Mutex::new(StatsSnapshot {
                by_match_len: table(MATCH_BUCKETS),
                by_count: table(COUNT_BUCKETS),
                by_depth: (0..DEPTH_BUCKETS)
                    .map(|d| BucketRow {
                        lo: d as u64 + 1,
                        hi: Some(d as u64 + 1),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
        }
    }
}

/// The outcome of one verify step of one request.
#[derive(Debug, Clone, Copy)]
pub struct StepOutcome<'a> {
    /// Drafted tokens submitted for verification.
    pub submitted: usize,
    /// Features of the submitted tokens.
    pub drafted: &'a [TokenFeatures],
    /// Leading submitted tokens accepted.
    pub accepted: usize,
    /// Tokens the step emitted (the accepted ones plus the target's own token).
    pub emitted: usize,
}

impl SpecStats {
    fn lock(&self) -> std::sync::MutexGuard<'_, StatsSnapshot> {
        // A poisoned lock only means a panic elsewhere mid-update of counters.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a request by its route.
    pub fn record_request(&self, drafted: bool) {
        let mut s = self.lock();
        if drafted {
            s.requests_drafted += 1;
        } else {
            s.requests_plain += 1;
        }
    }

    /// Adds one verify step.
    pub fn record_step(&self, o: StepOutcome<'_>) {
        let mut s = self.lock();
        s.steps += 1;
        s.slots += o.submitted as u64;
        s.emitted_tokens += o.emitted as u64;
        // The verifier reaches the accepted tokens and the first rejected one.
        let reached = o.submitted.min(o.accepted + 1);
        for (i, f) in o.drafted.iter().take(o.submitted).enumerate() {
            let verified = i < reached;
            let accepted = i < o.accepted;
            s.drafted_tokens += 1;
            s.accepted_tokens += accepted as u64;
            let rows = [
                log2_bucket(f.match_len as u64, MATCH_BUCKETS),
                log2_bucket(f.count, COUNT_BUCKETS),
                (f.depth.max(1) as usize - 1).min(DEPTH_BUCKETS - 1),
                match f.source {
                    Source::Corpus => 0,
                    Source::Local => 1,
                },
            ];
            for (t, &b) in rows.iter().enumerate() {
                let row = match t {
                    0 => &mut s.by_match_len[b],
                    1 => &mut s.by_count[b],
                    2 => &mut s.by_depth[b],
                    _ => &mut s.by_source[b],
                };
                row.drafted += 1;
                row.verified += verified as u64;
                row.accepted += accepted as u64;
            }
        }
    }

    /// A copy with the derived rates filled in.
    pub fn snapshot(&self) -> StatsSnapshot {
        let mut s = self.lock().clone();
        s.tokens_per_step = ratio(s.emitted_tokens, s.steps);
        s.acceptance_rate = ratio(s.accepted_tokens, s.drafted_tokens);
        s
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(match_len: u32, count: u64, depth: u32) -> TokenFeatures {
        TokenFeatures {
            source: Source::Corpus,
            match_len,
            count,
            top_share: 1.0,
            depth,
            prob: 1.0,
        }
    }

    #[test]
    fn buckets_and_step_accounting() {
        assert_eq!(log2_bucket(0, 9), 0);
        assert_eq!(log2_bucket(1, 9), 1);
        assert_eq!(log2_bucket(3, 9), 2);
        assert_eq!(log2_bucket(4, 9), 3);
        assert_eq!(log2_bucket(1 << 40, 9), 8);
        assert_eq!(bucket_label(3, 9), (4, Some(7)));
        assert_eq!(bucket_label(8, 9), (128, None));
        let s = SpecStats::default();
        let d = [f(5, 3, 1), f(5, 2, 2), f(5, 1, 3)];
        // Two drafted tokens accepted, the third rejected: 3 reached, 3 emitted.
        s.record_step(StepOutcome {
            submitted: 3,
            drafted: &d,
            accepted: 2,
            emitted: 3,
        });
        // Everything accepted: the target's own token comes on top.
        s.record_step(StepOutcome {
            submitted: 3,
            drafted: &d,
            accepted: 3,
            emitted: 4,
        });
        // A step the policy cut to nothing.
        s.record_step(StepOutcome {
            submitted: 0,
            drafted: &d,
            accepted: 0,
            emitted: 1,
        });
        let snap = s.snapshot();
        assert_eq!((snap.steps, snap.slots, snap.emitted_tokens), (3, 6, 8));
        assert_eq!((snap.drafted_tokens, snap.accepted_tokens), (6, 5));
        let row = snap.by_match_len[3];
        assert_eq!(
            (row.lo, row.hi, row.drafted, row.verified, row.accepted),
            (4, Some(7), 6, 6, 5)
        );
        assert_eq!(snap.by_depth[2].accepted, 1);
        assert_eq!(snap.by_count[1].drafted, 2, "count 1");
        assert!((snap.tokens_per_step - 8.0 / 3.0).abs() < 1e-12);
    }
}
