"""Conformance suite for :class:`~relaygraph.trajectory.store.TrajectoryStore` implementations.

Subclass :class:`StoreConformance` in a pytest module and provide a ``store`` fixture
returning a fresh store; every test here must pass (as LangGraph ships for checkpointers)::

    class TestMyStore(StoreConformance):
        @pytest.fixture
        def store(self):
            return MyStore(...)
"""

from __future__ import annotations

import threading

import pytest

from relaygraph.errors import PositionConflictError, TrajectoryNotFoundError
from relaygraph.trajectory.models import Segment, Task, new_trajectory_id
from relaygraph.trajectory.store import TrajectoryStore


def _seg(author: str, text: str, **kw: object) -> Segment:
    return Segment.model_validate({"author": author, "text": text, **kw})


def _new(store: TrajectoryStore) -> str:
    tid = new_trajectory_id()
    store.create(tid, Task(question="What is 2 + 5?", policy="test"))
    return tid


class StoreConformance:
    """The behaviour every trajectory store must have."""

    def test_is_a_store(self, store: TrajectoryStore) -> None:
        assert isinstance(store, TrajectoryStore)

    def test_create_load_roundtrip(self, store: TrajectoryStore) -> None:
        tid = _new(store)
        seg = _seg("controller", "Let me think.", token_ids=[1, 2, 3], tokenizer="t",
                   logprobs=[-0.1, -0.2, -0.3], finish_reason="call", meta={"n": 3})
        store.append(tid, 0, seg)
        loaded = store.load(tid)
        assert loaded.task.question == "What is 2 + 5?"
        assert loaded.segments == [seg]
        assert loaded.status == "running"
        assert store.exists(tid)

    def test_create_twice_fails(self, store: TrajectoryStore) -> None:
        tid = _new(store)
        with pytest.raises(ValueError):
            store.create(tid, Task(question="again"))

    def test_unknown_trajectory(self, store: TrajectoryStore) -> None:
        assert not store.exists("nope-nope")
        with pytest.raises(TrajectoryNotFoundError):
            store.load("nope-nope")

    def test_invalid_ids_are_refused(self, store: TrajectoryStore) -> None:
        for bad in ("a}b", "x:y", "", "a" * 65, "../../etc", "a b", "ü"):
            with pytest.raises(ValueError):
                store.read(bad)

    def test_append_in_order_and_read_ranges(self, store: TrajectoryStore) -> None:
        tid = _new(store)
        segs = [_seg("a" if i % 2 else "b", f"part {i} ") for i in range(12)]
        for i, seg in enumerate(segs):
            store.append(tid, i, seg)
        assert store.length(tid) == 12
        assert store.read(tid) == segs
        assert store.read(tid, 3, 7) == segs[3:7]
        assert store.read(tid, 10) == segs[10:]
        assert store.read(tid, 5, 5) == []

    def test_retry_of_same_append_is_a_noop(self, store: TrajectoryStore) -> None:
        tid = _new(store)
        seg = _seg("a", "hello")
        store.append(tid, 0, seg)
        store.append(tid, 0, seg)  # a retry after a lost reply
        assert store.length(tid) == 1
        assert store.read(tid) == [seg]

    def test_conflicting_append_at_taken_position_fails(self, store: TrajectoryStore) -> None:
        tid = _new(store)
        store.append(tid, 0, _seg("a", "first"))
        with pytest.raises(PositionConflictError) as info:
            store.append(tid, 0, _seg("b", "second"))
        assert info.value.seq == 0
        assert store.read(tid) == [_seg("a", "first")]

    def test_reappend_of_equal_content_keeps_the_stored_segment(self, store: TrajectoryStore) -> None:
        """A resumed step prefills from scratch: same tokens, log-probs off in the last bits."""
        tid = _new(store)
        head = _seg("a", "so 7", token_ids=[5, 6], logprobs=[-0.5, -0.25])
        call = _seg("a", " <call>", kind="call", token_ids=[9], logprobs=[-0.125],
                    meta={"command": [1, 7], "step": {"author": "a", "to": "b", "confidence": 0.5}})
        store.append(tid, 0, head)
        store.append(tid, 1, call)
        store.append(tid, 0, head.model_copy(update={"logprobs": [-0.58, -0.2]}))
        store.append(tid, 1, call.model_copy(update={"logprobs": [-0.1], "meta": {
            "command": [1, 7], "step": {"author": "a", "to": "b", "confidence": 0.49}}}))
        assert store.read(tid) == [head, call]  # the stored segments stay, log-probs and all

    def test_reappend_of_other_content_conflicts(self, store: TrajectoryStore) -> None:
        tid = _new(store)
        head = _seg("a", "so 7", token_ids=[5, 6], kind="call", meta={"command": [1, 4]})
        store.append(tid, 0, head)
        for changed in ({"author": "b"}, {"kind": "text"}, {"text": "so 8"},
                        {"token_ids": [5, 7]}, {"meta": {"command": [0, 4]}},
                        {"meta": {"command": [1, 4], "step": {"author": "a", "to": "b"}}}):
            with pytest.raises(PositionConflictError):
                store.append(tid, 0, head.model_copy(update=changed))
        assert store.read(tid) == [head]

    def test_append_past_the_end_fails(self, store: TrajectoryStore) -> None:
        tid = _new(store)
        with pytest.raises(PositionConflictError):
            store.append(tid, 3, _seg("a", "gap"))
        assert store.length(tid) == 0

    def test_concurrent_writers_one_winner_per_position(self, store: TrajectoryStore) -> None:
        tid = _new(store)
        positions = 40
        wins: dict[str, list[int]] = {"a": [], "b": []}

        def writer(name: str) -> None:
            seq = 0
            while seq < positions:
                try:
                    store.append(tid, seq, _seg(name, f"{name}{seq}"))
                    wins[name].append(seq)
                except PositionConflictError:
                    pass  # the other writer took it: move on, as a handler would
                seq += 1

        threads = [threading.Thread(target=writer, args=(n,)) for n in wins]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        segments = store.read(tid)
        assert len(segments) == positions
        assert sorted(wins["a"] + wins["b"]) == list(range(positions))
        for seq, seg in enumerate(segments):
            assert seg.text == f"{seg.author}{seq}"
            assert seq in wins[seg.author]

    def test_status(self, store: TrajectoryStore) -> None:
        tid = _new(store)
        store.set_status(tid, "failed", error="boom")
        loaded = store.load(tid)
        assert loaded.status == "failed" and loaded.info["error"] == "boom"
        store.set_status(tid, "interrupted", thread_id="t-1")
        loaded = store.load(tid)
        assert loaded.status == "interrupted"
        assert loaded.info["thread_id"] == "t-1" and loaded.info["error"] == "boom"

    def test_follow_sees_live_appends_and_stops_at_the_end(self, store: TrajectoryStore) -> None:
        tid = _new(store)
        store.append(tid, 0, _seg("a", "zero"))

        def produce() -> None:
            for i in range(1, 4):
                store.append(tid, i, _seg("a", f"n{i}"))
            store.set_status(tid, "finished")

        seen: list[tuple[int, str]] = []
        timer = threading.Timer(0.2, produce)
        timer.start()
        for seq, seg in store.follow(tid, block_ms=100):
            seen.append((seq, seg.text))
        timer.join()
        assert seen == [(0, "zero"), (1, "n1"), (2, "n2"), (3, "n3")]

    def test_list_ids_newest_first(self, store: TrajectoryStore) -> None:
        first, second = _new(store), _new(store)
        ids = store.list_ids(1000)
        assert ids.index(second) < ids.index(first)

    def test_delete_removes_one_trajectory_and_nothing_else(self, store: TrajectoryStore) -> None:
        gone, kept = _new(store), _new(store)
        for tid in (gone, kept):
            store.append(tid, 0, _seg("a", f"in {tid}"))
        assert store.delete(gone)
        assert not store.exists(gone) and store.length(gone) == 0
        with pytest.raises(TrajectoryNotFoundError):
            store.load(gone)
        assert gone not in store.list_ids(1000)
        assert store.read(kept) == [_seg("a", f"in {kept}")] and kept in store.list_ids(1000)
        assert not store.delete(gone)

    def test_append_to_an_unknown_trajectory_fails(self, store: TrajectoryStore) -> None:
        tid = new_trajectory_id()
        with pytest.raises(TrajectoryNotFoundError):
            store.append(tid, 0, _seg("a", "orphan"))
        assert store.length(tid) == 0  # nothing left behind without its metadata

    def test_values_are_json(self, store: TrajectoryStore) -> None:
        tid = _new(store)
        tricky = _seg("a", 'quote " backslash \\ unicode ✓ <call>3</call> \x00 nul')
        store.append(tid, 0, tricky)
        assert store.read(tid) == [tricky]
