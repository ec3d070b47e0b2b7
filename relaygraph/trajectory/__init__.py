"""The shared trajectory: models, the store protocol, and the Redis Streams store."""

from __future__ import annotations

import os

from relaygraph.trajectory.models import (
    FinishReason,
    Price,
    Segment,
    SegmentKind,
    Task,
    Trajectory,
    check_trajectory_id,
    new_trajectory_id,
)
from relaygraph.trajectory.redis_store import RedisStore, redact_url
from relaygraph.trajectory.store import TrajectoryStore


def open_store(url: str | None = None, namespace: str = "relaygraph", retries: int = 8) -> RedisStore:
    """Connect to ``url``, else ``$REDIS_URL``, else the per-user embedded Valkey server."""
    url = url or os.environ.get("REDIS_URL")
    if not url:
        from relaygraph.trajectory.embedded import embedded_url

        url = embedded_url()
    return RedisStore.from_url(url, namespace, retries=retries)


__all__ = ["FinishReason", "Price", "RedisStore", "Segment", "SegmentKind", "Task", "Trajectory",
           "TrajectoryStore", "check_trajectory_id", "new_trajectory_id", "open_store",
           "redact_url"]
