"""OpenTelemetry traces and metrics of real relays, received by real OTLP receivers.

The tiny overfit pair (tests/tiny_models.py) makes two handoffs on ``tiny.QUESTION``:
controller -> expert (``<call>3</call>``), expert -> controller after 3 tokens, then the
controller ends the answer. Spans travel through the real SDK and OTLP exporters to a
receiver on loopback that decodes ``ExportTraceServiceRequest`` protobufs (HTTP) or serves
the OTLP gRPC services.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from relaygraph import Agent, CallTokenPolicy, Relay
from relaygraph.observability import configure, providers
from relaygraph.trajectory import RedisStore
from tests import tiny_models as tiny
from tests.servers import free_port


def require(module: str) -> None:
    try:
        __import__(module)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is not installed; CI must install the OTLP exporter")
        pytest.skip(f"{module} is not installed (pip install 'relaygraph[otlp]')")


def make_relay(backends, store: RedisStore) -> Relay:
    c, e = backends
    return Relay([Agent("controller", c, tiny.SYSTEM_PROMPT), Agent("expert", e, tiny.SYSTEM_PROMPT)],
                 CallTokenPolicy(), store, max_tokens=64)


@pytest.fixture
def receiver():
    require("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    from relaygraph.testing.otlp_receiver import OtlpReceiver

    with OtlpReceiver() as rx:
        yield rx


def tree(spans) -> tuple:
    """(root, turns in order, {turn span id: its chat spans})."""
    roots = [s for s in spans if not s.parent_span_id]
    assert len(roots) == 1, [s.name for s in roots]
    root = roots[0]
    turns = sorted((s for s in spans if s.parent_span_id == root.span_id), key=lambda s: s.start_ns)
    chats = {t.span_id: [s for s in spans if s.parent_span_id == t.span_id] for t in turns}
    assert len(spans) == 1 + len(turns) + sum(len(c) for c in chats.values())
    return root, turns, chats


HANDOFF = ("from", "to", "policy", "reason", "position", "requested_tokens")


def test_otlp_http_receives_span_tree_handoffs_and_metrics(backends, redis_store, receiver) -> None:
    telemetry = configure("otlp", "otlp", endpoint=receiver.url, service_name="relay-under-test",
                          quiet=True)
    try:
        result = make_relay(backends, redis_store).run(tiny.QUESTION)
    finally:
        assert telemetry.shutdown(), telemetry.problems
    assert result.handoffs == 2
    spans = receiver.spans
    root, turns, chats = tree(spans)
    tid = result.trajectory_id

    assert {s.trace_id for s in spans} == {root.trace_id}  # one trace per run
    assert root.name == "invoke_workflow relaygraph"
    assert root.resource["service.name"] == "relay-under-test"
    assert root.attributes["gen_ai.operation.name"] == "invoke_workflow"
    assert root.attributes["relaygraph.trajectory.id"] == tid
    assert root.attributes["relaygraph.handoffs"] == 2
    assert root.attributes["relaygraph.call_ratio"] == pytest.approx(result.call_ratio)
    assert root.attributes["gen_ai.usage.output_tokens"] == sum(result.tokens_by_agent.values())

    assert [t.name for t in turns] == ["invoke_agent controller", "invoke_agent expert",
                                       "invoke_agent controller"]
    c_model, e_model = (b.model_id for b in backends)
    for turn, model in zip(turns, (c_model, e_model, c_model), strict=True):
        a = turn.attributes
        assert a["gen_ai.operation.name"] == "invoke_agent"
        assert a["gen_ai.agent.name"] == turn.name.split()[1]
        assert a["gen_ai.request.model"] == model and a["gen_ai.provider.name"] == "transformers"
        assert a["relaygraph.trajectory.id"] == a["gen_ai.conversation.id"] == tid
        (chat,) = chats[turn.span_id]
        assert chat.name == f"chat {model}"
        assert root.start_ns <= turn.start_ns <= chat.start_ns <= chat.end_ns <= turn.end_ns <= root.end_ns
        for key in ("gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens",
                    "gen_ai.usage.cache_read.input_tokens", "gen_ai.response.finish_reasons"):
            assert chat.attributes[key] == a[key]
        assert chat.attributes["gen_ai.response.time_to_first_chunk"] > 0

    got = [tuple(t.attributes.get(f"relaygraph.handoff.{k}") for k in HANDOFF) for t in turns]
    first, second = result.handoff_records
    assert got[0] == ("controller", "expert", "call-token", "call", first.position, 3)
    assert got[1][:5] == ("expert", "controller", "call-token", "call_done", second.position)
    assert got[2][:4] == ("controller", "finish", "call-token", "eos")
    assert [t.attributes["relaygraph.segment.seq"] for t in turns] == [0, first.position,
                                                                       second.position]
    assert [t.attributes["relaygraph.segment.count"] for t in turns] == [2, 1, 1]
    # the same handoff as a span event, with the trajectory id
    name, event = turns[0].events[0]
    assert name == "relaygraph.handoff" and event["relaygraph.handoff.to"] == "expert"
    assert event["relaygraph.trajectory.id"] == tid
    # usage: the expert wrote its 3 granted tokens; the controller's 2nd turn reused its cache
    assert turns[1].attributes["gen_ai.usage.output_tokens"] == 3
    assert turns[2].attributes["gen_ai.usage.cache_read.input_tokens"] > 0
    assert turns[1].attributes["relaygraph.handoff.overhead_s"] > 0

    # content is opt-in: neither the question nor any generated text is in the spans
    dumped = json.dumps([s.attributes for s in spans])
    assert "gen_ai.output.messages" not in dumped and "input.value" not in dumped
    assert tiny.QUESTION not in dumped and "boxed" not in dumped and "redis://" not in dumped

    # metrics: exported at shutdown through /v1/metrics
    def points(name):
        return [p for p in receiver.points if p.metric == name]

    handoffs = {(p.attributes["relaygraph.handoff.from"], p.attributes["relaygraph.handoff.to"],
                 p.attributes["relaygraph.handoff.reason"]): p.value for p in points("relaygraph.handoffs")}
    assert handoffs == {("controller", "expert", "call"): 1, ("expert", "controller", "call_done"): 1}
    out_tokens = {p.attributes["gen_ai.agent.name"]: p.sum for p in points("gen_ai.client.token.usage")
                  if p.attributes["gen_ai.token.type"] == "output"}
    assert out_tokens == result.tokens_by_agent
    (ratio,) = points("relaygraph.run.call_ratio")
    assert ratio.count == 1 and ratio.sum == pytest.approx(result.call_ratio)
    assert sum(p.count for p in points("relaygraph.handoff.overhead")) == 2
    assert sum(p.count for p in points("gen_ai.server.time_to_first_token")) == 3
    assert all(p.sum > 0 for p in points("gen_ai.server.time_to_first_token"))


def test_grpc_from_environment_with_content_capture(backends, redis_store, monkeypatch) -> None:
    require("opentelemetry.exporter.otlp.proto.grpc.trace_exporter")
    from relaygraph.testing.otlp_receiver import GrpcOtlpReceiver

    with GrpcOtlpReceiver() as rx:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", rx.url)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "relay-grpc")
        monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "true")
        telemetry = configure(quiet=True)
        assert (telemetry.traces, telemetry.metrics, telemetry.protocol) == ("otlp", "none", "grpc")
        try:
            result = make_relay(backends, redis_store).run(tiny.QUESTION)
        finally:
            assert telemetry.shutdown(), telemetry.problems
        spans = rx.wait_for_spans(7, timeout=5)
    root, turns, chats = tree(spans)
    assert root.resource["service.name"] == "relay-grpc" and len(turns) == 3
    assert [t.attributes["relaygraph.handoff.reason"] for t in turns] == ["call", "call_done", "eos"]
    question = json.loads(root.attributes["gen_ai.input.messages"])
    assert question == [{"role": "user", "parts": [{"type": "text", "content": tiny.QUESTION}]}]
    texts = []
    for turn in turns:
        (chat,) = chats[turn.span_id]
        (message,) = json.loads(chat.attributes["gen_ai.output.messages"])
        assert message["role"] == "assistant"
        texts.append(message["parts"][0]["content"])
        system = json.loads(chat.attributes["gen_ai.system_instructions"])
        assert system == [{"type": "text", "content": tiny.SYSTEM_PROMPT}]
    segments = redis_store.read(result.trajectory_id)
    assert "".join(texts) == "".join(s.text for s in segments)
    assert root.attributes["output.value"] == "".join(texts)


def test_your_own_providers_and_a_broken_processor_never_fail_a_run(backends, redis_store) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    class Broken(SimpleSpanProcessor):
        def on_start(self, span, parent_context=None):
            raise RuntimeError("processor bug")

    exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
    good = TracerProvider()
    good.add_span_processor(SimpleSpanProcessor(exporter))
    with providers.using(good, MeterProvider(metric_readers=[reader])):
        result = make_relay(backends, redis_store).run(tiny.QUESTION)
    names = [s.name for s in exporter.get_finished_spans()]
    assert names.count("invoke_workflow relaygraph") == 1 and len(names) == 7
    data = reader.get_metrics_data()
    metric_names = {m.name for rm in data.resource_metrics for sm in rm.scope_metrics
                    for m in sm.metrics}
    assert {"relaygraph.handoffs", "gen_ai.client.token.usage", "relaygraph.run.call_ratio",
            "relaygraph.handoff.overhead", "gen_ai.server.time_to_first_token"} <= metric_names

    broken = TracerProvider()
    broken.add_span_processor(Broken(InMemorySpanExporter()))
    with providers.using(broken):
        again = make_relay(backends, redis_store).run(tiny.QUESTION)
    assert (again.answer, again.handoffs, again.tokens_by_agent) == (
        result.answer, result.handoffs, result.tokens_by_agent)
    assert redis_store.load(again.trajectory_id).status == "finished"


def test_dead_collector_neither_slows_the_run_nor_loses_the_trajectory(backends, redis_store) -> None:
    require("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    relay = make_relay(backends, redis_store)
    relay.run(tiny.QUESTION)  # warm
    started = time.perf_counter()
    relay.run(tiny.QUESTION)
    plain = time.perf_counter() - started

    telemetry = configure("otlp", endpoint=f"http://127.0.0.1:{free_port()}", quiet=True)
    started = time.perf_counter()
    result = relay.run(tiny.QUESTION)
    traced = time.perf_counter() - started
    started = time.perf_counter()
    assert telemetry.shutdown() is False
    shutdown = time.perf_counter() - started

    assert traced < plain + 0.5
    assert shutdown < 0.5  # the SDK alone retries with back-off for up to its 10 s timeout
    assert "nothing listens" in telemetry.problems[0]
    assert redis_store.load(result.trajectory_id).status == "finished"
    assert len(redis_store.read(result.trajectory_id)) == 4


def test_hung_collector_shutdown_is_bounded(backends, redis_store) -> None:
    """A collector that accepts connections and never answers costs at most the bound."""
    require("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        telemetry = configure("otlp", "none", endpoint=f"http://127.0.0.1:{server.getsockname()[1]}",
                              shutdown_timeout=0.6, quiet=True)
        result = make_relay(backends, redis_store).run(tiny.QUESTION)
        started = time.perf_counter()
        assert telemetry.shutdown() is False
        elapsed = time.perf_counter() - started
        assert 0.5 < elapsed < 1.3
        assert "did not answer within 0.6 s" in telemetry.problems[0]
        assert accepted  # the exporter did reach the (silent) collector
        assert redis_store.load(result.trajectory_id).status == "finished"
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        server.close()


def test_cli_dead_collector_warns_in_one_line(backends, redis_server) -> None:
    require("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    from typer.testing import CliRunner

    from relaygraph.cli import app

    dead = f"http://127.0.0.1:{free_port()}"
    c, e = (b.model_id for b in backends)
    started = time.perf_counter()
    res = CliRunner().invoke(app, ["run", tiny.QUESTION, "--controller", c, "--expert", e,
                                   "--dtype", "float32", "--redis", redis_server.url, "--json",
                                   "--trace", dead])
    elapsed = time.perf_counter() - started
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["answer"] == "7"
    warnings = [ln for ln in res.stderr.splitlines() if "warning" in ln]
    assert len(warnings) == 1 and "traces not exported: nothing listens" in warnings[0]
    assert "Traceback" not in res.stderr
    assert elapsed < 5  # loading + run + a bounded shutdown (no exporter retries)
    assert providers._installed is providers.GLOBAL  # the CLI put the providers back


def test_cli_run_exports_to_the_endpoint_from_the_environment(backends, redis_server,
                                                              receiver) -> None:
    """The real process, configured only by OTEL_* variables, as a user would run it."""
    c, e = (b.model_id for b in backends)
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
           "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_SERVICE_NAME": "relay-cli",
           "OTEL_METRICS_EXPORTER": "otlp"}
    proc = subprocess.run([sys.executable, "-m", "relaygraph.cli", "run", tiny.QUESTION,
                           "--controller", c, "--expert", e, "--dtype", "float32",
                           "--redis", redis_server.url, "--json"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    root, turns, _ = tree(receiver.spans)
    assert root.resource["service.name"] == "relay-cli"
    assert root.attributes["relaygraph.trajectory.id"] == out["trajectory_id"]
    assert [t.attributes["relaygraph.handoff.to"] for t in turns] == ["expert", "controller", "finish"]
    assert f"trace {root.trace_id} sent to {receiver.url}/v1/traces" in proc.stderr
    assert any(p.metric == "relaygraph.handoffs" for p in receiver.points)


def test_trace_only_viewer_gets_traces_and_a_metrics_refusal_is_reported_apart(
        backends, redis_store) -> None:
    """Phoenix and Jaeger answer 404 to /v1/metrics: metrics are off unless asked for, and
    when asked for, their refusal does not read as lost traces."""
    require("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    from relaygraph.testing.otlp_receiver import OtlpReceiver

    relay = make_relay(backends, redis_store)
    with OtlpReceiver(signals=("traces",)) as rx:
        telemetry = configure("otlp", endpoint=rx.url, quiet=True)
        assert telemetry.metrics == "none"
        relay.run(tiny.QUESTION)
        assert telemetry.shutdown(), telemetry.problems
        assert len(rx.spans) == 7
        rx.clear()
        telemetry = configure("otlp", "otlp", endpoint=rx.url, quiet=True)
        relay.run(tiny.QUESTION)
        assert telemetry.shutdown() is False
        assert len(rx.spans) == 7
    assert telemetry.problems == [f"metrics not exported: 1 export(s) to {rx.url}/v1/metrics failed"]
    assert any("404" in d for d in telemetry.details), telemetry.details


def test_a_forgotten_shutdown_still_flushes_at_exit(receiver) -> None:
    code = ("from relaygraph.observability import configure, tracing\n"
            f"configure('otlp', endpoint={receiver.url!r})\n"
            "with tracing.run_span('call-token', 14, trajectory_id='t-exit'):\n    pass\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    (span,) = receiver.wait_for_spans(1, timeout=5)
    assert span.attributes["relaygraph.trajectory.id"] == "t-exit"


def test_configure_rejects_bad_settings_and_defaults_to_off() -> None:
    from relaygraph.errors import ConfigError
    from relaygraph.observability.telemetry import redact_endpoint, tracing_requested

    with pytest.raises(ConfigError, match="unknown traces exporter 'zipkin'"):
        configure("zipkin")
    with pytest.raises(ConfigError, match="unknown OTLP protocol"):
        configure("otlp", protocol="http/json")
    with pytest.raises(ConfigError, match="http:// or https://"):
        configure("otlp", endpoint="localhost:4318")
    disabled = configure("none", "none")
    assert not disabled.enabled and disabled.shutdown()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    assert not _with_env(env, tracing_requested)
    assert _with_env({**env, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"}, tracing_requested)
    assert not _with_env({**env, "OTEL_TRACES_EXPORTER": "none",
                          "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"}, tracing_requested)
    assert redact_endpoint("https://user:s3cret@phoenix.example:6006/v1/traces?api_key=k") == \
        "https://phoenix.example:6006/v1/traces"


def _with_env(env: dict[str, str], func):
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        return func()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_receiver_decodes_what_the_sdk_sends(receiver) -> None:
    """The receiver itself, against the SDK's exporter (gzip, arrays, events, status)."""
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.trace import Status, StatusCode

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(
        endpoint=f"{receiver.url}/v1/traces", compression=Compression.Gzip)))
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("outer") as outer:
        outer.set_attributes({"s": "x", "i": 3, "f": 0.5, "b": True, "l": ["a", "b"]})
        with tracer.start_as_current_span("inner") as inner:
            inner.add_event("e", {"k": 1})
            inner.set_status(Status(StatusCode.ERROR))
    provider.shutdown()
    inner_s, outer_s = receiver.wait_for_spans(2)
    assert (inner_s.name, outer_s.name) == ("inner", "outer")
    assert inner_s.parent_span_id == outer_s.span_id and inner_s.trace_id == outer_s.trace_id
    assert outer_s.attributes == {"s": "x", "i": 3, "f": 0.5, "b": True, "l": ["a", "b"]}
    assert inner_s.events == [("e", {"k": 1})] and inner_s.status_code == 2
