"""OpenTelemetry spans and metrics for relays (GenAI semantic conventions where they exist).

Only the OpenTelemetry *API* is imported here: without a configured SDK every call is a
cheap no-op. :func:`relaygraph.observability.configure` (or :func:`use`, with providers
you built yourself) installs an SDK for relaygraph; otherwise spans go to the global
provider, if the application set one.

One trace per trajectory, however its graph is run (``Relay.run``, ``graph.invoke`` or
``ainvoke``, as a subgraph, under ``langgraph dev``)::

    invoke_workflow relaygraph          begin_run .. end_run: policy, trajectory id, totals
      invoke_agent controller           agent_turn: one per turn, ends with its handoff
        chat <model>                    the generation (usage, finish reason, TTFT)
      invoke_agent expert
        chat <model>
      ...

Each turn carries the handoff that ends it as ``relaygraph.handoff.*`` attributes (from,
to, policy, reason, position, requested_tokens, confidence) and as a ``relaygraph.handoff``
span event. The graph opens the root span in its first step (a child of the caller's
active span, if any) and ends it in its last; every step in between makes it current
(:func:`in_run`). A run continued later (after an interrupt, in another process) opens a
continuation span under the first one (its ``traceparent`` is kept in the graph state and
with the trajectory). Message content is recorded only when
``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`` is true (or ``configure(...,
capture_content=True)``); store URLs, credentials and headers are never recorded.

Tracing never fails or blocks a run: every helper swallows its own errors (logged once).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from relaygraph.agents.backend import provider_name
from relaygraph.observability import providers
from relaygraph.observability.genai import HANDOFF_KEYS, chat_span, turn_attributes
from relaygraph.observability.instruments import Instruments
from relaygraph.observability.providers import Installed, warn_once

if TYPE_CHECKING:
    from relaygraph.agents.agent import Agent
    from relaygraph.agents.backend import Generation


# --- per-run state -------------------------------------------------------------------------

@dataclass
class RunStats:
    """What the turns of one run add up to (kept with the run's open span)."""

    policy: str = ""
    question: str | None = None
    turns: int = 0
    totals: dict[str, Any] | None = None
    """The run's numbers as the graph computed them, set when the run ends."""
    last_agent: str | None = None
    last_generation_end: float | None = None
    texts: list[str] = field(default_factory=list)


@dataclass
class OpenRun:
    """A trajectory's ``invoke_workflow`` span while this process runs its steps."""

    span: Any
    stats: RunStats
    installed: Installed
    traceparent: str


_open: dict[str, OpenRun] = {}
_open_lock = threading.Lock()
MAX_OPEN_RUNS = 1024
"""Runs abandoned mid-way (a stream nobody read to the end) are ended beyond this many."""
last_trace_id: str | None = None
"""Hex id of the trace of the most recent run in this process (for "see trace ..." hints)."""
_propagator = TraceContextTextMapPropagator()


def traceparent_of(span: Any) -> str:
    """The W3C ``traceparent`` of a span ("" for a span that is not recorded anywhere)."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent", "")


def begin_run(trajectory_id: str, policy_name: str, question: str | None = None,
              parent: str = "", resumed: bool = False) -> str:
    """Open the trajectory's root span (``invoke_workflow relaygraph``) unless this process
    has it open; returns its ``traceparent``.

    Its parent is the caller's active span when there is one (so the run joins the caller's
    trace), else ``parent`` (the traceparent of the run's first span, for a resumed run: one
    trace per trajectory), else none (a new trace).
    """
    global last_trace_id
    with _open_lock:
        if (run := _open.get(trajectory_id)) is not None:
            return run.traceparent
    installed = providers.installed()
    stats = RunStats(policy=policy_name)
    try:
        ctx = None
        if not trace.get_current_span().get_span_context().is_valid and parent:
            ctx = _propagator.extract({"traceparent": parent})
        span = installed.tracer.start_span("invoke_workflow relaygraph", context=ctx)
        if span.is_recording():
            attrs: dict[str, Any] = {
                "gen_ai.operation.name": "invoke_workflow", "gen_ai.workflow.name": "relaygraph",
                "openinference.span.kind": "CHAIN", "relaygraph.policy": policy_name,
                "relaygraph.trajectory.id": trajectory_id, "gen_ai.conversation.id": trajectory_id}
            if question is not None:
                attrs["relaygraph.question.chars"] = len(question)
            if resumed:
                attrs["relaygraph.run.resumed"] = True
            if question is not None and providers.capture_content(installed):
                stats.question = question
                attrs["gen_ai.input.messages"] = json.dumps(
                    [{"role": "user", "parts": [{"type": "text", "content": question}]}],
                    ensure_ascii=False)
                attrs["input.value"] = question
            span.set_attributes(attrs)
            last_trace_id = format(span.get_span_context().trace_id, "032x")
    except Exception as exc:  # noqa: BLE001 - tracing never fails a run
        warn_once("starting the run span", exc)
        span = trace.INVALID_SPAN
    run = OpenRun(span, stats, installed, traceparent_of(span) or parent)
    with _open_lock:
        _open[trajectory_id] = run
        stale = list(_open)[:-MAX_OPEN_RUNS] if len(_open) > MAX_OPEN_RUNS else []
    for tid in stale:
        end_run(tid, "abandoned")
    return run.traceparent


@contextmanager
def in_run(trajectory_id: str, policy_name: str, traceparent: str = "") -> Iterator[None]:
    """The trajectory's run span as the current span while a graph step works; a step of a
    run this process has not open (resumed after an interrupt, or in another process)
    opens a continuation of the run's trace first."""
    with _open_lock:
        run = _open.get(trajectory_id)
    if run is None:
        begin_run(trajectory_id, policy_name, parent=traceparent, resumed=True)
        with _open_lock:
            run = _open.get(trajectory_id)
    token = None
    try:
        if run is not None:
            token = otel_context.attach(trace.set_span_in_context(run.span))
    except Exception as exc:  # noqa: BLE001 - tracing never fails a run
        warn_once("entering the run span", exc)
    try:
        yield
    finally:
        if token is not None:
            try:
                otel_context.detach(token)
            except Exception as exc:  # noqa: BLE001 - tracing never fails a run
                warn_once("leaving the run span", exc)


