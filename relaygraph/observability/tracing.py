"""OpenTelemetry spans for relays (GenAI semantic conventions where they exist).

Only the OpenTelemetry API is used here: without a configured SDK every call is a no-op.
Span tree: ``invoke_workflow relaygraph`` (one per run) -> ``invoke_agent {agent}`` (one per
turn), each turn carrying its handoff as ``relaygraph.handoff.*`` attributes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import trace

if TYPE_CHECKING:
    from relaygraph.agents.agent import Agent
    from relaygraph.agents.backend import Generation
    from relaygraph.policies.base import Policy

tracer = trace.get_tracer("relaygraph")


@contextmanager
def run_span(policy_name: str, question_chars: int) -> Iterator[Any]:
    with tracer.start_as_current_span("invoke_workflow relaygraph") as span:
        span.set_attribute("gen_ai.operation.name", "invoke_workflow")
        span.set_attribute("relaygraph.policy", policy_name)
        span.set_attribute("relaygraph.question.chars", question_chars)
        yield span


@contextmanager
def agent_turn(agent: Agent, policy: Policy, trajectory_id: str, position: int) -> Iterator[Any]:
    with tracer.start_as_current_span(f"invoke_agent {agent.name}") as span:
        span.set_attribute("gen_ai.operation.name", "invoke_agent")
        span.set_attribute("gen_ai.agent.name", agent.name)
        span.set_attribute("gen_ai.request.model", agent.backend.model_id)
        span.set_attribute("relaygraph.policy", policy.name)
        span.set_attribute("relaygraph.trajectory.id", trajectory_id)
        span.set_attribute("relaygraph.segment.seq", position)
        yield span


def record_turn(span: Any, generation: Generation, handoff: dict[str, Any]) -> None:
    """Usage of the turn and the handoff that ends it (``relaygraph.handoff.*``)."""
    span.set_attribute("gen_ai.usage.input_tokens", generation.prompt_tokens)
    span.set_attribute("gen_ai.usage.output_tokens", len(generation.token_ids))
    span.set_attribute("relaygraph.usage.prefilled_tokens", generation.prefilled_tokens)
    span.set_attribute("gen_ai.response.finish_reasons", [generation.finish_reason])
    for key in ("from", "to", "policy", "reason", "position", "requested_tokens", "confidence"):
        if handoff.get(key) is not None:
            span.set_attribute(f"relaygraph.handoff.{key}", handoff[key])
