"""Errors a user can act on.

Every error raised for bad input or a broken environment is a :class:`RelayGraphError`
whose message says what is wrong and how to fix it; the CLI prints it on one line and
exits with status 2.
"""

from __future__ import annotations

from typing import Any


class RelayGraphError(Exception):
    """Base class: a problem the user can fix (bad input, missing model, no server)."""


class ConfigError(RelayGraphError, ValueError):
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


class Cancelled(RelayGraphError):
    """A run was cancelled while generating (a served request went away, Ctrl-C in an
    experiment). Not retried: the run ends at once; what was written is kept."""

    def __init__(self, reason: str = "cancelled") -> None:
        self.reason = reason
        super().__init__(reason)


class NestedError(ValueError):
    """A problem inside a nested value (``loc`` relative to it), raised by validators that
    parse nested configs themselves, so the full path still reaches the message."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        self.loc = loc
        self.message = message
        super().__init__(f"{'.'.join(map(str, loc))}: {message}" if loc else message)


def validation_message(exc: Any) -> str:
    """``field.path: message`` of a pydantic ``ValidationError``'s first problem, one line."""
    first = exc.errors()[0]
    loc, message = tuple(first["loc"]), str(first["msg"]).removeprefix("Value error, ")
    nested = (first.get("ctx") or {}).get("error")
    if isinstance(nested, NestedError):
        loc, message = loc + nested.loc, nested.message
    where = ".".join(str(p) if str(p).isprintable() else repr(p) for p in loc)
    message = " ".join(message.split())
    return f"{where}: {message}" if where else message


def nested_error(exc: Any, *prefix: str | int) -> NestedError:
    """A pydantic ``ValidationError`` of a nested value as a :class:`NestedError`."""
    first = exc.errors()[0]
    loc, message = tuple(first["loc"]), str(first["msg"]).removeprefix("Value error, ")
    inner = (first.get("ctx") or {}).get("error")
    if isinstance(inner, NestedError):
        loc, message = loc + inner.loc, inner.message
    return NestedError(prefix + loc, message)
