"""Security and bad-input properties: fuzzed config loading, many concurrent runs, ids,
no pickle, secrets kept out of outputs."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relaygraph import Agent, CallTokenPolicy, Relay
from relaygraph.agents.transformers_backend import TransformersBackend
from relaygraph.config import RelayConfig
from relaygraph.errors import ConfigError
from relaygraph.trajectory import RedisStore, new_trajectory_id
from relaygraph.trajectory.models import check_trajectory_id
from tests import tiny_models as tiny

ROOT = Path(__file__).parents[1]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
policy_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["call-token", "confidence", "supervisor", "truncate", "x", 3])},
    optional={k: json_values for k in ("threshold", "agents", "interval", "p", "cut_tokens",
                                       "supervisor", "max_call_tokens", "metric")},
)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["policy", "agents", "max_tokens", "redis", "extra"]),
                       json_values | policy_like, max_size=4))
def test_fuzzed_configs_either_load_or_raise_config_error(data) -> None:
    try:
        cfg = RelayConfig.parse(data)
    except ConfigError as exc:
        assert str(exc).startswith("config:") and "\n" not in str(exc)
        return
    assert cfg.max_tokens >= 1 and set(cfg.needed_agents()) <= set(cfg.agents)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzzed_config_files_never_crash(tmp_path_factory, raw: bytes) -> None:
    path = tmp_path_factory.mktemp("cfg") / "relay.toml"
    path.write_bytes(raw)
    try:
        RelayConfig.load(path)
    except ConfigError:
        pass


def test_trajectory_ids_do_not_collide_and_cannot_escape_the_namespace() -> None:
    ids = {new_trajectory_id() for _ in range(20_000)}
    assert len(ids) == 20_000
    for bad in ("x}:meta", "a{b}", "relaygraph:{other}", "a\nb", "*", "a b"):
        with pytest.raises(ValueError):
            check_trajectory_id(bad)


def test_no_pickle_or_eval_of_stored_data() -> None:
    source = "\n".join(p.read_text() for p in (ROOT / "relaygraph").rglob("*.py"))
    assert not re.search(r"\bimport pickle\b|\bpickle\.loads?\b|(?<![.\w])eval\(|(?<![.\w])exec\(", source)


def test_many_runs_in_parallel_on_one_redis(tmp_path_factory, redis_server) -> None:
    controller, expert = tiny.relay_pair()
    c = TransformersBackend(str(controller), dtype="float32")
    e = TransformersBackend(str(expert), dtype="float32")
    store = RedisStore.from_url(redis_server.url)
    relay = Relay([Agent("controller", c, tiny.SYSTEM_PROMPT), Agent("expert", e, tiny.SYSTEM_PROMPT)],
                  CallTokenPolicy(), store)
    results, errors = [], []

    def one() -> None:
        try:
            results.append(relay.run(tiny.QUESTION))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({r.trajectory_id for r in results}) == 12
    texts = {tuple(s.text for s in store.read(r.trajectory_id)) for r in results}
    assert len(texts) == 1 and all(r.answer == "7" for r in results)


def test_the_password_never_reaches_json_output_or_errors(tmp_path, tmp_path_factory) -> None:
    from tests.servers import RedisServer
    from tests.test_cli import cli

    controller, expert = tiny.relay_pair()
    server = RedisServer(tmp_path, password="pw-SECRET-42").start()
    try:
        ok = cli("run", tiny.QUESTION, "--controller", str(controller), "--expert", str(expert),
                 "--dtype", "float32", "--redis", server.url, "--json")
        assert ok.returncode == 0, ok.stderr
        assert "pw-SECRET-42" not in ok.stdout + ok.stderr
        meta = RedisStore.from_url(server.url).load(json.loads(ok.stdout)["trajectory_id"]).task
        assert "pw-SECRET-42" not in meta.model_dump_json()
        bad = cli("run", tiny.QUESTION, "--controller", str(controller), "--expert", str(expert),
                  "--redis", server.url.replace("pw-SECRET-42", "pw-WRONG-43"))
        assert bad.returncode == 2 and "pw-WRONG-43" not in bad.stderr + bad.stdout
    finally:
        server.stop()


# --- secrets in store URLs, in every form redis-py accepts, never reach an output -------------

SECRET_FORMS = [
    "redis://:{s}@127.0.0.1:{port}/0",
    "redis://alice:{s}@127.0.0.1:{port}/0",
    "redis://{s}@127.0.0.1:{port}/0",                       # a token as the user name
    "redis://127.0.0.1:{port}/0?password={s}",
    "redis://127.0.0.1:{port}/0?pass%77ord={s}",            # percent-encoded option name
    "redis://127.0.0.1:{port}/0?password={s}#frag",
    "redis://127.0.0.1:{port}/0?PASSWORD={s}",              # not an option: refused, masked
    "redis://127.0.0.1:{port}/0?x=1&password={s}",          # an unknown option next to it
    "unix://{sock}?password={s}",
    "unix://{sock}?db=0&password={s}",
    "redis+cluster://:{s}@127.0.0.1:{port},127.0.0.1:{port}",
    "redis+sentinel://:{s}@127.0.0.1:{port}/svc?sentinel_password={s}",
]
WRONG = "WrOng-Pw%21-77"  # percent-encoded: neither the raw nor the decoded form may show


@pytest.fixture(scope="module")
def passworded(tmp_path_factory):
    from tests.servers import RedisServer

    workdir = tmp_path_factory.mktemp("pw")
    sock = Path("/tmp") / f"rg-pw-{os.getpid()}.sock"
    server = RedisServer(workdir, password="Right-Pw-5150",
                         extra=("--unixsocket", str(sock), "--unixsocketperm", "700")).start()
    yield server, sock
    server.stop()


@pytest.mark.parametrize("form", SECRET_FORMS)
def test_no_secret_of_a_store_url_reaches_an_error(form, passworded) -> None:
    from typer.testing import CliRunner

    from relaygraph.cli import app

    server, sock = passworded
    url = form.format(s=WRONG, port=server.port, sock=sock)
    runner = CliRunner()
    for args in (["show", "abc"], ["show"], ["resume", "abc"], ["run", "q", "--json"],
                 ["store", "status"], ["store", "prune", "--older-than", "7d"]):
        res = runner.invoke(app, [*args, "--redis", url])
        shown = res.output  # stdout and stderr
        assert res.exit_code == 2 and shown.startswith("error:"), (args, shown)
        assert "WrOng" not in shown and "Pw!" not in shown, shown


def test_no_secret_of_a_tls_store_url_reaches_an_error(passworded) -> None:
    """TLS to a plain server times out (5 s a try): one try, outside the CLI loop above."""
    from relaygraph.errors import StoreUnavailableError

    server, _ = passworded
    url = f"rediss://127.0.0.1:{server.port}/0?ssl_password={WRONG}&password={WRONG}"
    with pytest.raises(StoreUnavailableError) as caught:
        RedisStore.from_url(url, retries=0)
    assert "WrOng" not in str(caught.value) and "Pw!" not in str(caught.value)
    assert "ssl_password=***" in str(caught.value)


def test_refused_credentials_are_reported_at_once(passworded) -> None:
    from relaygraph.errors import StoreUnavailableError

    server, sock = passworded
    for url in (f"redis://:{WRONG}@127.0.0.1:{server.port}/0", f"unix://{sock}?password={WRONG}",
                f"redis+sentinel://127.0.0.1:{server.port}/svc?sentinel_password={WRONG}"):
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="refused the credentials"):
            RedisStore.from_url(url)
        # a retried connection error waits >= 9 s of backoff; a refusal is final
        assert time.monotonic() - started < 5, url


@pytest.mark.parametrize("form", ["unix://{sock}?password={s}", "redis://127.0.0.1:{port}/0?password={s}"])
def test_serve_announces_its_store_without_the_password(form, passworded, tiny_pair, tmp_path) -> None:
    import subprocess
    import sys

    from tests.servers import free_port

    server, sock = passworded
    config = tmp_path / "serve.toml"
    config.write_text('[relays.r]\nmax_tokens = 8\n[relays.r.agents.controller]\n'
                      f'model = "{tiny_pair[0]}"\ndtype = "float32"\n[relays.r.policy]\ntype = "solo"\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "relaygraph.cli", "serve", "--config", str(config), "--port",
         str(free_port()), "--redis", form.format(s="Right-Pw-5150", port=server.port, sock=sock)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("serving "):
                break
        assert lines and lines[-1].startswith("serving "), "".join(lines)
        assert "Right-Pw" not in "".join(lines)
        assert "password=***" in lines[-1]
    finally:
        proc.kill()
        proc.wait()
