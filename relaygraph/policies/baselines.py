"""The baselines the papers compare against, behind the same policy interface.

- :class:`SoloPolicy` — one model alone;
- :class:`QueryRouter` — the whole query to one model: ``random`` (to the large model with
  probability ``p``) or ``perfect`` (to the large model only when the small one fails
  alone, from known solo results; for evaluation);
- :class:`FixedIntervalPolicy` — round-robin, every agent writes ``interval`` tokens;
- :class:`TruncatePolicy` — reasoning relay's truncate-and-continue: the initiator writes
  until a token's confidence crosses a threshold (or for ``cut_tokens`` tokens, e.g. a
  fraction of its solo trajectory), then the continuer finishes.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from relaygraph.agents.agent import Agent
from relaygraph.agents.backend import Generation, StopRule
from relaygraph.errors import ConfigError
from relaygraph.graphs.state import RelayState
from relaygraph.policies.base import (
    Decision,
    Metric,
    end_or,
    remaining,
    score,
    unconfident,
)
from relaygraph.trajectory.models import Segment


class _SeesEverything:
    def view(self, agent: str, segments: Sequence[Segment]) -> list[Segment]:
        return list(segments)


@dataclass
class SoloPolicy(_SeesEverything):
    """``agent`` writes the whole answer until EOS or the budget."""

    agent: str = "controller"
    name: str = "solo"

    @property
    def agents(self) -> Sequence[str]:
        return (self.agent,)

    @property
    def primary(self) -> str:
        return self.agent

    def first_turn(self, state: RelayState) -> tuple[str, int]:
        return self.agent, remaining(state)

    def stop_rule(self, agent: str, state: RelayState) -> StopRule:
        return StopRule(max_tokens=remaining(state))

    def route(self, agent: Agent, generation: Generation, state: RelayState) -> Decision:
        return end_or(agent, generation, None, 0, "budget")


@dataclass
class QueryRouter(_SeesEverything):
    """Sends the whole query to ``large`` when ``to_large(question)`` is true, else to ``small``."""

    small: str
    large: str
    to_large: Callable[[str], bool]
    name: str = "query-router"

    @classmethod
    def random(cls, small: str = "controller", large: str = "expert", p: float = 0.5,
               seed: int = 0) -> QueryRouter:
        """RelayLLM's random router: large with probability ``p``, reproducible per question."""
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"random router: p must be in [0, 1], got {p}")
        return cls(small, large, lambda q: random.Random(f"{seed}\0{q}").random() < p,
                   name=f"random-router(p={p:g})")

    @classmethod
    def perfect(cls, small_solves: Mapping[str, bool] | Callable[[str], bool],
                small: str = "controller", large: str = "expert") -> QueryRouter:
        """The oracle: large only for questions ``small`` fails alone (known solo results)."""
        lookup = small_solves if callable(small_solves) else small_solves.__getitem__

        def to_large(question: str) -> bool:
            try:
                return not lookup(question)
            except KeyError:
                raise ConfigError("perfect router: no solo result for this question; run the "
                                  "small model alone on the dataset first") from None

        return cls(small, large, to_large, name="perfect-router")

    @property
    def agents(self) -> Sequence[str]:
        return (self.small, self.large)

    @property
    def primary(self) -> str:
        return self.small

    def first_turn(self, state: RelayState) -> tuple[str, int]:
        agent = self.large if self.to_large(state.get("question", "")) else self.small
        return agent, remaining(state)

    def stop_rule(self, agent: str, state: RelayState) -> StopRule:
        return StopRule(max_tokens=remaining(state))

    def route(self, agent: Agent, generation: Generation, state: RelayState) -> Decision:
        return end_or(agent, generation, None, 0, "budget")


@dataclass
class FixedIntervalPolicy(_SeesEverything):
    """Round-robin over ``agents`` (two or more), ``interval`` tokens each; EOS ends the run."""

    agents: Sequence[str] = ("controller", "expert")
    interval: int = 16
    name: str = "fixed-interval"

    def __post_init__(self) -> None:
        if self.interval < 1 or len(self.agents) < 2 or len(set(self.agents)) != len(self.agents):
            raise ConfigError("fixed-interval needs interval >= 1 and two or more distinct agents")
        self.agents = tuple(self.agents)

    @property
    def primary(self) -> str:
        return self.agents[0]

    def first_turn(self, state: RelayState) -> tuple[str, int]:
        return self.agents[0], self.interval

    def stop_rule(self, agent: str, state: RelayState) -> StopRule:
        return StopRule(max_tokens=min(state.get("budget", self.interval), remaining(state)))

    def route(self, agent: Agent, generation: Generation, state: RelayState) -> Decision:
        nxt = self.agents[(self.agents.index(agent.name) + 1) % len(self.agents)]
        return end_or(agent, generation, nxt, self.interval, "interval")


@dataclass
class TruncatePolicy(_SeesEverything):
    """Truncate-and-continue: the initiator is cut, the continuer finishes.

    The cut comes at the first token (after ``warmup``) whose ``metric`` crosses
    ``threshold`` — that token is discarded — or after ``cut_tokens`` tokens (a number,
    or a function of the question, e.g. a fraction of the initiator's solo length).
    """

    initiator: str = "controller"
    continuer: str = "expert"
    threshold: float | None = None
    metric: Metric = "logprob"
    cut_tokens: int | Callable[[str], int] | None = None
    warmup: int = 0
    name: str = "truncate"

    def __post_init__(self) -> None:
        if (self.threshold is None) == (self.cut_tokens is None):
            raise ConfigError("truncate: give exactly one of threshold and cut_tokens")

    @property
    def agents(self) -> Sequence[str]:
        return (self.initiator, self.continuer)

    @property
    def primary(self) -> str:
        return self.initiator

    def first_turn(self, state: RelayState) -> tuple[str, int]:
        cut = self.cut_tokens
        budget = remaining(state)
        if cut is not None:
            budget = min(budget, cut(state.get("question", "")) if callable(cut) else cut)
        return self.initiator, max(budget, 0)

    def stop_rule(self, agent: str, state: RelayState) -> StopRule:
        if agent == self.continuer or self.threshold is None:
            return StopRule(max_tokens=min(state.get("budget", 0), remaining(state)))
        threshold, metric, warmup = self.threshold, self.metric, self.warmup
        return StopRule(
            max_tokens=min(state.get("budget", 0), remaining(state)),
            check=lambda s: s.position >= warmup and unconfident(score(s, metric), threshold, metric),
        )

    def route(self, agent: Agent, generation: Generation, state: RelayState) -> Decision:
        if agent.name == self.continuer:
            return end_or(agent, generation, None, 0, "budget")
        left = remaining(state) - len(generation.token_ids)
        confidence = score(generation.rejected, self.metric) if generation.rejected else None
        return end_or(agent, generation, self.continuer, left, "truncate", confidence=confidence)
