"""``relaygraph serve``: the real ``openai`` client against a running server on loopback.

Tiny overfit models (tests/tiny_models.py) answer "What is 2 + 5?" with one call of three
expert tokens in well under a second, so every behaviour runs end to end: uvicorn on a
thread (or the CLI in a subprocess), a real Redis server, real transformers backends.
"""

from __future__ import annotations

import concurrent.futures
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
import openai
import pytest
from openai import OpenAI

from relaygraph.agents.transformers_backend import TransformersBackend
from relaygraph.errors import ConfigError
from relaygraph.serve import (
    BackgroundServer,
    Registry,
    ServeConfig,
    ServeSettings,
    create_app,
)
from relaygraph.trajectory import RedisStore
from tests import tiny_models as tiny
from tests.servers import RedisServer, free_port
from tests.slow_backend import SlowBackend

ASK = [{"role": "user", "content": tiny.QUESTION}]


def tiny_config(tiny_pair: tuple[Path, Path], **overrides: Any) -> ServeConfig:
    controller, expert = tiny_pair
    agents = {"controller": {"model": str(controller), "dtype": "float32"},
              "expert": {"model": str(expert), "dtype": "float32"}}
    relays = {
        "relay-call-token": {"agents": agents, "max_tokens": 64,
                             "description": "tiny controller + tiny expert"},
        "relay-confidence": {"agents": agents, "max_tokens": 64,
                             "policy": {"type": "confidence", "threshold": -2.0}},
        "relay-strict": {"agents": agents, "max_tokens": 64, "system_message": "reject"},
    }
    return ServeConfig.parse({"relays": relays, **overrides})


def slow_registry(tiny_pair, store, controller_delay=0.01, expert_delay=0.3) -> Registry:
    delays = {str(tiny_pair[0]): controller_delay, str(tiny_pair[1]): expert_delay}
    return Registry.build(tiny_config(tiny_pair), store,
                          lambda cfg: SlowBackend(TransformersBackend(cfg.model, dtype=cfg.dtype),
                                                  delays[cfg.model]))


def full_speed(registry: Registry) -> None:
    for backend in registry.backends.values():
        backend.inner.delay = 0.0


def client_for(server: BackgroundServer, api_key: str = "unused", **kw: Any) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0, timeout=60, **kw)


@pytest.fixture(scope="module")
def registry(tiny_pair, store) -> Registry:
    return Registry.build(tiny_config(tiny_pair), store)


@pytest.fixture(scope="module")
def server(registry) -> Iterator[BackgroundServer]:
    with BackgroundServer(create_app(registry)) as s:
        yield s


@pytest.fixture
def client(server) -> OpenAI:
    return client_for(server)


