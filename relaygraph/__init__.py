"""relaygraph: several language models on one shared reasoning trajectory."""

from relaygraph.agents import Agent, Sampling, StopRule
from relaygraph.errors import RelayGraphError
from relaygraph.policies import CallTokenPolicy, SoloPolicy
from relaygraph.relay import Relay, RunResult
from relaygraph.trajectory import Segment, Task, Trajectory, open_store

__all__ = ["Agent", "CallTokenPolicy", "Relay", "RelayGraphError", "RunResult", "Sampling",
           "Segment", "SoloPolicy", "StopRule", "Task", "Trajectory", "open_store"]
__version__ = "0.1.0"
