"""The stop rule applied to a stream of sampled tokens, the same way for every backend.

A backend turns its model's output into an iterator of :class:`Sample` (a local decode
loop, a server's SSE stream, an in-process engine's deltas); :func:`follow` consumes it
under a :class:`~relaygraph.agents.backend.StopRule` and stops pulling as soon as the rule
decides. The backend then closes its iterator (aborting a request whose token was refused)
or drains it (to read a server's final usage report).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from relaygraph.agents.backend import StopRule, TextCallback, TokenStep
from relaygraph.errors import RelayGraphError
from relaygraph.trajectory.models import FinishReason


class ContextTooLongError(RelayGraphError):
    """The prompt plus the token budget does not fit the model's context window."""


def token_limit(prompt_tokens: int, rule: StopRule, max_context: int, model_id: str) -> int:
    """How many tokens may be generated after a prompt: the rule's budget, cut to what the
    context window leaves (a ContextTooLongError when the prompt alone fills it)."""
    if prompt_tokens >= max_context:
        raise ContextTooLongError(
            f"the prompt ({prompt_tokens} tokens) does not fit {model_id}'s context of "
            f"{max_context} tokens; shorten the question")
    return min(rule.max_tokens, max_context - prompt_tokens)


def completes_bad_word(seen: Sequence[int], token: int, words: Sequence[str],
                       decode: Callable[[Sequence[int]], str]) -> bool:
    """Whether ``token`` after ``seen`` would write one of ``words`` (checked on the text, so
    however the word is split into tokens — ``".<" "call" ">"`` as well as ``"<call>"``)."""
    window = list(seen[-max(len(w) for w in words):])  # a token holds at least one character
    before = decode(window)
    after = decode([*window, token])
    return any(after.find(w, max(0, len(before) - len(w) + 1)) >= 0 for w in words)


@dataclass(frozen=True)
class Sample:
    """A token the model sampled, before the stop rule has seen it."""

    token_id: int
    logprob: float
    entropy: float | Callable[[], float] = math.nan
    """The next-token distribution's entropy, or a function computing it (called only
    when the rule has a ``check``)."""


@dataclass
class Decoded:
    """What the stop rule kept of a token stream."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    """None when the stream ended before the rule stopped it (the producer knows why)."""
    rejected: TokenStep | None = None


def follow(samples: Iterable[Sample], rule: StopRule, decode: Callable[[Sequence[int]], str],
           eos_ids: frozenset[int] | set[int], limit: int | None = None,
           on_text: TextCallback | None = None) -> Decoded:
    """Apply ``rule`` to ``samples`` token by token.

    - an EOS id stops (``eos``; the token is not kept and never offered to ``check``);
    - ``rule.check`` returning True stops before the token (``low_confidence``);
    - a stop string inside the newly decoded text stops after the token (``stop``; kept);
    - ``limit`` kept tokens stop (``budget`` when it is ``rule.max_tokens``, else
      ``length``: the context window was the tighter bound); no further sample is pulled.

    ``text`` is ``decode(token_ids)``; ``on_text`` gets it piece by piece (never half a
    UTF-8 character). ``samples`` is left open: closing or draining it is the caller's.
    """
    limit = rule.max_tokens if limit is None else limit
    out = Decoded()
    emitted = 0
    iterator = iter(samples)
    while True:
        if len(out.token_ids) >= limit:
            out.finish_reason = "budget" if limit == rule.max_tokens else "length"
            break
        sample = next(iterator, None)
        if sample is None:
            break
        if sample.token_id in eos_ids:
            out.finish_reason = "eos"
            break
        if rule.check is not None:
            entropy = sample.entropy() if callable(sample.entropy) else sample.entropy
            step = TokenStep(sample.token_id, sample.logprob, entropy, len(out.token_ids))
            if rule.check(step):
                out.finish_reason, out.rejected = "low_confidence", step
                break
        out.token_ids.append(sample.token_id)
        out.logprobs.append(sample.logprob)
        previous = len(out.text)
        out.text = decode(out.token_ids)
        if on_text is not None and not out.text.endswith("\ufffd") and len(out.text) > emitted:
            on_text(out.text[emitted:])
            emitted = len(out.text)
        if hit_stop(out.text, previous, rule.stop_strings):
            out.finish_reason = "stop"
            break
    if on_text is not None and len(out.text) > emitted:
        on_text(out.text[emitted:])
    return out


def hit_stop(text: str, previous: int, stop_strings: Iterable[str]) -> bool:
    """True when a stop string ends inside the text added since ``previous``."""
    for stop in stop_strings:
        if stop in text[max(0, previous - len(stop) + 1):]:
            return True
    return False


def entropy_from_top(top_logprobs: Iterable[float]) -> float:
    """Entropy estimated from the top-k log-probs a server returns: their terms plus the
    left-over probability mass counted as one outcome (a lower bound of the true entropy;
    exact when the top k cover the distribution)."""
    total, mass = 0.0, 0.0
    for logprob in top_logprobs:
        if logprob > -math.inf:
            p = math.exp(logprob)
            total -= p * logprob
            mass += p
    rest = 1.0 - mass
    if rest > 1e-12:
        total -= rest * math.log(rest)
    return total


def engine_finish(finish: str | None, stop_reason: object) -> FinishReason | None:
    """Our finish reason when a vLLM request ended before the stop rule stopped it: its
    context window (``length``), a stop string (``stop``) or a stop token (``eos``); None
    for anything else (aborted, error)."""
    if finish == "length":
        return "length"
    if finish == "stop":
        return "stop" if isinstance(stop_reason, str) else "eos"
    return None
