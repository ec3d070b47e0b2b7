"""The call-token policy with RelayLLM's exact semantics.

The controller writes with a stop on ``</call>``. When its *own* new text ends a valid
``<call>n</call>`` (n a positive ASCII integer, whitespace allowed around it), control goes
to the expert for at most ``n`` tokens, clipped to ``max_call_tokens`` and to the run's
remaining budget. The expert's view has call segments stripped; the controller's keeps
them. The expert stopping at EOS ends the answer; otherwise control returns to the
controller. Anything else that looks like a command (``<call>abc</call>``,
``<call>0</call>``, a ``</call>`` with no opening tag) is recorded and kept as plain text.

Only the controller's generated text is ever parsed: a command inside the question, a
retrieved document or the expert's output is just text and never triggers a call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from relaygraph.agents.agent import MATH_SYSTEM_PROMPT, Agent
from relaygraph.agents.backend import Capabilities, CommandSyntax, Generation, StopRule
from relaygraph.agents.catalog import RELAY_CONTROLLER
from relaygraph.policies.base import (
    NOTHING,
    Decision,
    PolicyConfig,
    TurnContext,
    segment,
    split_tokens,
)
from relaygraph.trajectory.models import Segment

CALL_OPEN, CALL_CLOSE = "<call>", "</call>"
TEACHER_FREE_BAN = (CALL_OPEN[:-1], CALL_CLOSE[:-1])
"""What teacher-free decoding bans: ``<call`` and ``</call``, not the whole tags. The
command is several tokens (``<`` ``call`` ``>`` for Qwen), and a ban of the whole tag
stops only its last one: a controller trained to write the command then writes ``<call``
and, ``>`` refused, the digits it was trained to follow it with (``then<call000...``
until the budget). Banning the opening word keeps the command from ever starting."""
MAX_CALL_N = 10**18
"""Requested lengths above this parse as this (they are clipped to the budget anyway)."""

PROMPTED_CALL_SYSTEM_PROMPT = (
    MATH_SYSTEM_PROMPT
    + " You can ask a stronger expert model for help at any point: write <call>n</call>,"
    " where n is how many tokens the expert should write (for example <call>50</call>)."
    " The expert then continues your reasoning for up to n tokens and you carry on from"
    " there. Call only when a step is hard; every expert token costs more."
)
"""For untrained controllers: the system prompt explains the call tool (the prompted variant)."""


@dataclass(frozen=True)
class CallCommand:
    """A ``<call>...</call>`` found in a controller's text; ``n is None`` when malformed."""

    start: int
    """Character index where the command begins (the ``<call>`` tag, or the stray ``</call>``)."""
    raw: str
    n: int | None


def parse_call(text: str) -> CallCommand | None:
    """The command closed by the last ``</call>`` in ``text``, or None if there is none.

    Never raises. Huge numbers parse (the caller clips them); ``n`` is None for a
    non-numeric, zero, negative or non-ASCII-digit body, or a close tag with no opening.
    """
    end = text.rfind(CALL_CLOSE)
    if end < 0:
        return None
    start = text.rfind(CALL_OPEN, 0, end)
    if start < 0:
        return CallCommand(start=end, raw=CALL_CLOSE, n=None)
    body = text[start + len(CALL_OPEN):end].strip()
    n: int | None = None
    if body.isascii() and body.isdigit():
        digits = body.lstrip("0")
        # Clip absurd lengths before int() (Python refuses > 4300 digits); callers clip n anyway.
        n = (int(digits) if len(digits) <= 18 else MAX_CALL_N) if digits else None
    return CallCommand(start=start, raw=text[start:end + len(CALL_CLOSE)], n=n)


