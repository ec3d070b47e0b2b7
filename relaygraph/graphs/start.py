"""The first step of a relay graph: a new trajectory, or the continuation of a stored one.

**Source of truth.** The trajectory in the store (segments and their step records) is what a
run wrote and what every number of it is computed from. A LangGraph checkpoint holds only
where the graph is — trajectory id, cursor, whose turn, budget, the totals so far, the chat
view (``messages``) and pending interrupts — so a thread can resume a paused or crashed run
in place (``graph.invoke(None, config)``, ``Command(resume=...)``), and the store's
exactly-once appends make a step that is run again write nothing twice. Without the
checkpoint (another process, another thread) the store alone continues the run: pass its
``trajectory_id`` with its question, or use ``Relay.resume``.

**Threads.** On a checkpointed thread the state outlives the run, so the start step tells
new input from leftovers:

- the question is the input's ``question`` when it differs from the thread's last one, else
  the conversation's new last human message (what chat UIs send), else ``question`` again;
- a ``trajectory_id`` equal to the one the thread's last run opened is a leftover: a new
  question on a thread always starts a new trajectory; one naming a stored trajectory of
  the same question continues it; one naming a trajectory of another question (e.g. left in
  a parent graph's state) is ignored and a new trajectory starts;
- earlier turns of the thread's ``messages`` reach the agents as a transcript before the
  question (as ``relaygraph serve`` does with a chat's history).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping
from typing import Any

from langchain_core.messages import HumanMessage
from langgraph.types import Command

from relaygraph.agents.agent import Agent
from relaygraph.agents.backend import Prompt, capabilities
from relaygraph.agents.decoding import ContextTooLongError
from relaygraph.errors import ConfigError
from relaygraph.graphs.chat import conversation, messages_of, transcript
from relaygraph.graphs.retry import RetryPolicy
from relaygraph.graphs.state import Node, RelayState
from relaygraph.observability import tracing
from relaygraph.policies.base import Policy, TurnContext
from relaygraph.trajectory import liveness
from relaygraph.trajectory.models import (
    Segment,
    Task,
    check_trajectory_id,
    new_trajectory_id,
)
from relaygraph.trajectory.store import TrajectoryStore
from relaygraph.trajectory.totals import Totals, tally


def start_node(policy: Policy, agents: Mapping[str, Agent], store: TrajectoryStore,
               max_tokens: int, task_config: dict[str, Any], retry: RetryPolicy,
               context: Callable[[RelayState], TurnContext],
               state_of: Callable[[Totals], RelayState]) -> Node:
    names = list(policy.agent_names())

    def start(state: RelayState) -> Command:
        question, history, from_messages = _question(state)
        requested = state.get("trajectory_id") or ""
        if requested and requested == state.get("started"):
            requested = ""  # the id of the thread's previous run, left in its state
        tid = check_trajectory_id(requested or new_trajectory_id())
        given = [_given(Segment.model_validate(s)) for s in state.get("prefix") or ()]
        prompt, retry_config = "", retry.model_dump()
        if store.exists(tid):
            stored = store.load(tid)
            task = stored.task
            if question and question not in (task.question, task.config.get("asked")):
                tid = new_trajectory_id()  # an id left over from another run
            else:
                segments = stored.segments
                totals, done = tally(segments, names)
                if done:  # resume a stored run from its last completed step
                    return _resume(tid, task, segments[:done], totals, done,
                                   stored.info.get("traceparent", ""))
                # no step completed: start it again, as it was asked
                given = given or list(itertools.takewhile(lambda s: s.meta.get("given"), segments))
                question, prompt = task.config.get("asked") or task.question, task.question
                retry_config = task.config.get("retry") or retry_config
        if not question or not question.strip():
            raise ConfigError("the question is empty; pass the text of a question")
        prompt = prompt or (transcript([*history, ("user", question)]) if history else question)
        fresh: RelayState = {"trajectory_id": tid, "question": question, "prompt": prompt,
                             "max_tokens": max_tokens, "generated": 0, "prefix": []}
        first, budget = policy.first_turn(context(fresh))
        task = Task(
            question=prompt, policy=policy.name, primary=policy.primary,
            agents={n: agents[n].backend.model_id for n in names},
            prices={n: price for n in names if (price := agents[n].price) is not None},
            config={"max_tokens": max_tokens,
                    "system_prompts": {n: agents[n].system_prompt for n in names},
                    "retry": retry_config,
                    **({"asked": question} if prompt != question else {}), **task_config},
        )
        fresh_run = not store.exists(tid)
        if fresh_run:  # nothing is stored for a question no agent could start on
            check_fits(agents, names, prompt)
        traceparent = tracing.begin_run(tid, policy.name, prompt)
        try:
            if fresh_run:
                store.create(tid, task)
            # this process runs it now: a heartbeat until it finishes (liveness)
            store.set_status(tid, "running", **({"traceparent": traceparent} if traceparent
                                                else {}), **liveness.holding())
            liveness.hold(store, tid)
            for position, seg in enumerate(given):  # exactly-once: a resumed run re-appends no-ops
                store.append(tid, position, seg)
        except BaseException as exc:
            tracing.end_run(tid, "error", error=exc)
            raise
        asked = [] if from_messages else [HumanMessage(content=question, id=f"{tid}-question")]
        return Command(goto=first, update={
            **fresh, "cursor": len(given), "turn": first, "budget": budget, "finish_reason": "",
            "answer": "", "call_ratio": 0.0, "asked": question, "started": tid,
            "trace": traceparent, "retry": retry_config, "messages": asked,
            "started_at": time.time(),
            **state_of(Totals(tokens_by_agent={n: 0 for n in names},
                              input_tokens_by_agent={n: 0 for n in names}))})

    def _resume(tid: str, task: Task, segments: list[Segment], totals: Totals, done: int,
                traceparent: str) -> Command:
        store.set_status(tid, "running", **liveness.holding())
        liveness.hold(store, tid)
        question = task.config.get("asked") or task.question
        traceparent = tracing.begin_run(tid, policy.name, task.question, parent=traceparent,
                                        resumed=True)
        return Command(goto=totals.turn, update={
            "trajectory_id": tid, "question": question, "prompt": task.question, "prefix": [],
            "max_tokens": task.config.get("max_tokens", max_tokens), "cursor": done,
            "turn": totals.turn, "budget": totals.budget, "finish_reason": totals.finish_reason,
            "asked": question, "started": tid, "trace": traceparent, "answer": "", "call_ratio": 0.0,
            "retry": task.config.get("retry") or retry.model_dump(), "started_at": time.time(),
            "messages": messages_of(tid, question, segments), **state_of(totals)})

    return start


def _question(state: RelayState) -> tuple[str, list[tuple[str, str]], bool]:
    """The run's question, the conversation's turns before it, and whether the question is
    already the conversation's last message."""
    last, turns = conversation(state.get("messages") or [])
    key = state.get("question") or ""
    if key and key != state.get("asked"):  # new input
        if last is not None and last != key:  # a user turn left unanswered stays in the history
            turns = [*turns, ("user", last)]
        return key, turns, last == key
    if last is not None:
        return last, turns, True
    return key, turns, False


def _given(segment: Segment) -> Segment:
    """A segment of the run's given prefix, marked so a resumed run finds where it ends."""
    return segment.model_copy(update={"meta": {**segment.meta, "given": True}})


def check_fits(agents: Mapping[str, Agent], names: list[str], question: str) -> None:
    """Raise :class:`ContextTooLongError` when the question's prompt alone fills an agent's
    context window (agents whose backends render token ids and know their window)."""
    for name in names:
        backend = agents[name].backend
        limit = getattr(backend, "max_context", None)
        if not isinstance(limit, int) or not capabilities(backend).token_ids:
            continue
        n = len(backend.render(Prompt(question, agents[name].system_prompt)))
        if n >= limit:
            raise ContextTooLongError(
                f"the question's prompt ({n} tokens) does not fit {backend.model_id}'s context "
                f"of {limit} tokens (agent {name!r}); shorten the question")
