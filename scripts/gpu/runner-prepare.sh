#!/usr/bin/env bash
# Prepare the device run of the GPU DecoderRunner (mla_cuda_bench --mode runner) on a
# real converted model: the device has no Rust and no network, and one call carries at
# most 64 MiB, so the inputs travel as git-ignored folders over two calls on one warm
# machine (ignored paths stay there between calls):
#   .devcarry/runner-a   mla_cuda_bench (CUDA build, xz), care-convert (CPU build, xz),
#                        calibration text, the prompt text, the model's sha256 and the
#                        first part of its GGUF
#   .devcarry/runner-p02 the rest of the GGUF
# then, on the device: bash scripts/gpu/run-device.sh runner (converts there, checks the
# CUDA runner against the CPU runner, benchmarks, HF transformers anchor).
#
#   scripts/gpu/runner-prepare.sh [MODEL]     (default smollm2-135m-instruct)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
MODEL="${1:-smollm2-135m-instruct}"
A="${CARE_ASSETS:-$HOME/.cache/care-assets}"
[[ "${SKIP_BUILD:-0}" = 1 ]] || bash scripts/gpu/build.sh ours
CPU_BIN="${CPU_BIN:-$HOME/.cache/care-target/release/care-convert}"
[[ -x "$CPU_BIN" ]] || CARGO_TARGET_DIR="$HOME/.cache/care-target" cargo build --release -p care-convert
D=.devcarry
rm -rf "$D"/runner-a "$D"/runner-p*
mkdir -p "$D/runner-a/cal"
cp "$D/mla_cuda_bench.xz" "$D/runner-a/"
strip -o "$D/runner-a/care-convert" "$CPU_BIN"
xz -6 -T1 -f "$D/runner-a/care-convert"
cp "$A"/data/exllamav2-cal/{c4,wiki,code}.utf8 "$D/runner-a/cal/"
cp "$A/data/cpython3.11-stdlib/functools.py" "$D/runner-a/prompt.txt"
cp scripts/gpu/hf_decode_bench.py "$D/runner-a/" 2>/dev/null || true
G="$A/models/$MODEL/model.gguf"
sha256sum "$G" | sed "s#  .*#  model.gguf#" > "$D/runner-a/model.sha256"
source scripts/gpu/carry-parts.sh
split_for_carry "$G" "$D/runner-a" "$D/runner-p" model
