"""What a stored trajectory says about its run: handoffs, totals, per-token confidence.

Shared by the terminal and HTML viewers. Every number comes from the step records the
graph stored with the trajectory (``meta["step"]`` on each step's last segment), folded
by :func:`relaygraph.trajectory.totals.tally` — the same function resume uses — so a
viewer shows exactly the handoffs, tokens and finish reason ``relaygraph run`` reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from relaygraph.policies.base import SUPERVISOR
from relaygraph.trajectory.answers import extract_answer
from relaygraph.trajectory.models import Segment, Trajectory, active, reasoning_text, retracted, step_of
from relaygraph.trajectory.totals import tally

WORK_KINDS = ("text", "call")


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
class Summary:
    """A trajectory's numbers for display."""

    tokens_by_agent: dict[str, int] = field(default_factory=dict)
    total_tokens: int = 0
    call_ratio: float = 0.0
    """Tokens written by agents other than the primary / all tokens."""
    handoffs: int = 0
    segments: int = 0
    retracted: int = 0
    mean_prob_by_agent: dict[str, float] = field(default_factory=dict)
    """Mean per-token probability (exp of the log-prob) of each agent's tokens."""
    low_tokens: int = 0
    """Tokens with probability below 0.5."""
    answer: str = ""
    finish_reason: str = ""
    """Why the run ended, when it has."""
    input_tokens_by_agent: dict[str, int] = field(default_factory=dict)
    cost: float | None = None
    """What the run cost from the agents' prices stored with the task (None: no prices)."""
    cost_by_agent: dict[str, float] | None = None


def format_cost(cost: float) -> str:
    """Money with enough digits for fractions of a cent: ``0.000123``, ``1.50``."""
    return f"{cost:.2f}" if cost >= 1 else f"{cost:.6f}".rstrip("0").rstrip(".") or "0"


class HandoffTracker:
    """Finds handoffs one segment at a time (for a trajectory that is still growing):
    :meth:`push` returns the handoff that follows a segment, if its step moved control."""

    def push(self, position: int, seg: Segment) -> Handoff | None:
        step = step_of(seg)
        if step is None or not step.moved:
            return None
        note = str(seg.meta.get("reason", "")) if seg.author == SUPERVISOR else ""
        return Handoff(position + 1, step.author, step.to, step.reason, step.budget,
                       step.confidence, note)


def handoffs(segments: list[Segment]) -> list[Handoff]:
    """Every handoff of a trajectory, in order."""
    tracker = HandoffTracker()
    return [h for i, s in enumerate(segments) if (h := tracker.push(i, s)) is not None]


def summarize(trajectory: Trajectory) -> Summary:
    """Tokens per agent, call ratio, handoffs, confidence and the answer of a trajectory."""
    segments = trajectory.segments
    task = trajectory.task
    agents = list(task.agents)
    totals, _ = tally(segments, agents)
    summary = Summary(segments=len(segments), retracted=len(retracted(segments)),
                      tokens_by_agent=totals.tokens_by_agent, total_tokens=totals.generated,
                      handoffs=totals.handoffs, finish_reason=totals.finish_reason,
                      input_tokens_by_agent=totals.input_tokens_by_agent,
                      cost=totals.cost(task.prices), cost_by_agent=totals.cost_by_agent(task.prices))
    primary = task.primary or (agents[0] if agents else "")
    summary.call_ratio = totals.call_ratio(primary)
    probs: dict[str, list[float]] = {}
    for seg in segments:
        if seg.kind in WORK_KINDS:
            for lp in seg.logprobs or ():
                p = math.exp(lp)
                probs.setdefault(seg.author, []).append(p)
                summary.low_tokens += p < 0.5
    summary.mean_prob_by_agent = {a: sum(v) / len(v) for a, v in probs.items() if v}
    summary.answer = extract_answer(reasoning_text(active(segments)))
    return summary


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
    except Exception:  # noqa: BLE001 - a viewer never fails on a tokenizer
        return None
    return pieces if "".join(pieces) == segment.text else None


def load_decoders(trajectory: Trajectory, trust_stored: bool = False) -> dict[str, Any]:
    """Author -> ``decode(ids)`` from each agent's tokenizer, when it can be loaded offline;
    authors whose tokenizer is not available are left out. The models are named by the
    store, so only catalog models are loaded unless ``trust_stored`` (then local folders
    and ``.gguf`` files too): a store is not trusted with file paths."""
    from relaygraph.agents.catalog import CATALOG

    decoders: dict[str, Any] = {}
    cache: dict[str, Any] = {}
    for author, model in trajectory.task.agents.items():
        if model not in CATALOG and not trust_stored:
            continue
        if model in cache:
            if cache[model] is not None:
                decoders[author] = cache[model]
            continue
        cache[model] = None
        try:
            decoders[author] = cache[model] = _decoder(model)
        except Exception:  # noqa: BLE001 - a viewer never fails on a tokenizer
            continue
    return decoders


def _decoder(model: str) -> Any:
    from pathlib import Path

    from transformers import AutoTokenizer

    from relaygraph.agents.catalog import resolve

    location = resolve(model, network=False)
    kwargs: dict[str, Any] = {"local_files_only": True}  # a viewer never downloads
    path = Path(location)
    if path.suffix == ".gguf":
        kwargs["gguf_file"] = path.name
        location = str(path.parent)
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=False)
