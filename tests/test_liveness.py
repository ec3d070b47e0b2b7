"""A run killed mid-way shows ``interrupted`` (not ``running`` forever), ``resume`` says so
and continues it; a live run is shown ``running`` and not resumed twice.

Liveness is the heartbeat ``relaygraph serve`` replicas use to hold their runs (the store's
``keepalive``), recorded by every run with the process that runs it (``holder``)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from relaygraph.trajectory import RedisStore, liveness
from relaygraph.viewer.terminal import list_trajectories
from tests import tiny_models as tiny
from tests.slow_backend import plugin_path
from tests.test_cli import cli

ROOT = Path(__file__).parents[1]


def slow_config(tiny_pair: tuple[Path, Path], folder: Path) -> Path:
    controller, expert = tiny_pair
    config = folder / "slow.toml"
    config.write_text("max_tokens = 64\n" + "".join(
        f'[agents.{name}]\nmodel = "{path}"\ndtype = "float32"\nbackend = "slow-transformers"\n'
        f"delay = {delay}\n" for name, path, delay in (("controller", controller, 0.5),
                                                       ("expert", expert, 0.5))))
    return config


def wait_for(predicate, timeout: float = 120.0, what: str = "") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def listed_status(tid: str, redis_url: str, env: dict[str, str]) -> str:
    listing = cli("show", "--redis", redis_url, env=env)
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if line.startswith(tid))
    return row.split()[3]  # id, date, time, status, policy, question


def listed(store: RedisStore, tid: str) -> str:
    """The status ``relaygraph show`` lists for ``tid`` (the same function, in-process)."""
    out = io.StringIO()
    list_trajectories(store, 50, Console(file=out, width=200))
    return next(line for line in out.getvalue().splitlines() if line.startswith(tid)).split()[3]


def test_a_killed_run_shows_interrupted_and_resume_continues_it(tiny_pair, redis_server, tmp_path) -> None:
    from relaygraph.config import RelayConfig
    from relaygraph.errors import ConfigError
    from relaygraph.relay import Relay

    env = {"PYTHONPATH": os.pathsep.join([str(plugin_path(tmp_path / "plugins")), str(ROOT)])}
    store = RedisStore.from_url(redis_server.url)
    other = Relay.from_config(RelayConfig.from_options(  # another process's attempt, in-process
        str(tiny_pair[0]), str(tiny_pair[1]), "call-token", max_tokens=64, dtype="float32"), store)
    before = set(store.list_ids(10_000))
    proc = subprocess.Popen(
        [sys.executable, "-m", "relaygraph.cli", "run", tiny.QUESTION, "--config",
         str(slow_config(tiny_pair, tmp_path)), "--redis", redis_server.url, "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **env}, cwd=ROOT)
    try:
        tid = wait_for(lambda: next(iter(set(store.list_ids(10_000)) - before), None),
                       what="the run to start")
        assert isinstance(tid, str)
        wait_for(lambda: store.length(tid) >= 1, what="its first segment")
        # alive: listed as running, and not resumed by a second writer
        assert listed(store, tid) == "running"
        with pytest.raises(ConfigError, match="is running now"):
            other.resume(tid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert store.status(tid) == "running"  # what the dead process left in the store
    assert store.length(tid) < 5  # killed mid-way
    assert listed_status(tid, redis_server.url, env) == "interrupted"  # at once: its pid is gone
    shown = cli("show", tid, "--redis", redis_server.url, env=env)
    assert shown.returncode == 0, shown.stderr
    assert "status interrupted" in " ".join(shown.stdout.split())
    assert f"`relaygraph resume {tid}` continues it" in shown.stderr
    followed = cli("show", tid, "--follow", "--redis", redis_server.url, env=env, timeout=60)
    assert followed.returncode == 0 and "status interrupted" in " ".join(followed.stdout.split())
    resumed = cli("resume", tid, "--redis", redis_server.url, "--json", "--trust-stored",
                  env=env)  # local model folders: confirmed (the store's trust model)
    assert resumed.returncode == 0, resumed.stderr
    assert f"trajectory {tid} is interrupted (its process ({proc.pid}) is gone" in resumed.stderr
    out = json.loads(resumed.stdout)
    assert out["status"] == "finished" and out["answer"] == "7"
    assert listed_status(tid, redis_server.url, env) == "finished"
    store.close()


def test_a_run_beats_while_it_runs_and_stops_when_it_fails(tiny_pair, redis_server, monkeypatch) -> None:
    """In-process: heartbeats refresh while a (slow) run goes on; a run that fails in a
    process that lives on (here: its store connection breaks) is interrupted at once."""
    import dataclasses

    import redis

    from relaygraph.config import RelayConfig
    from relaygraph.relay import Relay
    from tests.slow_backend import SlowBackend

    monkeypatch.setattr(liveness, "HEARTBEAT_EVERY_S", 0.2)
    store = RedisStore.from_url(redis_server.url)
    loaded = Relay.from_config(RelayConfig.from_options(
        str(tiny_pair[0]), str(tiny_pair[1]), "call-token", max_tokens=40, dtype="float32"), store)
    slow = [dataclasses.replace(a, backend=SlowBackend(a.backend, 0.15)) for a in loaded.agents]
    beats: set[float] = set()

    def watch(event: dict) -> None:
        if event["type"] == "token":
            tid = store.list_ids(1)[0]
            info = store.info(tid)
            beats.add(float(info["heartbeat"]))
            assert liveness.effective_status(tid, info["status"], info) == "running"

    result = Relay(slow, loaded.policy, store, 40).run(tiny.QUESTION, on_event=watch)
    assert result.answer == "7" and len(beats) >= 3  # refreshed while the run went on
    assert not liveness.held_here(result.trajectory_id)

    broken = RedisStore.from_url(redis_server.url)
    real_append = broken.append

    def append(tid, seq, seg):
        real_append(tid, seq, seg)
        raise redis.ConnectionError("the connection broke")

    def send_append(tid, seq, seg):  # the relay's pipelined appends break the same way
        def confirm() -> None:
            append(tid, seq, seg)
        return confirm

    broken.append = append  # type: ignore[method-assign]
    broken.send_append = send_append  # type: ignore[method-assign]
    with pytest.raises(Exception, match="lost the trajectory store"):
        Relay(loaded.agents, loaded.policy, broken, 40).run(tiny.QUESTION)
    failed = store.list_ids(1)[0]
    info = store.info(failed)
    assert info["status"] == "running" and float(info["heartbeat"]) == 0.0  # let go of it
    assert liveness.effective_status(failed, "running", info) == "interrupted"
    store.close()
    broken.close()


def test_alive_by_heartbeat_age_on_another_machine() -> None:
    now = time.time()
    far = {"holder": "another-host:1", "heartbeat": f"{now - 1:.3f}"}
    assert liveness.alive("t", far, now)
    assert not liveness.alive("t", {**far, "heartbeat": f"{now - 60:.3f}"}, now)
    assert liveness.effective_status("t", "running", {**far, "heartbeat": "0"}, now) == "interrupted"
    assert liveness.effective_status("t", "finished", {}, now) == "finished"
    gone = {"holder": f"{liveness.holder_id().rpartition(':')[0]}:{2**22 + 12345}",
            "heartbeat": f"{now:.3f}"}  # this machine, a pid that does not exist
    assert not liveness.alive("t", gone, now)
