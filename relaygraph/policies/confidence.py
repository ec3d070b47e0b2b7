"""Confidence-threshold relay (reasoning relay / R2R style).

The primary writes until a token's log-probability falls below ``threshold`` (or its
entropy rises above it, ``metric="entropy"``); that token is discarded and the next agent
of the chain writes ``fallback_tokens`` tokens — or stops earlier when its own confidence
recovers (``fallback_until="confident"``) or at a sentence end (``"sentence"``) — and
control returns to the primary. With three or more agents the chain escalates: a
fallback that is itself unconfident hands over to the next one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from relaygraph.agents.agent import Agent
from relaygraph.agents.backend import Generation, StopRule, TokenStep
from relaygraph.errors import ConfigError
from relaygraph.graphs.state import RelayState
from relaygraph.policies.base import Decision, Metric, end_or, remaining, score, unconfident
from relaygraph.trajectory.models import Segment

SENTENCE_ENDS = (". ", ".\n", "? ", "?\n", "! ", "!\n", "\n\n")


@dataclass
class ConfidencePolicy:
    """Primary first; low confidence hands ``fallback_tokens`` tokens to the next agent.

    ``warmup``: primary tokens written before checks start; ``min_gap``: tokens the
    primary writes after regaining control before the next check; ``max_handoffs``: most
    fallbacks per run (None: unlimited).
    """

    agents: Sequence[str] = ("controller", "expert")
    threshold: float = -2.5
    metric: Metric = "logprob"
    fallback_tokens: int = 16
    fallback_until: Literal["tokens", "confident", "sentence"] = "tokens"
    warmup: int = 0
    min_gap: int = 0
    max_handoffs: int | None = None
    name: str = "confidence"

    def __post_init__(self) -> None:
        self.agents = tuple(self.agents)
        if len(self.agents) < 2 or len(set(self.agents)) != len(self.agents):
            raise ConfigError("confidence needs two or more distinct agents (primary first)")
        if self.fallback_tokens < 1 or self.warmup < 0 or self.min_gap < 0:
            raise ConfigError("confidence: fallback_tokens >= 1, warmup >= 0 and min_gap >= 0")
        if self.metric not in ("logprob", "entropy"):
            raise ConfigError(f"confidence: metric must be logprob or entropy, not {self.metric!r}")
        if self.fallback_until not in ("tokens", "confident", "sentence"):
            raise ConfigError("confidence: fallback_until must be tokens, confident or sentence")

    @property
    def primary(self) -> str:
        return self.agents[0]

    def first_turn(self, state: RelayState) -> tuple[str, int]:
        return self.primary, remaining(state)

    def view(self, agent: str, segments: Sequence[Segment]) -> list[Segment]:
        return list(segments)

    def _low(self, step: TokenStep) -> bool:
        return unconfident(score(step, self.metric), self.threshold, self.metric)

    def stop_rule(self, agent: str, state: RelayState) -> StopRule:
        budget = min(state.get("budget", 0), remaining(state))
        last = agent == self.agents[-1]
        if agent == self.primary:
            done = state.get("counters", {}).get("fallbacks", 0)
            if self.max_handoffs is not None and done >= self.max_handoffs:
                return StopRule(max_tokens=budget)
            before = state.get("tokens_by_agent", {}).get(agent, 0)
            return StopRule(max_tokens=budget, check=lambda s: (
                before + s.position >= self.warmup and s.position >= self.min_gap and self._low(s)))
        recover = self.fallback_until == "confident"
        stops = SENTENCE_ENDS if self.fallback_until == "sentence" else ()

        def check(s: TokenStep) -> bool:
            low = self._low(s)
            return (low and not last) or (recover and s.position >= 1 and not low)

        return StopRule(max_tokens=budget, stop_strings=stops,
                        check=check if recover or not last else None)

    def route(self, agent: Agent, generation: Generation, state: RelayState) -> Decision:
        left = remaining(state) - len(generation.token_ids)
        rejected = generation.rejected
        confidence = score(rejected, self.metric) if rejected else None
        index = self.agents.index(agent.name)
        escalate = rejected is not None and self._low(rejected) and index < len(self.agents) - 1
        if escalate:
            return end_or(agent, generation, self.agents[index + 1], min(self.fallback_tokens, left),
                          "low_confidence", confidence=confidence,
                          counters={"fallbacks": 1} if index == 0 else {"escalations": 1})
        if agent.name == self.primary:
            return end_or(agent, generation, None, 0, "budget")
        reason = "recovered" if rejected is not None else "fallback_done"
        return end_or(agent, generation, self.primary, left, reason, confidence=confidence)
