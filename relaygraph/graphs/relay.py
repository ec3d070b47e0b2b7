"""Build the LangGraph ``StateGraph`` of a relay from agents, a policy and a store.

Nodes: ``start`` (a new trajectory or a stored one continued: :mod:`~relaygraph.graphs.start`),
one node per agent, ``supervisor`` (policies that review), ``finish`` (answer and totals). An
agent node asks its backend to generate under the policy's stop rule, appends the segments
the policy makes of it at the state's cursor, and hands off with ``Command(goto=...)``.
Token-level decisions happen inside generation, so one handoff is one graph step.

What a run streams:

- ``stream_mode="custom"``: dicts (:mod:`~relaygraph.graphs.events`): ``{"type": "token",
  "agent", "text"}``, ``{"type": "handoff", "from", "to", "reason", ...}``, reviews, retries;
- ``stream_mode="messages"``: each agent's tokens as ``AIMessageChunk``s named after it (each
  generation is a LangChain chat-model run: :mod:`~relaygraph.graphs.chat`), so chat UIs and
  callback handlers see every model; the state's ``messages`` get one ``AIMessage`` per turn.

A supervisor may call LangGraph's ``interrupt(payload)`` (a human in the loop): with a
checkpointer the run pauses (the trajectory's status is ``interrupted``, with the thread and
the payload) and ``Command(resume=answer)`` continues it; without one the run fails with an
error that says what to add. Every step runs inside the trajectory's trace
(:func:`~relaygraph.observability.tracing.in_run`): one trace per trajectory however the graph
is run.

The compiled graph takes ``{"question": ...}`` (or ``messages``; optionally ``"prefix"``:
given segments the first turn continues, see :class:`~relaygraph.graphs.state.RelayInput`)
and returns the keys of :class:`~relaygraph.graphs.state.RelayOutput`, so it can be added as
a node to a parent graph whose state has those keys.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from langgraph.config import get_config
from langgraph.constants import CONFIG_KEY_CHECKPOINTER
from langgraph.errors import GraphBubbleUp, GraphInterrupt
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command

from relaygraph.agents.agent import Agent
from relaygraph.agents.backend import Generation, StopRule, cache_key, capabilities
from relaygraph.errors import BackendError, ConfigError, RelayGraphError
from relaygraph.graphs.chat import LLMRun, message_id, removals, steer_messages, turn_message
from relaygraph.graphs.events import writer as event_writer
from relaygraph.graphs.retry import RetryPolicy
from relaygraph.graphs.start import start_node
from relaygraph.graphs.state import Node, RelayInput, RelayOutput, RelayState
from relaygraph.observability import tracing
from relaygraph.policies.base import SUPERVISOR, Decision, Policy, SupervisedPolicy, TurnContext
from relaygraph.trajectory import liveness
from relaygraph.trajectory.answers import extract_answer
from relaygraph.trajectory.models import Price, Segment, StepRecord, active, reasoning_text
from relaygraph.trajectory.store import PipelinedStore, TrajectoryStore
from relaygraph.trajectory.totals import FINISH, Totals

if TYPE_CHECKING:
    from langgraph.graph.state import CompiledStateGraph

RESERVED_NODES = frozenset({"start", FINISH, START, END})


def build_graph(
    agents: Sequence[Agent],
    policy: Policy,
    store: TrajectoryStore,
    max_tokens: int = 512,
    checkpointer: Any = None,
    task_config: dict[str, Any] | None = None,
    retries: int | None = None,
    fallbacks: dict[str, str] | None = None,
    retry: RetryPolicy | None = None,
) -> CompiledStateGraph:
    """Compile the relay graph. ``max_tokens`` bounds generated tokens over all agents;
    ``task_config`` is recorded with each trajectory's task (e.g. the relay's config);
    a failing generation is retried as ``retry`` says (or ``retries`` more times with the
    default back-off), then written by the agent named in ``fallbacks``
    (``{"expert": "controller"}``) if there is one, else the run fails. ``checkpointer``: a
    LangGraph checkpointer (threads, interrupts); a parent graph's or ``langgraph dev``'s is
    used when the graph runs inside one."""
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
    if retry is None:
        retry = RetryPolicy.from_retries(retries) if retries is not None else RetryPolicy()
    backups = {name: by_name[backup] for name, backup in fallbacks.items()}
    check_needs(policy, by_name, backups)
    seen = SegmentCache(store)

    supervised = isinstance(policy, SupervisedPolicy)
    targets = (*names, FINISH, *((SUPERVISOR,) if supervised else ()))
    graph = StateGraph(RelayState, input_schema=RelayInput, output_schema=RelayOutput)
    graph.add_node("start", start_node(policy, by_name, store, max_tokens, task_config or {},
                                       retry, context, _state_of),
                   destinations=tuple(names))
    for name in names:
        graph.add_node(name, _step(policy, seen, _agent_node(by_name[name], policy, seen, retry,
                                                             backups)),
                       destinations=targets)
    if isinstance(policy, SupervisedPolicy):
        graph.add_node(SUPERVISOR, _step(policy, seen, _supervisor_node(policy, seen)),
                       destinations=targets)
    prices = {a.name: a.price for a in agents if a.price is not None}
    graph.add_node(FINISH, _step(policy, seen, _finish_node(policy, seen, prices)))
    graph.add_edge(START, "start")
    graph.add_edge(FINISH, END)
    return graph.compile(checkpointer=checkpointer, name=f"relaygraph:{policy.name}")


def check_needs(policy: Policy, agents: dict[str, Agent], backups: dict[str, Agent]) -> None:
    """A ConfigError, before anything runs, when an agent's backend lacks what the policy
    needs of it (log-probs, token ids, a decode loop of ours for strict commands)."""
    needs = getattr(policy, "needs", None)
    if needs is None:
        return
    for name in policy.agent_names():
        wanted = needs(name)
        for agent in (agents[name], *((backups[name],) if name in backups else ())):
            has, model, what = capabilities(agent.backend), agent.backend.model_id, None
            if wanted.logprobs and not has.logprobs:
                what = (f"checks the log-probs of agent {name!r}'s tokens, but {model} gives none "
                        "(its server returns no log-probs); use a server that does, or a "
                        "policy without confidence checks (e.g. fixed-interval)")
            elif wanted.constrained and not has.constrained:
                what = (f"constrains agent {name!r}'s commands at decode time (strict_commands), "
                        f"but {model} cannot constrain its decoding (only the local transformers "
                        "backend can); set strict_commands = false, or give this role to a "
                        "local model")
            elif wanted.token_ids and not has.token_ids:
                what = (f"needs agent {name!r}'s token ids, but {model} has no local tokenizer; "
                        "set tokenizer = \"...\" in its config, or give this role to a local model")
            if what:
                raise ConfigError(f"policy {policy.name!r} {what}")


def context(state: RelayState) -> TurnContext:
    """The frozen view of the run a policy decides on."""
    return TurnContext(
        question=state.get("prompt") or state.get("question", ""),
        max_tokens=state.get("max_tokens", 0),
        generated=state.get("generated", 0), budget=state.get("budget", 0),
        counters=MappingProxyType(dict(state.get("counters") or {})),
        tokens_by_agent=MappingProxyType(dict(state.get("tokens_by_agent") or {})),
        trajectory_id=state.get("trajectory_id", ""))


def _step(policy: Policy, seen: SegmentCache, body: Node) -> Node:
    """A step of a started run: inside the run's trace; an interrupt pauses the run (with a
    checkpointer) and a failure ends its trace with the error. A step that does not go on
    to the next one confirms the run's pipelined appends first (what it wrote is stored)."""
    store = seen.store

    def step(state: RelayState) -> Any:
        tid = state["trajectory_id"]
        with tracing.in_run(tid, policy.name, state.get("trace", "")):
            try:
                if not liveness.held_here(tid):  # continued on its thread (a person answered)
                    store.set_status(tid, "running", **liveness.holding())
                    liveness.hold(store, tid)
                return body(state)
            except GraphInterrupt as exc:
                seen.confirm(tid)
                liveness.release(tid)
                _paused(store, tid, exc)
                raise
            except GraphBubbleUp:  # control flow of a parent graph (Command(graph=PARENT))
                seen.confirm(tid)
                liveness.release(tid)
                raise
            except BaseException as exc:
                _confirm_after(seen, tid, exc)
                liveness.release(tid, store, clear=True)  # not running here any more
                tracing.end_run(tid, "error", error=exc)
                raise

    return step


