"""Embed a relay as one node of your own LangGraph app.

The relay graph takes ``{"question": ...}`` and returns ``answer``, ``trajectory_id``,
``call_ratio``, ...: any parent state with those keys can use it as a node directly.

    python examples/subgraph.py "What is 17 * 23?" [CONTROLLER EXPERT]
"""

from __future__ import annotations

import sys
from typing import Any, TextIO, TypedDict

from langgraph.graph import END, START, StateGraph

from relaygraph import Relay


class AppState(TypedDict, total=False):
    question: str
    answer: str
    trajectory_id: str
    call_ratio: float
    report: str


def build_app(relay: Relay):
    def report(state: AppState) -> dict:
        return {"report": f"answer {state['answer']!r} with {state['call_ratio']:.1%} expert "
                          f"tokens (trajectory {state['trajectory_id']})"}

    app = StateGraph(AppState)
    app.add_node("relay", relay.graph)  # the compiled relay graph as a subgraph
    app.add_node("report", report)
    app.add_edge(START, "relay")
    app.add_edge("relay", "report")
    app.add_edge("report", END)
    return app.compile()


def run(app: Any, question: str, out: TextIO = sys.stdout) -> dict:
    """Run the app, printing the relay's text as it is written (``stream_mode="custom"``
    from inside the subgraph: tokens, handoffs), and return its final state."""
    final: dict = {}
    for namespace, mode, chunk in app.stream({"question": question}, {"recursion_limit": 1000},
                                             stream_mode=["custom", "values"], subgraphs=True):
        if mode == "values" and not namespace:  # the parent graph's state
            final = chunk
        elif mode == "custom" and chunk.get("type") == "token":
            out.write(chunk["text"])
            out.flush()
        elif mode == "custom" and chunk.get("type") == "handoff" and chunk.get("moved"):
            out.write(f" ⟨{chunk.get('from')}→{chunk.get('to')}⟩ ")
            out.flush()
    out.write("\n")
    return final


if __name__ == "__main__":
    question = sys.argv[1] if len(sys.argv) > 1 else "What is 17 * 23?"
    # default: call-token's own pair (the trained qwen2.5-coder-0.5b-relay and the 1.5B)
    controller, expert = sys.argv[2:4] if len(sys.argv) >= 4 else (None, None)
    print(f"loading {controller or 'the default controller'} and {expert or 'expert'}…",
          file=sys.stderr, flush=True)
    relay = Relay.from_models(controller, expert, policy="call-token", max_tokens=256)
    print(run(build_app(relay), question)["report"])
