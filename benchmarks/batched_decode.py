"""Batched decode throughput and peak memory of one model: N threads generating T tokens
each (EOS ignored) through one TransformersBackend, so every step runs batched.

    python benchmarks/batched_decode.py [MODEL] [N] [T]   # default qwen2.5-coder-0.5b 32 160

To compare two versions, run it from each checkout in turn, several rounds interleaved
(``PYTHONPATH=/path/to/other/checkout python benchmarks/batched_decode.py``): bf16 batched
decoding depends on which rows share a step, so tokens differ from run to run.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from relaygraph.agents.backend import Prompt, StopRule
from relaygraph.agents.catalog import converted_dir
from relaygraph.agents.transformers_backend import TransformersBackend

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k_test.jsonl"


def main(model: str = "qwen2.5-coder-0.5b", n: int = 32, tokens: int = 160) -> None:
    with open(DATA) as lines:
        questions = [json.loads(line)["question"] for line in lines][:n]
    backend = TransformersBackend(str(converted_dir(model)), dtype="bfloat16")
    backend.eos_ids = frozenset()
    rule = StopRule(max_tokens=tokens)
    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        gens = list(pool.map(
            lambda q: backend.generate(Prompt(q, "Please reason step by step."), rule), questions))
    wall = time.perf_counter() - start
    total = sum(len(g.token_ids) for g in gens)
    print(json.dumps({"model": model, "threads": n, "tokens": total, "wall_s": round(wall, 1),
                      "tok_s": round(total / wall, 1),
                      "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}))


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0] if args else "qwen2.5-coder-0.5b", *(int(a) for a in args[1:3]))
