#!/usr/bin/env bash
# Runs on the device machine, from the repo root, with .devcarry/ carried:
#   run(command="bash scripts/gpu/run-device.sh quick", carry=[".devcarry"])
#   run(command="bash scripts/gpu/run-device.sh full",  carry=[".devcarry"])
#   run(command="bash scripts/gpu/run-device.sh runner", carry=[".devcarry/runner-a"]) after
#     a first call carrying .devcarry/runner-p02 (scripts/gpu/runner-prepare.sh)
# Unpacks the binaries built by scripts/gpu/build.sh, records the card, runs our
# benchmarks (mla_cuda_bench) and the mistral.rs 0.8.1 kernel anchor
# (anchor-kbench) at the same cells, in one call. Everything lands in $OUT
# (results.json, results.md, ours.log, anchor.csv, anchor.log, gpu.txt).
set -uo pipefail
MODE="${1:-quick}"
OUT="${OUT:-/tmp/mla-out}"
mkdir -p "$OUT"
BIN=/tmp/mla-bin
mkdir -p "$BIN"
for name in mla_cuda_bench anchor-kbench; do
  if [[ -f ".devcarry/$name.xz" ]]; then
    python3 -c "import lzma,shutil,sys;shutil.copyfileobj(lzma.open(sys.argv[1]),open(sys.argv[2],'wb'))" \
      ".devcarry/$name.xz" "$BIN/$name" && chmod +x "$BIN/$name"
  fi
done
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv \
  | tee "$OUT/gpu.txt"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

