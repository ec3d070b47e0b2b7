"""The one obvious entry point: a :class:`Relay` runs questions through a relay graph.

>>> relay = Relay.from_models("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", policy="confidence")
>>> result = relay.run("What is 2 + 5?", on_event=print)
>>> result.answer, result.call_ratio

or from a config (file or :class:`~relaygraph.config.RelayConfig`)::

    relay = Relay.from_config("relay.toml")
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from pydantic import BaseModel

from relaygraph.agents.agent import Agent
from relaygraph.agents.registry import BackendPool
from relaygraph.config import RelayConfig
from relaygraph.errors import BackendError, StoreUnavailableError
from relaygraph.observability import tracing
from relaygraph.trajectory import Segment, TrajectoryStore, new_trajectory_id, open_store
from relaygraph.trajectory.totals import HandoffRecord

if TYPE_CHECKING:
    from relaygraph.policies.base import Policy

Event = dict[str, Any]


class SegmentSummary(BaseModel):
    author: str
    kind: str
    text: str
    n_tokens: int


class RunResult(BaseModel):
    """What a run produced (the trajectory itself stays in the store)."""

    trajectory_id: str
    policy: str
    answer: str
    finish_reason: str
    segments: list[SegmentSummary]
    tokens_by_agent: dict[str, int]
    input_tokens_by_agent: dict[str, int] = {}
    """Prompt tokens each agent's generations read (what a hosted model bills as input)."""
    cost: float | None = None
    """What the run cost, from the agents' prices per million tokens (None: no prices set)."""
    cost_by_agent: dict[str, float] | None = None
    call_ratio: float
    """Tokens written by agents other than the policy's primary / all generated tokens."""
    handoffs: int
    handoff_records: list[HandoffRecord]
    counters: dict[str, int]
    seconds: float


