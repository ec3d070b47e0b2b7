from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from relaygraph.trajectory import RedisStore
from tests.servers import RedisClusterServers, RedisServer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_store(redis_server: RedisServer) -> Iterator[RedisStore]:
    store = RedisStore.from_url(redis_server.url)
    yield store
    store.close()


@pytest.fixture(scope="module")
def store(redis_server: RedisServer) -> Iterator[RedisStore]:
    """One store connection for a module's tests (a module may define its own ``store``)."""
    s = RedisStore.from_url(redis_server.url)
    yield s
    s.close()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """A real 3-node Redis Cluster on loopback, for the session."""
    cluster = RedisClusterServers(tmp_path_factory.mktemp("cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster_store(redis_cluster: RedisClusterServers) -> Iterator[RedisStore]:
    """A store on the cluster, reached through a plain ``redis://`` URL of one node."""
    store = RedisStore.from_url(redis_cluster.node_url(1))
    yield store
    store.close()


@pytest.fixture(scope="session")
def embedded_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private RELAYGRAPH_HOME whose embedded server is stopped at the end of the session."""
    from relaygraph.trajectory import embedded

    home = Path("/tmp") / f"rg-test-{os.getpid()}"  # short: Unix socket paths are limited
    old = os.environ.get("RELAYGRAPH_HOME")
    os.environ["RELAYGRAPH_HOME"] = str(home)
    yield home
    embedded.stop_server()
    if old is None:
        os.environ.pop("RELAYGRAPH_HOME", None)
    else:
        os.environ["RELAYGRAPH_HOME"] = old


@pytest.fixture
def embedded_store(embedded_home: Path) -> Iterator[RedisStore]:
    from relaygraph.trajectory import open_store

    store = open_store()
    yield store
    store.close()


@pytest.fixture(scope="session")
def tiny_pair() -> tuple[Path, Path]:
    """(controller_dir, expert_dir) of the tiny overfit relay pair: trained once, kept across
    sessions (``tests/tiny_models.py``: rebuilt when its recipe or code changes)."""
    from tests import tiny_models as tiny

    return tiny.relay_pair()


@pytest.fixture(scope="session")
def backends(tiny_pair: tuple[Path, Path]):
    """The tiny pair as float32 backends, loaded once a session."""
    from relaygraph.agents.transformers_backend import TransformersBackend

    controller, expert = tiny_pair
    return (TransformersBackend(str(controller), dtype="float32"),
            TransformersBackend(str(expert), dtype="float32"))
