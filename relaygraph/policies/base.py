"""The policy protocol: a stop rule inside generation, a route decision at the graph edge."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from relaygraph.agents.agent import Agent
from relaygraph.agents.backend import Generation, StopRule
from relaygraph.graphs.state import RelayState
from relaygraph.trajectory.models import FinishReason, Segment, SegmentKind


@dataclass
class Decision:
    """What a policy decides after a turn: what to append, and who writes next.

    ``next=None`` ends the run. ``counters`` are added to the run's counters (e.g.
    ``{"calls": 1}``); ``reason`` names the handoff (``call``, ``call_done``, ``eos``, ...);
    ``confidence`` is the score that triggered it, when a confidence check did.
    """

    segments: list[Segment]
    next: str | None
    budget: int = 0
    reason: str = ""
    counters: dict[str, int] = field(default_factory=dict)
    confidence: float | None = None


@runtime_checkable
class Policy(Protocol):
    """A router policy over named agents."""

    name: str
    agents: Sequence[str]
    """Names of the agents taking part; the first one writes first."""
    primary: str
    """The agent whose tokens are not counted as help (the call ratio's complement)."""

    def first_budget(self, state: RelayState) -> int:
        """Token budget of the first turn."""
        ...

    def view(self, agent: str, segments: Sequence[Segment]) -> list[Segment]:
        """The part of the trajectory ``agent`` sees."""
        ...

    def stop_rule(self, agent: str, state: RelayState) -> StopRule:
        """How ``agent``'s coming generation stops."""
        ...

    def route(self, agent: Agent, generation: Generation, state: RelayState) -> Decision:
        """Turn ``agent``'s generation into segments and choose the next writer."""
        ...


def remaining(state: RelayState) -> int:
    """Tokens left in the run's budget."""
    return max(0, state.get("max_tokens", 0) - state.get("generated", 0))


def segment(agent: Agent, generation: Generation, ids: Sequence[int] | None = None,
            logprobs: Sequence[float] | None = None, kind: SegmentKind = "text",
            finish_reason: FinishReason | None = None, **meta: Any) -> Segment:
    """A segment of ``agent``'s (part of a) generation, with text decoded from its ids."""
    ids = list(generation.token_ids if ids is None else ids)
    logprobs = list(generation.logprobs if logprobs is None else logprobs)
    text = generation.text if len(ids) == len(generation.token_ids) else agent.backend.decode(ids)
    return Segment(author=agent.name, kind=kind, text=text, token_ids=ids,
                   tokenizer=generation.tokenizer, logprobs=logprobs,
                   finish_reason=finish_reason, meta=meta)


def split_tokens(agent: Agent, token_ids: Sequence[int], char_index: int) -> int:
    """The most leading tokens whose decoded text ends at or before ``char_index``."""
    lo, hi = 0, len(token_ids)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(agent.backend.decode(token_ids[:mid])) <= char_index:
            lo = mid
        else:
            hi = mid - 1
    return lo
