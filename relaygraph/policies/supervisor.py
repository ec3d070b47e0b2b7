"""Supervisor policy: workers write in chunks; a supervisor reviews each chunk.

After every chunk (``chunk_tokens`` tokens, or a step boundary such as a blank line) the
supervisor returns a :class:`Verdict`: ``continue``, ``switch`` to another worker,
``steer`` (append guidance visible to all), ``rollback`` the chunk (it stays in the store,
marked retracted, and leaves every view; guidance may come with it) or ``stop``.

A supervisor is any callable ``(Review) -> Verdict | None`` (None means continue):

- a rule or classifier function of the user's (:func:`keyword_guard` is a ready one;
  ``--supervisor module:function`` loads one);
- :class:`JudgeSupervisor`: a model prompted as a judge, answering JSON, parsed robustly;
- :class:`ScoreSupervisor`: a model's per-step score (log-prob of " good" minus " bad").
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ValidationError

from relaygraph.agents.agent import Agent
from relaygraph.agents.backend import Generation, Prompt, StopRule
from relaygraph.errors import ConfigError
from relaygraph.graphs.state import RelayState
from relaygraph.policies.base import SUPERVISOR, Decision, active, remaining, segment
from relaygraph.trajectory.models import Segment, reasoning_text

Action = Literal["continue", "switch", "steer", "rollback", "stop"]
ACTIONS: tuple[str, ...] = ("continue", "switch", "steer", "rollback", "stop")


class Verdict(BaseModel):
    """A supervisor's decision after a chunk."""

    action: Action = "continue"
    guidance: str | None = None
    """Steer text (for ``steer``, and optionally with ``rollback``)."""
    worker: str | None = None
    """Who writes next (``switch``; default: the next worker in order)."""
    reason: str = ""
    score: float | None = None


@dataclass(frozen=True)
class Review:
    """What a supervisor sees: the question, the active trajectory, the latest chunk."""

    question: str
    segments: Sequence[Segment]
    chunk: Segment
    worker: str

    @property
    def text(self) -> str:
        return reasoning_text(list(self.segments))


Supervisor = Callable[[Review], "Verdict | None"]


@dataclass
class SupervisorPolicy:
    """Workers take turns in chunks under a supervisor's review (a ``supervisor`` node)."""

    supervisor: Supervisor
    workers: Sequence[str] = ("controller",)
    chunk_tokens: int = 48
    chunk_stops: tuple[str, ...] = ("\n\n",)
    name: str = "supervisor"

    def __post_init__(self) -> None:
        self.workers = tuple(self.workers)
        if not self.workers or len(set(self.workers)) != len(self.workers):
            raise ConfigError("supervisor: give one or more distinct workers")
        if SUPERVISOR in self.workers:
            raise ConfigError(f"{SUPERVISOR!r} is the supervisor node's name; rename that worker")
        if self.chunk_tokens < 1:
            raise ConfigError("supervisor: chunk_tokens must be >= 1")

    @property
    def agents(self) -> Sequence[str]:
        return self.workers

    @property
    def primary(self) -> str:
        return self.workers[0]

    def first_turn(self, state: RelayState) -> tuple[str, int]:
        return self.workers[0], min(self.chunk_tokens, remaining(state))

    def view(self, agent: str, segments: Sequence[Segment]) -> list[Segment]:
        return list(segments)

    def stop_rule(self, agent: str, state: RelayState) -> StopRule:
        return StopRule(max_tokens=min(self.chunk_tokens, remaining(state)),
                        stop_strings=self.chunk_stops)

    def route(self, agent: Agent, generation: Generation, state: RelayState) -> Decision:
        seg = segment(agent, generation, finish_reason=generation.finish_reason)
        return Decision([seg], SUPERVISOR, reason="review")

    def review(self, segments: Sequence[Segment], state: RelayState) -> Decision:
        """Ask the supervisor about the latest worker chunk and act on its verdict."""
        chunk_seq = len(segments) - 1
        if chunk_seq < 0 or segments[chunk_seq].author not in self.workers:
            return Decision([], None, reason="empty")  # the worker wrote nothing this turn
        chunk = segments[chunk_seq]
        visible = active(segments)
        worker = chunk.author
        verdict = self.supervisor(Review(state.get("question", ""), visible, chunk, worker)) or Verdict()
        ended = chunk.finish_reason == "eos"
        budget = min(self.chunk_tokens, remaining(state))
        # guidance already in view is not repeated (repeats make small models loop)
        repeated = any(s.kind == "steer" and s.text == verdict.guidance for s in visible)
        steer = ([Segment(author=SUPERVISOR, kind="steer", text=verdict.guidance,
                          meta={"reason": verdict.reason})]
                 if verdict.guidance and not repeated else [])
        meta = {"reason": verdict.reason} if verdict.reason else {}
        match verdict.action:
            case "stop":
                return Decision([], None, reason="stop", confidence=verdict.score,
                                counters={"stops": 1})
            case "rollback":
                retract = Segment(author=SUPERVISOR, kind="retract", text="",
                                  meta={"retracts": [chunk_seq], **meta})
                return Decision([retract, *steer], self._worker(verdict, worker), budget,
                                "rollback", {"rollbacks": 1}, verdict.score)
            case "steer":
                return Decision(steer, self._worker(verdict, worker), budget, "steer",
                                {"steers": 1}, verdict.score)
            case "switch":
                nxt = self._worker(verdict, self.workers[(self.workers.index(worker) + 1)
                                                         % len(self.workers)])
                return Decision(steer, nxt, budget, "switch", {"switches": 1}, verdict.score)
        return Decision(steer, None if ended else worker, budget, "eos" if ended else "continue",
                        confidence=verdict.score)


    def _worker(self, verdict: Verdict, default: str) -> str:
        """The worker a verdict names (``verdict.worker``), else ``default``."""
        if verdict.worker is None:
            return default
        if verdict.worker not in self.workers:
            raise ConfigError(f"supervisor chose unknown worker {verdict.worker!r}; "
                              f"workers are {list(self.workers)}")
        return verdict.worker