def _confirm_after(seen: SegmentCache, tid: str, error: BaseException) -> None:
    """Confirm a failing run's earlier appends; a store that fails now too is the error the
    run already reports (or about to: a lost server), so its own error is not raised."""
    try:
        seen.confirm(tid)
    except Exception as exc:  # noqa: BLE001 - the step's own error is what the run raises
        error.add_note(f"an earlier append of trajectory {tid} is unconfirmed: "
                       f"{type(exc).__name__}")


def _paused(store: TrajectoryStore, tid: str, exc: GraphInterrupt) -> None:
    """Record where an interrupted run waits; without a checkpointer, fail in words."""
    configurable = get_config().get("configurable") or {}
    values = [getattr(i, "value", i) for i in (exc.args[0] if exc.args else ())]
    payload = values[0] if len(values) == 1 else values
    if configurable.get(CONFIG_KEY_CHECKPOINTER) is None:
        error = ConfigError(
            "a step asked for a human (LangGraph interrupt()), but the relay runs without a "
            "checkpointer, so it could not wait for the answer: pass checkpointer="
            "InMemorySaver() (from langgraph.checkpoint.memory) to Relay(...), "
            "Relay.from_config or Relay.from_models, or compile your parent graph with one; "
            f"trajectory {tid} is kept up to its last step")
        store.set_status(tid, "failed", error=str(error)[:500])
        tracing.end_run(tid, "error", error=error)
        raise error from None
    store.set_status(tid, "interrupted", thread_id=str(configurable.get("thread_id") or ""),
                     interrupt=json.dumps(payload, default=str, ensure_ascii=False)[:20000])
    tracing.end_run(tid, "interrupted")


