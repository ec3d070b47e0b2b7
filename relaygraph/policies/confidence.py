"""Confidence-threshold relay (reasoning relay / R2R style).

The primary writes until a token's log-probability falls below ``threshold`` (or its
entropy rises above it, ``metric="entropy"``); that token is discarded and the next agent
of the chain writes ``fallback_tokens`` tokens — or stops earlier when its own confidence
recovers (``fallback_until="confident"``) or at a sentence end (``"sentence"``) — and
control returns to the primary. With three or more agents the chain escalates: a
fallback that is itself unconfident hands over to the next one.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from relaygraph.agents.agent import Agent
from relaygraph.agents.backend import Capabilities, Generation, StopRule, TokenStep
from relaygraph.policies.base import (
    NOTHING,
    Decision,
    Metric,
    PolicyConfig,
    TurnContext,
    end_or,
    score,
    unconfident,
)

SENTENCE_ENDS = (". ", ".\n", "? ", "?\n", "! ", "!\n", "\n\n")


class ConfidencePolicy(PolicyConfig):
    """Primary first; low confidence hands ``fallback_tokens`` tokens to the next agent.

    ``warmup``: primary tokens written before checks start; ``min_gap``: tokens the
    primary writes after regaining control before the next check; ``max_handoffs``: most
    fallbacks per run (None: unlimited).
    """

    type: Literal["confidence"] = "confidence"
    agents: tuple[str, ...] = ("controller", "expert")
    threshold: float = Field(-2.5, allow_inf_nan=False)
    metric: Metric = "logprob"
    fallback_tokens: int = Field(16, ge=1)
    fallback_until: Literal["tokens", "confident", "sentence"] = "tokens"
    warmup: int = Field(0, ge=0)
    min_gap: int = Field(0, ge=0)
    max_handoffs: int | None = Field(None, ge=0)

    @field_validator("agents")
    @classmethod
    def _chain(cls, agents: tuple[str, ...]) -> tuple[str, ...]:
        if len(agents) < 2 or len(set(agents)) != len(agents):
            raise ValueError("confidence needs two or more distinct agents (primary first)")
        return agents

    def agent_names(self) -> list[str]:
        return list(self.agents)

    def needs(self, agent: str) -> Capabilities:
        """Log-probs of every agent whose tokens are checked: the primary (unless no
        handoff is allowed), each agent that can escalate, and the last one when it stops
        on recovered confidence."""
        checked = (agent == self.primary and self.max_handoffs != 0) \
            or (agent != self.primary and (agent != self.agents[-1]
                                           or self.fallback_until == "confident"))
        return Capabilities(token_ids=False, logprobs=True) if checked else NOTHING

    def _low(self, step: TokenStep) -> bool:
        return unconfident(score(step, self.metric), self.threshold, self.metric)

    def stop_rule(self, agent: str, ctx: TurnContext) -> StopRule:
        budget = min(ctx.budget, ctx.remaining)
        last = agent == self.agents[-1]
        if agent == self.primary:
            done = ctx.counters.get("fallbacks", 0)
            if self.max_handoffs is not None and done >= self.max_handoffs:
                return StopRule(max_tokens=budget)
            before = ctx.tokens_by_agent.get(agent, 0)
            return StopRule(max_tokens=budget, check=lambda s: (
                before + s.position >= self.warmup and s.position >= self.min_gap and self._low(s)))
        recover = self.fallback_until == "confident"
        stops = SENTENCE_ENDS if self.fallback_until == "sentence" else ()

        def check(s: TokenStep) -> bool:
            low = self._low(s)
            return (low and not last) or (recover and s.position >= 1 and not low)

        return StopRule(max_tokens=budget, stop_strings=stops,
                        check=check if recover or not last else None)

    def route(self, agent: Agent, generation: Generation, ctx: TurnContext) -> Decision:
        left = ctx.remaining - generation.n_tokens
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