def wait_for(predicate, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def error_of(excinfo: pytest.ExceptionInfo) -> dict:
    """The OpenAI error object the server answered with (the client keeps ``body["error"]``)."""
    exc = excinfo.value
    assert set(exc.body) == {"message", "type", "param", "code"}, exc.body
    return exc.body


# --- models ----------------------------------------------------------------------------------

def test_models_are_listed_and_share_loaded_backends(client, registry) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["relay-call-token", "relay-confidence", "relay-strict"]
    card = client.models.retrieve("relay-confidence")
    assert card.owned_by == "relaygraph" and card.object == "model"
    info = card.model_extra["relaygraph"]
    assert info["policy"] == "confidence" and set(info["agents"]) == {"controller", "expert"}
    assert info["max_tokens"] == 64
    with pytest.raises(openai.NotFoundError) as excinfo:
        client.models.retrieve("gpt-4o")
    assert error_of(excinfo)["code"] == "model_not_found"
    # three relays of two agents each, but each model is loaded once
    assert len(registry.backends) == 2
    backends = {id(a.backend) for r in registry.relays.values() for a in r.agents.values()}
    assert backends == {id(b) for b in registry.backends.values()}


def test_health_needs_no_key_and_reports_load(server) -> None:
    body = httpx.get(server.url + "/health").json()
    assert body["status"] == "ok" and body["relays"][0] == "relay-call-token"
    assert body["concurrency"] == 4 and body["max_queue"] == 64


# --- completions -----------------------------------------------------------------------------

def test_chat_completion_matches_the_stored_trajectory(client, store) -> None:
    raw = client.chat.completions.with_raw_response.create(model="relay-call-token", messages=ASK)
    completion = raw.parse()
    extra = completion.model_extra["relaygraph"]
    tid = extra["trajectory_id"]
    assert raw.headers["x-relaygraph-trajectory-id"] == tid
    assert completion.id == f"chatcmpl-{tid}" and completion.model == "relay-call-token"
    trajectory = store.load(tid)
    assert trajectory.status == "finished" and trajectory.task.question == tiny.QUESTION
    segments = trajectory.segments
    assert [(s.author, s.kind) for s in segments] == [
        ("controller", "text"), ("controller", "call"), ("expert", "text"), ("controller", "text")]
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "stop"
    assert choice.message.content == "".join(s.text for s in segments)
    assert "<call>3</call>" in choice.message.content
    assert extra["answer"] == "7" and extra["policy"] == "call-token"
    assert [(h["from"], h["to"], h["reason"]) for h in extra["handoff_records"]] == [
        ("controller", "expert", "call"), ("expert", "controller", "call_done")]

    usage = completion.usage
    by_agent = usage.model_extra["relaygraph"]["tokens_by_agent"]
    assert by_agent["expert"] == 3 == segments[2].n_tokens
    assert usage.completion_tokens == sum(by_agent.values()) == sum(s.n_tokens for s in segments)
    assert usage.model_extra["relaygraph"]["call_ratio"] == pytest.approx(3 / usage.completion_tokens)
    assert usage.prompt_tokens > len(tiny.QUESTION.split())  # the chat-templated prompt
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streaming_chat_sends_tokens_as_they_come_and_the_same_text(client, store) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="relay-call-token", messages=ASK, stream=True, stream_options={"include_usage": True})
    tid = raw.headers["x-relaygraph-trajectory-id"]
    assert raw.headers["content-type"].startswith("text/event-stream")
    chunks = list(raw.parse())
    assert all(c.id == f"chatcmpl-{tid}" and c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    tokens = [(c.model_extra["relaygraph"]["agent"], c.choices[0].delta.content)
              for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(tokens) > 10  # one chunk per token, not one blob
    assert {agent for agent, _ in tokens} == {"controller", "expert"}
    text = "".join(piece for _, piece in tokens)
    assert text == "".join(s.text for s in store.read(tid))
    expert_text = "".join(p for a, p in tokens if a == "expert")
    assert expert_text == store.read(tid)[2].text
    events = [c.model_extra["relaygraph"]["event"] for c in chunks
              if c.choices and "event" in (c.model_extra.get("relaygraph") or {})]
    assert [(e["from"], e["to"]) for e in events if e["type"] == "handoff"][:2] == [
        ("controller", "expert"), ("expert", "controller")]
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "stop"
    assert finish[0].model_extra["relaygraph"]["answer"] == "7"
    usage = chunks[-1]
    assert usage.choices == []
    assert usage.usage.completion_tokens == sum(s.n_tokens for s in store.read(tid))
    assert usage.usage.model_extra["relaygraph"]["tokens_by_agent"]["expert"] == 3
    non_streamed = client.chat.completions.create(model="relay-call-token", messages=ASK)
    assert non_streamed.choices[0].message.content == text
    assert store.status(tid) == "finished"


def test_legacy_completions_stream_and_not(client, store) -> None:
    done = client.completions.create(model="relay-call-token", prompt=tiny.QUESTION)
    tid = done.model_extra["relaygraph"]["trajectory_id"]
    assert done.object == "text_completion" and done.id == f"cmpl-{tid}"
    assert done.choices[0].text == "".join(s.text for s in store.read(tid))
    streamed = client.completions.create(model="relay-call-token", prompt=[tiny.QUESTION],
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text


def test_max_tokens_and_policy_overrides_per_request(client, store) -> None:
    short = client.chat.completions.create(model="relay-call-token", messages=ASK, max_tokens=5)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 5
    clipped = client.chat.completions.create(
        model="relay-call-token", messages=ASK,
        extra_body={"relaygraph": {"policy": {"max_call_tokens": 2}}})
    tid = clipped.model_extra["relaygraph"]["trajectory_id"]
    call, expert = store.read(tid)[1:3]
    assert call.meta["requested"] == 3 and call.meta["granted"] == 2 and expert.n_tokens == 2
    assert clipped.usage.model_extra["relaygraph"]["tokens_by_agent"]["expert"] == 2
    # the override did not leak into the served relay
    again = client.chat.completions.create(model="relay-call-token", messages=ASK)
    assert again.usage.model_extra["relaygraph"]["tokens_by_agent"]["expert"] == 3
    # a confidence relay told to distrust every token hands off at once
    eager = client.chat.completions.create(
        model="relay-confidence", messages=ASK, temperature=0, seed=1,
        extra_body={"relaygraph": {"policy": {"threshold": 0.0, "fallback_tokens": 4,
                                              "max_handoffs": 1}}})
    records = eager.model_extra["relaygraph"]["handoff_records"]
    assert records[0]["from"] == "controller" and records[0]["to"] == "expert"
    assert records[0]["reason"] == "low_confidence"


def test_system_message_is_appended_and_history_becomes_a_transcript(client, store) -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": [{"type": "text", "text": tiny.QUESTION}]}]
    done = client.chat.completions.create(model="relay-call-token", messages=messages,
                                          max_tokens=4)
    task = store.load(done.model_extra["relaygraph"]["trajectory_id"]).task
    assert task.question == f"User: Hi\nAssistant: Hello.\nUser: {tiny.QUESTION}"
    assert task.config["system_prompts"] == {"controller": tiny.SYSTEM_PROMPT + "\n\nBe brief.",
                                             "expert": tiny.SYSTEM_PROMPT + "\n\nBe brief."}
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(model="relay-strict",
                                       messages=[{"role": "system", "content": "x"}, *ASK])
    assert error_of(excinfo)["code"] == "unsupported_system_message"


# --- bad requests ----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, param, code", [
    ({"model": "gpt-4o"}, "model", "model_not_found"),
    ({"temperature": 5}, "temperature", "invalid_value"),
    ({"top_p": 0}, "top_p", "invalid_value"),
    ({"max_tokens": 0}, "max_tokens", "invalid_value"),
    ({"max_tokens": 65}, "max_tokens", "invalid_value"),
    ({"n": 2}, "n", "unsupported_parameter"),
    ({"stop": ["x"] * 17}, "stop", "invalid_value"),
    ({"logprobs": True, "stream": True}, "logprobs", "unsupported_parameter"),
    ({"logprobs": True, "top_logprobs": 2}, "top_logprobs", "unsupported_parameter"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.0.function.name",
     "invalid_value"),
    ({"tool_choice": "required"}, "tool_choice", "invalid_value"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema", "invalid_value"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "invalid_value"),
    ({"messages": [*ASK, {"role": "assistant", "content": "x"}], "extra_body": {"continue_final_message": True}},
     "add_generation_prompt", "invalid_value"),
    ({"presence_penalty": 1}, "presence_penalty", "unsupported_parameter"),
    ({"messages": []}, "messages", "invalid_value"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages", "invalid_value"),
    ({"messages": [{"role": "user", "content": "  "}]}, "messages.0.content", "invalid_value"),
    ({"messages": [{"role": "function", "content": "x", "name": "f"}]}, "messages.0.role",
     "unsupported_message"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content.0.type", "unsupported_content"),
    ({"extra_body": {"frobnicate": 1}}, "frobnicate", "unrecognized_argument"),
    ({"extra_body": {"relaygraph": {"policy": {"max_call_tokens": 0}}}},
     "relaygraph.policy.max_call_tokens", "invalid_value"),
    ({"extra_body": {"relaygraph": {"policy": {"bogus": 1}}}}, "relaygraph.policy.bogus",
     "unrecognized_argument"),
    ({"extra_body": {"relaygraph": {"policy": {"type": "solo"}}}}, "relaygraph.policy.type",
     "invalid_value"),
    ({"extra_body": {"relaygraph": {"policy": {"supervisor": "os:system"}}}},
     "relaygraph.policy.supervisor", "invalid_value"),
    ({"extra_body": {"relaygraph": {"policy": {"expert": "oracle"}}}}, "relaygraph.policy",
     "invalid_value"),
    ({"extra_body": {"relaygraph": {"trajectory": "x"}}}, "relaygraph.trajectory",
     "unrecognized_argument"),
])
def test_bad_requests_get_openai_errors(client, kwargs, param, code) -> None:
    request = {"model": "relay-call-token", "messages": ASK, **kwargs}
    error = openai.NotFoundError if code == "model_not_found" else openai.BadRequestError
    with pytest.raises(error) as excinfo:
        client.chat.completions.create(**request)
    body = error_of(excinfo)
    assert (body["param"], body["code"], body["type"]) == (param, code, "invalid_request_error")
    assert body["message"]


def test_malformed_bodies_and_urls(server) -> None:
    url = server.url + "/v1/chat/completions"
    bad_json = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"
    not_object = httpx.post(url, json=[1, 2])
    assert not_object.status_code == 400 and not_object.json()["error"]["code"] == "invalid_json"
    huge = httpx.post(url, json={"model": "relay-call-token",
                                 "messages": [{"role": "user", "content": "x" * (2 << 20)}]})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    chunked = httpx.post(url, content=iter([b"{" + b" " * (1 << 20), b"}"]),  # no length given
                         headers={"content-type": "application/json"})
    assert chunked.status_code == 413
    missing = httpx.post(server.url + "/v1/embeddings", json={})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_url"
    wrong_method = httpx.get(url)
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()
    assert httpx.get(server.url + "/docs").status_code == 404


def test_prompt_longer_than_the_context_is_a_400(client) -> None:
    with pytest.raises(openai.BadRequestError) as excinfo:  # tiny models: 512 positions
        client.chat.completions.create(model="relay-call-token",
                                       messages=[{"role": "user", "content": "seven " * 600}])
    assert error_of(excinfo)["code"] == "context_length_exceeded"


# --- security --------------------------------------------------------------------------------

def test_api_key_is_required_when_set(registry) -> None:
    with BackgroundServer(create_app(registry, ServeSettings(api_key="sk-test-4242"))) as server:
        no_key = httpx.post(server.url + "/v1/chat/completions",
                            json={"model": "relay-call-token", "messages": ASK})
        assert no_key.status_code == 401
        assert no_key.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError) as excinfo:
            client_for(server, api_key="sk-wrong").chat.completions.create(
                model="relay-call-token", messages=ASK)
        body = error_of(excinfo)
        assert body["code"] == "invalid_api_key" and "sk-wrong" not in body["message"]
        with pytest.raises(openai.AuthenticationError):
            client_for(server, api_key="sk-wrong").models.list()
        good = client_for(server, api_key="sk-test-4242")
        assert good.chat.completions.create(
            model="relay-call-token", messages=ASK).model_extra["relaygraph"]["answer"] == "7"
        assert httpx.get(server.url + "/health").status_code == 200


# --- concurrency, backpressure, cancellation -------------------------------------------------

def test_concurrent_requests_share_the_models(server, store) -> None:
    client = client_for(server)

    def ask(i: int) -> Any:
        stream = i % 2 == 0
        if stream:
            chunks = list(client.chat.completions.create(model="relay-call-token", messages=ASK,
                                                         stream=True))
            final = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
            return final.model_extra["relaygraph"]
        return client.chat.completions.create(model="relay-call-token",
                                              messages=ASK).model_extra["relaygraph"]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(ask, range(16)))
    assert [r["answer"] for r in results] == ["7"] * 16
    tids = {r["trajectory_id"] for r in results}
    assert len(tids) == 16
    for tid in tids:
        segments = store.read(tid)
        assert [s.n_tokens for s in segments][2] == 3 and store.status(tid) == "finished"
    stats = httpx.get(server.url + "/health").json()
    assert stats["running"] == 0 and stats["queued"] == 0


def _stream_until(server: BackgroundServer, stop, body: dict | None = None):
    """Stream a chat completion over a raw connection; close it once ``stop(chunk)``."""
    seen = []
    http = httpx.Client(timeout=30)
    with http.stream("POST", server.url + "/v1/chat/completions",
                     json=body or {"model": "relay-call-token", "messages": ASK,
                                   "stream": True}) as response:
        tid = response.headers["x-relaygraph-trajectory-id"]
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                seen.append(chunk)
                if stop(chunk):
                    break
    http.close()
    return tid, seen


def _is_expert_token(chunk: dict) -> bool:
    return (chunk.get("relaygraph") or {}).get("agent") == "expert"


def test_client_disconnect_cancels_generation_and_keeps_a_consistent_trajectory(
        tiny_pair, store) -> None:
    registry = slow_registry(tiny_pair, store, expert_delay=0.5)
    expert = registry.backends[("transformers", str(tiny_pair[1]), "float32", "cpu")].inner
    with BackgroundServer(create_app(registry)) as server:
        # leave after the expert's first token (of the three it was asked for)
        tid, seen = _stream_until(server, _is_expert_token)
        assert _is_expert_token(seen[-1])
        wait_for(lambda: store.status(tid) == "cancelled")
        meta = store.client.hgetall(f"relaygraph:{{{tid}}}:meta")
        assert meta[b"cancel_reason"] == b"client disconnected"
        # the controller's completed turn is kept; the interrupted expert turn is dropped
        # (its first token reached the client, but a turn is stored only when complete)
        segments = store.read(tid)
        assert [(s.author, s.kind) for s in segments] == [("controller", "text"),
                                                          ("controller", "call")]
        assert segments[-1].meta["step"]["to"] == "expert"
        # generation stopped at the expert's next token instead of writing all three
        wait_for(lambda: httpx.get(server.url + "/health").json()["running"] == 0)
        assert expert.checked == 2
        # and the server goes on serving (the model's lock was released)
        full_speed(registry)
        done = client_for(server).chat.completions.create(model="relay-call-token", messages=ASK)
        assert done.model_extra["relaygraph"]["answer"] == "7"


def test_non_streaming_client_that_gives_up_cancels_its_run(tiny_pair, store) -> None:
    registry = slow_registry(tiny_pair, store, controller_delay=0.05, expert_delay=0.05)
    before = set(store.list_ids(10_000))
    with BackgroundServer(create_app(registry)) as server:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/chat/completions", timeout=0.4,
                       json={"model": "relay-call-token", "messages": ASK})
        tid = wait_for(lambda: next((t for t in store.list_ids(50) if t not in before), None))
        wait_for(lambda: store.status(tid) == "cancelled")
        assert store.load(tid).task.question == tiny.QUESTION
        wait_for(lambda: httpx.get(server.url + "/health").json()["running"] == 0)


def test_shutdown_cancels_running_requests_and_keeps_their_trajectories(tiny_pair, store) -> None:
    registry = slow_registry(tiny_pair, store, controller_delay=0.2, expert_delay=0.2)
    server = BackgroundServer(create_app(registry), graceful_timeout=0.3).start()
    started = threading.Event()
    outcome: dict[str, Any] = {}

    def listen() -> None:
        body = {"model": "relay-call-token", "messages": ASK, "stream": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as response:
            outcome["tid"] = response.headers["x-relaygraph-trajectory-id"]
            started.set()
            try:
                outcome["lines"] = list(response.iter_lines())
            except httpx.HTTPError as exc:  # the server may cut the stream mid-way
                outcome["error"] = exc

    listener = threading.Thread(target=listen)
    listener.start()
    assert started.wait(10)
    server.stop()
    listener.join(10)
    assert not listener.is_alive() and not server._thread.is_alive()
    tid = outcome["tid"]
    wait_for(lambda: store.status(tid) == "cancelled")
    meta = store.client.hgetall(f"relaygraph:{{{tid}}}:meta")
    assert meta[b"cancel_reason"] == b"server shutdown"
    assert all("step" in s.meta for s in store.read(tid)[-1:])  # whole steps only
    assert "[DONE]" not in "".join(outcome.get("lines", []))


def test_saturation_gives_429_then_503_on_queue_timeout(tiny_pair, store) -> None:
    registry = slow_registry(tiny_pair, store, controller_delay=0.3, expert_delay=0.3)
    settings = ServeSettings(concurrency=1, max_queue=1, queue_timeout=2.0)
    with BackgroundServer(create_app(registry, settings)) as server:
        client = client_for(server)
        first_token = threading.Event()
        released = threading.Event()

        def occupy() -> None:  # holds the only worker until released
            _stream_until(server, lambda c: first_token.set() or released.wait(10))

        holder = threading.Thread(target=occupy)
        holder.start()
        try:
            assert first_token.wait(10)
            # one more fits in the queue, and waits there until it times out: a 503
            queued = concurrent.futures.ThreadPoolExecutor(1).submit(
                client.chat.completions.create, model="relay-call-token", messages=ASK)
            wait_for(lambda: httpx.get(server.url + "/health").json()["queued"] == 1)
            # the next one finds the worker and the queue full: a 429
            with pytest.raises(openai.RateLimitError) as excinfo:
                client.chat.completions.create(model="relay-call-token", messages=ASK)
            assert error_of(excinfo)["code"] == "server_busy"
            assert excinfo.value.response.headers["retry-after"] == "1"
            with pytest.raises(openai.InternalServerError) as excinfo:
                queued.result(10)
            assert excinfo.value.status_code == 503
            assert error_of(excinfo)["code"] == "queue_timeout"
        finally:
            released.set()
            holder.join(10)
        # once the holder is gone its run is cancelled and the server has room again
        full_speed(registry)
        wait_for(lambda: httpx.get(server.url + "/health").json() | {"relays": None}
                 == {"status": "ok", "store": "ok", "relays": None, "running": 0, "queued": 0,
                     "concurrency": 1, "max_queue": 1})
        done = client.chat.completions.create(model="relay-call-token", messages=ASK)
        assert done.model_extra["relaygraph"]["answer"] == "7"


# --- tracing ---------------------------------------------------------------------------------

def test_each_request_is_one_trace_joined_to_the_callers(client) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from relaygraph.observability import providers

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    caller_trace, caller_span = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    with providers.using(provider):
        first = client.chat.completions.create(model="relay-call-token", messages=ASK)
        second = client.chat.completions.create(
            model="relay-call-token", messages=ASK,
            extra_headers={"traceparent": f"00-{caller_trace}-{caller_span}-01"})
    runs = [s for s in exporter.get_finished_spans() if s.name == "invoke_workflow relaygraph"]
    assert len(runs) == 2
    by_tid = {s.attributes["relaygraph.trajectory.id"]: s for s in runs}
    one = by_tid[first.model_extra["relaygraph"]["trajectory_id"]]
    two = by_tid[second.model_extra["relaygraph"]["trajectory_id"]]
    assert one.parent is None  # its own trace
    assert format(two.context.trace_id, "032x") == caller_trace
    assert format(two.parent.span_id, "016x") == caller_span
    turns = [s for s in exporter.get_finished_spans() if s.name.startswith("invoke_agent")]
    assert {s.context.trace_id for s in turns} == {one.context.trace_id, two.context.trace_id}
    assert all(s.attributes["gen_ai.provider.name"] == "transformers" for s in turns)


# --- configuration and the command line ------------------------------------------------------

def test_serve_config_forms_and_errors(tmp_path, tiny_pair) -> None:
    default = ServeConfig.default()
    assert list(default.relays) == ["relay-call-token", "relay-prompted-call"]
    # call-token runs its trained controller, prompted-call the plain 0.5B
    assert default.local_models() == ["qwen2.5-coder-0.5b-relay", "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"]
    assert "<call>n</call>" in default.relays["relay-prompted-call"].agents["controller"].system_prompt
    plain = tmp_path / "plain.toml"
    plain.write_text('max_tokens = 32\n[policy]\ntype = "confidence"\nthreshold = -3.0\n')
    cfg = ServeConfig.load(plain)
    assert list(cfg.relays) == ["relay-confidence"] and cfg.relays["relay-confidence"].max_tokens == 32
    for text, message in [
        ('[relays.a]\nredis = "redis://x"\n', "top level"),
        ("[relays]\n", "at least 1"),
        ('[relays."bad name!"]\n', "relay name"),
        ('[relays.a.policy]\ntype = "nope"\n', "relays.a.policy"),
        ('[relays.a]\nsystem_message = "sometimes"\n', "relays.a.system_message"),
        ("[relays.a\n", "not valid TOML"),
    ]:
        path = tmp_path / "bad.toml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            ServeConfig.load(path)


def test_cli_serve_bad_config_is_one_error_line(tmp_path) -> None:
    from typer.testing import CliRunner

    from relaygraph.cli import app

    path = tmp_path / "serve.toml"
    path.write_text('[relays.a.policy]\ntype = "nope"\n')
    result = CliRunner().invoke(app, ["serve", "--config", str(path)])
    assert result.exit_code == 2
    assert "error:" in result.output and "relays.a.policy" in result.output


def test_cli_serve_end_to_end_with_a_key_and_no_secrets_in_its_logs(tiny_pair, tmp_path) -> None:
    password, key = "pw-9f8e7d6c", "sk-serve-5a4b3c"
    redis = RedisServer(tmp_path, password=password).start()
    controller, expert = tiny_pair
    config = tmp_path / "serve.toml"
    config.write_text(
        f'redis = "{redis.url}"\n'
        '[relays.relay-call-token]\nmax_tokens = 64\n'
        f'[relays.relay-call-token.agents.controller]\nmodel = "{controller}"\ndtype = "float32"\n'
        f'[relays.relay-call-token.agents.expert]\nmodel = "{expert}"\ndtype = "float32"\n')
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "relaygraph.cli", "serve", "--config", str(config),
         "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "RELAYGRAPH_API_KEY": key}, cwd=Path(__file__).parents[1])
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert proc.poll() is None, proc.stdout.read()
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout=120)
        client = OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)
        done = client.chat.completions.create(model="relay-call-token", messages=ASK)
        assert done.model_extra["relaygraph"]["answer"] == "7"
        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=url + "/v1", api_key="sk-nope", max_retries=0).models.list()
        tid = done.model_extra["relaygraph"]["trajectory_id"]
        assert RedisStore.from_url(redis.url).status(tid) == "finished"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        redis.stop()
    assert "serving relay-call-token at http://127.0.0.1:" in output
    assert "API key required" in output and "redis://:***@" in output
    assert "POST /v1/chat/completions" in output and f"trajectory={tid}" in output
    assert password not in output and key not in output and "sk-nope" not in output
    assert proc.returncode == 0, output