def end_run(trajectory_id: str, outcome: str = "ok", totals: dict[str, Any] | None = None,
            error: BaseException | None = None) -> None:
    """End the trajectory's run span (if this process has it open) with the run's numbers
    as the graph computed them (``tokens_by_agent``, ``handoffs``, ``call_ratio``).
    ``outcome``: ``ok``, ``error``, ``interrupted`` (waiting for a human) or ``abandoned``."""
    with _open_lock:
        run = _open.pop(trajectory_id, None)
    if run is None:
        return
    try:
        if totals is not None:
            run.stats.totals = totals
        span = run.span
        if span.is_recording():
            span.set_attribute("relaygraph.run.outcome", outcome)
            if error is not None:
                span.record_exception(error)
                span.set_status(trace.Status(trace.StatusCode.ERROR, type(error).__name__))
        _finish_run(run.installed, span, run.stats, "error" if error is not None else outcome)
    except Exception as exc:  # noqa: BLE001 - tracing never fails a run
        warn_once("ending the run span", exc)


def run_stats(trajectory_id: str) -> RunStats | None:
    with _open_lock:
        run = _open.get(trajectory_id)
    return run.stats if run is not None else None


@contextmanager
def run_span(policy_name: str, question_chars: int, trajectory_id: str | None = None,
             question: str | None = None) -> Iterator[Any]:
    """A run span around code of your own (the graph opens its runs itself)."""
    tid = trajectory_id or f"span-{uuid.uuid4().hex}"
    begin_run(tid, policy_name, question)
    with _open_lock:
        run = _open.get(tid)
    error: BaseException | None = None
    try:
        with in_run(tid, policy_name):
            yield run.span if run is not None else trace.INVALID_SPAN
    except BaseException as exc:
        error = exc
        raise
    finally:
        end_run(tid, "error" if error else "ok", error=error)


