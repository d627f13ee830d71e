#!/usr/bin/env bash
# Device side: heal two (or more) bases at once, each data-parallel over its share of the
# machine's GPUs (`heal-device.sh dp` with DP_GPUS; 4 GPUs and two bases: cuda:0,1 and
# cuda:2,3), time-boxed and resumable like `dp` (the same command again resumes both).
# Each basis's outputs of this call come back as one archive, $OUT/<basis>-call<N>.tgz
# (a call returns at most 8 files), plus its stdout in $OUT/<basis>-call<N>.txt.
#
#   TF32=1 bash scripts/gpu/heal-pair.sh TOKENS SECS [BASES]
#
# SECS bounds each `dp` like its own SECS (conversion and loading included); WALL (default
# SECS + 35) kills what is still running (e.g. a zero-shot evaluation that outlasts the
# call), so the archives are still written; an evaluation cut off that way is redone with
# `heal-device.sh eval healed-<basis>-<TOKENS>` (OUT set to a folder of your choice).
set -uo pipefail
cd "$(dirname "$0")/../.."
TOKENS="$1"
SECS="$2"
BASES="${3:-care transmla-pca}"
FINAL="${OUT:-/tmp/out}"
W=/tmp/heal
mkdir -p "$FINAL" "$W"
# Unpack the binary, teacher and data once, before the runs share them.
OUT="$W/setup-out" bash scripts/gpu/heal-device.sh setup > /dev/null || exit 1
ngpu=$(nvidia-smi -L | wc -l)
nb=$(wc -w <<< "$BASES")
per=$((ngpu / nb))
(( per > 0 )) || { echo "heal-pair.sh: $nb bases on $ngpu GPUs" >&2; exit 2; }
i=0
dirs=()
pids=()
for b in $BASES; do
  gpus=$(seq -s, $((i * per)) $((i * per + per - 1)))
  call=$(( $(find "$W" -maxdepth 1 -name "pair-$b-call*" | wc -l) + 1 ))
  o="$W/pair-$b-call$call"
  mkdir -p "$o"
  dirs+=("$o")
  (
    OUT="$o" DP_GPUS="$gpus" timeout "${WALL:-$((SECS + 35))}" \
      bash scripts/gpu/heal-device.sh dp "$TOKENS" "$SECS" "$b" > "$o/stdout.txt" 2>&1
    echo "exit $? (GPUs $gpus)" >> "$o/stdout.txt"
  ) &
  pids+=($!)
  i=$((i + 1))
done
for p in "${pids[@]}"; do wait "$p"; done
status=0
for o in "${dirs[@]}"; do
  n=$(basename "$o" | sed 's/^pair-//')
  cp "$o/stdout.txt" "$FINAL/$n.txt"
  tar -czf "$FINAL/$n.tgz" -C "$o" .
  echo "== $n"
  cat "$o/stdout.txt"
  grep -q '^exit 0 ' "$o/stdout.txt" || status=1
done
exit $status