class Relay:
    """Agents + a policy + a store, compiled into a LangGraph graph (``self.graph``)."""

    def __init__(self, agents: Sequence[Agent], policy: Policy,
                 store: TrajectoryStore | None = None, max_tokens: int = 512,
                 config: RelayConfig | None = None, retries: int = 2,
                 fallbacks: dict[str, str] | None = None,
                 record: dict[str, Any] | None = None) -> None:
        from relaygraph.graphs.relay import build_graph

        self.agents = list(agents)
        self.policy = policy
        self.store = store if store is not None else open_store()
        self.max_tokens = max_tokens
        # a relay built from a config records it, so `relaygraph resume` can rebuild it;
        # ``record``: more facts for the task's config (a server records its relay's name)
        recorded: dict[str, Any] = (
            {"relay": config.model_dump(mode="json", exclude={"store"})} if config else {})
        recorded.update(record or {})
        self.graph = build_graph(self.agents, policy, self.store, max_tokens=max_tokens,
                                 task_config=recorded, retries=retries, fallbacks=fallbacks)

    @classmethod
    def from_config(cls, config: RelayConfig | str | Path, store: TrajectoryStore | None = None,
                    pool: BackendPool | None = None) -> Relay:
        """Load the agents a config's policy uses (each model once, or from ``pool``) and
        compile the relay; ``config`` may be a file path. ``store`` defaults to the config's
        ``[store]`` (URL, namespace, TTL), else ``$REDIS_URL``, else the embedded server."""
        if not isinstance(config, RelayConfig):
            config = RelayConfig.load(config)
        pool = pool or BackendPool()
        agents = pool.agents(config.agents, config.needed_agents())
        policy = config.policy.build(agents)
        return cls(list(agents.values()), policy,
                   store if store is not None else config.store.open(), config.max_tokens,
                   config=config, fallbacks=config.fallbacks)

    @classmethod
    def from_models(cls, controller: str | None = None, expert: str | None = None,
                    policy: str = "call-token", store: TrajectoryStore | None = None,
                    max_tokens: int = 512, dtype: str = "bfloat16", **options: Any) -> Relay:
        """Load a controller (and expert; the catalog's default pair unless given) and build
        a named policy; ``options`` are the policy's fields, e.g. ``threshold=-2.5``."""
        config = RelayConfig.from_options(controller, expert, policy, max_tokens, dtype=dtype,
                                          **options)
        return cls.from_config(config, store)

    def run(self, question: str, trajectory_id: str | None = None,
            on_event: Callable[[Event], None] | None = None,
            prefix: Sequence[Segment] = ()) -> RunResult:
        """Run one question to the end; ``on_event`` receives token and handoff events.

        ``prefix``: reasoning given before the first turn (e.g. another model's partial
        chain), stored first with ``meta["given"]``; the policy's first agent continues it.
        Its tokens are not counted as generated (nor in ``tokens_by_agent``).
        """
        started = time.perf_counter()
        tid = trajectory_id or new_trajectory_id()
        final: dict[str, Any] = {}
        limit = 2 * self.max_tokens + 16  # every step but the last writes at least one token
        inputs: dict[str, Any] = {"question": question, "trajectory_id": tid}
        if prefix:
            inputs["prefix"] = [s.model_dump(mode="json") for s in prefix]
        with tracing.run_span(self.policy.name, len(question), trajectory_id=tid,
                              question=question):
            try:
                for mode, chunk in self.graph.stream(
                    inputs,
                    stream_mode=["custom", "values"], config={"recursion_limit": limit},
                ):
                    if mode == "custom" and on_event is not None and isinstance(chunk, dict):
                        on_event(chunk)
                    elif mode == "values" and isinstance(chunk, dict):
                        final = chunk
                tracing.run_totals(final)
            except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
                raise StoreUnavailableError(
                    f"lost the trajectory store ({type(exc).__name__}: {exc}); what was written "
                    f"is kept — once the server is back, run `relaygraph resume {tid}`"
                ) from None
            except BackendError as exc:
                self._mark_failed(tid, exc)
                raise BackendError(f"{exc}: `relaygraph resume {tid}`") from None
            except Exception as exc:
                self._mark_failed(tid, exc)
                raise
        segments = self.store.read(tid)
        return RunResult(
            trajectory_id=tid, policy=self.policy.name, answer=final.get("answer", ""),
            finish_reason=final.get("finish_reason", ""),
            segments=[SegmentSummary(author=s.author, kind=s.kind, text=s.text,
                                     n_tokens=s.n_tokens) for s in segments],
            tokens_by_agent=final.get("tokens_by_agent", {}),
            input_tokens_by_agent=final.get("input_tokens_by_agent", {}),
            cost=final.get("cost"), cost_by_agent=final.get("cost_by_agent"),
            call_ratio=final.get("call_ratio", 0.0), handoffs=final.get("handoffs", 0),
            handoff_records=[HandoffRecord.model_validate(h)
                             for h in final.get("handoff_records", ())],
            counters=final.get("counters", {}), seconds=time.perf_counter() - started,
        )

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
        if not return_exceptions:
            for r in results:
                if isinstance(r, BaseException):
                    raise r
        return results

    def resume(self, trajectory_id: str, on_event: Callable[[Event], None] | None = None) -> RunResult:
        """Continue a stored run (after a crash or a lost server) from its last completed step.

        Segments of a step that did not complete are written again at the same positions
        (identical under greedy decoding, so the exactly-once appends keep one copy). A
        finished run is returned as it is.
        """
        task = self.store.load(trajectory_id).task
        return self.run(task.question, trajectory_id=trajectory_id, on_event=on_event)

    def _mark_failed(self, tid: str, exc: Exception) -> None:
        try:
            if self.store.exists(tid):
                self.store.set_status(tid, "failed", error=f"{type(exc).__name__}: {exc}"[:500])
        except Exception:  # noqa: BLE001 - the store itself may be what failed
            pass
