"""relaygraph: several language models on one shared reasoning trajectory.

The names below are imported on first use, so ``import relaygraph`` (and the CLI's start)
stays fast. The extension surface (policies, backends, events) is :mod:`relaygraph.types`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Agent": "relaygraph.agents.agent",
    "Sampling": "relaygraph.agents.backend",
    "StopRule": "relaygraph.agents.backend",
    "RelayGraphError": "relaygraph.errors",
    "CallTokenPolicy": "relaygraph.policies",
    "SoloPolicy": "relaygraph.policies",
    "register_policy": "relaygraph.policies",
    "register_backend": "relaygraph.agents.registry",
    "RelayConfig": "relaygraph.config",
    "Relay": "relaygraph.relay",
    "RunResult": "relaygraph.relay",
    "RetryPolicy": "relaygraph.graphs.retry",
    "Segment": "relaygraph.trajectory",
    "Task": "relaygraph.trajectory",
    "Trajectory": "relaygraph.trajectory",
    "open_store": "relaygraph.trajectory",
}
__all__ = ["Agent", "CallTokenPolicy", "Relay", "RelayConfig", "RelayGraphError", "RetryPolicy", "RunResult",
           "Sampling", "Segment", "SoloPolicy", "StopRule", "Task", "Trajectory", "open_store",
           "register_backend", "register_policy"]

if TYPE_CHECKING:
    from relaygraph.agents.agent import Agent
    from relaygraph.agents.backend import Sampling, StopRule
    from relaygraph.agents.registry import register_backend
    from relaygraph.config import RelayConfig
    from relaygraph.errors import RelayGraphError
    from relaygraph.graphs.retry import RetryPolicy
    from relaygraph.policies import CallTokenPolicy, SoloPolicy, register_policy
    from relaygraph.relay import Relay, RunResult
    from relaygraph.trajectory import Segment, Task, Trajectory, open_store


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'relaygraph' has no attribute {name!r}")
