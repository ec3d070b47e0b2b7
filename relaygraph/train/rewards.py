"""RelayLLM's rewards (paper section 3.2.3), as plain functions.

``call_ratio`` is rho(y): the share of the response's tokens that the expert wrote. Here it
counts the tokens the expert actually *served* (a call for 100 tokens that the expert ends
after 12 with EOS costs 12), where the published code counts the requested ``n``.

A sample "called" when its call ratio is above 0 (the paper's rho(y) > 0): a refused call or
an expert that stopped at once served nothing, so that sample counts as independent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

INDEPENDENT_BONUS = 1.5
"""Reward of a correct answer written without the expert when the student can solve the question."""
STUBBORN_PENALTY = -1.0
"""Reward of a sample that did not call on a question only the expert's help solved."""

Scenario = Literal["student-solvable", "teacher-dependent", "unsolvable"]


def simple(correct: bool, call_ratio: float) -> float:
    """r_simple = 1(correct) - call_ratio (eq. 3)."""
    _check_ratio(call_ratio)
    return float(bool(correct)) - call_ratio


def scenario(correct: Sequence[bool], call_ratios: Sequence[float]) -> Scenario:
    """How hard the question was for one group of samples of it.

    - ``student-solvable``: at least one sample is correct without calling (ratio 0);
    - ``teacher-dependent``: some samples are correct, all of them called;
    - ``unsolvable``: no sample is correct.
    """
    if len(correct) != len(call_ratios) or not correct:
        raise ValueError("a group needs as many call ratios as answers, and at least one sample")
    for ratio in call_ratios:
        _check_ratio(ratio)
    if any(ok and ratio == 0 for ok, ratio in zip(correct, call_ratios, strict=True)):
        return "student-solvable"
    return "teacher-dependent" if any(correct) else "unsolvable"


def difficulty_aware(correct: Sequence[bool], call_ratios: Sequence[float]) -> list[float]:
    """The difficulty-aware reward of each sample in one group (same question).

    - student-solvable: correct without calling 1.5, correct with calling ``simple``, wrong 0;
    - teacher-dependent: no call -1.0, correct (with calling) ``simple``, wrong with calling 0;
    - unsolvable: the call ratio for samples that called (exploration), 0 otherwise.

    Wrong-with-calling on a teacher-dependent question is not stated in the paper; 0 as in the
    published code (and as for wrong answers in the other scenarios).
    """
    kind = scenario(correct, call_ratios)
    rewards = []
    for ok, ratio in zip(correct, call_ratios, strict=True):
        called = ratio > 0
        if kind == "student-solvable":
            reward = (INDEPENDENT_BONUS if not called else simple(True, ratio)) if ok else 0.0
        elif kind == "teacher-dependent":
            reward = STUBBORN_PENALTY if not called else (simple(True, ratio) if ok else 0.0)
        else:
            reward = ratio if called else 0.0
        rewards.append(reward)
    return rewards


def _check_ratio(ratio: float) -> None:
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"a call ratio is a share of tokens in [0, 1], got {ratio}")
