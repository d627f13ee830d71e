#!/usr/bin/env python3
"""Answer (and optionally time) queries with the infini-gram 2.6.0 engine.

Used by infinigram-spec's oracle test and benchmark. Reads a JSON request on stdin:

    {"index_dir": str, "token_dtype": "u16"|"u32", "eos": int, "vocab_size": int,
     "load_to_ram": bool, "tasks": [{"op": "count"|"ntd"|"infgram_ntd"|"infgram_prob",
     "queries": [[int, ...], ...], "max_support": int, "time": bool}]}

and writes {"results": [{"op": str, "answers": [...], "ns": [int, ...]}]} to stdout.
Answers: count -> int; ntd -> {"prompt_cnt", "next": {token: count}, "approx"};
infgram_ntd -> the same plus "suffix_len". Timings call the C++ engine object directly
(pybind11 call overhead included, Python argument checks excluded).
"""
import json
import sys
import time

from infini_gram.engine import InfiniGramEngine


def main():
    req = json.load(sys.stdin)
    eng = InfiniGramEngine(
        index_dir=req["index_dir"],
        eos_token_id=req["eos"],
        vocab_size=req["vocab_size"],
        version=4,
        token_dtype=req["token_dtype"],
        load_to_ram=req.get("load_to_ram", False),
    )
    cpp = eng.engine
    results = []
    for task in req["tasks"]:
        op, queries = task["op"], task["queries"]
        ms = task.get("max_support", 1000)
        if op == "count":
            call = lambda q: cpp.count(input_ids=q)
            answer = lambda r: r.count
        elif op == "ntd":
            call = lambda q: cpp.ntd(prompt_ids=q, max_support=ms)
            answer = lambda r: {
                "prompt_cnt": r.prompt_cnt,
                "approx": r.approx,
                "next": {str(t): v.cont_cnt for t, v in r.result_by_token_id.items()},
            }
        elif op == "infgram_ntd":
            call = lambda q: cpp.infgram_ntd(prompt_ids=q, max_support=ms)
            answer = lambda r: {
                "prompt_cnt": r.prompt_cnt,
                "approx": r.approx,
                "suffix_len": r.suffix_len,
                "next": {str(t): v.cont_cnt for t, v in r.result_by_token_id.items()},
            }
        elif op == "infgram_prob":
            # The longest-match query: suffix length plus one count for `eos` after it.
            eos = req["eos"]
            call = lambda q: cpp.infgram_prob(prompt_ids=q, cont_id=eos)
            answer = lambda r: {"prompt_cnt": r.prompt_cnt, "suffix_len": r.suffix_len}
        else:
            raise SystemExit(f"unknown op {op}")
        answers, ns = [], []
        if task.get("time", False):
            for q in queries[: min(len(queries), 50)]:
                call(q)  # warm up
        for q in queries:
            t0 = time.perf_counter_ns()
            r = call(q)
            ns.append(time.perf_counter_ns() - t0)
            answers.append(answer(r))
        results.append({"op": op, "answers": answers, "ns": ns})
    json.dump({"results": results}, sys.stdout)


if __name__ == "__main__":
    main()
