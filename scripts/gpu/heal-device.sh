#!/usr/bin/env bash
# Device side of the GPU healing runs (scripts/gpu/heal-prepare.sh builds the inputs here).
# Runs in the repository root on the device machine; results go to $OUT.
#
#   bash scripts/gpu/heal-device.sh probe              # speed of one config, no outputs
#   bash scripts/gpu/heal-device.sh run TOKENS [BASES]  # convert, heal, evaluate
#   bash scripts/gpu/heal-device.sh parallel TOKENS SECS [BASES]  # all bases at once, time-boxed
#   bash scripts/gpu/heal-device.sh eval NAME           # evaluate /tmp/heal/NAME
#   bash scripts/gpu/heal-device.sh dp TOKENS SECS [BASIS]  # one basis on all GPUs (data parallel)
#   bash scripts/gpu/heal-device.sh setup              # unpack binary, teacher and data only
#
# Inputs (carried, git-ignored, made by heal-prepare.sh): .devcarry/heal-a/ (care-convert.xz
# built with --features cuda, the teacher's sha256, calibration text, packed healing corpus,
# evaluation texts, zero-shot task requests, part 1 of the teacher GGUF) and
# .devcarry/heal-pNN/ (the teacher's other parts). They exceed one call's carry, so they
# travel over several calls on the same warm machine (ignored paths stay there between
# calls). TASKS="" evaluates perplexity only; LIMIT (default 50) sets the zero-shot docs per
# task; HEAL_FLAGS adds flags to every `heal` (e.g. "--eval-sequences 8").
set -euo pipefail
cd "$(dirname "$0")/../.."
MODE="${1:-probe}"
TOKENS="${2:-5M}"
BASES="${3:-care transmla-pca}"
OUT="${OUT:-/tmp/out}"
A=.devcarry/heal-a
W=/tmp/heal
mkdir -p "$W" "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
# A rebuilt binary may come alone in .devcarry/heal-bin (a small carry).
BIN_XZ="$A/care-convert.xz"
[[ -f .devcarry/heal-bin/care-convert.xz ]] && BIN_XZ=.devcarry/heal-bin/care-convert.xz
if [[ ! -x "$W/care-convert" || "$BIN_XZ" -nt "$W/care-convert" ]]; then
  xz -dc "$BIN_XZ" > "$W/care-convert"
  chmod +x "$W/care-convert"
fi
CC="$W/care-convert"
TEACHER="$W/teacher.gguf"
if [[ ! -s "$TEACHER" ]]; then
  # Parts in order of their number, whichever folder carried them.
  ls .devcarry/heal-*/teacher.part* | awk -F/ '{print $NF" "$0}' | sort | cut -d' ' -f2 \
    | xargs cat > "$TEACHER"
fi
(cd "$W" && sha256sum -c <(sed "s#  .*#  teacher.gguf#" "$OLDPWD/$A/teacher.sha256")) \
  || { rm -f "$TEACHER"; exit 1; }
export CARE_ASSETS="$W/assets"
if [[ ! -d "$CARE_ASSETS/data/sotu" ]]; then
  mkdir -p "$CARE_ASSETS/data"
  cp -r "$A/assets/data/." "$CARE_ASSETS/data/"
  [[ -f "$A/tasks.tar.gz" ]] && tar -xzf "$A/tasks.tar.gz" -C "$CARE_ASSETS/data"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
PROSE="$CARE_ASSETS/data/sotu/2016_barack_obama_d.txt"
CODE="$CARE_ASSETS/data/functools.py"
TASKS="${TASKS-arc_easy,arc_challenge,hellaswag,piqa,winogrande,boolq,openbookqa}"

convert() { # convert BASIS
  [[ -d "$W/student-$1" ]] && return 0
  "$CC" mla --quiet --model "$TEACHER" --kv-keep 0.5 --basis "$1" \
    --calib-samples 256 --calib-seq-len 32 --seed 42 --out "$W/student-$1" > "$OUT/convert-$1.json"
}

