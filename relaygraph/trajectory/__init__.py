"""The shared trajectory: models, the store protocol, and the Redis Streams store."""

from __future__ import annotations

import os

from relaygraph.trajectory.connect import redact_url
from relaygraph.trajectory.models import (
    FinishReason,
    Segment,
    SegmentKind,
    Task,
    Trajectory,
    check_namespace,
    check_trajectory_id,
    new_trajectory_id,
)
from relaygraph.trajectory.redis_store import PruneReport, RedisStore
from relaygraph.trajectory.settings import StoreConfig, parse_duration
from relaygraph.trajectory.store import SharedStore, TrajectoryStore


def open_store(url: str | None = None, namespace: str = "relaygraph", retries: int = 8,
               ttl: float | None = None) -> RedisStore:
    """Connect to ``url``, else ``$REDIS_URL``, else the per-user embedded Valkey server.

    ``url`` may name one server (``redis://``, ``rediss://``, ``unix://``; a Cluster node is
    detected), a Cluster (``redis+cluster://h1:p1,h2:p2``) or a Sentinel service
    (``redis+sentinel://h1:26379,h2:26379/SERVICE``). ``namespace`` prefixes every key;
    ``ttl`` (seconds) makes new trajectories expire that long after their last activity.
    """
    url = url or os.environ.get("REDIS_URL")
    if not url:
        from relaygraph.trajectory.embedded import embedded_url

        url = embedded_url()
    return RedisStore.from_url(url, namespace, retries=retries, ttl=ttl)


__all__ = ["FinishReason", "PruneReport", "RedisStore", "Segment", "SegmentKind", "SharedStore",
           "StoreConfig", "Task", "Trajectory", "TrajectoryStore", "check_namespace", "check_trajectory_id",
           "new_trajectory_id", "open_store", "parse_duration", "redact_url"]
