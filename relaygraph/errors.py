"""Errors a user can act on.

Every error raised for bad input or a broken environment is a :class:`RelayGraphError`
whose message says what is wrong and how to fix it; the CLI prints it on one line and
exits with status 2.
"""

from __future__ import annotations


class RelayGraphError(Exception):
    """Base class: a problem the user can fix (bad input, missing model, no server)."""


class ConfigError(RelayGraphError):
    """A configuration value or argument is invalid."""


class ModelNotFoundError(RelayGraphError):
    """A model name, path or hub id could not be resolved to weights."""


class StoreUnavailableError(RelayGraphError):
    """The trajectory store (Redis/Valkey) cannot be reached."""


class BackendError(RelayGraphError):
    """A model backend kept failing (raised, timed out or returned nothing) after retries."""


class TrajectoryNotFoundError(RelayGraphError):
    """No trajectory with this id exists in the store."""


class PositionConflictError(RelayGraphError):
    """Another writer already appended a different segment at this position."""

    def __init__(self, trajectory_id: str, seq: int, detail: str = "") -> None:
        self.trajectory_id = trajectory_id
        self.seq = seq
        super().__init__(
            f"trajectory {trajectory_id!r}: position {seq} is already taken by another "
            f"writer{': ' + detail if detail else ''}; re-read the trajectory and append at "
            "its current length"
        )
