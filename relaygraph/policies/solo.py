"""One model alone: the baseline every relay is compared with."""

from __future__ import annotations

from typing import Literal

from relaygraph.agents.agent import Agent
from relaygraph.agents.backend import Generation, StopRule
from relaygraph.policies.base import Decision, PolicyConfig, TurnContext, end_or


class SoloPolicy(PolicyConfig):
    """``agent`` writes the whole answer until EOS or the budget."""

    type: Literal["solo"] = "solo"
    agent: str = "controller"

    def agent_names(self) -> list[str]:
        return [self.agent]

    def stop_rule(self, agent: str, ctx: TurnContext) -> StopRule:
        return StopRule(max_tokens=ctx.remaining)

    def route(self, agent: Agent, generation: Generation, ctx: TurnContext) -> Decision:
        return end_or(agent, generation, None, 0, "budget")
