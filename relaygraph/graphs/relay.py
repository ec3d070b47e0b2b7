"""Build the LangGraph ``StateGraph`` of a relay from agents, a policy and a store.

Nodes: ``start`` (creates the trajectory), one node per agent, ``finish`` (answer and
totals). An agent node asks its backend to generate under the policy's stop rule,
appends the segments the policy makes of it at the state's cursor, and hands off with
``Command(goto=...)``. Token-level decisions happen inside generation, so one handoff is
one graph step. Tokens and handoffs stream out through ``stream_mode="custom"`` as dicts:
``{"type": "token", "agent", "text"}`` and ``{"type": "handoff", "from", "to", "reason"}``.

The compiled graph takes ``{"question": ...}`` (optionally ``"prefix"``: given segments the
first turn continues, see :class:`~relaygraph.graphs.state.RelayInput`) and returns the keys of
:class:`~relaygraph.graphs.state.RelayOutput`, so it can be added as a node to a parent
graph whose state has those keys.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

from langgraph.config import get_stream_writer
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command

from relaygraph.agents.agent import Agent
from relaygraph.agents.backend import Generation, Prompt, StopRule, capabilities
from relaygraph.errors import BackendError, ConfigError, RelayGraphError
from relaygraph.graphs.state import RelayInput, RelayOutput, RelayState
from relaygraph.observability import tracing
from relaygraph.policies.base import SUPERVISOR, Decision, Policy, SupervisedPolicy, TurnContext
from relaygraph.trajectory.answers import extract_answer
from relaygraph.trajectory.models import (
    Price,
    Segment,
    StepRecord,
    Task,
    active,
    check_trajectory_id,
    new_trajectory_id,
    reasoning_text,
)
from relaygraph.trajectory.store import TrajectoryStore
from relaygraph.trajectory.totals import FINISH, Totals, tally

if TYPE_CHECKING:
    from langgraph.graph.state import CompiledStateGraph

RESERVED_NODES = frozenset({"start", FINISH, START, END})


class Node(Protocol):
    """A graph node (LangGraph passes the state by the name ``state``)."""

    def __call__(self, state: RelayState) -> Any: ...
RETRY_BACKOFF_S = 0.5


def build_graph(
    agents: Sequence[Agent],
    policy: Policy,
    store: TrajectoryStore,
    max_tokens: int = 512,
    checkpointer: Any = None,
    task_config: dict[str, Any] | None = None,
    retries: int = 2,
    fallbacks: dict[str, str] | None = None,
) -> CompiledStateGraph:
    """Compile the relay graph. ``max_tokens`` bounds generated tokens over all agents;
    ``task_config`` is recorded with each trajectory's task (e.g. the relay's config);
    a failing generation is retried ``retries`` times, then written by the agent named in
    ``fallbacks`` (``{"expert": "controller"}``) if there is one, else the run fails."""
    by_name = {a.name: a for a in agents}
    if len(by_name) != len(agents):
        raise ConfigError("agent names must be unique")
    names = list(policy.agent_names())
    if missing := [n for n in names if n not in by_name]:
        raise ConfigError(f"policy {policy.name!r} needs agents {names}; missing: {missing}")
    if clash := (RESERVED_NODES | {SUPERVISOR}) & set(by_name):
        raise ConfigError(f"agent names {sorted(clash)} are reserved; rename them")
    if max_tokens < 1:
        raise ConfigError(f"max_tokens must be >= 1, got {max_tokens}")
    fallbacks = fallbacks or {}
    if unknown := sorted({*fallbacks, *fallbacks.values()} - set(by_name)):
        raise ConfigError(f"fallbacks name unknown agents {unknown}")
    backups = {name: by_name[backup] for name, backup in fallbacks.items()}
    check_needs(policy, by_name, backups)
    seen = SegmentCache(store)

    supervised = isinstance(policy, SupervisedPolicy)
    targets = (*names, FINISH, *((SUPERVISOR,) if supervised else ()))
    graph = StateGraph(RelayState, input_schema=RelayInput, output_schema=RelayOutput)
    graph.add_node("start", _start_node(policy, by_name, store, max_tokens, task_config or {}),
                   destinations=tuple(names))
    for name in names:
        graph.add_node(name, _agent_node(by_name[name], policy, seen, retries, backups),
                       destinations=targets)
    if isinstance(policy, SupervisedPolicy):
        graph.add_node(SUPERVISOR, _supervisor_node(policy, seen), destinations=targets)
    prices = {a.name: a.price for a in agents if a.price is not None}
    graph.add_node(FINISH, _finish_node(policy, store, prices))
    graph.add_edge(START, "start")
    graph.add_edge(FINISH, END)
    return graph.compile(checkpointer=checkpointer, name=f"relaygraph:{policy.name}")


def check_needs(policy: Policy, agents: dict[str, Agent], backups: dict[str, Agent]) -> None:
    """A ConfigError, before anything runs, when an agent's backend lacks what the policy
    needs of it (log-probs for a confidence check, token ids for a command split)."""
    needs = getattr(policy, "needs", None)
    if needs is None:
        return
    for name in policy.agent_names():
        wanted = needs(name)
        for agent in (agents[name], *((backups[name],) if name in backups else ())):
            has = capabilities(agent.backend)
            model = agent.backend.model_id
            if wanted.logprobs and not has.logprobs:
                raise ConfigError(
                    f"policy {policy.name!r} checks the log-probs of agent {name!r}'s tokens, but "
                    f"{model} gives none (its server returns no log-probs); use a server that "
                    "does, or a policy without confidence checks (e.g. fixed-interval)")
            if wanted.token_ids and not has.token_ids:
                raise ConfigError(
                    f"policy {policy.name!r} needs agent {name!r}'s token ids, but {model} has "
                    "no local tokenizer; set tokenizer = \"...\" in its config, or give this "
                    "role to a local model")


def context(state: RelayState) -> TurnContext:
    """The frozen view of the run a policy decides on."""
    return TurnContext(
        question=state.get("question", ""), max_tokens=state.get("max_tokens", 0),
        generated=state.get("generated", 0), budget=state.get("budget", 0),
        counters=MappingProxyType(dict(state.get("counters") or {})),
        tokens_by_agent=MappingProxyType(dict(state.get("tokens_by_agent") or {})),
        trajectory_id=state.get("trajectory_id", ""))


def _start_node(policy: Policy, agents: dict[str, Agent], store: TrajectoryStore,
                max_tokens: int, task_config: dict[str, Any]) -> Node:
    names = list(policy.agent_names())

    def start(state: RelayState) -> Command:
        question = state.get("question", "")
        if not question or not question.strip():
            raise ConfigError("the question is empty; pass the text of a question")
        tid = check_trajectory_id(state.get("trajectory_id") or new_trajectory_id())
        given = [_given(Segment.model_validate(s)) for s in state.get("prefix") or ()]
        if store.exists(tid):  # resume a stored run from its last completed step
            task = store.load(tid).task
            stored = store.read(tid)
            totals, done = tally(stored, names)
            if done:
                store.set_status(tid, "running")
                return Command(goto=totals.turn, update={
                    "trajectory_id": tid, "question": task.question, "prefix": [],
                    "max_tokens": task.config.get("max_tokens", max_tokens), "cursor": done,
                    "turn": totals.turn, "budget": totals.budget,
                    "finish_reason": totals.finish_reason, **_state_of(totals)})
            given = given or list(itertools.takewhile(lambda s: s.meta.get("given"), stored))
        fresh: RelayState = {"trajectory_id": tid, "question": question,
                             "max_tokens": max_tokens, "generated": 0, "prefix": []}
        first, budget = policy.first_turn(context(fresh))
        task = Task(
            question=question, policy=policy.name, primary=policy.primary,
            agents={n: agents[n].backend.model_id for n in names},
            prices={n: price for n in names if (price := agents[n].price) is not None},
            config={"max_tokens": max_tokens,
                    "system_prompts": {n: agents[n].system_prompt for n in names},
                    **task_config},
        )
        if not store.exists(tid):
            store.create(tid, task)
        for position, seg in enumerate(given):  # exactly-once: a resumed run re-appends no-ops
            store.append(tid, position, seg)
        return Command(goto=first, update={
            **fresh, "cursor": len(given), "turn": first, "budget": budget, "finish_reason": "",
            **_state_of(Totals(tokens_by_agent={n: 0 for n in names},
                               input_tokens_by_agent={n: 0 for n in names}))})

    return start


def _generate(agent: Agent, prompt: Prompt, rule: StopRule, retries: int,
              on_text: Callable[[str], None], on_retry: Callable[[str], None],
              cache_key: str) -> Generation:
    """The backend's generation, retried with backoff when it raises or returns nothing
    without a reason; errors that are the user's to fix (bad input) are not retried."""
    for attempt in range(retries + 1):
        try:
            generation = agent.backend.generate(prompt, rule, agent.sampling, on_text=on_text,
                                                cache_key=cache_key)
            if generation.n_tokens or generation.finish_reason in ("eos", "stop", "low_confidence") \
                    or rule.max_tokens == 0:
                return generation
            error = "empty completion"
        except BackendError as exc:  # a backend's own report of a fault (a dead server)
            error = str(exc)
        except RelayGraphError:  # the user's to fix, or a cancellation: retrying would not help
            raise
        except Exception as exc:  # noqa: BLE001 - a backend fault (dead server, timeout, bug): retried
            error = f"{type(exc).__name__}: {exc}"
        if attempt < retries:
            on_retry(error)
            time.sleep(RETRY_BACKOFF_S * 2**attempt)
    raise BackendError(
        f"agent {agent.name!r} ({agent.backend.model_id}) failed {retries + 1} times, last: "
        f"{error[:300]}; the trajectory is kept — fix the backend, then resume the run"
    )


