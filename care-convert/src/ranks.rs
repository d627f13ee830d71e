//! Per-layer rank allocation under a KV budget.
