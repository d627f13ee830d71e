//! Which requests go to the speculative engine.
//!
//! In mistral.rs 0.8.1's speculative pipeline γ is fixed: a step always verifies γ slots,
//! whatever the drafter proposes, and a batch is verified one sequence at a time. The
//! only knob that can turn drafting down is therefore per request: send it to the plain
//! engine. [`Admission`] makes that choice by [`PolicyKind`]:
//!
//! - `fixed`: every eligible request drafts;
//! - `max-concurrency`: eligible requests draft while at most `max_concurrency` requests
//!   (both engines) are in flight;
//! - `calibrated`: per concurrency level (buckets 1, 2–3, 4–7, 8–15, 16–31, ≥ 32 in-flight
//!   requests) it keeps an exponential moving average of the decode rate (completion tokens per
//!   second of wall time) of drafted and of plain requests and sends the request to the faster
//!   one. It tries each route [`MIN_SAMPLES`] times per level before trusting the averages, and
//!   every [`EXPLORE_EVERY`]-th decision of a level takes the other route, so the averages
//!   keep up with a changing workload.
//!
//! Eligible: greedy (temperature 0), one choice, no grammar. Sampled requests always go to the
//! plain engine because mistral.rs's speculative verification is argmax-only and would change
//! their distribution (`research/mistralrs.md` §1.5).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::PolicyKind;

/// Samples per route and level before the averages decide.
pub const MIN_SAMPLES: u64 = 3;
/// Exploration period of the calibrated policy (decisions per level).
pub const EXPLORE_EVERY: u64 = 16;
const LEVELS: usize = 6;
/// Weight of a new sample in the moving average.
const EMA_WEIGHT: f64 = 0.2;

/// Where a request is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Route {
    Speculative,
    Plain,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Ema {
    rate: f64,
    samples: u64,
}

impl Ema {
    fn add(&mut self, x: f64) {
        self.rate = if self.samples == 0 {
            x
        } else {
            (1.0 - EMA_WEIGHT) * self.rate + EMA_WEIGHT * x
        };
        self.samples += 1;
    }
}

/// One concurrency level of the calibrated policy, for `/v1/infinigram/stats`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LevelSnapshot {
    pub min_in_flight: usize,
    pub speculative_tokens_per_s: f64,
    pub speculative_samples: u64,
    pub plain_tokens_per_s: f64,
    pub plain_samples: u64,
}

/// The admission policy and the in-flight count.
#[derive(Debug)]
pub struct Admission {
    kind: PolicyKind,
    max_concurrency: usize,
    in_flight: AtomicUsize,
    levels: Mutex<[[Ema; 2]; LEVELS]>,
    decisions: [AtomicU64; LEVELS],
}

fn level(in_flight: usize) -> usize {
    ((usize::BITS - in_flight.max(1).leading_zeros()) as usize - 1).min(LEVELS - 1)
}

/// A request's admission; dropping it ends the request's in-flight count.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    pub route: Route,
    level: usize,
    started: Instant,
}