def _agent_node(agent: Agent, policy: Policy, store: SegmentCache, retries: int,
                fallbacks: dict[str, Agent]) -> Node:
    def node(state: RelayState) -> Command:
        tid, cursor = state["trajectory_id"], state["cursor"]
        ctx = context(state)
        writer = get_stream_writer()
        view = policy.view(agent.name, active(store.read(tid, 0, cursor)))
        rule = policy.stop_rule(agent.name, ctx)
        with tracing.agent_turn(agent, policy.name, tid, cursor) as span:
            writer_agent = agent  # who actually writes this turn (a fallback, if configured)

            def attempt(who: Agent) -> tuple[Agent, Generation]:
                # the backup writes the failed agent's turn: same view, rule and cache slot
                proxy = dataclasses.replace(who, name=agent.name)
                return proxy, _generate(
                    proxy, proxy.prompt(ctx.question, view), rule, retries,
                    on_text=span.wrap_stream(
                        lambda text: writer({"type": "token", "agent": who.name, "text": text})),
                    on_retry=lambda error: writer({"type": "retry", "agent": who.name,
                                                   "error": error}),
                    cache_key=f"{tid}/{agent.name}/{who.name}",
                )

            try:
                proxy, generation = attempt(agent)
            except BackendError as exc:
                if agent.name not in fallbacks:
                    raise
                writer_agent = fallbacks[agent.name]
                writer({"type": "fallback", "agent": agent.name, "to": writer_agent.name,
                        "error": str(exc)})
                proxy, generation = attempt(writer_agent)
            decision = policy.route(proxy, generation, ctx)
            if writer_agent is not agent:
                decision = dataclasses.replace(decision, counters={**decision.counters, "fallback_turns": 1},
                                   segments=[s.model_copy(update={
                                       "author": writer_agent.name,
                                       "meta": {**s.meta, "fallback_for": agent.name}})
                                       for s in decision.segments])
            update, handoff = _apply(decision, state, store, writer_agent.name,
                                     generation.n_tokens, policy.name, generation.prompt_tokens)
            tracing.record_turn(span, generation, handoff)
        if handoff["moved"] or handoff["to"] == FINISH:
            writer(handoff)
        return Command(goto=update["turn"], update=update)

    return node