def _generate(agent: Agent, rule: StopRule, retry: RetryPolicy,
              once: Callable[[], tuple[Generation, str]],
              on_retry: Callable[[str], None]) -> tuple[Generation, str]:
    """``once()`` (the backend's generation and its message id), retried as ``retry`` says
    when it raises or returns nothing without a reason; errors that are the user's to fix
    (bad input) are not retried."""
    for attempt in range(retry.max_attempts):
        try:
            generation, mid = once()
            if generation.n_tokens or generation.finish_reason in ("eos", "stop", "low_confidence") \
                    or rule.max_tokens == 0:
                return generation, mid
            error = "empty completion"
        except BackendError as exc:  # a backend's own report of a fault (a dead server)
            error = str(exc)
        except RelayGraphError:  # the user's to fix, or a cancellation: retrying would not help
            raise
        except Exception as exc:  # noqa: BLE001 - a backend fault (dead server, timeout, bug): retried
            error = f"{type(exc).__name__}: {exc}"
        if attempt < retry.max_attempts - 1:
            on_retry(error)
            time.sleep(retry.interval(attempt))
    raise BackendError(
        f"agent {agent.name!r} ({agent.backend.model_id}) failed {retry.max_attempts} times, "
        f"last: {error[:300]}; the trajectory is kept — fix the backend, then resume the run"
    )


