"""Whether a running trajectory's process is still alive: heartbeats.

The process running a trajectory records itself with it (``holder``: ``host:pid``) and a
``heartbeat`` (the time) when its run starts or continues, then refreshes the heartbeat
every :data:`HEARTBEAT_EVERY_S` seconds from a background thread (the store's
``keepalive``, the mechanism ``relaygraph serve`` replicas use to hold their runs) until the
run finishes, pauses for a person or fails. A trajectory whose status is still ``running``
but whose process is gone — it exited on this machine, or it has not beaten for
:data:`HEARTBEAT_STALE_S` seconds — was interrupted: :func:`effective_status` says
``interrupted``, and ``relaygraph resume ID`` continues it.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

HEARTBEAT_EVERY_S = 5.0
"""Seconds between a running trajectory's heartbeats."""
HEARTBEAT_STALE_S = 15.0
"""A running trajectory whose heartbeat is older than this is not held by a live process."""


def holder_id() -> str:
    """This process, as recorded with the trajectories it runs: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def holding(now: float | None = None) -> dict[str, str]:
    """The metadata that says this process runs a trajectory (for ``set_status``)."""
    return {"holder": holder_id(), "heartbeat": f"{time.time() if now is None else now:.3f}"}


def alive(trajectory_id: str, info: Mapping[str, str], now: float | None = None) -> bool:
    """Whether the process recorded as running the trajectory is alive: its heartbeat is
    fresh and, when it ran on this machine, the process still exists (and, for this very
    process, still runs the trajectory)."""
    now = time.time() if now is None else now
    try:  # a run that has not beaten yet is as alive as it is young
        beat = float(info.get("heartbeat") or info.get("created_at") or 0.0)
    except ValueError:
        beat = 0.0
    if beat < now - HEARTBEAT_STALE_S:
        return False
    host, _, pid = (info.get("holder") or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another machine (or a server's heartbeat alone): the time decides
    if int(pid) == os.getpid():
        return _beats.holds(trajectory_id)
    return _process_exists(int(pid))


def effective_status(trajectory_id: str, status: str, info: Mapping[str, str],
                     now: float | None = None) -> str:
    """The stored status, except ``interrupted`` for a ``running`` trajectory whose process
    is gone (killed, crashed, or its machine lost)."""
    if status == "running" and not alive(trajectory_id, info, now):
        return "interrupted"
    return status


def stopped_because(info: Mapping[str, str]) -> str:
    """Words for why a ``running`` trajectory is not alive, for messages."""
    host, _, pid = (info.get("holder") or "").rpartition(":")
    try:
        beat = float(info.get("heartbeat") or 0.0)
    except ValueError:
        beat = 0.0
    last = (f"last heartbeat {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(beat))}"
            if beat else "no heartbeat recorded")
    if host == socket.gethostname() and pid.isdigit() and not _process_exists(int(pid)):
        return f"its process ({pid}) is gone; {last}"
    return f"{last}, more than {HEARTBEAT_STALE_S:.0f} s ago" if beat else last


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:  # a killed child nobody has reaped yet is a zombie: gone all the same
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rpartition(")")[2].split()[:1] != ["Z"]
    except OSError:
        return True


class _Heartbeats:
    """One daemon thread per process beating for every trajectory it runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, Any] = {}  # trajectory id -> its store
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def holds(self, trajectory_id: str) -> bool:
        with self._lock:
            return trajectory_id in self._held

    def hold(self, store: Any, trajectory_id: str) -> None:
        with self._lock:
            self._held[trajectory_id] = store
            self._wake.set()  # a thread waiting out an old interval starts a new one
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="relaygraph-heartbeat",
                                                daemon=True)
                self._thread.start()

    def release(self, trajectory_id: str) -> Any:
        with self._lock:
            return self._held.pop(trajectory_id, None)

    def _run(self) -> None:
        while True:
            if self._wake.wait(HEARTBEAT_EVERY_S):
                self._wake.clear()
                continue  # just held: its holder recorded the first beat
            with self._lock:
                if not self._held:
                    self._thread = None
                    return
                by_store: dict[int, tuple[Any, list[str]]] = {}
                for tid, store in self._held.items():
                    by_store.setdefault(id(store), (store, []))[1].append(tid)
            for store, ids in by_store.values():
                keepalive = getattr(store, "keepalive", None)
                if keepalive is None:
                    continue
                try:
                    keepalive(ids)
                except Exception:  # noqa: BLE001 - a missed beat is retried; runs go on
                    pass


_beats = _Heartbeats()


def hold(store: Any, trajectory_id: str) -> None:
    """Beat for ``trajectory_id`` (whose ``holder``/``heartbeat`` the caller has just
    recorded, :func:`holding`) until :func:`release`."""
    _beats.hold(store, trajectory_id)


def held_here(trajectory_id: str) -> bool:
    """Whether this process beats for ``trajectory_id`` now."""
    return _beats.holds(trajectory_id)


def release(trajectory_id: str, store: Any = None, clear: bool = False) -> None:
    """Stop beating for ``trajectory_id``; with ``clear``, also drop its heartbeat from the
    store (a run that failed in a process that lives on), best effort."""
    held = _beats.release(trajectory_id)
    store = store if store is not None else held
    if clear and store is not None and hasattr(store, "release"):
        try:
            store.release(trajectory_id)
        except Exception:  # noqa: BLE001 - the store may be what failed; the beat goes stale
            pass


__all__ = ["HEARTBEAT_EVERY_S", "HEARTBEAT_STALE_S", "alive", "effective_status", "hold", "held_here",
           "holder_id", "holding", "release", "stopped_because"]
