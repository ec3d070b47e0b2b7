"""``relaygraph bench``: what relaying costs on your own model pair, as ratios from one run.

- ``prefill_amplification`` per agent: tokens the model processed (prefilled + decoded) /
  tokens in its final view, over a fixed-interval relay with many handoffs — with KV-cache
  reuse and without it (naive: every turn re-reads the whole trajectory, as the research
  code does). Goal with reuse: <= 1.05.
- ``handoff_overhead_ms``: the time between one generation ending and the next starting
  (policy, Redis append, tracing, the graph step, building the next view — models
  excluded), median over the handoffs, and its ratio to a bare LangGraph step. Goal: < 0.5 ms.
- ``relay_vs_solo``: the relay's wall time / the sum of each model's solo time to write
  the same numbers of tokens. Goal: <= 1.1.
- ``throughput``: generated tokens per second with 1, 8, 32 concurrent trajectories.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from relaygraph.agents.agent import Agent
from relaygraph.agents.backend import Backend, Generation, Prompt, Sampling, StopRule, TextCallback
from relaygraph.agents.wrapping import BackendWrapper
from relaygraph.policies import FixedIntervalPolicy
from relaygraph.relay import Relay
from relaygraph.trajectory.store import TrajectoryStore

GOALS = {"prefill_amplification": 1.05, "handoff_overhead_ms": 0.5, "relay_vs_solo": 1.1}
QUESTION = ("A robe takes 2 bolts of blue fiber and half that much white fiber. A tailor makes "
            "7 robes, then buys fiber for 3 more robes at $12 per bolt. Explain each step in "
            "detail: how many bolts does the tailor use in all, and how much does the extra "
            "fiber cost?")


@dataclass
class Call:
    """One generate() call as seen from outside the backend."""

    start: float
    end: float
    generation: Generation


class Recorder(BackendWrapper):
    """A backend wrapper that records every call (for the measurements; thread-safe)."""

    def __init__(self, backend: Backend) -> None:
        super().__init__(backend)
        self.calls: list[Call] = []
        self._lock = threading.Lock()

    def generate(self, prompt: Prompt, rule: StopRule, sampling: Sampling = Sampling(),
                 on_text: TextCallback | None = None, cache_key: str | None = None) -> Generation:
        start = time.perf_counter()
        gen = self.inner.generate(prompt, rule, sampling, on_text, cache_key)
        with self._lock:
            self.calls.append(Call(start, time.perf_counter(), gen))
        return gen


def amplification(calls: Sequence[Call]) -> dict[str, float | int]:
    """(prefilled + decoded) / tokens in the final view; a model's own decoded tokens count as
    processed input, so a perfect cache scores about 1 and the naive relay far above."""
    processed = sum(c.generation.prefilled_tokens + len(c.generation.token_ids) for c in calls)
    last = calls[-1].generation
    view = last.prompt_tokens + len(last.token_ids)
    return {"processed": processed, "view": view, "ratio": processed / view if view else 0.0}


def bare_langgraph_step_ms(steps: int = 2000) -> float:
    """Median time of one step of a trivial two-node LangGraph graph (the floor we compare to)."""
    from typing import TypedDict

    from langgraph.graph import END, START, StateGraph
    from langgraph.types import Command

    class S(TypedDict):
        n: int

    def node(state: S) -> Command:
        return Command(update={"n": state["n"] + 1}, goto=END if state["n"] >= steps else "b")

    def other(state: S) -> Command:
        return Command(update={"n": state["n"] + 1}, goto=END if state["n"] >= steps else "a")

    graph = StateGraph(S)
    graph.add_node("a", node)
    graph.add_node("b", other)
    graph.add_edge(START, "a")
    app = graph.compile()
    samples = []
    for _ in range(5):
        t = time.perf_counter()
        app.invoke({"n": 0}, {"recursion_limit": steps + 10})
        samples.append((time.perf_counter() - t) / steps * 1000)
    return statistics.median(samples)


def _relay(agents: Sequence[Agent], store: TrajectoryStore, interval: int, tokens: int) -> Relay:
    return Relay(agents, FixedIntervalPolicy(agents=tuple(a.name for a in agents),
                                             interval=interval), store, max_tokens=tokens)


def _set_reuse(backends: Sequence[Any], on: bool, sizes: dict[int, int]) -> None:
    for b in backends:
        if hasattr(b, "cache_size"):
            sizes.setdefault(id(b), b.cache_size)
            b.cache_size = sizes[id(b)] if on else 0


def run_bench(small: Backend, large: Backend, store: TrajectoryStore, question: str = QUESTION,
              tokens: int = 256, interval: int = 8, concurrency: Sequence[int] = (1, 8, 32),
              throughput_tokens: int = 64, questions: Sequence[str] = (),
              progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Run every measurement once on ``small`` + ``large`` and return the results."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from relaygraph.observability import providers

    provider = TracerProvider()
    spans = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    out: dict[str, Any] = {"controller": small.model_id, "expert": large.model_id,
                           "tokens": tokens, "interval": interval, "goals": GOALS}
    sizes: dict[int, int] = {}
    with providers.using(provider):
        runs = {}
        for mode in ("reuse", "naive"):
            progress(f"relay with {'KV-cache reuse' if mode == 'reuse' else 'no cache reuse (naive)'}")
            _set_reuse((small, large), mode == "reuse", sizes)
            recs = {"controller": Recorder(small), "expert": Recorder(large)}
            relay = _relay([Agent(n, r) for n, r in recs.items()], store, interval, tokens)
            result = relay.run(question)
            runs[mode] = (result, recs)
        _set_reuse((small, large), True, sizes)

        result, recs = runs["reuse"]
        naive_result, naive_recs = runs["naive"]
        out["handoffs"] = result.handoffs
        out["same_tokens_naive_vs_reuse"] = (
            [s.text for s in result.segments] == [s.text for s in naive_result.segments])
        out["prefill_amplification"] = {
            name: {"reuse": amplification(recs[name].calls),
                   "naive": amplification(naive_recs[name].calls)}
            for name in recs}
        calls = sorted((c for r in recs.values() for c in r.calls), key=lambda c: c.start)
        gaps = [(b.start - a.end) * 1000 for a, b in zip(calls, calls[1:], strict=False)]
        bare = bare_langgraph_step_ms()
        overhead = statistics.median(gaps) if gaps else 0.0
        out["handoff_overhead_ms"] = {"median": overhead, "p90": _quantile(gaps, 0.9),
                                      "bare_langgraph_step_ms": bare,
                                      "ratio_to_bare_step": overhead / bare if bare else 0.0,
                                      "spans": len(spans.get_finished_spans())}
        progress("solo runs for the same numbers of tokens")
        solo = {}
        for name, backend in (("controller", small), ("expert", large)):
            n = result.tokens_by_agent.get(name, 0)
            solo[name] = _solo_seconds(backend, question, n) if n else 0.0
        out["relay_vs_solo"] = {"relay_s": result.seconds, "solo_s": solo,
                                "ratio": result.seconds / sum(solo.values()),
                                "naive_relay_s": naive_result.seconds,
                                "naive_ratio": naive_result.seconds / sum(solo.values())}
        out["throughput"] = []
        pool_questions = list(questions) or [question]
        for c in concurrency:
            progress(f"throughput: {c} concurrent trajectories x {throughput_tokens} tokens")
            out["throughput"].append(
                _throughput(small, large, store, interval, throughput_tokens,
                            [pool_questions[i % len(pool_questions)] for i in range(c)]))
    out["goals_met"] = {
        "prefill_amplification": all(v["reuse"]["ratio"] <= GOALS["prefill_amplification"]
                                     for v in out["prefill_amplification"].values()),
        "handoff_overhead_ms": overhead < GOALS["handoff_overhead_ms"],
        "relay_vs_solo": out["relay_vs_solo"]["ratio"] <= GOALS["relay_vs_solo"],
    }
    return out


def _solo_seconds(backend: Backend, question: str, n: int) -> float:
    """Seconds for ``backend`` alone to write ``n`` tokens of an answer to ``question``
    (scaled up if it ends sooner)."""
    gen = backend.generate(Prompt(question, Agent("solo", backend).system_prompt),
                           StopRule(max_tokens=n))
    return gen.seconds * n / max(1, len(gen.token_ids))


def _throughput(small: Backend, large: Backend, store: TrajectoryStore, interval: int,
                tokens: int, questions: Sequence[str]) -> dict[str, float | int]:
    relay = _relay([Agent("controller", small), Agent("expert", large)], store, interval, tokens)
    started = time.perf_counter()
    results = relay.run_many(questions, concurrency=len(questions))
    wall = time.perf_counter() - started
    generated = sum(sum(r.tokens_by_agent.values()) for r in results)
    return {"concurrency": len(questions), "tokens": generated, "seconds": wall,
            "tokens_per_s": generated / wall}


def _quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def table(res: dict[str, Any]) -> str:
    """The results as a readable Markdown table."""
    ok = {True: "met", False: "NOT met"}
    rows = ["| measure | value | goal |", "|---|---|---|"]
    for name, v in res["prefill_amplification"].items():
        rows.append(f"| prefill amplification, {name} | {v['reuse']['ratio']:.3f} with reuse "
                    f"({v['reuse']['processed']}/{v['reuse']['view']} tokens); "
                    f"{v['naive']['ratio']:.2f} naive | <= {GOALS['prefill_amplification']} |")
    h = res["handoff_overhead_ms"]
    rows.append(f"| handoff overhead (median, models excluded) | {h['median']:.2f} ms "
                f"(p90 {h['p90']:.2f}); {h['ratio_to_bare_step']:.1f}x a bare LangGraph step "
                f"({h['bare_langgraph_step_ms']:.3f} ms) | < {GOALS['handoff_overhead_ms']} ms |")
    r = res["relay_vs_solo"]
    rows.append(f"| relay / solo wall time | {r['ratio']:.2f} ({r['relay_s']:.1f} s vs "
                f"{sum(r['solo_s'].values()):.1f} s); naive relay {r['naive_ratio']:.2f} "
                f"| <= {GOALS['relay_vs_solo']} |")
    for t in res["throughput"]:
        rows.append(f"| throughput, {t['concurrency']} concurrent | {t['tokens_per_s']:.1f} tok/s "
                    f"({t['tokens']} tokens in {t['seconds']:.1f} s) | |")
    met = ", ".join(f"{k}: {ok[v]}" for k, v in res["goals_met"].items())
    return "\n".join(rows) + f"\n\n{res['handoffs']} handoffs; goals: {met}"
