"""Trajectory store on Redis Streams (any Redis >= 6.2 or Valkey server).

Layout, with ``{id}`` a hash tag so one trajectory stays on one Cluster slot:

- ``<ns>:{<id>}:segments`` — a Stream; the segment at position ``seq`` has the explicit
  stream id ``0-<seq+1>`` and one field ``s`` holding the segment as JSON;
- ``<ns>:{<id>}:meta`` — a hash: ``task`` (JSON), ``status``, ``error``, ...;
- ``<ns>:index`` — a sorted set of ids by creation time (for ``relaygraph show`` listings).

Appends run one Lua script that checks the expected position, so they are exactly-once
under retries and concurrent writers. Values are JSON; nothing is ever unpickled.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from relaygraph.errors import (
    PositionConflictError,
    StoreUnavailableError,
    TrajectoryNotFoundError,
)
from relaygraph.trajectory.models import Segment, Task, Trajectory, check_trajectory_id

_APPEND = """
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local length = 0
if #top > 0 then
  length = tonumber(string.match(top[1][1], '-(%d+)$'))
end
local seq = tonumber(ARGV[1])
if seq == length then
  redis.call('XADD', KEYS[1], '0-' .. (seq + 1), 's', ARGV[2])
  return 'ok'
elseif seq < length then
  local have = redis.call('XRANGE', KEYS[1], '0-' .. (seq + 1), '0-' .. (seq + 1))
  if have[1][2][2] == ARGV[2] then return 'dup' end
  return 'taken'
end
return 'gap:' .. length
"""


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (safe for logs, spans and errors)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable redis url>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


class RedisStore:
    """A :class:`~relaygraph.trajectory.store.TrajectoryStore` on one Redis/Valkey server.

    ``RedisStore.from_url("redis://:secret@host:6379/0")`` and ``rediss://`` URLs work;
    pass ``client=`` to reuse a configured ``redis.Redis``.
    """

    def __init__(self, client: redis.Redis, namespace: str = "relaygraph", url: str = "") -> None:
        self.client: Any = client  # redis-py's reply types are unions of every protocol's
        self.namespace = namespace
        self.url = redact_url(url) if url else ""
        self._append = client.register_script(_APPEND)

    @classmethod
    def from_url(cls, url: str, namespace: str = "relaygraph", retries: int = 8,
                 **kwargs: object) -> RedisStore:
        """Connect to ``url`` (redis://, rediss://, unix://) and check the server answers.

        Commands that hit a dropped connection are retried ``retries`` times with
        exponential backoff (0.1 s doubling to 2 s: about 9 s for the default 8), so a
        server restart is ridden out; appends stay exactly-once because a retried append
        that had landed is recognised as a duplicate.
        """
        retry = Retry(ExponentialBackoff(cap=2.0, base=0.1), retries,
                      (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError))
        try:
            client = redis.Redis.from_url(url, retry=retry, **kwargs)
        except ValueError as exc:
            raise StoreUnavailableError(
                f"invalid Redis URL {redact_url(url)!r}: {exc}; expected e.g. "
                "redis://[:password@]host:6379/0 or rediss://..."
            ) from None
        store = cls(client, namespace, url)
        store.ping()
        return store

    def ping(self) -> None:
        try:
            self.client.ping()
        except redis.AuthenticationError:
            raise StoreUnavailableError(
                f"Redis at {self.url or 'the given client'} refused the credentials; "
                "check the password in the URL"
            ) from None
        except redis.RedisError as exc:
            raise StoreUnavailableError(
                f"cannot reach Redis at {self.url or 'the given client'} "
                f"({type(exc).__name__}); start the server, fix --redis/REDIS_URL, or omit "
                "them to use the embedded server"
            ) from None

    # keys -------------------------------------------------------------------------------
    def _seg_key(self, tid: str) -> str:
        return f"{self.namespace}:{{{check_trajectory_id(tid)}}}:segments"

    def _meta_key(self, tid: str) -> str:
        return f"{self.namespace}:{{{check_trajectory_id(tid)}}}:meta"

    @property
    def _index_key(self) -> str:
        return f"{self.namespace}:index"

    # protocol ---------------------------------------------------------------------------
    def create(self, trajectory_id: str, task: Task) -> None:
        meta = self._meta_key(trajectory_id)
        if not self.client.hsetnx(meta, "task", task.model_dump_json()):
            raise ValueError(f"trajectory {trajectory_id!r} already exists")
        self.client.hset(meta, mapping={"status": "running", "created_at": str(task.created_at)})
        self.client.zadd(self._index_key, {trajectory_id: task.created_at})

    def exists(self, trajectory_id: str) -> bool:
        return bool(self.client.exists(self._meta_key(trajectory_id)))

    def append(self, trajectory_id: str, seq: int, segment: Segment) -> None:
        if seq < 0:
            raise ValueError(f"position must be >= 0, got {seq}")
        result = self._append(keys=[self._seg_key(trajectory_id)],
                              args=[seq, segment.model_dump_json()])
        result = result.decode() if isinstance(result, bytes) else result
        if result in ("ok", "dup"):
            return
        if result == "taken":
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
            raise TrajectoryNotFoundError(
                f"no trajectory {trajectory_id!r} in {self.url or 'this store'}; "
                "`relaygraph show` lists recent ids"
            )
        return {k.decode(): v.decode() for k, v in raw.items()}

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
        self.client.hset(self._meta_key(trajectory_id), mapping={"status": status, **info})

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
                    last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                    yield seq, Segment.model_validate_json(fields[b"s"])
                    seq += 1
            if not reply and self.status(trajectory_id) != "running":
                if self.length(trajectory_id) <= seq:
                    return

    def list_ids(self, limit: int = 20) -> list[str]:
        return [i.decode() for i in self.client.zrevrange(self._index_key, 0, limit - 1)]

    def close(self) -> None:
        self.client.close()

