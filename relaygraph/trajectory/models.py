"""The shared trajectory: a task plus an ordered list of segments, each written by one agent."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from relaygraph.errors import ConfigError

SegmentKind = Literal["text", "call", "steer", "retract", "error", "mark"]
"""``text``: reasoning an agent wrote; ``call``: a controller's ``<call>n</call>`` command;
``steer``: guidance injected by a supervisor, visible to all; ``retract``: a marker that
rolls back earlier segments (``meta["retracts"]`` lists their positions; they stay in the
store but leave every view); ``error``: a failure recorded in the run; ``mark``: an empty
segment that only carries the record of a step that appended nothing else (e.g. a
supervisor's stop)."""

FinishReason = Literal["stop", "eos", "length", "budget", "call", "low_confidence", "error"]
"""Why a segment ended: a stop string, end of sequence, the backend's token limit, the
policy's budget, a call command, a per-token confidence check, or an error."""

_ID_RE = re.compile(r"\A[A-Za-z0-9_-]{1,64}\Z")


def new_trajectory_id() -> str:
    """A collision-resistant id: millisecond time prefix (sorts by creation) + 64 random bits."""
    return f"{int(time.time() * 1000):x}-{secrets.token_hex(8)}"


def check_trajectory_id(trajectory_id: str) -> str:
    """Validate a (possibly user-supplied) id so it cannot address another key namespace."""
    if not isinstance(trajectory_id, str) or not _ID_RE.match(trajectory_id):
        raise ConfigError(
            f"invalid trajectory id {trajectory_id!r}: use 1-64 letters, digits, '-' or '_'"
        )
    return trajectory_id


def check_namespace(namespace: str) -> str:
    """Validate a store namespace (the prefix of every key) like an id, so one namespace
    cannot address another's keys."""
    if not isinstance(namespace, str) or not _ID_RE.match(namespace):
        raise ConfigError(
            f"invalid store namespace {namespace!r}: use 1-64 letters, digits, '-' or '_'"
        )
    return namespace


class Segment(BaseModel):
    """One contiguous piece of the trajectory written by one author."""

    model_config = ConfigDict(extra="forbid")

    author: str
    kind: SegmentKind = "text"
    text: str
    token_ids: list[int] | None = None
    """The author's own token ids for ``text`` (exactly what it generated), when known."""
    tokenizer: str | None = None
    """Fingerprint of the tokenizer ``token_ids`` belong to; agents that share it reuse ids."""
    logprobs: list[float] | None = None
    finish_reason: FinishReason | None = None
    tokens: int | None = None
    """How many tokens ``text`` is, when the author's token ids are unknown (a hosted model
    without a local tokenizer: its server's usage count)."""
    meta: dict[str, Any] = Field(default_factory=dict)
    """Policy details: requested call length, malformed command, handoff reason, ..."""

    @property
    def n_tokens(self) -> int:
        if self.token_ids is not None:
            return len(self.token_ids)
        return self.tokens or 0

    def content(self) -> tuple[Any, ...]:
        """What a step writes, not how sure it was: author, kind, text, token ids (and their
        tokenizer or count), finish reason and meta (command span, retracted positions, the
        step's outcome) — without log-probs or the step's confidence. A resumed step that
        prefills from scratch reproduces this exactly under greedy decoding, while its
        log-probs can differ in the last bits (up to ~0.08 in bf16); the store treats a
        re-append of equal content as the segment already there."""
        meta = dict(self.meta)
        if isinstance(meta.get("step"), dict):
            meta["step"] = {k: v for k, v in meta["step"].items() if k != "confidence"}
        return (self.author, self.kind, self.text, self.token_ids, self.tokenizer, self.tokens,
                self.finish_reason, meta)

    @property
    def plain_text(self) -> str:
        """The text without a call command: for a ``call`` segment, what lies around the
        command (``meta["command"]`` holds its ``[start, end)`` character span, since a
        token can straddle the command's edge, e.g. ``".<"``); otherwise the text."""
        if self.kind == "call":
            start, end = self.meta.get("command", (0, len(self.text)))
            return self.text[:start] + self.text[end:]
        return self.text


def retracted(segments: Sequence[Segment]) -> set[int]:
    """Positions rolled back by ``retract`` markers."""
    return {seq for s in segments if s.kind == "retract" for seq in s.meta.get("retracts", ())}


def active(segments: Sequence[Segment]) -> list[Segment]:
    """The segments views are built from: without retracted ones and markers."""
    gone = retracted(segments)
    return [s for i, s in enumerate(segments)
            if s.kind not in ("retract", "mark") and i not in gone]


def reasoning_text(segments: Sequence[Segment]) -> str:
    """The shared reasoning as plain text: without call commands, steers or errors."""
    return "".join(s.plain_text for s in segments if s.kind in ("text", "call"))


class Price(BaseModel):
    """What an agent's tokens cost, per million (in the currency the config is written in)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: float = Field(0.0, ge=0, allow_inf_nan=False)
    output: float = Field(0.0, ge=0, allow_inf_nan=False)

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input + output_tokens * self.output) / 1e6


class Task(BaseModel):
    """What the agents work on: the question and the run's settings."""

    model_config = ConfigDict(extra="forbid")

    question: str
    system_prompt: str | None = None
    policy: str = ""
    agents: dict[str, str] = Field(default_factory=dict)
    """Agent name -> model identifier."""
    primary: str = ""
    """The agent whose tokens are not counted as help (empty: the first agent)."""
    prices: dict[str, Price] = Field(default_factory=dict)
    """Agent name -> its price per million tokens (agents without one are not listed)."""
    config: dict[str, Any] = Field(default_factory=dict)
    created_at: float = Field(default_factory=time.time)

    @field_validator("question")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("the question is empty")
        return v


class Trajectory(BaseModel):
    """A task and its segments in order (``segments[i]`` is at position ``i``)."""

    id: str
    task: Task
    segments: list[Segment] = Field(default_factory=list)
    status: str = "running"
    info: dict[str, str] = Field(default_factory=dict)
    """Small facts recorded with the status (``set_status(..., **info)``): an error, where
    an interrupted run waits (``thread_id``, ``interrupt``), its trace (``traceparent``)."""

    @property
    def text(self) -> str:
        return reasoning_text(self.segments)


class StepRecord(BaseModel):
    """The outcome of one graph step, stored on the step's last segment (``meta["step"]``):
    the one record every number of a run (tokens, handoffs, counters, finish reason) is
    computed from — by the graph as it runs, by resume, and by every viewer."""

    model_config = ConfigDict(extra="ignore")

    author: str
    """The agent who wrote the step (for a supervisor review: the worker reviewed)."""
    tokens: int = 0
    """Tokens generated in the step."""
    input_tokens: int = 0
    """Prompt tokens the step's generation read (what a hosted model bills as input)."""
    to: str
    """Who writes next: an agent, ``supervisor`` or ``finish``."""
    budget: int = 0
    reason: str = ""
    counters: dict[str, int] = Field(default_factory=dict)
    moved: bool = False
    """Control moved to another agent: a handoff."""
    confidence: float | None = None


def step_of(segment: Segment) -> StepRecord | None:
    """The step record a segment carries, if any (malformed records count as none)."""
    raw = segment.meta.get("step")
    if not isinstance(raw, dict):
        return None
    try:
        return StepRecord.model_validate(raw)
    except ValueError:
        return None


@dataclass
class PruneReport:
    """What ``RedisStore.prune`` did (or, with ``dry_run``, would do)."""

    deleted: list[str] = field(default_factory=list)
    """Trajectories deleted (keys and index entries)."""
    expired: int = 0
    """Index entries whose trajectory had already expired, removed."""
    held: list[str] = field(default_factory=list)
    """Matching trajectories left alone: a live server is running them (fresh heartbeat)."""


@dataclass
class TrajectoryHeader:
    """A trajectory without its segments: its task, stored status and metadata."""

    id: str
    task: Task
    status: str
    info: dict[str, str]
