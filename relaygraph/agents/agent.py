"""An agent: a name, a backend, and how it is prompted."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from relaygraph.agents.backend import Backend, Prompt, Sampling
from relaygraph.trajectory.models import Price, Segment

MATH_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
"""The RelayLLM paper's solver prompt (appendix C.1)."""


@dataclass
class Agent:
    """A model taking part in a relay.

    ``name`` identifies it in the trajectory and the graph (it becomes a node name);
    ``system_prompt`` is rendered with the backend's own chat template, which also gets
    ``template_kwargs`` (e.g. ``{"enable_thinking": False}``); ``price`` is what its tokens
    cost (recorded with each trajectory, reported as the run's cost).
    """

    name: str
    backend: Backend
    system_prompt: str | None = MATH_SYSTEM_PROMPT
    sampling: Sampling = field(default_factory=Sampling)
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    price: Price | None = None

    def prompt(self, question: str, view: Sequence[Segment]) -> Prompt:
        return Prompt(question=question, system_prompt=self.system_prompt,
                      continuation=tuple(view), template_kwargs=self.template_kwargs)
