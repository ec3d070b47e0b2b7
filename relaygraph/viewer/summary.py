"""What a stored trajectory says about its run: handoffs, totals, per-token confidence.

Shared by the terminal and HTML viewers. The last segment of each graph step carries the
step's outcome in ``meta["step"]`` (``to``, ``reason``, ``budget``, ...: what the policy
decided), so handoffs are shown exactly as they happened. For segments without it (older
trajectories, a supervisor decision that appended nothing) the handoff is inferred: a
granted call command (``call``), a turn that used up its grant (``call_done``), a refused
low-confidence token (``low_confidence``), a supervisor's rollback or switch, or the
segment's finish reason.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from relaygraph.trajectory.models import Segment, Trajectory

SUPERVISOR = "supervisor"
WORK_KINDS = ("text", "call")
ENDINGS = ("eos", "stop", "budget", "empty")
"""Step reasons that end a run by themselves (others end it only when the budget is spent)."""


@dataclass
class Handoff:
    """Control moving from one writer to another before segment ``position``."""

    position: int
    from_: str
    to: str
    reason: str
    requested_tokens: int | None = None
    confidence: float | None = None
    note: str = ""

    @property
    def label(self) -> str:
        extra = f", {self.requested_tokens} tokens" if self.reason == "call" and \
            self.requested_tokens else ""
        return f"{self.from_}→{self.to}: {self.reason}{extra}"


@dataclass
class Totals:
    tokens_by_agent: dict[str, int] = field(default_factory=dict)
    total_tokens: int = 0
    call_ratio: float = 0.0
    """Tokens written by agents other than the primary (the first agent) / all tokens."""
    handoffs: int = 0
    segments: int = 0
    retracted: int = 0
    mean_prob_by_agent: dict[str, float] = field(default_factory=dict)
    """Mean per-token probability (exp of the log-prob) of each agent's tokens."""
    low_tokens: int = 0
    """Tokens with probability below 0.5."""
    answer: str = ""
    finish_reason: str = ""
    """Why the run ended (the last step's reason), when recorded."""


def retracted_positions(segments: Sequence[Segment]) -> set[int]:
    return {seq for s in segments if s.kind == "retract" for seq in s.meta.get("retracts", ())}


def step_of(seg: Segment) -> dict[str, Any] | None:
    """The graph step record on a segment (``meta["step"]``), if it has one."""
    step = seg.meta.get("step")
    return step if isinstance(step, dict) and step.get("to") else None


class HandoffTracker:
    """Finds handoffs one segment at a time (for a trajectory that is still growing)."""

    def __init__(self) -> None:
        self.last: Segment | None = None
        self.called = False  # the current writer's turn began with a granted call
        self.between: list[Segment] = []  # supervisor segments since the last worker one

    def push(self, position: int, seg: Segment) -> Handoff | None:
        if seg.kind not in WORK_KINDS or seg.author == SUPERVISOR:
            self.between.append(seg)
            return None
        handoff = None
        prev = self.last
        if prev is not None and prev.author != seg.author:
            handoff = _handoff(position, prev, seg.author, self.called, self.between)
            self.called = prev.kind == "call" and bool(prev.meta.get("granted"))
        self.last = seg
        self.between = []
        return handoff


def infer_handoffs(segments: Sequence[Segment]) -> list[Handoff]:
    """Handoffs between writers, in order (see the module docstring)."""
    tracker = HandoffTracker()
    return [h for i, s in enumerate(segments) if (h := tracker.push(i, s)) is not None]


def _handoff(position: int, prev: Segment, to: str, called: bool,
             between: list[Segment]) -> Handoff:
    for seg in [*reversed(between), prev]:  # the decision that sent control to ``to``
        step = step_of(seg)
        if step is not None and step["to"] == to:
            note = str(seg.meta.get("reason", "")) if seg.author == SUPERVISOR else ""
            budget = step.get("budget")
            return Handoff(position, prev.author, to, str(step.get("reason") or "handoff"),
                           int(budget) if isinstance(budget, int) else None, note=note)
    review = next((s for s in between if s.kind == "retract"), None) or next(
        (s for s in between if s.kind == "steer"), None)
    if review is not None:  # the supervisor rolled back, or switched writers
        reason = "rollback" if review.kind == "retract" else "switch"
        return Handoff(position, prev.author, to, reason, note=str(review.meta.get("reason", "")))
    if prev.kind == "call" and prev.meta.get("granted"):
        return Handoff(position, prev.author, to, "call",
                       requested_tokens=int(prev.meta["granted"]))
    if prev.finish_reason == "low_confidence":
        return Handoff(position, prev.author, to, "low_confidence")
    if prev.finish_reason == "budget" and called:
        return Handoff(position, prev.author, to, "call_done")
    return Handoff(position, prev.author, to, prev.finish_reason or "handoff")


