"""The policy protocol: a stop rule inside generation, a route decision at the graph edge.

A policy is an object over named agents. For each turn the graph asks it for the agent's
**view** of the trajectory and a **stop rule** (applied token by token inside generation),
then hands it the generation to **route**: which segments to append and who writes next.
A :class:`SupervisedPolicy` (one with a ``review`` method) also gets a ``supervisor``
node, visited whenever ``route`` sends control to :data:`SUPERVISOR`.

Policies never see the graph's state: each call gets a frozen :class:`TurnContext`.

The built-in policies are pydantic models: the policy *is* its config (validated once,
loadable from a config file, recorded with each trajectory). Subclass
:class:`PolicyConfig`, give it a ``type`` literal and register it
(:func:`relaygraph.policies.register_policy`) to make a policy usable from config files,
the CLI and sweeps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

from relaygraph.agents.agent import Agent
from relaygraph.agents.backend import Capabilities, Generation, StopRule, TokenStep
from relaygraph.trajectory.models import FinishReason, Segment, SegmentKind

SUPERVISOR = "supervisor"
NOTHING = Capabilities(token_ids=False, logprobs=False)
"""A policy's needs of an agent that generates text only."""
"""Node name of a supervised policy's supervisor (policies with a ``review`` method)."""


@dataclass(frozen=True)
class TurnContext:
    """What a policy knows of the run when it decides (a frozen snapshot per turn)."""

    question: str
    max_tokens: int
    """Budget of generated tokens for the whole run (all agents together)."""
    generated: int = 0
    """Tokens generated so far (all agents together)."""
    budget: int = 0
    """Token budget the previous decision granted the coming turn."""
    counters: Mapping[str, int] = field(default_factory=dict)
    tokens_by_agent: Mapping[str, int] = field(default_factory=dict)
    trajectory_id: str = ""

    @property
    def remaining(self) -> int:
        """Tokens left in the run's budget."""
        return max(0, self.max_tokens - self.generated)


@dataclass(frozen=True)
class Decision:
    """What a policy decides after a turn: what to append, and who writes next.

    ``next=None`` ends the run. ``budget`` is the token budget of the next turn.
    ``counters`` are added to the run's counters (e.g. ``{"calls": 1}``); ``reason`` names
    the handoff (``call``, ``call_done``, ``eos``, ...); ``confidence`` is the score that
    triggered it, when a confidence check did.
    """

    segments: Sequence[Segment]
    next: str | None
    budget: int = 0
    reason: str = ""
    counters: Mapping[str, int] = field(default_factory=dict)
    confidence: float | None = None


@runtime_checkable
class Policy(Protocol):
    """A router policy over named agents."""

    @property
    def name(self) -> str:
        """Shown in traces, records and results."""
        ...

    def agent_names(self) -> Sequence[str]:
        """Names of the agents taking part (graph nodes), the primary first."""
        ...

    @property
    def primary(self) -> str:
        """The agent whose tokens are not counted as help (the call ratio's complement)."""
        ...

    def first_turn(self, ctx: TurnContext) -> tuple[str, int]:
        """Who writes first, with what token budget."""
        ...

    def view(self, agent: str, segments: Sequence[Segment]) -> list[Segment]:
        """The part of the trajectory ``agent`` sees (retracted segments are already gone)."""
        ...

    def stop_rule(self, agent: str, ctx: TurnContext) -> StopRule:
        """How ``agent``'s coming generation stops."""
        ...

    def route(self, agent: Agent, generation: Generation, ctx: TurnContext) -> Decision:
        """Turn ``agent``'s generation into segments and choose the next writer."""
        ...


@runtime_checkable
class SupervisedPolicy(Policy, Protocol):
    """A policy whose supervisor reviews the trajectory between turns."""

    def review(self, segments: Sequence[Segment], ctx: TurnContext) -> Decision:
        """Decide after a chunk: continue, switch, steer, roll back (retract) or stop."""
        ...


