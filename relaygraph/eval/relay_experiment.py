"""The reasoning-relay experiment: one model's chain of thought, cut, finished by another.

Lu et al., "Reasoning Relay: Evaluating Stability and Interchangeability of Large Language
Models in Mathematical Reasoning" (arXiv 2512.20647). An **initiator** writes a full
solution; its chain is truncated early / mid / late, the cut points chosen by a
token-level log-probability threshold; a **continuer** (the same or another model) finishes
it; final-answer accuracy of the hybrid chains is compared with each model alone, and a
process reward model (PRM) scores the steps.

Here:

- the initiator's solution is its greedy solo run (the solo baselines come for free);
- a **surprisal-budget cut** ``B`` (nats) goes before the token at which the chain's
  accumulated surprisal (minus the sum of its log-probs) first exceeds ``B``: a lower budget
  cuts earlier — the article's "lower thresholds result in earlier truncations" describes
  this rule;
- a **per-token threshold cut** ``τ`` goes before the first token whose log-prob is below
  ``τ``; here a τ closer to 0 (a *higher* threshold) cuts earlier. Both are exactly
  :class:`~relaygraph.policies.TruncatePolicy` (``rule="surprisal"`` / ``"token"``),
  replayed from the stored chain instead of regenerated, which greedy decoding makes
  identical; the token at the cut is discarded and the continuer writes from there. A chain
  with no such token is not cut: the hybrid is the initiator's own solution.
  Each cut's position (share of the chain) is recorded and binned early (< 1/3), mid
  (< 2/3) or late;
- **fraction cuts** at 0.2 .. 0.8 of the chain's tokens, for comparison;
- the continuer continues the prefix as its own assistant message (budget: ``max_tokens``
  new tokens); the hybrid chain's final answer (prefix included) is graded;
- a PRM (:class:`ProcessRewardModel`), when given, scores each step of every chain
  (steps = paragraphs, else lines): the mean score of the prefix's and the continuation's
  steps, and where the chain first falters (first step scored below 0.5).
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from relaygraph.agents.backend import Prompt
from relaygraph.agents.registry import AgentConfig
from relaygraph.agents.wrapping import CancelScope
from relaygraph.eval.chains import Chain, given, written_chain
from relaygraph.eval.datasets import Problem
from relaygraph.eval.jobs import continuation_job, solo_job
from relaygraph.eval.models import ModelPool
from relaygraph.eval.report import markdown_table, num, pct
from relaygraph.eval.runner import Job, Progress, Record, Results, fingerprint, run_jobs
from relaygraph.trajectory.store import TrajectoryStore

THRESHOLDS = (-0.5, -1.5, -3.0)
BUDGETS = (5.0, 15.0, 40.0)
FRACTIONS = (0.2, 0.4, 0.6, 0.8)


# ---------------------------------------------------------------------- cut points

def threshold_cut(logprobs: Sequence[float], threshold: float, warmup: int = 0) -> int | None:
    """Tokens kept before the first token (from ``warmup`` on) with log-prob below
    ``threshold``; None when no token is below it (no cut)."""
    return next((i for i, lp in enumerate(logprobs) if i >= warmup and lp < threshold), None)


def surprisal_cut(logprobs: Sequence[float], budget: float, warmup: int = 0) -> int | None:
    """Tokens kept before the token (from ``warmup`` on) at which the accumulated surprisal
    ``-sum(logprobs[:i + 1])`` first exceeds ``budget``; None when it never does."""
    total = 0.0
    for i, lp in enumerate(logprobs):
        total -= lp
        if i >= warmup and total > budget:
            return i
    return None


def fraction_cut(length: int, fraction: float) -> int:
    """Tokens kept for a cut at ``fraction`` of a chain of ``length`` tokens."""
    return min(length, round(fraction * length))


def stage(position: float) -> str:
    """early / mid / late for a cut at ``position`` (share of the chain kept)."""
    return "early" if position < 1 / 3 else "mid" if position < 2 / 3 else "late"


# ---------------------------------------------------------------------- process reward models

class ProcessRewardModel(Protocol):
    """Scores each step of a solution: the probability it is correct given the problem and
    the steps before it. Real PRMs (e.g. Qwen2.5-Math-PRM) need the hub; implement this
    method around one to use it."""

    def score_steps(self, question: str, steps: Sequence[str]) -> list[float]: ...


def split_steps(text: str) -> list[str]:
    """A solution's steps: its paragraphs, or its lines when it has a single paragraph."""
    parts = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if len(parts) <= 1:
        parts = [line.strip() for line in text.splitlines() if line.strip()]
    return parts


