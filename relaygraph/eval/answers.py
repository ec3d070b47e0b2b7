"""Pull the final answer out of a model's text."""

from __future__ import annotations

import re


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (balanced braces), or None."""
    start = text.rfind("\\boxed{")
    while start >= 0:
        depth, i = 0, start + len("\\boxed")
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1:j].strip()
        start = text.rfind("\\boxed{", 0, start)  # unbalanced: try an earlier one
    return None


def extract_answer(text: str) -> str:
    """The ``\\boxed{}`` content if there is one, else the last non-empty line."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


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
