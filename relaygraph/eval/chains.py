"""Reasoning chains as token ids: read them from the store, cut them, hand them on.

Shared by the reasoning-relay experiment and the twin tests: a model's solo chain is read
back from its trajectory (its own token ids and log-probs), cut at a token position (a
sentence end where a protocol asks for one), and given to another run as a prefix.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from relaygraph.trajectory.models import Segment, active, reasoning_text
from relaygraph.trajectory.store import TrajectoryStore

Decode = Callable[[Sequence[int]], str]

_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")
"""A sentence ends after ``.``, ``!`` or ``?`` followed by white space (or the end), or at a
line break; ``3.5`` and ``e.g.x`` do not end one."""


@dataclass(frozen=True)
class Chain:
    """What one author wrote in a trajectory, as token ids."""

    author: str
    token_ids: list[int]
    logprobs: list[float]
    tokenizer: str | None
    text: str

    def __len__(self) -> int:
        return len(self.token_ids)


def written_chain(store: TrajectoryStore, trajectory_id: str, author: str) -> Chain:
    """The text segments ``author`` generated in a trajectory (given segments excluded)."""
    segs = [s for s in active(store.read(trajectory_id))
            if s.author == author and s.kind == "text" and not s.meta.get("given")]
    return Chain(author, [t for s in segs for t in s.token_ids or ()],
                 [lp for s in segs for lp in s.logprobs or ()],
                 next((s.tokenizer for s in segs if s.tokenizer), None),
                 "".join(s.text for s in segs))


def continuation_text(store: TrajectoryStore, trajectory_id: str) -> str:
    """The reasoning written after a run's given prefix (the model's own answer)."""
    return reasoning_text([s for s in active(store.read(trajectory_id)) if not s.meta.get("given")])


def chain_text(store: TrajectoryStore, trajectory_id: str) -> str:
    """The whole reasoning of a trajectory, given prefix included."""
    return reasoning_text(active(store.read(trajectory_id)))


def prefix_chars(decode: Decode, ids: Sequence[int], chars: int) -> int:
    """The most leading tokens whose decoded text is at most ``chars`` characters long."""
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(decode(ids[:mid])) <= chars:
            lo = mid
        else:
            hi = mid - 1
    return lo


def sentence_ends(decode: Decode, ids: Sequence[int]) -> list[int]:
    """Token counts ``k`` (0 < k < len) after which the decoded chain ends a sentence."""
    text = decode(ids)
    ends = []
    for end in sorted({m.end() for m in _SENTENCE_END.finditer(text)}):
        k = prefix_chars(decode, ids, end)
        if 0 < k < len(ids) and len(decode(ids[:k])) == end:
            ends.append(k)
    return sorted(set(ends))


def cut_at_sentence(decode: Decode, ids: Sequence[int], fraction: float) -> tuple[int, bool]:
    """The sentence end nearest to ``fraction`` of the chain (ties: the earlier one), and
    whether one existed (else the exact token position). ``fraction`` 0 cuts at 0."""
    target = fraction * len(ids)
    if fraction <= 0 or not ids:
        return 0, True
    ends = sentence_ends(decode, ids)
    if not ends:
        return min(len(ids), round(target)), False
    return min(ends, key=lambda k: (abs(k - target), k)), True


def first_sentence(decode: Decode, ids: Sequence[int]) -> int | None:
    """Tokens up to the chain's first sentence end (its opening, e.g. the restatement)."""
    ends = sentence_ends(decode, ids)
    return ends[0] if ends else None


def given(chain: Chain, stop: int, decode: Decode, author: str | None = None,
          **meta: object) -> Segment:
    """The first ``stop`` tokens of ``chain`` as a segment to give a run as its prefix."""
    ids = chain.token_ids[:stop]
    return Segment(author=author or chain.author, text=decode(ids), token_ids=ids,
                   tokenizer=chain.tokenizer, logprobs=chain.logprobs[:stop] or None,
                   meta=dict(meta))