class JudgePRM:
    """A causal LM as a step judge: P(correct) = the normalised probability of " good"
    against " bad" after the same rating prompt as :class:`~relaygraph.policies.ScoreSupervisor`
    (with the previous steps as context)."""

    SYSTEM = "You rate reasoning steps."

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.name = f"judge:{backend.model_id}"

    @classmethod
    def prompt(cls, question: str, previous: Sequence[str], step: str) -> Prompt:
        """The rating prompt for ``step`` after ``previous`` steps."""
        context = "".join(f"Previous step:\n{p}\n\n" for p in previous)
        return Prompt(f"Problem:\n{question}\n\n{context}Step:\n{step}\n\n"
                      "Is this step correct and on task? Answer good or bad.", cls.SYSTEM)

    def score_steps(self, question: str, steps: Sequence[str]) -> list[float]:
        scores = []
        for k, step in enumerate(steps):
            lp = self.backend.next_token_logprobs(self.prompt(question, steps[:k], step),
                                                  [" good", " bad"])
            scores.append(1.0 / (1.0 + math.exp(lp[" bad"] - lp[" good"])))
        return scores


def prm_summary(prm: ProcessRewardModel, question: str, prefix: str,
                continuation: str) -> dict[str, Any]:
    """Step scores of a chain split at the cut: means before/after, the first weak step."""
    before, after = split_steps(prefix), split_steps(continuation)
    scores = prm.score_steps(question, before + after)
    low = next((i for i, s in enumerate(scores) if s < 0.5), None)
    return {"steps": scores, "cut_step": len(before), "prefix_mean": _mean(scores[:len(before)]),
            "continuation_mean": _mean(scores[len(before):]), "mean": _mean(scores),
            "first_low": None if low is None
            else ("prefix" if low < len(before) else "continuation")}


# ---------------------------------------------------------------------- the experiment

def run_relay_experiment(models: dict[str, AgentConfig], problems: Sequence[Problem],
                         store: TrajectoryStore, results: Results, pool: ModelPool,
                         max_tokens: int = 512, thresholds: Sequence[float] = THRESHOLDS,
                         fractions: Sequence[float] = FRACTIONS, warmup: int = 0,
                         budgets: Sequence[float] = BUDGETS,
                         self_pairs: bool = False, prm: ProcessRewardModel | None = None,
                         concurrency: int = 1, progress: Progress | None = None,
                         flag: CancelScope | None = None) -> dict[str, Any]:
    """Every model alone, then every (initiator, continuer) pair at every cut."""
    if len(models) < (1 if self_pairs else 2):
        raise ValueError("the relay experiment needs two models (or self_pairs)")
    greedy = {n: c.model_copy(update={"temperature": 0.0}) for n, c in models.items()}
    solo_jobs = [_with_prm(solo_job(f"solo:{n}/{p.id}", f"{n} solo", n, cfg, p, pool, store,
                                    max_tokens, phase="solo"), prm, p, store, n)
                 for n, cfg in greedy.items() for p in problems]
    solo = run_jobs(solo_jobs, results, concurrency, flag=flag, progress=progress)
    solos = {(r["model"], r["problem"]): r for r in solo.records.values()}
    chains = {key: written_chain(store, r["trajectory_id"], key[0]) for key, r in solos.items()}
    cuts: list[tuple[str, Callable[[Chain], int | None]]] = [
        (f"surprisal>{b:g}", functools.partial(_by_logprobs, surprisal_cut, b, warmup))
        for b in budgets]
    cuts += [(f"logprob<{t:g}", functools.partial(_by_logprobs, threshold_cut, t, warmup))
             for t in thresholds]
    cuts += [(f"{f:.0%}", functools.partial(_by_length, f)) for f in fractions]
    pairs = [(a, b) for a, b in itertools.product(greedy, greedy) if self_pairs or a != b]
    jobs: list[Job] = []
    uncut: list[Record] = []
    for (initiator, continuer), (cut, cut_at), problem in itertools.product(
            pairs, cuts, problems):
        source = solos.get((initiator, problem.id))
        if source is None:
            continue
        chain = chains[initiator, problem.id]
        k = cut_at(chain)
        info = {"initiator": initiator, "continuer": continuer, "cut": cut,
                "cut_tokens": k, "chain_tokens": len(chain),
                "position": None if k is None or not len(chain) else k / len(chain)}
        if k is None:  # nothing to hand over: the hybrid is the initiator's own chain
            uncut.append({**source, **info, "phase": "relay", "uncut": True})
            continue
        jobs.append(_with_prm(continuation_job(
            f"{initiator}>{continuer}/{cut}/{problem.id}", f"{initiator}>{continuer} {cut}",
            continuer, greedy[continuer], problem, _prefix(chain, k, pool, greedy[initiator], cut),
            [initiator, cut, k, source["fingerprint"]], pool, store, max_tokens, "chain",
            phase="relay", uncut=False, **info), prm, problem, store, continuer))
    runs = run_jobs(jobs, results, concurrency, flag=flag, progress=progress)
    hybrids = list(runs.records.values()) + uncut
    return {
        "kind": "relay", "models": {n: c.model for n, c in models.items()},
        "max_tokens": max_tokens, "budgets": list(budgets), "thresholds": list(thresholds),
        "fractions": list(fractions),
        "warmup": warmup, "problems": len(problems),
        "solo": _solo_rows(greedy, solo.records.values()),
        "hybrids": _hybrid_rows(pairs, cuts, hybrids, solos),
        "errors": {**solo.errors, **runs.errors},
        "items": {"solo": list(solo.records.values()), "hybrids": hybrids},
    }