class PolicyConfig(BaseModel):
    """Base of config-backed policies: a pydantic model with a ``type`` literal.

    Subclasses declare their options as fields (validated once, for Python, config files,
    the CLI and per-request overrides alike) and implement the :class:`Policy` methods,
    or override :meth:`build` to return another object that does.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    type: str
    system_prompts: ClassVar[Mapping[str, str]] = {}
    """Role field -> system prompt given to that agent when its config sets none (e.g. the
    prompted call-token policy explains the call tool to its controller)."""
    default_models: ClassVar[Mapping[str, str]] = {}
    """Role field -> model that agent runs when the user names none (e.g. the call-token
    policy's controller is the catalog's trained relay controller); roles not listed get
    the catalog's default pair."""

    def default_model(self, agent: str) -> str | None:
        """The model this policy wants for agent ``agent`` when none is named."""
        for role, model in self.default_models.items():
            if getattr(self, role, None) == agent:
                return model
        return None

    @property
    def name(self) -> str:
        return self.type

    def agent_names(self) -> list[str]:
        """The agents this policy needs (the config's ``[agents]`` must have them)."""
        raise NotImplementedError

    def required_agents(self) -> list[str]:
        """The agents to load: those taking turns, plus any the policy uses otherwise
        (e.g. a judge)."""
        return self.agent_names()

    @property
    def primary(self) -> str:
        return self.agent_names()[0]

    trusted_fields: ClassVar[frozenset[str]] = frozenset()
    """Fields that name code to import or files to read: taken only from the user's own
    config or arguments, never from a served request or a stored trajectory."""

    def untrusted(self) -> dict[str, Any]:
        """The :attr:`trusted_fields` this config sets (what a stored trajectory's config
        may not name); empty when the store may rebuild the policy as it is."""
        return {f: getattr(self, f) for f in sorted(self.trusted_fields)
                if getattr(self, f, None) is not None}

    def needs(self, agent: str) -> Capabilities:
        """What this policy needs of ``agent``'s backend beyond text (checked before a run
        starts, so a hosted model without log-probs fails up front): nothing by default."""
        return NOTHING

    def check(self) -> None:
        """Resolve and type-check what the :attr:`trusted_fields` name (code, files) before
        any model loads or anything is stored (a ``ConfigError`` if unusable); called on the
        user's own config only. Nothing to check by default."""

    def build(self, agents: Mapping[str, Agent]) -> Policy:
        """The policy to run with these loaded agents (itself, for most policies)."""
        return self

    def view(self, agent: str, segments: Sequence[Segment]) -> list[Segment]:
        """Every agent sees the whole (active) trajectory unless a policy says otherwise."""
        return list(segments)

    def first_turn(self, ctx: TurnContext) -> tuple[str, int]:
        """The primary writes first with the run's whole budget unless a policy says otherwise."""
        return self.primary, ctx.remaining

    def stop_rule(self, agent: str, ctx: TurnContext) -> StopRule:
        raise NotImplementedError

    def route(self, agent: Agent, generation: Generation, ctx: TurnContext) -> Decision:
        raise NotImplementedError


# --- helpers for policies --------------------------------------------------------------------

def segment(agent: Agent, generation: Generation, ids: Sequence[int] | None = None,
            logprobs: Sequence[float] | None = None, kind: SegmentKind = "text",
            finish_reason: FinishReason | None = None, **meta: Any) -> Segment:
    """A segment of ``agent``'s (part of a) generation, with text decoded from its ids."""
    if ids is None and generation.tokenizer is None and not generation.token_ids:
        # a backend without a local tokenizer: the text, its server's token count, and the
        # log-probs it gave (one per token, when any)
        return Segment(author=agent.name, kind=kind, text=generation.text, token_ids=None,
                       tokens=generation.n_tokens, logprobs=list(generation.logprobs) or None,
                       finish_reason=finish_reason, meta=meta)
    ids = list(generation.token_ids if ids is None else ids)
    logprobs = list(generation.logprobs if logprobs is None else logprobs)
    text = generation.text if len(ids) == len(generation.token_ids) else agent.backend.decode(ids)
    return Segment(author=agent.name, kind=kind, text=text, token_ids=ids,
                   tokenizer=generation.tokenizer, logprobs=logprobs,
                   finish_reason=finish_reason, meta=meta)


def split_tokens(agent: Agent, token_ids: Sequence[int], char_index: int) -> int:
    """The most leading tokens whose decoded text ends at or before ``char_index``."""
    lo, hi = 0, len(token_ids)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(agent.backend.decode(token_ids[:mid])) <= char_index:
            lo = mid
        else:
            hi = mid - 1
    return lo


Metric = Literal["logprob", "entropy"]


def score(step: TokenStep, metric: Metric) -> float:
    """The token's confidence score under ``metric``."""
    return step.logprob if metric == "logprob" else step.entropy


def unconfident(value: float, threshold: float, metric: Metric) -> bool:
    """Log-prob below the threshold, or entropy above it."""
    return value < threshold if metric == "logprob" else value > threshold


def end_or(agent: Agent, generation: Generation, next_agent: str | None, budget: int,
           reason: str, counters: Mapping[str, int] | None = None,
           confidence: float | None = None) -> Decision:
    """Append the whole generation; end the run on EOS, else hand over to ``next_agent``."""
    seg = segment(agent, generation, finish_reason=generation.finish_reason)
    if generation.finish_reason == "eos" or next_agent is None:
        why = "eos" if generation.finish_reason == "eos" else reason
        return Decision([seg], None, reason=why, counters=counters or {}, confidence=confidence)
    return Decision([seg], next_agent, budget=budget, reason=reason, counters=counters or {},
                    confidence=confidence)
