"""The two runs the relay and twin experiments are made of: a model alone on a problem,
and a model continuing a given prefix. Both are graded in the main thread."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from relaygraph.eval.chains import chain_text, continuation_text
from relaygraph.eval.checking import check
from relaygraph.eval.datasets import Problem
from relaygraph.eval.models import ModelPool
from relaygraph.eval.runner import Job, Record, fingerprint
from relaygraph.trajectory.models import Segment
from relaygraph.trajectory.store import TrajectoryStore

if TYPE_CHECKING:
    from relaygraph.agents.registry import AgentConfig


def solo_job(key: str, group: str, name: str, cfg: AgentConfig, problem: Problem,
             pool: ModelPool, store: TrajectoryStore, max_tokens: int,
             seed: int | None = None, **extra: Any) -> Job:
    """``name`` (model ``cfg``) answers ``problem`` alone; ``seed`` picks a sample."""
    def run(tid: str) -> Record:
        relay = pool.solo(name, cfg, store, max_tokens, seed)
        result = relay.run(problem.question, trajectory_id=tid)
        return {**extra, "model": name, "problem": problem.id, "_text": chain_text(store, tid),
                "tokens": sum(result.tokens_by_agent.values()),
                "finish_reason": result.finish_reason, "seconds": result.seconds,
                "trajectory_id": tid}

    spec = fingerprint("solo", name, cfg.model_dump(mode="json"), max_tokens, seed, problem.digest)
    return Job(key, group, spec, run, grader(problem))


def continuation_job(key: str, group: str, name: str, cfg: AgentConfig, problem: Problem,
                     prefix: Callable[[], list[Segment]], depends: Any, pool: ModelPool,
                     store: TrajectoryStore, max_tokens: int,
                     graded: Literal["continuation", "chain"], **extra: Any) -> Job:
    """``name`` continues the segments ``prefix()`` returns (built in the worker thread);
    ``depends`` is what the prefix is a function of (for the fingerprint); the answer
    graded is the model's continuation alone, or the whole chain."""
    def run(tid: str) -> Record:
        given = prefix()
        result = pool.solo(name, cfg, store, max_tokens).run(problem.question, trajectory_id=tid,
                                                             prefix=given)
        text = continuation_text(store, tid) if graded == "continuation" else chain_text(store, tid)
        return {**extra, "model": name, "problem": problem.id, "_text": text,
                "prefix_tokens": sum(s.n_tokens for s in given),
                "tokens": sum(result.tokens_by_agent.values()),
                "finish_reason": result.finish_reason, "seconds": result.seconds,
                "trajectory_id": tid}

    spec = fingerprint("continue", name, cfg.model_dump(mode="json"), max_tokens, graded,
                       depends, problem.digest)
    return Job(key, group, spec, run, grader(problem))


def grader(problem: Problem) -> Callable[[Record], Record]:
    """Grades a record's ``_text`` (then dropped) against the problem's gold answer; a run
    cut off by the budget (``finish_reason``) has no last-number answer."""
    def finish(record: Record) -> Record:
        complete = record.get("finish_reason") not in ("budget", "length")
        verdict = check(record.pop("_text"), problem, complete)
        return {**record, "gold": problem.answer, **verdict.as_dict()}

    return finish