def _prefix(chain: Chain, k: int, pool: ModelPool, cfg: AgentConfig, cut: str) -> Any:
    def build() -> list[Any]:
        decode = pool.backend(cfg).decode
        return [given(chain, k, decode, role="initiator", cut=cut)] if k else []

    return build


def _with_prm(job: Job, prm: ProcessRewardModel | None, problem: Problem,
              store: TrajectoryStore, author: str) -> Job:
    """The job, with the PRM's step scores of its chain added to its record (in the worker,
    so they are kept with the item)."""
    if prm is None:
        return job
    inner = job.run

    def run(tid: str) -> Record:
        record = inner(tid)
        segments = store.read(tid)
        prefix = "".join(s.text for s in segments if s.meta.get("given"))
        written = written_chain(store, tid, author).text
        return {**record, "prm": prm_summary(prm, problem.question, prefix, written)}

    name = getattr(prm, "name", type(prm).__name__)
    return Job(job.key, job.group, fingerprint(job.fingerprint, name), run, job.finish)


def _solo_rows(models: dict[str, AgentConfig], records: Any) -> list[dict[str, Any]]:
    rows = []
    for name in models:
        items = [r for r in records if r["model"] == name]
        rows.append({"model": name, **_score(items)})
    return rows


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _by_logprobs(rule: Callable[[Sequence[float], float, int], int | None], value: float,
                 warmup: int, chain: Chain) -> int | None:
    return rule(chain.logprobs, value, warmup)


def _by_length(fraction: float, chain: Chain) -> int:
    return fraction_cut(len(chain), fraction)


def _hybrid_rows(pairs: list[tuple[str, str]], cuts: list[tuple[str, Any]],
                 hybrids: list[Record],
                 solos: dict[tuple[str, str], Record]) -> list[dict[str, Any]]:
    rows = []
    for (initiator, continuer), (cut, _) in itertools.product(pairs, cuts):
        items = [r for r in hybrids
                 if (r["initiator"], r["continuer"], r["cut"]) == (initiator, continuer, cut)]
        cut_items = [r for r in items if not r["uncut"]]
        positions = [r["position"] for r in cut_items if r["position"] is not None]
        mean_pos = sum(positions) / len(positions) if positions else None

        def same(who: str, items: list[Record] = items) -> Any:
            return _score([solos[who, r["problem"]] for r in items
                           if (who, r["problem"]) in solos])["accuracy"]

        row = {"initiator": initiator, "continuer": continuer, "cut": cut, **_score(items),
               "cut_share": len(cut_items) / len(items) if items else None,
               "mean_position": mean_pos, "stage": None if mean_pos is None else stage(mean_pos),
               "initiator_solo": same(initiator), "continuer_solo": same(continuer)}
        with_prm = [r["prm"] for r in items if r.get("prm")]
        if with_prm:
            row["prm"] = {key: _mean([p[key] for p in with_prm if p[key] is not None])
                          for key in ("prefix_mean", "continuation_mean", "mean")}
            row["prm"]["falters_in_continuation"] = sum(p["first_low"] == "continuation"
                                                        for p in with_prm)
        rows.append(row)
    return rows


def _score(items: Sequence[Record]) -> dict[str, Any]:
    n = len(items)
    return {"n": n, "correct": sum(bool(r["correct"]) for r in items),
            "accuracy": sum(bool(r["correct"]) for r in items) / n if n else None,
            "unparseable": sum(not r["parsed"] for r in items)}


def relay_markdown(result: dict[str, Any]) -> str:
    solo = markdown_table(["model", "problems", "accuracy alone", "unparseable"],
                          [[r["model"], r["n"], pct(r["accuracy"]), r["unparseable"]]
                           for r in result["solo"]])
    has_prm = any("prm" in r for r in result["hybrids"])
    headers = ["initiator", "continuer", "cut", "problems", "cut share", "mean cut position",
               "stage", "hybrid accuracy", "initiator alone", "continuer alone"]
    if has_prm:
        headers += ["PRM prefix", "PRM continuation"]
    rows = []
    for r in result["hybrids"]:
        row = [r["initiator"], r["continuer"], r["cut"], r["n"], pct(r["cut_share"], 0),
               pct(r["mean_position"], 0), r["stage"] or "n/a", pct(r["accuracy"]),
               pct(r["initiator_solo"]), pct(r["continuer_solo"])]
        if has_prm:
            prm = r.get("prm") or {}
            row += [num(prm.get("prefix_mean")), num(prm.get("continuation_mean"))]
        rows.append(row)
    return (f"Reasoning relay on {result['problems']} problems (max_tokens "
            f"{result['max_tokens']}, greedy).\n\n{solo}\n\n"
            f"{markdown_table(headers, rows)}\n\n- surprisal>B cuts go before the token where the "
            "accumulated surprisal first exceeds B nats (lower B: earlier); logprob<t cuts go "
            "before the first token with log-prob below t (higher t: earlier); an uncut chain "
            "counts as the initiator's own")
