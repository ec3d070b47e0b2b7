"""What makes a served relay usable as the model of an agent: stop sequences, structured
output (``response_format``), tool calls and log-probs.

- **stop**: the relay runs to its own end; the content (streamed or not) is cut before the
  first stop sequence in the merged text of all agents, and ``stop_reason`` names it.
- **tools**: the tools are described in the agents' system prompts in the Hermes/Qwen
  format (:func:`tools_prompt`, what Qwen2.5 models are trained on); the relay reasons,
  and ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks in its final
  text become OpenAI ``tool_calls`` (:func:`parse_tool_calls`). Earlier tool calls and
  tool results in the request are folded into the transcript the relay answers.
- **response_format**: the relay's text as JSON when it is one; else, for a schema of one
  property, the relay's answer (its ``\\boxed{}`` content) in that property; else one
  formatting turn of the relay's ``format_agent`` turns the reasoning into an object.
  The object is validated against the schema (``jsonschema``); when no valid object comes
  out, the request fails with a 422.
- **logprobs**: per token, from the stored segments of agents that record token ids and
  log-probs (not streamed; no ``top_logprobs``: a relay keeps only the chosen token's).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from relaygraph.agents.agent import Agent
from relaygraph.agents.backend import Prompt, StopRule
from relaygraph.serve.schemas import APIError, ResponseFormat, ToolSpec
from relaygraph.trajectory.answers import extract_answer
from relaygraph.trajectory.models import Segment

TOOLS_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    "{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>"
)
"""Qwen2.5's tool instructions (its chat template's wording): the format its models and
the tiny test models are trained to follow."""

_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

FORMAT_SYSTEM = "You turn answers into JSON. Reply with one JSON object and nothing else."


def tools_prompt(tools: Sequence[ToolSpec], choice: Any = "auto") -> str:
    """The system-prompt text describing ``tools`` (only the named one for a named
    ``tool_choice``)."""
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        tools = [t for t in tools if t.function.name == name]
    lines = [json.dumps(t.model_dump(exclude_none=True), ensure_ascii=False) for t in tools]
    return TOOLS_PROMPT.format(tools="\n".join(lines))


def tool_call_text(name: str, arguments: Any) -> str:
    """A call as the model writes it (how earlier calls are shown in the transcript)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


def parse_tool_calls(text: str, tools: Sequence[ToolSpec]) -> tuple[str | None, list[dict[str, Any]]]:
    """``(content before the first call or None, OpenAI tool calls)`` of a relay's text;
    blocks that are not a call of a known tool with an object of arguments stay text."""
    names = {t.function.name for t in tools}
    calls: list[dict[str, Any]] = []
    first: int | None = None
    for match in _TOOL_CALL.finditer(text):
        try:
            body = json.loads(match.group(1))
        except ValueError:
            continue
        if not isinstance(body, dict) or body.get("name") not in names:
            continue
        arguments = body.get("arguments", body.get("parameters", {}))
        if not isinstance(arguments, dict):
            continue
        first = match.start() if first is None else first
        calls.append({"id": f"call_{secrets.token_hex(12)}", "type": "function",
                      "function": {"name": body["name"],
                                   "arguments": json.dumps(arguments, ensure_ascii=False)}})
    if not calls:
        return text, []
    content = text[:first].strip()
    return content or None, calls


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, str | None]:
    """``text`` up to the earliest stop sequence, and that sequence (or None)."""
    best: tuple[int, str] | None = None
    for stop in stops:
        index = text.find(stop)
        if index >= 0 and (best is None or index < best[0]):
            best = (index, stop)
    return (text, None) if best is None else (text[:best[0]], best[1])


def held_back(stops: Sequence[str]) -> int:
    """Characters a stream keeps back so that a stop sequence split over pieces is caught."""
    return max((len(s) for s in stops), default=1) - 1


# --- response_format -------------------------------------------------------------------------

