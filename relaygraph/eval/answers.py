"""Gold answers and plain numeric comparison (for datasets and the fallback checker)."""

from __future__ import annotations

import re


def gsm8k_gold(answer: str) -> str:
    """The final answer of a GSM8K solution (after ``#### ``)."""
    return answer.rsplit("####", 1)[-1].strip()


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def as_number(text: str) -> float | None:
    """The last number in ``text`` (commas, ``$`` and ``\\text{}`` units ignored), or None."""
    found = _NUMBER.findall(text.replace("\\!", "").replace("{,}", ""))
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def numeric_match(prediction: str, gold: str) -> bool:
    """Plain numeric equality of the last numbers of ``prediction`` and ``gold``."""
    a, b = as_number(prediction), as_number(gold)
    return a is not None and b is not None and abs(a - b) < 1e-6 * max(1.0, abs(b))