heal() { # heal BASIS DEVICE [EXTRA FLAGS…]: the run of `run` and `parallel`, summary and log in $OUT
  local b=$1 dev=$2
  shift 2
  "$CC" heal --quiet --teacher "$TEACHER" --student "$W/student-$b" --data "$A/heal.tokens" \
    --tokens "$TOKENS" --batch "${BATCH:-4}" --grad-accum "${ACCUM:-4}" --lr "${LR:-1e-4}" \
    --device "$dev" --out "$W/healed-$b-$TOKENS" --eval-every "${EVAL_EVERY:-100}" \
    --save-every 0 ${HEAL_FLAGS:-} "$@" --format json > "$OUT/heal-$b-$TOKENS.json" 2> "$OUT/heal-$b-$TOKENS.log"
}

evaluate() { # evaluate MODEL NAME
  "$CC" eval --quiet --model "$1" --ppl "$PROSE" --ppl "$CODE" --max-tokens 1024 --window 512 \
    ${TASKS:+--tasks "$TASKS" --limit "${LIMIT:-50}"} --format json > "$OUT/eval-$2.json"
}

case "$MODE" in
  probe)
    convert care
    for cfg in "8 1" "16 1"; do
      set -- $cfg
      rm -rf "$W/probe"
      "$CC" heal --quiet --teacher "$TEACHER" --student "$W/student-care" --data "$A/heal.tokens" \
        --tokens 2M --batch "$1" --grad-accum "$2" --device cuda --out "$W/probe" \
        --stop-after 6 --eval-every 0 --eval-sequences 8 --format json > "$OUT/probe-$1.json" \
        2> "$OUT/probe-$1.log" || { tail -5 "$OUT/probe-$1.log"; continue; }
      python3 - "$W/probe/heal/log.jsonl" "$1" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1])][1:]
steady = recs[2:] or recs
secs = sum(r["secs"] for r in steady) / len(steady)
toks = recs[0]["tokens"]
print(f"batch {sys.argv[2]}: {secs:.3f} s/update, {toks / secs:,.0f} tokens/s, loss {recs[-1]['loss']:.3f}")
PY
    done
    ;;
  run)
    for b in $BASES; do
      convert "$b"
      # The unhealed student and the healed model are evaluated unless SKIP_EVAL=1 (a
      # call has 10 minutes; `eval DIR NAME` evaluates later in another call).
      [[ "${SKIP_EVAL:-0}" = 1 || "${SKIP_STUDENT_EVAL:-0}" = 1 ]] || evaluate "$W/student-$b" "student-$b"
      heal "$b" cuda
      cp "$W/healed-$b-$TOKENS/heal/log.jsonl" "$OUT/log-$b-$TOKENS.jsonl"
      cp "$W/healed-$b-$TOKENS/heal/loss.png" "$OUT/loss-$b-$TOKENS.png"
      cp "$W/healed-$b-$TOKENS/care.json" "$OUT/care-$b-$TOKENS.json"
      [[ "${SKIP_EVAL:-0}" = 1 ]] || evaluate "$W/healed-$b-$TOKENS" "healed-$b-$TOKENS"
    done
    python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for f in sorted(out.glob("eval-*.json")):
    r = json.loads(f.read_text())
    ppl = [p["result"]["ppl"] for p in r.get("perplexity", [])]
    acc = r.get("average_acc") or 0.0
    print(f"{f.stem:40} PPL {' / '.join(f'{p:.2f}' for p in ppl)}  avg acc {acc:.3f}")
