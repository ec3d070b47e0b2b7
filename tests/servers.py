"""Real Redis servers for tests: Debian's ``redis-server`` on a free loopback port."""

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


def require_redis_server() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed; .ci/run must apt-get install it")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    return binary


class RedisServer:
    """A ``redis-server`` process; ``url`` connects to it."""

    def __init__(self, workdir: Path, password: str | None = None, tls: bool = False,
                 persistent: bool = False) -> None:
        self.binary = require_redis_server()
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
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start: {args}") from None
                time.sleep(0.02)
        return self

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


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
