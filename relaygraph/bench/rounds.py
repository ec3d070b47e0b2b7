"""Ratios that hold on a busy machine: both sides of a ratio timed in interleaved rounds
(A, B, then B, A, then A, B, ...: each pair of neighbours meets the same minutes and a
steady drift in load cancels), each side summarised by its min and median with CPU time and
load average beside the wall time, the median of the per-round ratios as the headline (one
round caught by a burst of load moves it least), and a warning when the rounds disagree."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

SPREAD_WARNING = 0.10
"""Rounds whose per-round ratios differ by more than this (max / min - 1) get a warning."""


@dataclass(frozen=True)
class Timing:
    """One timed run: wall and process CPU seconds, and the 1-minute load average at its start."""

    wall_s: float
    cpu_s: float
    load: float


def timed(fn: Callable[[], Any]) -> tuple[Any, Timing]:
    """``fn()`` and how long it took."""
    load = os.getloadavg()[0]
    cpu, start = time.process_time(), time.perf_counter()
    out = fn()
    return out, Timing(time.perf_counter() - start, time.process_time() - cpu, load)


def interleave(sides: Sequence[tuple[str, Callable[[int], Any]]], repeat: int
               ) -> dict[str, list[Any]]:
    """Each side once per round for ``repeat`` rounds, in the order given on even rounds and
    reversed on odd ones (A, B, B, A, A, B, ...): the two sides of a round run back to back,
    and a load that rises or falls during the bench weighs on both alike. A side run first
    on an odd round sees the previous round's results of the others (the bench's sides
    repeat the same work every round)."""
    out: dict[str, list[Any]] = {name: [] for name, _ in sides}
    for round_ in range(repeat):
        for name, run in (sides if round_ % 2 == 0 else list(reversed(sides))):
            out[name].append(run(round_))
    return out


def summary(values: Sequence[float]) -> dict[str, Any]:
    """min, median, max of a side's rounds (and the rounds themselves)."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values),
            "rounds": list(values)}


def spread(values: Sequence[float]) -> float:
    """How far rounds disagree: max / min - 1."""
    return max(values) / min(values) - 1 if values and min(values) > 0 else 0.0


def compare(name: str, numerator: Sequence[Timing], denominator: Sequence[Timing],
            warnings: list[str]) -> dict[str, Any]:
    """A ratio of wall times from interleaved rounds: the median of the per-round ratios
    (the headline), the ratio of mins and of medians beside it; a warning when the
    per-round ratios disagree by > 10%."""
    num = [t.wall_s for t in numerator]
    den = [t.wall_s for t in denominator]
    per_round = [a / b for a, b in zip(num, den, strict=True)]
    disagree = spread(per_round)
    out = {"ratio": statistics.median(per_round),
           "ratio_of_mins": min(num) / min(den),
           "ratio_of_medians": statistics.median(num) / statistics.median(den),
           "round_ratios": per_round, "spread": disagree}
    if len(per_round) > 1 and disagree > SPREAD_WARNING:
        loads = [t.load for t in (*numerator, *denominator)]
        warnings.append(
            f"{name}: rounds disagree by {disagree:.0%} (per-round ratios "
            f"{min(per_round):.2f}-{max(per_round):.2f}; load average {min(loads):.1f}-"
            f"{max(loads):.1f}): the median per-round ratio is the best estimate; more "
            "--repeat or a quieter machine tightens it")
    return out


def side(timings: Sequence[Timing]) -> dict[str, Any]:
    """One side of a ratio: wall-time summary, CPU time and load average per round."""
    return {**summary([t.wall_s for t in timings]), "cpu_s": [t.cpu_s for t in timings],
            "load": [t.load for t in timings]}
