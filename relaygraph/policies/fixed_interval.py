"""Round-robin: every agent writes a fixed number of tokens in turn."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from relaygraph.agents.agent import Agent
from relaygraph.agents.backend import Generation, StopRule
from relaygraph.policies.base import Decision, PolicyConfig, TurnContext, end_or


class FixedIntervalPolicy(PolicyConfig):
    """Round-robin over ``agents`` (two or more), ``interval`` tokens each; EOS ends the run."""

    type: Literal["fixed-interval"] = "fixed-interval"
    agents: tuple[str, ...] = ("controller", "expert")
    interval: int = Field(16, ge=1)

    @field_validator("agents")
    @classmethod
    def _distinct(cls, agents: tuple[str, ...]) -> tuple[str, ...]:
        if len(agents) < 2 or len(set(agents)) != len(agents):
            raise ValueError("fixed-interval needs two or more distinct agents")
        return agents

    def agent_names(self) -> list[str]:
        return list(self.agents)

    def first_turn(self, ctx: TurnContext) -> tuple[str, int]:
        return self.agents[0], self.interval

    def stop_rule(self, agent: str, ctx: TurnContext) -> StopRule:
        return StopRule(max_tokens=min(ctx.budget, ctx.remaining))

    def route(self, agent: Agent, generation: Generation, ctx: TurnContext) -> Decision:
        nxt = self.agents[(self.agents.index(agent.name) + 1) % len(self.agents)]
        return end_or(agent, generation, nxt, self.interval, "interval")
