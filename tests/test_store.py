"""The store conformance suite on a real redis-server and on the embedded Valkey server."""

from __future__ import annotations

import subprocess
import sys

import pytest

from relaygraph.errors import StoreUnavailableError
from relaygraph.testing.store_conformance import StoreConformance
from relaygraph.trajectory import RedisStore, Segment, Task, open_store, redact_url
from tests.servers import RedisServer, free_port


class TestRedisServerStore(StoreConformance):
    @pytest.fixture
    def store(self, redis_store: RedisStore) -> RedisStore:
        return redis_store


class TestEmbeddedStore(StoreConformance):
    @pytest.fixture
    def store(self, embedded_store: RedisStore) -> RedisStore:
        return embedded_store


def test_keys_carry_a_hash_tag_per_trajectory(redis_store: RedisStore) -> None:
    redis_store.create("abc-1", Task(question="q"))
    redis_store.append("abc-1", 0, Segment(author="a", text="x"))
    keys = sorted(k.decode() for k in redis_store.client.keys("relaygraph:{abc-1}:*"))
    assert keys == ["relaygraph:{abc-1}:meta", "relaygraph:{abc-1}:segments"]
    raw = redis_store.client.xrange("relaygraph:{abc-1}:segments")
    assert raw[0][0] == b"0-1"  # explicit stream id = position + 1
    assert raw[0][1][b"s"].startswith(b"{")  # JSON, not pickle


def test_password_url_works_and_is_never_echoed(tmp_path) -> None:
    server = RedisServer(tmp_path, password="s3cr3t-pw").start()
    try:
        store = RedisStore.from_url(server.url)
        store.create("pw-1", Task(question="q"))
        assert store.exists("pw-1")
        assert "s3cr3t-pw" not in store.url
        wrong = server.url.replace("s3cr3t-pw", "wrong-pw")
        with pytest.raises(StoreUnavailableError) as info:
            RedisStore.from_url(wrong)
        assert "wrong-pw" not in str(info.value) and "***" in str(info.value)
    finally:
        server.stop()


def test_tls_url_works(tmp_path) -> None:
    server = RedisServer(tmp_path, password="tls-pw", tls=True).start()
    try:
        store = RedisStore.from_url(server.url)
        store.create("tls-1", Task(question="q"))
        store.append("tls-1", 0, Segment(author="a", text="over tls"))
        assert store.read("tls-1")[0].text == "over tls"
        assert "tls-pw" not in store.url
    finally:
        server.stop()


def test_unreachable_server_is_a_clear_error() -> None:
    with pytest.raises(StoreUnavailableError, match="cannot reach Redis"):
        RedisStore.from_url(f"redis://:pw@127.0.0.1:{free_port()}/0")


def test_redact_url() -> None:
    assert redact_url("redis://user:pw@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact_url("rediss://:pw@h/1") == "rediss://:***@h/1"
    assert redact_url("redis://host:6379") == "redis://host:6379"


def test_embedded_server_is_shared_across_processes_and_persists(embedded_store: RedisStore) -> None:
    """Another process finds the same server; data survives a stop and a restart."""
    from relaygraph.trajectory import embedded

    code = (
        "from relaygraph.trajectory import open_store, Task, Segment\n"
        "s = open_store()\n"
        "s.create('shared-1', Task(question='from a child'))\n"
        "s.append('shared-1', 0, Segment(author='child', text='hello'))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert embedded_store.read("shared-1")[0].text == "hello"
    pid = embedded.server_pid()
    assert pid is not None
    assert embedded.stop_server()
    assert embedded.server_pid() is None
    again = open_store()  # starts a new server on the same data directory
    assert again.load("shared-1").segments[0].author == "child"
    assert embedded.server_pid() not in (None, pid)
