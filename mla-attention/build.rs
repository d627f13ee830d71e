//! Compiles `kernels/*.cu` to fatbins (SASS for `CUDA_COMPUTE_CAP`, default 90, plus
//! PTX of the same architecture) with nvcc, only when the `cuda` feature is on. The
//! default build never looks for nvcc.
//!
//! nvcc is `$NVCC`, else `$CUDA_HOME/bin/nvcc`, else `nvcc` on `PATH`
//! (`shared/gpu/build-cuda-toolkit.sh --env` sets all three).

use std::path::{Path, PathBuf};
use std::process::Command;

const KERNELS: [&str; 3] = ["mla_decode_tc", "mla_decode_generic", "mla_cache"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CARGO_FEATURE_CUDA");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = nvcc_path();
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let cap: String = cap.chars().filter(|c| c.is_ascii_digit()).collect();
    let gencode = format!("arch=compute_{cap},code=[sm_{cap},compute_{cap}]");
    for name in KERNELS {
        let src = Path::new("kernels").join(format!("{name}.cu"));
        let dst = out_dir.join(format!("{name}.fatbin"));
        let status = Command::new(&nvcc)
            .args(["-std=c++17", "-O3", "-fatbin", "-gencode", &gencode, "-o"])
            .arg(&dst)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| {
                panic!("cannot run {}: {e} (set NVCC or CUDA_HOME)", nvcc.display())
            });
        assert!(status.success(), "nvcc failed on {}", src.display());
    }
}

fn nvcc_path() -> PathBuf {
    if let Some(p) = std::env::var_os("NVCC") {
        return p.into();
    }
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        let p = Path::new(&home).join("bin/nvcc");
        if p.exists() {
            return p;
        }
    }
    "nvcc".into()
}