PY
    ;;
  parallel)
    # parallel TOKENS SECS [BASES]: heal every basis at once, each on its own GPU (they
    # share one when the machine has fewer), for at most SECS seconds; a later call with
    # the same arguments resumes each run where it stopped (exactly: same curve). TF32=1
    # adds --tf32. Returns each run's log.jsonl, stderr and JSON summary, and the loss
    # curves once a run is finished.
    SECS="${3:-540}"
    BASES="${4:-care transmla-pca}"
    ngpu=$(nvidia-smi -L | wc -l)
    i=0
    pids=()
    for b in $BASES; do
      convert "$b"
      d="$W/healed-$b-$TOKENS"
      extra=()
      [[ -d "$d" ]] && extra+=(--resume)
      [[ "${TF32:-0}" = 1 ]] && extra+=(--tf32)
      heal "$b" "cuda:$((i % ngpu))" --time-limit "$SECS" "${extra[@]}" &
      pids+=($!)
      i=$((i + 1))
    done
    status=0
    for p in "${pids[@]}"; do wait "$p" || status=1; done
    rm -f "$OUT/gpu.txt" "$OUT"/convert-*.json # at most 8 files come back
    # Finished runs are evaluated at once (CPU, in parallel; perplexity and zero-shot),
    # unfinished ones by perplexity only, unless SKIP_EVAL=1. Leave ~1 minute (unfinished)
    # or ~3 minutes (finishing) of the call for this. A finished run's stderr is shown
    # below instead of returned.
    epids=()
    for b in $BASES; do
      if grep -q '"finished": *true' "$OUT/heal-$b-$TOKENS.json" 2>/dev/null; then
        tail -3 "$OUT/heal-$b-$TOKENS.log"
        rm -f "$OUT/heal-$b-$TOKENS.log"
        if [[ "${SKIP_EVAL:-0}" != 1 ]]; then
          evaluate "$W/healed-$b-$TOKENS" "healed-$b-$TOKENS" &
          epids+=($!)
        fi
      elif [[ "${SKIP_EVAL:-0}" != 1 ]]; then
        # Not finished: the output directory holds the model of the last update (written
        # with the checkpoint), so its perplexity comes back now — a machine that goes back
        # before the next call loses the checkpoint but not this row.
        done_=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["updates_done"])' \
          "$OUT/heal-$b-$TOKENS.json" 2>/dev/null || echo 0)
        if (( done_ > 0 )); then
          TASKS="" evaluate "$W/healed-$b-$TOKENS" "healed-$b-$TOKENS-at-$done_" &
          epids+=($!)
        fi
      fi
    done
    for p in "${epids[@]}"; do wait "$p" || status=1; done
    for b in $BASES; do
      d="$W/healed-$b-$TOKENS"
      cp "$d/heal/log.jsonl" "$OUT/log-$b-$TOKENS.jsonl" 2>/dev/null || true
      [[ -f "$d/heal/loss.png" ]] && grep -q '"finished": *true' "$OUT/heal-$b-$TOKENS.json" \
        && cp "$d/heal/loss.png" "$OUT/loss-$b-$TOKENS.png"
      tail -3 "$OUT/heal-$b-$TOKENS.log" 2>/dev/null || true # a finished run's is gone
      python3 - "$d/heal/log.jsonl" "$b" <<'PY' || true
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
last = recs[-1]
ppl = [r for r in recs if r.get("heldout_ppl")]
secs = [r["secs"] for r in recs[1:]][-20:]
print(f"{sys.argv[2]}: update {last['step']} tokens {last['tokens']:,} loss {last['loss']:.4f} "
      f"held-out PPL {ppl[-1]['heldout_ppl']:.3f} (start {ppl[0]['heldout_ppl']:.3f}) "
      f"{sum(secs) / max(len(secs), 1):.2f} s/update")
