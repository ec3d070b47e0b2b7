"""Disagreement placement (beyond the paper, after R2R's router labels): commands go where
the expert, reading the small model's response teacher-forced, would have written another
token."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import Field

from relaygraph.errors import ConfigError
from relaygraph.train.commands import Insertion, on_char_boundary, snap_call_length
from relaygraph.train.data import Strict, append_jsonl, is_correct, read_jsonl

if TYPE_CHECKING:
    from relaygraph.train.warmup import WarmupSettings

Progress = Callable[[str], None]


class DisagreementSettings(Strict):
    """Where ``placement = "disagreement"`` puts commands and how long they ask for."""

    min_margin: float = Field(2.0, ge=0)
    """A token is a disagreement when the expert's log-prob of its own top choice exceeds
    its log-prob of the small model's token by at least this (nats)."""
    min_call_tokens: int = Field(10, ge=1)
    max_call_tokens: int = Field(100, ge=1)
    """A command asks for the tokens to the end of the line, rounded up to d x 10^k and
    kept within these bounds (and within what is left of the response)."""
    numeric_only: bool = False
    """Count only disagreements where the expert's own choice holds a digit: it would write
    another number (an arithmetic or reading-off error, the kind that changes a math
    answer; most other disagreements are wording)."""
    calls_on_correct: bool = False
    """Also place commands in responses graded correct."""


@dataclass(frozen=True)
class ExpertScore:
    """The expert reading a response teacher-forced, one entry per response token."""

    token_logprob: list[float]
    """The expert's log-prob of the small model's token."""
    top_id: list[int]
    """The expert's own most likely token there."""
    top_logprob: list[float]


