#!/usr/bin/env bash
# Build the CUDA binaries here (no GPU needed) and pack them for the device machine.
#
#   scripts/gpu/build.sh [ours|anchor|heal|tests|all]      (default: all)
#
# - Toolkit: CUDA 13.0 from NVIDIA's PyPI wheels, assembled once by
#   shared/gpu/build-cuda-toolkit.sh into $CUDA_PREFIX (default ~/.cache/cuda13-pypi).
# - ours:   mla-attention's `mla_cuda_bench` with `--features cuda`, target dir
#           $CARGO_TARGET_DIR (default ~/.cache/cuda-target; never the CPU target dir).
# - heal:   care-convert with `--features cuda` (healing with `--device cuda`), same
#           target dir as ours.
# - tests:  the test binaries of `cargo test -p mla-attention --features cuda` (debug
#           profile, same target dir as ours), packed as test-<name>.xz for
#           scripts/gpu/test-device.sh.
# - anchor: gpu/anchor-kbench (mistralrs-paged-attn 0.8.1 kernels), its own target dir
#           ~/.cache/cuda-anchor-target.
# Each binary is stripped and xz-compressed into .devcarry/ (git-ignored), which the
# device call carries: run(command="bash scripts/gpu/run-device.sh", carry=[".devcarry"]).
# Fails if .devcarry/ exceeds the 64 MiB carry limit.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
WHAT="${1:-all}"
CUDA_PREFIX="${CUDA_PREFIX:-$HOME/.cache/cuda13-pypi}"
TOOLKIT="${TOOLKIT_SCRIPT:-}"
for cand in "$TOOLKIT" "$ROOT/shared/gpu/build-cuda-toolkit.sh" "$ROOT/../shared/gpu/build-cuda-toolkit.sh"; do
  if [[ -n "$cand" && -x "$cand" ]]; then TOOLKIT="$cand"; break; fi
done
[[ -x "$TOOLKIT" ]] || { echo "build.sh: build-cuda-toolkit.sh not found (set TOOLKIT_SCRIPT)" >&2; exit 2; }
if [[ ! -x "$CUDA_PREFIX/bin/nvcc" ]]; then
  "$TOOLKIT" "$CUDA_PREFIX"
fi
eval "$("$TOOLKIT" --env "$CUDA_PREFIX")"
CARRY="$ROOT/.devcarry"
mkdir -p "$CARRY"

pack() { # pack BINARY NAME
  strip -o "$CARRY/$2.bin" "$1"
  xz -6 -T1 -f -c "$CARRY/$2.bin" > "$CARRY/$2.xz"
  rm -f "$CARRY/$2.bin"
  echo "packed $2: $(stat -c %s "$CARRY/$2.xz") bytes"
}

if [[ "$WHAT" == ours || "$WHAT" == all ]]; then
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cuda-target}"
  cargo build --release -p mla-attention --features cuda --bin mla_cuda_bench
  pack "$CARGO_TARGET_DIR/release/mla_cuda_bench" mla_cuda_bench
fi
if [[ "$WHAT" == heal || "$WHAT" == all ]]; then
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cuda-target}"
  cargo build --release -p care-convert --features cuda --bin care-convert
  pack "$CARGO_TARGET_DIR/release/care-convert" care-convert
fi
if [[ "$WHAT" == tests || "$WHAT" == all ]]; then
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cuda-target}"
  rm -f "$CARRY"/test-*.xz
  cargo test -p mla-attention --features cuda --no-run --message-format=json-render-diagnostics \
    | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["name"], m["executable"])' \
    | while read -r name exe; do pack "$exe" "test-$name"; done
fi
if [[ "$WHAT" == anchor || "$WHAT" == all ]]; then
  (cd gpu/anchor-kbench && CARGO_TARGET_DIR="$HOME/.cache/cuda-anchor-target" \
     cargo build --release --locked)
  pack "$HOME/.cache/cuda-anchor-target/release/anchor-kbench" anchor-kbench
fi
total=$(find "$CARRY" -maxdepth 1 -type f -printf "%s\n" | awk "{s+=\$1} END {print s+0}")
echo "packed binaries in $CARRY: $total bytes (subfolders are carried separately)"
if (( total >= 64 * 1024 * 1024 )); then
  echo "build.sh: the packed binaries in $CARRY are over the 64 MiB carry limit" >&2
  exit 1
fi
