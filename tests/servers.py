"""Real Redis servers for tests: Debian's ``redis-server`` on free loopback ports — one
server, a 3-node Cluster, or a primary + replica watched by ``redis-sentinel``."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_cluster_port() -> int:
    """A free port whose Cluster bus port (port + 10000) is free too."""
    for _ in range(100):
        port = free_port()
        if port + 10000 < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair for a cluster node")


def require_redis_server(name: str = "redis-server", package: str = "redis-server") -> str:
    binary = shutil.which(name)
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; .ci/run must apt-get install {package}")
        pytest.skip(f"{name} is not installed (apt-get install {package})")
    return binary


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start on port {port}") from None
            time.sleep(0.02)


class RedisServer:
    """A ``redis-server`` process; ``url`` connects to it."""

    def __init__(self, workdir: Path, password: str | None = None, tls: bool = False,
                 persistent: bool = False, extra: tuple[str, ...] = ()) -> None:
        self.binary = require_redis_server()
        self.extra = extra
        self.workdir = workdir
        self.password = password
        self.tls = tls
        self.persistent = persistent  # AOF, fsync on every write: survives SIGKILL
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}localhost:{self.port}/0?ssl_ca_certs={self.workdir / 'ca.crt'}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [self.binary, "--bind", "127.0.0.1", "--save", "", "--dir", str(self.workdir),
                "--appendonly", "yes" if self.persistent else "no", "--appendfsync", "always"]
        if self.password:
            args += ["--requirepass", self.password]
        if self.tls:
            _make_certs(self.workdir)
            args += ["--port", "0", "--tls-port", str(self.port),
                     "--tls-cert-file", str(self.workdir / "server.crt"),
                     "--tls-key-file", str(self.workdir / "server.key"),
                     "--tls-ca-cert-file", str(self.workdir / "ca.crt"),
                     "--tls-auth-clients", "no"]
        else:
            args += ["--port", str(self.port)]
        args += list(self.extra)
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     cwd=self.workdir)
        wait_port(self.port, self.proc, f"redis-server {args}")
        return self

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def __repr__(self) -> str:
        return f"RedisServer(port={self.port})"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


class RedisClusterServers:
    """A real Redis Cluster on loopback: ``size`` ``redis-server --cluster-enabled yes``
    nodes, slots spread by ``redis-cli --cluster create`` (no replicas)."""

    def __init__(self, workdir: Path, size: int = 3, extra: tuple[str, ...] = ()) -> None:
        require_redis_server("redis-cli", "redis-tools")
        self.nodes = [RedisServer(workdir / f"node{i}", extra=(
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", "2000", *extra)) for i in range(size)]
        for node in self.nodes:
            node.port = free_cluster_port()

    def node_url(self, i: int) -> str:
        return self.nodes[i].url

    @property
    def url(self) -> str:
        """The explicit form, every node a seed."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> RedisClusterServers:
        try:
            return self._start()
        except BaseException:
            self.stop()  # no node outlives a failed start
            raise

    def _start(self) -> RedisClusterServers:
        for node in self.nodes:
            node.workdir.mkdir(parents=True, exist_ok=True)
            node.start()
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        subprocess.run(["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 20
        while not all(self._ok(n) for n in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not reach cluster_state:ok")
            time.sleep(0.05)
        return self

    @staticmethod
    def _ok(node: RedisServer) -> bool:
        info = node.client().execute_command("CLUSTER", "INFO")
        text = info.decode() if isinstance(info, bytes) else str(info)
        return "cluster_state:ok" in text

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class SentinelServers:
    """A primary and a replica (``redis-server``) watched by ``sentinels`` real
    ``redis-sentinel`` processes (quorum: a majority), fast to declare the primary down."""

    SERVICE = "relaymaster"

    def __init__(self, workdir: Path, sentinels: int = 3, password: str | None = None) -> None:
        self.binary = require_redis_server("redis-sentinel", "redis-sentinel")
        self.workdir = workdir
        self.password = password
        auth = ("--masterauth", password) if password else ()
        self.primary = RedisServer(workdir / "primary", password=password, extra=auth)
        self.replica = RedisServer(workdir / "replica", password=password, extra=auth)
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.sentinels: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{auth}{hosts}/{self.SERVICE}/0"

    def start(self) -> SentinelServers:
        try:
            return self._start()
        except BaseException:
            self.stop()  # no server outlives a failed start
            raise

    def _start(self) -> SentinelServers:
        for server in (self.primary, self.replica):
            server.workdir.mkdir(parents=True, exist_ok=True)
            server.start()
        replica = self.replica.client()
        replica.execute_command("REPLICAOF", "127.0.0.1", str(self.primary.port))
        deadline = time.monotonic() + 20
        while replica.info("replication").get("master_link_status") != "up":
            if time.monotonic() > deadline:
                raise RuntimeError("the replica did not sync with the primary")
            time.sleep(0.05)
        quorum = len(self.sentinel_ports) // 2 + 1
        for port in self.sentinel_ports:
            conf = self.workdir / f"sentinel-{port}.conf"
            lines = [f"port {port}", "bind 127.0.0.1", f"dir {self.workdir}",
                     f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.primary.port} {quorum}",
                     f"sentinel down-after-milliseconds {self.SERVICE} 1000",
                     # a failed election is retried after twice this: 4 s, inside a store's
                     # retry budget even on a loaded 2-core machine
                     f"sentinel failover-timeout {self.SERVICE} 2000",
                     f"sentinel parallel-syncs {self.SERVICE} 1"]
            if self.password:
                lines.append(f"sentinel auth-pass {self.SERVICE} {self.password}")
            conf.write_text("\n".join(lines) + "\n")
            proc = subprocess.Popen([self.binary, str(conf)], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, cwd=self.workdir)
            self.sentinels.append(proc)
            wait_port(port, proc, "redis-sentinel")
        deadline = time.monotonic() + 20
        while not self._watched():
            if time.monotonic() > deadline:
                raise RuntimeError("the sentinels did not find the replica and each other")
            time.sleep(0.1)
        return self

    def _watched(self) -> bool:
        """Every sentinel knows the replica and the other sentinels (without the latter
        there is no quorum, and a failover started too early never happens)."""
        for port in self.sentinel_ports:
            client = redis.Redis(port=port, host="127.0.0.1", decode_responses=True)
            try:
                if not client.sentinel_slaves(self.SERVICE):
                    return False
                if len(client.sentinel_sentinels(self.SERVICE)) < len(self.sentinel_ports) - 1:
                    return False
            except redis.RedisError:
                return False
        return True

    def primary_port(self) -> int:
        client = redis.Redis(port=self.sentinel_ports[0], host="127.0.0.1", decode_responses=True)
        return int(client.sentinel_get_master_addr_by_name(self.SERVICE)[1])

    def stop(self) -> None:
        for proc in self.sentinels:
            proc.kill()
            proc.wait()
        self.sentinels = []
        self.primary.stop()
        self.replica.stop()


def _make_certs(workdir: Path) -> None:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=workdir)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
        "-keyout", "ca.key", "-out", "ca.crt")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
        "-keyout", "server.key", "-out", "server.csr")
    (workdir / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "1", "-extfile", "san.ext", "-out", "server.crt")
