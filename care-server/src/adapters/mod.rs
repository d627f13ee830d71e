//! The glue between infinigram-spec and mistral.rs 0.8.1's public surface.

mod hook;
mod null_drafter;

pub use hook::{CostFn, HookShared, InfinigramHook};
pub use null_drafter::{write_null_drafter, SIGNATURE_LOGIT, SIGNATURE_THRESHOLD};
