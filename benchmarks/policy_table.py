"""Accuracy and call ratio per policy on GSM8K problems with the offline Qwen pair.

    python benchmarks/policy_table.py --limit 20 --max-tokens 256

Loads the 0.5B controller and 1.5B expert once, runs each policy greedily over the first
``--limit`` problems of shared/data/gsm8k_test.jsonl, checks the ``\\boxed{}`` answer
numerically against GSM8K's ``#### N``, and writes benchmarks/results/policy_table.json
(resumable: finished (policy, problem) pairs are kept) and a Markdown table. The random
and perfect routers send whole queries to one model, so under greedy decoding their runs
are exactly the solo runs of the model they pick: they are derived from those.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from relaygraph import Agent, Relay
from relaygraph.agents.catalog import pull
from relaygraph.agents.transformers_backend import TransformersBackend
from relaygraph.eval.answers import gsm8k_gold, numeric_match
from relaygraph.policies import (
    PROMPTED_CALL_SYSTEM_PROMPT,
    CallTokenPolicy,
    ConfidencePolicy,
    FixedIntervalPolicy,
    SoloPolicy,
)
from relaygraph.trajectory import open_store

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "gsm8k_test.jsonl"
OUT = ROOT / "benchmarks" / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--policies", default="solo-small,solo-large,confidence,fixed-interval,prompted-call")
    ap.add_argument("--threshold", type=float, default=-3.0)
    args = ap.parse_args()

    problems = [json.loads(line) for line in args.data.read_text().splitlines()[: args.limit]]
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "policy_table.json"
    done: dict = json.loads(path.read_text()) if path.exists() else {}
    for name in ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"):
        pull(name, progress=print)
    small, large = TransformersBackend("qwen2.5-coder-0.5b"), TransformersBackend("qwen2.5-coder-1.5b")
    store = open_store()
    agents = [Agent("controller", small), Agent("expert", large)]
    policies = {
        "solo-small": ([agents[0]], SoloPolicy("controller")),
        "solo-large": ([agents[1]], SoloPolicy("expert")),
        "confidence": (agents, ConfidencePolicy(threshold=args.threshold, fallback_tokens=16,
                                                warmup=4, min_gap=8)),
        "fixed-interval": (agents, FixedIntervalPolicy(interval=32)),
        "prompted-call": ([Agent("controller", small, PROMPTED_CALL_SYSTEM_PROMPT), agents[1]],
                          CallTokenPolicy(name="prompted-call")),
    }
    for key in args.policies.split(","):
        crew, policy = policies[key]
        relay = Relay(crew, policy, store, max_tokens=args.max_tokens)
        rows = done.setdefault(key, {})
        for i, item in enumerate(problems):
            if str(i) in rows:
                continue
            started = time.perf_counter()
            result = relay.run(item["question"])
            rows[str(i)] = {
                "correct": numeric_match(result.answer, gsm8k_gold(item["answer"])),
                "answer": result.answer, "tokens": result.tokens_by_agent,
                "call_ratio": result.call_ratio, "handoffs": result.handoffs,
                "seconds": time.perf_counter() - started, "trajectory_id": result.trajectory_id,
            }
            path.write_text(json.dumps(done, indent=1))
            print(f"{key} {i}: {'✓' if rows[str(i)]['correct'] else '✗'} "
                  f"ratio {result.call_ratio:.2f} {rows[str(i)]['seconds']:.0f}s", flush=True)
    write_table(done, len(problems))


def derived(done: dict, n: int) -> dict:
    """Random (p=0.5, seed 0) and perfect routers from the solo runs (exact under greedy)."""
    small, large = done.get("solo-small", {}), done.get("solo-large", {})
    out: dict = {}
    if len(small) < n or len(large) < n:
        return out
    rnd = random.Random(0)
    out["random-router(p=0.5)"] = {i: large[i] if rnd.random() < 0.5 else small[i] for i in map(str, range(n))}
    out["perfect-router"] = {i: small[i] if small[i]["correct"] else large[i] for i in map(str, range(n))}
    return out


def write_table(done: dict, n: int) -> None:
    lines = ["| policy | problems | accuracy | call ratio (expert tokens / all) | tokens / problem | s / problem |",
             "|---|---|---|---|---|---|"]
    for key, rows in {**done, **derived(done, n)}.items():
        rows = [rows[str(i)] for i in range(n) if str(i) in rows]
        if not rows:
            continue
        tokens = sum(sum(r["tokens"].values()) for r in rows)
        expert = sum(r["tokens"].get("expert", 0) for r in rows)
        lines.append(f"| {key} | {len(rows)} | {sum(r['correct'] for r in rows) / len(rows):.0%} "
                     f"| {expert / tokens if tokens else 0:.1%} | {tokens / len(rows):.0f} "
                     f"| {sum(r['seconds'] for r in rows) / len(rows):.1f} |")
    table = "\n".join(lines)
    (OUT / "policy_table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
