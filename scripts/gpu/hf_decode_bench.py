#!/usr/bin/env python3
"""HF transformers anchor for the GPU runner bench: greedy decode tokens/s of a model
directory at each batch x context, bf16, on the device GPU, in the same call as ours.

    python3 hf_decode_bench.py --model DIR [--model DIR2] --text FILE --tokenizer TOK.json \
        --ctx 512,2048 --batch 1,8,32 --new 64 > hf.json

Prompts are windows of the text's tokens (the same rule as mla_cuda_bench: request i
starts at token (i * 977) mod n). Decode time = (time of generate(new) - time of
generate(1)) / (new - 1), so prefill is excluded as in our table.
"""
import argparse
import json
import sys
import time

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM


def windows(ids, count, length):
    n = len(ids)
    return [[ids[(i * 977 + k) % n] for k in range(length)] for i in range(count)]


def timed_generate(model, x, new):
    torch.cuda.synchronize()
    t = time.perf_counter()
    model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new,
                   min_new_tokens=new, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--ctx", default="512,2048")
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--new", type=int, default=64)
    a = ap.parse_args()
    ids = Tokenizer.from_file(a.tokenizer).encode(open(a.text).read()).ids
    rows = []
    for path in a.model:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
        name = f"HF {model.config.model_type} ({path.rstrip('/').split('/')[-1]})"
        with torch.no_grad():
            timed_generate(model, torch.tensor(windows(ids, 1, 64)).cuda(), 4)  # warm-up
            for ctx in map(int, a.ctx.split(",")):
                for b in map(int, a.batch.split(",")):
                    x = torch.tensor(windows(ids, b, ctx)).cuda()
                    try:
                        t1 = timed_generate(model, x, 1)
                        tn = timed_generate(model, x, a.new)
                    except torch.OutOfMemoryError as e:
                        print(f"{name} ctx {ctx} batch {b}: OOM {e}", file=sys.stderr)
                        torch.cuda.empty_cache()
                        continue
                    ms = (tn - t1) * 1e3 / (a.new - 1)
                    row = {"model": name, "ctx": ctx, "batch": b, "decode_ms_per_step": ms,
                           "decode_tokens_per_s": b * 1e3 / ms}
                    print(json.dumps(row), file=sys.stderr)
                    rows.append(row)
        del model
        torch.cuda.empty_cache()
    json.dump(rows, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
