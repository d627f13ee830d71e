# Ask stock mistral.rs (through care-server, x-engine: mistralrs) the MT-Bench short prompts
# whose answers differed from ours, N times each; compare with our engine's recorded answer.
import json, sys, urllib.request
base, jsonl, questions, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
rows = [json.loads(l) for l in open(jsonl)]
qs = [json.loads(l) for l in open(questions)]
diff = [r for r in rows if r["workload"] == "mtbench" and r["length"] == "short" and not r["on_equals_host"]]
out = []
for r in diff:
    q = qs[r["index"]]["turns"][0]
    for k in range(n):
        body = {"model": "default", "max_tokens": 128, "temperature": 0.0, "stream": False,
                "messages": [{"role": "user", "content": q}]}
        req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json", "x-engine": "mistralrs"})
        text = json.load(urllib.request.urlopen(req, timeout=600))["choices"][0]["message"]["content"]
        same = text.strip() == r["on"].strip()
        same_first = text.strip() == (r.get("host") or "").strip()
        out.append({"index": r["index"], "ask": k, "equals_ours": same, "equals_first_host_answer": same_first})
        print(json.dumps(out[-1]), flush=True)