def _supervisor_node(policy: SupervisedPolicy, store: SegmentCache) -> Node:
    def supervise(state: RelayState) -> Command:
        segments = store.read(state["trajectory_id"], 0, state["cursor"])
        writer = get_stream_writer()
        decision = policy.review(segments, context(state))
        for seg in decision.segments:
            if seg.kind == "steer":
                writer({"type": "token", "agent": SUPERVISOR, "text": seg.text})
        last = next((s.author for s in reversed(segments)
                     if s.author != SUPERVISOR and s.kind != "mark"), SUPERVISOR)
        update, handoff = _apply(decision, state, store, last, 0, policy.name)
        tracing.record_review(handoff)
        if decision.reason != "continue":
            writer({"type": "review", "action": decision.reason, "worker": last,
                    "position": update["cursor"], "score": decision.confidence})
        if handoff["moved"]:
            writer(handoff)
        return Command(goto=update["turn"], update=update)

    return supervise


def _apply(decision: Decision, state: RelayState, store: SegmentCache, author: str,
           n_tokens: int, policy_name: str,
           input_tokens: int = 0) -> tuple[RelayState, dict[str, Any]]:
    """Append the decision's segments at the cursor with the step's record; the state
    update and the handoff event."""
    tid, cursor = state["trajectory_id"], state["cursor"]
    over = state["generated"] + n_tokens >= state["max_tokens"]
    nxt = decision.next if decision.next and not over else FINISH
    # a policy that wanted to go on was stopped by the run's budget
    reason = "budget" if decision.next and nxt == FINISH else decision.reason
    step = StepRecord(author=author, tokens=n_tokens, input_tokens=input_tokens, to=nxt,
                      budget=decision.budget,
                      reason=reason, counters=dict(decision.counters),
                      moved=nxt not in (FINISH, SUPERVISOR, author),
                      confidence=decision.confidence)
    segments = [s for s in decision.segments if s.text or s.kind != "text" or s.token_ids]
    if not segments and (step.moved or step.counters or nxt == FINISH or n_tokens):
        segments = [Segment(author=author, kind="mark", text="")]  # the record needs a carrier
    if segments:  # the step's outcome rides on its last segment: what resume replays
        last = segments[-1]
        segments[-1] = last.model_copy(update={"meta": {**last.meta, "step": step.model_dump()}})
    for seg in segments:
        store.append(tid, cursor, seg)
        cursor += 1
    totals = Totals.from_state(state)
    totals.add(step, cursor)
    update: RelayState = {"cursor": cursor, "turn": nxt, "budget": decision.budget,
                          **_state_of(totals)}
    if nxt == FINISH:
        update["finish_reason"] = reason
    handoff = {"type": "handoff", "from": author, "to": nxt, "reason": reason,
               "position": cursor, "requested_tokens": decision.budget,
               "confidence": decision.confidence, "policy": policy_name, "moved": step.moved}
    return update, handoff


