#!/usr/bin/env python3
"""Cross-engine check of the stock DeepSeek-V2 MLA export: HF transformers loads each
directory written by `examples/stock_mla_crosscheck.rs` unchanged and its logits must
match the ones our runtime wrote to `expected.json`.

    python3 scripts/hf_crosscheck.py DIR [DIR ...]      # exit 1 on any mismatch

Runs on the GPU machine (CUDA if available, else CPU), f32, no network, no remote code.
"""
import json
import sys


def main(dirs):
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, device {dev}"
          + (f" ({torch.cuda.get_device_name(0)})" if dev == "cuda" else ""))
    failed = False
    for d in dirs:
        exp = json.load(open(f"{d}/expected.json"))
        cfg = AutoConfig.from_pretrained(d)
        model = AutoModelForCausalLM.from_pretrained(
            d, torch_dtype=torch.float32, attn_implementation="eager").to(dev).eval()
        ids = torch.tensor([exp["tokens"]], device=dev)
        with torch.no_grad():
            logits = model(ids).logits[0].float().cpu()
        ours = torch.tensor(exp["logits"])
        diff = (logits - ours).abs().max().item()
        scale = ours.abs().max().item()
        agree = (logits.argmax(-1) == ours.argmax(-1)).float().mean().item()
        ok = diff <= 1e-3 * max(scale, 1.0) and agree == 1.0
        failed |= not ok
        print(f"{d}: {type(model).__name__} ({cfg.model_type}), {len(exp['tokens'])} positions, "
              f"max |Δlogit| {diff:.3e} (max |logit| {scale:.2f}), argmax agreement "
              f"{100 * agree:.1f}% -> {'OK' if ok else 'MISMATCH'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
