"""``relaygraph serve``'s default relays on the real offline pair (Qwen2.5-Coder 0.5B + 1.5B),
through the ``openai`` client. Slow (loads both models on the CPU): ``pytest -m slow``."""

from __future__ import annotations

import pytest
from openai import OpenAI

from relaygraph.agents import catalog
from relaygraph.serve import BackgroundServer, Registry, ServeConfig, create_app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(redis_server):
    from relaygraph.trajectory import RedisStore

    config = ServeConfig.default()
    missing = [m for m in config.local_models() if not catalog.is_pulled(m)]
    if missing:
        pytest.skip(f"models not pulled: {missing} (relaygraph models pull)")
    store = RedisStore.from_url(redis_server.url)
    registry = Registry.build(config, store)
    # two relays, one load per model: call-token's trained controller, prompted-call's plain
    # 0.5B, and the 1.5B expert they share
    assert len(registry.backends) == 3
    with BackgroundServer(create_app(registry)) as s:
        yield s, store


def test_default_relays_answer_through_the_openai_client(server) -> None:
    srv, store = server
    client = OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=600)
    assert [m.id for m in client.models.list().data] == ["relay-call-token", "relay-prompted-call"]

    done = client.chat.completions.create(
        model="relay-prompted-call", max_tokens=24,
        messages=[{"role": "user", "content": "What is 17 * 23?"}])
    info = done.model_extra["relaygraph"]
    trajectory = store.load(info["trajectory_id"])
    assert trajectory.status == "finished"
    assert trajectory.task.agents == {"controller": "qwen2.5-coder-0.5b",
                                      "expert": "qwen2.5-coder-1.5b"}
    assert done.choices[0].message.content == "".join(
        s.text for s in trajectory.segments if s.kind in ("text", "call"))
    assert 0 < done.usage.completion_tokens <= 24
    assert done.usage.completion_tokens == sum(
        done.usage.model_extra["relaygraph"]["tokens_by_agent"].values())

    chunks = list(client.chat.completions.create(
        model="relay-call-token", max_tokens=16, stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "What is 2 + 5?"}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    tid = chunks[0].model_extra["relaygraph"]["trajectory_id"]
    assert text and text == "".join(s.text for s in store.read(tid))
    assert chunks[-1].usage.completion_tokens <= 16
    assert store.status(tid) == "finished"
    assert store.load(tid).task.agents["controller"] == catalog.RELAY_CONTROLLER
