//! The bench's results (JSON) and their markdown tables.

use std::fmt::Write;

use crate::bench::{Capacity, Cell, StepResult, GQA_BYTES_PER_TOKEN};
use crate::e2e::E2eResult;
use crate::runner::RunnerReport;

#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    pub device: String,
    pub compute_capability: (i32, i32),
    pub sm_count: usize,
    pub total_mem_bytes: usize,
    pub copy_gbps: f64,
    pub cells: Vec<Cell>,
    pub steps: Vec<StepResult>,
    pub capacity: Vec<Capacity>,
    pub e2e: Vec<E2eResult>,
    pub runner: Option<RunnerReport>,
    pub errors: Vec<String>,
}

pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "### Device: {} (sm_{}{}, {} SMs, {:.1} GiB)\n",
        r.device,
        r.compute_capability.0,
        r.compute_capability.1,
        r.sm_count,
        r.total_mem_bytes as f64 / (1u64 << 30) as f64
    );
    if let Some(rr) = &r.runner {
        runner_markdown(&mut s, rr);
    }
    if r.copy_gbps > 0.0 {
        let _ = writeln!(
            s,
            "Device-to-device copy: **{:.0} GB/s** (bytes read + written).\n",
            r.copy_gbps
        );
    }
    if !r.cells.is_empty() {
        let _ = writeln!(
            s,
            "Kernel: absorbed MLA decode, bf16 cache 512/64, 32 heads, block 32 (ms/step = 32 × ms/call)\n"
        );
        let _ = writeln!(
            s,
            "| ctx | batch | kernel | splits | ms/call | ×32 layers ms/step | KV GB/s | % of copy BW |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
        for c in &r.cells {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {:.4} | {:.2} | {:.0} | {:.0}% |",
                c.ctx,
                c.batch,
                c.kernel,
                c.splits,
                c.ms_per_call,
                c.ms_per_step_32_layers,
                c.gbps,
                c.pct_of_copy_bw
            );
        }
        let _ = writeln!(s);
    }
    if !r.steps.is_empty() {
        let _ = writeln!(
            s,
            "Measured 32-layer attention steps (kernel only), ctx 32768:\n"
        );
        let _ = writeln!(s, "| rank plan | batch | KV B/token | ms/step | KV GB/s |");
        let _ = writeln!(s, "|---|---|---|---|---|");
        for x in &r.steps {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.3} | {:.0} |",
                x.plan, x.batch, x.kv_bytes_per_token, x.ms_per_step, x.gbps
            );
        }
        let _ = writeln!(s);
    }
    if !r.capacity.is_empty() {
        let _ = writeln!(
            s,
            "Sequences of 32768 tokens that fit a KV budget (ours: filled until CacheFull; GQA: {GQA_BYTES_PER_TOKEN} B/token by formula):\n"
        );
        let _ = writeln!(s, "| plan | budget GiB | KV B/token | ours | GQA 8B |");
        let _ = writeln!(s, "|---|---|---|---|---|");
        for c in &r.capacity {
            let _ = writeln!(
                s,
                "| {} | {:.0} | {} | {} | {} |",
                c.plan,
                c.budget_bytes as f64 / (1u64 << 30) as f64,
                c.kv_bytes_per_token,
                c.sequences_fit,
                c.gqa_sequences_fit
            );
        }
        let _ = writeln!(s);
    }
    if !r.e2e.is_empty() {
        let _ = writeln!(
            s,
            "End-to-end decode step, 8B-shaped random bf16 weights (candle cuBLAS matmuls + our kernel; RoPE omitted):\n"
        );
        let _ = writeln!(s, "| ctx | batch | ms/step | tokens/s | attention share |");
        let _ = writeln!(s, "|---|---|---|---|---|");
        for e in &r.e2e {
            let _ = writeln!(
                s,
                "| {} | {} | {:.2} | {:.1} | {} |",
                e.ctx,
                e.batch,
                e.ms_per_step,
                e.tokens_per_s,
                e.attention_ms
                    .map_or("-".into(), |a| format!("{:.0}%", 100.0 * a / e.ms_per_step))
            );
        }
        let _ = writeln!(s);
    }
    for e in &r.errors {
        let _ = writeln!(s, "- ERROR: {e}");
    }
    s
}

fn runner_markdown(s: &mut String, r: &RunnerReport) {
    let _ = writeln!(
        s,
        "Runner checks (CUDA runner vs CPU runner, greedy tokens, requests joining mid-way), \
         **{} failure(s)**:\n\n| model | variant | requests | equal tokens | first divergence |\n|---|---|---:|---:|---|",
        r.failures
    );
    for c in &r.checks {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} / {} | {:?} |",
            c.model, c.variant, c.requests, c.equal_tokens, c.tokens, c.first_divergence
        );
    }
    for b in &r.bad_input {
        let _ = writeln!(s, "\nBad input: {b}");
    }
    if !r.cells.is_empty() {
        let _ = writeln!(
            s,
            "\nRunner, bf16 weights and cache:\n\n| model | ctx | batch | prefill tok/s | decode ms/step | decode tok/s | KV B/token |\n|---|---:|---:|---:|---:|---:|---:|"
        );
        for c in &r.cells {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.0} | {:.2} | {:.0} | {} |",
                c.model,
                c.ctx,
                c.batch,
                c.prefill_tokens_per_s,
                c.decode_ms_per_step,
                c.decode_tokens_per_s,
                c.kv_bytes_per_token
            );
        }
    }
    let _ = writeln!(s);
}
