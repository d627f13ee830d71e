#!/usr/bin/env bash
# Runs on the device machine, from the repo root, with .devcarry/ carried:
#   run(command="bash scripts/gpu/test-device.sh", carry=[".devcarry"])
# after `scripts/gpu/build.sh tests` here. Unpacks the test binaries of
# `cargo test -p mla-attention --features cuda` and runs the CUDA ones (every test of
# tests/cuda_*.rs, and the library's `cuda::` unit tests). Logs land in $OUT; the exit
# code is the number of failing binaries (0: all passed).
set -uo pipefail
OUT="${OUT:-/tmp/mla-test-out}"
mkdir -p "$OUT"
BIN=/tmp/mla-test-bin
mkdir -p "$BIN"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
failed=0
shopt -s nullglob
for xz in .devcarry/test-*.xz; do
  name=$(basename "$xz" .xz); name=${name#test-}
  python3 -c "import lzma,shutil,sys;shutil.copyfileobj(lzma.open(sys.argv[1]),open(sys.argv[2],'wb'))" \
    "$xz" "$BIN/$name" && chmod +x "$BIN/$name"
  case "$name" in
    cuda_*) filter=() ;;
    mla_attention) filter=(cuda::) ;;
    *) continue ;;
  esac
  echo "== $name ${filter[*]}"
  if timeout -k 5 "${T:-400}" "$BIN/$name" "${filter[@]}" --nocapture > "$OUT/$name.log" 2>&1; then
    grep -E "^test result" "$OUT/$name.log"
  else
    failed=$((failed + 1))
    echo "FAILED: $name"; tail -40 "$OUT/$name.log"
  fi
done
echo "failing test binaries: $failed"
exit "$failed"