def _finish_run(installed: Installed, span: Any, stats: RunStats, outcome: str) -> None:
    attrs = {"relaygraph.policy": stats.policy}
    installed.instruments.runs.add(1, {**attrs, "relaygraph.run.outcome": outcome})
    totals = stats.totals or {}
    tokens: dict[str, int] = dict(totals.get("tokens_by_agent") or {})
    total = sum(tokens.values())
    ratio = float(totals.get("call_ratio") or 0.0)
    if total:
        installed.instruments.call_ratio.record(ratio, attrs)
    if span.is_recording():
        names = list(tokens)
        span.set_attributes({
            "relaygraph.turns": stats.turns, "relaygraph.handoffs": int(totals.get("handoffs") or 0),
            "relaygraph.call_ratio": ratio, "gen_ai.usage.output_tokens": total,
            "relaygraph.agents": names,
            "relaygraph.usage.output_tokens_by_agent": [tokens[n] for n in names],
        })
        cost_by_agent = totals.get("cost_by_agent")
        if isinstance(cost_by_agent, dict):  # agents with a price: the run's money
            priced = list(cost_by_agent)
            span.set_attributes({"relaygraph.cost": float(totals.get("cost") or 0.0),
                                 "relaygraph.cost.agents": priced,
                                 "relaygraph.cost.by_agent": [float(cost_by_agent[n])
                                                              for n in priced]})
        if stats.question is not None:  # content capture was on when the run started
            text = "".join(stats.texts)
            span.set_attribute("gen_ai.output.messages", json.dumps(
                [{"role": "assistant", "parts": [{"type": "text", "content": text}]}],
                ensure_ascii=False))
            span.set_attribute("output.value", text)
    span.end()


# --- per-turn spans ------------------------------------------------------------------------

class Turn:
    """One agent turn: the ``invoke_agent`` span (attribute access goes to it) and timings."""

    __slots__ = ("span", "agent", "policy", "model", "provider", "trajectory_id", "position",
                 "started", "started_ns", "first_text", "stats", "installed")

    def __init__(self, span: Any, agent: Agent, policy: str, trajectory_id: str, position: int,
                 installed: Installed, stats: RunStats | None) -> None:
        self.span = span
        self.agent = agent
        self.policy = policy
        self.model = agent.backend.model_id
        self.provider = provider_name(agent.backend)
        self.trajectory_id = trajectory_id
        self.position = position
        self.started = time.perf_counter()
        self.started_ns = time.time_ns()
        self.first_text: float | None = None
        self.stats = stats
        self.installed = installed

    def __getattr__(self, name: str) -> Any:  # set_attribute, add_event, ... of the span
        return getattr(self.span, name)

    def wrap_stream(self, on_text: Callable[[str], None]) -> Callable[[str], None]:
        """``on_text`` that also notes when the first text of the turn arrived (TTFT)."""
        def watched(text: str) -> None:
            if self.first_text is None:
                self.first_text = time.perf_counter()
            on_text(text)

        return watched


@contextmanager
def agent_turn(agent: Agent, policy: str, trajectory_id: str, position: int) -> Iterator[Turn]:
    """The ``invoke_agent {agent}`` span of one turn, current while the turn runs."""
    installed = providers.installed()
    turn: Turn | None = None
    token = None
    try:
        span = installed.tracer.start_span(f"invoke_agent {agent.name}")
        turn = Turn(span, agent, policy, trajectory_id, position, installed,
                    run_stats(trajectory_id))
        if span.is_recording():
            span.set_attributes({
                "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": agent.name,
                "gen_ai.request.model": turn.model, "gen_ai.provider.name": turn.provider,
                "gen_ai.conversation.id": trajectory_id, "openinference.span.kind": "AGENT",
                "relaygraph.policy": policy, "relaygraph.trajectory.id": trajectory_id,
                "relaygraph.segment.seq": position,
            })
        stats = turn.stats
        if stats is not None and stats.last_generation_end is not None:
            gap = max(0.0, turn.started - stats.last_generation_end)
            if span.is_recording():
                span.set_attribute("relaygraph.handoff.overhead_s", gap)
            if stats.last_agent is not None and stats.last_agent != agent.name:
                installed.instruments.overhead.record(gap, {
                    "relaygraph.handoff.from": stats.last_agent,
                    "relaygraph.handoff.to": agent.name, "relaygraph.policy": policy})
        token = otel_context.attach(trace.set_span_in_context(span))
    except Exception as exc:  # noqa: BLE001 - tracing never fails a run
        warn_once("starting a turn span", exc)
    if turn is None:
        turn = Turn(trace.INVALID_SPAN, agent, policy, trajectory_id, position, installed, None)
    try:
        yield turn
    except BaseException as exc:
        try:
            turn.span.record_exception(exc)
            turn.span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))
        except Exception as inner:  # noqa: BLE001 - tracing never fails a run
            warn_once("recording an error", inner)
        raise
    finally:
        try:
            if token is not None:
                otel_context.detach(token)
            turn.span.end()
        except Exception as exc:  # noqa: BLE001 - tracing never fails a run
            warn_once("ending a turn span", exc)


