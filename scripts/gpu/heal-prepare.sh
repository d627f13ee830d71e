#!/usr/bin/env bash
# Prepare the GPU healing inputs here (the device has no Rust, no network, and each call
# carries at most 64 MiB), in three git-ignored folders carried by three device calls on
# one warm machine:
#   .devcarry/heal-a  care-convert (CUDA build, xz) + teacher GGUF part 1
#   .devcarry/heal-b  teacher part 2 + sha256 + calibration text
#   .devcarry/heal-c  packed healing corpus + evaluation texts + zero-shot task requests
# then `bash scripts/gpu/heal-device.sh probe|run …` runs there (see that script).
#
#   scripts/gpu/heal-prepare.sh [MODEL]     (default smollm2-135m-instruct)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
MODEL="${1:-smollm2-135m-instruct}"
A="${CARE_ASSETS:-$HOME/.cache/care-assets}"
TOKENS="${HEAL_TOKENS:-20M}"
SPLIT=50000000
bash scripts/gpu/build.sh heal
CPU_BIN="${CPU_BIN:-$HOME/.cache/care-target/release/care-convert}"
[[ -x "$CPU_BIN" ]] || cargo build --release -p care-convert
D=.devcarry
rm -rf "$D/heal-a" "$D/heal-b" "$D/heal-c"
mkdir -p "$D/heal-a" "$D/heal-b/assets/data/exllamav2-cal" "$D/heal-c/assets/data/sotu"
mv "$D/care-convert.xz" "$D/heal-a/"
G="$A/models/$MODEL/model.gguf"
head -c "$SPLIT" "$G" > "$D/heal-a/teacher.part1"
tail -c +"$((SPLIT + 1))" "$G" > "$D/heal-b/teacher.part2"
sha256sum "$G" > "$D/heal-b/teacher.sha256"
cp "$A"/data/exllamav2-cal/{c4,wiki,code}.utf8 "$D/heal-b/assets/data/exllamav2-cal/"
# Healing text: SOTU speeches, the Python docs and the CPython stdlib — minus the two
# perplexity evaluation texts.
"$CPU_BIN" pack-data --quiet --model "$G" \
  --source "$A/data/sotu" --source "$A/data/python3.11-docs" --source "$A/data/cpython3.11-stdlib" \
  --exclude "$A/data/sotu/2016_barack_obama_d.txt" --exclude /usr/lib/python3.11/functools.py \
  --tokens "$TOKENS" --seq-len 512 --heldout 32 --seed 42 --out "$D/heal-c/heal.tokens"
cp "$A/data/sotu/2016_barack_obama_d.txt" "$D/heal-c/assets/data/sotu/"
cp /usr/lib/python3.11/functools.py "$D/heal-c/assets/data/functools.py"
(cd "$A/data" && tar -czf "$ROOT/$D/heal-c/tasks.tar.gz" \
  oe_eval_tasks/{arc_easy,arc_challenge,hellaswag,piqa,winogrande,boolq,openbookqa}/rc_0shot)
tree=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
for p in heal-a heal-b heal-c; do
  size=$(du -sb "$D/$p" | cut -f1)
  echo "$D/$p: $size bytes (+ $tree bytes of working tree)"
  if (( size + tree >= 64 * 1024 * 1024 )); then
    echo "heal-prepare.sh: $D/$p is over the 64 MiB carry limit" >&2
    exit 1
  fi
done
