"""The ASGI app: relays as OpenAI-compatible models.

``create_app(registry, settings)`` serves ``POST /v1/chat/completions`` and
``POST /v1/completions`` (both streaming over SSE or not), ``GET /v1/models[/{id}]`` and
``GET /health``. Each request is one relay run (one trajectory, one trace): the ``model``
field picks the relay, the last user message is the question, and the response carries
the trajectory id (``relaygraph.trajectory_id`` and the ``X-Relaygraph-Trajectory-Id``
header) for ``relaygraph show``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from relaygraph.errors import Cancelled, ConfigError, RelayGraphError, StoreUnavailableError
from relaygraph.policies.base import SUPERVISOR
from relaygraph.serve import agentic
from relaygraph.serve.registry import Registry, ServedRelay
from relaygraph.serve.runner import (
    DONE,
    RunHandle,
    Scheduler,
    ServerBusy,
    ServerClosing,
    run_relay,
)
from relaygraph.serve.schemas import (
    APIError,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessageOut,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelCard,
    ModelList,
    RelayInfo,
    RelayUsage,
    ResponseFormat,
    ToolSpec,
    Usage,
    bad_request,
    openai_finish_reason,
    validation_error,
)
from relaygraph.trajectory.models import Segment, active, new_trajectory_id

log = logging.getLogger("relaygraph.serve")
TRAJECTORY_HEADER = "X-Relaygraph-Trajectory-Id"


@dataclass
class ServeSettings:
    """Limits and security of one server."""

    api_key: str | None = None
    """Required as ``Authorization: Bearer KEY`` on every ``/v1`` route when set."""
    concurrency: int = 4
    """Relay runs at once (worker threads; runs on one model take turns on it)."""
    max_queue: int = 64
    """Admitted requests waiting for a worker; beyond that a request gets a 429."""
    queue_timeout: float = 60.0
    """Seconds a request may wait for a worker before it gets a 503 (0: no limit)."""
    max_request_bytes: int = 1 << 20
    """Largest request body; larger ones get a 413."""


@dataclass
class _Ask:
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
class _Answer:
    """A finished run and the content the request gets."""

    result: Any
    content: str | None
    stop_reason: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    logprobs: list[dict[str, Any]] | None = None
    formatted: agentic.Formatted | None = None


@dataclass
class _Run:
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
    ask: _Ask


def create_app(registry: Registry, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app serving ``registry``'s relays (models must already be loaded)."""
    from contextlib import asynccontextmanager

    settings = settings or ServeSettings()
    scheduler = Scheduler(settings.concurrency, settings.max_queue)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(scheduler.shutdown)

    app = FastAPI(title="relaygraph", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.registry = registry
    app.state.scheduler = scheduler
    app.state.settings = settings

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            error = APIError(404, f"Unknown request URL: {request.method} {request.url.path}. "
                             "This server offers /v1/chat/completions, /v1/completions, "
                             "/v1/models and /health.", code="unknown_url")
        else:
            error = APIError(exc.status_code, str(exc.detail), code=None)
        return JSONResponse(error.body(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.error("internal error: %s", type(exc).__name__, exc_info=exc)
        error = APIError(500, f"internal error ({type(exc).__name__}); see the server log",
                         "server_error", code="internal_error")
        return JSONResponse(error.body(), status_code=500)

    def authorize(request: Request) -> None:
        if not settings.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise APIError(401, "You didn't provide an API key. Pass it as 'Authorization: "
                           "Bearer KEY' (the openai client's api_key).", code="invalid_api_key")
        if not hmac.compare_digest(given.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "relays": list(registry.relays), **scheduler.stats()}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        authorize(request)
        cards = [_card(entry) for entry in registry.relays.values()]
        return ModelList(data=cards).model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        authorize(request)
        return _card(registry.get(model_id)).model_dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        req = _parse(ChatCompletionRequest, await _read_json(request, settings.max_request_bytes))
        if error := req.unsupported():
            raise error
        entry = registry.get(req.model)
        question, system, prefix = _chat_question(req)
        ask = _Ask(req.stops, prefix, req.tools, req.tool_choice, req.response_format,
                   bool(req.logprobs))
        return await _serve(request, entry, req, question, system, "chat", ask)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        req = _parse(CompletionRequest, await _read_json(request, settings.max_request_bytes))
        if error := req.unsupported():
            raise error
        entry = registry.get(req.model)
        question = req.question()
        if not question.strip():
            raise bad_request("The prompt is empty", "prompt", "invalid_value")
        return await _serve(request, entry, req, question, None, "completion", _Ask(req.stops))

    async def _serve(request: Request, entry: ServedRelay, req: Any, question: str,
                     system: str | None, kind: str, ask: _Ask) -> Response:
        tools = agentic.tools_prompt(ask.tools or [], ask.tool_choice) if ask.calls_tools else None
        relay = entry.variant(max_tokens=req.budget, temperature=req.temperature,
                              top_p=req.top_p, seed=req.seed, system=system,
                              policy=req.relaygraph.policy, tools=tools)
        prompt_tokens, room = await asyncio.to_thread(entry.prompt_tokens, relay, question)
        if room is not None and room < 1:
            raise APIError(400, f"The prompt ({prompt_tokens} tokens) does not fit the "
                           "context window of this relay's models; shorten it",
                           param="messages" if kind == "chat" else "prompt",
                           code="context_length_exceeded")
        tid = new_trajectory_id()
        handle = RunHandle(asyncio.get_running_loop(), stream=req.stream)
        parent = _trace_parent(request)
        store = entry.store

        def work() -> _Answer:
            given = [Segment(author="caller", text=ask.prefix)] if ask.prefix else []
            result = run_relay(relay, handle, question, tid, parent, given)
            segments = [s for s in active(store.read(tid)) if not s.meta.get("given")]
            return _answer(entry, relay, ask, question, result, segments)

        try:
            scheduler.submit(handle, work)
        except ServerBusy:
            stats = scheduler.stats()
            raise APIError(429, f"relaygraph is at capacity ({stats['running']} runs, "
                           f"{stats['queued']} queued); retry shortly", "rate_limit_error",
                           code="server_busy", headers={"Retry-After": "1"}) from None
        except ServerClosing:
            raise APIError(503, "The server is shutting down", "server_error",
                           code="shutting_down") from None
        run = _Run(entry, handle, tid, prompt_tokens, req.model, kind, req.include_usage,
                   int(time.time()), scheduler, ask)
        watcher = asyncio.create_task(_watch_disconnect(request, run))
        try:
            await _wait_for_worker(handle, watcher, settings.queue_timeout)
        except BaseException:  # a 503, or this task cancelled (the server stops)
            watcher.cancel()
            handle.cancel(scheduler.end_reason)
            raise
        if watcher.done():  # the client left while queued
            return Response(status_code=499)
        assert handle.future is not None
        headers = {TRAJECTORY_HEADER: tid}
        if req.stream and not handle.future.cancelled():
            return StreamingResponse(
                _sse(run, watcher), media_type="text/event-stream",
                headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        finished = asyncio.wrap_future(handle.future)
        finished.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved
        try:
            await asyncio.wait({finished, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # this task cancelled (the server stops)
            handle.cancel(scheduler.end_reason)
            raise
        finally:
            watcher.cancel()
        if not handle.future.done():  # the client left: the run stops at its next token
            return Response(status_code=499)
        try:
            answer = _outcome(run)
        except APIError as error:
            _log_run(run, None, f"error {error.code}")
            raise
        return JSONResponse(_response(run, answer), headers=headers)

    return app


# --- request helpers -------------------------------------------------------------------------

async def _read_json(request: Request, limit: int) -> dict[str, Any]:
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
    try:
        data = json.loads(body)
    except ValueError:
        raise bad_request("We could not parse the JSON body of your request; send a JSON "
                          "object (Content-Type: application/json)", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object", None, "invalid_json")
    return data


def _parse(model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def _chat_question(req: ChatCompletionRequest) -> tuple[str, str | None, str]:
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
    if len(turns) > 1 or turns[-1][0] == "tool":
        question = "\n".join(f"{role.title()}: {text}" for role, text, _ in turns)
    return question, ("\n\n".join(system) if system else None), prefix


def _answer(entry: ServedRelay, relay: Any, ask: _Ask, question: str, result: Any,
            segments: list[Segment]) -> _Answer:
    """The content of a finished run as the request asked for it (on the worker thread)."""
    text = "".join(s.text for s in segments if s.kind in ("text", "call"))
    content, stop_reason = agentic.cut_at_stop(text, ask.stops)
    answer = _Answer(result, content, stop_reason)
    if ask.logprobs:
        agents = {a.name: a for a in relay.agents}
        answer.logprobs = agentic.token_logprobs(segments, agents, len(content))
    if ask.calls_tools:
        answer.content, calls = agentic.parse_tool_calls(content, ask.tools or [])
        if calls:
            answer.tool_calls = calls
        elif ask.tool_choice not in (None, "auto"):
            raise APIError(422, "tool_choice asks for a tool call, but the relay's final text "
                           "has no <tool_call> block of a given tool; the trajectory is kept",
                           "invalid_request_error", "tool_choice", "tool_call_failed")
    if ask.json and not answer.tool_calls:
        assert ask.response_format is not None
        agent = entry.format_agent(relay)
        answer.formatted = agentic.format_response(ask.response_format, question, content, agent)
        answer.content = answer.formatted.content
    return answer


def _trace_parent(request: Request) -> Any:
    """The caller's trace context (W3C ``traceparent``), so the run joins the caller's trace."""
    if "traceparent" not in request.headers:
        return None
    from opentelemetry import propagate

    return propagate.extract(dict(request.headers))


async def _watch_disconnect(request: Request, run: _Run) -> None:
    """Return when the client disconnects, cancelling the run if it is not over."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            break
    handle = run.handle
    if handle.future is None or not handle.future.done():
        handle.cancel(run.scheduler.end_reason)


async def _wait_for_worker(handle: RunHandle, watcher: asyncio.Task, timeout: float) -> None:
    """Wait until a worker picked the run up (or it ended, or the client left); 503 when the
    queue wait exceeds ``timeout``."""
    started = asyncio.create_task(handle.started.wait())
    try:
        done, _ = await asyncio.wait({started, watcher}, timeout=timeout if timeout > 0 else None,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        started.cancel()
    if not done and handle.future is not None and handle.future.cancel():
        raise APIError(503, f"relaygraph is busy: no worker was free for {timeout:g} s; "
                       "retry later", "server_error", code="queue_timeout",
                       headers={"Retry-After": "5"})


def _outcome(run: _Run) -> _Answer:
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
        raise _run_error(exc, run)
    answer: _Answer = future.result()
    return answer


def _run_error(exc: BaseException, run: _Run) -> APIError:
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


# --- responses -------------------------------------------------------------------------------

def _card(entry: ServedRelay) -> ModelCard:
    return ModelCard(id=entry.name, created=entry.created, relaygraph=entry.describe())


def _usage(run: _Run, answer: _Answer) -> Usage:
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


def _info(result: Any) -> RelayInfo:
    return RelayInfo(trajectory_id=result.trajectory_id, policy=result.policy,
                     answer=result.answer, finish_reason=result.finish_reason,
                     handoffs=result.handoffs,
                     handoff_records=[r.model_dump(by_alias=True) for r in result.handoff_records],
                     counters=result.counters, seconds=result.seconds)


def _finish(answer: _Answer) -> str:
    if answer.tool_calls:
        return "tool_calls"
    if answer.stop_reason is not None:
        return "stop"
    return openai_finish_reason(answer.result.finish_reason)


def _response(run: _Run, answer: _Answer) -> dict[str, Any]:
    result = answer.result
    finish = _finish(answer)
    _log_run(run, result, "ok")
    if run.kind == "chat":
        logprobs = {"content": answer.logprobs, "refusal": None} \
            if answer.logprobs is not None else None
        message = ChatMessageOut(content=answer.content, tool_calls=answer.tool_calls)
        return ChatCompletion(
            id=f"chatcmpl-{run.trajectory_id}", created=run.created, model=run.model,
            choices=[ChatChoice(message=message, finish_reason=finish, logprobs=logprobs,
                                stop_reason=answer.stop_reason)],
            usage=_usage(run, answer), relaygraph=_info(result)).model_dump()
    return Completion(
        id=f"cmpl-{run.trajectory_id}", created=run.created, model=run.model,
        choices=[CompletionChoice(text=answer.content or "", finish_reason=finish,
                                  stop_reason=answer.stop_reason)],
        usage=_usage(run, answer), relaygraph=_info(result)).model_dump()


def _log_run(run: _Run, result: Any, outcome: str) -> None:
    tokens = sum(result.tokens_by_agent.values()) if result is not None else 0
    log.info("%s model=%s trajectory=%s %s tokens=%d queued=%.2fs", run.kind, run.model,
             run.trajectory_id, outcome, tokens, run.handle.wait_seconds)


def _sse_data(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _chunk(run: _Run, piece: str | None = None, finish: str | None = None,
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


async def _sse(run: _Run, watcher: asyncio.Task) -> AsyncIterator[str]:
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
        yield _sse_data(_chunk(run, "", role=True,
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
                    yield _sse_data(_chunk(run, text[sent:upto],
                                           relaygraph={"agent": event["agent"]}))
                    sent = upto
            elif event.get("type") == "token":  # a supervisor's steer: guidance, not content
                yield _sse_data(_chunk(run, relaygraph={"event": {"type": "steer",
                                                                  "text": event["text"]}}))
            else:
                yield _sse_data(_chunk(run, relaygraph={"event": event}))
        try:
            answer = _outcome(run)
        except APIError as error:
            _log_run(run, None, f"error {error.code}")
            yield _sse_data(error.body())
            return
        result = answer.result
        if ask.buffered:
            if answer.content:
                yield _sse_data(_chunk(run, answer.content))
            if answer.tool_calls:
                yield _sse_data(_chunk(run, tool_calls=answer.tool_calls))
        elif not stopped and len(text) > sent:
            yield _sse_data(_chunk(run, text[sent:]))
        yield _sse_data(_chunk(run, finish=_finish(answer), stop_reason=answer.stop_reason,
                               relaygraph=_info(result).model_dump()))
        if run.include_usage:
            usage = _chunk(run)
            usage["choices"] = []
            usage["usage"] = _usage(run, answer).model_dump()
            yield _sse_data(usage)
        _log_run(run, result, "ok (stream)")
        yield "data: [DONE]\n\n"
    finally:
        watcher.cancel()
        if handle.future is not None and not handle.future.done():
            handle.cancel(run.scheduler.end_reason)
