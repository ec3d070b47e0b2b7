"""Is a model's final answer right? Symbolic checking of ``\\boxed{}`` answers.

The RelayLLM paper (section 4.2, appendix C) judges ``\\boxed{}`` answers against the
ground truth with an LLM judge; offline, `math-verify <https://github.com/huggingface/Math-Verify>`_
checks them for symbolic equivalence (``\\frac{1}{2}`` = ``0.5``, ``1,000`` = ``1000``).

:func:`check` grades the text a model wrote:

1. a ``\\boxed{}`` answer (the last one) is compared with math-verify; if math-verify
   cannot parse it, by plain numeric equality;
2. without a ``\\boxed{}``, GSM8K-style: the last number in the text, compared numerically
   with a numeric gold answer — only for a complete answer: a text cut off by the token
   budget ends mid-reasoning, and its last number is no answer;
3. neither: **unparseable** (``parsed=False``), counted apart from wrong answers.

reasoning-gym problems are graded by the task's own scorer (score 1.0 = correct) on the
``\\boxed{}`` content, else the last line (of a complete answer).
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Any, Literal

from relaygraph.eval.answers import as_number, numeric_match
from relaygraph.eval.datasets import Problem
from relaygraph.trajectory.answers import extract_answer, last_boxed

Method = Literal["math-verify", "numeric", "reasoning-gym", "none"]


@dataclass(frozen=True)
class Check:
    """The verdict on one answer."""

    correct: bool
    parsed: bool
    """False when no final answer could be read from the text (unparseable)."""
    predicted: str
    """The answer as read: ``\\boxed{}`` content, last number, or last line."""
    method: Method

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check(text: str, problem: Problem, complete: bool = True) -> Check:
    """Grade the reasoning ``text`` against ``problem``'s gold answer; ``complete`` is False
    when the text was cut off by the token budget."""
    if problem.grader == "reasoning-gym":
        return _reasoning_gym(text, problem, complete)
    return check_math(text, problem.answer, complete)


def check_math(text: str, gold: str, complete: bool = True) -> Check:
    """Grade ``text`` against a math ``gold`` answer (see the module docs)."""
    boxed = last_boxed(text)
    if boxed is not None:
        verdict = _math_verify(boxed, gold)
        if verdict is not None:
            return Check(verdict, True, boxed, "math-verify")
        if as_number(boxed) is None:
            return Check(False, False, boxed, "none")
        return Check(numeric_match(boxed, gold), True, boxed, "numeric")
    number = as_number(text) if complete else None
    if number is None:
        return Check(False, False, "", "none")
    predicted = f"{number:g}" if number != int(number) else str(int(number))
    return Check(as_number(gold) is not None and numeric_match(predicted, gold), True,
                 predicted, "numeric")


def equivalent(a: str, b: str) -> bool:
    """Whether two final answers are the same (math-verify, else numeric equality)."""
    verdict = _math_verify(a, b)
    return verdict if verdict is not None else numeric_match(a, b)


def _math_verify(predicted: str, gold: str) -> bool | None:
    """math-verify's verdict on two ``\\boxed{}`` contents; None if either does not parse."""
    from math_verify import parse, verify

    # math-verify times out with SIGALRM, which works only in the main thread
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout)
    pred_parsed = parse(f"\\boxed{{{predicted}}}", parsing_timeout=timeout)
    if not gold_parsed or not pred_parsed:
        return None
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


def _reasoning_gym(text: str, problem: Problem, complete: bool) -> Check:
    import reasoning_gym

    entry = problem.meta["entry"]
    predicted = extract_answer(text)
    if not predicted or (last_boxed(text) is None and not complete):
        return Check(False, False, "", "none")
    score = reasoning_gym.get_score_answer_fn(entry["metadata"]["source_dataset"])(predicted, entry)
    return Check(float(score) >= 1.0, True, predicted, "reasoning-gym")
