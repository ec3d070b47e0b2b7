"""Commands in a response: where ``<call>n</call>`` goes, how long it asks for, and the
loss mask of the tokens it hands to the expert (shared by the warm-up's placements)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from relaygraph.policies.call_token import CALL_CLOSE, CALL_OPEN


@dataclass(frozen=True)
class Insertion:
    position: int
    """Index in the original response's tokens before which the command goes."""
    n: int
    """The requested length after clipping to the tokens left."""


def sample_call_length(rng: random.Random) -> int:
    """n_sample = d x 10^k with d uniform in 1..9 and k uniform in 0..3."""
    return rng.randint(1, 9) * 10 ** rng.randint(0, 3)


def call_text(n: int) -> str:
    return f"{CALL_OPEN}{n}{CALL_CLOSE}"


def insert_calls(token_ids: Sequence[int], count: int, encode: Callable[[str], list[int]],
                 rng: random.Random,
                 splittable: Callable[[int], bool] = lambda _: True) -> tuple[list[int], list[Insertion]]:
    """``token_ids`` with ``count`` commands at distinct random token positions.

    A command before token ``t`` asks for ``min(n_sample, len(token_ids) - t)`` tokens, so
    every position leaves at least one token for the expert. ``splittable(t)`` may refuse a
    position (e.g. one inside a multi-byte character). Returns the new ids and the
    insertions in position order.
    """
    positions = [t for t in range(len(token_ids)) if splittable(t)]
    chosen = sorted(rng.sample(positions, min(count, len(positions))))
    insertions = [Insertion(t, min(sample_call_length(rng), len(token_ids) - t)) for t in chosen]
    out = list(token_ids)
    for ins in reversed(insertions):  # right to left: earlier positions stay valid
        out[ins.position:ins.position] = encode(call_text(ins.n))
    return out, insertions


def on_char_boundary(decode: Callable[[list[int]], str], ids: Sequence[int]) -> Callable[[int], bool]:
    """Whether a command may go before token ``t`` (not inside a multi-byte character)."""
    return lambda t: not decode(list(ids[:t])).endswith("\ufffd")


def snap_call_length(n: int, low: int = 1, high: int | None = None) -> int:
    """``n`` rounded up to the d x 10^k grid of the paper's call lengths, within
    ``low..high``."""
    n = max(n, low)
    k = len(str(n)) - 1
    d = -(-n // 10**k)
    snapped = d * 10**k  # d may reach 10: 10 x 10^k is on the grid too
    return min(snapped, high) if high is not None else snapped



def splice_calls(token_ids: Sequence[int], insertions: Sequence[Insertion],
                 encode: Callable[[str], list[int]]) -> list[int]:
    """``token_ids`` with each insertion's command before its position."""
    out = list(token_ids)
    for ins in sorted(insertions, key=lambda i: i.position, reverse=True):
        out[ins.position:ins.position] = encode(call_text(ins.n))
    return out


def called_mask(token_ids: Sequence[int], insertions: Sequence[Insertion],
                encode: Callable[[str], list[int]]) -> list[int]:
    """Loss mask of the spliced response: 0 on the ``n`` tokens after each command (the
    expert writes them at inference), 1 elsewhere (the commands included)."""
    handed: set[int] = set()
    for ins in insertions:
        handed.update(range(ins.position, min(ins.position + ins.n, len(token_ids))))
    starts: dict[int, int] = {ins.position: len(encode(call_text(ins.n))) for ins in insertions}
    mask: list[int] = []
    for t in range(len(token_ids)):
        mask += [1] * starts.get(t, 0)
        mask.append(0 if t in handed else 1)
    return mask
