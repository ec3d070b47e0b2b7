"""The LangGraph state machine of a relay."""

from relaygraph.graphs.relay import build_graph
from relaygraph.graphs.state import RelayInput, RelayOutput, RelayState

__all__ = ["RelayInput", "RelayOutput", "RelayState", "build_graph"]
