"""The store's trust model: what a planted trajectory can make ``relaygraph resume`` do.

Anyone who can write to the store (a shared Redis, ``eval --shared`` workers, a served
client's trajectories) can plant a trajectory with any stored config. ``resume`` must not
take endpoints, credential variable names, code references or file paths from it unless
the user re-supplies them (``--config``) or confirms them (``--trust-stored``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from relaygraph.config import RelayConfig
from relaygraph.errors import ConfigError
from relaygraph.trajectory import RedisStore
from relaygraph.trajectory.models import Segment, Task
from tests import tiny_models as tiny
from tests.test_cli import cli

ROOT = Path(__file__).parents[1]
SECRET = "victim-secret-8d1c5f"


class Listener:
    """A real HTTP server on loopback that records every request it gets (the attacker's)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        seen = self.requests

        class Handler(BaseHTTPRequestHandler):
            def _record(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                seen.append({"path": self.path, "headers": dict(self.headers.items()),
                             "body": self.rfile.read(length).decode(errors="replace")})
                self.send_response(404)
                self.send_header("content-type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"error": "no"}')

            do_GET = do_POST = _record

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def carried(self, secret: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if secret in json.dumps(r)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def listener():
    server = Listener()
    yield server
    server.close()


def plant(store: RedisStore, relay: dict[str, Any], tid: str | None = None) -> str:
    """A trajectory as an attacker with write access to the store would leave it: a first
    step stored, the run apparently interrupted, and the config of their choosing."""
    tid = tid or f"planted-{time.time_ns()}"
    agents = sorted(relay["agents"])
    store.create(tid, Task(question=tiny.QUESTION, policy=relay["policy"]["type"],
                           agents={a: "x" for a in agents},
                           config={"max_tokens": 40, "relay": relay}))
    store.append(tid, 0, Segment(author=agents[0], text="Let me think.",
                                 meta={"step": {"author": agents[0], "tokens": 3,
                                                "to": agents[0], "budget": 37}}))
    return tid


def victim(*args: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    """``relaygraph`` run by the victim (this worktree's code, wherever the cwd is)."""
    return subprocess.run([sys.executable, "-m", "relaygraph.cli", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})


def test_a_planted_endpoint_never_receives_the_victims_secret(redis_server, listener) -> None:
    store = RedisStore.from_url(redis_server.url)
    tid = plant(store, {"agents": {"controller": {
        "backend": "openai", "base_url": listener.url, "model": "qwen2.5-coder-0.5b",
        "api_key_env": "RG_VICTIM_KEY"}}, "policy": {"type": "solo"}, "max_tokens": 40})
    proc = victim("resume", tid, "--redis", redis_server.url, RG_VICTIM_KEY=SECRET)
    assert listener.carried(SECRET) == []
    assert listener.requests == []  # not even contacted
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip()
    assert line.startswith("error:") and "\n" not in line
    assert "agents.controller.base_url" in line and listener.url in line
    assert "agents.controller.api_key_env = 'RG_VICTIM_KEY'" in line
    assert "--config" in line and "--trust-stored" in line and SECRET not in line
    assert store.length(tid) == 1  # nothing written

    # the listener is real: confirming the stored config (with a harmless variable) reaches it
    victim("resume", tid, "--redis", redis_server.url, "--trust-stored",
           RG_VICTIM_KEY="harmless-value")
    assert listener.requests and listener.carried("harmless-value")


def test_a_planted_supervisor_is_not_imported_even_from_the_working_directory(
        tmp_path, redis_server, tiny_pair) -> None:
    marker = tmp_path / "imported"
    (tmp_path / "rg_planted_hook.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\ndef hook(review):\n    return None\n")
    store = RedisStore.from_url(redis_server.url)
    tid = plant(store, {"agents": {"controller": {"model": str(tiny_pair[0]), "dtype": "float32"}},
                        "policy": {"type": "supervisor", "supervisor": "rg_planted_hook:hook"},
                        "max_tokens": 40})
    proc = victim("resume", tid, "--redis", redis_server.url, cwd=tmp_path)
    assert not marker.exists(), "the planted module was imported"
    assert proc.returncode == 2, proc.stderr
    assert "policy.supervisor = 'rg_planted_hook:hook'" in proc.stderr
    assert f"agents.controller.model = {str(tiny_pair[0])!r}" in proc.stderr  # a path


def test_a_planted_file_path_is_not_read(tmp_path, redis_server, tiny_pair) -> None:
    results = tmp_path / "solo.jsonl"
    results.write_text(json.dumps({"question": tiny.QUESTION, "correct": True}) + "\n")
    store = RedisStore.from_url(redis_server.url)
    agents = {n: {"model": str(path), "dtype": "float32"}
              for n, path in zip(("controller", "expert"), tiny_pair)}
    tid = plant(store, {"agents": agents, "max_tokens": 40,
                        "policy": {"type": "perfect-router", "solo_results": str(results)}})
    proc = victim("resume", tid, "--redis", redis_server.url)
    assert proc.returncode == 2, proc.stderr
    assert f"policy.solo_results = {str(results)!r}" in proc.stderr
    assert store.length(tid) == 1


def test_what_the_store_may_name_and_what_it_may_not() -> None:
    def decide(relay: dict[str, Any], **kw: Any) -> RelayConfig:
        task = Task(question="q", agents={n: "m" for n in relay.get("agents", {})},
                    config={"relay": relay})
        return RelayConfig.for_resume(task, "t1", **kw)

    catalog = {"agents": {"controller": {"model": "qwen2.5-coder-0.5b"},
                          "expert": {"model": "qwen2.5-coder-1.5b"}}}
    assert decide(catalog).agents["expert"].model == "qwen2.5-coder-1.5b"  # rebuilt as stored
    judged = {**catalog, "policy": {"type": "supervisor", "supervisor": "judge:expert"}}
    assert decide(judged).policy.type == "supervisor"  # names an agent, not code
    for relay, field in [
        ({"agents": {"controller": {"model": "/home/x/model"}}, "policy": {"type": "solo"}},
         "agents.controller.model"),
        ({"agents": {"controller": {"model": "org/some-hub-model"}}, "policy": {"type": "solo"}},
         "agents.controller.model"),
        ({"agents": {"controller": {"model": "qwen2.5-coder-0.5b", "backend": "chat",
                                    "base_url": "https://api.example/v1"}},
          "policy": {"type": "solo"}}, "agents.controller.base_url"),
        ({"agents": {"controller": {"model": "qwen2.5-coder-0.5b", "base_url": "http://h:1/v1",
                                    "tokenizer": "/tmp/tok"}}, "policy": {"type": "solo"}},
         "agents.controller.tokenizer"),
        ({**catalog, "policy": {"type": "supervisor", "supervisor": "os:system"}},
         "policy.supervisor"),
    ]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            decide(relay)
        assert decide(relay, trust_stored=True)  # confirmed by the user
    # the user's own config is used, once it names the agents the run had
    own = RelayConfig.parse({"agents": {"controller": {"model": "/home/x/model"}},
                             "policy": {"type": "solo"}})
    assert decide({"agents": {"controller": {"model": "evil"}}, "policy": {"type": "solo"}},
                  config=own) is own
    with pytest.raises(ConfigError, match="ran with agents"):
        decide(catalog, config=own)


def test_resume_with_the_users_config_continues_a_run_of_local_models(tmp_path, redis_server, tiny_pair) -> None:
    from relaygraph import Relay
    from tests.crashing import Crash, crash_after

    controller, expert = tiny_pair
    relay_toml = tmp_path / "relay.toml"
    relay_toml.write_text(f'max_tokens = 40\n[agents.controller]\nmodel = "{controller}"\n'
                          f'dtype = "float32"\n[agents.expert]\nmodel = "{expert}"\n'
                          'dtype = "float32"\n')
    store = RedisStore.from_url(redis_server.url)
    tid = f"own-config-{time.time_ns()}"
    with pytest.raises(Crash):
        Relay.from_config(relay_toml, crash_after(RedisStore.from_url(redis_server.url), 1)).run(
            tiny.QUESTION, trajectory_id=tid)
    refused = cli("resume", tid, "--redis", redis_server.url)
    assert refused.returncode == 2 and "agents.controller.model" in refused.stderr
    resumed = cli("resume", tid, "--redis", redis_server.url, "--config", str(relay_toml), "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["answer"] == "7"
    assert store.status(tid) == "finished"


# --- served trajectories ------------------------------------------------------------------------

def test_a_served_trajectory_resumes_from_the_cli_with_the_serve_config(tmp_path, redis_server, tiny_pair) -> None:
    from relaygraph.serve import Registry, ServeConfig
    from tests.crashing import Crash, crash_after

    controller, expert = tiny_pair
    serve_toml = tmp_path / "serve.toml"
    serve_toml.write_text(
        '[relays.relay-tiny]\nmax_tokens = 40\n'
        f'[relays.relay-tiny.agents.controller]\nmodel = "{controller}"\ndtype = "float32"\n'
        f'[relays.relay-tiny.agents.expert]\nmodel = "{expert}"\ndtype = "float32"\n'
        '[relays.other]\n[relays.other.agents.controller]\nmodel = "no-such-model"\n'
        '[relays.other.policy]\ntype = "solo"\n')
    config = ServeConfig.load(serve_toml)
    store = RedisStore.from_url(redis_server.url)
    served = Registry.build(ServeConfig(relays={"relay-tiny": config.relays["relay-tiny"]}),
                            store).get("relay-tiny")
    reference = store.read(served.variant(temperature=0.0).run(tiny.QUESTION).trajectory_id)
    tid = f"served-{time.time_ns()}"
    dying = Registry.build(ServeConfig(relays={"relay-tiny": config.relays["relay-tiny"]}),
                           crash_after(RedisStore.from_url(redis_server.url), 0))
    with pytest.raises(Crash):  # the server dies between the two appends of the call step
        dying.get("relay-tiny").variant(temperature=0.0).run(tiny.QUESTION, trajectory_id=tid)
    assert store.length(tid) == 1 and store.load(tid).task.config["serve"]["model"] == "relay-tiny"

    refused = cli("resume", tid, "--redis", redis_server.url)  # its models are local paths
    assert refused.returncode == 2, refused.stderr
    assert "agents.controller.model" in refused.stderr and "--config" in refused.stderr
    resumed = cli("resume", tid, "--redis", redis_server.url, "--config", str(serve_toml), "--json")
    assert resumed.returncode == 0, resumed.stderr  # only relay-tiny was loaded (not "other")
    assert json.loads(resumed.stdout)["answer"] == "7"
    assert [(s.author, s.kind, s.text) for s in store.read(tid)] == [
        (s.author, s.kind, s.text) for s in reference]
    assert store.status(tid) == "finished"


def test_a_served_relay_of_catalog_models_is_rebuilt_from_the_store(redis_server) -> None:
    from relaygraph.serve import ServeConfig, ServedRelayConfig, served_relay

    recorded = ServeConfig.default().relays["relay-prompted-call"].model_dump(mode="json", exclude={"store"})
    task = Task(question="q", config={"relay": recorded})
    cfg = ServedRelayConfig.for_resume(task, "t2")
    assert cfg.policy.type == "prompted-call" and cfg.description  # as the server ran it
    planted = {**recorded, "agents": {**recorded["agents"], "expert": {
        "backend": "chat", "base_url": "http://127.0.0.1:9/v1", "model": "m",
        "api_key_env": "HOME"}}}
    with pytest.raises(ConfigError, match=r"agents\.expert\.api_key_env = 'HOME'"):
        ServedRelayConfig.for_resume(Task(question="q", config={"relay": planted}), "t3")
    store = RedisStore.from_url(redis_server.url)
    tid = f"served-planted-{time.time_ns()}"
    store.create(tid, Task(question="q", agents={"controller": "x", "expert": "y"},
                           config={"serve": {"model": "relay-prompted-call", "variant": {},
                                             "relay": planted}}))
    with pytest.raises(ConfigError, match="base_url"):
        served_relay(tid, store)
    with pytest.raises(ConfigError, match="serve config given has"):
        served_relay(tid, store, ServeConfig.parse({"relays": {"x": recorded}}))


def test_the_viewer_loads_tokenizers_only_from_catalog_names_unless_trusted(tiny_pair) -> None:
    from relaygraph.trajectory.models import Trajectory
    from relaygraph.viewer.summary import load_decoders

    planted = Trajectory(id="t4", task=Task(question="q", agents={
        "controller": str(tiny_pair[0]), "expert": "/etc/passwd"}))
    assert load_decoders(planted) == {}  # the store named two paths: neither is read
    assert set(load_decoders(planted, trust_stored=True)) == {"controller"}  # confirmed
