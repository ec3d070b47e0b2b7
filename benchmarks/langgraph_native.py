"""What the LangGraph-native features cost per tiny relay run (3 turns, 2 handoffs, 23 tokens).

    python benchmarks/langgraph_native.py [--rounds 30]

Interleaved rounds (A, B, C, D, A, B, ...) so drifting machine load hits every variant alike:

- ``run``: ``Relay.run`` (``custom`` events only; no LangChain handler, so no LLM runs);
- ``stream messages``: ``relay.graph.stream(stream_mode=["messages", "custom", "values"])``,
  every token also an ``AIMessageChunk`` through LangGraph's messages handler;
- ``callback handler``: ``Relay.run(config={"callbacks": [handler]})`` with a
  ``BaseCallbackHandler`` that counts tokens (one LLM run per turn);
- ``checkpointer``: ``Relay.run`` on a new thread of an ``InMemorySaver`` each time.

Prints the median and minimum per run in ms, the ratio of the medians to ``run``, and the
extra cost per generated token; the tiny models make the graph's own work visible (with
real models a token costs 10-200 ms). Results go to benchmarks/results/langgraph_native.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()

    import torch
    from langchain_core.callbacks import BaseCallbackHandler
    from langgraph.checkpoint.memory import InMemorySaver

    from relaygraph import Agent, CallTokenPolicy, Relay
    from relaygraph.agents.transformers_backend import TransformersBackend
    from relaygraph.trajectory import RedisStore
    from tests import tiny_models as tiny
    from tests.servers import RedisServer

    torch.set_num_threads(1)  # steadier on a shared machine; the models are tiny anyway
    controller, expert = tiny.relay_pair()
    server = RedisServer(Path(tempfile.mkdtemp(prefix="rg-bench-"))).start()
    store = RedisStore.from_url(server.url)
    agents = [Agent("controller", TransformersBackend(str(controller), dtype="float32"), tiny.SYSTEM_PROMPT),
              Agent("expert", TransformersBackend(str(expert), dtype="float32"), tiny.SYSTEM_PROMPT)]
    plain = Relay(agents, CallTokenPolicy(), store, max_tokens=64)
    threaded = Relay(agents, CallTokenPolicy(), store, max_tokens=64, checkpointer=InMemorySaver())

    class Counter(BaseCallbackHandler):
        tokens = 0

        def on_llm_new_token(self, token, **kw) -> None:
            Counter.tokens += 1

    def run() -> int:
        return sum(plain.run(tiny.QUESTION).tokens_by_agent.values())

    def stream_messages() -> int:
        chunks = [c for mode, c in plain.graph.stream({"question": tiny.QUESTION},
                                                      stream_mode=["messages", "custom", "values"])
                  if mode == "messages"]
        return len(chunks)

    def callbacks() -> int:
        return sum(plain.run(tiny.QUESTION, config={"callbacks": [Counter()]}).tokens_by_agent.values())

    def checkpointed() -> int:
        return sum(threaded.run(tiny.QUESTION).tokens_by_agent.values())

    variants = {"run": run, "stream messages": stream_messages, "callback handler": callbacks,
                "checkpointer": checkpointed}
    for fn in variants.values():  # warm-up
        fn()
    tokens = run()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for _ in range(args.rounds):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - start) * 1e3)
    finally:
        store.close()
        server.stop()
    base = statistics.median(samples["run"])
    rows = []
    print(f"python {sys.version.split()[0]}, {args.rounds} interleaved rounds, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}, {tokens} tokens per run")
    print(f"{'variant':20} {'median ms':>10} {'min ms':>8} {'ratio':>6} {'extra us/token':>15}")
    for name, values in samples.items():
        median, best = statistics.median(values), min(values)
        extra = (median - base) * 1e3 / tokens
        rows.append({"variant": name, "median_ms": round(median, 2), "min_ms": round(best, 2),
                     "ratio_to_run": round(median / base, 3), "extra_us_per_token": round(extra, 1)})
        print(f"{name:20} {median:10.2f} {best:8.2f} {median / base:6.2f} {extra:15.1f}")
    out = Path(__file__).parent / "results" / "langgraph_native.json"
    out.write_text(json.dumps({"rounds": args.rounds, "tokens_per_run": tokens, "rows": rows,
                               "cpus": os.cpu_count()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
