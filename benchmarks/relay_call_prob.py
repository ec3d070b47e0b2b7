"""How likely is a command where the warm-up taught one? Teacher-forced over the warm-up's
own SFT rows that carry commands, the log-probability and rank of ``<call>``'s first token
at each command position, under the base 0.5B model and the shipped relay controller:

    python benchmarks/relay_call_prob.py runs/relay/warmup/warmup.jsonl 16 \
        > benchmarks/results/relay-call-prob.json

(greedy decoding writes the command only where it is the top-ranked token).
"""

from __future__ import annotations

import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from relaygraph.agents.catalog import resolve


def main(path: str, count: int) -> dict[str, dict[str, float]]:
    rows = [json.loads(line) for line in open(path)]
    rows = [r for r in rows if r["calls"]][:count]
    tok = AutoTokenizer.from_pretrained(resolve("qwen2.5-coder-0.5b"))
    pattern = tok.encode("<call>", add_special_tokens=False)
    out = {}
    for name in ("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-relay"):
        model = AutoModelForCausalLM.from_pretrained(resolve(name), dtype=torch.bfloat16).eval()
        logprobs, ranks = [], []
        for row in rows:
            ids = row["input_ids"]
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            for i in range(1, len(ids) - len(pattern)):
                if ids[i:i + len(pattern)] == pattern:
                    logprobs.append(lp[i - 1, pattern[0]].item())
                    ranks.append(int((lp[i - 1] > lp[i - 1, pattern[0]]).sum()) + 1)
        out[name] = {"positions": len(logprobs), "mean_logprob": sum(logprobs) / len(logprobs),
                     "top1": sum(r == 1 for r in ranks), "median_rank": sorted(ranks)[len(ranks) // 2]}
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2])), indent=1))
