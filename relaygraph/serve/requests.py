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


async def read_json(request: Request, limit: int, optional: bool = False) -> dict[str, Any]:
    too_large = APIError(413, f"The request body is larger than this server's limit of {limit} "
                         "bytes", code="request_too_large")
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
    try:
        data = json.loads(body)
    except ValueError:
        raise bad_request("We could not parse the JSON body of your request; send a JSON "
                          "object (Content-Type: application/json)", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object", None, "invalid_json")
    return data


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


