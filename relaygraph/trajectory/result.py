"""What a run returns: :class:`RunResult`, folded from a trajectory's step records (the
one source of every number a run reports; the run itself, ``show``, ``resume`` and serve all
read it)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel

from relaygraph.trajectory.answers import extract_answer
from relaygraph.trajectory.models import Segment, Trajectory, active, reasoning_text
from relaygraph.trajectory.totals import HandoffRecord, tally


class SegmentSummary(BaseModel):
    author: str
    kind: str
    text: str
    n_tokens: int

    @classmethod
    def of(cls, segment: Segment) -> SegmentSummary:
        return cls(author=segment.author, kind=segment.kind, text=segment.text,
                   n_tokens=segment.n_tokens)


class RunResult(BaseModel):
    """What a run produced (the trajectory itself stays in the store)."""

    trajectory_id: str
    policy: str
    answer: str
    finish_reason: str
    segments: list[SegmentSummary]
    tokens_by_agent: dict[str, int]
    input_tokens_by_agent: dict[str, int] = {}
    """Prompt tokens each agent's generations read (what a hosted model bills as input)."""
    cost: float | None = None
    """What the run cost, from the agents' prices per million tokens (None: no prices set)."""
    cost_by_agent: dict[str, float] | None = None
    call_ratio: float
    """Tokens written by agents other than the policy's primary / all generated tokens."""
    handoffs: int
    handoff_records: list[HandoffRecord]
    counters: dict[str, int]
    seconds: float
    status: Literal["finished", "interrupted"] = "finished"
    """``interrupted``: a step asked for a human (``interrupt()``); ``Relay.resume(id, answer)``."""
    interrupt: Any = None
    """What the step asked (the ``interrupt()`` payload) when ``status`` is ``interrupted``."""
    thread_id: str | None = None
    """The checkpointer thread the run is on (None without a checkpointer)."""

    @classmethod
    def from_trajectory(cls, trajectory: Trajectory) -> RunResult:
        """What the run of a stored trajectory returned, read back from the store: every
        number folded from its step records (:func:`~relaygraph.trajectory.totals.tally`,
        as the run itself did), and the answer, wall time and thread recorded when it
        finished. For a finished run it equals the :class:`RunResult` the run returned;
        ``relaygraph show ID --json`` prints it."""
        task, segments, info = trajectory.task, trajectory.segments, trajectory.info
        agents = list(task.agents)
        totals, _ = tally(segments, agents)
        primary = task.primary or (agents[0] if agents else "")
        waiting = trajectory.status == "interrupted"
        interrupt: Any = None
        if waiting and info.get("interrupt"):
            try:
                interrupt = json.loads(info["interrupt"])
            except ValueError:
                interrupt = info["interrupt"]
        try:
            seconds = float(info.get("seconds") or 0.0)
        except ValueError:
            seconds = 0.0
        return cls(
            trajectory_id=trajectory.id, policy=task.policy,
            answer=extract_answer(reasoning_text(active(segments))),
            finish_reason=totals.finish_reason,
            segments=[SegmentSummary.of(s) for s in segments],
            tokens_by_agent=totals.tokens_by_agent,
            input_tokens_by_agent=totals.input_tokens_by_agent,
            cost=totals.cost(task.prices), cost_by_agent=totals.cost_by_agent(task.prices),
            call_ratio=totals.call_ratio(primary), handoffs=totals.handoffs,
            handoff_records=totals.records(), counters=totals.counters, seconds=seconds,
            status="interrupted" if waiting else "finished", interrupt=interrupt,
            thread_id=info.get("thread_id") or None,
        )