impl Ticket {
    /// Reports the finished request: `completion_tokens` generated.
    pub fn finish(&self, completion_tokens: usize) {
        self.admission.report(
            self.route,
            self.level,
            completion_tokens,
            self.started.elapsed(),
        );
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Admission {
    pub fn new(kind: PolicyKind, max_concurrency: usize) -> Self {
        Admission {
            kind,
            max_concurrency,
            in_flight: AtomicUsize::new(0),
            levels: Mutex::new([[Ema::default(); 2]; LEVELS]),
            decisions: Default::default(),
        }
    }

    /// Admits a request. `forced` (from the `x-infinigram` header) overrides the policy for
    /// eligible requests; ineligible ones always go to the plain engine.
    pub fn admit(self: &Arc<Self>, eligible: bool, forced: Option<Route>) -> Ticket {
        let in_flight = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        let level = level(in_flight);
        let route = if !eligible {
            Route::Plain
        } else if let Some(r) = forced {
            r
        } else {
            self.decide(in_flight, level)
        };
        Ticket {
            admission: Arc::clone(self),
            route,
            level,
            started: Instant::now(),
        }
    }

    fn decide(&self, in_flight: usize, level: usize) -> Route {
        match self.kind {
            PolicyKind::Fixed => Route::Speculative,
            PolicyKind::MaxConcurrency if in_flight <= self.max_concurrency => Route::Speculative,
            PolicyKind::MaxConcurrency => Route::Plain,
            PolicyKind::Calibrated => {
                let [spec, plain] = self.levels.lock().unwrap_or_else(|e| e.into_inner())[level];
                let n = self.decisions[level].fetch_add(1, Ordering::Relaxed) + 1;
                if spec.samples < MIN_SAMPLES || plain.samples < MIN_SAMPLES {
                    return if spec.samples <= plain.samples {
                        Route::Speculative
                    } else {
                        Route::Plain
                    };
                }
                let best = if spec.rate > plain.rate {
                    Route::Speculative
                } else {
                    Route::Plain
                };
                match (n % EXPLORE_EVERY == 0, best) {
                    (false, b) => b,
                    (true, Route::Speculative) => Route::Plain,
                    (true, Route::Plain) => Route::Speculative,
                }
            }
        }
    }

    fn report(&self, route: Route, level: usize, tokens: usize, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        if tokens == 0 || secs <= 0.0 {
            return;
        }
        let mut levels = self.levels.lock().unwrap_or_else(|e| e.into_inner());
        let i = match route {
            Route::Speculative => 0,
            Route::Plain => 1,
        };
        levels[level][i].add(tokens as f64 / secs);
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The calibrated policy's averages.
    pub fn levels(&self) -> Vec<LevelSnapshot> {
        let levels = self.levels.lock().unwrap_or_else(|e| e.into_inner());
        levels
            .iter()
            .enumerate()
            .map(|(i, [s, p])| LevelSnapshot {
                min_in_flight: 1 << i,
                speculative_tokens_per_s: s.rate,
                speculative_samples: s.samples,
                plain_tokens_per_s: p.rate,
                plain_samples: p.samples,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_log2_buckets() {
        let got: Vec<usize> = [0, 1, 2, 3, 4, 7, 8, 16, 31, 32, 1000]
            .iter()
            .map(|&n| level(n))
            .collect();
        assert_eq!(got, vec![0, 0, 1, 1, 2, 2, 3, 4, 4, 5, 5]);
    }

    #[test]
    fn calibrated_learns_per_level_and_explores() {
        let a = Arc::new(Admission::new(PolicyKind::Calibrated, 4));
        // At concurrency 1 drafting is faster; teach it.
        let mut routes = Vec::new();
        for _ in 0..40 {
            let t = a.admit(true, None);
            let tokens = if t.route == Route::Speculative {
                200
            } else {
                100
            };
            a.report(t.route, t.level, tokens, Duration::from_secs(1));
            routes.push(t.route);
        }
        let spec = routes.iter().filter(|&&r| r == Route::Speculative).count();
        assert!((30..40).contains(&spec), "{spec} of 40 drafted");
        assert_eq!(a.in_flight(), 0, "tickets were dropped");
        // Ineligible requests never draft; forced routes are honoured.
        assert_eq!(a.admit(false, Some(Route::Speculative)).route, Route::Plain);
        assert_eq!(a.admit(true, Some(Route::Plain)).route, Route::Plain);
        // At another level nothing is known yet: it explores both routes first.
        let held: Vec<Ticket> = (0..15).map(|_| a.admit(true, Some(Route::Plain))).collect();
        let t = a.admit(true, None);
        assert_eq!(t.level, 4);
        assert_eq!(t.route, Route::Speculative);
        drop(held);
    }

    #[test]
    fn max_concurrency_threshold() {
        let a = Arc::new(Admission::new(PolicyKind::MaxConcurrency, 2));
        let t1 = a.admit(true, None);
        let t2 = a.admit(true, None);
        let t3 = a.admit(true, None);
        assert_eq!(
            [t1.route, t2.route, t3.route],
            [Route::Speculative, Route::Speculative, Route::Plain]
        );
    }
}
