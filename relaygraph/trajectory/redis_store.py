"""Trajectory store on Redis Streams: one Redis/Valkey server, a Cluster, or a
Sentinel-managed primary (see :mod:`relaygraph.trajectory.connect` for the URLs).

Layout, with ``{id}`` a hash tag so one trajectory's keys share one Cluster slot:

- ``<ns>:{<id>}:segments`` — a Stream; the segment at position ``seq`` has the explicit
  stream id ``0-<seq+1>`` and one field ``s`` holding the segment as JSON;
- ``<ns>:{<id>}:meta`` — a hash: ``task`` (JSON), ``status``, ``created_at``, ``ttl_ms``
  (when the trajectory expires), ``heartbeat`` (a server running it), ``error``, ...;
- ``<ns>:index`` — a sorted set of ids by creation time (listings, ``store prune``).

Every command touches one key, or the two keys of one trajectory (same slot), so nothing
is cross-slot on a Cluster; the index is one key per namespace. Appends run one Lua script
that checks the expected position, so they are exactly-once under retries and concurrent
writers. With a TTL, both keys of a trajectory expire that long after its last activity
(create, append, status change, heartbeat): the TTL is recorded in the trajectory's own
metadata, so whichever process continues it keeps it. Index entries of expired
trajectories are dropped as listings and creations meet them, and by :meth:`prune`.
Values are JSON; nothing is ever unpickled.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import redis

from relaygraph.errors import (
    PositionConflictError,
    StoreUnavailableError,
    TrajectoryNotFoundError,
)
from relaygraph.trajectory import lua_scripts
from relaygraph.trajectory.connect import (
    Kind,
    OnRetry,
    connect,
    redact_url,
    refused,
    unreachable,
)
from relaygraph.trajectory.liveness import HEARTBEAT_STALE_S, effective_status, holder_id
from relaygraph.trajectory.models import (
    PruneReport,
    Segment,
    Task,
    Trajectory,
    TrajectoryHeader,
    check_namespace,
    check_trajectory_id,
)
from relaygraph.trajectory.pipelined import send_append


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisStore:
    """A :class:`~relaygraph.trajectory.store.TrajectoryStore` on Redis/Valkey.

    ``RedisStore.from_url(url)`` takes ``redis://``, ``rediss://``, ``unix://``,
    ``redis+cluster://`` and ``redis+sentinel://`` URLs; pass ``client=`` to reuse a
    configured ``redis.Redis`` or ``redis.cluster.RedisCluster``. ``namespace`` prefixes
    every key (tenants, experiments); ``ttl`` (seconds) makes new trajectories expire that
    long after their last activity.
    """

    def __init__(self, client: Any, namespace: str = "relaygraph", url: str = "",
                 ttl: float | None = None, kind: Kind | None = None) -> None:
        self.client: Any = client  # redis-py's reply types are unions of every protocol's
        self.namespace = check_namespace(namespace)
        self.url = redact_url(url) if url else ""
        if ttl is not None and ttl <= 0:
            raise ValueError(f"ttl must be > 0 seconds (or None: never expire), got {ttl}")
        self.ttl = ttl
        self.kind: Kind = kind or _kind_of(client)
        self._create = client.register_script(lua_scripts.CREATE)
        self._append = client.register_script(lua_scripts.APPEND)
        self._set = client.register_script(lua_scripts.SET)
        self._touch = client.register_script(lua_scripts.TOUCH)
        self._cancel = client.register_script(lua_scripts.CANCEL)
        self._claim = client.register_script(lua_scripts.CLAIM)

    @classmethod
    def from_url(cls, url: str, namespace: str = "relaygraph", retries: int = 8,
                 ttl: float | None = None, on_retry: OnRetry | None = None,
                 **kwargs: object) -> RedisStore:
        """Connect to ``url`` and check the server answers.

        Commands that hit a dropped connection are retried ``retries`` times with
        exponential backoff (0.1 s doubling to 2 s: about 9 s for the default 8), so a
        server restart is ridden out, and so is a Sentinel failover that completes within
        that time (Sentinel's default ``down-after-milliseconds`` is 30 s: raise
        ``retries`` by one per 2 s more it needs); appends stay exactly-once
        because a retried append that had landed is recognised as a duplicate.
        ``on_retry(error, attempt, retries)`` hears of each retry (a status line).
        """
        client, kind = connect(url, retries, on_retry, **kwargs)
        store = cls(client, namespace, url, ttl, kind)
        store.ping()
        return store

    def ping(self) -> None:
        try:
            self.client.ping()
        except redis.AuthenticationError:
            raise StoreUnavailableError(refused(self.url)) from None
        except redis.RedisError as exc:
            raise StoreUnavailableError(unreachable(self.url, exc)) from None

    # keys -------------------------------------------------------------------------------
    def _seg_key(self, tid: str) -> str:
        return f"{self.namespace}:{{{check_trajectory_id(tid)}}}:segments"

    def _meta_key(self, tid: str) -> str:
        return f"{self.namespace}:{{{check_trajectory_id(tid)}}}:meta"

    def _keys(self, tid: str) -> list[str]:
        return [self._seg_key(tid), self._meta_key(tid)]

    @property
    def _index_key(self) -> str:
        return f"{self.namespace}:index"

    def _missing(self, trajectory_id: str) -> TrajectoryNotFoundError:
        return TrajectoryNotFoundError(
            f"no trajectory {trajectory_id!r} in {self.url or 'this store'}"
            f"{'' if self.namespace == 'relaygraph' else f' (namespace {self.namespace})'}; "
            "it may have expired or been deleted; `relaygraph show` lists recent ids")

    # protocol ---------------------------------------------------------------------------
    def create(self, trajectory_id: str, task: Task) -> None:
        ttl_ms = int(self.ttl * 1000) if self.ttl else 0
        if not self._create(keys=[self._meta_key(trajectory_id)],
                            args=[task.model_dump_json(), str(task.created_at), ttl_ms]):
            raise ValueError(f"trajectory {trajectory_id!r} already exists")
        self.client.zadd(self._index_key, {trajectory_id: task.created_at})
        if ttl_ms:
            self._trim_oldest()

    def exists(self, trajectory_id: str) -> bool:
        return bool(self.client.exists(self._meta_key(trajectory_id)))

    def append(self, trajectory_id: str, seq: int, segment: Segment) -> None:
        if seq < 0:
            raise ValueError(f"position must be >= 0, got {seq}")
        self._appended(trajectory_id, seq, self._append(keys=self._keys(trajectory_id),
                                                        args=[seq, segment.model_dump_json()]), segment)

    def send_append(self, trajectory_id: str, seq: int, segment: Segment) -> Callable[[], None]:
        """:meth:`append` pipelined: sent now, its reply read by the returned ``confirm()``
        (which raises what :meth:`append` would); see :func:`~relaygraph.trajectory.pipelined.send_append`."""
        return send_append(self, trajectory_id, seq, segment)

    def _appended(self, trajectory_id: str, seq: int, reply: Any, segment: Segment) -> None:
        """Raise what an append's reply from the Lua script means, if it is an error."""
        result = _text(reply)
        if result in ("ok", "dup"):
            return
        if result == "missing":
            raise self._missing(trajectory_id)
        if result == "taken":
            # equal content (a resumed step's reproduction, log-probs aside) is what is stored
            stored = self.read(trajectory_id, seq, seq + 1)
            if stored and stored[0].content() == segment.content():
                return
            raise PositionConflictError(trajectory_id, seq)
        raise PositionConflictError(
            trajectory_id, seq, f"the trajectory has only {result.split(':')[1]} segments"
        )

    def read(self, trajectory_id: str, start: int = 0, end: int | None = None) -> list[Segment]:
        last = "+" if end is None else f"0-{end}"
        if end is not None and end <= start:
            return []
        entries = self.client.xrange(self._seg_key(trajectory_id), f"0-{start + 1}", last)
        return [Segment.model_validate_json(fields[b"s"]) for _, fields in entries]

    def length(self, trajectory_id: str) -> int:
        return int(self.client.xlen(self._seg_key(trajectory_id)))

    def _meta(self, trajectory_id: str) -> dict[str, str]:
        raw = self.client.hgetall(self._meta_key(trajectory_id))
        if not raw:
            raise self._missing(trajectory_id)
        return {_text(k): _text(v) for k, v in raw.items()}

    def info(self, trajectory_id: str) -> dict[str, str]:
        """The trajectory's metadata without its task: ``status``, ``created_at``,
        ``finish_reason``, ``error``, ``cancel_reason``, ``heartbeat``, ``ttl_ms``, ..."""
        meta = self._meta(trajectory_id)
        meta.pop("task", None)
        return meta

    def load(self, trajectory_id: str) -> Trajectory:
        meta = self._meta(trajectory_id)
        return Trajectory(
            id=trajectory_id,
            task=Task.model_validate_json(meta["task"]),
            segments=self.read(trajectory_id),
            status=meta.get("status", "running"),
            info={k: v for k, v in meta.items() if k not in ("task", "status", "created_at")},
        )

    def set_status(self, trajectory_id: str, status: str, **info: str) -> None:
        fields = [x for pair in {"status": status, **info}.items() for x in pair]
        if not self._set(keys=self._keys(trajectory_id), args=fields):
            raise self._missing(trajectory_id)

    def status(self, trajectory_id: str) -> str:
        return self._meta(trajectory_id).get("status", "running")

    def follow(
        self, trajectory_id: str, start: int = 0, block_ms: int = 1000
    ) -> Iterator[tuple[int, Segment]]:
        key = self._seg_key(trajectory_id)
        last_id = f"0-{start}"
        seq = start
        while True:
            reply = self.client.xread({key: last_id}, block=block_ms, count=100)
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    last_id = _text(entry_id)
                    yield seq, Segment.model_validate_json(fields[b"s"])
                    seq += 1
            if not reply:  # quiet: over when the run ended or its process is gone
                meta = self.info(trajectory_id)
                status = effective_status(trajectory_id, meta.get("status", "running"), meta)
                if status != "running" and self.length(trajectory_id) <= seq:
                    return

    def list_ids(self, limit: int = 20) -> list[str]:
        """The newest ``limit`` trajectories; index entries of expired ones are dropped."""
        found: list[str] = []
        start = 0
        while 0 < limit and len(found) < limit:
            page = [_text(i) for i in self.client.zrevrange(self._index_key, start,
                                                            start + limit - len(found) - 1)]
            if not page:
                break
            alive = self._alive(page)
            if gone := [i for i, ok in zip(page, alive, strict=True) if not ok]:
                self.client.zrem(self._index_key, *gone)
            found += [i for i, ok in zip(page, alive, strict=True) if ok]
            start += len(page) - len(gone)
        return found

    def headers(self, trajectory_ids: Sequence[str]) -> list[TrajectoryHeader | None]:
        """What a listing shows of each trajectory (task, status, liveness facts), in one
        round trip; None for one that is gone."""
        pipe = self.client.pipeline(transaction=False)
        for tid in trajectory_ids:
            pipe.hgetall(self._meta_key(tid))
        out: list[TrajectoryHeader | None] = []
        for tid, raw in zip(trajectory_ids, pipe.execute(), strict=True):
            meta = {_text(k): _text(v) for k, v in (raw or {}).items()}
            if "task" not in meta:
                out.append(None)
                continue
            task = Task.model_validate_json(meta.pop("task"))
            out.append(TrajectoryHeader(tid, task, meta.pop("status", "running"), meta))
        return out

    def delete(self, trajectory_id: str) -> bool:
        """Remove the trajectory (both keys and its index entry); False if it did not exist."""
        existed = bool(self.client.delete(*self._keys(trajectory_id)))
        removed = bool(self.client.zrem(self._index_key, trajectory_id))
        return existed or removed

    def close(self) -> None:
        self.client.close()

    # retention, replicas ----------------------------------------------------------------
    def _alive(self, ids: Sequence[str]) -> list[bool]:
        pipe = self.client.pipeline(transaction=False)
        for tid in ids:
            pipe.exists(self._meta_key(tid))
        return [bool(x) for x in pipe.execute()]

    def _trim_oldest(self, count: int = 8) -> None:
        """Drop the index entries of expired trajectories among the oldest ``count``: with
        TTLs, creations keep the index about as long as the live trajectories."""
        oldest = [_text(i) for i in self.client.zrange(self._index_key, 0, count - 1)]
        if gone := [i for i, ok in zip(oldest, self._alive(oldest), strict=True) if not ok]:
            self.client.zrem(self._index_key, *gone)

    def count(self) -> int:
        """Index entries (trajectories, and expired ones not yet trimmed)."""
        return int(self.client.zcard(self._index_key))

    def keepalive(self, trajectory_ids: Iterable[str]) -> dict[str, str | None]:
        """Record that this process is running these trajectories (``heartbeat``) and
        refresh their TTL. Returns, per id, the reason of a cancellation requested through
        any server (:meth:`request_cancel`), ``""`` if none — or None if the trajectory is
        gone (expired or deleted)."""
        now = f"{time.time():.3f}"
        out: dict[str, str | None] = {}
        for tid in trajectory_ids:
            found, reason = self._touch(keys=self._keys(tid), args=[now])
            out[tid] = _text(reason) if found else None
        return out

    def release(self, trajectory_id: str) -> None:
        """Drop the heartbeat of a trajectory this process no longer runs (its run failed
        but the process lives on), so it shows as interrupted at once."""
        self._set(keys=self._keys(trajectory_id), args=["heartbeat", "0"])

    def request_cancel(self, trajectory_id: str, reason: str = "cancelled") -> str:
        """Ask whichever server runs the trajectory to stop it (it sees the request at its
        next heartbeat). Returns the trajectory's status: only a ``running`` one is asked."""
        status = _text(self._cancel(keys=[self._meta_key(trajectory_id)], args=[reason]))
        if status == "missing":
            raise self._missing(trajectory_id)
        return status

    def claim(self, trajectory_id: str, stale: float = HEARTBEAT_STALE_S) -> str | None:
        """Take a trajectory over to continue it here: refused (None) while a live server
        holds it; otherwise its heartbeat becomes this process's and an old cancellation
        request is cleared. Returns the status it had (``finished`` runs need no work)."""
        now = time.time()
        status = _text(self._claim(keys=[self._meta_key(trajectory_id)],
                                   args=[f"{now:.3f}", f"{now - stale:.3f}", holder_id()]))
        if status == "missing":
            raise self._missing(trajectory_id)
        return None if status == "held" else status

    def held(self, trajectory_id: str, stale: float = HEARTBEAT_STALE_S) -> bool:
        """Whether a live server runs the trajectory now (running, with a fresh heartbeat)."""
        meta = self.info(trajectory_id)
        return _held(meta.get("status"), meta.get("heartbeat"), time.time() - stale)

    def prune(self, older_than: float, status: Sequence[str] = (), dry_run: bool = False,
              now: float | None = None, batch: int = 500) -> PruneReport:
        """Delete trajectories created more than ``older_than`` seconds ago (only those
        whose status is in ``status``, when given), except running ones a live server holds;
        and drop index entries of trajectories that have expired. Touches nothing else."""
        now = time.time() if now is None else now
        cutoff, stale = now - older_than, now - HEARTBEAT_STALE_S
        report = PruneReport()
        candidates = [_text(i) for i in self.client.zrangebyscore(self._index_key, "-inf",
                                                                  f"({cutoff}")]
        for chunk in _chunks(candidates, batch):
            pipe = self.client.pipeline(transaction=False)
            for tid in chunk:
                pipe.hmget(self._meta_key(tid), "task", "status", "heartbeat")
            doomed, gone = [], []
            for tid, (task, state, beat) in zip(chunk, pipe.execute(), strict=True):
                state = _text(state) if state is not None else "running"
                if task is None:
                    gone.append(tid)
                elif status and state not in status:
                    continue
                elif _held(state, beat, stale):
                    report.held.append(tid)
                else:
                    doomed.append(tid)
            report.deleted += doomed
            report.expired += len(gone)
            if dry_run or not (doomed or gone):
                continue
            pipe = self.client.pipeline(transaction=False)
            for key in (k for tid in doomed for k in self._keys(tid)):
                pipe.delete(key)  # one key per command: a Cluster pipeline splits no DEL
            pipe.zrem(self._index_key, *doomed, *gone)
            pipe.execute()
        report.expired += self._trim_expired(skip=set(candidates), dry_run=dry_run, batch=batch)
        return report

    def _trim_expired(self, skip: set[str], dry_run: bool, batch: int) -> int:
        removed = 0
        for chunk in _chunks([_text(i) for i in self.client.zrange(self._index_key, 0, -1)],
                             batch):
            chunk = [tid for tid in chunk if tid not in skip]
            if gone := [t for t, ok in zip(chunk, self._alive(chunk), strict=True) if not ok]:
                removed += len(gone)
                if not dry_run:
                    self.client.zrem(self._index_key, *gone)
        return removed

    def memory(self, sample: int = 100) -> dict[str, Any]:
        """What the namespace holds: ``trajectories`` (index entries), ``sampled`` (the
        newest ones measured), ``bytes_per_trajectory`` (mean ``MEMORY USAGE`` of both keys,
        every stream entry counted), ``segments_per_trajectory``, ``index_bytes``, and the
        server's ``used_memory`` (summed over a Cluster's primaries)."""
        ids = self.list_ids(sample)
        pipe = self.client.pipeline(transaction=False)
        for tid in ids:
            for key in self._keys(tid):
                pipe.memory_usage(key, samples=0)
            pipe.xlen(self._seg_key(tid))
        replies = pipe.execute() if ids else []
        sizes = [sum(int(x or 0) for x in replies[i:i + 2]) for i in range(0, len(replies), 3)]
        lengths = [int(x or 0) for x in replies[2::3]]
        return {
            "trajectories": self.count(), "sampled": len(ids),
            "bytes_per_trajectory": sum(sizes) / len(sizes) if sizes else 0.0,
            "segments_per_trajectory": sum(lengths) / len(lengths) if lengths else 0.0,
            "index_bytes": int(self.client.memory_usage(self._index_key, samples=0) or 0),
            "used_memory": self.used_memory(),
        }

    def used_memory(self) -> int:
        """Bytes the server holds (all primaries of a Cluster)."""
        if self.kind == "cluster":
            from redis.cluster import RedisCluster

            per_node = self.client.info("memory", target_nodes=RedisCluster.PRIMARIES)
            return sum(int(n["used_memory"]) for n in per_node.values())
        return int(self.client.info("memory")["used_memory"])


def _held(status: Any, heartbeat: Any, since: float) -> bool:
    if status is not None and _text(status) != "running":
        return False
    try:
        return heartbeat is not None and float(_text(heartbeat)) >= since
    except ValueError:
        return False


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _kind_of(client: Any) -> Kind:
    from redis.cluster import RedisCluster
    from redis.sentinel import SentinelConnectionPool

    if isinstance(client, RedisCluster):
        return "cluster"
    if isinstance(getattr(client, "connection_pool", None), SentinelConnectionPool):
        return "sentinel"
    return "single"


__all__ = ["HEARTBEAT_STALE_S", "PruneReport", "RedisStore", "TrajectoryHeader", "redact_url"]
