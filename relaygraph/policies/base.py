"""The policy protocol: a stop rule inside generation, a route decision at the graph edge.

A policy is a plain object over named agents. For each turn the graph asks it for the
agent's **view** of the trajectory and a **stop rule** (applied token by token inside
generation), then hands it the generation to **route**: which segments to append and who
writes next. A policy with a ``review`` method also gets a ``supervisor`` node, visited
whenever ``route`` sends control to ``SUPERVISOR``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from relaygraph.agents.agent import Agent
from relaygraph.agents.backend import Generation, StopRule, TokenStep
from relaygraph.graphs.state import SUPERVISOR, RelayState
from relaygraph.trajectory.models import FinishReason, Segment, SegmentKind, active, retracted

__all__ = ["SUPERVISOR", "Decision", "Metric", "Policy", "SupervisedPolicy", "active", "end_or",
           "remaining", "retracted", "score", "segment", "split_tokens", "unconfident"]



@dataclass
class Decision:
    """What a policy decides after a turn: what to append, and who writes next.

    ``next=None`` ends the run. ``budget`` is the token budget of the next turn.
    ``counters`` are added to the run's counters (e.g. ``{"calls": 1}``); ``reason`` names
    the handoff (``call``, ``call_done``, ``eos``, ...); ``confidence`` is the score that
    triggered it, when a confidence check did.
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
    """Names of the agents taking part (graph nodes)."""
    primary: str
    """The agent whose tokens are not counted as help (the call ratio's complement)."""

    def first_turn(self, state: RelayState) -> tuple[str, int]:
        """Who writes first, with what token budget (``state`` has the question)."""
        ...

    def view(self, agent: str, segments: Sequence[Segment]) -> list[Segment]:
        """The part of the trajectory ``agent`` sees (retracted segments are already gone)."""
        ...

    def stop_rule(self, agent: str, state: RelayState) -> StopRule:
        """How ``agent``'s coming generation stops."""
        ...

    def route(self, agent: Agent, generation: Generation, state: RelayState) -> Decision:
        """Turn ``agent``'s generation into segments and choose the next writer."""
        ...


@runtime_checkable
class SupervisedPolicy(Policy, Protocol):
    """A policy whose supervisor reviews the trajectory between turns."""

    def review(self, segments: Sequence[Segment], state: RelayState) -> Decision:
        """Decide after a chunk: continue, switch, steer, roll back (retract) or stop."""
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


Metric = Literal["logprob", "entropy"]


def score(step: TokenStep, metric: Metric) -> float:
    """The token's confidence score under ``metric``."""
    return step.logprob if metric == "logprob" else step.entropy


def unconfident(value: float, threshold: float, metric: Metric) -> bool:
    """Log-prob below the threshold, or entropy above it."""
    return value < threshold if metric == "logprob" else value > threshold


def end_or(agent: Agent, generation: Generation, next_agent: str | None, budget: int,
           reason: str, **decision: Any) -> Decision:
    """Append the whole generation; end the run on EOS, else hand over to ``next_agent``."""
    seg = segment(agent, generation, finish_reason=generation.finish_reason)
    if generation.finish_reason == "eos" or next_agent is None:
        why = "eos" if generation.finish_reason == "eos" else reason
        return Decision([seg], None, reason=why, **decision)
    return Decision([seg], next_agent, budget=budget, reason=reason, **decision)