def record_turn(span: Any, generation: Generation, handoff: dict[str, Any]) -> None:
    """Usage of the turn, its ``chat`` generation span, and the handoff that ends it."""
    try:
        _record_turn(span, generation, handoff)
    except Exception as exc:  # noqa: BLE001 - tracing never fails a run
        warn_once("recording a turn", exc)


def _record_turn(turn: Any, generation: Generation, handoff: dict[str, Any]) -> None:
    if not isinstance(turn, Turn):  # a bare span from older callers
        turn_attributes(turn, generation, handoff)
        return
    span, installed = turn.span, turn.installed
    n_out = generation.n_tokens
    n_in = generation.prompt_tokens
    seconds = float(generation.seconds or 0.0)
    ttft = turn.first_text - turn.started if turn.first_text is not None else None
    model_attrs = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": turn.provider,
                   "gen_ai.request.model": turn.model, "gen_ai.agent.name": turn.agent.name}
    if span.is_recording():
        turn_attributes(span, generation, handoff)
        if turn.agent.price is not None:  # the same arithmetic as the run's totals
            span.set_attribute("relaygraph.usage.cost", turn.agent.price.cost(n_in, n_out))
        if isinstance(handoff.get("position"), int):
            span.set_attribute("relaygraph.segment.count", handoff["position"] - turn.position)
        chat_span(turn, generation, seconds, ttft)
        event = {f"relaygraph.handoff.{k}": handoff[k] for k in HANDOFF_KEYS
                 if handoff.get(k) is not None}
        event["relaygraph.trajectory.id"] = turn.trajectory_id
        span.add_event("relaygraph.handoff", event)
    inst = installed.instruments
    inst.tokens.record(n_in, {**model_attrs, "gen_ai.token.type": "input"})
    inst.tokens.record(n_out, {**model_attrs, "gen_ai.token.type": "output"})
    if seconds:
        inst.duration.record(seconds, model_attrs)
    if ttft is not None:
        inst.ttft.record(ttft, model_attrs)
    _count_handoff(inst, handoff, turn.agent.name, turn.policy)
    stats = turn.stats
    if stats is not None:
        stats.turns += 1
        stats.last_agent = turn.agent.name
        # the backend's clock: the generation ended at most now (never after the turn)
        stats.last_generation_end = min(turn.started + seconds, time.perf_counter())
        if stats.question is not None:
            stats.texts.append(generation.text)


def _count_handoff(inst: Instruments, handoff: dict[str, Any], author: str, policy: str) -> None:
    """Count the handoff if control moved (as the graph decided: ``handoff["moved"]``)."""
    if handoff.get("moved"):
        inst.handoffs.add(1, {"relaygraph.handoff.from": str(handoff.get("from", author)),
                              "relaygraph.handoff.to": str(handoff.get("to")),
                              "relaygraph.handoff.reason": str(handoff.get("reason")),
                              "relaygraph.policy": str(handoff.get("policy") or policy)})


def record_review(handoff: dict[str, Any]) -> None:
    """A supervisor's review: a ``relaygraph.review`` event on the current span (the run's),
    with the handoff attributes; a switch to another agent counts as a handoff."""
    try:
        inst = providers.installed().instruments
        author = str(handoff.get("from") or "")
        _count_handoff(inst, handoff, author, str(handoff.get("policy") or ""))
        span = trace.get_current_span()
        if span.is_recording() and handoff.get("reason") != "continue":
            span.add_event("relaygraph.review", {
                f"relaygraph.handoff.{k}": handoff[k] for k in HANDOFF_KEYS
                if handoff.get(k) is not None})
    except Exception as exc:  # noqa: BLE001 - tracing never fails a run
        warn_once("recording a review", exc)