def first_json(text: str) -> Any:
    """The first JSON object in ``text`` (after any prose or code fence), or None."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def valid(value: Any, schema: Mapping[str, Any] | None) -> bool:
    if not isinstance(value, dict):
        return False
    if schema is None:
        return True
    import jsonschema

    validator = jsonschema.validators.validator_for(schema)(schema)
    return bool(validator.is_valid(value))


def single_property(schema: Mapping[str, Any] | None, answer: str) -> Any:
    """``{prop: answer}`` (as the property's JSON type) for an object schema with exactly
    one property, when that validates; else None."""
    if not schema or not answer or schema.get("type", "object") != "object":
        return None
    properties = schema.get("properties") or {}
    if len(properties) != 1:
        return None
    (name, spec), = properties.items()
    candidates: list[Any] = [answer]
    try:
        candidates.insert(0, json.loads(answer))
    except ValueError:
        pass
    for value in candidates:
        obj = {name: value}
        if valid(obj, schema):
            return obj
    return None


def describe_schema(schema: Mapping[str, Any] | None) -> str:
    """A short, stable description of an object schema: its keys and their types (the
    same whatever titles or strictness flags a client library adds)."""
    properties = (schema or {}).get("properties") or {}
    if not properties:
        return "a JSON object"
    keys = ", ".join(f'"{name}" ({spec.get("type", "any") if isinstance(spec, dict) else "any"})'
                     for name, spec in properties.items())
    return f"a JSON object with the keys {keys}"


def format_question(question: str, reasoning: str, schema: Mapping[str, Any] | None) -> str:
    """The user turn of a formatting turn."""
    return (f"Question: {question}\n\nAnswer and reasoning:\n{reasoning}\n\n"
            f"Write the answer as {describe_schema(schema)}.")


@dataclass
class Formatted:
    """The content a ``response_format`` made of a relay's text."""

    content: str
    how: str
    """``as written`` | ``answer`` (one property) | ``formatting turn``."""
    tokens: int = 0
    """Tokens the formatting turn generated (0 without one)."""
    input_tokens: int = 0


def format_response(fmt: ResponseFormat, question: str, text: str, agent: Agent | None,
                    max_tokens: int = 256) -> Formatted:
    """The relay's ``text`` as a JSON object per ``fmt`` (see the module's docstring); an
    :class:`APIError` 422 when no valid object comes out."""
    schema = fmt.json_schema.schema_ if fmt.type == "json_schema" and fmt.json_schema else None
    found = first_json(text)
    if valid(found, schema):
        return Formatted(json.dumps(found, ensure_ascii=False), "as written")
    filled = single_property(schema, extract_answer(text))
    if filled is not None:
        return Formatted(json.dumps(filled, ensure_ascii=False), "answer")
    if agent is None:
        raise _unformattable("no agent is set to format it (format_agent)", found)
    generation = agent.backend.generate(
        Prompt(format_question(question, text, schema), FORMAT_SYSTEM),
        StopRule(max_tokens=max_tokens), agent.sampling)
    value = first_json(generation.text)
    if not valid(value, schema):
        raise _unformattable(f"the formatting turn of {agent.name!r} wrote no valid object",
                             value)
    return Formatted(json.dumps(value, ensure_ascii=False), "formatting turn",
                     generation.n_tokens, generation.prompt_tokens)


def _unformattable(why: str, value: Any) -> APIError:
    what = "no JSON object" if value is None else "an object that does not match the schema"
    return APIError(422, f"The relay's answer could not be turned into the requested JSON "
                    f"({what}; {why}); the trajectory is kept", "invalid_request_error",
                    "response_format", "response_format_failed")


# --- logprobs --------------------------------------------------------------------------------

def token_logprobs(segments: Sequence[Segment], agents: Mapping[str, Agent],
                   limit: int | None = None) -> list[dict[str, Any]]:
    """OpenAI's ``logprobs.content`` for the tokens of ``segments`` whose author recorded
    token ids and log-probs, up to ``limit`` characters of their text (a stop cut)."""
    out: list[dict[str, Any]] = []
    chars = 0
    for seg in segments:
        if seg.kind not in ("text", "call"):
            continue
        agent = agents.get(seg.author)
        if not seg.token_ids or not seg.logprobs or agent is None:
            chars += len(seg.text)
            continue
        previous = ""
        for n, (token_id, logprob) in enumerate(zip(seg.token_ids, seg.logprobs, strict=False),
                                                start=1):
            text = agent.backend.decode(seg.token_ids[:n])
            piece = text[len(previous):] if text.startswith(previous) else text
            previous = text
            if limit is not None and chars + len(text) > limit:
                return out
            out.append({"token": piece, "logprob": float(logprob),
                        "bytes": list(piece.encode()), "top_logprobs": [],
                        "relaygraph_agent": seg.author, "token_id": int(token_id)})
        chars += len(seg.text)
    return out