PY
    done
    exit $status
    ;;
  dp)
    # dp TOKENS SECS [BASIS]: heal one basis (default care) data-parallel over every GPU of
    # the machine (`heal --devices cuda:0,…`) for at most SECS seconds (loading included),
    # resuming a run this machine already holds. While it runs, nvidia-smi logs each GPU's
    # memory every 2 s ($OUT/mem-<call>.csv; with the log's per-update seconds that is the
    # memory per update). SCALE=1 first times SCALE_UPDATES (default 4) updates of the same
    # configuration on 1 GPU and on all GPUs (fresh outputs, 8 held-out rows) into
    # $OUT/scale.txt; TOKENS=auto then sets the schedule to what all GPUs heal in
    # TRAIN_SECS seconds at the measured rate (rounded down to 0.1 M; kept in
    # $W/dp-tokens for the calls that resume). The copies between GPUs go device to device
    # unless that fails in the probe (then through the host; REPLICA_COPY overrides).
    # When the run is finished it is evaluated (perplexity; zero-shot unless TASKS="").
    # DP_GPUS (e.g. "0,1") restricts the run to those GPUs, so that two bases can heal at
    # once on halves of the machine (scripts/gpu/heal-pair.sh; each with its own OUT).
    SECS="${3:-540}"
    B="${4:-care}"
    GPUS="${DP_GPUS:-$(seq -s, 0 $(( $(nvidia-smi -L | wc -l) - 1 )))}"
    ngpu=$(tr ',' '\n' <<< "$GPUS" | wc -l)
    mv "$OUT/gpu.txt" "$W/gpu-$B.txt" # at most 8 files come back: the cards go into mem-*.csv
    DEVS=$(sed 's/\([0-9]\+\)/cuda:\1/g' <<< "$GPUS")
    CALL=$(( $(find "$W" -maxdepth 1 -name "dp-$B-call-*" | wc -l) + 1 ))
    touch "$W/dp-$B-call-$CALL"
    t0=$(date +%s)
    convert "$B"
    COPY="${REPLICA_COPY:-$(cat "$W/dp-copy" 2>/dev/null || echo direct)}"
    probe() { # probe NAME DEVICES COPY: seconds per update (steady) or nothing
      rm -rf "$W/probe-$1"
      "$CC" heal --quiet --teacher "$TEACHER" --student "$W/student-$B" --data "$A/heal.tokens" \
        --tokens 2M --batch "${BATCH:-4}" --grad-accum "${ACCUM:-4}" --lr "${LR:-1e-4}" \
        --devices "$2" --replica-copy "$3" --out "$W/probe-$1" --stop-after "${SCALE_UPDATES:-4}" \
        --eval-every 0 --eval-sequences 8 --format json > "$W/probe-$1.json" 2> "$W/probe-$1.log" \
        || { tail -3 "$W/probe-$1.log" >> "$OUT/scale.txt"; return 1; }
      python3 - "$W/probe-$1/heal/log.jsonl" "$1 ($2, $3)" >> "$OUT/scale.txt" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1])][1:]
steady = recs[1:] or recs
secs = sum(r["secs"] for r in steady) / len(steady)
sync = [r["sync_secs"] for r in steady if r.get("sync_secs") is not None]
toks = recs[0]["tokens"]
losses = " ".join("%.4f" % r["loss"] for r in recs)
print(f"{sys.argv[2]}: {secs:.3f} s/update, {toks / secs:,.0f} tokens/s"
      + (f", of which {sum(sync) / len(sync):.3f} s moving/summing/copying back" if sync else "")
      + f"; losses {losses}")
PY
    }
    if [[ "${SCALE:-0}" = 1 && ! -f "$W/dp-tokens" ]]; then
      probe 1gpu "${DEVS%%,*}" "$COPY" || true
      if ! probe "${ngpu}gpu" "$DEVS" "$COPY"; then
        COPY=host
        probe "${ngpu}gpu" "$DEVS" host || true
      fi
      echo "$COPY" > "$W/dp-copy"
      cat "$OUT/scale.txt"
    fi
    if [[ "$TOKENS" == auto ]]; then
      if [[ ! -f "$W/dp-tokens" ]]; then
        python3 - "$W/probe-${ngpu}gpu/heal/log.jsonl" "${TRAIN_SECS:-600}" > "$W/dp-tokens" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1])][1:]
