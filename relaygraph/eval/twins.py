"""Off-trajectory twin tests: recoverability and guidability.

Li & Goyal, "Off-Trajectory Reasoning: Can LLMs Collaborate on Reasoning Trajectories?"
(arXiv 2510.06410, ICLR 2026). A primary model M continues a shared trajectory
``[r_og, r_steer]``: ``r_og`` = the first m tokens of M's own solo trajectory ``r`` on the
problem, cut at the nearest sentence end; ``r_steer`` = n tokens from a collaborator.
Success = M's final answer ``a_off`` (what M writes after the prefix) is correct.

- **Recoverability** (bad steering, section 3): only problems M solves alone (greedy
  solo answer correct). ``r_steer`` = the first 20% of M's own trajectory on a *different*
  problem (a distractor, picked per problem with a seed); m scans {0, .2, .4, .6, .8}
  x |r|. Variant: keep M's initial restatement of the problem (its first sentence) before
  the distractor at m = 0 (the paper: recoverability rises above 83.5%).
  Recoverability = the share of those problems M still answers correctly.
- **Guidability** (good steering, section 3): only problems M (almost) never solves —
  at most 1 of k samples correct (k = 8) — and where a stronger model's greedy solution is
  correct. m = 0; ``r_steer`` = the first 20/40/60/80% of that correct trajectory.
  **Spoilers** (steer segments that already contain the final answer; 18.6% in the paper)
  are flagged, and guidability is reported with and without them.

M's continuations are greedy; its budget is ``max_tokens`` new tokens after the prefix.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Sequence
from typing import Any

from relaygraph.agents.registry import AgentConfig
from relaygraph.agents.wrapping import CancelScope
from relaygraph.eval.chains import Chain, cut_at_sentence, first_sentence, given, written_chain
from relaygraph.eval.checking import equivalent
from relaygraph.eval.datasets import Problem
from relaygraph.eval.jobs import continuation_job, solo_job
from relaygraph.eval.models import ModelPool, label
from relaygraph.eval.report import markdown_table, pct
from relaygraph.eval.runner import Progress, Record, Results, run_jobs
from relaygraph.trajectory.answers import last_boxed
from relaygraph.trajectory.store import TrajectoryStore

POSITIONS = (0.0, 0.2, 0.4, 0.6, 0.8)
STEER_FRACTION = 0.2
GUIDANCE_FRACTIONS = (0.2, 0.4, 0.6, 0.8)
RESTATEMENT = "restatement"

_NUMBER = re.compile(r"(?<![\d.])-?\d[\d,]*(?:\.\d+)?(?![\d])")


# ---------------------------------------------------------------------- protocol definitions

def recoverable(solo: Record) -> bool:
    """Recoverability is measured only on problems the model solves alone."""
    return bool(solo["correct"])


def unsolved(samples: Sequence[Record], max_solved: int = 1) -> bool:
    """Guidability is measured only on problems the model (almost) never solves: at most
    ``max_solved`` of its k samples correct."""
    return sum(bool(s["correct"]) for s in samples) <= max_solved


def distractor(problem_id: str, candidates: Sequence[str], seed: int = 0) -> str | None:
    """The different problem whose trajectory distracts on ``problem_id`` (seeded, per problem)."""
    others = sorted(c for c in candidates if c != problem_id)
    return random.Random(f"{seed}\0{problem_id}").choice(others) if others else None


def steer_tokens(length: int, fraction: float) -> int:
    """n = the first ``fraction`` of a trajectory of ``length`` tokens (at least one)."""
    return min(length, max(1, round(fraction * length))) if length else 0


def is_spoiler(text: str, gold: str) -> bool:
    """Whether a steer segment already contains the final answer: a ``\\boxed{}`` equal
    to it, the same number anywhere (for a numeric answer), or the answer verbatim."""
    rest, boxes = text, []
    while (box := last_boxed(rest)) is not None:
        boxes.append(box)
        rest = rest[:rest.rfind("\\boxed{")]
    if any(equivalent(box, gold) for box in boxes):
        return True
    gold_number = _number(gold.strip())
    if gold_number is not None:
        return any(_number(m.group()) == gold_number for m in _NUMBER.finditer(text))
    return " ".join(gold.split()) in " ".join(text.split())


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").rstrip("."))
    except ValueError:
        return None


# ---------------------------------------------------------------------- recoverability

def run_recoverability(model: AgentConfig, problems: Sequence[Problem], store: TrajectoryStore,
                       results: Results, pool: ModelPool, max_tokens: int = 512,
                       positions: Sequence[float] = POSITIONS,
                       steer_fraction: float = STEER_FRACTION, restatement: bool = True,
                       seed: int = 0, concurrency: int = 1, progress: Progress | None = None,
                       flag: CancelScope | None = None) -> dict[str, Any]:
    """M alone on every problem, then M continuing [r_og, r_steer] on those it solved."""
    name = label(model.model)
    greedy = model.model_copy(update={"temperature": 0.0})
    solo_jobs = [solo_job(f"solo/{p.id}", "solo", name, greedy, p, pool, store, max_tokens,
                          phase="solo") for p in problems]
    solo = run_jobs(solo_jobs, results, concurrency, flag=flag, progress=progress)
    by_id = {r["problem"]: r for r in solo.records.values()}
    qualifying = [p for p in problems if p.id in by_id and recoverable(by_id[p.id])]
    decode = pool.backend(model).decode
    chains = {pid: written_chain(store, r["trajectory_id"], name) for pid, r in by_id.items()}
    candidates = [pid for pid, c in chains.items() if len(c)]
    conditions: list[tuple[str, float | None]] = [(f"m={m:g}", m) for m in positions]
    if restatement:
        conditions.append((RESTATEMENT, None))
    jobs = []
    for problem in qualifying:
        other = distractor(problem.id, candidates, seed)
        if other is None:
            continue
        own, distracting = chains[problem.id], chains[other]
        n = steer_tokens(len(distracting), steer_fraction)
        for condition, m in conditions:
            if m is None:
                k, snapped = first_sentence(decode, own.token_ids), True
                if k is None:
                    continue  # no sentence end: no restatement to keep
            else:
                k, snapped = cut_at_sentence(decode, own.token_ids, m)
            jobs.append(continuation_job(
                f"{condition}/{problem.id}", condition, name, greedy, problem,
                _prefix(own, k, distracting, n, decode, other, condition),
                [condition, k, n, other, by_id[problem.id]["fingerprint"],
                 by_id[other]["fingerprint"]],
                pool, store, max_tokens, "continuation", phase="recoverability",
                condition=condition, m_fraction=m, m_tokens=k, snapped=snapped,
                steer_tokens=n, distractor=other, solo_tokens=len(own)))
    runs = run_jobs(jobs, results, concurrency, flag=flag, progress=progress)
    rows = []
    for condition, m in conditions:
        items = [r for r in runs.records.values() if r["condition"] == condition]
        rows.append({"condition": condition, "m_fraction": m, **_score(items)})
    scored = [r["accuracy"] for r in rows
              if r["m_fraction"] is not None and r["accuracy"] is not None]
    return {
        "kind": "recoverability", "model": model.model, "max_tokens": max_tokens,
        "steer_fraction": steer_fraction, "seed": seed, "problems": len(problems),
        "solo_accuracy": _score(list(by_id.values()))["accuracy"],
        "qualifying": [p.id for p in qualifying],
        "conditions": rows,
        "recoverability": sum(scored) / len(scored) if scored else None,
        "errors": {**solo.errors, **runs.errors},
        "items": {"solo": list(solo.records.values()),
                  "continuations": list(runs.records.values())},
    }


def _prefix(own: Chain, k: int, distracting: Chain, n: int, decode: Any, other: str,
            condition: str) -> Any:
    def build() -> list[Any]:
        segs = [given(own, k, decode, twin="recoverability", role="r_og")] if k else []
        return segs + [given(distracting, n, decode, author="steer", twin="recoverability",
                             role="r_steer", source_problem=other, condition=condition)]

    return build


def recoverability_markdown(result: dict[str, Any]) -> str:
    rows = [[r["condition"], r["n"], pct(r["accuracy"]), r["unparseable"]]
            for r in result["conditions"]]
    table = markdown_table(["insertion point", "problems", "recoverability", "unparseable"], rows)
    return (f"Recoverability of {result['model']}: {len(result['qualifying'])} of "
            f"{result['problems']} problems solved alone (solo accuracy "
            f"{pct(result['solo_accuracy'])}); distractor = the first "
            f"{result['steer_fraction']:.0%} of its own trajectory on another problem.\n\n"
            f"{table}\n\nmean over insertion points: {pct(result['recoverability'])} "
            f"(solo = 100% on these problems by construction)")


# ---------------------------------------------------------------------- guidability

def run_guidability(model: AgentConfig, steer_model: AgentConfig, problems: Sequence[Problem],
                    store: TrajectoryStore, results: Results, pool: ModelPool,
                    max_tokens: int = 512, samples: int = 8, temperature: float = 0.7,
                    max_solved: int = 1, fractions: Sequence[float] = GUIDANCE_FRACTIONS,
                    concurrency: int = 1, progress: Progress | None = None,
                    flag: CancelScope | None = None) -> dict[str, Any]:
    """k samples of M and the steer model's greedy solution on every problem; then M
    continuing the first fractions of the steer model's correct trajectory where M fails."""
    name, steer_name = label(model.model), label(steer_model.model)
    if name == steer_name:
        steer_name = f"{steer_name}-steer"
    sampled = model.model_copy(update={"temperature": temperature})
    greedy = model.model_copy(update={"temperature": 0.0})
    strong = steer_model.model_copy(update={"temperature": 0.0})
    jobs = [solo_job(f"sample{i}/{p.id}", f"{name} samples", name, sampled, p, pool, store,
                     max_tokens, seed=i, phase="sample", sample=i)
            for p in problems for i in range(samples)]
    jobs += [solo_job(f"steer/{p.id}", f"{steer_name} solo", steer_name, strong, p, pool, store,
                      max_tokens, phase="steer") for p in problems]
    first = run_jobs(jobs, results, concurrency, flag=flag, progress=progress)
    sample_rows: dict[str, list[Record]] = {}
    steer_rows: dict[str, Record] = {}
    for record in first.records.values():
        if record["phase"] == "sample":
            sample_rows.setdefault(record["problem"], []).append(record)
        else:
            steer_rows[record["problem"]] = record
    hard = [p for p in problems if len(sample_rows.get(p.id, ())) == samples
            and unsolved(sample_rows[p.id], max_solved)]
    qualifying = [p for p in hard if p.id in steer_rows and steer_rows[p.id]["correct"]]
    jobs = []
    for problem in qualifying:
        decode = pool.backend(steer_model).decode
        chain = written_chain(store, steer_rows[problem.id]["trajectory_id"], steer_name)
        for fraction in fractions:
            n = steer_tokens(len(chain), fraction)
            segment = given(chain, n, decode, author="steer", twin="guidability", role="r_steer",
                            fraction=fraction)
            condition = f"steer={fraction:g}"
            jobs.append(continuation_job(
                f"{condition}/{problem.id}", condition, name, greedy, problem,
                functools.partial(list, [segment]),
                [condition, n, steer_rows[problem.id]["fingerprint"]], pool, store, max_tokens,
                "continuation", phase="guidability", condition=condition, fraction=fraction,
                steer_tokens=n, spoiler=is_spoiler(segment.text, problem.answer)))
    runs = run_jobs(jobs, results, concurrency, flag=flag, progress=progress)
    rows = []
    for fraction in fractions:
        items = [r for r in runs.records.values() if r["fraction"] == fraction]
        clean = [r for r in items if not r["spoiler"]]
        rows.append({"condition": f"steer={fraction:g}", "fraction": fraction, **_score(items),
                     "spoilers": len(items) - len(clean),
                     "without_spoilers": _score(clean)})
    alone = [sum(bool(s["correct"]) for s in sample_rows[p.id]) / samples for p in qualifying]
    return {
        "kind": "guidability", "model": model.model, "steer_model": steer_model.model,
        "max_tokens": max_tokens, "samples": samples, "temperature": temperature,
        "max_solved": max_solved, "problems": len(problems),
        "hard": [p.id for p in hard], "qualifying": [p.id for p in qualifying],
        "alone_accuracy": sum(alone) / len(alone) if alone else None,
        "conditions": rows, "errors": {**first.errors, **runs.errors},
        "items": {"solo": list(first.records.values()),
                  "continuations": list(runs.records.values())},
    }


