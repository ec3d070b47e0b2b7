"""The store conformance suite on a real redis-server, a real 3-node Redis Cluster and the
embedded Valkey server; Sentinel failover; retention (TTL, prune, delete) and namespaces."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from relaygraph.errors import StoreUnavailableError, TrajectoryNotFoundError
from relaygraph.testing.store_conformance import StoreConformance
from relaygraph.trajectory import RedisStore, Segment, Task, open_store, redact_url
from tests.servers import RedisServer, SentinelServers, free_port


class TestRedisServerStore(StoreConformance):
    @pytest.fixture
    def store(self, redis_store: RedisStore) -> RedisStore:
        return redis_store


class TestClusterStore(StoreConformance):
    @pytest.fixture
    def store(self, cluster_store: RedisStore) -> RedisStore:
        assert cluster_store.kind == "cluster"
        return cluster_store


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


# --- Cluster, Sentinel: a topology from a URL ------------------------------------------------

def test_a_cluster_is_reached_from_any_node_url_and_the_explicit_form(redis_cluster) -> None:
    urls = [redis_cluster.node_url(i) for i in range(3)] + [redis_cluster.url]
    stores = [RedisStore.from_url(url) for url in urls]
    assert {s.kind for s in stores} == {"cluster"}
    writer = stores[0]
    ids = [f"spread-{i}-{time.time_ns()}" for i in range(24)]
    for i, tid in enumerate(ids):
        writer.create(tid, Task(question=f"q{i}"))
        writer.append(tid, 0, Segment(author="a", text=f"t{i}"))
    for reader in stores[1:]:  # every node's URL reads every trajectory, wherever it lives
        assert [reader.read(t)[0].text for t in ids] == [f"t{i}" for i in range(24)]
        assert set(ids) <= set(reader.list_ids(1000))
    client = writer.client
    nodes = set()
    for tid in ids:
        seg, meta = (f"relaygraph:{{{tid}}}:segments", f"relaygraph:{{{tid}}}:meta")
        assert client.keyslot(seg) == client.keyslot(meta)  # one trajectory, one slot
        nodes.add(client.get_node_from_key(seg).name)
    assert len(nodes) >= 2  # trajectories spread over the primaries
    for store in stores:
        store.close()


def test_a_plain_client_on_a_cluster_node_would_hit_moved_errors(redis_cluster) -> None:
    """Why detection matters: the same node through a plain client refuses most keys."""
    import redis as redis_py

    plain = RedisStore(redis_py.Redis.from_url(redis_cluster.node_url(0)), kind="single")
    with pytest.raises(redis_py.exceptions.MovedError):
        for i in range(20):
            plain.create(f"moved-{i}-{time.time_ns()}", Task(question="q"))


def test_sentinel_url_reaches_the_primary_and_survives_a_failover(tmp_path) -> None:
    password = "sentinel-pw-77"
    servers = SentinelServers(tmp_path, password=password).start()
    try:
        # 12 retries ride out ~17 s: the sentinels' 1 s down-after plus an election that
        # may need a second round (4 s later) on a loaded machine
        store = RedisStore.from_url(servers.url, retries=12)
        assert store.kind == "sentinel" and password not in store.url and "***" in store.url
        first = servers.primary_port()
        tid = f"failover-{time.time_ns()}"
        store.create(tid, Task(question="q"))
        for i in range(5):
            store.append(tid, i, Segment(author="a", text=f"before {i}"))
        assert store.client.execute_command("WAIT", 1, 5000) == 1  # replicated, then...
        servers.primary.stop()  # ...the primary dies
        for i in range(5, 10):  # retried through the failover, exactly once
            store.append(tid, i, Segment(author="a", text=f"after {i}"))
        assert servers.primary_port() != first == servers.primary.port
        assert [s.text for s in store.read(tid)] == (
            [f"before {i}" for i in range(5)] + [f"after {i}" for i in range(5, 10)])
        assert store.load(tid).task.question == "q"
        store.set_status(tid, "finished")
        assert RedisStore.from_url(servers.url).status(tid) == "finished"
    finally:
        servers.stop()


@pytest.mark.parametrize("url, problem", [
    ("redis+sentinel://127.0.0.1:26379", "name the Sentinel service"),
    ("redis+cluster://127.0.0.1:7000/3", "only database 0"),
    ("redis+cluster://:pw@", "no host"),
    ("redis+sentinel://h:99999/m", "out of range"),
    ("http://nope", "unknown scheme"),
])
def test_bad_store_urls_are_clear_errors_without_the_password(url, problem) -> None:
    with pytest.raises(StoreUnavailableError, match=problem) as info:
        RedisStore.from_url(url)
    assert "pw" not in str(info.value).replace("***", "")


def test_store_urls_are_parsed_and_redacted() -> None:
    from relaygraph.trajectory.connect import parse_target

    target = parse_target("redis+sentinel://:pw@h1,h2:26380/mymaster/2?sentinel_password=sp&socket_timeout=3")
    assert (target.kind, target.nodes, target.service, target.db) == (
        "sentinel", [("h1", 26379), ("h2", 26380)], "mymaster", 2)
    assert target.sentinel_auth == {"sentinel_password": "sp"}
    assert "sentinel_password" not in target.node_url and ":pw@" in target.node_url
    cluster = parse_target("rediss+cluster://u:p@10.0.0.1:7000,[::1]:7001")
    assert (cluster.kind, cluster.nodes) == ("cluster", [("10.0.0.1", 7000), ("::1", 7001)])
    assert cluster.node_url.startswith("rediss://u:p@10.0.0.1:7000/0")
    assert redact_url("redis+sentinel://:pw@h1,h2/m?sentinel_password=sp&db=1") == (
        "redis+sentinel://:***@h1,h2/m?sentinel_password=***&db=1")
    assert redact_url("redis+cluster://u:p@a:1,b:2") == "redis+cluster://u:***@a:1,b:2"
    assert redact_url("unix:///tmp/x.sock?password=pw") == "unix:///tmp/x.sock?password=***"


# --- retention: TTL, delete, prune; namespaces; memory -----------------------------------

@pytest.fixture(params=["redis_server", "redis_cluster"])
def server_url(request) -> str:
    """A real redis-server's URL, and a cluster node's."""
    server = request.getfixturevalue(request.param)
    return server.url if request.param == "redis_server" else server.node_url(2)


def _keys(store: RedisStore, pattern: str) -> set[str]:
    if store.kind == "cluster":
        from redis.cluster import RedisCluster

        found = store.client.keys(pattern, target_nodes=RedisCluster.PRIMARIES)
    else:
        found = store.client.keys(pattern)
    return {k.decode() for k in found}


def test_ttl_expires_a_trajectory_after_its_last_activity(server_url) -> None:
    ns = f"ttl-{time.time_ns()}"
    store = RedisStore.from_url(server_url, ns, ttl=1.5)
    forever = RedisStore.from_url(server_url, ns)  # no TTL of its own
    tid, kept = "expiring", "kept"
    store.create(tid, Task(question="q"))
    forever.create(kept, Task(question="q"))
    store.append(tid, 0, Segment(author="a", text="x"))
    seg, meta = f"{ns}:{{{tid}}}:segments", f"{ns}:{{{tid}}}:meta"
    assert 0 < store.client.pttl(seg) <= 1500 and 0 < store.client.pttl(meta) <= 1500
    assert store.client.pttl(f"{ns}:{{{kept}}}:meta") == -1
    time.sleep(1.0)
    forever.append(tid, 1, Segment(author="b", text="y"))  # any writer's activity refreshes it
    assert store.client.pttl(seg) > 1000 and store.client.pttl(meta) > 1000
    forever.set_status(tid, "finished")
    assert store.client.pttl(meta) > 1000
    time.sleep(1.7)
    assert not store.exists(tid) and _keys(store, f"{ns}:{{{tid}}}:*") == set()
    assert store.client.zscore(f"{ns}:index", tid) is not None  # until a listing meets it
    assert store.list_ids() == [kept]
    assert store.client.zscore(f"{ns}:index", tid) is None
    assert forever.load(kept).task.question == "q"
    with pytest.raises(TrajectoryNotFoundError):
        store.append(tid, 2, Segment(author="a", text="too late"))
    assert _keys(store, f"{ns}:*") == {f"{ns}:{{{kept}}}:meta", f"{ns}:index"}


def test_prune_and_delete_remove_their_trajectories_and_nothing_else(server_url) -> None:
    ns, other = f"prune-{time.time_ns()}", f"other-{time.time_ns()}"
    store, neighbour = RedisStore.from_url(server_url, ns), RedisStore.from_url(server_url, other)
    now = time.time()
    old = now - 10 * 86400

    def make(s: RedisStore, tid: str, created: float, status: str) -> None:
        s.create(tid, Task(question=tid, created_at=created))
        s.append(tid, 0, Segment(author="a", text=tid))
        if status != "running":
            s.set_status(tid, status)

    for tid, created, status in [("old-fin", old, "finished"), ("old-fail", old, "failed"),
                                 ("old-dead", old, "running"), ("old-live", old, "running"),
                                 ("new-fin", now, "finished")]:
        make(store, tid, created, status)
    make(neighbour, "old-fin", old, "finished")  # same id, another namespace
    store.keepalive(["old-live"])  # a live server runs it
    store.client.zadd(f"{ns}:index", {"expired-one": old})  # its keys already expired
    store.client.set("unrelated:key", "v")
    week = 7 * 86400

    dry = store.prune(week, ["finished"], dry_run=True)
    assert dry.deleted == ["old-fin"] and store.exists("old-fin")
    report = store.prune(week, ["finished"])
    assert report.deleted == ["old-fin"] and report.expired == 1 and report.held == []
    assert not store.exists("old-fin") and _keys(store, f"{ns}:{{old-fin}}:*") == set()
    report = store.prune(week)
    assert sorted(report.deleted) == ["old-dead", "old-fail"] and report.held == ["old-live"]
    assert sorted(store.list_ids(100)) == ["new-fin", "old-live"]
    assert {k.decode() for k in store.client.zrange(f"{ns}:index", 0, -1)} == {"new-fin", "old-live"}
    assert _keys(store, f"{ns}:*") == {f"{ns}:index", *(f"{ns}:{{{t}}}:{k}" for t in ("new-fin", "old-live")
                                                       for k in ("meta", "segments"))}
    assert neighbour.read("old-fin")[0].text == "old-fin"  # the other namespace: untouched
    assert store.client.get("unrelated:key") == b"v"
    assert store.delete("new-fin") and not store.delete("new-fin")
    assert store.list_ids(100) == ["old-live"] and neighbour.exists("old-fin")
    store.client.delete("unrelated:key")


def test_namespaces_are_validated_and_kept_apart(redis_server) -> None:
    for bad in ("a:b", "x}y", "", "a b", "n" * 65):
        with pytest.raises(ValueError, match="namespace"):
            RedisStore.from_url(redis_server.url, bad)
    a, b = (RedisStore.from_url(redis_server.url, f"{n}-{time.time_ns()}") for n in "ab")
    a.create("same-id", Task(question="in a"))
    b.create("same-id", Task(question="in b"))
    assert a.load("same-id").task.question == "in a" and b.load("same-id").task.question == "in b"
    assert a.list_ids() == ["same-id"] == b.list_ids()


def test_heartbeat_cancellation_and_claims_are_per_trajectory(redis_store) -> None:
    tid = f"held-{time.time_ns()}"
    redis_store.create(tid, Task(question="q"))
    assert not redis_store.held(tid)  # created, but no server has claimed it
    assert redis_store.keepalive([tid, "no-such-id"]) == {tid: "", "no-such-id": None}
    assert redis_store.held(tid)
    assert redis_store.claim(tid) is None  # held by a live server: no takeover
    assert redis_store.request_cancel(tid, "stop please") == "running"
    assert redis_store.keepalive([tid]) == {tid: "stop please"}  # the holder learns of it
    redis_store.set_status(tid, "cancelled", cancel_reason="stop please")
    assert not redis_store.held(tid) and redis_store.request_cancel(tid) == "cancelled"
    assert redis_store.claim(tid) == "cancelled"  # taken over; the old request is cleared
    assert "cancel_requested" not in redis_store.info(tid)
    with pytest.raises(TrajectoryNotFoundError):
        redis_store.request_cancel("no-such-id")


def test_memory_is_reported_per_trajectory(server_url) -> None:
    store = RedisStore.from_url(server_url, f"mem-{time.time_ns()}")
    for i in range(20):
        tid = f"m{i}"
        store.create(tid, Task(question="What is 2 + 5?"))
        for seq in range(10):
            store.append(tid, seq, Segment(author="a", text="word " * 40, token_ids=list(range(40))))
    report = store.memory(sample=10)
    assert report["trajectories"] == 20 and report["sampled"] == 10
    assert report["segments_per_trajectory"] == 10
    raw = 10 * len(Segment(author="a", text="word " * 40, token_ids=list(range(40))).model_dump_json())
    assert raw < report["bytes_per_trajectory"] < 4 * raw + 4096  # the JSON, plus overheads
    assert report["used_memory"] > 20 * report["bytes_per_trajectory"]
