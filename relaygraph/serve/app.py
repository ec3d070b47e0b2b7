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
from relaygraph.graphs.chat import transcript
from relaygraph.policies.base import SUPERVISOR
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
    Usage,
    bad_request,
    openai_finish_reason,
    validation_error,
)
from relaygraph.trajectory.models import active, new_trajectory_id

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
        question, system = _chat_question(req)
        return await _serve(request, entry, req, question, system, "chat")

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
        return await _serve(request, entry, req, question, None, "completion")

    async def _serve(request: Request, entry: ServedRelay, req: Any, question: str,
                     system: str | None, kind: str) -> Response:
        relay = entry.variant(max_tokens=req.budget, temperature=req.temperature,
                              top_p=req.top_p, seed=req.seed, system=system,
                              policy=req.relaygraph.policy)
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

        def work() -> tuple[Any, str]:
            result = run_relay(relay, handle, question, tid, parent)
            segments = active(store.read(tid))
            return result, "".join(s.text for s in segments if s.kind in ("text", "call"))

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
                   int(time.time()), scheduler)
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
            result, content = _outcome(run)
        except APIError as error:
            _log_run(run, None, f"error {error.code}")
            raise
        return JSONResponse(_response(run, result, content), headers=headers)

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


def _chat_question(req: ChatCompletionRequest) -> tuple[str, str | None]:
    """The question (the last user message; earlier turns become a transcript before it) and
    the system text (system and developer messages, joined)."""
    system: list[str] = []
    turns: list[tuple[str, str, int]] = []
    for i, message in enumerate(req.messages):
        where = f"messages.{i}"
        if message.role in ("tool", "function"):
            raise bad_request(f"'{message.role}' messages are not supported: a relay has no "
                              "tools", f"{where}.role", "unsupported_message")
        extra = message.model_extra or {}
        if extra.get("tool_calls") or extra.get("function_call"):
            raise bad_request("Tool calls are not supported: a relay has no tools",
                              f"{where}.tool_calls", "unsupported_message")
        text = message.text(where)
        if message.role in ("system", "developer"):
            if text.strip():
                system.append(text)
        else:
            turns.append((message.role, text, i))
    if not turns or turns[-1][0] != "user":
        raise bad_request("The last message must be a user message: it is the question the "
                          "relay answers", "messages", "invalid_value")
    _, question, index = turns[-1]
    if not question.strip():
        raise bad_request("The question (the last user message) is empty",
                          f"messages.{index}.content", "invalid_value")
    if len(turns) > 1:  # the same transcript a relay graph makes of a thread's earlier turns
        question = transcript([(role, text) for role, text, _ in turns])
    return question, ("\n\n".join(system) if system else None)


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


def _outcome(run: _Run) -> tuple[Any, str]:
    """The run's (result, content), or the APIError that answers its failure."""
    future = run.handle.future
    assert future is not None
    if future.cancelled():
        raise APIError(503, "The server is shutting down; the request was not run",
                       "server_error", code="shutting_down")
    exc = future.exception()
    if exc is not None:
        raise _run_error(exc, run)
    return future.result()


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


def _usage(run: _Run, result: Any) -> Usage:
    completion = sum(result.tokens_by_agent.values())
    return Usage(prompt_tokens=run.prompt_tokens, completion_tokens=completion,
                 total_tokens=run.prompt_tokens + completion,
                 relaygraph=RelayUsage(tokens_by_agent=result.tokens_by_agent,
                                       call_ratio=result.call_ratio, handoffs=result.handoffs))


def _info(result: Any) -> RelayInfo:
    return RelayInfo(trajectory_id=result.trajectory_id, policy=result.policy,
                     answer=result.answer, finish_reason=result.finish_reason,
                     handoffs=result.handoffs,
                     handoff_records=[r.model_dump(by_alias=True) for r in result.handoff_records],
                     counters=result.counters, seconds=result.seconds)


def _response(run: _Run, result: Any, content: str) -> dict[str, Any]:
    finish = openai_finish_reason(result.finish_reason)
    _log_run(run, result, "ok")
    if run.kind == "chat":
        return ChatCompletion(
            id=f"chatcmpl-{run.trajectory_id}", created=run.created, model=run.model,
            choices=[ChatChoice(message=ChatMessageOut(content=content), finish_reason=finish)],
            usage=_usage(run, result), relaygraph=_info(result)).model_dump()
    return Completion(
        id=f"cmpl-{run.trajectory_id}", created=run.created, model=run.model,
        choices=[CompletionChoice(text=content, finish_reason=finish)],
        usage=_usage(run, result), relaygraph=_info(result)).model_dump()


def _log_run(run: _Run, result: Any, outcome: str) -> None:
    tokens = sum(result.tokens_by_agent.values()) if result is not None else 0
    log.info("%s model=%s trajectory=%s %s tokens=%d queued=%.2fs", run.kind, run.model,
             run.trajectory_id, outcome, tokens, run.handle.wait_seconds)


def _sse_data(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _chunk(run: _Run, piece: str | None = None, finish: str | None = None,
           relaygraph: dict[str, Any] | None = None, role: bool = False) -> dict[str, Any]:
    if run.kind == "chat":
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if piece is not None:
            delta["content"] = piece
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None,
                                  "finish_reason": finish}
        chunk = {"id": f"chatcmpl-{run.trajectory_id}", "object": "chat.completion.chunk",
                 "created": run.created, "model": run.model, "system_fingerprint": None,
                 "choices": [choice]}
    else:
        chunk = {"id": f"cmpl-{run.trajectory_id}", "object": "text_completion",
                 "created": run.created, "model": run.model, "system_fingerprint": None,
                 "choices": [{"index": 0, "text": piece or "", "logprobs": None,
                              "finish_reason": finish}]}
    if relaygraph is not None:
        chunk["relaygraph"] = relaygraph
    return chunk


async def _sse(run: _Run, watcher: asyncio.Task) -> AsyncIterator[str]:
    """The run's events as OpenAI stream chunks: one per token (``relaygraph.agent`` says
    who wrote it), handoffs and reviews as chunks with an empty delta and a
    ``relaygraph.event``, then the finish chunk, the usage chunk if asked, ``[DONE]``."""
    handle = run.handle
    assert handle.events is not None
    try:
        yield _sse_data(_chunk(run, "", role=True,
                               relaygraph={"trajectory_id": run.trajectory_id}))
        while True:
            event = await handle.events.get()
            if event is DONE:
                break
            if event.get("type") == "token" and event.get("agent") != SUPERVISOR:
                yield _sse_data(_chunk(run, event["text"],
                                       relaygraph={"agent": event["agent"]}))
            elif event.get("type") == "token":  # a supervisor's steer: guidance, not content
                yield _sse_data(_chunk(run, relaygraph={"event": {"type": "steer",
                                                                  "text": event["text"]}}))
            else:
                yield _sse_data(_chunk(run, relaygraph={"event": event}))
        try:
            result, _ = _outcome(run)
        except APIError as error:
            _log_run(run, None, f"error {error.code}")
            yield _sse_data(error.body())
            return
        finish = openai_finish_reason(result.finish_reason)
        yield _sse_data(_chunk(run, finish=finish, relaygraph=_info(result).model_dump()))
        if run.include_usage:
            usage = _chunk(run)
            usage["choices"] = []
            usage["usage"] = _usage(run, result).model_dump()
            yield _sse_data(usage)
        _log_run(run, result, "ok (stream)")
        yield "data: [DONE]\n\n"
    finally:
        watcher.cancel()
        if handle.future is not None and not handle.future.done():
            handle.cancel(run.scheduler.end_reason)
