"""Scale-out: the CLI on a real 3-node Redis Cluster (run through one node, show and resume
through others), retention and namespaces from the command line, and ``relaygraph serve``
replicas on one store — in-process and as two real processes — that show, cancel and
resume each other's trajectories."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from relaygraph.agents.transformers_backend import TransformersBackend
from relaygraph.config import RelayConfig
from relaygraph.errors import ConfigError
from relaygraph.relay import Relay
from relaygraph.serve import BackgroundServer, ServeConfig, ServeSettings, create_app
from relaygraph.trajectory import RedisStore, Segment, Task
from tests import tiny_models as tiny
from tests.crashing import Crash, crash_after
from tests.servers import free_port
from tests.slow_backend import plugin_path
from tests.test_cli import cli
from tests.test_serve import ASK, slow_registry, wait_for

ROOT = Path(__file__).parents[1]


def texts(segments: list[Any]) -> list[tuple[str, str, str]]:
    return [(s["author"], s["kind"], s["text"]) if isinstance(s, dict) else
            (s.author, s.kind, s.text) for s in segments]


# --- the CLI on a cluster ---------------------------------------------------------------------

def test_cli_run_on_one_cluster_node_then_show_and_resume_through_others(tiny_pair, redis_cluster) -> None:
    controller, expert = tiny_pair
    node = [redis_cluster.node_url(i) for i in range(3)]
    proc = cli("run", tiny.QUESTION, "--controller", str(controller), "--expert", str(expert),
               "--dtype", "float32", "--redis", node[0], "--ttl", "1h", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    tid = out["trajectory_id"]
    assert out["answer"] == "7"
    shown = cli("show", tid, "--redis", node[2])
    assert shown.returncode == 0, shown.stderr
    assert "7" in shown.stdout and "controller" in shown.stdout
    store = RedisStore.from_url(node[1])
    assert 0 < store.client.ttl(f"relaygraph:{{{tid}}}:meta") <= 3600  # --ttl reached the store
    assert "store" not in store.load(tid).task.config["relay"]  # where it ran is not recorded

    # a run that dies mid-step on the cluster, resumed from another node by the CLI
    cfg = RelayConfig.from_options(str(controller), str(expert), "call-token", max_tokens=40,
                                   dtype="float32")
    reference = store.read(Relay.from_config(cfg, store).run(tiny.QUESTION).trajectory_id)
    crashed = f"cluster-resume-{time.time_ns()}"
    with pytest.raises(Crash):
        Relay.from_config(cfg, crash_after(RedisStore.from_url(node[1]), 1)).run(
            tiny.QUESTION, trajectory_id=crashed)
    assert store.length(crashed) == 2
    resumed = cli("resume", crashed, "--redis", node[2], "--trust-stored", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["answer"] == "7"
    assert texts(store.read(crashed)) == texts(reference)
    assert {tid, crashed} <= set(RedisStore.from_url(redis_cluster.url).list_ids(1000))


def test_cli_store_status_prune_and_delete(redis_server) -> None:
    ns = f"cli-{time.time_ns()}"
    store = RedisStore.from_url(redis_server.url, ns)
    old = time.time() - 30 * 86400
    for tid, status in (("old-a", "finished"), ("old-b", "failed"), ("young", "finished")):
        store.create(tid, Task(question=tid, created_at=old if tid != "young" else time.time()))
        store.append(tid, 0, Segment(author="a", text="some reasoning " * 20))
        store.set_status(tid, status)
    args = ("--redis", redis_server.url, "--namespace", ns)
    status = cli("store", "status", *args)
    assert status.returncode == 0, status.stderr
    assert "trajectories: 3" in status.stdout and "memory per trajectory" in status.stdout
    assert f"namespace {ns}" in status.stdout
    dry = cli("store", "prune", "--older-than", "7d", "--status", "finished", "--dry-run", *args)
    assert "would delete 1 trajectories" in dry.stdout and store.exists("old-a")
    pruned = cli("store", "prune", "--older-than", "7d", "--status", "finished", *args)
    assert pruned.returncode == 0 and "deleted 1 trajectories" in pruned.stdout
    assert not store.exists("old-a") and store.exists("old-b") and store.exists("young")
    deleted = cli("store", "delete", "old-b", *args)
    assert deleted.returncode == 0 and "deleted 1: old-b" in deleted.stdout
    assert store.list_ids() == ["young"]
    missing = cli("store", "delete", "old-b", *args)
    assert missing.returncode == 2 and "no trajectory old-b" in missing.stderr
    bad = cli("store", "prune", "--older-than", "soon", *args)
    assert bad.returncode == 2 and "not a duration" in bad.stderr
    bad_ns = cli("show", "--redis", redis_server.url, "--namespace", "a:b")
    assert bad_ns.returncode == 2 and "invalid store namespace" in bad_ns.stderr


def test_store_config_table_and_the_redis_key(tmp_path) -> None:
    cfg = RelayConfig.parse({"store": {"url": "redis+cluster://h:7000,h2:7000",
                                       "namespace": "exp-7", "ttl": "12h"}})
    assert (cfg.store.namespace, cfg.store.ttl, cfg.redis) == ("exp-7", 43200.0,
                                                               "redis+cluster://h:7000,h2:7000")
    assert RelayConfig.parse({"redis": "redis://h:1/0"}).store.url == "redis://h:1/0"
    with pytest.raises(ConfigError, match="redis and store.url"):
        RelayConfig.parse({"redis": "redis://a:1", "store": {"url": "redis://b:1"}})
    with pytest.raises(ConfigError, match="store.ttl.*not a duration"):
        RelayConfig.parse({"store": {"ttl": "soon"}})
    with pytest.raises(ConfigError, match="store.namespace"):
        RelayConfig.parse({"store": {"namespace": "x:y"}})
    with pytest.raises(ConfigError, match="Sentinel service"):
        RelayConfig.parse({"store": {"url": "redis+sentinel://:pw@h:26379"}})
    assert "pw" not in repr(RelayConfig.parse({"store": {"url": "redis://:pw@h:1/0"}}).store)
    served = ServeConfig.parse({"relays": {"r": {}}, "store": {"namespace": "tenant-a"}})
    assert served.store.namespace == "tenant-a"
    with pytest.raises(ConfigError, match="no store of its own"):
        ServeConfig.parse({"relays": {"r": {"store": {"namespace": "x"}}}})
    overridden = cfg.with_store(None, "exp-8", "none")
    assert (overridden.store.namespace, overridden.store.ttl, overridden.store.url) == (
        "exp-8", None, cfg.store.url)


def test_the_scaleout_example_config_is_valid() -> None:
    cfg = ServeConfig.load(ROOT / "examples" / "scaleout" / "serve.toml")
    assert (cfg.store.namespace, cfg.store.ttl) == ("prod", 7 * 86400)
    agents = cfg.relays["relay-call-token"].agents
    assert {a.backend for a in agents.values()} == {"openai"}


# --- replicas in one process: two apps, one store, one set of models --------------------------

@pytest.fixture(scope="module")
def store(redis_cluster) -> Iterator[RedisStore]:
    s = RedisStore.from_url(redis_cluster.node_url(0), ttl=3600)
    yield s
    s.close()


def _get(server: BackgroundServer, path: str) -> httpx.Response:
    return httpx.get(server.url + path, timeout=30)


def _post(server: BackgroundServer, path: str, body: dict | None = None,
          timeout: float = 60) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=timeout)


def test_replicas_in_process_show_cancel_and_resume_each_others_runs(tiny_pair, store) -> None:
    registry = slow_registry(tiny_pair, store, controller_delay=0.1, expert_delay=0.4)
    settings = ServeSettings(heartbeat=0.2)
    with BackgroundServer(create_app(registry, settings)) as a, \
            BackgroundServer(create_app(registry, settings)) as b:
        outcome: dict[str, Any] = {}
        started = threading.Event()

        def listen() -> None:
            body = {"model": "relay-call-token", "messages": ASK, "stream": True}
            with httpx.stream("POST", a.url + "/v1/chat/completions", json=body,
                              timeout=60) as response:
                outcome["tid"] = response.headers["x-relaygraph-trajectory-id"]
                started.set()
                outcome["lines"] = list(response.iter_lines())

        thread = threading.Thread(target=listen)
        thread.start()
        assert started.wait(30)
        tid = outcome["tid"]
        view = wait_for(lambda: (v := _get(b, f"/v1/trajectories/{tid}").json()).get("held")
                        and v["segments"] and v, timeout=30)
        assert view["status"] == "running" and view["model"] == "relay-call-token"
        busy = _post(b, f"/v1/trajectories/{tid}/resume")
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "running_elsewhere"
        cancel = _post(b, f"/v1/trajectories/{tid}/cancel", {"reason": "moved to replica b"})
        assert cancel.status_code == 202 and cancel.json()["status"] == "cancelling"
        thread.join(30)
        assert any('"code":"cancelled"' in line for line in outcome["lines"])
        cancelled = wait_for(lambda: (v := _get(a, f"/v1/trajectories/{tid}").json())["status"]
                             == "cancelled" and v)
        assert cancelled["cancel_reason"] == "moved to replica b" and not cancelled["held"]
        for backend in registry.backends.values():
            backend.inner.delay = 0.0
        resumed = _post(b, f"/v1/trajectories/{tid}/resume")
        assert resumed.status_code == 200, resumed.text
        done = resumed.json()
        assert done["status"] == "finished" and done["answer"] == "7"
        fresh = httpx.post(b.url + "/v1/chat/completions", timeout=60,
                           json={"model": "relay-call-token", "messages": ASK}).json()
        assert done["content"] == fresh["choices"][0]["message"]["content"]
        for key in ("tokens_by_agent", "input_tokens_by_agent", "call_ratio", "handoffs"):
            assert done["usage"][key] == fresh["usage"]["relaygraph"][key], key
        assert _get(a, f"/v1/trajectories/{tid}").json() == done  # the same through a
        again = _post(a, f"/v1/trajectories/{tid}/resume")  # finished: returned as it is
        assert again.status_code == 200 and again.json() == done
        assert _post(a, f"/v1/trajectories/{tid}/cancel").status_code == 409


def test_a_dead_replicas_run_is_cancelled_or_taken_over_by_another(tiny_pair, store,
                                                                    redis_cluster) -> None:
    registry = slow_registry(tiny_pair, store, controller_delay=0.0, expert_delay=0.0)
    entry = registry.get("relay-call-token")

    def die_mid_run(tid: str) -> None:
        """The run of another replica (its own models and connection) that dies after the
        controller's first segment."""
        dying = crash_after(RedisStore.from_url(redis_cluster.node_url(1)), 0)
        agents = [dataclasses.replace(a, backend=TransformersBackend(
            entry.config.agents[a.name].model, dtype="float32")) for a in entry.relay.agents]
        with pytest.raises(Crash):
            Relay(agents, entry.config.policy.build({a.name: a for a in agents}), dying,
                  entry.config.max_tokens, record=entry.record({})).run(
                      tiny.QUESTION, trajectory_id=tid)

    crashed = f"dead-replica-{time.time_ns()}"
    die_mid_run(crashed)
    with BackgroundServer(create_app(registry, ServeSettings(heartbeat=0.2))) as b:
        view = _get(b, f"/v1/trajectories/{crashed}").json()
        assert view["status"] == "running" and not view["held"] and len(view["segments"]) == 1
        resumed = _post(b, f"/v1/trajectories/{crashed}/resume").json()
        assert resumed["status"] == "finished" and resumed["answer"] == "7"
        other = f"dead-replica-2-{time.time_ns()}"
        die_mid_run(other)
        gone = _post(b, f"/v1/trajectories/{other}/cancel")  # nobody runs it: cancelled now
        assert gone.status_code == 200 and gone.json()["status"] == "cancelled"
        assert store.info(other)["cancel_reason"] == "cancelled through the API"
        assert _get(b, "/v1/trajectories/no-such-id").status_code == 404
        assert _get(b, "/v1/trajectories/bad:id").status_code == 400
        tid = Relay.from_config(RelayConfig.from_options(
            str(tiny_pair[0]), str(tiny_pair[1]), "call-token", max_tokens=40, dtype="float32"),
            store).run(tiny.QUESTION).trajectory_id
        foreign = _post(b, f"/v1/trajectories/{tid}/resume")  # run by the CLI, not a server
        assert foreign.status_code == 400 and foreign.json()["error"]["code"] == "not_served"


