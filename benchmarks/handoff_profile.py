"""Where a handoff's time goes: CPU time per turn outside the models, by component.

``relaygraph bench`` measures the handoff overhead as the wall-clock gap between one
generation ending and the next starting; on a shared machine that gap is mostly waiting for
a core. This profile counts CPU time instead (``cProfile`` with the thread's CPU clock, so
time spent preempted is not counted) over relays of two untrained tiny models from the tests (real
transformers models, a real Redis: the embedded server, or ``$REDIS_URL``) at one token
per turn, and splits each turn's own time by the code it ran in: LangGraph, the store and
redis-py, tracing (OpenTelemetry), the policy, the graph's own nodes, rendering the next
view, and the models (``generate``: excluded from the overhead)::

    python benchmarks/handoff_profile.py --runs 30 > benchmarks/results/handoff_profile.json

``--controller/--expert`` profile a real pair instead (EOS dropped, so every run writes its
budget; ``--interval`` tokens per turn, ``--dtype``)::

    python benchmarks/handoff_profile.py --controller qwen2.5-coder-0.5b --expert qwen2.5-coder-1.5b \
        --interval 8 --tokens 128 --runs 4 --dtype bfloat16

Rounds alternate a profiled and an unprofiled pass: the unprofiled ones give the overhead
(CPU time of the run outside ``generate``, per turn), the profiled ones its split (the
profiler slows Python code, so their milliseconds read high; the shares hold). After each
unprofiled round it times, on the same clock, a LangGraph step that does only what a turn
asks of LangGraph (:func:`relaygraph.bench.relay_step_ms`): ``langgraph_step_cpu_ms`` is
the framework's floor, ``relaygraph_cpu_ms_per_turn`` what is ours above it.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

BUCKETS = [  # (component, path fragments), first match wins
    ("rendering the next view (chat template, tokenizer, agents)",
     ("/transformers/tokenization", "/transformers/utils/chat_template", "/jinja2/", "/tokenizers/",
      "tokenizers.Tokenizer", "relaygraph/agents/rendering", "relaygraph/agents/agent.py")),
    ("models (inside generate: not overhead)",
     ("/torch/", "/transformers/", "relaygraph/agents/transformers_backend", "relaygraph/agents/batching",
      "relaygraph/agents/decoding", "relaygraph/agents/kv", "relaygraph/bench/", "torch._C")),
    ("LangGraph (pregel loop, channels, checkpoints)", ("/langgraph/",)),
    ("LangChain callbacks and messages", ("/langchain_core/",)),
    ("store (relaygraph.trajectory + redis-py + socket I/O)",
     ("relaygraph/trajectory/", "/redis/", "socket", "{method 'recv", "{method 'send")),
    ("tracing (relaygraph.observability + OpenTelemetry)", ("relaygraph/observability/", "/opentelemetry/")),
    ("policy", ("relaygraph/policies/",)),
    ("graph nodes (relaygraph.graphs)", ("relaygraph/graphs/", "relaygraph/relay.py")),
    ("agents (wrappers, fallbacks)", ("relaygraph/agents/",)),
    ("pydantic", ("/pydantic",)),
]


MODELS = BUCKETS[1][0]
OTHER = "other (stdlib, threading, json)"


def bucket(path: str) -> str | None:
    for name, fragments in BUCKETS:
        if any(f in path for f in fragments):
            return name
    return None


def label(func: tuple[str, int, str]) -> str:
    path, line, name = func
    return f"{path}:{line}({name})"


def attribute(stats: pstats.Stats) -> dict[tuple[str, int, str], dict[str, float]]:
    """Each function's components with the share of its own time each gets: its own file's
    component, else (built-ins such as ``isinstance``, the standard library) its callers'
    components, split by the time it spent under each caller (walking up)."""
    table = stats.stats  # type: ignore[attr-defined]
    found: dict[tuple[str, int, str], dict[str, float]] = {}

    def of(func: tuple[str, int, str], depth: int = 0) -> dict[str, float]:
        if func in found:
            return found[func]
        own = bucket(label(func))
        shares: dict[str, float] = {own: 1.0} if own else {}
        callers = table[func][4] if func in table else {}
        if own is None and depth < 8 and callers:
            total = sum(edge[2] for edge in callers.values())
            for caller, edge in callers.items():
                weight = (edge[2] / total) if total else 1 / len(callers)
                for name, part in of(caller, depth + 1).items():
                    shares[name] = shares.get(name, 0.0) + weight * part
        found[func] = shares or {OTHER: 1.0}
        return found[func]

    for func in table:
        of(func)
    return found


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--controller", help="a real controller (catalog name or folder) "
                        "instead of the tests' untrained tiny model; needs --expert")
    parser.add_argument("--expert", help="the real expert beside --controller")
    parser.add_argument("--interval", type=int, default=1, help="tokens per turn (default 1)")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    if bool(args.controller) != bool(args.expert):
        parser.error("--controller and --expert go together")

    from relaygraph.agents.agent import Agent
    from relaygraph.agents.transformers_backend import TransformersBackend
    from relaygraph.bench import Recorder, relay_step_ms
    from relaygraph.policies import FixedIntervalPolicy
    from relaygraph.relay import Relay
    from relaygraph.trajectory.settings import open_store
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' tiny models
    from tests import tiny_models as tiny

    if args.controller:  # a real pair: EOS ids dropped, so every run writes its budget
        pair = [args.controller, args.expert]
        question = "Natalia sold clips to 48 of her friends in April, and then she sold half " \
                   "as many clips in May. How many clips did Natalia sell altogether?"
    else:  # untrained tiny models: they write to the budget (no early EOS)
        pair = [str(tiny._cached(lambda root: tiny.build_random_model(root, seed=3), "random-3")),
                str(tiny._cached(lambda root: tiny.build_random_model(root, seed=4), "random-4"))]
        question = tiny.QUESTION
    backends = [TransformersBackend(model, dtype=args.dtype) for model in pair]
    for backend in backends:
        backend.eos_ids = frozenset()
    recorders = [Recorder(backend) for backend in backends]
    agents = [Agent("controller", recorders[0]), Agent("expert", recorders[1])]
    relay = Relay(agents, FixedIntervalPolicy(agents=("controller", "expert"), interval=args.interval),
                  open_store(), max_tokens=args.tokens)
    relay.run(question)  # warm: caches, compiled scripts, connections

    profile = cProfile.Profile(timer=time.thread_time)
    turns = {"profiled": 0, "plain": 0}
    cpu = {"profiled": 0.0, "plain": 0.0}
    outside: list[float] = []  # plain rounds: CPU ms per turn outside generate()
    floor: list[float] = []  # CPU ms of a LangGraph step alone, after each plain round
    for round_ in range(2 * args.runs):
        kind = "profiled" if round_ % 2 == 0 else "plain"
        start = time.thread_time()
        if kind == "profiled":
            profile.enable()
        result = relay.run(question)
        if kind == "profiled":
            profile.disable()
        spent = time.thread_time() - start
        cpu[kind] += spent
        turns[kind] += len(result.segments)
        calls = [c for r in recorders for c in r.take()]
        if kind == "plain":
            inside = sum(c.cpu_end - c.cpu_start for c in calls)
            outside.append((spent - inside) / len(calls) * 1000)
            # LangGraph's own share, in the same minutes: a step doing only what a turn
            # asks of LangGraph (the relay's state schema, a turn's update, values stream)
            floor.append(relay_step_ms(steps=args.tokens, repeat=1, clock=time.thread_time))

    stats = pstats.Stats(profile)
    components = attribute(stats)
    by_bucket: dict[str, float] = defaultdict(float)
    for func, (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        for name, share in components[func].items():
            by_bucket[name] += tottime * share
    per_turn = {k: v / turns["profiled"] * 1000 for k, v in sorted(by_bucket.items(), key=lambda kv: -kv[1])}
    model_key = MODELS
    overhead = sum(v for k, v in per_turn.items() if k != model_key)
    slowdown = (cpu["profiled"] / turns["profiled"]) / (cpu["plain"] / turns["plain"])
    return {
        "what": "thread CPU ms per turn (one generation and the handoff after it), "
                f"{' + '.join(pair) if args.controller else 'two untrained tiny models'}, "
                f"interval {args.interval}, {args.tokens} tokens per run, {args.dtype}, by component; "
                "profiled rounds inflate Python time by the profiler_slowdown",
        "runs": args.runs, "turns_profiled": turns["profiled"],
        "cpu_ms_per_turn_plain": cpu["plain"] / turns["plain"] * 1000,
        "profiler_slowdown": slowdown,
        "overhead_cpu_ms_per_turn": {"median": statistics.median(outside), "min": min(outside),
                                     "rounds": outside},
        "langgraph_step_cpu_ms": {"median": statistics.median(floor), "rounds": floor},
        "relaygraph_cpu_ms_per_turn": statistics.median(outside) - statistics.median(floor),
        "overhead_cpu_ms_per_turn_profiled": overhead,
        "by_component_ms_per_turn_profiled": per_turn,
        "top_functions": top(stats, components, 25),
    }


def top(stats: pstats.Stats, components: dict[tuple[str, int, str], dict[str, float]], count: int
        ) -> list[dict[str, Any]]:
    """The functions that spent the most CPU of their own outside the models."""
    rows = []
    for func, (_, calls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        component = max(components[func].items(), key=lambda kv: kv[1])[0]
        if component == MODELS:
            continue
        rows.append({"function": label(func).split("site-packages/")[-1].split("/main/")[-1],
                     "component": component, "calls": calls,
                     "tottime_s": round(tottime, 4), "cumtime_s": round(cumtime, 4)})
    return sorted(rows, key=lambda r: -r["tottime_s"])[:count]


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
