"""Reading a request: its JSON body (bounded), its pydantic model, the question of a chat,
the caller's trace context."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError

from relaygraph.graphs.chat import transcript
from relaygraph.serve import agentic
from relaygraph.serve.schemas import (
    APIError,
    ChatCompletionRequest,
    bad_request,
    validation_error,
)

MAX_DEPTH = 64
"""Deepest nesting of arrays and objects a request body may have (OpenAI's requests need
about six levels; deeper ones are refused before a validator recurses into them)."""


_TOO_DEEP = object()


async def read_json(request: Request, limit: int, optional: bool = False) -> dict[str, Any]:
    """The body as a JSON object: ``Content-Type: application/json`` (a browser can send a
    text/plain or form body to any site without a preflight: those are refused), at most
    ``limit`` bytes and :data:`MAX_DEPTH` levels deep. ``optional``: an empty body is ``{}``."""
    too_large = APIError(413, f"The request body is larger than this server's limit of {limit} "
                         "bytes", code="request_too_large")
    not_json = APIError(415, "Send the request body as JSON with 'Content-Type: "
                        "application/json'", code="unsupported_media_type")
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media and media != "application/json":
        raise not_json
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    if optional and not body.strip():
        return {}
    if not media:
        raise not_json
    try:
        data = json.loads(body)
    except RecursionError:  # deeper than the interpreter's recursion limit
        data = _TOO_DEEP
    except ValueError:
        raise bad_request("We could not parse the JSON body of your request; send a JSON "
                          "object (Content-Type: application/json)", None, "invalid_json") from None
    if data is _TOO_DEEP or _depth(data) > MAX_DEPTH:
        raise bad_request(f"The JSON body is nested more than {MAX_DEPTH} levels deep",
                          None, "invalid_json")
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object", None, "invalid_json")
    return data


def _depth(data: Any) -> int:
    """How deep arrays and objects nest in ``data`` (iteratively: no recursion limit)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((child, level + 1) for child in children)
    return deepest


def parse(model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def chat_question(req: ChatCompletionRequest) -> tuple[str, str | None, str]:
    """The question (the last user message; earlier turns, tool calls and tool results
    become a transcript before it), the system text (system and developer messages,
    joined) and, with ``continue_final_message``, the final assistant message the relay
    continues."""
    system: list[str] = []
    turns: list[tuple[str, str, int]] = []
    messages = list(req.messages)
    prefix = ""
    if req.continue_final_message:
        if messages[-1].role != "assistant":
            raise bad_request("continue_final_message needs the last message to be an "
                              "assistant message (the text to continue)", "messages",
                              "invalid_value")
        prefix = messages.pop().text(f"messages.{len(messages)}")
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        extra = message.model_extra or {}
        if message.role == "function" or extra.get("function_call"):
            raise bad_request("Legacy function messages are not supported; use tools",
                              f"{where}.role", "unsupported_message")
        text = message.text(where)
        if message.role in ("system", "developer"):
            if text.strip():
                system.append(text)
            continue
        calls = extra.get("tool_calls") or []
        if calls:
            if message.role != "assistant" or not isinstance(calls, list):
                raise bad_request("tool_calls belong on assistant messages", f"{where}.tool_calls",
                                  "invalid_value")
            shown = [text] if text.strip() else []
            for j, call in enumerate(calls):
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise bad_request("a tool call needs function.name", f"{where}.tool_calls.{j}",
                                      "invalid_value")
                shown.append(agentic.tool_call_text(function["name"], function.get("arguments", {})))
            text = "\n".join(shown)
        turns.append((message.role, text, i))
    if not turns or turns[-1][0] not in ("user", "tool"):
        raise bad_request("The last message must be a user message (the question the relay "
                          "answers) or a tool result", "messages", "invalid_value")
    _, question, index = turns[-1]
    if not question.strip():
        raise bad_request("The question (the last user message) is empty",
                          f"messages.{index}.content", "invalid_value")
    if len(turns) > 1 or turns[-1][0] == "tool":  # as a relay graph shows a thread's turns
        question = transcript([(role, text) for role, text, _ in turns])
    return question, ("\n\n".join(system) if system else None), prefix


