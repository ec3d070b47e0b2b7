"""GenAI semantic-convention attributes of a turn and its ``chat`` generation span."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from opentelemetry import trace

from relaygraph.observability import providers

if TYPE_CHECKING:
    from relaygraph.agents.backend import Generation
    from relaygraph.observability.tracing import Turn

HANDOFF_KEYS = ("from", "to", "policy", "reason", "position", "requested_tokens", "confidence")


def turn_attributes(span: Any, generation: Generation, handoff: dict[str, Any]) -> None:
    n_in, prefilled = generation.prompt_tokens, generation.prefilled_tokens
    attrs: dict[str, Any] = {
        "gen_ai.usage.input_tokens": n_in, "gen_ai.usage.output_tokens": generation.n_tokens,
        "gen_ai.usage.cache_read.input_tokens": max(0, n_in - prefilled),
        "relaygraph.usage.prefilled_tokens": prefilled,
        "gen_ai.response.finish_reasons": [str(generation.finish_reason)],
    }
    for key in HANDOFF_KEYS:
        value = handoff.get(key)
        if value is not None:
            attrs[f"relaygraph.handoff.{key}"] = value
    span.set_attributes(attrs)


def chat_span(turn: Turn, generation: Generation, seconds: float, ttft: float | None) -> None:
    """The generation as a child span, timed from the turn's start by the backend's clock."""
    ctx = trace.set_span_in_context(turn.span)
    end_ns = turn.started_ns + int(seconds * 1e9)
    chat = turn.installed.tracer.start_span(f"chat {turn.model}", context=ctx,
                                            start_time=turn.started_ns)
    n_in, n_out = generation.prompt_tokens, generation.n_tokens
    sampling = turn.agent.sampling
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": turn.provider,
        "gen_ai.request.model": turn.model, "gen_ai.response.model": turn.model,
        "gen_ai.agent.name": turn.agent.name, "gen_ai.conversation.id": turn.trajectory_id,
        "gen_ai.usage.input_tokens": n_in, "gen_ai.usage.output_tokens": n_out,
        "gen_ai.usage.cache_read.input_tokens": max(0, n_in - generation.prefilled_tokens),
        "gen_ai.response.finish_reasons": [str(generation.finish_reason)],
        "openinference.span.kind": "LLM", "llm.model_name": turn.model,
        "llm.token_count.prompt": n_in, "llm.token_count.completion": n_out,
        "llm.token_count.total": n_in + n_out,
    }
    if sampling is not None:
        attrs["gen_ai.request.temperature"] = float(sampling.temperature)
        attrs["gen_ai.request.top_p"] = float(sampling.top_p)
        if sampling.seed is not None:
            attrs["gen_ai.request.seed"] = int(sampling.seed)
    if ttft is not None:
        attrs["gen_ai.response.time_to_first_chunk"] = ttft
    if providers.capture_content(turn.installed):
        system = turn.agent.system_prompt
        if system:
            attrs["gen_ai.system_instructions"] = json.dumps(
                [{"type": "text", "content": system}], ensure_ascii=False)
        if turn.stats is not None and turn.stats.question is not None:
            attrs["gen_ai.input.messages"] = json.dumps(
                [{"role": "user", "parts": [{"type": "text", "content": turn.stats.question}]}],
                ensure_ascii=False)
        attrs["gen_ai.output.messages"] = json.dumps(
            [{"role": "assistant", "parts": [{"type": "text", "content": generation.text}],
              "finish_reason": str(generation.finish_reason)}], ensure_ascii=False)
        attrs["output.value"] = generation.text
    chat.set_attributes(attrs)
    chat.end(end_time=end_ns)
