"""Agents and their backends."""

from relaygraph.agents.agent import MATH_SYSTEM_PROMPT, Agent
from relaygraph.agents.backend import (
    Backend,
    Capabilities,
    Generation,
    Prompt,
    Sampling,
    StopRule,
    TokenStep,
    capabilities,
)

__all__ = ["MATH_SYSTEM_PROMPT", "Agent", "Backend", "Capabilities", "Generation", "Prompt",
           "Sampling", "StopRule", "TokenStep", "capabilities"]
