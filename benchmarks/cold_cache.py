"""Does the graph's Python run slower right after a model's forward pass?

Times one LangGraph step with the relay's state (:func:`relaygraph.bench.relay_step_ms`, the
thread's CPU clock) right after a decode step of a real model, and right after another
such graph step, alternating; prints the medians as JSON. A decode step streams the model's
weights through the CPU caches, so what runs next starts cold — which is why a handoff
between real models costs more than the same code between tiny ones::

    python benchmarks/cold_cache.py --model qwen2.5-coder-1.5b --rounds 40
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from relaygraph.agents.transformers_backend import TransformersBackend
from relaygraph.bench import relay_step_ms


def main() -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()

    model = TransformersBackend(args.model, dtype=args.dtype).model
    with torch.no_grad():
        cache = model(torch.arange(1000, 1064)[None], use_cache=True).past_key_values
    token = torch.tensor([[42]])
    relay_step_ms(steps=20, repeat=1, clock=time.thread_time)  # the graph's code, loaded once
    after_forward, after_step = [], []
    for _ in range(args.rounds):
        with torch.no_grad():  # one decode step (the cache grows a token a round)
            model(token, past_key_values=cache, use_cache=True)
        after_forward.append(relay_step_ms(steps=1, repeat=1, clock=time.thread_time))
        after_step.append(relay_step_ms(steps=1, repeat=1, clock=time.thread_time))
    return {"model": args.model, "rounds": args.rounds,
            "graph_step_cpu_ms_after_a_decode_step": statistics.median(after_forward),
            "graph_step_cpu_ms_after_a_graph_step": statistics.median(after_step)}


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
