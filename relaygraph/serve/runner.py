"""Running relays for a server: a bounded worker pool, backpressure and cancellation.

``Relay.run`` is synchronous; a request runs it on one of ``concurrency`` worker threads.
At most ``concurrency + max_queue`` requests are admitted at once (the rest get a 429), and
a request that waits longer than ``queue_timeout`` for a worker gets a 503.

Cancellation (a client disconnects, the server shuts down) cancels the run's
:class:`~relaygraph.agents.wrapping.CancelScope`, which stops generation at the next
token: every backend a server loads is a
:class:`~relaygraph.agents.wrapping.CancellableBackend` that finds the scope of the run it
serves through a context variable (LangGraph copies it into its node threads) and raises
:class:`~relaygraph.errors.Cancelled`. The interrupted turn is dropped, every turn that
completed stays in the store, and the trajectory's status becomes ``cancelled`` (with a
``cancel_reason``), so it reads as consistent as a crash at a step boundary would (and
``relaygraph resume`` can continue it).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from relaygraph.agents.backend import Backend
from relaygraph.agents.wrapping import CancellableBackend, CancelScope
from relaygraph.errors import Cancelled
from relaygraph.trajectory.store import SharedStore

log = logging.getLogger("relaygraph.serve")


_current: contextvars.ContextVar[CancelScope | None] = contextvars.ContextVar(
    "relaygraph_serve_run", default=None)


def cancellable(backend: Backend) -> Backend:
    """``backend`` made cancellable by the scope of the served run calling it."""
    return CancellableBackend(backend, _current.get)


class ServerBusy(Exception):
    """No room: ``concurrency`` runs are running and ``max_queue`` are waiting."""


class ServerClosing(Exception):
    """The server is shutting down and takes no new runs."""


class RunHandle:
    """One admitted request: its run's control, its events, and its outcome."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stream: bool,
                 trajectory_id: str = "") -> None:
        self.loop = loop
        self.trajectory_id = trajectory_id
        self.control = CancelScope()
        self.events: asyncio.Queue[Any] | None = asyncio.Queue() if stream else None
        self.started = asyncio.Event()
        self.future: Future[Any] | None = None
        self.submitted = time.perf_counter()
        self.started_at: float | None = None

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def emit(self, event: dict[str, Any]) -> None:
        """``Relay.run``'s ``on_event`` (called on the worker thread)."""
        if self.events is not None:
            self._post(self.events.put_nowait, event)

    def cancel(self, reason: str) -> None:
        """Stop the run at its next token; a run still waiting in the queue never starts."""
        self.control.cancel(reason)
        if self.future is not None:
            self.future.cancel()

    @property
    def wait_seconds(self) -> float:
        return (self.started_at or time.perf_counter()) - self.submitted


DONE = object()
"""Put on a streaming handle's event queue after its run ended (either way)."""


