#!/usr/bin/env bash
# Session 13: four rows (original/converted x plain/drafting, plus stock mistral.rs) in one
# care-serve-bench run, then concurrency 32. Release binaries copied to s13/bin.
set -u
B=~/.cache/care-bench
T=$B/s13/bin
cd $B/s13
echo "=== four rows $(date -u)"; uptime
$T/care-serve-bench --server $T/care-server --model qwen2.5-coder-0.5b-instruct \
  --plain $B/qwen-f32 --arch qwen2 --plain $B/qwen-mla --arch deepseekv2 \
  --code-index $B/qwen-code.igs --workloads humaneval --prompts 16 --lengths full --gen 64 \
  --concurrency 1,16 --modes host,off,on --replay 0 --replay-trees 0 \
  --out four > four.md 2> four.err
echo "exit $?"; uptime
echo "=== concurrency 32, completions, both $(date -u)"
$T/care-serve-bench --server $T/care-server --model qwen2.5-coder-0.5b-instruct \
  --plain $B/qwen-f32 --arch qwen2 --plain $B/qwen-mla --arch deepseekv2 \
  --code-index $B/qwen-code.igs --workloads humaneval --prompts 32 --lengths full --gen 64 \
  --concurrency 32 --modes host,off,on --replay 0 --replay-trees 0 \
  --out c32 > c32.md 2> c32.err
echo "exit $?"; uptime
echo "=== concurrency 32, chat, original $(date -u)"
$T/care-serve-bench --server $T/care-server --model qwen2.5-coder-0.5b-instruct \
  --plain $B/qwen-f32 --arch qwen2 \
  --code-index $B/qwen-code.igs --workloads humaneval-chat --prompts 32 --lengths full --gen 64 \
  --concurrency 32 --modes host,off,on --replay 0 --replay-trees 0 \
  --out c32-chat > c32-chat.md 2> c32-chat.err
echo "exit $?"; uptime
echo "=== done $(date -u)"
