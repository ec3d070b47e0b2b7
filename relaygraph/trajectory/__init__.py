"""The shared trajectory: models, the store protocol, and the Redis Streams store."""

from __future__ import annotations

from relaygraph.trajectory.connect import redact_url
from relaygraph.trajectory.models import (
    FinishReason,
    Price,
    Segment,
    SegmentKind,
    Task,
    Trajectory,
    check_namespace,
    check_trajectory_id,
    new_trajectory_id,
)
from relaygraph.trajectory.redis_store import PruneReport, RedisStore
from relaygraph.trajectory.settings import StoreConfig, open_store, parse_duration
from relaygraph.trajectory.store import SharedStore, TrajectoryStore

__all__ = ["FinishReason", "Price", "PruneReport", "RedisStore", "Segment", "SegmentKind",
           "SharedStore", "StoreConfig", "Task", "Trajectory", "TrajectoryStore", "check_namespace",
           "check_trajectory_id", "new_trajectory_id", "open_store", "parse_duration", "redact_url"]
