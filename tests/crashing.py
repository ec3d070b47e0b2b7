"""A store whose process 'dies' right after an append lands: for crash-and-resume tests."""

from __future__ import annotations

from collections.abc import Callable

from relaygraph.trajectory import RedisStore, Segment


class Crash(BaseException):
    """Stands for the process dying mid-run (not an Exception: nothing handles it)."""


def crash_after(store: RedisStore, position: int) -> RedisStore:
    """``store`` whose process 'dies' right after its append at ``position`` lands, whether
    the relay appends at once (``append``) or pipelined (``send_append``, the graph's path)."""
    real_append, real_send = store.append, store.send_append

    def append(tid: str, seq: int, seg: Segment) -> None:
        real_append(tid, seq, seg)
        if seq == position:
            raise Crash()

    def send_append(tid: str, seq: int, seg: Segment) -> Callable[[], None]:
        confirm = real_send(tid, seq, seg)
        if seq == position:
            confirm()
            raise Crash()
        return confirm

    store.append = append  # type: ignore[method-assign]
    store.send_append = send_append  # type: ignore[method-assign]
    return store
