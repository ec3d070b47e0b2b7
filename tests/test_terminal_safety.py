"""What reaches the terminal: user input is never read as markup, stored text never drives
the terminal (escape sequences, bells, bidi overrides are shown escaped)."""

from __future__ import annotations

import time

import pytest

from relaygraph.trajectory import Segment, Task
from tests.test_cli import cli

HOSTILE = "ok\x1b[2J\x1b]0;pwned\x07\x1b]8;;http://evil/\x1b\\link\x1b]8;;\x1b\\ \u202edone\x9b"


@pytest.mark.parametrize("args", [
    ["show", "[/x]"],
    ["run", "q", "--controller", "[/x]"],
    ["run", "q", "--set", "[/x]"],
    ["run", "q", "--config", "[/red].toml"],
    ["run", "q", "--policy", "[/bold]"],
])
def test_markup_in_user_input_is_one_error_line(args: list[str], redis_server) -> None:
    proc = cli(*args, "--redis", redis_server.url)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "[/" in lines[0]  # shown as it was typed
    assert "Traceback" not in proc.stderr


def test_show_escapes_control_characters_from_the_store(redis_store, redis_server) -> None:
    tid = f"hostile-{time.time_ns()}"
    redis_store.create(tid, Task(question=f"Q {HOSTILE}", policy="solo",
                                 agents={"controller": "m"}))
    redis_store.append(tid, 0, Segment(author="controller", text=HOSTILE, token_ids=[1],
                                       meta={"step": {"author": "controller", "tokens": 1,
                                                      "to": "finish", "reason": "eos"}}))
    redis_store.set_status(tid, "finished")
    proc = cli("show", tid, "--redis", redis_server.url)
    assert proc.returncode == 0, proc.stderr
    for raw in ("\x1b[2J", "\x1b]0;", "\x07", "\x1b]8;", "\u202e", "\x9b"):
        assert raw not in proc.stdout
    assert "\\x1b[2J" in proc.stdout and "\\u202e" in proc.stdout and "done" in proc.stdout
