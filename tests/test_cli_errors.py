"""Every way a new user's command can fail prints one ``error:`` line naming the cause and
the fix, and exits with status 2: the command line's own validation (Typer/click usage
errors), a busy port, a folder without a model, a hub id with no network, an unreachable
store — and a hub id already in the local hub cache works without the network."""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import pytest

from tests import tiny_models as tiny
from tests.servers import free_port
from tests.test_cli import cli


def one_error(proc, message: str, progress: str = "") -> str:
    """The failure's ``error:`` line: the last line of stderr, the only one of its kind; lines
    before it may only be progress (``progress``)."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), proc.stderr
    assert [ln for ln in lines if ln.startswith(("error", "internal error"))] == lines[-1:], proc.stderr
    assert all(progress and ln.startswith(progress) for ln in lines[:-1]), proc.stderr
    for noise in ("Traceback", "Usage:", "╭", "Retrying", "sentencepiece"):
        assert noise not in proc.stderr + proc.stdout, proc.stderr
    assert message in lines[-1], lines[-1]
    return lines[-1]


@pytest.mark.parametrize("args, message", [
    (["run", "q", "--threshold", "abc"], "invalid value for '--threshold'"),
    (["run", "q", "--max-tokens", "many"], "invalid value for '--max-tokens'"),
    (["run"], "missing argument 'QUESTION'"),
    (["run", "q", "--no-such-flag"], "no such option: --no-such-flag"),
    (["show", "--limit", "0"], "invalid value for '--limit'"),
    (["nosuchcommand"], "no such command 'nosuchcommand'"),
    (["models", "pull", "gpt-17"], "unknown catalog model"),
])
def test_command_line_mistakes_are_one_error_line(args: list[str], message: str) -> None:
    line = one_error(cli(*args), message)
    assert "--help`" in line or args[0] == "models"  # where to read the options


def test_help_and_version_are_not_errors() -> None:
    version = cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("relaygraph ")
    helped = cli("run", "--help")
    assert helped.returncode == 0 and "--json" in helped.stdout
    assert "<bool>" not in helped.stdout  # flags take no value
    bare = cli()
    assert bare.returncode == 0 and "Commands" in bare.stdout


def test_a_busy_port_fails_before_serve_announces_anything() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = cli("serve", "--port", str(port), timeout=60)
    line = one_error(proc, f"cannot listen on 127.0.0.1:{port}")
    assert "choose another --port" in line
    assert "serving" not in proc.stderr and "loading" not in proc.stderr


def test_a_folder_without_a_model_says_so(tmp_path, redis_server) -> None:
    empty = tmp_path / "my-model"
    empty.mkdir()
    one_error(cli("run", "q", "--controller", str(empty), "--policy", "solo",
                  "--redis", redis_server.url), "holds no model")
    (empty / "weights.gguf").write_bytes(b"")
    line = one_error(cli("run", "q", "--controller", str(empty), "--policy", "solo",
                         "--redis", redis_server.url), "holds no model")
    assert f"pass that file ({empty / 'weights.gguf'})" in line
    # the README's own example, from a folder where ./my-model does not exist
    one_error(cli("run", "q", "--controller", "./my-model", "--policy", "solo",
                  "--redis", redis_server.url), "not found")


@pytest.mark.parametrize("env, why", [
    ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
    ({"HF_ENDPOINT": "http://127.0.0.1:{port}"}, "cannot reach http://127.0.0.1:{port}"),
])
def test_a_hub_id_without_network_fails_at_once(env, why, tmp_path, redis_server) -> None:
    port = str(free_port())
    env = {k: v.replace("{port}", port) for k, v in env.items()}
    started = time.monotonic()
    proc = cli("run", "q", "--controller", "relaygraph-tests/no-such-model", "--policy", "solo",
               "--redis", redis_server.url, env={**env, "HF_HUB_CACHE": str(tmp_path / "hub")})
    line = one_error(proc, "not in the local hub cache")
    assert why.replace("{port}", port) in line and "hf download" in line
    assert time.monotonic() - started < 45  # one check, not five rounds of retries per file


def test_a_hub_id_in_the_local_cache_runs_without_the_network(tiny_pair, tmp_path, redis_server) -> None:
    """A real hub-cache layout (``models--ORG--NAME/snapshots/REV``, ``refs/main``) holding
    the tiny controller: found offline, and with the hub unreachable, with no retries."""
    repo = tmp_path / "hub" / "models--relaygraph-tests--tiny-controller"
    snapshot = repo / "snapshots" / "0123456789abcdef"
    shutil.copytree(tiny_pair[0], snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    for env in ({"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}):
        proc = cli("run", tiny.NOCALL_QUESTION, "--controller", "relaygraph-tests/tiny-controller",
                   "--policy", "solo", "--dtype", "float32", "--redis", redis_server.url, "--json",
                   env={**env, "HF_HUB_CACHE": str(tmp_path / "hub")})
        assert proc.returncode == 0, proc.stderr
        assert "Retrying" not in proc.stderr
        assert '"answer": "2"' in proc.stdout


def test_an_unreachable_store_says_it_is_retrying_then_fails(tiny_pair) -> None:
    proc = cli("show", "--redis", f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    line = one_error(proc, "cannot reach Redis at redis://:***@127.0.0.1",
                     progress="the trajectory store does not answer (ConnectionError); retrying")
    assert "retrying (attempt 1 of 8)" in proc.stderr  # said at once, not after the wait
    assert "hunter2" not in proc.stderr + line


@pytest.mark.parametrize("command", ["show", "resume"])
def test_an_unknown_trajectory_is_one_error_line(command: str, redis_server) -> None:
    one_error(cli(command, "no-such-trajectory", "--redis", redis_server.url), "no trajectory")


def test_user_text_is_never_markup(tmp_path: Path, redis_server) -> None:
    """Brackets in what the user typed come back as typed (Rich markup is never applied)."""
    line = one_error(cli("run", "[/x] [bold]q", "--controller", "/no/[/x]",
                         "--redis", redis_server.url), "not found")
    assert "/no/[/x]" in line