class Scheduler:
    """A bounded pool of worker threads running relays, with admission control."""

    def __init__(self, concurrency: int = 4, max_queue: int = 64) -> None:
        if concurrency < 1 or max_queue < 0:
            raise ValueError("concurrency must be >= 1 and max_queue >= 0")
        self.concurrency = concurrency
        self.max_queue = max_queue
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="relaygraph-run")
        self._lock = threading.Lock()
        self._admitted: set[RunHandle] = set()
        self._running = 0
        self._reserved = 0
        self.closing = False
        """Set when the server begins to shut down: no new runs; a request that ends now
        cancels its run for that reason rather than for a client disconnect."""

    @property
    def end_reason(self) -> str:
        """Why a request that ends before its run is cancelling the run."""
        return "server shutdown" if self.closing else "client disconnected"

    @property
    def capacity(self) -> int:
        return self.concurrency + self.max_queue

    def stats(self) -> dict[str, int]:
        with self._lock:
            running = self._running
            return {"running": running,
                    "queued": len(self._admitted) + self._reserved - running,
                    "concurrency": self.concurrency, "max_queue": self.max_queue}

    @contextmanager
    def admission(self) -> Iterator[None]:
        """A place among the admitted requests, held while a request is prepared (its prompt
        tokenized) and then passed to :meth:`submit` inside the block: the work of requests
        beyond the capacity is never done. Raises :class:`ServerBusy` or
        :class:`ServerClosing`."""
        with self._lock:
            self._check()
            self._reserved += 1
        try:
            yield
        finally:
            with self._lock:
                self._reserved -= 1

    def _check(self, reserved: int = 0) -> None:
        if self.closing:
            raise ServerClosing()
        if len(self._admitted) + self._reserved - reserved >= self.capacity:
            raise ServerBusy()

    def submit(self, handle: RunHandle, work: Callable[[], Any],
               admitted: bool = False) -> Future[Any]:
        """Queue ``work`` for ``handle``, or raise :class:`ServerBusy` or
        :class:`ServerClosing`; ``admitted``: inside an :meth:`admission` block (its place)."""
        with self._lock:
            self._check(1 if admitted else 0)
            self._admitted.add(handle)

        def job() -> Any:
            with self._lock:
                self._running += 1
            handle.started_at = time.perf_counter()
            handle._post(handle.started.set)
            try:
                return work()
            finally:
                with self._lock:
                    self._running -= 1

        future = self._pool.submit(job)
        handle.future = future

        def done(_: Future[Any]) -> None:
            with self._lock:
                self._admitted.discard(handle)
            if handle.events is not None:
                handle._post(handle.events.put_nowait, DONE)
            handle._post(handle.started.set)  # wake a waiter if the job was cancelled unstarted

        future.add_done_callback(done)
        return future

    def handles(self) -> dict[str, RunHandle]:
        """Admitted runs (running or queued) by trajectory id."""
        with self._lock:
            return {h.trajectory_id: h for h in self._admitted if h.trajectory_id}

    def keepalive(self, store: Any) -> None:
        """One heartbeat: mark this server's trajectories as held (refreshing their TTL) and
        cancel those whose cancellation was requested through any replica."""
        handles = self.handles()
        if not handles or not isinstance(store, SharedStore):
            return
        for tid, reason in store.keepalive(list(handles)).items():
            if reason:
                handles[tid].cancel(reason)

    def shutdown(self, reason: str = "server shutdown", timeout: float = 10.0) -> None:
        """Cancel every admitted run and wait (bounded) for the workers to stop."""
        with self._lock:
            self.closing = True
            handles = list(self._admitted)
        for handle in handles:
            handle.cancel(reason)
        futures = [h.future for h in handles if h.future is not None]
        deadline = time.monotonic() + timeout
        for future in futures:
            try:
                future.exception(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - logged; the server keeps serving
                pass
        self._pool.shutdown(wait=False, cancel_futures=True)


def run_relay(relay: Any, handle: RunHandle, question: str, trajectory_id: str,
              parent_context: Any = None, prefix: Any = ()) -> Any:
    """The work of one request (on a worker thread): ``relay.run`` under the request's
    control and trace context; a cancelled run's trajectory is marked ``cancelled``."""
    from opentelemetry import context as otel_context

    control = handle.control
    token = _current.set(control)
    otel_token = otel_context.attach(parent_context) if parent_context is not None else None
    try:
        control.check()  # cancelled while queued: nothing is written
        return relay.run(question, trajectory_id=trajectory_id, on_event=handle.emit,
                         prefix=prefix)
    except Cancelled as exc:
        _mark_cancelled(relay.store, trajectory_id, exc.reason)
        raise
    finally:
        if otel_token is not None:
            otel_context.detach(otel_token)
        _current.reset(token)
        for backend, key in control.cache_keys:  # a served run is never continued in place
            backend.drop_cache(key)


def _mark_cancelled(store: Any, trajectory_id: str, reason: str) -> None:
    try:
        if store.exists(trajectory_id):
            store.set_status(trajectory_id, "cancelled", cancel_reason=reason)
    except Exception as exc:  # noqa: BLE001 - logged; the server keeps serving
        log.warning("could not mark trajectory %s cancelled (%s)", trajectory_id,
                    type(exc).__name__)