def score_with_expert(expert: Any, prompt_ids: Sequence[int], response_ids: Sequence[int],
                      enough: Callable[[ExpertScore], bool] = lambda _: False,
                      chunk: int = 128) -> ExpertScore:
    """Teacher-forced: the expert's view of the tokens of ``response_ids`` after
    ``prompt_ids`` (its own rendering of the task; both share a tokenizer), read ``chunk``
    tokens at a time on its KV cache and stopped early once ``enough(score so far)``: the
    score then covers a prefix of the response."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    own: list[float] = []
    top_id: list[int] = []
    top_lp: list[float] = []
    fed = list(prompt_ids)
    response = list(response_ids)
    done = 0
    with expert.batcher.lock, torch.inference_mode():
        while done < len(response):
            part = response[done:done + chunk]
            ids = torch.tensor([fed + part[:-1] if done == 0 else [response[done - 1]] + part[:-1]],
                               device=expert.device)
            logits = expert.model(input_ids=ids, **{expert.batcher.cache_arg: cache}, use_cache=True,
                                  logits_to_keep=len(part)).logits[0]
            logp = torch.log_softmax(logits.float(), dim=-1)
            own += [round(float(x), 3) for x in
                    logp.gather(-1, torch.tensor(part, device=logp.device)[:, None])[:, 0]]
            top = logp.max(dim=-1)
            top_id += [int(x) for x in top.indices]
            top_lp += [round(float(x), 3) for x in top.values]
            done += len(part)
            fed = []
            if done < len(response) and enough(ExpertScore(own, top_id, top_lp)):
                break
    return ExpertScore(own, top_id, top_lp)


def disagreement_calls(response_ids: Sequence[int], score: ExpertScore, line_ends: Sequence[bool],
                       settings: DisagreementSettings, max_calls: int,
                       splittable: Callable[[int], bool] = lambda _: True,
                       numeric: Callable[[int], bool] = lambda _: True) -> list[Insertion]:
    """Commands before the first ``max_calls`` disagreements, each asking for the tokens
    to the end of its line (snapped to the d x 10^k grid, within the settings' bounds and
    what is left); a later disagreement counts only after the previous command's tokens.

    ``line_ends[t]``: token ``t`` ends a line (its text holds a newline); ``numeric(id)``:
    the token's text holds a digit (used with ``numeric_only``). A score covering a prefix
    of the response (:func:`score_with_expert` stopped early) places commands in it only."""
    out: list[Insertion] = []
    t, size = 0, len(response_ids)
    while t < min(size, len(score.token_logprob)) and len(out) < max_calls:
        margin = score.top_logprob[t] - score.token_logprob[t]
        if score.top_id[t] != response_ids[t] and margin >= settings.min_margin and splittable(t) \
                and (not settings.numeric_only or numeric(score.top_id[t])):
            end = next((u + 1 for u in range(t, size) if line_ends[u]), size)
            n = snap_call_length(end - t, settings.min_call_tokens, settings.max_call_tokens)
            n = min(n, size - t)
            out.append(Insertion(t, n))
            t += n
            continue
        t += 1
    return out


def token_tests(decode: Callable[[list[int]], str]) -> tuple[Callable[[int], bool],
                                                            Callable[[int], bool]]:
    """(ends a line, holds a digit) for a token id, cached."""
    line_end = functools.lru_cache(maxsize=None)(lambda t: "\n" in decode([t]))
    numeric = functools.lru_cache(maxsize=None)(lambda t: any(c.isdigit() for c in decode([t])))
    return line_end, numeric


def score_samples(settings: WarmupSettings, rows: Sequence[dict[str, Any]],
                  samples: Sequence[dict[str, Any]], device: str, tokenizer_id: str,
                  progress: Progress) -> dict[tuple[int, int], ExpertScore]:
    """The expert's teacher-forced scores of the samples that can get commands — those
    graded wrong, unless ``calls_on_correct`` — each read until its ``max_calls`` commands
    are placed (``expert_scores.jsonl``, resumable)."""
    from relaygraph.agents.backend import Prompt
    from relaygraph.agents.transformers_backend import TransformersBackend

    path = settings.output_dir / "expert_scores.jsonl"
    scores = {(r["index"], r["sample"]): ExpertScore(r["token_logprob"], r["top_id"], r["top_logprob"])
              for r in read_jsonl(path)}
    def placeable(sample: dict[str, Any]) -> bool:
        return settings.disagreement.calls_on_correct or not is_correct(
            sample["text"], rows[sample["index"]]["answer"], complete=sample["finished"])

    todo = [s for s in samples if (s["index"], s["sample"]) not in scores and s["response_ids"]
            and placeable(s)]
    if not todo:
        return scores
    assert settings.expert is not None
    expert = TransformersBackend(settings.expert, dtype=settings.dtype, device=device)
    if expert.tokenizer_id != tokenizer_id:
        raise ConfigError("placement = 'disagreement' needs an expert with the small model's "
                          "tokenizer (it reads the small model's token ids)")
    line_end, numeric = token_tests(expert.decode)
    for done, sample in enumerate(sorted(todo, key=lambda s: (s["index"], s["sample"])), 1):
        prompt = expert.render(Prompt(rows[sample["index"]]["question"], settings.expert_system_prompt))
        ids = sample["response_ids"]
        ends = [line_end(t) for t in ids]
        splittable = on_char_boundary(expert.decode, ids)

        def enough(partial: ExpertScore, ids: list[int] = ids, ends: list[bool] = ends,
                   splittable: Callable[[int], bool] = splittable) -> bool:
            return len(disagreement_calls(ids, partial, ends, settings.disagreement,
                                          settings.max_calls, splittable, numeric)) >= settings.max_calls

        score = score_with_expert(expert, prompt, ids, enough)
        scores[sample["index"], sample["sample"]] = score
        append_jsonl(path, [{"index": sample["index"], "sample": sample["sample"],
                             "token_logprob": score.token_logprob, "top_id": score.top_id,
                             "top_logprob": score.top_logprob}])
        if done % 10 == 0 or done == len(todo):
            progress(f"expert scored {done}/{len(todo)} responses")
    return scores
