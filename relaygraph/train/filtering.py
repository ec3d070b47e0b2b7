"""Teacher-pass-rate filtering (paper section 3.2.2).

Calling the expert on a question it cannot solve teaches nothing, so the GRPO data keeps
only the questions the expert alone answers correctly in at least ``min_pass_rate`` of ``k``
sampled responses (paper: k = 10, 50%). Progress is appended to ``<output>.progress.jsonl``
as questions finish, so an interrupted run picks up where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import Field

from relaygraph.agents.agent import MATH_SYSTEM_PROMPT
from relaygraph.train.data import (
    Dtype,
    Strict,
    append_jsonl,
    is_correct,
    pick_device,
    read_jsonl,
    read_questions,
    select,
)

Progress = Callable[[str], None]


class FilterSettings(Strict):
    """``relaygraph train filter`` configuration."""

    expert: str
    data: Path
    skip: int = Field(0, ge=0)
    limit: int | None = Field(None, ge=1)
    """Score questions ``skip .. skip + limit`` of the file (default: all)."""
    output: Path
    """JSONL of the kept questions (each with ``teacher_pass_rate``)."""
    k: int = Field(10, ge=1)
    min_pass_rate: float = Field(0.5, ge=0, le=1)
    system_prompt: str | None = MATH_SYSTEM_PROMPT
    max_tokens: int = Field(512, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    dtype: Dtype = "bfloat16"
    device: str = "auto"
    concurrency: int = Field(8, ge=1)


def keep(pass_rate: float, min_pass_rate: float = 0.5) -> bool:
    """The paper's rule: keep a question whose teacher pass rate is at least the threshold."""
    return pass_rate >= min_pass_rate


def pass_rates(backend: Any, rows: Sequence[dict[str, Any]], settings: FilterSettings,
               on_result: Callable[[dict[str, Any]], None] = lambda _: None) -> list[dict[str, Any]]:
    """For each row, how many of ``k`` expert samples answer it correctly."""
    from relaygraph.agents.backend import Prompt, Sampling, StopRule

    rule = StopRule(max_tokens=settings.max_tokens)

    def one(job: tuple[int, int]) -> bool:
        i, j = job
        sampling = Sampling(settings.temperature, settings.top_p,
                            seed=settings.seed * 1_000_003 + rows[i].get("_index", i) * 1_009 + j)
        gen = backend.generate(Prompt(rows[i]["question"], settings.system_prompt), rule, sampling)
        return is_correct(gen.text, rows[i]["answer"], complete=gen.finish_reason == "eos")

    results = []
    with ThreadPoolExecutor(settings.concurrency) as pool:
        per_batch = -(-settings.concurrency // settings.k)  # questions whose samples fill the pool
        for start in range(0, len(rows), per_batch):
            batch = range(start, min(start + per_batch, len(rows)))
            jobs = [(i, j) for i in batch for j in range(settings.k)]
            outcomes = list(pool.map(one, jobs))
            for n, i in enumerate(batch):
                solved = sum(outcomes[n * settings.k:(n + 1) * settings.k])
                result = {"index": rows[i].get("_index", i), "solved": solved, "k": settings.k}
                results.append(result)
                on_result(result)
    return results


def run_filter(settings: FilterSettings, progress: Progress = print) -> Path:
    """Score every question (resumably) and write the kept ones to ``settings.output``."""
    from relaygraph.agents.transformers_backend import TransformersBackend

    rows = select(read_questions(settings.data), settings.skip, settings.limit)
    for i, row in enumerate(rows):
        row["_index"] = i
    log = settings.output.with_name(settings.output.name + ".progress.jsonl")
    done = {r["index"]: r for r in read_jsonl(log) if r.get("k") == settings.k}
    todo = [r for r in rows if r["_index"] not in done]
    if todo:
        backend = TransformersBackend(settings.expert, dtype=settings.dtype,
                                      device=pick_device(settings.device))
        every = max(1, len(rows) // 50)

        def record(result: dict[str, Any]) -> None:
            append_jsonl(log, [result])
            done[result["index"]] = result
            if len(done) % every == 0 or len(done) == len(rows):
                progress(f"teacher pass rate: {len(done)}/{len(rows)} questions scored")

        pass_rates(backend, todo, settings, record)
    kept = []
    for row in rows:
        rate = done[row["_index"]]["solved"] / settings.k
        if keep(rate, settings.min_pass_rate):
            kept.append({k: v for k, v in row.items() if k != "_index"} | {"teacher_pass_rate": rate})
    settings.output.parent.mkdir(parents=True, exist_ok=True)
    settings.output.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    progress(f"kept {len(kept)} of {len(rows)} questions (expert pass rate >= "
             f"{settings.min_pass_rate:.0%} of {settings.k}) -> {settings.output}")
    return settings.output
