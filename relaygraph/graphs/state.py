"""The LangGraph state of a relay: ids, cursor, turn, budgets and counters — never the text."""

from __future__ import annotations

from typing import Any

from typing_extensions import TypedDict


class RelayInput(TypedDict, total=False):
    """What a caller (or a parent graph) passes in: a question, or the id of a stored
    trajectory to continue."""

    question: str
    trajectory_id: str
    prefix: list[dict[str, Any]]
    """Segments (as dicts) placed before the first turn: given reasoning, e.g. another
    model's partial chain, that the policy's first agent continues. They are stored with
    ``meta["given"]`` and are not counted as generated tokens or against the budget."""


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
