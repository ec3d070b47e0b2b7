"""Supervisor policy: workers write in chunks; a supervisor reviews each chunk.

After every chunk (``chunk_tokens`` tokens, or a step boundary such as a blank line) the
supervisor returns a :class:`Verdict`: ``continue``, ``switch`` to another worker,
``steer`` (append guidance visible to all), ``rollback`` the chunk (it stays in the store,
marked retracted, and leaves every view; guidance may come with it) or ``stop``.

A supervisor is any callable ``(Review) -> Verdict | None`` (None means continue):

- a rule or classifier function of the user's (:func:`keyword_guard` is a ready one;
  ``--supervisor module:function`` loads one);
- :class:`JudgeSupervisor`: a model prompted as a judge, answering JSON, parsed robustly;
- :class:`ScoreSupervisor`: a model's per-step score (log-prob of " good" minus " bad");
- a person: :func:`ask_human` (``ask:human``) asks after every chunk, :func:`human_review`
  only about the chunks a rule flags. They pause the run with LangGraph's ``interrupt()``
  (the relay needs a checkpointer) and read the verdict from the answer it is resumed with
  (:func:`human_verdict`).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, ValidationError, field_serializer, field_validator

from relaygraph.agents.agent import Agent
from relaygraph.agents.backend import Generation, Prompt, ScoringBackend, StopRule
from relaygraph.errors import ConfigError
from relaygraph.policies.base import SUPERVISOR, Decision, PolicyConfig, TurnContext, segment
from relaygraph.trajectory.models import Segment, active, reasoning_text

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


class SupervisorPolicy(PolicyConfig):
    """Workers take turns in chunks under a supervisor's review (a ``supervisor`` node).

    ``supervisor``: a callable ``(Review) -> Verdict | None``, or in a config
    ``module:function`` (a rule/classifier), ``judge:AGENT`` (an agent prompted as a judge),
    ``score:AGENT`` (an agent's log-prob score of " good" vs " bad") or ``ask:human`` (the
    person running it, through LangGraph's ``interrupt()``).
    """

    type: Literal["supervisor"] = "supervisor"
    supervisor: str | Callable[[Review], Verdict | None]
    workers: tuple[str, ...] = ("controller",)
    chunk_tokens: int = Field(48, ge=1)
    chunk_stops: tuple[str, ...] = ("\n\n",)
    score_threshold: float = Field(0.0, allow_inf_nan=False)
    trusted_fields: ClassVar[frozenset[str]] = frozenset({"supervisor"})

    @field_validator("workers")
    @classmethod
    def _workers(cls, workers: tuple[str, ...]) -> tuple[str, ...]:
        if not workers or len(set(workers)) != len(workers):
            raise ValueError("supervisor: give one or more distinct workers")
        if SUPERVISOR in workers:
            raise ValueError(f"{SUPERVISOR!r} is the supervisor node's name; rename that worker")
        return workers

    @field_validator("supervisor")
    @classmethod
    def _spec(cls, spec: Any) -> Any:
        if isinstance(spec, str):
            kind, sep, rest = spec.partition(":")
            if not sep or not kind or not rest:
                raise ValueError(f"supervisor {spec!r}: expected module:function, judge:AGENT, "
                                 "score:AGENT or ask:human")
            if kind == "ask" and rest != "human":
                raise ValueError(f"supervisor {spec!r}: the one asker is ask:human")
        return spec

    @field_serializer("supervisor")
    def _dump_supervisor(self, spec: Any) -> str:
        return spec if isinstance(spec, str) else f"python:{getattr(spec, '__qualname__', spec)}"

    def untrusted(self) -> dict[str, Any]:
        """A ``module:function`` (code to import) or a Python callable; ``judge:AGENT``,
        ``score:AGENT`` and ``ask:human`` name no code."""
        if isinstance(self.supervisor, str) and self.supervisor.partition(":")[0] in (
                "judge", "score", "ask"):
            return {}
        return {"supervisor": self._dump_supervisor(self.supervisor)}

    def _model_agent(self) -> str | None:
        if isinstance(self.supervisor, str):
            kind, _, agent = self.supervisor.partition(":")
            if kind in ("judge", "score"):
                return agent
        return None

    def agent_names(self) -> list[str]:
        return list(self.workers)

    def required_agents(self) -> list[str]:
        judge = self._model_agent()
        return [*self.workers, *([judge] if judge and judge not in self.workers else [])]

    def check(self) -> None:
        if isinstance(self.supervisor, str) and self.supervisor.partition(":")[0] not in (
                "judge", "score", "ask"):
            load_supervisor(self.supervisor)

    def build(self, agents: Mapping[str, Agent]) -> SupervisorPolicy:
        """Resolve a ``judge:``/``score:``/``module:function`` supervisor into a callable."""
        spec = self.supervisor
        if not isinstance(spec, str):
            return self
        kind, _, name = spec.partition(":")
        resolved: Callable[[Review], Verdict | None]
        if kind == "judge":
            resolved = JudgeSupervisor(agents[name])
        elif kind == "score":
            resolved = ScoreSupervisor(agents[name], self.score_threshold)
        elif kind == "ask":
            resolved = ask_human
        else:
            resolved = load_supervisor(spec)
        return self.model_copy(update={"supervisor": resolved})

    def _verdict(self, review: Review) -> Verdict | None:
        if isinstance(self.supervisor, str):
            raise ConfigError("the supervisor policy must be built (Relay.from_config does it) "
                              "before it runs")
        verdict = self.supervisor(review)
        if verdict is not None and not isinstance(verdict, Verdict):
            raise ConfigError(f"the supervisor returned {type(verdict).__name__}; a supervisor "
                              "returns a Verdict or None")
        return verdict

    def first_turn(self, ctx: TurnContext) -> tuple[str, int]:
        return self.workers[0], min(self.chunk_tokens, ctx.remaining)

    def stop_rule(self, agent: str, ctx: TurnContext) -> StopRule:
        return StopRule(max_tokens=min(self.chunk_tokens, ctx.remaining),
                        stop_strings=self.chunk_stops)

    def route(self, agent: Agent, generation: Generation, ctx: TurnContext) -> Decision:
        seg = segment(agent, generation, finish_reason=generation.finish_reason)
        return Decision([seg], SUPERVISOR, reason="review")

    def review(self, segments: Sequence[Segment], ctx: TurnContext) -> Decision:
        """Ask the supervisor about the latest worker chunk and act on its verdict."""
        chunk_seq = len(segments) - 1
        if chunk_seq < 0 or segments[chunk_seq].author not in self.workers:
            return Decision([], None, reason="empty")  # the worker wrote nothing this turn
        chunk = segments[chunk_seq]
        visible = active(segments)
        worker = chunk.author
        verdict = self._verdict(Review(ctx.question, visible, chunk, worker)) or Verdict()
        ended = chunk.finish_reason == "eos"
        budget = min(self.chunk_tokens, ctx.remaining)
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
    if os.getcwd() not in sys.path:  # modules next to where the user runs, searched last
        sys.path.append(os.getcwd())
    if not module_name or not attr:
        raise ConfigError(f"supervisor {spec!r}: expected module:function or a model name")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load supervisor {spec!r}: {exc}") from None
    if not callable(target):
        raise ConfigError(f"supervisor {spec!r} is not callable")
    if inspect.isbuiltin(target) or getattr(target, "__module__", None) != module_name:
        # os:system, builtins:exec, a function imported into the module from elsewhere
        raise ConfigError(f"supervisor {spec!r} is not a function defined in {module_name!r}; "
                          "name the module that defines your supervisor")
    if not _takes(target, 1):
        if not _takes(target, 0):
            raise ConfigError(f"supervisor {spec!r} must take one argument (the Review) or, "
                              "as a factory, none")
        target = target()  # a factory
        if not callable(target) or not _takes(target, 1):
            raise ConfigError(f"supervisor factory {spec!r} must return a callable taking "
                              "one argument (the Review)")
    return target


def _takes(target: Callable[..., Any], n: int) -> bool:
    """Whether ``target`` can be called with ``n`` positional arguments."""
    try:
        inspect.signature(target).bind(*range(n))
    except TypeError:
        return False
    except ValueError:  # no signature to read: assume so
        return True
    return True


# --- a person in the loop -------------------------------------------------------------------

HUMAN_OPTIONS = "continue | rollback[: guidance] | steer: guidance | switch[: worker] | stop"
_SHORT = {"": "continue", "c": "continue", "y": "continue", "yes": "continue", "ok": "continue",
          "r": "rollback", "n": "rollback", "no": "rollback", "s": "stop"}


def human_verdict(answer: Any, guidance: str | None = None) -> Verdict:
    """A person's answer as a verdict: a :class:`Verdict`, a dict of its fields, None
    (continue) or text — ``continue`` (or empty, ``y``), ``rollback`` (``n``, ``r``),
    ``stop``, ``switch``, optionally followed by ``: text`` (the guidance; for ``switch`` the
    worker). ``guidance`` is used for a rollback that brings none. Raises ``ValueError`` for
    anything else."""
    if answer is None:
        return Verdict(reason="human")
    if isinstance(answer, Verdict):
        verdict = answer
    elif isinstance(answer, Mapping):
        verdict = Verdict.model_validate({"reason": "human", **answer})
    elif isinstance(answer, str):
        head, sep, rest = answer.strip().partition(":")
        action = _SHORT.get(head.strip().lower(), head.strip().lower())
        if action not in ACTIONS:
            raise ValueError(f"answer {answer!r}: expected {HUMAN_OPTIONS}")
        rest = rest.strip()
        if action == "switch":
            verdict = Verdict(action="switch", worker=rest or None, reason="human")
        else:
            verdict = Verdict.model_validate({"action": action, "guidance": rest + "\n" if rest else None,
                                              "reason": "human"})
    else:
        raise ValueError(f"answer {answer!r}: expected text, a dict or a Verdict")
    if verdict.action == "steer" and not verdict.guidance:
        raise ValueError("steer needs guidance: steer: <text>")
    if verdict.action == "rollback" and verdict.guidance is None and guidance:
        verdict = verdict.model_copy(update={"guidance": guidance})
    return verdict


def ask(review: Review, flagged: Verdict | None = None, guidance: str | None = None) -> Verdict:
    """Pause the run and ask a person about the latest chunk (LangGraph ``interrupt()``; the
    relay needs a checkpointer). An answer that cannot be read is asked again."""
    from langgraph.types import interrupt

    payload: dict[str, Any] = {
        "type": "review", "question": review.question, "worker": review.worker,
        "chunk": review.chunk.text, "so_far": review.text, "options": HUMAN_OPTIONS}
    if flagged is not None:
        payload["flag"] = flagged.reason or flagged.action
    while True:
        answer = interrupt(payload)
        try:
            return human_verdict(answer, guidance)
        except (ValueError, ValidationError) as exc:
            payload = {**payload, "error": str(exc).splitlines()[0]}


def ask_human(review: Review) -> Verdict:
    """``ask:human``: a person reviews every chunk."""
    return ask(review)


def human_review(flag: Supervisor, guidance: str | None = None) -> Supervisor:
    """A person reviews only the chunks ``flag`` (a rule supervisor such as
    :func:`keyword_guard`) objects to; the rule's guidance is the default for a rollback."""

    def review(review: Review) -> Verdict | None:
        flagged = flag(review)
        if flagged is None or flagged.action == "continue":
            return None
        return ask(review, flagged, guidance if guidance is not None else flagged.guidance)

    return review


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
        return Verdict.model_validate({"action": word.group(1).lower(),
                                       "reason": "keyword in judge output"})
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
        backend = self.scorer.backend
        if not isinstance(backend, ScoringBackend):
            raise ConfigError(f"score:{self.scorer.name}: its backend cannot score tokens "
                              "(use a local transformers model, or judge:AGENT)")
        logprobs = backend.next_token_logprobs(Prompt(question, "You rate reasoning steps."),
                                               [" good", " bad"])
        value = logprobs[" good"] - logprobs[" bad"]
        if value < self.threshold:
            return Verdict(action=self.action, guidance=self.guidance, score=value,
                           reason=f"score {value:.2f} < {self.threshold}")
        return Verdict(score=value)
