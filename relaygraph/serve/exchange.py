"""One request's exchange with a relay: what it asks, the run, and the answer as OpenAI
responses (JSON or SSE chunks)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from relaygraph.errors import Cancelled, ConfigError, RelayGraphError, StoreUnavailableError
from relaygraph.policies.base import SUPERVISOR
from relaygraph.serve import agentic
from relaygraph.serve.registry import ServedRelay
from relaygraph.serve.runner import (
    DONE,
    RunHandle,
    Scheduler,
)
from relaygraph.serve.schemas import (
    APIError,
    ChatChoice,
    ChatCompletion,
    ChatMessageOut,
    Completion,
    CompletionChoice,
    ModelCard,
    RelayInfo,
    RelayUsage,
    ResponseFormat,
    ToolSpec,
    Usage,
    bad_request,
    openai_finish_reason,
)

log = logging.getLogger("relaygraph.serve")


@dataclass
class Ask:
    """What a request asks beyond a question (see :mod:`relaygraph.serve.agentic`)."""

    stops: list[str]
    prefix: str = ""
    """A final assistant message the relay continues (``continue_final_message``)."""
    tools: list[ToolSpec] | None = None
    tool_choice: Any = None
    response_format: ResponseFormat | None = None
    logprobs: bool = False

    @property
    def calls_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def json(self) -> bool:
        return self.response_format is not None and self.response_format.type != "text"

    @property
    def buffered(self) -> bool:
        """Content is known only at the end (tool calls or an object to build)."""
        return self.calls_tools or self.json


@dataclass
class Answer:
    """A finished run and the content the request gets."""

    result: Any
    content: str | None
    stop_reason: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    logprobs: list[dict[str, Any]] | None = None
    formatted: agentic.Formatted | None = None


@dataclass
class Run:
    """One request's run, and what is needed to answer it."""

    entry: ServedRelay
    handle: RunHandle
    trajectory_id: str
    prompt_tokens: int
    model: str
    kind: str  # "chat" | "completion"
    include_usage: bool
    created: int
    scheduler: Scheduler
    ask: Ask



def card(entry: ServedRelay) -> ModelCard:
    return ModelCard(id=entry.name, created=entry.created, relaygraph=entry.describe())


def usage(run: Run, answer: Answer) -> Usage:
    result = answer.result
    formatted = answer.formatted
    completion = sum(result.tokens_by_agent.values()) + (formatted.tokens if formatted else 0)
    prompt = run.prompt_tokens or sum(result.input_tokens_by_agent.values())
    usage = Usage(prompt_tokens=prompt, completion_tokens=completion,
                  total_tokens=prompt + completion,
                  relaygraph=RelayUsage(tokens_by_agent=result.tokens_by_agent,
                                        input_tokens_by_agent=result.input_tokens_by_agent,
                                        call_ratio=result.call_ratio, handoffs=result.handoffs,
                                        cost=result.cost, cost_by_agent=result.cost_by_agent))
    if formatted is not None and formatted.tokens:
        usage.relaygraph.format = {"how": formatted.how, "tokens": formatted.tokens,
                                   "input_tokens": formatted.input_tokens}
    return usage


def info(result: Any) -> RelayInfo:
    return RelayInfo(trajectory_id=result.trajectory_id, policy=result.policy,
                     answer=result.answer, finish_reason=result.finish_reason,
                     handoffs=result.handoffs,
                     handoff_records=[r.model_dump(by_alias=True) for r in result.handoff_records],
                     counters=result.counters, seconds=result.seconds)


def finish_reason_of(answer: Answer) -> str:
    if answer.tool_calls:
        return "tool_calls"
    if answer.stop_reason is not None:
        return "stop"
    return openai_finish_reason(answer.result.finish_reason)


def response(run: Run, answer: Answer) -> dict[str, Any]:
    result = answer.result
    finish = finish_reason_of(answer)
    log_run(run, result, "ok")
    if run.kind == "chat":
        logprobs = {"content": answer.logprobs, "refusal": None} \
            if answer.logprobs is not None else None
        message = ChatMessageOut(content=answer.content, tool_calls=answer.tool_calls)
        return ChatCompletion(
            id=f"chatcmpl-{run.trajectory_id}", created=run.created, model=run.model,
            choices=[ChatChoice(message=message, finish_reason=finish, logprobs=logprobs,
                                stop_reason=answer.stop_reason)],
            usage=usage(run, answer), relaygraph=info(result)).model_dump()
    return Completion(
        id=f"cmpl-{run.trajectory_id}", created=run.created, model=run.model,
        choices=[CompletionChoice(text=answer.content or "", finish_reason=finish,
                                  stop_reason=answer.stop_reason)],
        usage=usage(run, answer), relaygraph=info(result)).model_dump()


def log_run(run: Run, result: Any, outcome: str) -> None:
    tokens = sum(result.tokens_by_agent.values()) if result is not None else 0
    log.info("%s model=%s trajectory=%s %s tokens=%d queued=%.2fs", run.kind, run.model,
             run.trajectory_id, outcome, tokens, run.handle.wait_seconds)


