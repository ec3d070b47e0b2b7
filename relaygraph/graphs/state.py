"""The LangGraph state of a relay: ids, cursor, turn, budgets and counters — never the text
(the text lives in the trajectory store) — plus ``messages``, the chat view of the run that
LangGraph chat UIs, Studio and parent graphs read.

The schemas are ``typing_extensions.TypedDict`` so LangGraph can build their JSON schemas on
Python 3.11 (``graph.get_input_jsonschema()``, Studio's input form).
"""

from __future__ import annotations

from typing import Annotated, Any, Protocol

from langchain_core.messages import AnyMessage
from langgraph.graph.message import add_messages
from typing_extensions import TypedDict


class RelayInput(TypedDict, total=False):
    """What a caller (or a parent graph) passes in: a question, or the id of a stored
    trajectory to continue."""

    question: str
    """The question. On a thread whose ``messages`` end with a new human message, that
    message is the question when this key is absent (what chat UIs send)."""
    trajectory_id: str
    """Continue this stored trajectory (when it holds the same question), or start a new
    one under this id. A leftover id of the thread's previous run is ignored: a new question
    on a thread is a new trajectory."""
    prefix: list[dict[str, Any]]
    """Segments (as dicts) placed before the first turn: given reasoning, e.g. another
    model's partial chain, that the policy's first agent continues. They are stored with
    ``meta["given"]`` and are not counted as generated tokens or against the budget."""
    messages: Annotated[list[AnyMessage], add_messages]
    """A conversation (LangChain messages): its last human message is the question, earlier
    turns are shown to the agents as a transcript before it."""


class RelayOutput(TypedDict, total=False):
    """What a run hands back."""

    trajectory_id: str
    answer: str
    finish_reason: str
    call_ratio: float
    tokens_by_agent: dict[str, int]
    input_tokens_by_agent: dict[str, int]
    """Prompt tokens each agent's generations read (billed input of hosted models)."""
    cost_by_agent: dict[str, float] | None
    """Money each priced agent's tokens cost (None: no agent has a price)."""
    cost: float | None
    handoffs: int
    handoff_records: list[dict[str, Any]]
    """Each handoff: ``from``, ``to``, ``reason``, ``position``, ``requested_tokens``,
    ``confidence`` (see :class:`~relaygraph.trajectory.totals.HandoffRecord`)."""
    counters: dict[str, int]
    seconds: float
    """Wall time of the run, from its start step to its finish (of this invocation, for a
    resumed run); recorded with the trajectory."""
    messages: Annotated[list[AnyMessage], add_messages]
    """The question as a ``HumanMessage``, then one ``AIMessage`` per agent turn (``name`` =
    the agent; a supervisor's guidance is named ``supervisor``; a rolled-back turn is
    removed)."""


class RelayState(RelayInput, RelayOutput, total=False):
    """Graph state. Text lives in the trajectory store; the state only points into it."""

    cursor: int
    """Number of segments in the store: the position of the next append."""
    turn: str
    """The agent writing next."""
    budget: int
    """Token budget of the coming turn."""
    max_tokens: int
    """Budget of generated tokens for the whole run (all agents together)."""
    generated: int
    """Tokens generated so far (all agents together)."""
    prompt: str
    """The task the agents see: the question, after the conversation's earlier turns."""
    started: str
    """The trajectory the start node opened last on this thread: an input still carrying
    its id is a leftover of that run, not a request to continue it."""
    asked: str
    """The question of that run (a ``question`` equal to it is not new input)."""
    trace: str
    """W3C ``traceparent`` of the run's root span: later steps, resumed or in another
    process, join the same trace."""
    retry: dict[str, Any]
    """The run's :class:`~relaygraph.graphs.retry.RetryPolicy` (recorded with the trajectory)."""
    started_at: float
    """When this invocation's start step ran (``time.time()``): the finish step's ``seconds``."""


class Node(Protocol):
    """A graph node (LangGraph passes the state by the name ``state``)."""

    def __call__(self, state: RelayState) -> Any: ...
