"""Pipelined appends (the relay graph's hot path): sent without waiting, confirmed later,
with the same exactly-once outcomes as a plain append, on a real Redis server."""

from __future__ import annotations

import time

import pytest

from relaygraph.errors import PositionConflictError
from relaygraph.graphs.relay import SegmentCache
from relaygraph.trajectory import PipelinedStore, RedisStore, Segment, Task


def seg(text: str) -> Segment:
    return Segment(author="a", kind="text", text=text)


def fresh(store: RedisStore) -> str:
    tid = f"pipe-{time.time_ns()}"
    store.create(tid, Task(question="q"))
    return tid


def test_a_sent_append_is_stored_and_a_second_confirm_is_harmless(redis_store) -> None:
    assert isinstance(redis_store, PipelinedStore)
    tid = fresh(redis_store)
    confirms = [redis_store.send_append(tid, 0, seg("s0"))]
    confirms[0]()
    confirms.append(redis_store.send_append(tid, 1, seg("s1")))
    confirms[1]()
    confirms[1]()  # again: appends again, a duplicate of what landed
    assert [s.text for s in redis_store.read(tid)] == ["s0", "s1"]


def test_a_conflicting_sent_append_raises_on_confirm_every_time(redis_store) -> None:
    tid = fresh(redis_store)
    redis_store.append(tid, 0, seg("first"))
    confirm = redis_store.send_append(tid, 0, seg("other"))
    with pytest.raises(PositionConflictError):
        confirm()
    with pytest.raises(PositionConflictError):
        confirm()  # never reads the released connection again
    assert redis_store.client.ping()  # the pool's connections are fine
    assert [s.text for s in redis_store.read(tid)] == ["first"]


def test_the_graph_cache_confirms_before_the_next_write_and_keeps_a_failure(redis_store) -> None:
    tid = fresh(redis_store)
    cache = SegmentCache(redis_store)
    cache.append(tid, 0, seg("a"))
    cache.append(tid, 1, seg("b"))  # confirms "a" first
    redis_store.append(tid, 2, seg("someone else"))
    cache.append(tid, 2, seg("c"))  # sent: the conflict shows at the next write
    with pytest.raises(PositionConflictError):
        cache.append(tid, 3, seg("d"))
    with pytest.raises(PositionConflictError):
        cache.confirm(tid)  # still pending: a retry meets it again
    assert [s.text for s in redis_store.read(tid)] == ["a", "b", "someone else"]


def test_an_evicted_trajectory_has_its_appends_confirmed(redis_store) -> None:
    cache = SegmentCache(redis_store, size=1)
    first, second = fresh(redis_store), fresh(redis_store)
    cache.append(first, 0, seg("x"))
    cache.append(second, 0, seg("y"))  # evicts the first: its reply is read
    assert first not in cache._pending and second in cache._pending
    cache.confirm(second)
    assert not cache._pending
    assert [s.text for s in redis_store.read(first)] == ["x"]
