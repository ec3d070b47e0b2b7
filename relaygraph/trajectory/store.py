"""The trajectory store protocol. Every implementation passes ``relaygraph.testing.store_conformance``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol, runtime_checkable

from relaygraph.trajectory.models import Segment, Task, Trajectory

Status = str
"""``running``, ``finished``, ``failed`` or ``cancelled``."""


@runtime_checkable
class TrajectoryStore(Protocol):
    """Append-only storage of trajectories with exactly-once appends.

    Positions are sequence numbers starting at 0. ``append(tid, seq, seg)`` succeeds only
    when ``seq`` equals the current length; re-appending a segment with the content of the
    one at that position (:meth:`Segment.content`: a retry after a lost reply, or a resumed
    step that reproduces it with slightly different log-probs) is a no-op and the stored
    segment stays; appending different content there raises
    :class:`~relaygraph.errors.PositionConflictError`.
    """

    def create(self, trajectory_id: str, task: Task) -> None:
        """Register a new trajectory; raises ``ValueError`` if the id exists."""
        ...

    def exists(self, trajectory_id: str) -> bool:
        """Whether a trajectory with this id was created."""
        ...

    def append(self, trajectory_id: str, seq: int, segment: Segment) -> None:
        """Append ``segment`` at position ``seq`` exactly once."""
        ...

    def read(self, trajectory_id: str, start: int = 0, end: int | None = None) -> list[Segment]:
        """Segments at positions ``start <= i < end`` (to the end when ``end`` is None)."""
        ...

    def length(self, trajectory_id: str) -> int:
        """Number of segments appended so far."""
        ...

    def load(self, trajectory_id: str) -> Trajectory:
        """The whole trajectory, with its status and the ``info`` recorded with it; raises
        ``TrajectoryNotFoundError`` if unknown."""
        ...

    def set_status(self, trajectory_id: str, status: Status, **info: str) -> None:
        """Record the run's status (and small string facts such as an error message; facts
        recorded earlier stay unless given again)."""
        ...

    def follow(
        self, trajectory_id: str, start: int = 0, block_ms: int = 1000
    ) -> Iterator[tuple[int, Segment]]:
        """Yield ``(seq, segment)`` from ``start`` on as they are appended, until the run ends."""
        ...

    def list_ids(self, limit: int = 20) -> list[str]:
        """Most recently created trajectory ids, newest first."""
        ...

    def delete(self, trajectory_id: str) -> bool:
        """Remove the trajectory and every trace of it (it leaves listings); False if there
        was none."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class SharedStore(TrajectoryStore, Protocol):
    """A store several servers share (``relaygraph serve`` replicas): trajectories are held
    by the process running them (a heartbeat) and can be cancelled or taken over by any."""

    def info(self, trajectory_id: str) -> dict[str, str]:
        """The trajectory's metadata (status, reasons, heartbeat, ...) without its task."""
        ...

    def keepalive(self, trajectory_ids: Iterable[str]) -> dict[str, str | None]:
        """Mark these trajectories held by this process; per id, a requested cancellation's
        reason (``""``: none) or None if the trajectory is gone."""
        ...

    def request_cancel(self, trajectory_id: str, reason: str = "cancelled") -> Status:
        """Ask the process running the trajectory to stop it; returns its status."""
        ...

    def held(self, trajectory_id: str) -> bool:
        """Whether a live process runs it now."""
        ...

    def claim(self, trajectory_id: str) -> Status | None:
        """Take it over to continue it here (None: a live process holds it)."""
        ...


@runtime_checkable
class PipelinedStore(TrajectoryStore, Protocol):
    """A store whose appends can be sent without waiting for the reply (the relay graph
    uses it so that no step waits for a round trip to the server)."""

    def send_append(self, trajectory_id: str, seq: int, segment: Segment) -> Callable[[], None]:
        """Send an :meth:`append`; the returned function reads its reply, raising what
        ``append`` would. Nothing may be appended to the trajectory before it is called."""
        ...
