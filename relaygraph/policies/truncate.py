"""Reasoning relay's truncate-and-continue: the initiator is cut, the continuer finishes."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

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


class TruncatePolicy(PolicyConfig):
    """The initiator writes until it is cut; the continuer finishes the chain.

    The cut (the token there is discarded) comes, after ``warmup`` tokens,
    - ``rule="token"``: at the first token whose ``metric`` crosses ``threshold`` (a
      log-prob below it; a threshold closer to 0 cuts earlier);
    - ``rule="surprisal"``: where the chain's accumulated surprisal (minus the sum of its
      log-probs) first exceeds ``threshold`` nats — a lower threshold cuts earlier, as the
      reasoning-relay article describes its cuts;
    or after ``cut_tokens`` tokens.
    """

    type: Literal["truncate"] = "truncate"
    initiator: str = "controller"
    continuer: str = "expert"
    threshold: float | None = Field(None, allow_inf_nan=False)
    rule: Literal["token", "surprisal"] = "token"
    metric: Metric = "logprob"
    cut_tokens: int | None = Field(None, ge=0)
    warmup: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _one_cut(self) -> TruncatePolicy:
        if (self.threshold is None) == (self.cut_tokens is None):
            raise ValueError("truncate: give exactly one of threshold and cut_tokens")
        if self.rule == "surprisal" and (self.threshold or 0) <= 0:
            raise ValueError("truncate: a surprisal threshold is a budget in nats (> 0)")
        return self

    def agent_names(self) -> list[str]:
        return [self.initiator, self.continuer]

    def needs(self, agent: str) -> Capabilities:
        """Log-probs of the initiator when it is cut at a confidence threshold."""
        if agent == self.initiator and self.threshold is not None:
            return Capabilities(token_ids=False, logprobs=True)
        return NOTHING

    def first_turn(self, ctx: TurnContext) -> tuple[str, int]:
        budget = ctx.remaining
        if self.cut_tokens is not None:
            budget = min(budget, self.cut_tokens)
        return self.initiator, budget

    def stop_rule(self, agent: str, ctx: TurnContext) -> StopRule:
        budget = min(ctx.budget, ctx.remaining)
        threshold = self.threshold
        if agent == self.continuer or threshold is None:
            return StopRule(max_tokens=budget)
        metric, warmup = self.metric, self.warmup
        if self.rule == "surprisal":
            spent = [0.0]  # accumulated over this generation (the initiator writes one turn)

            def over_budget(step: TokenStep) -> bool:
                spent[0] -= step.logprob
                return step.position >= warmup and spent[0] > threshold

            return StopRule(max_tokens=budget, check=over_budget)
        return StopRule(max_tokens=budget, check=lambda s: (
            s.position >= warmup and unconfident(score(s, metric), threshold, metric)))

    def route(self, agent: Agent, generation: Generation, ctx: TurnContext) -> Decision:
        if agent.name == self.continuer:
            return end_or(agent, generation, None, 0, "budget")
        left = ctx.remaining - generation.n_tokens
        confidence = score(generation.rejected, self.metric) if generation.rejected else None
        return end_or(agent, generation, self.continuer, left, "truncate", confidence=confidence)