def guidability_markdown(result: dict[str, Any]) -> str:
    rows = [[r["condition"], r["n"], pct(r["accuracy"]), r["spoilers"],
             r["without_spoilers"]["n"], pct(r["without_spoilers"]["accuracy"]), r["unparseable"]]
            for r in result["conditions"]]
    table = markdown_table(["steer (share of the strong trajectory)", "problems", "guidability",
                            "spoilers", "problems w/o spoilers", "guidability w/o spoilers",
                            "unparseable"], rows)
    return (f"Guidability of {result['model']} steered by {result['steer_model']}: "
            f"{len(result['hard'])} of {result['problems']} problems solved in at most "
            f"{result['max_solved']} of {result['samples']} samples (T={result['temperature']:g}); "
            f"{len(result['qualifying'])} of them with a correct steer trajectory (m = 0).\n\n"
            f"{table}\n\n{result['model']} alone on these problems: "
            f"{pct(result['alone_accuracy'])} of samples correct")


def _score(items: Sequence[Record]) -> dict[str, Any]:
    n = len(items)
    return {"n": n, "correct": sum(bool(r["correct"]) for r in items),
            "accuracy": sum(bool(r["correct"]) for r in items) / n if n else None,
            "unparseable": sum(not r["parsed"] for r in items)}
