"""The one obvious entry point: a :class:`Relay` runs questions through a relay graph.

>>> relay = Relay.from_models("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", policy="confidence")
>>> result = relay.run("What is 2 + 5?", on_event=print)
>>> result.answer, result.call_ratio

or from a config (file or :class:`~relaygraph.config.RelayConfig`)::

    relay = Relay.from_config("relay.toml")

Async: ``await relay.arun(q)``, ``async for event in relay.astream(q)``,
``await relay.arun_many(qs)``. With a LangGraph checkpointer (``checkpointer=InMemorySaver()``)
runs live on threads: a conversation continues on one ``thread_id``, and a run a supervisor
pauses for a human (``interrupt()``) comes back with ``status == "interrupted"`` and is
continued with ``relay.resume(trajectory_id, answer)``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import redis

from relaygraph.agents.agent import Agent
from relaygraph.agents.backend import cache_key
from relaygraph.agents.registry import BackendPool
from relaygraph.config import RelayConfig
from relaygraph.errors import BackendError, ConfigError, StoreUnavailableError
from relaygraph.graphs.events import delivered_to, streamed
from relaygraph.graphs.retry import RetryPolicy
from relaygraph.trajectory import Segment, Trajectory, TrajectoryStore, liveness, open_store
from relaygraph.trajectory.models import new_trajectory_id
from relaygraph.trajectory.result import RunResult, SegmentSummary
from relaygraph.trajectory.totals import HandoffRecord

if TYPE_CHECKING:
    from langchain_core.runnables import RunnableConfig
    from langgraph.types import StreamMode

    from relaygraph.policies.base import Policy

Event = dict[str, Any]
STREAM_MODES: list[StreamMode] = ["custom", "values"]


class Relay:
    """Agents + a policy + a store, compiled into a LangGraph graph (``self.graph``)."""

    def __init__(self, agents: Sequence[Agent], policy: Policy,
                 store: TrajectoryStore | None = None, max_tokens: int = 512,
                 config: RelayConfig | None = None, retries: int | None = None,
                 fallbacks: dict[str, str] | None = None, checkpointer: Any = None,
                 retry: RetryPolicy | None = None,
                 record: dict[str, Any] | None = None) -> None:
        """``retry`` (or ``retries`` more attempts with the default back-off) says how a
        failing generation is retried, default the config's; ``checkpointer``: a LangGraph
        checkpointer (``InMemorySaver()``, ``SqliteSaver``, ...) for threads and interrupts;
        ``record``: more facts for each trajectory's config (a server records its relay's name)."""
        from relaygraph.graphs.relay import build_graph

        self.agents = list(agents)
        self.policy = policy
        self.store = store if store is not None else open_store()
        self.max_tokens = max_tokens
        self.checkpointer = checkpointer
        if retry is None:
            retry = (RetryPolicy.from_retries(retries) if retries is not None
                     else config.retry if config is not None else RetryPolicy())
        self.retry = retry
        # a relay built from a config records it, so `relaygraph resume` can rebuild it
        recorded: dict[str, Any] = (
            {"relay": config.model_dump(mode="json", exclude={"store"})} if config else {})
        recorded.update(record or {})
        self.graph = build_graph(self.agents, policy, self.store, max_tokens=max_tokens,
                                 task_config=recorded, retry=retry, fallbacks=fallbacks,
                                 checkpointer=checkpointer)

    def forget(self, trajectory_id: str) -> None:
        """Drop the KV caches the backends keep between turns of ``trajectory_id`` (for a run
        that will not continue; continuing it anyway prefills its text again)."""
        for writer in self.agents:
            for agent in self.agents:
                writer.backend.drop_cache(cache_key(trajectory_id, agent.name, writer.name))

    @classmethod
    def from_config(cls, config: RelayConfig | str | Path, store: TrajectoryStore | None = None,
                    pool: BackendPool | None = None, checkpointer: Any = None) -> Relay:
        """Load the agents a config's policy uses (each model once, or from ``pool``) and
        compile the relay; ``config`` may be a file path. ``store`` defaults to the config's
        Redis, else ``$REDIS_URL``, else the embedded server."""
        if not isinstance(config, RelayConfig):
            config = RelayConfig.load(config)
        config.policy.check()  # code and files it names, before any model loads
        pool = pool or BackendPool()
        agents = pool.agents(config.agents, config.needed_agents())
        policy = config.policy.build(agents)
        return cls(list(agents.values()), policy,
                   store if store is not None else config.store.open(), config.max_tokens,
                   config=config, fallbacks=config.fallbacks, checkpointer=checkpointer)

    @classmethod
    def from_trajectory(cls, trajectory_id: str, store: TrajectoryStore,
                        config: RelayConfig | str | Path | None = None, trust_stored: bool = False,
                        **kwargs: Any) -> Relay:
        """The relay to resume a stored trajectory with, under the trust model (RelayConfig.for_resume)."""
        cfg = RelayConfig.for_resume(store.load(trajectory_id).task, trajectory_id, config, trust_stored)
        return cls.from_config(cfg, store, **kwargs)

    @classmethod
    def from_models(cls, controller: str | None = None, expert: str | None = None,
                    policy: str = "call-token", store: TrajectoryStore | None = None,
                    max_tokens: int = 512, dtype: str = "bfloat16", checkpointer: Any = None,
                    **options: Any) -> Relay:
        """Load a controller (and expert; unless given, the policy's default models, else the
        catalog's default pair: ``relaygraph run``'s defaults) and build a named policy;
        ``options`` are the policy's fields, e.g. ``threshold=-2.5``."""
        config = RelayConfig.from_options(controller, expert, policy, max_tokens, dtype=dtype,
                                          **options)
        return cls.from_config(config, store, checkpointer=checkpointer)

    # --- running ---------------------------------------------------------------------------

    def run(self, question: str, trajectory_id: str | None = None,
            on_event: Callable[[Event], None] | None = None, prefix: Sequence[Segment] = (),
            thread_id: str | None = None, config: dict[str, Any] | None = None) -> RunResult:
        """Run one question to the end (or to a human's turn); ``on_event`` receives token and
        handoff events.

        ``prefix``: reasoning given before the first turn (e.g. another model's partial
        chain), stored first with ``meta["given"]``; the policy's first agent continues it.
        Its tokens are not counted as generated (nor in ``tokens_by_agent``).
        ``thread_id`` (needs a checkpointer): run on this thread, e.g. the next question of a
        conversation, whose earlier turns the agents see. ``config``: LangGraph run config
        (``callbacks``, ``tags``, ``metadata``, ...).
        """
        inputs, cfg, tid = self._prepare(question, trajectory_id, prefix, thread_id, config)
        return self._run_inline(inputs, cfg, tid, on_event)

    def stream(self, question: str, trajectory_id: str | None = None,
               prefix: Sequence[Segment] = (), thread_id: str | None = None,
               config: dict[str, Any] | None = None) -> Iterator[Event]:
        """:meth:`run`'s events as they happen, then ``{"type": "result", "result": RunResult}``."""
        inputs, cfg, tid = self._prepare(question, trajectory_id, prefix, thread_id, config)
        yield from self._stream(inputs, cfg, tid)

    async def arun(self, question: str, trajectory_id: str | None = None,
                   on_event: Callable[[Event], None] | None = None,
                   prefix: Sequence[Segment] = (), thread_id: str | None = None,
                   config: dict[str, Any] | None = None) -> RunResult:
        """:meth:`run` without blocking the event loop (the graph's ``astream``; generation
        runs on worker threads, so concurrent runs share the models as ``run_many`` does)."""
        result = None
        async for event in self.astream(question, trajectory_id, prefix, thread_id, config):
            if event["type"] == "result":
                result = event["result"]
            elif on_event is not None:
                on_event(event)
        assert result is not None
        return result

    async def astream(self, question: str, trajectory_id: str | None = None,
                      prefix: Sequence[Segment] = (), thread_id: str | None = None,
                      config: dict[str, Any] | None = None) -> AsyncIterator[Event]:
        """Token, handoff, review, retry and fallback events as they happen, then
        ``{"type": "result", "result": RunResult}``."""
        inputs, cfg, tid = self._prepare(question, trajectory_id, prefix, thread_id, config)
        async for event in self._astream(inputs, cfg, tid):
            yield event

    def run_many(self, questions: Sequence[str], concurrency: int = 8,
                 return_exceptions: bool = False) -> list[Any]:
        """Run several questions at once (``concurrency`` threads), results in order.

        Concurrent trajectories share each model: the transformers backend runs their decode
        steps as one batch, a vLLM server batches them continuously. A failing question
        raises its error once all are done, or, with ``return_exceptions``, takes its place
        in the list.
        """
        from concurrent.futures import ThreadPoolExecutor

        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        with ThreadPoolExecutor(min(concurrency, max(1, len(questions))),
                                thread_name_prefix="relaygraph-run") as pool:
            futures = [pool.submit(self.run, q) for q in questions]
        results = [f.exception() or f.result() for f in futures]
        return _raise_first(results, return_exceptions)

    async def arun_many(self, questions: Sequence[str], concurrency: int = 8,
                        return_exceptions: bool = False) -> list[Any]:
        """:meth:`run_many` on the event loop: at most ``concurrency`` runs at once."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        gate = asyncio.Semaphore(concurrency)

        async def one(question: str) -> RunResult:
            async with gate:
                return await self.arun(question)

        results = await asyncio.gather(*(one(q) for q in questions), return_exceptions=True)
        return _raise_first(list(results), return_exceptions)

    def resume(self, trajectory_id: str, answer: Any = None,
               on_event: Callable[[Event], None] | None = None) -> RunResult:
        """Continue a stored run: one paused for a human (``answer`` is the human's reply,
        what the supervisor's ``interrupt()`` returns), or one interrupted by a crash or a
        lost server (from its last completed step).

        On the run's checkpointer thread, if this relay's checkpointer still has it, the
        thread continues (``Command(resume=answer)``); otherwise the run continues from the
        store — a step that asked a human asks again, and ``answer`` is given to it.
        Segments of a step that did not complete are written again at the same positions
        (identical under greedy decoding, so the exactly-once appends keep one copy). A
        finished run is returned as it is (:meth:`RunResult.from_trajectory`: what its run
        returned).
        """
        stored = self.store.load(trajectory_id)
        if stored.status == "finished":
            return RunResult.from_trajectory(stored)
        _check_not_running(stored)
        graph_input, cfg = self._continuation(trajectory_id, answer)
        if graph_input is not None or cfg is not None:
            return self._run_inline(graph_input, cfg or {}, trajectory_id, on_event)
        task = self.store.load(trajectory_id).task
        result = self.run(task.config.get("asked") or task.question, trajectory_id=trajectory_id,
                          on_event=on_event, thread_id=self._fresh_thread(trajectory_id))
        if result.status == "interrupted" and answer is not None:
            return self.resume(result.trajectory_id, answer, on_event)
        return result

    async def aresume(self, trajectory_id: str, answer: Any = None,
                      on_event: Callable[[Event], None] | None = None) -> RunResult:
        """:meth:`resume` on the event loop."""
        stored = await asyncio.to_thread(self.store.load, trajectory_id)
        if stored.status == "finished":
            return RunResult.from_trajectory(stored)
        _check_not_running(stored)
        graph_input, cfg = self._continuation(trajectory_id, answer)
        if graph_input is not None or cfg is not None:
            result = None
            async for event in self._astream(graph_input, cfg or {}, trajectory_id):
                if event["type"] == "result":
                    result = event["result"]
                elif on_event is not None:
                    on_event(event)
            assert result is not None
            return result
        task = self.store.load(trajectory_id).task
        result = await self.arun(task.config.get("asked") or task.question,
                                 trajectory_id=trajectory_id, on_event=on_event,
                                 thread_id=self._fresh_thread(trajectory_id))
        if result.status == "interrupted" and answer is not None:
            return await self.aresume(result.trajectory_id, answer, on_event)
        return result

    # --- internals -------------------------------------------------------------------------

    def _prepare(self, question: str, trajectory_id: str | None, prefix: Sequence[Segment],
                 thread_id: str | None, config: dict[str, Any] | None,
                 ) -> tuple[dict[str, Any], RunnableConfig, str]:
        tid = trajectory_id or new_trajectory_id()
        inputs: dict[str, Any] = {"question": question, "trajectory_id": tid}
        if prefix:
            inputs["prefix"] = [s.model_dump(mode="json") for s in prefix]
        return inputs, self._config(thread_id or tid, config, explicit=thread_id is not None), tid

    def _config(self, thread_id: str, config: dict[str, Any] | None,
                explicit: bool = False) -> RunnableConfig:
        limit = 2 * self.max_tokens + 16  # every step but the last writes at least one token
        cfg: dict[str, Any] = {"recursion_limit": limit, **(config or {})}
        if self.checkpointer is not None:
            cfg["configurable"] = {"thread_id": thread_id, **(cfg.get("configurable") or {})}
        elif explicit or (cfg.get("configurable") or {}).get("thread_id"):
            raise ConfigError("a thread_id needs a checkpointer: Relay(..., checkpointer="
                              "InMemorySaver()) (from langgraph.checkpoint.memory)")
        return cast("RunnableConfig", cfg)

    def _fresh_thread(self, trajectory_id: str) -> str | None:
        """A new thread for a run continued from the store (the checkpointer's old thread,
        if any, holds an older state of it)."""
        return f"{trajectory_id}.{uuid.uuid4().hex[:8]}" if self.checkpointer is not None else None

    def _continuation(self, trajectory_id: str, answer: Any,
                      ) -> tuple[Any, RunnableConfig | None]:
        """How to continue the run on its checkpointer thread, if this relay still has it:
        (graph input, run config); else (None, None)."""
        from langgraph.types import Command

        stored = self.store.load(trajectory_id)
        if self.checkpointer is None or stored.status in ("finished",):
            return None, None
        cfg = self._config(stored.info.get("thread_id") or trajectory_id, None)
        snapshot = self.graph.get_state(cfg)
        if not snapshot.next or snapshot.values.get("trajectory_id") != trajectory_id:
            return None, None
        if len(stored.segments) < int(snapshot.values.get("cursor") or 0):
            # the thread's last step outran the store (its append never landed: the server
            # was lost before the reply was read): continue from what the store holds
            return None, None
        if snapshot.interrupts:
            if answer is None:
                raise ConfigError(f"trajectory {trajectory_id} waits for a human's answer to "
                                  f"{stored.info.get('interrupt', 'its question')}: "
                                  f"Relay.resume({trajectory_id!r}, answer)")
            return Command(resume=answer), cfg
        return None, cfg  # a run that failed mid-way: run its pending step again

    def _stream(self, graph_input: Any, cfg: RunnableConfig, tid: str) -> Iterator[Event]:
        run = _Run(self, tid, cfg)
        try:
            with streamed():
                for mode, chunk in self.graph.stream(graph_input, cfg, stream_mode=STREAM_MODES):
                    if (event := run.feed(mode, chunk)) is not None:
                        yield event
        except Exception as exc:
            if (error := run.failed(exc)) is exc:
                raise
            raise error from None
        finally:  # a stream its consumer left mid-run runs no more: no heartbeat
            liveness.release(run.tid)
        yield {"type": "result", "result": run.result()}

    def _run_inline(self, graph_input: Any, cfg: RunnableConfig, tid: str,
                    on_event: Callable[[Event], None] | None) -> RunResult:
        """Run the graph to its end in this thread: each step runs inline (no executor
        thread per step) and hands its events to ``on_event`` as they happen."""
        run = _Run(self, tid, cfg)
        try:
            with delivered_to(on_event):
                for chunk in self.graph.stream(graph_input, cfg, stream_mode="values"):
                    run.feed("values", chunk)
        except Exception as exc:
            if (error := run.failed(exc)) is exc:
                raise
            raise error from None
        return run.result()

    async def _astream(self, graph_input: Any, cfg: RunnableConfig, tid: str) -> AsyncIterator[Event]:
        run = _Run(self, tid, cfg)
        try:
            async for mode, chunk in self.graph.astream(graph_input, cfg, stream_mode=STREAM_MODES):
                if (event := run.feed(mode, chunk)) is not None:
                    yield event
        except Exception as exc:
            if (error := run.failed(exc)) is exc:
                raise
            raise error from None
        finally:  # a stream its consumer left mid-run runs no more: no heartbeat
            liveness.release(run.tid)
        yield {"type": "result", "result": run.result()}

    def _mark_failed(self, tid: str, exc: Exception) -> None:
        try:
            if self.store.exists(tid):
                self.store.set_status(tid, "failed", error=f"{type(exc).__name__}: {exc}"[:500])
        except Exception:  # noqa: BLE001 - the store itself may be what failed
            pass


class _Run:
    """Follows one graph stream: its events, its last state, where it stopped."""

    def __init__(self, relay: Relay, tid: str, cfg: RunnableConfig) -> None:
        self.relay = relay
        self.tid = tid
        self.thread_id = (cfg.get("configurable") or {}).get("thread_id")
        self.final: dict[str, Any] = {}
        self.interrupts: Sequence[Any] = ()
        self.started = time.perf_counter()

    def feed(self, mode: str, chunk: Any) -> Event | None:
        if mode == "custom" and isinstance(chunk, dict):
            return chunk
        if mode == "values" and isinstance(chunk, dict):
            self.interrupts = chunk.get("__interrupt__") or ()
            self.final = {k: v for k, v in chunk.items() if k != "__interrupt__"}
            self.tid = self.final.get("trajectory_id") or self.tid
        return None

    def failed(self, exc: Exception) -> Exception:
        """The error to raise for a run that stopped with ``exc``."""
        relay, tid = self.relay, self.tid
        if isinstance(exc, (redis.RedisError, redis.exceptions.RedisClusterException)):
            return StoreUnavailableError(
                f"lost the trajectory store ({type(exc).__name__}: {exc}); what was written "
                f"is kept — once the server is back, run `relaygraph resume {tid}`")
        relay._mark_failed(tid, exc)
        if isinstance(exc, BackendError):
            return BackendError(f"{exc}: `relaygraph resume {tid}`")
        return exc

    def result(self) -> RunResult:
        final, tid = self.final, self.tid
        segments = self.relay.store.read(tid)
        values = [getattr(i, "value", i) for i in self.interrupts]
        return RunResult(
            trajectory_id=tid, policy=self.relay.policy.name, answer=final.get("answer", ""),
            finish_reason=final.get("finish_reason", ""),
            segments=[SegmentSummary.of(s) for s in segments],
            tokens_by_agent=final.get("tokens_by_agent", {}),
            input_tokens_by_agent=final.get("input_tokens_by_agent", {}),
            cost=final.get("cost"), cost_by_agent=final.get("cost_by_agent"),
            call_ratio=final.get("call_ratio", 0.0), handoffs=final.get("handoffs", 0),
            handoff_records=[HandoffRecord.model_validate(h)
                             for h in final.get("handoff_records", ())],
            counters=final.get("counters", {}),
            # a finished run's wall time as the graph recorded it with the trajectory
            seconds=(final["seconds"] if "seconds" in final and not values
                     else time.perf_counter() - self.started),
            status="interrupted" if values else "finished",
            interrupt=(values[0] if len(values) == 1 else values) if values else None,
            thread_id=self.thread_id,
        )


def _check_not_running(stored: Trajectory) -> None:
    """A :class:`ConfigError` when a live process runs the trajectory now (resuming it too
    would have two writers)."""
    if stored.status == "running" and liveness.alive(stored.id, stored.info):
        holder = stored.info.get("holder") or "another process"
        raise ConfigError(
            f"trajectory {stored.id} is running now ({holder}, heartbeat "
            f"{time.time() - float(stored.info.get('heartbeat') or 0):.0f} s ago); watch it "
            f"with `relaygraph show {stored.id} --follow`, or resume it once it has stopped")


def _raise_first(results: list[Any], return_exceptions: bool) -> list[Any]:
    if not return_exceptions:
        for r in results:
            if isinstance(r, BaseException):
                raise r
    return results
