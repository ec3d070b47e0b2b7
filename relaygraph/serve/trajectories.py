"""Trajectories through the API, for replicas on one store: a stored trajectory as JSON,
store calls as API errors, what a resumed run reads of a request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from relaygraph.errors import ConfigError, StoreUnavailableError, TrajectoryNotFoundError
from relaygraph.relay import RunResult
from relaygraph.serve.schemas import APIError, bad_request
from relaygraph.trajectory.models import active, check_trajectory_id
from relaygraph.trajectory.store import SharedStore


@dataclass
class Resume:
    """What :func:`create_app`'s ``_serve`` reads of a request, for a resumed run."""

    model: str
    stream: bool = False
    include_usage: bool = False


def check_id(trajectory_id: str) -> str:
    try:
        return check_trajectory_id(trajectory_id)
    except ConfigError as exc:
        raise bad_request(str(exc), None, "invalid_trajectory_id") from None


def store_call(func: Any, *args: Any, **kwargs: Any) -> Any:
    """``func(*args)`` on the store, its failures as API errors (404 unknown id, 503 store)."""
    import redis

    try:
        return func(*args, **kwargs)
    except TrajectoryNotFoundError as exc:
        raise APIError(404, str(exc), code="trajectory_not_found") from None
    except StoreUnavailableError as exc:
        raise APIError(503, str(exc), "server_error", code="store_unavailable") from None
    except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
        raise APIError(503, f"the trajectory store failed ({type(exc).__name__}); retry "
                       "shortly", "server_error", code="store_unavailable") from None


def trajectory_view(store: SharedStore, trajectory_id: str) -> dict[str, Any]:
    """A stored trajectory as JSON: status, its text, segments and the numbers its step
    records add up to (:meth:`RunResult.from_trajectory`: what ``relaygraph show --json``
    and ``relaygraph run --json`` print)."""
    trajectory = store_call(store.load, trajectory_id)
    info = store_call(store.info, trajectory_id)
    task = trajectory.task
    result = RunResult.from_trajectory(trajectory)
    served = task.config.get("serve") if isinstance(task.config.get("serve"), dict) else {}
    kept = active(trajectory.segments)
    return {
        "id": trajectory_id, "object": "relaygraph.trajectory", "status": trajectory.status,
        "model": served.get("model"), "question": task.question,
        "created_at": task.created_at, "policy": task.policy, "agents": task.agents,
        "answer": result.answer, "finish_reason": result.finish_reason or None,
        "cancel_reason": info.get("cancel_reason"), "error": info.get("error"),
        "held": bool(store_call(store.held, trajectory_id)),
        "content": "".join(s.text for s in kept if s.kind in ("text", "call")),
        "segments": [s.model_dump() for s in result.segments],
        "usage": {"tokens_by_agent": result.tokens_by_agent,
                  "input_tokens_by_agent": result.input_tokens_by_agent,
                  "call_ratio": result.call_ratio, "handoffs": result.handoffs,
                  "counters": result.counters, "cost": result.cost,
                  "cost_by_agent": result.cost_by_agent},
        "handoff_records": [r.model_dump(by_alias=True) for r in result.handoff_records],
    }