# --- supervisors ------------------------------------------------------------------------

def keyword_guard(patterns: Sequence[str], guidance: str, action: Action = "rollback") -> Supervisor:
    """A rule supervisor: when the chunk matches any regex in ``patterns`` (case-insensitive),
    roll it back (or steer) with ``guidance``; otherwise continue."""
    compiled = [re.compile(p, re.IGNORECASE) for p in patterns]

    def guard(review: Review) -> Verdict | None:
        for pattern in compiled:
            if match := pattern.search(review.chunk.text):
                return Verdict(action=action, guidance=guidance,
                               reason=f"matched {pattern.pattern!r}: {match.group(0)!r}")
        return None

    return guard


def load_supervisor(spec: str) -> Supervisor:
    """Import ``module:function`` (a supervisor, or a factory taking no arguments)."""
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:  # like uvicorn: modules next to where the user runs
        sys.path.insert(0, os.getcwd())
    if not module_name or not attr:
        raise ConfigError(f"supervisor {spec!r}: expected module:function or a model name")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load supervisor {spec!r}: {exc}") from None
    if not callable(target):
        raise ConfigError(f"supervisor {spec!r} is not callable")
    return target


JUDGE_PROMPT = (
    "You supervise another model solving a problem. Read its latest step and answer with one "
    'JSON object: {"action": "continue" | "steer" | "rollback" | "stop", "guidance": "<short '
    'instruction to the model, for steer or rollback>", "reason": "<why>"}. Use rollback when '
    "the step is unsafe, off-task or wrong, steer when it needs a nudge, continue otherwise."
)


def parse_verdict(text: str) -> Verdict:
    """Read a judge's answer: the first JSON object with a valid action, else the first
    action word; anything unreadable means ``continue`` (with the reason saying so)."""
    for match in re.finditer(r"\{[^{}]*\}", text):
        try:
            data = json.loads(match.group(0))
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k in Verdict.model_fields}
            if isinstance(data.get("action"), str):
                data["action"] = data["action"].strip().lower()
            try:
                return Verdict.model_validate(data)
            except ValidationError:
                continue
    word = re.search(r"\b(" + "|".join(ACTIONS) + r")\b", text, re.IGNORECASE)
    if word:
        return Verdict(action=word.group(1).lower(), reason="keyword in judge output")  # type: ignore[arg-type]
    return Verdict(reason="unparsed judge output")


@dataclass
class JudgeSupervisor:
    """A model prompted as a judge (its own chat template), answering a JSON verdict."""

    judge: Agent
    instructions: str = JUDGE_PROMPT
    max_tokens: int = 96

    def __call__(self, review: Review) -> Verdict:
        question = (f"Problem:\n{review.question}\n\nReasoning so far:\n{review.text}\n\n"
                    f"Latest step:\n{review.chunk.text}\n\nAnswer with the JSON object only.")
        generation = self.judge.backend.generate(
            Prompt(question, self.instructions), StopRule(max_tokens=self.max_tokens,
                                                          stop_strings=("}",)))
        return parse_verdict(generation.text)


@dataclass
class ScoreSupervisor:
    """Scores each step with a model: log P(" good") - log P(" bad") after a rating prompt.

    Below ``threshold`` the step is rolled back (``action``) with ``guidance``.
    """

    scorer: Agent
    threshold: float = 0.0
    action: Action = "rollback"
    guidance: str | None = "Let me re-check that step carefully."

    def __call__(self, review: Review) -> Verdict:
        question = (f"Problem:\n{review.question}\n\nStep:\n{review.chunk.text}\n\n"
                    "Is this step correct and on task? Answer good or bad.")
        logprobs = self.scorer.backend.next_token_logprobs(  # type: ignore[attr-defined]
            Prompt(question, "You rate reasoning steps."), [" good", " bad"])
        value = logprobs[" good"] - logprobs[" bad"]
        if value < self.threshold:
            return Verdict(action=self.action, guidance=self.guidance, score=value,
                           reason=f"score {value:.2f} < {self.threshold}")
        return Verdict(score=value)
