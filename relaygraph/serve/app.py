"""The ASGI app: relays as OpenAI-compatible models.

``create_app(registry, settings)`` serves ``POST /v1/chat/completions`` and
``POST /v1/completions`` (both streaming over SSE or not), ``GET /v1/models[/{id}]`` and
``GET /health``. Each request is one relay run (one trajectory, one trace): the ``model``
field picks the relay, the last user message is the question, and the response carries
the trajectory id (``relaygraph.trajectory_id`` and the ``X-Relaygraph-Trajectory-Id``
header) for ``relaygraph show``.

Trajectories belong to the store, not to a process, so replicas on one store behave as one
server: ``GET /v1/trajectories/{id}`` shows any trajectory, ``POST .../cancel`` stops it
wherever it runs (the replica running it sees the request at its next heartbeat), and
``POST .../resume`` continues an interrupted one on this replica.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from relaygraph.serve import agentic
from relaygraph.serve.exchange import Answer, Ask, Run, card, log_run, outcome, response, sse
from relaygraph.serve.guard import HostGuard
from relaygraph.serve.registry import Registry, ServedRelay
from relaygraph.serve.requests import chat_question, parse, read_json
from relaygraph.serve.runner import (
    RunHandle,
    Scheduler,
    ServerBusy,
    ServerClosing,
    run_relay,
)
from relaygraph.serve.schemas import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    ModelList,
    bad_request,
)
from relaygraph.serve.trajectories import Resume, check_id, store_call, trajectory_view
from relaygraph.trajectory.models import Segment, active, new_trajectory_id
from relaygraph.trajectory.store import SharedStore

log = logging.getLogger("relaygraph.serve")
TRAJECTORY_HEADER = "X-Relaygraph-Trajectory-Id"
HEALTH_TIMEOUT = 2.0


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
    allowed_hosts: tuple[str, ...] = ()
    """Names besides the server's own address that requests may give as ``Host`` (and
    pages on them as ``Origin``); ``*``: any ``Host`` (behind a proxy that checks it)."""
    heartbeat: float = 1.0
    """Seconds between heartbeats: this server marks the trajectories it runs as held (and
    refreshes their TTL) and picks up cancellations requested through other replicas."""


def create_app(registry: Registry, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app serving ``registry``'s relays (models must already be loaded)."""
    from contextlib import asynccontextmanager

    settings = settings or ServeSettings()
    scheduler = Scheduler(settings.concurrency, settings.max_queue)

    async def keeper() -> None:
        while True:
            await asyncio.sleep(settings.heartbeat)
            try:
                await asyncio.to_thread(scheduler.keepalive, registry.store)
            except Exception as exc:  # noqa: BLE001 - a store hiccup: the next beat retries
                log.warning("heartbeat failed (%s); retrying", type(exc).__name__)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        beating = asyncio.create_task(keeper())
        yield
        beating.cancel()
        await asyncio.to_thread(scheduler.shutdown)

    app = FastAPI(title="relaygraph", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(HostGuard, allowed_hosts=settings.allowed_hosts)
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
    async def health() -> JSONResponse:
        """``ok`` only when the store answers (in 2 s): a server without its store cannot run
        or show anything, so a load balancer should take it out (503)."""
        store = "ok"
        try:
            if registry.store is None:
                raise LookupError("no store")
            await asyncio.wait_for(asyncio.to_thread(registry.store.exists, "health-check"),
                                   HEALTH_TIMEOUT)
        except Exception:  # noqa: BLE001 - any failure to answer is "unavailable"
            store = "unavailable"
        body = {"status": "ok" if store == "ok" else "unavailable", "store": store,
                "relays": list(registry.relays), **scheduler.stats()}
        return JSONResponse(body, status_code=200 if store == "ok" else 503)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        authorize(request)
        cards = [card(entry) for entry in registry.relays.values()]
        return ModelList(data=cards).model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        authorize(request)
        return card(registry.get(model_id)).model_dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        req = parse(ChatCompletionRequest, await read_json(request, settings.max_request_bytes))
        if error := req.unsupported():
            raise error
        entry = registry.get(req.model)
        question, system, prefix = chat_question(req)
        ask = Ask(req.stops, prefix, req.tools, req.tool_choice, req.response_format,
                   bool(req.logprobs))
        return await _serve(request, entry, req, question, system, "chat", ask)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        req = parse(CompletionRequest, await read_json(request, settings.max_request_bytes))
        if error := req.unsupported():
            raise error
        entry = registry.get(req.model)
        question = req.question()
        if not question.strip():
            raise bad_request("The prompt is empty", "prompt", "invalid_value")
        return await _serve(request, entry, req, question, None, "completion", Ask(req.stops))

    def shared_store() -> SharedStore:
        if not isinstance(registry.store, SharedStore):
            raise APIError(501, "this server's trajectory store cannot be shared by replicas",
                           "server_error", code="not_supported")
        return registry.store

    @app.get("/v1/trajectories/{trajectory_id}")
    async def show_trajectory(trajectory_id: str, request: Request) -> dict[str, Any]:
        authorize(request)
        return await asyncio.to_thread(trajectory_view, shared_store(),
                                       check_id(trajectory_id))

    @app.post("/v1/trajectories/{trajectory_id}/cancel")
    async def cancel_trajectory(trajectory_id: str, request: Request) -> JSONResponse:
        authorize(request)
        tid = check_id(trajectory_id)
        body = await read_json(request, settings.max_request_bytes, optional=True)
        reason = body.get("reason", "cancelled through the API")
        if not isinstance(reason, str) or not 0 < len(reason) <= 200:
            raise bad_request("reason must be a string of 1-200 characters", "reason",
                              "invalid_value")
        store = shared_store()
        local = scheduler.handles().get(tid)
        if local is not None:
            local.cancel(reason)
            return JSONResponse({"id": tid, "status": "cancelling"}, status_code=202)
        status = await asyncio.to_thread(store_call, store.request_cancel, tid, reason)
        if status != "running":
            raise APIError(409, f"trajectory {tid} is {status}, not running: nothing to "
                           "cancel", code="not_running")
        if await asyncio.to_thread(store_call, store.held, tid):
            return JSONResponse({"id": tid, "status": "cancelling"}, status_code=202)
        # nobody runs it (its server died): it is cancelled as it stands
        await asyncio.to_thread(store_call, store.set_status, tid, "cancelled",
                                cancel_reason=reason)
        return JSONResponse({"id": tid, "status": "cancelled"})

    @app.post("/v1/trajectories/{trajectory_id}/resume")
    async def resume_trajectory(trajectory_id: str, request: Request) -> Response:
        authorize(request)
        tid = check_id(trajectory_id)
        store = shared_store()
        task = (await asyncio.to_thread(store_call, store.load, tid)).task
        relay = registry.for_trajectory(task.config, tid)
        entry = registry.get(task.config["serve"]["model"])
        status = await asyncio.to_thread(store_call, store.claim, tid)
        if status is None or tid in scheduler.handles():
            raise APIError(409, f"trajectory {tid} is running on a replica now; cancel it "
                           "first or wait for it to end", code="running_elsewhere")
        if status != "finished":
            done = await _serve(request, entry, Resume(model=entry.name), task.question, None,
                                "resume", Ask([]), relay, tid)
            if done.status_code == 499:
                return done
        return JSONResponse(await asyncio.to_thread(trajectory_view, store, tid),
                            headers={TRAJECTORY_HEADER: tid})

    async def _serve(request: Request, entry: ServedRelay, req: Any, question: str,
                     system: str | None, kind: str, ask: Ask, relay: Any = None,
                     trajectory_id: str | None = None) -> Response:
        if relay is None:
            tools = (agentic.tools_prompt(ask.tools or [], ask.tool_choice) if ask.calls_tools
                     else None)
            relay = entry.variant(max_tokens=req.budget, temperature=req.temperature,
                                  top_p=req.top_p, seed=req.seed, system=system,
                                  policy=req.relaygraph.policy, tools=tools)
        tid = trajectory_id or new_trajectory_id()
        handle = RunHandle(asyncio.get_running_loop(), stream=req.stream, trajectory_id=tid)
        parent = trace_parent(request)
        store = entry.store

        def work() -> Answer:
            given = [Segment(author="caller", text=ask.prefix)] if ask.prefix else []
            result = run_relay(relay, handle, question, tid, parent, given)
            segments = [s for s in active(store.read(tid)) if not s.meta.get("given")]
            return _answer(entry, relay, ask, question, result, segments)

        try:
            with scheduler.admission():  # admitted before its prompt is tokenized
                prompt_tokens, room = await asyncio.to_thread(entry.prompt_tokens, relay,
                                                              question)
                if room is not None and room < 1:
                    raise APIError(400, f"The prompt ({prompt_tokens} tokens) does not fit the "
                                   "context window of this relay's models; shorten it",
                                   param="messages" if kind == "chat" else "prompt",
                                   code="context_length_exceeded")
                scheduler.submit(handle, work, admitted=True)
        except ServerBusy:
            stats = scheduler.stats()
            raise APIError(429, f"relaygraph is at capacity ({stats['running']} runs, "
                           f"{stats['queued']} queued); retry shortly", "rate_limit_error",
                           code="server_busy", headers={"Retry-After": "1"}) from None
        except ServerClosing:
            raise APIError(503, "The server is shutting down", "server_error",
                           code="shutting_down") from None
        run = Run(entry, handle, tid, prompt_tokens, req.model, kind, req.include_usage,
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
                sse(run, watcher), media_type="text/event-stream",
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
            answer = outcome(run)
        except APIError as error:
            log_run(run, None, f"error {error.code}")
            raise
        if kind == "resume":
            log_run(run, answer.result, "ok")
            return Response(status_code=204, headers=headers)
        return JSONResponse(response(run, answer), headers=headers)

    return app


def _answer(entry: ServedRelay, relay: Any, ask: Ask, question: str, result: Any,
            segments: list[Segment]) -> Answer:
    """The content of a finished run as the request asked for it (on the worker thread)."""
    text = "".join(s.text for s in segments if s.kind in ("text", "call"))
    content, stop_reason = agentic.cut_at_stop(text, ask.stops)
    answer = Answer(result, content, stop_reason)
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


def trace_parent(request: Request) -> Any:
    """The caller's trace context (W3C ``traceparent``), so the run joins the caller's trace."""
    if "traceparent" not in request.headers:
        return None
    from opentelemetry import propagate

    return propagate.extract(dict(request.headers))


async def _watch_disconnect(request: Request, run: Run) -> None:
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
