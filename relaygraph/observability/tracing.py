"""OpenTelemetry spans and metrics for relays (GenAI semantic conventions where they exist).

Only the OpenTelemetry *API* is imported here: without a configured SDK every call is a
cheap no-op. :func:`relaygraph.observability.configure` (or :func:`use`, with providers
you built yourself) installs an SDK for relaygraph; otherwise spans go to the global
provider, if the application set one.

One trace per run::

    invoke_workflow relaygraph          run_span: policy, trajectory id, run totals
      invoke_agent controller           agent_turn: one per turn, ends with its handoff
        chat <model>                    the generation (usage, finish reason, TTFT)
      invoke_agent expert
        chat <model>
      ...

Each turn carries the handoff that ends it as ``relaygraph.handoff.*`` attributes (from,
to, policy, reason, position, requested_tokens, confidence) and as a ``relaygraph.handoff``
span event. Message content is recorded only when
``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`` is true (or ``configure(...,
capture_content=True)``); store URLs, credentials and headers are never recorded.

Tracing never fails or blocks a run: every helper swallows its own errors (logged once).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace

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
    """What the turns of one run add up to (kept in a context variable by :func:`run_span`)."""

    policy: str = ""
    question: str | None = None
    turns: int = 0
    totals: dict[str, Any] | None = None
    """The run's numbers as the graph computed them (:func:`run_totals`), set at its end."""
    last_agent: str | None = None
    last_generation_end: float | None = None
    texts: list[str] = field(default_factory=list)


_run: ContextVar[RunStats | None] = ContextVar("relaygraph_run", default=None)
last_trace_id: str | None = None
"""Hex id of the trace of the most recent run in this process (for "see trace ..." hints)."""


@contextmanager
def run_span(policy_name: str, question_chars: int, trajectory_id: str | None = None,
             question: str | None = None) -> Iterator[Any]:
    """The root span of a run (``invoke_workflow relaygraph``); totals are added at the end."""
    global last_trace_id
    installed = providers.installed()
    stats = RunStats(policy=policy_name)
    span = token = stats_token = None
    try:
        span = installed.tracer.start_span("invoke_workflow relaygraph")
        if span.is_recording():
            attrs: dict[str, Any] = {
                "gen_ai.operation.name": "invoke_workflow", "gen_ai.workflow.name": "relaygraph",
                "openinference.span.kind": "CHAIN",
                "relaygraph.policy": policy_name, "relaygraph.question.chars": question_chars}
            if trajectory_id:
                attrs["relaygraph.trajectory.id"] = attrs["gen_ai.conversation.id"] = trajectory_id
            if question is not None and providers.capture_content(installed):
                stats.question = question
                attrs["gen_ai.input.messages"] = json.dumps(
                    [{"role": "user", "parts": [{"type": "text", "content": question}]}],
                    ensure_ascii=False)
                attrs["input.value"] = question
            span.set_attributes(attrs)
            last_trace_id = format(span.get_span_context().trace_id, "032x")
        token = otel_context.attach(trace.set_span_in_context(span))
        stats_token = _run.set(stats)
    except Exception as exc:  # noqa: BLE001 - tracing never fails a run
        warn_once("starting the run span", exc)
    outcome = "ok"
    try:
        yield span if span is not None else trace.INVALID_SPAN
    except BaseException as exc:
        outcome = "error"
        if span is not None:
            try:
                span.record_exception(exc)
                span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}"))
            except Exception as inner:  # noqa: BLE001 - tracing never fails a run
                warn_once("recording an error", inner)
        raise
    finally:
        def leave() -> None:
            if stats_token is not None:
                _run.reset(stats_token)

        def detach() -> None:
            if token is not None:
                otel_context.detach(token)

        for step, what in ((leave, "leaving the run"), (detach, "detaching the run span"),
                           (lambda: _finish_run(installed, span, stats, outcome),
                            "ending the run span")):
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - tracing never fails a run
                warn_once(what, exc)


def run_totals(totals: dict[str, Any]) -> None:
    """Hand the current run span the run's numbers as the graph computed them
    (``tokens_by_agent``, ``handoffs``, ``call_ratio``); they are set when it ends."""
    stats = _run.get()
    if stats is not None:
        stats.totals = totals


def _finish_run(installed: Installed, span: Any, stats: RunStats, outcome: str) -> None:
    attrs = {"relaygraph.policy": stats.policy}
    installed.instruments.runs.add(1, {**attrs, "relaygraph.run.outcome": outcome})
    totals = stats.totals or {}
    tokens: dict[str, int] = dict(totals.get("tokens_by_agent") or {})
    total = sum(tokens.values())
    ratio = float(totals.get("call_ratio") or 0.0)
    if total:
        installed.instruments.call_ratio.record(ratio, attrs)
    if span is None:
        return
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
        turn = Turn(span, agent, policy, trajectory_id, position, installed, _run.get())
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
