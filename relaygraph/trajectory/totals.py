"""A run's numbers, computed once from its step records.

The graph adds each step's :class:`~relaygraph.trajectory.models.StepRecord` to the run's
:class:`Totals` as it goes; resume and every viewer fold the stored records with the same
:func:`tally`, so ``run``, ``show``, the HTML view, ``resume`` and a server's usage report
the same handoffs, tokens, counters, call ratio and finish reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from relaygraph.trajectory.models import Price, Segment, StepRecord, step_of

FINISH = "finish"
ENDINGS = ("eos", "stop", "budget", "empty")
"""Step reasons that end a run by themselves (others end it only when the budget is spent)."""


class HandoffRecord(BaseModel):
    """Control moving from one agent to another."""

    model_config = ConfigDict(populate_by_name=True)

    from_: str = Field(alias="from")
    to: str
    reason: str
    position: int
    """Number of segments in the trajectory when control moved."""
    requested_tokens: int | None = None
    confidence: float | None = None


@dataclass
class Totals:
    """What a run's steps add up to."""

    tokens_by_agent: dict[str, int] = field(default_factory=dict)
    input_tokens_by_agent: dict[str, int] = field(default_factory=dict)
    """Prompt tokens each agent's generations read (its billed input)."""
    counters: dict[str, int] = field(default_factory=dict)
    handoff_records: list[dict[str, Any]] = field(default_factory=list)
    """:class:`HandoffRecord` dumps (``from``, ``to``, ``reason``, ...), in order."""
    finish_reason: str = ""
    turn: str = ""
    """Who writes next after the last step (``finish`` once the run is over)."""
    budget: int = 0

    @property
    def generated(self) -> int:
        return sum(self.tokens_by_agent.values())

    @property
    def handoffs(self) -> int:
        return len(self.handoff_records)

    def records(self) -> list[HandoffRecord]:
        return [HandoffRecord.model_validate(h) for h in self.handoff_records]

    def call_ratio(self, primary: str) -> float:
        """Tokens written by agents other than ``primary`` / all generated tokens."""
        total = self.generated
        return (total - self.tokens_by_agent.get(primary, 0)) / total if total else 0.0

    def cost_by_agent(self, prices: Mapping[str, Price]) -> dict[str, float] | None:
        """Money each priced agent's tokens cost (None when no agent has a price)."""
        if not prices:
            return None
        return {name: price.cost(self.input_tokens_by_agent.get(name, 0),
                                 self.tokens_by_agent.get(name, 0))
                for name, price in prices.items()}

    def cost(self, prices: Mapping[str, Price]) -> float | None:
        """What the run cost: the sum over priced agents (None when no agent has a price)."""
        by_agent = self.cost_by_agent(prices)
        return None if by_agent is None else sum(by_agent.values())

    def add(self, step: StepRecord, position: int, max_tokens: int | None = None) -> None:
        """Count one step whose last segment ends before ``position``."""
        if step.tokens:
            self.tokens_by_agent[step.author] = self.tokens_by_agent.get(step.author, 0) + step.tokens
        if step.input_tokens:
            self.input_tokens_by_agent[step.author] = (
                self.input_tokens_by_agent.get(step.author, 0) + step.input_tokens)
        for key, value in step.counters.items():
            self.counters[key] = self.counters.get(key, 0) + value
        if step.moved:
            self.handoff_records.append({
                "from": step.author, "to": step.to, "reason": step.reason,
                "position": position, "requested_tokens": step.budget,
                "confidence": step.confidence})
        self.turn, self.budget = step.to, step.budget
        if step.to == FINISH:
            self.finish_reason = step.reason

    @classmethod
    def from_state(cls, state: Any) -> Totals:
        return cls(tokens_by_agent=dict(state.get("tokens_by_agent") or {}),
                   input_tokens_by_agent=dict(state.get("input_tokens_by_agent") or {}),
                   counters=dict(state.get("counters") or {}),
                   handoff_records=list(state.get("handoff_records") or ()),
                   finish_reason=state.get("finish_reason") or "", turn=state.get("turn", ""),
                   budget=state.get("budget", 0))


def tally(segments: Sequence[Segment], agents: Sequence[str] = ()) -> tuple[Totals, int]:
    """The totals of the completed steps of ``segments`` and how many segments they span
    (segments after that belong to a step that did not complete: a crash between its
    appends). ``agents`` are listed in ``tokens_by_agent`` even if they wrote nothing."""
    totals = Totals(tokens_by_agent={a: 0 for a in agents},
                    input_tokens_by_agent={a: 0 for a in agents})
    done = 0
    for position, seg in enumerate(segments, start=1):
        step = step_of(seg)
        if step is not None:
            totals.add(step, position)
            done = position
    return totals, done
