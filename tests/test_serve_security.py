"""The server against a hostile web page and a hostile client (issue 16, item 5 and 9):
browser-style cross-origin and DNS-rebinding requests, bodies that are not JSON or nest
too deep, more prompts than the server admits, a faked X-Forwarded-For, a store that is
down. A real uvicorn on loopback, real tiny models, a real Redis server."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from relaygraph.serve import BackgroundServer, Registry, ServeSettings, create_app
from relaygraph.trajectory import RedisStore
from tests.servers import RedisServer, free_port
from tests.test_serve import ASK, tiny_config, wait_for

BODY = {"model": "relay-call-token", "messages": ASK}
EVIL = "http://evil.example"


@pytest.fixture(scope="module")
def registry(tiny_pair, store) -> Registry:
    return Registry.build(tiny_config(tiny_pair), store)


@pytest.fixture(scope="module")
def server(registry) -> Iterator[BackgroundServer]:
    with BackgroundServer(create_app(registry)) as s:
        yield s


def _runs(store: RedisStore) -> int:
    return len(store.list_ids(limit=1_000_000))


def test_browser_style_cross_origin_requests_are_refused_and_run_nothing(server, store) -> None:
    """What a web page can send without a preflight: text/plain, form-encoded and
    multipart bodies, with the page's Origin; and the same body with the server's own
    Host but no Origin (an older browser, a form), and a DNS-rebinding page's request
    (its own name in Host and Origin)."""
    import json

    url = server.url + "/v1/chat/completions"
    body = json.dumps(BODY)
    before = _runs(store)
    host = f"127.0.0.1:{server.port}"
    cases = [
        ({"content-type": "text/plain;charset=UTF-8", "origin": EVIL}, body, 403),
        ({"content-type": "application/x-www-form-urlencoded", "origin": EVIL}, body, 403),
        ({"content-type": "multipart/form-data; boundary=x", "origin": "null"}, body, 403),
        ({"content-type": "text/plain"}, body, 415),
        ({"content-type": "application/x-www-form-urlencoded"}, f"{body}=", 415),
        ({"content-type": "text/plain", "host": f"evil.example:{server.port}",
          "origin": f"http://evil.example:{server.port}"}, body, 403),
        ({"content-type": "application/json", "host": f"evil.example:{server.port}"}, body, 403),
        ({"content-type": "application/json", "origin": EVIL}, body, 403),
    ]
    for headers, content, status in cases:
        res = httpx.post(url, content=content, headers=headers)
        assert res.status_code == status, (headers, res.status_code, res.text)
        assert res.json()["error"]["code"] in ("origin_not_allowed", "host_not_allowed",
                                               "unsupported_media_type")
        assert "x-relaygraph-trajectory-id" not in res.headers
    # a cancel of a trajectory from a page, and the model list read by a rebinding page
    cancel = httpx.post(server.url + "/v1/trajectories/abc/cancel", headers={"origin": EVIL})
    assert cancel.status_code == 403
    listed = httpx.get(server.url + "/v1/models", headers={"host": "evil.example"})
    assert listed.status_code == 403
    assert _runs(store) == before
    # a program (no Origin) and a page served by this very server are answered
    same = httpx.post(url, json=BODY, headers={"origin": f"http://{host}"})
    assert same.status_code == 200 and same.json()["relaygraph"]["answer"] == "7"
    named = httpx.get(f"http://localhost:{server.port}/v1/models")
    assert named.status_code == 200


def test_allowed_hosts_admit_a_name_and_its_pages(registry) -> None:
    settings = ServeSettings(allowed_hosts=("relay.internal",))
    with BackgroundServer(create_app(registry, settings)) as server:
        models = server.url + "/v1/models"
        assert httpx.get(models, headers={"host": "relay.internal:8000"}).status_code == 200
        assert httpx.get(models, headers={"host": "relay.internal",
                                          "origin": "https://relay.internal"}).status_code == 200
        assert httpx.get(models, headers={"host": "other.internal"}).status_code == 403


def test_deep_json_is_a_400(server) -> None:
    url = server.url + "/v1/chat/completions"
    for depth in (100_000, 65):
        res = httpx.post(url, content=b"[" * depth + b"]" * depth,
                         headers={"content-type": "application/json"})
        assert res.status_code == 400 and res.json()["error"]["code"] == "invalid_json", depth
    nested: object = "x"
    for _ in range(200):
        nested = [nested]
    res = httpx.post(url, json={**BODY, "metadata": nested})
    assert res.status_code == 400 and "nested" in res.json()["error"]["message"]


def test_requests_beyond_the_capacity_are_refused_before_their_prompt_is_tokenized(registry) -> None:
    """--concurrency 1 --max-queue 0, the one place taken: a big prompt gets a 429 and its
    tokens are never counted (before: every request was tokenized, then refused)."""
    settings = ServeSettings(concurrency=1, max_queue=0)
    app = create_app(registry, settings)
    entry = registry.relays["relay-call-token"]
    counted: list[int] = []
    real = entry.prompt_tokens

    def counting(relay, question):  # records the call, then tokenizes for real
        counted.append(len(question))
        return real(relay, question)

    entry.prompt_tokens = counting  # type: ignore[method-assign]
    try:
        with BackgroundServer(app) as server:
            url = server.url + "/v1/chat/completions"
            big = {"model": "relay-call-token",
                   "messages": [{"role": "user", "content": "2 + 5 " * 100_000}]}
            with app.state.scheduler.admission():  # the only place, held
                refused = [httpx.post(url, json=big, timeout=60) for _ in range(4)]
            assert [r.status_code for r in refused] == [429] * 4
            assert counted == []
            assert httpx.post(url, json=BODY, timeout=60).status_code == 200
            assert len(counted) == 1
    finally:
        del entry.prompt_tokens


def test_health_reports_the_store(tiny_pair, tmp_path) -> None:
    redis = RedisServer(tmp_path).start()
    store = RedisStore.from_url(redis.url, retries=0)
    registry = Registry.build(tiny_config(tiny_pair), store)
    with BackgroundServer(create_app(registry)) as server:
        up = httpx.get(server.url + "/health")
        assert up.status_code == 200 and up.json()["store"] == "ok"
        redis.stop()
        down = httpx.get(server.url + "/health", timeout=10)
        assert down.status_code == 503
        assert down.json()["status"] == "unavailable" and down.json()["store"] == "unavailable"


def _serve(config: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "relaygraph.cli", "serve", "--config", str(config), "--port",
         str(port), *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        cwd=Path(__file__).parents[1])
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None
        try:
            return httpx.get(url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, timeout=120)
    return proc, url


def _stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=30)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[0]


def test_the_access_log_believes_forwarded_headers_only_from_listed_proxies(
        tiny_pair, redis_server, tmp_path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text(f'redis = "{redis_server.url}"\n[relays.r]\nmax_tokens = 8\n'
                      f'[relays.r.agents.controller]\nmodel = "{tiny_pair[0]}"\n'
                      'dtype = "float32"\n[relays.r.policy]\ntype = "solo"\n')
    forged = {"x-forwarded-for": "6.6.6.6", "x-forwarded-proto": "https"}
    logs = {}
    for name, extra in (("default", ()), ("proxied", ("--forwarded-allow-ips", "127.0.0.1"))):
        proc, url = _serve(config, *extra)
        try:
            assert httpx.get(url + "/v1/models", headers=forged).status_code == 200
        finally:
            logs[name] = _stop(proc)
    line = next(x for x in logs["default"].splitlines() if "GET /v1/models" in x)
    assert "127.0.0.1" in line and "6.6.6.6" not in logs["default"]
    proxied = next(x for x in logs["proxied"].splitlines() if "GET /v1/models" in x)
    assert "6.6.6.6" in proxied
