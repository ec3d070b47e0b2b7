"""Agents and their backends."""

from relaygraph.agents.agent import MATH_SYSTEM_PROMPT, Agent
from relaygraph.agents.backend import Backend, Generation, Prompt, Sampling, StopRule, TokenStep

__all__ = ["MATH_SYSTEM_PROMPT", "Agent", "Backend", "Generation", "Prompt", "Sampling",
           "StopRule", "TokenStep"]