def _agent_node(agent: Agent, policy: Policy, store: SegmentCache, default_retry: RetryPolicy,
                fallbacks: dict[str, Agent]) -> Node:
    def node(state: RelayState) -> Command:
        tid, cursor = state["trajectory_id"], state["cursor"]
        ctx = context(state)
        writer = event_writer()
        config = get_config()
        retry = RetryPolicy.model_validate(state["retry"]) if state.get("retry") else default_retry
        view = policy.view(agent.name, active(store.read(tid, 0, cursor)))
        rule = policy.stop_rule(agent.name, ctx)
        with tracing.agent_turn(agent, policy.name, tid, cursor) as span:
            writer_agent = agent  # who actually writes this turn (a fallback, if configured)
            tries = 0  # generations started this turn: each streams under its own message id

            def attempt(who: Agent) -> tuple[Agent, Generation, str]:
                # the backup writes the failed agent's turn: same view, rule and cache slot
                proxy = dataclasses.replace(who, name=agent.name)
                prompt = proxy.prompt(ctx.question, view)

                def once() -> tuple[Generation, str]:
                    nonlocal tries
                    mid = message_id(tid, cursor, tries)
                    tries += 1
                    run = LLMRun.start(config, who, prompt, rule, mid, cursor)

                    def on_text(text: str) -> None:
                        writer({"type": "token", "agent": who.name, "text": text})
                        if run is not None:
                            run.token(text)

                    try:
                        generation = proxy.backend.generate(
                            prompt, rule, proxy.sampling, on_text=span.wrap_stream(on_text),
                            cache_key=cache_key(tid, agent.name, who.name))
                    except BaseException as exc:
                        if run is not None:
                            run.error(exc)
                        raise
                    if run is not None:
                        run.end(generation)
                    return generation, mid

                generation, mid = _generate(proxy, rule, retry, once, on_retry=lambda error: writer(
                    {"type": "retry", "agent": who.name, "error": error}))
                return proxy, generation, mid

            try:
                proxy, generation, mid = attempt(agent)
            except BackendError as exc:
                if agent.name not in fallbacks:
                    raise
                writer_agent = fallbacks[agent.name]
                writer({"type": "fallback", "agent": agent.name, "to": writer_agent.name,
                        "error": str(exc)})
                proxy, generation, mid = attempt(writer_agent)
            decision = policy.route(proxy, generation, ctx)
            if writer_agent is not agent:
                decision = dataclasses.replace(decision, counters={**decision.counters, "fallback_turns": 1},
                                   segments=[s.model_copy(update={
                                       "author": writer_agent.name,
                                       "meta": {**s.meta, "fallback_for": agent.name}})
                                       for s in decision.segments])
            update, handoff, appended = _apply(decision, state, store, writer_agent.name,
                                               generation.n_tokens, policy.name,
                                               generation.prompt_tokens)
            tracing.record_turn(span, generation, handoff)
        message = turn_message(mid, writer_agent.name, appended, trajectory_id=tid,
                               position=cursor)
        if message is not None:
            update["messages"] = [message]
        if handoff["moved"] or handoff["to"] == FINISH:
            writer(handoff)
        return Command(goto=update["turn"], update=update)

    return node


def _supervisor_node(policy: SupervisedPolicy, store: SegmentCache) -> Node:
    def supervise(state: RelayState) -> Command:
        tid, cursor = state["trajectory_id"], state["cursor"]
        segments = store.read(tid, 0, cursor)
        writer = event_writer()
        decision = policy.review(segments, context(state))  # may interrupt() for a human
        for seg in decision.segments:
            if seg.kind == "steer":
                writer({"type": "token", "agent": SUPERVISOR, "text": seg.text})
        last = next((s.author for s in reversed(segments)
                     if s.author != SUPERVISOR and s.kind != "mark"), SUPERVISOR)
        update, handoff, appended = _apply(decision, state, store, last, 0, policy.name)
        tracing.record_review(handoff)
        if decision.reason != "continue":
            writer({"type": "review", "action": decision.reason, "worker": last,
                    "position": update["cursor"], "score": decision.confidence})
        if handoff["moved"]:
            writer(handoff)
        messages: list[Any] = [*removals(tid, appended, state.get("messages") or []),
                               *steer_messages(tid, cursor, appended)]
        if messages:
            update["messages"] = messages
        return Command(goto=update["turn"], update=update)

    return supervise


def _apply(decision: Decision, state: RelayState, store: SegmentCache, author: str,
           n_tokens: int, policy_name: str, input_tokens: int = 0
           ) -> tuple[RelayState, dict[str, Any], list[Segment]]:
    """Append the decision's segments at the cursor with the step's record; the state
    update, the handoff event and the segments appended."""
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
    return update, handoff, segments


