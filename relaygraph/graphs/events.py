"""What a run streams while it goes (LangGraph ``stream_mode="custom"``, ``Relay.run``'s
``on_event``, ``Relay.stream`` / ``Relay.astream``): plain dicts with a ``type`` key, typed
here. ``Relay.stream`` and ``Relay.astream`` end with a :class:`ResultEvent`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Literal

from typing_extensions import TypedDict


class TokenEvent(TypedDict):
    """A piece of text an agent (or the supervisor's steer) wrote."""

    type: Literal["token"]
    agent: str
    text: str


# functional form: "from" is a keyword
HandoffEvent = TypedDict("HandoffEvent", {
    "type": Literal["handoff"], "from": str, "to": str, "reason": str, "position": int,
    "requested_tokens": int, "confidence": "float | None", "policy": str, "moved": bool})
"""A step's outcome: control moves (``moved``) or the run ends (``to == "finish"``)."""


class ReviewEvent(TypedDict):
    """A supervisor's verdict other than ``continue``."""

    type: Literal["review"]
    action: str
    worker: str
    position: int
    score: float | None


class RetryEvent(TypedDict):
    """A failed generation that is tried again."""

    type: Literal["retry"]
    agent: str
    error: str


class FallbackEvent(TypedDict):
    """An agent's backend kept failing; another agent's model writes its turn."""

    type: Literal["fallback"]
    agent: str
    to: str
    error: str


class ResultEvent(TypedDict):
    """The last event of ``Relay.stream`` / ``Relay.astream``: the run's
    :class:`~relaygraph.relay.RunResult` (``status`` says if it waits for a human)."""

    type: Literal["result"]
    result: Any


Event = TokenEvent | HandoffEvent | ReviewEvent | RetryEvent | FallbackEvent | ResultEvent


# --- where a step's events go ----------------------------------------------------------------

Sink = Callable[[dict[str, Any]], None]
_sink: ContextVar[Sink | None] = ContextVar("relaygraph_event_sink", default=None)


def _drop(event: dict[str, Any]) -> None:
    """Events nobody listens to."""


@contextmanager
def delivered_to(callback: Sink | None) -> Iterator[None]:
    """Steps run under this deliver their events straight to ``callback`` (None: nowhere),
    on the step's own thread, instead of LangGraph's ``custom`` stream.

    ``Relay.run`` uses it to run its graph in the caller's thread with only the ``values``
    stream: LangGraph then runs each step inline, with no hop to an executor thread per
    step and per token (``stream_mode="custom"`` makes it run steps on a worker thread so
    it can yield while they work)."""
    token = _sink.set(callback or _drop)
    try:
        yield
    finally:
        _sink.reset(token)


@contextmanager
def streamed() -> Iterator[None]:
    """Steps run under this write to LangGraph's ``custom`` stream (a graph run inside a
    step of another relay does not send its events to the outer run's callback)."""
    token = _sink.set(None)
    try:
        yield
    finally:
        _sink.reset(token)


def writer() -> Sink:
    """Where the current step's events go: the callback of :func:`delivered_to`, else
    LangGraph's stream writer (``stream_mode="custom"``; a no-op when nobody streams)."""
    sink = _sink.get()
    if sink is not None:
        return sink
    from langgraph.config import get_stream_writer

    return get_stream_writer()