steady = recs[1:] or recs
rate = recs[0]["tokens"] / (sum(r["secs"] for r in steady) / len(steady))
print(f"{int(rate * float(sys.argv[2]) / 1e5) / 10:.1f}M")
PY
      fi
      TOKENS=$(cat "$W/dp-tokens")
      echo "schedule: $TOKENS tokens"
    fi
    d="$W/healed-$B-$TOKENS"
    extra=()
    [[ -d "$d" ]] && extra+=(--resume)
    [[ "${TF32:-0}" = 1 ]] && extra+=(--tf32)
    left=$(( SECS - ($(date +%s) - t0) ))
    sed 's/^/# /' "$W/gpu-$B.txt" > "$OUT/mem-$CALL.csv"
    nvidia-smi --query-gpu=timestamp,index,memory.used --format=csv,noheader,nounits -lms 2000 \
      -i "$GPUS" >> "$OUT/mem-$CALL.csv" &
    smi=$!
    date +%s.%N > "$W/dp-$B-start-$CALL"
    status=0
    "$CC" heal --quiet --teacher "$TEACHER" --student "$W/student-$B" --data "$A/heal.tokens" \
      --tokens "$TOKENS" --batch "${BATCH:-4}" --grad-accum "${ACCUM:-4}" --lr "${LR:-1e-4}" \
      --devices "$DEVS" --replica-copy "$COPY" --out "$d" --eval-every "${EVAL_EVERY:-100}" \
      --save-every 0 --time-limit "$left" ${HEAL_FLAGS:-} "${extra[@]}" --format json \
      > "$OUT/heal-$B-$TOKENS-call$CALL.json" 2> "$OUT/heal-$B-$TOKENS-call$CALL.log" || status=1
    date +%s.%N >> "$W/dp-$B-start-$CALL"
    kill "$smi" 2>/dev/null || true
    echo "call $CALL: start/end $(tr '\n' ' ' < "$W/dp-$B-start-$CALL")" >> "$OUT/mem-$CALL.csv"
    cp "$d/heal/log.jsonl" "$OUT/log-$B-$TOKENS.jsonl" 2>/dev/null || true
    tail -3 "$OUT/heal-$B-$TOKENS-call$CALL.log"
    if grep -q '"finished": *true' "$OUT/heal-$B-$TOKENS-call$CALL.json" 2>/dev/null; then
      cp "$d/heal/loss.png" "$OUT/loss-$B-$TOKENS.png"
      cp "$d/care.json" "$OUT/care-$B-$TOKENS.json"
      if [[ "${SKIP_EVAL:-0}" != 1 ]]; then
        # Perplexity first (seconds), so a row comes back even if the zero-shot tasks
        # outlast the call.
        TASKS="" evaluate "$d" "healed-$B-$TOKENS-ppl" || status=1
        [[ -z "$TASKS" ]] || evaluate "$d" "healed-$B-$TOKENS" || status=1
      fi
    fi
    python3 - "$d/heal/log.jsonl" "$OUT" <<'PY' || true
import json, pathlib, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
last = recs[-1]
ppl = [r for r in recs if r.get("heldout_ppl")]
secs = [r["secs"] for r in recs[1:]][-20:]
sync = [r.get("sync_secs") or 0 for r in recs[1:]][-20:]
print(f"update {last['step']} tokens {last['tokens']:,} loss {last['loss']:.4f} "
      f"held-out PPL {ppl[-1]['heldout_ppl']:.3f} (start {ppl[0]['heldout_ppl']:.3f}) "
      f"{sum(secs) / max(len(secs), 1):.2f} s/update ({sum(sync) / max(len(sync), 1):.2f} s sync)")
for f in sorted(pathlib.Path(sys.argv[2]).glob("eval-*.json")):
    r = json.loads(f.read_text())
    p = [x["result"]["ppl"] for x in r.get("perplexity", [])]
    print(f"{f.stem}: PPL {' / '.join(f'{x:.2f}' for x in p)} avg acc {r.get('average_acc')}")
PY
    exit $status
    ;;
  eval)
    evaluate "$W/$2" "$2"
    ;;
  setup)
    ;;
  *)
    echo "usage: heal-device.sh probe | run TOKENS [BASES] | parallel TOKENS SECS [BASES] | dp TOKENS SECS [BASIS] | eval NAME | setup" >&2
    exit 2
    ;;
esac