class SegmentCache:
    """Reads and appends of the trajectories this graph is running, remembering what was read
    or written: a stored segment never changes (appends are exactly-once), so a turn fetches
    only what it has not seen — usually nothing. Least recently used trajectories are dropped.

    On a store that pipelines appends (:class:`~relaygraph.trajectory.store.PipelinedStore`)
    a step's appends are sent without waiting for the server; they are confirmed before the
    trajectory's next append or read, and by :meth:`confirm` when a run stops (finished,
    paused or failed) — so a step never waits for a round trip, and a conflict still fails
    the run before anything is written after it."""

    def __init__(self, store: TrajectoryStore, size: int = 256) -> None:
        self.store = store
        self.size = size
        self._known: OrderedDict[str, list[Segment]] = OrderedDict()
        self._pending: dict[str, list[Callable[[], None]]] = {}
        self._send = store.send_append if isinstance(store, PipelinedStore) else None
        self._lock = threading.Lock()

    def read(self, tid: str, start: int, end: int) -> list[Segment]:
        with self._lock:
            known = self._known.pop(tid, [])
        if len(known) < end:
            self.confirm(tid)
            known = known + self.store.read(tid, len(known), end)
        self._remember(tid, known)
        return known[start:end]

    def append(self, tid: str, position: int, segment: Segment) -> None:
        self.confirm(tid)  # never write after an append that may have failed
        if self._send is None:
            self.store.append(tid, position, segment)
        else:
            confirm = self._send(tid, position, segment)
            with self._lock:
                self._pending.setdefault(tid, []).append(confirm)
        with self._lock:
            known = self._known.pop(tid, [])
        if len(known) == position:
            known.append(segment)
        self._remember(tid, known)

    def confirm(self, tid: str) -> None:
        """Wait for the replies of the trajectory's appends sent so far (raising what a
        failed one raises); an append that fails stays pending, so a retry confirms it."""
        while True:
            with self._lock:  # one caller per confirmation (an eviction may confirm too)
                pending = self._pending.get(tid)
                if not pending:
                    self._pending.pop(tid, None)
                    return
                confirm = pending.pop(0)
            try:
                confirm()
            except BaseException:
                with self._lock:  # a retry confirms it again (appending it anew)
                    self._pending.setdefault(tid, []).insert(0, confirm)
                raise

    def _remember(self, tid: str, known: list[Segment]) -> None:
        with self._lock:
            self._known[tid] = known
            dropped = []
            while len(self._known) > self.size:
                dropped.append(self._known.popitem(last=False)[0])
        for old in dropped:  # an abandoned run's last appends: read their replies
            try:
                self.confirm(old)
            except Exception:  # noqa: BLE001 - nobody waits for that run any more
                with self._lock:
                    self._pending.pop(old, None)


def _state_of(totals: Totals) -> RelayState:
    """The graph-state keys a run's totals fill."""
    return {"tokens_by_agent": dict(totals.tokens_by_agent),
            "input_tokens_by_agent": dict(totals.input_tokens_by_agent),
            "counters": dict(totals.counters), "handoffs": totals.handoffs,
            "generated": totals.generated, "handoff_records": list(totals.handoff_records)}


def _finish_node(policy: Policy, seen: SegmentCache, prices: dict[str, Price]) -> Node:
    store = seen.store

    def finish(state: RelayState) -> dict[str, Any]:
        tid = state["trajectory_id"]
        seen.confirm(tid)  # every segment is stored before the run reads as finished
        text = reasoning_text(active(store.read(tid)))  # rolled-back steps are not the answer
        answer = extract_answer(text)
        totals = Totals.from_state(state)
        call_ratio = totals.call_ratio(policy.primary)
        cost = totals.cost(prices)
        seconds = max(0.0, time.time() - state.get("started_at", time.time()))
        thread = str((get_config().get("configurable") or {}).get("thread_id") or "")
        # what a finished run returned, for every later reader (resume, show --json)
        store.set_status(tid, "finished", finish_reason=state.get("finish_reason") or "",
                         answer=answer, seconds=repr(seconds),
                         **({"thread_id": thread} if thread else {}))
        liveness.release(tid)
        cost_by_agent = totals.cost_by_agent(prices)
        tracing.end_run(tid, "ok", totals={"tokens_by_agent": state.get("tokens_by_agent") or {},
                                           "handoffs": state.get("handoffs", 0),
                                           "call_ratio": call_ratio, "cost": cost,
                                           "cost_by_agent": cost_by_agent})
        return {"answer": answer, "call_ratio": call_ratio, "cost_by_agent": cost_by_agent,
                "cost": cost, "seconds": seconds}

    return finish
