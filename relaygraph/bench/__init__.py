"""``relaygraph bench``: what relaying costs on your own model pair, as ratios that hold on a
busy machine.

Every ratio is taken from interleaved rounds (relay, solo, then solo, relay, ...: ``repeat``
rounds), so both sides of a round meet the same minutes of the machine; each side reports
its min and median (wall time, with the process's CPU time and the load average beside it)
and the ratio is the median of the per-round ratios (the ratio of mins beside it). A ratio
whose rounds disagree by more than 10% comes with a warning.

- ``prefill_amplification`` per agent: tokens the model processed (prefilled + decoded) /
  tokens in its final view — with KV-cache reuse and without (naive: every turn re-reads
  the whole trajectory, as the research code does). Goal with reuse: <= 1.05.
- ``handoff_overhead_ms``: the time between one generation ending and the next starting
  (policy, store append, tracing, the graph step, building the next view — models
  excluded), median over the handoffs, with the CPU time of the same gaps (what is ours;
  the rest is waiting for the machine), the ratio to a bare LangGraph step, and
  ``relay_step_ms``: a LangGraph step doing only what a turn asks of LangGraph (the part
  of the overhead that is the framework's). Goal: < 0.5 ms.
- ``relay_vs_solo``: the relay's wall time / the sum of each model's solo time to write the
  same numbers of tokens. Goal: <= 1.1.
- ``relay_vs_floor``: the relay's wall time / what a relay cannot avoid: the same solo
  decoding plus each turn's catch-up prefill of what the other agents wrote, timed alone
  (a turn's first forward pass — its own last token and the others' — minus the one-token
  decode step that solo decoding runs in its place).
  What is above 1 is ours; what separates floor from solo is the catch-up itself (on a
  CPU a prefill of 8 tokens costs more than a decode step). Goal: <= 1.05. Both ratios at a
  stress handoff rate (``interval`` 8) and at a realistic one (64).
- ``throughput_vs_solo``: relay tokens/s with N concurrent trajectories / tokens/s of the
  same token mix written by N concurrent solo generations per model through the same
  batchers (each model in turn). Goal at 32: >= 0.9.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from relaygraph.agents.agent import Agent
from relaygraph.agents.backend import Backend, Generation, Prompt, Sampling, StopRule, TextCallback
from relaygraph.agents.wrapping import BackendWrapper
from relaygraph.bench.report import GOALS, goals_met, machine, table
from relaygraph.bench.rounds import (
    SPREAD_WARNING,
    Timing,
    compare,
    interleave,
    side,
    spread,
    summary,
    timed,
)
from relaygraph.policies import FixedIntervalPolicy
from relaygraph.relay import Relay
from relaygraph.trajectory.store import TrajectoryStore

QUESTION = ("A robe takes 2 bolts of blue fiber and half that much white fiber. A tailor makes "
            "7 robes, then buys fiber for 3 more robes at $12 per bolt. Explain each step in "
            "detail: how many bolts does the tailor use in all, and how much does the extra "
            "fiber cost?")


# --- recording and timing ----------------------------------------------------------------

@dataclass
class Call:
    """One generate() call as seen from outside the backend (wall and thread-CPU clocks)."""

    start: float
    end: float
    generation: Generation
    prompt: Prompt | None = None
    cpu_start: float = 0.0
    cpu_end: float = 0.0


class Recorder(BackendWrapper):
    """A backend wrapper that records every call (for the measurements; thread-safe)."""

    def __init__(self, backend: Backend) -> None:
        super().__init__(backend)
        self.calls: list[Call] = []
        self._lock = threading.Lock()

    def generate(self, prompt: Prompt, rule: StopRule, sampling: Sampling = Sampling(),
                 on_text: TextCallback | None = None, cache_key: str | None = None) -> Generation:
        cpu, start = time.thread_time(), time.perf_counter()
        gen = self.inner.generate(prompt, rule, sampling, on_text, cache_key)
        call = Call(start, time.perf_counter(), gen, prompt, cpu, time.thread_time())
        with self._lock:
            self.calls.append(call)
        return gen

    def take(self) -> list[Call]:
        """The calls recorded since the last take."""
        with self._lock:
            calls, self.calls = self.calls, []
        return calls


# --- what the measurements are made of ---------------------------------------------------

def amplification(calls: Sequence[Call]) -> dict[str, float | int]:
    """(prefilled + decoded) / tokens in the final view; a model's own decoded tokens count as
    processed input, so a perfect cache scores about 1 and the naive relay far above."""
    processed = sum(c.generation.prefilled_tokens + len(c.generation.token_ids) for c in calls)
    last = calls[-1].generation
    view = last.prompt_tokens + len(last.token_ids)
    return {"processed": processed, "view": view, "ratio": processed / view if view else 0.0}


def catch_ups(generations: Sequence[Generation], head: int) -> list[tuple[int, int]]:
    """Where one agent's turns had to read what others wrote: ``[start, end)`` token spans of
    its final view. A turn's catch-up is every token of its view after the end of the
    agent's previous turn (for its first turn: after the rendered task, ``head`` tokens).
    Views must only grow (a fixed-interval relay, as the bench runs)."""
    spans = []
    end = head
    for gen in generations:
        if gen.prompt_tokens > end:
            spans.append((end, gen.prompt_tokens))
        end = gen.prompt_tokens + gen.n_tokens
    return spans


def floor_seconds(solo_s: float, catch_up_s: Sequence[float]) -> float:
    """What a relay cannot avoid: solo decoding of the same tokens + what each catch-up
    adds to it."""
    return solo_s + sum(catch_up_s)


def gaps(calls: Sequence[Call]) -> tuple[list[float], list[float]]:
    """Milliseconds between one generation ending and the next starting: wall, and the CPU
    time of the thread that ran both (a relay run runs its steps in the caller's thread)."""
    ordered = sorted(calls, key=lambda c: c.start)
    pairs = list(zip(ordered, ordered[1:], strict=False))
    return ([(b.start - a.end) * 1000 for a, b in pairs],
            [(b.cpu_start - a.cpu_end) * 1000 for a, b in pairs])


def bare_langgraph_step_ms(steps: int = 2000, repeat: int = 5) -> float:
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
    return _per_step_ms(lambda: app.invoke({"n": 0}, {"recursion_limit": steps + 10}),
                        steps, repeat, time.perf_counter)


def _per_step_ms(run: Callable[[], Any], steps: int, repeat: int, clock: Callable[[], float]
                 ) -> float:
    """Median over ``repeat`` runs of ``run()`` (a graph of ``steps`` steps) of ms per step."""
    samples = []
    for _ in range(repeat):
        t = clock()
        run()
        samples.append((clock() - t) / steps * 1000)
    return statistics.median(samples)


def relay_step_ms(steps: int = 256, repeat: int = 5, clock: Callable[[], float] = time.perf_counter
                  ) -> float:
    """Median time of one LangGraph step that does what a relay turn asks of LangGraph and
    nothing else: the relay's state schema, two agent nodes handing off with ``Command``,
    each writing a turn's update (cursor, totals, a growing list of handoff records, an
    ``AIMessage``), streamed as ``values`` as :meth:`Relay.run` does. What a handoff costs
    above it is relaygraph's own (store, tracing, policy, nodes)."""
    from langchain_core.messages import AIMessage
    from langgraph.graph import START, StateGraph
    from langgraph.types import Command

    from relaygraph.graphs.state import RelayState

    def turn(name: str, other: str) -> Any:
        def node(state: RelayState) -> Command:
            n = state.get("cursor", 0) + 1
            records = [*(state.get("handoff_records") or []),
                       {"from": name, "to": other, "reason": "interval", "position": n}]
            return Command(goto=other if n < steps else "__end__", update={
                "cursor": n, "turn": other, "budget": 1, "generated": n, "handoffs": n,
                "tokens_by_agent": {name: n // 2, other: n // 2},
                "input_tokens_by_agent": {name: n, other: n}, "counters": {},
                "handoff_records": records,
                "messages": [AIMessage(content="x", name=name, id=f"t-{n}")]})
        return node

    graph = StateGraph(RelayState)
    graph.add_node("controller", turn("controller", "expert"), destinations=("expert", "__end__"))
    graph.add_node("expert", turn("expert", "controller"), destinations=("controller", "__end__"))
    graph.add_edge(START, "controller")
    app = graph.compile()

    def run() -> None:
        for _chunk in app.stream({"cursor": 0}, {"recursion_limit": steps + 10},
                                 stream_mode="values"):
            pass

    return _per_step_ms(run, steps, repeat, clock)


def _relay(agents: Sequence[Agent], store: TrajectoryStore, interval: int, tokens: int) -> Relay:
    return Relay(agents, FixedIntervalPolicy(agents=tuple(a.name for a in agents),
                                             interval=interval), store, max_tokens=tokens)


def _set_reuse(backends: Sequence[Any], on: bool, sizes: dict[int, int]) -> None:
    for b in backends:
        if hasattr(b, "cache_size"):
            sizes.setdefault(id(b), b.cache_size)
            b.cache_size = sizes[id(b)] if on else 0


def _solo(backend: Backend, question: str, system_prompt: str | None, n: int) -> float:
    """Seconds for ``backend`` alone to write ``n`` tokens of an answer to ``question``
    (scaled up if it ends sooner)."""
    if n <= 0:
        return 0.0
    start = time.perf_counter()
    gen = backend.generate(Prompt(question, system_prompt), StopRule(max_tokens=n))
    return (time.perf_counter() - start) * n / max(1, gen.n_tokens)


def _head(backend: Any, agent: Agent, question: str) -> int | None:
    """Tokens of the rendered task (system prompt and question) before any reasoning."""
    render = getattr(backend, "render", None)
    return len(render(agent.prompt(question, ()))) if render is not None else None


def first_steps(spans: Sequence[tuple[int, int]]) -> tuple[list[tuple[int, int]],
                                                        list[tuple[int, int]]]:
    """For each catch-up span: what the turn's first step feeds (the agent's own last
    sampled token + what the others wrote), and what solo decoding feeds at that point
    (the last token alone). Their difference is what the catch-up adds to solo decoding."""
    return [(s - 1, e) for s, e in spans], [(s - 1, s) for s, _ in spans]


def _catch_up_seconds(backend: Any, calls: Sequence[Call], head: int | None) -> float | None:
    """What the agent's catch-ups in the relay add to solo decoding, each step timed alone
    on its model: a turn's first forward (its last token + the others' tokens) minus the
    decode step it replaces (None when the backend cannot time prefills: a model server)."""
    time_prefills = getattr(backend, "prefill_seconds", None)
    render = getattr(backend, "render", None)
    if not calls or head is None or time_prefills is None or render is None:
        return None if calls else 0.0
    last = calls[-1]
    assert last.prompt is not None
    ids = [*render(last.prompt), *last.generation.token_ids]
    fed, decode = first_steps(catch_ups([c.generation for c in calls], head))
    seconds = time_prefills(ids, [*fed, *decode])
    return sum(seconds[:len(fed)]) - sum(seconds[len(fed):])


# --- the measurements --------------------------------------------------------------------

def run_bench(small: Backend, large: Backend, store: TrajectoryStore, question: str = QUESTION,
              tokens: int = 256, interval: int | Sequence[int] = (8, 64),
              concurrency: Sequence[int] = (1, 8, 32), throughput_tokens: int = 64,
              questions: Sequence[str] = (), repeat: int = 3,
              progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Measure ``small`` + ``large`` (see the module's docstring) and return the results.
    ``interval``: tokens per turn; the first is the stress rate (amplification, handoff
    overhead and throughput are measured there), each one gets relay vs solo and floor."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from relaygraph.observability import providers

    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    intervals = [interval] if isinstance(interval, int) else list(interval)
    provider = TracerProvider()
    spans = InMemorySpanExporter()
    provider.add_span_processor(BatchSpanProcessor(spans))  # as configure() records them
    warnings: list[str] = []
    out: dict[str, Any] = {"controller": small.model_id, "expert": large.model_id,
                           "tokens": tokens, "interval": intervals[0], "intervals": intervals,
                           "repeat": repeat, "goals": GOALS, "machine": machine()}
    sizes: dict[int, int] = {}
    recs = {"controller": Recorder(small), "expert": Recorder(large)}
    agents = [Agent(n, r) for n, r in recs.items()]
    with providers.using(provider):
        progress("relay without cache reuse (naive), for the amplification")
        _set_reuse((small, large), False, sizes)
        try:
            naive_result, naive_time = timed(
                lambda: _relay(agents, store, intervals[0], tokens).run(question))
            naive_calls = {name: r.take() for name, r in recs.items()}
        finally:
            _set_reuse((small, large), True, sizes)

        by_interval: dict[int, dict[str, Any]] = {}
        overhead: dict[str, list[float]] = {"wall": [], "cpu": [], "bare": []}
        first: dict[str, Any] = {}
        for every in intervals:
            relay = _relay(agents, store, every, tokens)
            runs: list[Any] = []

            def relay_round(r: int, relay: Relay = relay, every: int = every,
                            runs: list[Any] = runs) -> Timing:
                progress(f"interval {every}, round {r + 1}/{repeat}: relay")
                result, timing = timed(lambda: relay.run(question))
                calls = {name: rec.take() for name, rec in recs.items()}
                runs.append((result, calls))
                if every == intervals[0]:
                    wall, cpu = gaps([c for cs in calls.values() for c in cs])
                    overhead["wall"] += wall
                    overhead["cpu"] += cpu
                    overhead["bare"].append(bare_langgraph_step_ms(steps=500, repeat=3))
                return timing

            def solo_round(r: int, every: int = every, runs: list[Any] = runs) -> Timing:
                progress(f"interval {every}, round {r + 1}/{repeat}: solo")
                result, _ = runs[-1]
                return timed(lambda: sum(
                    _solo(b, question, a.system_prompt, result.tokens_by_agent.get(a.name, 0))
                    for a, b in zip(agents, (small, large), strict=True)))[1]

            def floor_round(r: int, every: int = every, runs: list[Any] = runs
                            ) -> float | None:
                progress(f"interval {every}, round {r + 1}/{repeat}: catch-up prefills alone")
                _, calls = runs[-1]
                parts = [_catch_up_seconds(b, calls[a.name], _head(b, a, question))
                         for a, b in zip(agents, (small, large), strict=True)]
                return None if any(p is None for p in parts) else sum(p or 0.0 for p in parts)

            rounds = interleave([("relay", relay_round), ("solo", solo_round),
                                 ("catch_up", floor_round)], repeat)
            relay_t, solo_t = rounds["relay"], rounds["solo"]
            result, calls = runs[0]
            entry: dict[str, Any] = {
                "handoffs": result.handoffs, "tokens_by_agent": result.tokens_by_agent,
                "relay_s": side(relay_t), "solo_s": side(solo_t),
                "relay_vs_solo": compare(f"relay_vs_solo (interval {every})", relay_t, solo_t,
                                         warnings)}
            if all(c is not None for c in rounds["catch_up"]):
                floor_t = [Timing(floor_seconds(s.wall_s, [c]), s.cpu_s, s.load)
                           for s, c in zip(solo_t, rounds["catch_up"], strict=True)]
                entry["catch_up_s"] = summary(rounds["catch_up"])
                entry["floor_s"] = side(floor_t)
                entry["relay_vs_floor"] = compare(f"relay_vs_floor (interval {every})",
                                                  relay_t, floor_t, warnings)
            by_interval[every] = entry
            if not first:
                first = {"result": result, "calls": calls, "solo_min": min(t.wall_s for t in solo_t)}

        progress("bare LangGraph steps")
        result, calls = first["result"], first["calls"]
        out["handoffs"] = result.handoffs
        out["same_tokens_naive_vs_reuse"] = (
            [s.text for s in result.segments] == [s.text for s in naive_result.segments])
        out["prefill_amplification"] = {
            name: {"reuse": amplification(calls[name]), "naive": amplification(naive_calls[name])}
            for name in recs}
        wall, cpu, bare = overhead["wall"], overhead["cpu"], overhead["bare"]
        median = statistics.median(wall) if wall else 0.0
        bare_ms = statistics.median(bare) if bare else bare_langgraph_step_ms()
        provider.force_flush()
        out["handoff_overhead_ms"] = {
            "median": median, "p90": _quantile(wall, 0.9),
            "cpu_median": statistics.median(cpu) if cpu else 0.0,
            "handoffs_measured": len(wall), "bare_langgraph_step_ms": bare_ms,
            "relay_step_ms": relay_step_ms(),
            "ratio_to_bare_step": median / bare_ms if bare_ms else 0.0,
            "spans": len(spans.get_finished_spans())}
        stress = by_interval[intervals[0]]
        out["relay_vs_solo"] = {
            **stress["relay_vs_solo"], "interval": intervals[0],
            "relay_s": stress["relay_s"]["min"], "solo_s": stress["solo_s"]["min"],
            "naive_relay_s": naive_time.wall_s,
            "naive_ratio": naive_time.wall_s / first["solo_min"] if first["solo_min"] else 0.0,
            "by_interval": {str(k): v for k, v in by_interval.items()}}
        floors = {k: v["relay_vs_floor"] for k, v in by_interval.items() if "relay_vs_floor" in v}
        if floors:
            out["relay_vs_floor"] = {"ratio": max(f["ratio"] for f in floors.values()),
                                     "by_interval": {str(k): v for k, v in floors.items()}}

        out["throughput"] = []
        pool_questions = list(questions) or [question]
        for c in concurrency:
            batch = [pool_questions[i % len(pool_questions)] for i in range(c)]
            out["throughput"].append(_throughput(
                agents, (small, large), store, intervals[0], throughput_tokens, batch, repeat,
                warnings, progress))
        if out["throughput"]:
            top = max(out["throughput"], key=lambda t: t["concurrency"])
            out["throughput_vs_solo"] = {
                "ratio": top["vs_solo"]["ratio"], "concurrency": top["concurrency"],
                "by_concurrency": {str(t["concurrency"]): t["vs_solo"]["ratio"]
                                   for t in out["throughput"]}}
    out["machine"]["load_end"] = os.getloadavg()[0]
    out["warnings"] = warnings
    out["goals_met"] = goals_met(out)
    return out


def solo_mix(results: Sequence[Any], names: Sequence[str]) -> dict[str, list[int]]:
    """The token mix of concurrent relays: per agent, what each trajectory had it write."""
    return {name: [r.tokens_by_agent.get(name, 0) for r in results] for name in names}


def _throughput(agents: Sequence[Agent], backends: Sequence[Backend], store: TrajectoryStore,
                interval: int, tokens: int, questions: Sequence[str], repeat: int,
                warnings: list[str], progress: Callable[[str], None]) -> dict[str, Any]:
    """Relay tokens/s with ``len(questions)`` concurrent trajectories vs the same token mix
    written by as many concurrent solo generations per model (each model in turn, through
    its batcher), in interleaved rounds."""
    c = len(questions)
    relay = _relay(agents, store, interval, tokens)
    mixes: list[dict[str, list[int]]] = []

    def relay_round(r: int) -> Timing:
        progress(f"throughput, {c} concurrent, round {r + 1}/{repeat}: relay")
        results, timing = timed(lambda: relay.run_many(questions, concurrency=c))
        for agent in agents:
            if isinstance(agent.backend, Recorder):
                agent.backend.take()  # not measured here: keep the record small
        mixes.append(solo_mix(results, [a.name for a in agents]))
        return timing

    def solo_round(r: int) -> Timing:
        progress(f"throughput, {c} concurrent, round {r + 1}/{repeat}: solo")
        mix = mixes[-1]

        def work() -> None:
            for agent, backend in zip(agents, backends, strict=True):
                with ThreadPoolExecutor(c, thread_name_prefix="relaygraph-solo") as pool:
                    list(pool.map(lambda q, n, b=backend, a=agent: _solo(b, q, a.system_prompt, n),
                                  questions, mix[agent.name]))

        return timed(work)[1]

    rounds = interleave([("relay", relay_round), ("solo", solo_round)], repeat)
    generated = sum(sum(v) for v in mixes[0].values())
    relay_t, solo_t = rounds["relay"], rounds["solo"]
    # tokens/s ratio = solo time / relay time for the same tokens: the inverse of compare()
    versus = compare(f"throughput_vs_solo ({c} concurrent)", solo_t, relay_t, warnings)
    return {"concurrency": c, "tokens": generated, "seconds": min(t.wall_s for t in relay_t),
            "tokens_per_s": generated / min(t.wall_s for t in relay_t),
            "solo_tokens_per_s": generated / min(t.wall_s for t in solo_t),
            "relay_s": side(relay_t), "solo_s": side(solo_t), "vs_solo": versus,
            "mix": {k: sum(v) for k, v in mixes[0].items()}}


def _quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


__all__ = ["GOALS", "QUESTION", "SPREAD_WARNING", "Call", "Recorder", "Timing", "amplification",
           "catch_ups", "compare", "first_steps", "floor_seconds", "gaps", "goals_met",
           "interleave", "machine", "run_bench", "side", "solo_mix", "spread", "summary",
           "table", "timed"]