def summarize(trajectory: Trajectory) -> Totals:
    """Tokens per agent, call ratio, handoffs, confidence and the answer of a trajectory."""
    from relaygraph.trajectory.answers import extract_answer

    segments = trajectory.segments
    gone = retracted_positions(segments)
    agents = list(trajectory.task.agents)
    tokens = {a: 0 for a in agents}
    probs: dict[str, list[float]] = {}
    totals = Totals(segments=len(segments), retracted=len(gone))
    for seg in segments:
        if seg.kind not in WORK_KINDS:
            continue
        tokens[seg.author] = tokens.get(seg.author, 0) + seg.n_tokens
        for lp in seg.logprobs or ():
            p = math.exp(lp)
            probs.setdefault(seg.author, []).append(p)
            totals.low_tokens += p < 0.5
    totals.tokens_by_agent = tokens
    totals.total_tokens = sum(tokens.values())
    primary = agents[0] if agents else (segments[0].author if segments else "")
    if totals.total_tokens:
        totals.call_ratio = (totals.total_tokens - tokens.get(primary, 0)) / totals.total_tokens
    totals.handoffs = len(infer_handoffs(segments))
    totals.mean_prob_by_agent = {a: sum(v) / len(v) for a, v in probs.items() if v}
    text = "".join(s.plain_text for i, s in enumerate(segments)
                   if s.kind in WORK_KINDS and i not in gone)
    totals.answer = extract_answer(text)
    last = next((step for seg in reversed(segments) if (step := step_of(seg)) is not None), None)
    if last is not None and last["to"] == "finish":
        reason = str(last.get("reason") or "")
        budget = trajectory.task.config.get("max_tokens")
        # as the graph does: a policy that wanted to go on was stopped by the run's budget
        if isinstance(budget, int) and totals.total_tokens >= budget and reason not in ENDINGS:
            reason = "budget"
        totals.finish_reason = reason
    return totals


def token_pieces(segment: Segment, decode: Any) -> list[str] | None:
    """The text of each of the segment's tokens (``decode``: ids -> text), or None when
    they do not add up to the segment's text (then show the segment as one piece)."""
    ids = segment.token_ids
    if not ids or decode is None:
        return None
    pieces, previous = [], ""
    try:
        for n in range(1, len(ids) + 1):
            text = decode(ids[:n])
            if not text.startswith(previous):  # a byte-fallback merge rewrote the tail
                return None
            pieces.append(text[len(previous):])
            previous = text
    except Exception:  # noqa: BLE001 - a viewer must not fail on a tokenizer quirk
        return None
    return pieces if "".join(pieces) == segment.text else None


def load_decoders(trajectory: Trajectory) -> dict[str, Any]:
    """Author -> ``decode(ids)`` from each agent's tokenizer, when it can be loaded offline
    (catalog models, local folders); authors whose tokenizer is not available are left out."""
    decoders: dict[str, Any] = {}
    cache: dict[str, Any] = {}
    for author, model in trajectory.task.agents.items():
        if model in cache:
            if cache[model] is not None:
                decoders[author] = cache[model]
            continue
        cache[model] = None
        try:
            decoders[author] = cache[model] = _decoder(model)
        except Exception:  # noqa: BLE001 - no tokenizer: per-segment shading instead
            continue
    return decoders


def _decoder(model: str) -> Any:
    from pathlib import Path

    from transformers import AutoTokenizer

    from relaygraph.agents.catalog import resolve

    location = resolve(model)
    kwargs: dict[str, Any] = {"local_files_only": True}  # a viewer never downloads
    path = Path(location)
    if path.suffix == ".gguf":
        kwargs["gguf_file"] = path.name
        location = str(path.parent)
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=False)