def test_trajectory_routes_need_the_key(tiny_pair, store) -> None:
    registry = slow_registry(tiny_pair, store, controller_delay=0.0, expert_delay=0.0)
    with BackgroundServer(create_app(registry, ServeSettings(api_key="sk-replica"))) as s:
        for method, path in (("GET", "/v1/trajectories/x"), ("POST", "/v1/trajectories/x/cancel"),
                             ("POST", "/v1/trajectories/x/resume")):
            assert httpx.request(method, s.url + path, timeout=10).status_code == 401


# --- two real `relaygraph serve` processes on one cluster --------------------------------------

def _serve(port: int, config: Path, redis: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "relaygraph.cli", "serve", "--config", str(config), "--port",
         str(port), "--redis", redis, "--namespace", "replicas"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)


def _stop(procs: list[subprocess.Popen]) -> list[str]:
    for proc in procs:
        proc.send_signal(signal.SIGINT)
    outputs = []
    for proc in procs:
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        outputs.append(output)
    return outputs


@pytest.mark.slow  # two server processes start (about a minute on 2 shared cores)
def test_two_serve_processes_on_one_cluster_behave_as_one_server(tiny_pair, redis_cluster,
                                                                 tmp_path) -> None:
    """A trajectory started on replica A is shown, cancelled and resumed through replica B
    (each a real `relaygraph serve` process, the store a real 3-node cluster reached
    through a different node), and shown again through A."""
    controller, expert = tiny_pair
    key = "sk-replicas-31"
    agents = "".join(
        f'[relays.relay-call-token.agents.{name}]\nmodel = "{path}"\ndtype = "float32"\n'
        f'backend = "slow-transformers"\ndelay = {delay}\n'
        for name, path, delay in (("controller", controller, 0.15), ("expert", expert, 0.5)))
    config = tmp_path / "serve.toml"
    config.write_text("[store]\nttl = \"2h\"\n[relays.relay-call-token]\nmax_tokens = 64\n" + agents)
    env = {**os.environ, "RELAYGRAPH_API_KEY": key,
           "PYTHONPATH": os.pathsep.join([str(plugin_path(tmp_path / "plugins")), str(ROOT)])}
    ports = free_port(), free_port()
    procs = [_serve(ports[0], config, redis_cluster.node_url(0), env),
             _serve(ports[1], config, redis_cluster.node_url(2), env)]
    a, b = (f"http://127.0.0.1:{p}" for p in ports)
    auth = {"Authorization": f"Bearer {key}"}
    outputs: list[str] = []
    try:
        for proc, url in zip(procs, (a, b)):
            def up(proc: subprocess.Popen = proc, url: str = url) -> bool:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                try:
                    return httpx.get(url + "/health", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(up, timeout=180)
        lines: list[str] = []
        started = threading.Event()
        cell: dict[str, str] = {}

        def listen() -> None:
            body = {"model": "relay-call-token", "messages": ASK, "stream": True}
            with httpx.stream("POST", a + "/v1/chat/completions", json=body, headers=auth,
                              timeout=120) as response:
                cell["tid"] = response.headers["x-relaygraph-trajectory-id"]
                started.set()
                lines.extend(response.iter_lines())

        thread = threading.Thread(target=listen)
        thread.start()
        assert started.wait(60)
        tid = cell["tid"]
        path = f"/v1/trajectories/{tid}"
        running = wait_for(lambda: (v := httpx.get(b + path, headers=auth, timeout=10).json())
                           .get("held") and v["segments"] and v, timeout=60)
        assert running["status"] == "running" and running["question"] == tiny.QUESTION
        assert httpx.post(b + path + "/resume", headers=auth, timeout=10).status_code == 409
        cancel = httpx.post(b + path + "/cancel", headers=auth, json={"reason": "to b"}, timeout=10)
        assert cancel.status_code == 202, cancel.text
        thread.join(60)
        assert any('"code":"cancelled"' in line for line in lines)
        stopped = wait_for(lambda: (v := httpx.get(b + path, headers=auth, timeout=10).json())
                           ["status"] == "cancelled" and v, timeout=30)
        assert stopped["cancel_reason"] == "to b"
        done = httpx.post(b + path + "/resume", headers=auth, timeout=120)
        assert done.status_code == 200, done.text
        finished = done.json()
        assert finished["status"] == "finished" and finished["answer"] == "7"
        assert texts(finished["segments"])[:len(stopped["segments"])] == texts(stopped["segments"])
        assert httpx.get(a + path, headers=auth, timeout=10).json() == finished
        store = RedisStore.from_url(redis_cluster.node_url(1), "replicas")
        assert store.status(tid) == "finished"
        assert 3600 < store.client.ttl(f"replicas:{{{tid}}}:meta") <= 7200  # [store] ttl = 2h
    finally:
        outputs = _stop(procs)
    for output in outputs:
        assert "serving relay-call-token" in output and "namespace replicas" in output
        assert key not in output
    assert f"trajectory={tid}" in outputs[0] and "POST /v1/trajectories/" in outputs[1]
