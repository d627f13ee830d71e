#!/usr/bin/env bash
# Prepare the GPU healing inputs here (the device has no Rust, no network, and each call
# carries at most 64 MiB, working tree included) as git-ignored folders, one per device
# call on one warm machine (ignored paths stay there between calls):
#   .devcarry/heal-a     care-convert (CUDA build, xz), teacher sha256, calibration text,
#                        packed healing corpus, evaluation texts, zero-shot task requests
#                        (unless NO_TASKS=1), and the first part of the teacher GGUF
#   .devcarry/heal-pNN   the following parts of the teacher GGUF
# then `bash scripts/gpu/heal-device.sh probe|run …` runs there (see that script).
#
#   scripts/gpu/heal-prepare.sh [MODEL]     (default smollm2-135m-instruct)
#   HEAL_TOKENS=1M NO_TASKS=1 scripts/gpu/heal-prepare.sh qwen2.5-coder-0.5b-instruct
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
MODEL="${1:-smollm2-135m-instruct}"
A="${CARE_ASSETS:-$HOME/.cache/care-assets}"
TOKENS="${HEAL_TOKENS:-20M}"
[[ "${SKIP_BUILD:-0}" = 1 ]] || bash scripts/gpu/build.sh heal
CPU_BIN="${CPU_BIN:-$HOME/.cache/care-target/release/care-convert}"
[[ -x "$CPU_BIN" ]] || cargo build --release -p care-convert
D=.devcarry
rm -rf "$D"/heal-a "$D"/heal-b "$D"/heal-c "$D"/heal-p*
mkdir -p "$D/heal-a/assets/data/exllamav2-cal" "$D/heal-a/assets/data/sotu"
cp "$D/care-convert.xz" "$D/heal-a/"
G="$A/models/$MODEL/model.gguf"
sha256sum "$G" > "$D/heal-a/teacher.sha256"
cp "$A"/data/exllamav2-cal/{c4,wiki,code}.utf8 "$D/heal-a/assets/data/exllamav2-cal/"
# Healing text: SOTU speeches, the Python docs and the CPython stdlib — minus the two
# perplexity evaluation texts.
"$CPU_BIN" pack-data --quiet --model "$G" \
  --source "$A/data/sotu" --source "$A/data/python3.11-docs" --source "$A/data/cpython3.11-stdlib" \
  --exclude "$A/data/sotu/2016_barack_obama_d.txt" --exclude "$A/data/cpython3.11-stdlib/functools.py" \
  --tokens "$TOKENS" --seq-len 512 --heldout 32 --seed 42 --out "$D/heal-a/heal.tokens"
cp "$A/data/sotu/2016_barack_obama_d.txt" "$D/heal-a/assets/data/sotu/"
cp "$A/data/cpython3.11-stdlib/functools.py" "$D/heal-a/assets/data/functools.py"
if [[ "${NO_TASKS:-0}" != 1 ]]; then
  (cd "$A/data" && tar -czf "$ROOT/$D/heal-a/tasks.tar.gz" \
    oe_eval_tasks/{arc_easy,arc_challenge,hellaswag,piqa,winogrande,boolq,openbookqa}/rc_0shot)
fi
# Later parts each fill one call next to the working tree (PART overrides, in bytes).
source scripts/gpu/carry-parts.sh
split_for_carry "$G" "$D/heal-a" "$D/heal-p" teacher