def sse_data(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def chunk(run: Run, piece: str | None = None, finish: str | None = None,
           relaygraph: dict[str, Any] | None = None, role: bool = False,
           tool_calls: list[dict[str, Any]] | None = None,
           stop_reason: str | None = None) -> dict[str, Any]:
    if run.kind == "chat":
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if piece is not None:
            delta["content"] = piece
        if tool_calls is not None:
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(tool_calls)]
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None,
                                  "finish_reason": finish}
        if finish is not None:
            choice["stop_reason"] = stop_reason
        chunk = {"id": f"chatcmpl-{run.trajectory_id}", "object": "chat.completion.chunk",
                 "created": run.created, "model": run.model, "system_fingerprint": None,
                 "choices": [choice]}
    else:
        choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
        if finish is not None:
            choice["stop_reason"] = stop_reason
        chunk = {"id": f"cmpl-{run.trajectory_id}", "object": "text_completion",
                 "created": run.created, "model": run.model, "system_fingerprint": None,
                 "choices": [choice]}
    if relaygraph is not None:
        chunk["relaygraph"] = relaygraph
    return chunk


async def sse(run: Run, watcher: asyncio.Task) -> AsyncIterator[str]:
    """The run's events as OpenAI stream chunks: one per token (``relaygraph.agent`` says
    who wrote it), handoffs and reviews as chunks with an empty delta and a
    ``relaygraph.event``, then the finish chunk, the usage chunk if asked, ``[DONE]``.

    With stop sequences, text that could be the start of one is held back until it is
    known not to be, and nothing after the first one is sent. With tools or a JSON
    response format the content is sent once, at the end (it is known only then)."""
    handle = run.handle
    ask = run.ask
    assert handle.events is not None
    keep = agentic.held_back(ask.stops)
    text, sent, stopped = "", 0, False
    try:
        yield sse_data(chunk(run, "", role=True,
                               relaygraph={"trajectory_id": run.trajectory_id}))
        while True:
            event = await handle.events.get()
            if event is DONE:
                break
            if event.get("type") == "token" and event.get("agent") != SUPERVISOR:
                if ask.buffered or stopped:
                    continue
                text += event["text"]
                cut, stop = agentic.cut_at_stop(text, ask.stops)
                upto = len(cut) if stop is not None else len(text) - keep
                stopped = stop is not None
                if upto > sent:
                    yield sse_data(chunk(run, text[sent:upto],
                                           relaygraph={"agent": event["agent"]}))
                    sent = upto
            elif event.get("type") == "token":  # a supervisor's steer: guidance, not content
                yield sse_data(chunk(run, relaygraph={"event": {"type": "steer",
                                                                  "text": event["text"]}}))
            else:
                yield sse_data(chunk(run, relaygraph={"event": event}))
        try:
            answer = outcome(run)
        except APIError as error:
            log_run(run, None, f"error {error.code}")
            yield sse_data(error.body())
            return
        result = answer.result
        if ask.buffered:
            if answer.content:
                yield sse_data(chunk(run, answer.content))
            if answer.tool_calls:
                yield sse_data(chunk(run, tool_calls=answer.tool_calls))
        elif not stopped and len(text) > sent:
            yield sse_data(chunk(run, text[sent:]))
        yield sse_data(chunk(run, finish=finish_reason_of(answer), stop_reason=answer.stop_reason,
                               relaygraph=info(result).model_dump()))
        if run.include_usage:
            last = chunk(run)
            last["choices"] = []
            last["usage"] = usage(run, answer).model_dump()
            yield sse_data(last)
        log_run(run, result, "ok (stream)")
        yield "data: [DONE]\n\n"
    finally:
        watcher.cancel()
        if handle.future is not None and not handle.future.done():
            handle.cancel(run.scheduler.end_reason)


def outcome(run: Run) -> Answer:
    """The run's answer, or the APIError that answers its failure."""
    future = run.handle.future
    assert future is not None
    if future.cancelled():
        raise APIError(503, "The server is shutting down; the request was not run",
                       "server_error", code="shutting_down")
    exc = future.exception()
    if isinstance(exc, APIError):
        raise exc
    if exc is not None:
        raise run_error(exc, run)
    answer: Answer = future.result()
    return answer


def run_error(exc: BaseException, run: Run) -> APIError:
    where = f"trajectory {run.trajectory_id}"
    if isinstance(exc, Cancelled):
        return APIError(503, f"The run was cancelled ({exc.reason}); what was written is kept "
                        f"in {where}", "server_error", code="cancelled")
    if exc.__class__.__name__ == "ContextTooLongError":
        return APIError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, StoreUnavailableError):
        return APIError(503, str(exc), "server_error", code="store_unavailable")
    if isinstance(exc, ConfigError):
        return bad_request(str(exc), None, "invalid_value")
    if isinstance(exc, RelayGraphError):
        return APIError(500, f"{exc} ({where})", "server_error", code="relay_error")
    log.error("run of %s failed: %s", where, type(exc).__name__, exc_info=exc)
    return APIError(500, f"internal error ({type(exc).__name__}) in {where}; see the server "
                    "log", "server_error", code="internal_error")