case "$MODE" in
  quick) OURS=(--quick --ctx 4096,32768 --batch 1,8); ANCHOR=(--ctx 4096,32768 --batch 1,8); T=300 ;;
  full)  OURS=(--mode bench --e2e); ANCHOR=(); T=400 ;;
  all)   OURS=(--e2e); ANCHOR=(); T=420 ;;
  profile)
    # Kernel variants compiled here with nvcc (MLA_KERNEL_DIR overrides the embedded
    # fatbins), timed by difference; then Nsight Compute on the real kernel.
    KV=/tmp/kv
    GEN="arch=compute_90,code=[sm_90,compute_90]"
    for v in ${VARIANTS:-base:-lineinfo skip_score:-DMLA_SKIP_SCORE skip_out:-DMLA_SKIP_OUT skip_load:-DMLA_SKIP_LOAD}; do
      name=${v%%:*}; flags=${v#*:}; mkdir -p "$KV/$name"
      for k in mla_decode_tc mla_decode_generic; do
        nvcc -std=c++17 -O3 -fatbin -gencode "$GEN" ${flags//,/ } -o "$KV/$name/$k.fatbin" \
          mla-attention/kernels/$k.cu &
      done
    done
    wait
    for d in "$KV"/*/ ${HOST_VARIANTS:-}; do
      name=$(basename "$d")
      echo "== variant $name"
      [[ -d "$d" ]] || { export MLA_TC_FORCE="$name"; d=/nonexistent; }
      MLA_KERNEL_DIR="$d" timeout -k 5 120 "$BIN/mla_cuda_bench" --mode kernel --ctx ${PCTX:-32768} --batch 1,8 \
        --out "/tmp/o_$name" 2>&1 | grep -E "bf16 512|error|Error|cell"
      unset MLA_TC_FORCE
    done 2>&1 | tee "$OUT/variants.log"
    NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    if [[ -n "$NCU" && -z "${NO_NCU:-}" ]]; then
      MLA_KERNEL_DIR=$KV/base timeout -k 5 120 "$NCU" --clock-control none --section SpeedOfLight \
        -k regex:"mla_split|mla_combine" --launch-skip 40 --launch-count 4 "$BIN/mla_cuda_bench" --mode kernel \
        --ctx 32768 --batch 1 --out /tmp/ncu_o > "$OUT/ncu_b1.txt" 2>&1
      grep -E "mla_|Duration" "$OUT/ncu_b1.txt"
      MLA_KERNEL_DIR=$KV/base timeout -k 5 200 "$NCU" --clock-control none --section WarpStateStats \
        --section SourceCounters --section SpeedOfLight --import-source no -k regex:mla_split_tc --launch-skip 20 \
        --launch-count 1 --page source --print-source sass --csv "$BIN/mla_cuda_bench" --mode kernel \
        --ctx 32768 --batch 8 --out /tmp/ncu_o > "$OUT/ncu_src.csv" 2> "$OUT/ncu_src.log"
      echo "ncu source exit $? $(wc -l < "$OUT/ncu_src.csv") lines"
    fi
    exit 0 ;;
  sweep)
    # Kernel-shape and split-length sweep: CONFIGS holds FORCE:SPLIT pairs (FORCE as
    # MLA_TC_FORCE, e.g. m1t32, or "auto"; SPLIT as MLA_SPLIT_TOKENS, the bench's override of
    # the automatic split length, or "auto"), then the anchor on the same card, one call.
    for c in ${CONFIGS:-auto:auto auto:512 auto:1024}; do
      f=${c%%:*}; n=${c#*:}
      if [[ $f = auto ]]; then unset MLA_TC_FORCE; else export MLA_TC_FORCE=$f; fi
      if [[ $n = auto ]]; then unset MLA_SPLIT_TOKENS; else export MLA_SPLIT_TOKENS=$n; fi
      echo "== kernel $f, split tokens $n"
      timeout -k 5 120 "$BIN/mla_cuda_bench" --mode kernel --ctx "${SCTX:-4096,16384,32768,65536}" \
        --batch "${SBATCH:-1,2,4,8}" --out "/tmp/sweep_${f}_$n" > /dev/null 2> "/tmp/sweep-$f-$n.log"
      grep -E "bf16 512/64 ctx|rror" "/tmp/sweep-$f-$n.log"
    done
    unset MLA_TC_FORCE
    unset MLA_SPLIT_TOKENS
    timeout -k 5 150 "$BIN/anchor-kbench" --ctx "${ACTX:-4096,32768}" --batch "${ABATCH:-1,8}" > "$OUT/anchor.csv" 2> "$OUT/anchor.log"
    echo "anchor-kbench exit $?"
    cat "$OUT/anchor.csv"
    exit 0 ;;
  runner)
    # The GPU DecoderRunner on a real converted model (inputs: scripts/gpu/runner-prepare.sh,
    # carried over two calls). Converts here (CPU), then mla_cuda_bench --mode runner
    # (CUDA runner vs CPU runner tokens, bad input, prefill/decode tokens/s) and the HF
    # transformers anchor (original GQA model and the converted one) on the same card.
    R=.devcarry/runner-a
    W=/tmp/runner
    mkdir -p "$W"
    python3 -c "import lzma,shutil,sys;shutil.copyfileobj(lzma.open(sys.argv[1]),open(sys.argv[2],'wb'))" \
      "$R/mla_cuda_bench.xz" "$BIN/mla_cuda_bench" && chmod +x "$BIN/mla_cuda_bench"
    [[ -x "$W/care-convert" ]] || { xz -dc "$R/care-convert.xz" > "$W/care-convert"; chmod +x "$W/care-convert"; }
    if [[ ! -s "$W/model.gguf" ]]; then
      ls .devcarry/runner-*/model.part* | awk -F/ '{print $NF" "$0}' | sort | cut -d' ' -f2 \
        | xargs cat > "$W/model.gguf"
    fi
    cp "$R/model.sha256" "$W/"
    (cd "$W" && sha256sum -c model.sha256) || { rm -f "$W/model.gguf"; exit 1; }
    export CARE_ASSETS="$W/assets"
    mkdir -p "$CARE_ASSETS/data/exllamav2-cal"
    cp "$R"/cal/* "$CARE_ASSETS/data/exllamav2-cal/"
    if [[ ! -d "$W/mla" ]]; then
      t0=$SECONDS
      "$W/care-convert" mla --quiet --model "$W/model.gguf" --kv-keep 0.5 \
        --calib-samples 256 --calib-seq-len 32 --seed 42 --out "$W/mla" > "$OUT/convert.json"
      echo "converted in $((SECONDS - t0)) s"
      "$W/care-convert" tokenizer --model "$W/model.gguf" --out "$W/mla/tokenizer.json" > /dev/null
    fi
    # The one-shot form too (CARE-E: water-filled per-layer ranks), on a smaller grid: its
    # decode rebuilds every key per step.
    if [[ ! -d "$W/oneshot" && -z "${NO_ONESHOT:-}" ]]; then
      "$W/care-convert" convert --model "$W/model.gguf" --method care-e --kv-keep 0.5 \
        --calib-samples 256 --calib-seq-len 32 --out "$W/oneshot" > "$OUT/convert-oneshot.json"
      cp "$W/mla/tokenizer.json" "$W/oneshot/"
    fi
    rc=0
    if [[ -d "$W/oneshot" ]]; then
      timeout -k 5 "${OT:-200}" "$BIN/mla_cuda_bench" --mode runner --model "$W/oneshot" \
        --text "$R/prompt.txt" --ctx 512 --batch 1,8 --new 32 --out "$OUT/oneshot" \
        2> "$OUT/ours-oneshot.log" > /dev/null || rc=$?
      echo "mla_cuda_bench --mode runner (one-shot) exit $rc"
      grep -E "runner|rror" "$OUT/ours-oneshot.log" | tail -20
    fi
    timeout -k 5 "${RT:-300}" "$BIN/mla_cuda_bench" --mode runner --model "$W/mla" --text "$R/prompt.txt" \
      --ctx "${RCTX:-512,2048}" --batch "${RBATCH:-1,8,32,64}" --new "${RNEW:-64}" --out "$OUT" \
      2> "$OUT/ours.log" > /dev/null || rc=$?
    echo "mla_cuda_bench --mode runner exit $rc"
    grep -E "runner|rror" "$OUT/ours.log" | tail -40
    if [[ -f "$R/hf_decode_bench.py" && -z "${NO_HF:-}" ]]; then
      [[ -d "$W/orig" ]] || "$W/care-convert" export-hf --model "$W/model.gguf" --out "$W/orig" > /dev/null
      timeout -k 5 "${HT:-240}" python3 "$R/hf_decode_bench.py" --model "$W/orig" --model "$W/mla" \
        --text "$R/prompt.txt" --tokenizer "$W/mla/tokenizer.json" --ctx "${RCTX:-512,2048}" \
        --batch "${RBATCH:-1,8,32,64}" --new "${RNEW:-64}" > "$OUT/hf.json" 2> "$OUT/hf.log"
      echo "hf_decode_bench exit $?"
      grep -vE "Warning|warn" "$OUT/hf.log" | tail -30
    fi
    [[ -f "$OUT/results.md" ]] && cat "$OUT/results.md"
    exit "$rc" ;;
  *) echo "run-device.sh: mode quick|full|all|profile|sweep|runner" >&2; exit 2 ;;
esac

rc=0
if [[ -x "$BIN/mla_cuda_bench" ]]; then
  timeout -k 5 "$T" "$BIN/mla_cuda_bench" "${OURS[@]}" --out "$OUT" 2> "$OUT/ours.log" > /dev/null
  rc=$?
  echo "mla_cuda_bench exit $rc"
  tail -n 40 "$OUT/ours.log"
else
  echo "no mla_cuda_bench in .devcarry" ; rc=2
fi
if [[ -x "$BIN/anchor-kbench" ]]; then
  timeout -k 5 150 "$BIN/anchor-kbench" "${ANCHOR[@]}" > "$OUT/anchor.csv" 2> "$OUT/anchor.log"
  echo "anchor-kbench exit $?"
  cat "$OUT/anchor.csv"
fi
[[ -f "$OUT/results.md" ]] && cat "$OUT/results.md"
exit "$rc"
