"""``langgraph dev`` (langgraph-cli's in-memory server, installed from PyPI) started on the
repository's ``langgraph.json``, driven over its HTTP API with the ``langgraph_sdk`` client.

The served graph is ``relaygraph.studio:graph``; ``RELAYGRAPH_STUDIO_CONFIG`` points it at
the tiny relay pair here (the default serves the offline Qwen pair, which needs
``relaygraph models pull``). Real Redis, real server process, real HTTP.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from relaygraph.trajectory import RedisStore
from tests import tiny_models as tiny
from tests.servers import free_port

ROOT = Path(__file__).parents[1]


def langgraph_cli() -> Path:
    cli = Path(sys.executable).parent / "langgraph"
    if not cli.exists() or not _has("langgraph_api"):
        if os.environ.get("CI"):
            pytest.fail("langgraph-cli[inmem] is not installed; CI installs it with the test extra")
        pytest.skip("langgraph-cli[inmem] is not installed (pip install -e '.[studio]')")
    return cli


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


@pytest.fixture
def dev_server(tiny_pair, redis_server, tmp_path):
    """``langgraph dev --no-reload`` on a free port, serving the tiny pair; its URL."""
    controller, expert = tiny_pair
    config = tmp_path / "relay.toml"
    config.write_text(f'max_tokens = 64\n[agents.controller]\nmodel = "{controller}"\ndtype = "float32"\n'
                      f'[agents.expert]\nmodel = "{expert}"\ndtype = "float32"\n'
                      f'[policy]\ntype = "call-token"\n')
    port = free_port()
    log = (tmp_path / "langgraph-dev.log").open("w")
    # the server keeps its state in ./.langgraph_api: run it in a temporary folder, with this
    # checkout's relaygraph first on the path (what `langgraph dev` at the root does itself)
    env = {**os.environ, "RELAYGRAPH_STUDIO_CONFIG": str(config), "REDIS_URL": redis_server.url,
           "LANGGRAPH_CLI_NO_ANALYTICS": "1", "LANGSMITH_TRACING": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(
        [str(langgraph_cli()), "dev", "--no-browser", "--no-reload", "--port", str(port),
         "--config", str(ROOT / "langgraph.json")],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "langgraph-dev.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/ok", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "langgraph-dev.log").read_text()[-3000:]
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_langgraph_dev_lists_the_graph_with_a_question_input_and_streams_a_run(dev_server, redis_server) -> None:
    from langgraph_sdk import get_sync_client

    client = get_sync_client(url=dev_server, timeout=120)
    (assistant,) = client.assistants.search(graph_id="relay")
    schemas = client.assistants.get_schemas(assistant["assistant_id"])
    inputs = schemas["input_schema"]
    assert inputs is not None and "question" in inputs["properties"]
    assert inputs["properties"]["question"]["type"] == "string"
    assert not {"cursor", "turn", "budget", "started", "trace"} & set(inputs["properties"])  # no internals
    assert {"answer", "trajectory_id", "messages"} <= set(schemas["output_schema"]["properties"])

    thread = client.threads.create()["thread_id"]
    chunks, tokens, final = [], [], {}
    for part in client.runs.stream(thread, "relay", input={"question": tiny.QUESTION},
                                   stream_mode=["messages-tuple", "custom", "values"]):
        if part.event == "messages":
            chunks.append(part.data)
        elif part.event == "custom" and part.data.get("type") == "token":
            tokens.append(part.data)
        elif part.event == "values":
            final = part.data
    ai = [(c, meta) for c, meta in chunks if c["type"] == "AIMessageChunk"]
    assert {c["name"] for c, _ in ai} == {"controller", "expert"}
    assert all(meta["langgraph_node"] == c["name"] for c, meta in ai)
    assert "".join(c["content"] for c, _ in ai) == "".join(t["text"] for t in tokens)
    assert final["answer"] == "7" and final["handoffs"] == 2
    store = RedisStore.from_url(redis_server.url)
    assert store.load(final["trajectory_id"]).status == "finished"

    # the server's checkpointer keeps the thread: a new question is a new trajectory that sees the first turn
    follow_up = client.runs.wait(thread, "relay", input={"question": tiny.NOCALL_QUESTION})
    assert follow_up["trajectory_id"] != final["trajectory_id"]
    task = store.load(follow_up["trajectory_id"]).task
    assert task.question.startswith(f"User: {tiny.QUESTION}\nAssistant: ") and task.question.endswith(
        f"User: {tiny.NOCALL_QUESTION}")
    store.close()