class SegmentCache:
    """Reads and appends of the trajectories this graph is running, remembering what was read
    or written: a stored segment never changes (appends are exactly-once), so a turn fetches
    only what it has not seen — usually nothing. Least recently used trajectories are dropped."""

    def __init__(self, store: TrajectoryStore, size: int = 256) -> None:
        self.store = store
        self.size = size
        self._known: OrderedDict[str, list[Segment]] = OrderedDict()
        self._lock = threading.Lock()

    def read(self, tid: str, start: int, end: int) -> list[Segment]:
        with self._lock:
            known = self._known.pop(tid, [])
        if len(known) < end:
            known = known + self.store.read(tid, len(known), end)
        self._remember(tid, known)
        return known[start:end]

    def append(self, tid: str, position: int, segment: Segment) -> None:
        self.store.append(tid, position, segment)
        with self._lock:
            known = self._known.pop(tid, [])
        if len(known) == position:
            known.append(segment)
        self._remember(tid, known)

    def _remember(self, tid: str, known: list[Segment]) -> None:
        with self._lock:
            self._known[tid] = known
            while len(self._known) > self.size:
                self._known.popitem(last=False)


def _state_of(totals: Totals) -> RelayState:
    """The graph-state keys a run's totals fill."""
    return {"tokens_by_agent": dict(totals.tokens_by_agent),
            "input_tokens_by_agent": dict(totals.input_tokens_by_agent),
            "counters": dict(totals.counters), "handoffs": totals.handoffs,
            "generated": totals.generated, "handoff_records": list(totals.handoff_records)}


def _given(segment: Segment) -> Segment:
    """A segment of the run's given prefix, marked so a resumed run finds where it ends."""
    return segment.model_copy(update={"meta": {**segment.meta, "given": True}})


def _finish_node(policy: Policy, store: TrajectoryStore, prices: dict[str, Price]) -> Node:
    def finish(state: RelayState) -> dict[str, Any]:
        tid = state["trajectory_id"]
        text = reasoning_text(active(store.read(tid)))  # rolled-back steps are not the answer
        answer = extract_answer(text)
        totals = Totals.from_state(state)
        store.set_status(tid, "finished", finish_reason=state.get("finish_reason") or "",
                         answer=answer)
        return {"answer": answer, "call_ratio": totals.call_ratio(policy.primary),
                "cost_by_agent": totals.cost_by_agent(prices), "cost": totals.cost(prices)}

    return finish
