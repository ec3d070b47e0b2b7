"""What tracing costs: per span, per relay turn, and (optionally) per tiny relay run.

    python benchmarks/tracing_overhead.py                # spans and turns, ~10 s
    python benchmarks/tracing_overhead.py --relay 20     # + end-to-end tiny relay runs

Per span: one span with 6 attributes, started and ended on the caller's thread, through
- the OpenTelemetry API with no SDK (what relaygraph does when tracing is off),
- the SDK with a simple processor and the in-memory exporter,
- the SDK with the batch processor and the OTLP/HTTP (and gRPC) exporter, sending to a
  real receiver on loopback (``relaygraph.testing.otlp_receiver``); the caller's cost is
  timed, then the flush.

Per turn: relaygraph's own instrumentation of one agent turn (``agent_turn`` +
``wrap_stream`` + ``record_turn``: the ``invoke_agent`` and ``chat`` spans with ~45
attributes, the handoff event, 6 metric records), with tracing off, with the SDK in memory, and
with OTLP batch export. The model is left out (a backend object with only ``model_id``)
so the numbers are tracing alone. ``--relay N`` adds whole tiny-model relay runs (two
handoffs, three turns each) with tracing off and on (OTLP/HTTP), median of N.

Numbers are the median and the minimum over ``--rounds`` rounds (runs), in microseconds
per span / turn / run; on a busy machine the minimum is the better estimate.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opentelemetry import trace

from relaygraph.agents.agent import Agent
from relaygraph.agents.backend import Generation
from relaygraph.observability import configure, providers, tracing
from relaygraph.testing.otlp_receiver import GrpcOtlpReceiver, OtlpReceiver

ATTRS = {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "controller",
         "gen_ai.request.model": "qwen2.5-coder-0.5b", "relaygraph.segment.seq": 12,
         "relaygraph.handoff.reason": "call", "relaygraph.handoff.requested_tokens": 32}


def per_op_us(fn: Any, n: int, rounds: int, between: Any = None) -> tuple[float, float]:
    """(median, min) over rounds of the time per operation; ``between`` runs untimed after
    each round. The min is the better estimate on a busy machine."""
    samples = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        fn(n)
        samples.append((time.perf_counter_ns() - start) / n / 1000)
        if between is not None:
            between()
    return statistics.median(samples), min(samples)


def spans(tracer: Any) -> Any:
    def run(n: int) -> None:
        for _ in range(n):
            span = tracer.start_span("invoke_agent controller")
            span.set_attributes(ATTRS)
            span.end()

    return run


def bench_spans(n: int, rounds: int) -> list[tuple[str, float, str]]:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
        OTLPSpanExporter as GrpcExporter,
    )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    rows = [("no SDK (API no-op)", per_op_us(spans(trace.get_tracer("bench")), n, rounds), "")]
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    rows.append(("SDK, simple + in-memory", per_op_us(spans(provider.get_tracer("b")), n, rounds), ""))
    provider.shutdown()
    for label, receiver, exporter in (
        ("SDK, batch + OTLP/HTTP", OtlpReceiver(), lambda url: OTLPSpanExporter(endpoint=url + "/v1/traces")),
        ("SDK, batch + OTLP/gRPC", GrpcOtlpReceiver(), lambda url: GrpcExporter(endpoint=url, insecure=True)),
    ):
        with receiver as rx:
            provider = TracerProvider()
            provider.add_span_processor(BatchSpanProcessor(exporter(rx.url)))
            flushes: list[float] = []

            def flush(provider: Any = provider, flushes: list[float] = flushes) -> None:
                start = time.perf_counter()
                provider.force_flush()
                flushes.append(time.perf_counter() - start)

            cost = per_op_us(spans(provider.get_tracer("b")), n, rounds, between=flush)
            provider.shutdown()
            got = len(rx.wait_for_spans(n * rounds, timeout=10))
        rows.append((label, cost, f"then flushing {n}: {1000 * statistics.median(flushes):.0f} ms "
                                  f"(background thread); receiver got {got}/{n * rounds}"))
    return rows


@dataclass
class FixedBackend:
    """Only what the instrumentation reads from a backend."""

    model_id: str
    provider_name: str = "transformers"


@dataclass
class FakePolicy:
    name: str = "call-token"
    primary: str = "controller"


def turns(agents: list[Agent]) -> Any:
    policy = FakePolicy()
    generation = Generation(text="two plus five", token_ids=[1, 2, 3], logprobs=[-0.1] * 3,
                            finish_reason="budget", prompt_tokens=60, prefilled_tokens=4,
                            seconds=0.05)

    def run(n: int) -> None:
        with tracing.run_span(policy.name, 14, trajectory_id="bench"):
            for i in range(n):
                agent = agents[i % 2]
                with tracing.agent_turn(agent, policy, "bench", i) as span:  # type: ignore[arg-type]
                    span.wrap_stream(lambda text: None)("x")
                    handoff = {"from": agent.name, "to": agents[(i + 1) % 2].name,
                               "reason": "call", "position": i + 1, "requested_tokens": 3,
                               "confidence": None, "policy": policy.name}
                    tracing.record_turn(span, generation, handoff)

    return run


def bench_turns(n: int, rounds: int) -> list[tuple[str, float, str]]:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    agents = [Agent("controller", FixedBackend("qwen2.5-coder-0.5b")),  # type: ignore[arg-type]
              Agent("expert", FixedBackend("qwen2.5-coder-1.5b"))]  # type: ignore[arg-type]
    run = turns(agents)
    rows = [("tracing off (default)", per_op_us(run, n, rounds), "")]
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    with providers.using(provider, MeterProvider(metric_readers=[InMemoryMetricReader()])):
        rows.append(("SDK in memory (spans + metrics)", per_op_us(run, n, rounds), ""))
    with OtlpReceiver() as rx:
        telemetry = configure("otlp", endpoint=rx.url, quiet=True)
        cost = per_op_us(run, n, rounds)
        start = time.perf_counter()
        telemetry.shutdown(timeout=30)
        rows.append(("OTLP/HTTP batch (spans + metrics)", cost,
                     f"shutdown {1000 * (time.perf_counter() - start):.0f} ms"))
    return rows


def bench_relay(runs: int, tiny_root: str | None) -> list[tuple[str, float, str]]:
    import tempfile

    import torch

    from relaygraph import CallTokenPolicy, Relay
    from relaygraph.agents.transformers_backend import TransformersBackend
    from relaygraph.trajectory import RedisStore
    from tests import tiny_models as tiny
    from tests.servers import RedisServer

    root = Path(tempfile.mkdtemp(prefix="rg-bench-"))
    controller, expert = tiny.build_relay_pair(Path(tiny_root) if tiny_root else root / "tiny")
    server = RedisServer(root).start()
    store = RedisStore.from_url(server.url)
    relay = Relay([Agent("controller", TransformersBackend(str(controller), dtype="float32"),
                         tiny.SYSTEM_PROMPT),
                   Agent("expert", TransformersBackend(str(expert), dtype="float32"),
                         tiny.SYSTEM_PROMPT)], CallTokenPolicy(), store, max_tokens=64)
    torch.set_num_threads(1)  # steadier on a shared machine; the model is tiny anyway
    relay.run(tiny.QUESTION)

    def timed() -> float:
        start = time.perf_counter()
        relay.run(tiny.QUESTION)
        return (time.perf_counter() - start) * 1e6

    rows = []
    try:
        off, on = [], []
        with OtlpReceiver() as rx:
            telemetry = configure("otlp", "otlp", endpoint=rx.url, quiet=True, install=False)
            for _ in range(runs):  # interleaved, so drifting machine load hits both alike
                off.append(timed())
                restore = providers.use(telemetry.tracer_provider, telemetry.meter_provider)
                on.append(timed())
                restore()
            telemetry.shutdown()
        rows.append(("tiny relay run, tracing off", (statistics.median(off), min(off)), ""))
        rows.append(("tiny relay run, OTLP/HTTP (spans+metrics)",
                     (statistics.median(on), min(on)), f"{len(rx.spans)} spans received"))
    finally:
        server.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=int, default=2000, help="spans per round")
    parser.add_argument("--turns", type=int, default=1000, help="turns per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--relay", type=int, default=0, help="tiny relay runs (0: skip)")
    parser.add_argument("--tiny-root", help="where the tiny model pair is (built and cached there)")
    args = parser.parse_args()
    sections = [("per span", bench_spans(args.spans, args.rounds)),
                ("per turn (2 spans, 1 event, 6 metric records)", bench_turns(args.turns, args.rounds))]
    if args.relay:
        sections.append(("per run (3 turns, 2 handoffs)", bench_relay(args.relay, args.tiny_root)))
    print(f"python {sys.version.split()[0]}, {args.rounds} rounds, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    for title, rows in sections:
        print(f"\n{title:44} {'median us':>11} {'min us':>10}")
        for label, (median, best), note in rows:
            print(f"  {label:42} {median:11.1f} {best:10.1f}   {note}")


if __name__ == "__main__":
    main()
