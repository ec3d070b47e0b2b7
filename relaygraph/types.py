"""The documented extension surface: what a custom policy, backend or event consumer uses.

Everything here is defined in its own module (the layer it belongs to) and re-exported so
user code has one stable place to import from; other modules of relaygraph are internals.

- Policies: :class:`Policy` (protocol), :class:`SupervisedPolicy`, :class:`PolicyConfig`
  (the base of config-backed policies), :class:`TurnContext`, :class:`Decision`,
  :func:`segment` (a generation as a segment to append), :func:`register_policy`.
- Agents and backends: :class:`Agent`, :class:`Backend` / :class:`ScoringBackend`
  (protocols), :class:`AgentConfig`
  (the base of a backend's config), :func:`register_backend`, :class:`BackendWrapper`,
  :class:`StopRule`, :class:`TokenStep`, :class:`Sampling`, :class:`Prompt`,
  :class:`Generation`.
- The trajectory: :class:`Segment`, :class:`StepRecord`, :class:`HandoffRecord`.
- Events a run streams (``Relay.run(on_event=...)``, LangGraph ``stream_mode="custom"``):
  :class:`TokenEvent`, :class:`HandoffEvent`, :class:`ReviewEvent`, :class:`RetryEvent`,
  :class:`FallbackEvent`, :class:`ResultEvent` (dicts with a ``type`` key).
- Retries: :class:`RetryPolicy` (attempts and back-off of a failing generation).
"""

from __future__ import annotations

from relaygraph.agents.agent import Agent
from relaygraph.agents.backend import (
    Backend,
    Generation,
    Prompt,
    Sampling,
    ScoringBackend,
    StopRule,
    TokenStep,
)
from relaygraph.agents.registry import AgentConfig, register_backend
from relaygraph.agents.wrapping import BackendWrapper
from relaygraph.graphs.events import (
    Event,
    FallbackEvent,
    HandoffEvent,
    ResultEvent,
    RetryEvent,
    ReviewEvent,
    TokenEvent,
)
from relaygraph.graphs.retry import RetryPolicy
from relaygraph.policies.base import (
    Decision,
    Policy,
    PolicyConfig,
    SupervisedPolicy,
    TurnContext,
    segment,
)
from relaygraph.policies.registry import register_policy
from relaygraph.trajectory.models import Segment, StepRecord
from relaygraph.trajectory.totals import HandoffRecord

__all__ = ["Agent", "AgentConfig", "Backend", "BackendWrapper", "Decision", "Event", "FallbackEvent",
           "Generation", "HandoffEvent", "HandoffRecord", "Policy", "PolicyConfig", "Prompt",
           "ResultEvent", "RetryEvent", "RetryPolicy", "ReviewEvent", "Sampling", "ScoringBackend",
           "Segment", "StepRecord", "StopRule", "SupervisedPolicy", "TokenEvent", "TokenStep", "TurnContext",
           "register_backend", "register_policy", "segment"]
