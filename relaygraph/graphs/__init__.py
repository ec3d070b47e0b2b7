"""The LangGraph state machine of a relay."""

from relaygraph.graphs.state import RelayInput, RelayOutput, RelayState
from relaygraph.graphs.relay import build_graph

__all__ = ["RelayInput", "RelayOutput", "RelayState", "build_graph"]
