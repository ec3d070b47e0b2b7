"""One model alone: the baseline every relay is compared with."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from relaygraph.agents.agent import Agent
from relaygraph.agents.backend import Generation, StopRule
from relaygraph.graphs.state import RelayState
from relaygraph.policies.base import Decision, remaining, segment
from relaygraph.trajectory.models import Segment


@dataclass
class SoloPolicy:
    """``agent`` writes the whole answer until EOS or the budget."""

    agent: str = "controller"
    name: str = "solo"

    @property
    def agents(self) -> Sequence[str]:
        return (self.agent,)

    @property
    def primary(self) -> str:
        return self.agent

    def first_budget(self, state: RelayState) -> int:
        return remaining(state)

    def view(self, agent: str, segments: Sequence[Segment]) -> list[Segment]:
        return list(segments)

    def stop_rule(self, agent: str, state: RelayState) -> StopRule:
        return StopRule(max_tokens=remaining(state))

    def route(self, agent: Agent, generation: Generation, state: RelayState) -> Decision:
        reason = "eos" if generation.finish_reason == "eos" else "budget"
        return Decision([segment(agent, generation, finish_reason=generation.finish_reason)],
                        None, reason=reason)
