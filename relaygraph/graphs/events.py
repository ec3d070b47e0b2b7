"""What a run streams while it goes (LangGraph ``stream_mode="custom"``, ``Relay.run``'s
``on_event``, ``Relay.stream`` / ``Relay.astream``): plain dicts with a ``type`` key, typed
here. ``Relay.stream`` and ``Relay.astream`` end with a :class:`ResultEvent`."""

from __future__ import annotations

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