class _CallPolicy(PolicyConfig):
    """The controller asks the expert for ``n`` tokens by writing ``<call>n</call>``.

    ``max_call_tokens`` caps one call; ``min_call_tokens`` grants each call at least that
    many tokens (within the cap and the budget); ``max_calls`` caps calls per run (later
    commands are recorded as refused and the controller continues). ``teacher_free``: the paper's
    teacher-free inference — the controller may not write the command at all (``<call``
    and ``</call`` are banned at decode time), so the expert never writes.
    """

    controller: str = "controller"
    expert: str = "expert"
    max_call_tokens: int | None = Field(1024, ge=1)
    """Most tokens one call may ask for (None: only the run's remaining budget)."""
    min_call_tokens: int | None = Field(None, ge=1)
    """Fewest tokens a call is granted, whatever it asked for (None: what it asked for, as
    RelayLLM). For a controller whose learned lengths are too short for the expert to
    finish a step; the command's ``requested`` keeps what it asked for."""
    max_calls: int = Field(32, ge=0)
    teacher_free: bool = False
    strict_commands: bool = Field(False, exclude_if=lambda strict: not strict)
    """Decode only well-formed commands: ``</call>`` only right after ``<call>`` and 1-4
    digits, nothing else after ``<call>`` (the controller still decides when to write it).
    Beyond the paper: for a controller trained on the command tokens' head alone, whose
    digits and closing tag come from the base model. Local (transformers) controllers
    only. Left out of the config's dump when off, so results stored before it existed
    still match."""

    @model_validator(mode="after")
    def _two_agents(self) -> _CallPolicy:
        if self.controller == self.expert:
            raise ValueError("the controller and the expert must be different agents")
        if self.min_call_tokens and self.max_call_tokens and self.min_call_tokens > self.max_call_tokens:
            raise ValueError(f"min_call_tokens ({self.min_call_tokens}) is above max_call_tokens "
                             f"({self.max_call_tokens}); lower it or raise the cap")
        return self

    def agent_names(self) -> list[str]:
        return [self.controller, self.expert]

    def needs(self, agent: str) -> Capabilities:
        """The controller's token ids: a command is cut out of its generation at a token
        boundary (the expert may be any model, e.g. a hosted chat model)."""
        if agent != self.controller:
            return NOTHING
        return Capabilities(token_ids=True, logprobs=False,
                            constrained=self.strict_commands and not self.teacher_free)

    def view(self, agent: str, segments: Sequence[Segment]) -> list[Segment]:
        """The controller sees everything; the expert sees call segments without the command
        (text around it that shares a token with the command stays, re-encoded as text)."""
        if agent != self.expert:
            return list(segments)
        view = []
        for seg in segments:
            if seg.kind != "call":
                view.append(seg)
            elif rest := seg.plain_text:
                view.append(Segment(author=seg.author, text=rest))
        return view

    def stop_rule(self, agent: str, ctx: TurnContext) -> StopRule:
        if agent == self.controller and self.teacher_free:
            return StopRule(max_tokens=ctx.remaining, bad_words=TEACHER_FREE_BAN)
        if agent == self.controller:
            return StopRule(max_tokens=ctx.remaining, stop_strings=(CALL_CLOSE,),
                            command=CommandSyntax(CALL_OPEN, CALL_CLOSE)
                            if self.strict_commands else None)
        return StopRule(max_tokens=min(ctx.budget, ctx.remaining))

    def route(self, agent: Agent, generation: Generation, ctx: TurnContext) -> Decision:
        if agent.name == self.expert:
            if generation.finish_reason == "eos":
                return Decision([segment(agent, generation, finish_reason="eos")], None, reason="eos")
            return Decision([segment(agent, generation, finish_reason="budget")], self.controller,
                            budget=ctx.remaining - generation.n_tokens,
                            reason="call_done")
        return self._route_controller(agent, generation, ctx)

    def _route_controller(self, agent: Agent, gen: Generation, ctx: TurnContext) -> Decision:
        left = ctx.remaining - gen.n_tokens
        command = parse_call(gen.text) if gen.finish_reason == "stop" else None
        if command is None:
            reason = "eos" if gen.finish_reason == "eos" else "budget"
            return Decision([segment(agent, gen, finish_reason=gen.finish_reason)], None, reason=reason)
        if command.n is None:
            return Decision(
                [segment(agent, gen, finish_reason="stop", malformed_call=command.raw)],
                self.controller, budget=left, reason="malformed_call",
                counters={"malformed_calls": 1},
            )
        cut = split_tokens(agent, gen.token_ids, command.start)
        head = ([segment(agent, gen, gen.token_ids[:cut], gen.logprobs[:cut], finish_reason="call")]
                if cut else [])
        cap = left if self.max_call_tokens is None else min(left, self.max_call_tokens)
        granted = min(max(command.n, self.min_call_tokens or 0), cap)
        refused = "max_calls" if ctx.counters.get("calls", 0) >= self.max_calls else (
            "no_budget" if granted <= 0 else None)
        offset = command.start - len(agent.backend.decode(gen.token_ids[:cut]))
        call = segment(agent, gen, gen.token_ids[cut:], gen.logprobs[cut:], kind="call",
                       finish_reason="call", command=[offset, offset + len(command.raw)],
                       requested=command.n,
                       granted=0 if refused else granted, **({"refused": refused} if refused else {}))
        if refused:
            return Decision(head + [call], self.controller if left > 0 else None, budget=left,
                            reason=f"call_refused:{refused}", counters={"refused_calls": 1})
        return Decision(head + [call], self.expert, budget=granted, reason="call",
                        counters={"calls": 1})


class CallTokenPolicy(_CallPolicy):
    __doc__ = _CallPolicy.__doc__

    type: Literal["call-token"] = "call-token"
    default_models: ClassVar[Mapping[str, str]] = {"controller": RELAY_CONTROLLER}
    """Unless the config names one, the controller is the catalog's trained relay controller
    (the plain 0.5B never writes the command)."""


class PromptedCallPolicy(_CallPolicy):
    """The call-token policy for untrained controllers: the controller's system prompt (when
    its config sets none) explains the call tool."""

    type: Literal["prompted-call"] = "prompted-call"
    system_prompts: ClassVar[Mapping[str, str]] = {"controller": PROMPTED_CALL_SYSTEM_PROMPT}
