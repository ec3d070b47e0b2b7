"""The chat backend (``backend = "chat"``) against real OpenAI-compatible servers on loopback.

Fast suite: the server is ``relaygraph serve`` itself (uvicorn on a thread, tiny real
models), so "a relay whose expert is another served relay" runs end to end: prefill and
instruct continuation, stop strings, budgets, server token counts, prices, an unreachable
server and a wrong key (one line, then resume), and policies refused up front. The tests
against vLLM's chat endpoint are in ``tests/test_chat_vllm.py`` (``-m vllm``).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI
from typer.testing import CliRunner

from relaygraph.agents.agent import MATH_SYSTEM_PROMPT, Agent
from relaygraph.agents.backend import Prompt, StopRule
from relaygraph.agents.chat_backend import INSTRUCT, ChatBackend
from relaygraph.agents.openai_backend import OpenAIBackend
from relaygraph.agents.remote import ServerUnavailableError
from relaygraph.errors import BackendError, ConfigError
from relaygraph.policies import CallTokenPolicy, ConfidencePolicy, FixedIntervalPolicy
from relaygraph.relay import Relay
from relaygraph.serve import BackgroundServer, Registry, ServeConfig, ServeSettings, create_app
from relaygraph.trajectory import RedisStore
from relaygraph.trajectory.models import Price, Segment
from tests import tiny_models as tiny
from tests.servers import free_port

KEY = f"sk-test-{secrets.token_hex(6)}"


def inner_config(tiny_pair: tuple[Path, Path]) -> ServeConfig:
    """The served relays the chat backend talks to: the tiny expert alone (it continues a
    prefilled "Let me think." exactly as the local expert does) and the tiny pair."""
    controller, expert = tiny_pair
    agents = {"controller": {"model": str(controller), "dtype": "float32"},
              "expert": {"model": str(expert), "dtype": "float32"}}
    return ServeConfig.parse({"relays": {
        "relay-expert": {"agents": agents, "max_tokens": 64, "system_message": "override",
                         "policy": {"type": "solo", "agent": "expert"}},
        "relay-pair": {"agents": agents, "max_tokens": 64, "system_message": "override"},
    }})


@pytest.fixture(scope="module")
def inner_registry(tiny_pair, store) -> Registry:
    return Registry.build(inner_config(tiny_pair), store)


@pytest.fixture(scope="module")
def settings() -> ServeSettings:
    return ServeSettings(api_key=KEY)


@pytest.fixture(scope="module")
def inner(inner_registry, settings) -> Iterator[BackgroundServer]:
    with BackgroundServer(create_app(inner_registry, settings)) as server:
        yield server


@pytest.fixture(scope="module")
def expert(inner) -> Iterator[ChatBackend]:
    backend = ChatBackend(inner.url + "/v1", "relay-expert", api_key=KEY, max_retries=0)
    yield backend
    backend.close()


def local_relay(backends, store, policy=None) -> Relay:
    controller, expert = backends
    return Relay([Agent("controller", controller), Agent("expert", expert)],
                 policy or CallTokenPolicy(), store, max_tokens=64)


def texts(store: RedisStore, tid: str) -> list[tuple[str, str, str]]:
    return [(s.author, s.kind, s.text) for s in store.read(tid)]


# --- continuation ----------------------------------------------------------------------------

def test_prefill_expert_on_a_served_relay_writes_what_the_local_expert_writes(
        backends, expert, store) -> None:
    assert expert.continuation == "prefill" and expert.provider_name == "relaygraph"
    assert not expert.capabilities.token_ids and not expert.capabilities.logprobs
    local = local_relay(backends, store).run(tiny.QUESTION)
    relay = Relay([Agent("controller", backends[0]),
                   Agent("expert", expert, price=Price(input=2.0, output=10.0))],
                  CallTokenPolicy(), store, max_tokens=64)
    result = relay.run(tiny.QUESTION)
    assert texts(store, result.trajectory_id) == texts(store, local.trajectory_id)
    assert result.answer == "7" and result.tokens_by_agent == local.tokens_by_agent
    seg = store.read(result.trajectory_id)[2]
    assert seg.author == "expert" and seg.token_ids is None and seg.tokens == tiny.CALL_N
    # the served relay continued exactly the shared text, given as the assistant's message
    inner_ids = [t for t in store.list_ids(50) if store.load(t).task.question == tiny.QUESTION
                 and store.read(t) and store.read(t)[0].author == "caller"]
    assert inner_ids
    given = store.read(inner_ids[0])[0]
    assert given.text == tiny.CONTROLLER_PREFIX and given.meta["given"]
    # cost from the server's usage: input tokens (its prompt) and 3 output tokens
    assert result.input_tokens_by_agent["expert"] > 0 and result.input_tokens_by_agent["controller"] > 0
    want = (result.input_tokens_by_agent["expert"] * 2.0 + 3 * 10.0) / 1e6
    assert result.cost == pytest.approx(want) and result.cost_by_agent == {"expert": pytest.approx(want)}
    assert store.load(result.trajectory_id).task.prices == {"expert": Price(input=2.0, output=10.0)}


def test_instruct_continuation_gives_the_reasoning_in_a_user_turn(inner, store) -> None:
    backend = ChatBackend(inner.url + "/v1", "relay-expert", api_key=KEY, continuation="instruct")
    view = (Segment(author="controller", text=tiny.CONTROLLER_PREFIX),)
    pieces: list[str] = []
    g = backend.generate(Prompt(tiny.QUESTION, MATH_SYSTEM_PROMPT, view), StopRule(5),
                         on_text=pieces.append)
    assert g.finish_reason == "budget" and g.n_tokens == 5 and g.token_ids == []
    assert "".join(pieces) == g.text and g.extra["continuation"] == "instruct"
    asked = INSTRUCT.format(question=tiny.QUESTION, reasoning=tiny.CONTROLLER_PREFIX)
    served = [t for t in store.list_ids(50) if store.load(t).task.question == asked]
    assert served, "the served relay got the instruction as its question"
    assert "".join(s.text for s in store.read(served[0])) == g.text


def test_stop_strings_and_budgets(expert) -> None:
    prompt = Prompt(tiny.QUESTION, MATH_SYSTEM_PROMPT)
    whole = expert.generate(prompt, StopRule(40))
    assert whole.text == tiny.EXPERT_ANSWER and whole.finish_reason == "eos"
    pieces: list[str] = []
    stopped = expert.generate(prompt, StopRule(40, (" five",)), on_text=pieces.append)
    assert stopped.finish_reason == "stop" and stopped.text == "Let me think. two plus five"
    assert "".join(pieces) == stopped.text  # the stop string the server left out is put back
    short = expert.generate(prompt, StopRule(4))
    assert short.finish_reason == "budget" and short.n_tokens == 4
    assert whole.text.startswith(short.text) and short.extra["tokens_counted_by"] == "server"


# --- policies refused up front ---------------------------------------------------------------

def test_policies_that_need_log_probs_or_token_ids_are_refused_up_front(backends, expert, store) -> None:
    controller = Agent("controller", backends[0])
    hosted = Agent("expert", expert)
    with pytest.raises(ConfigError, match="gives none") as info:
        Relay([hosted, controller], ConfidencePolicy(agents=("expert", "controller")), store)
    assert "\n" not in str(info.value) and "log-probs" in str(info.value)
    with pytest.raises(ConfigError, match="no local tokenizer"):
        Relay([Agent("controller", expert), Agent("expert", backends[1])], CallTokenPolicy(), store)
    # a fallback that only writes fixed-size turns needs neither
    Relay([controller, hosted], FixedIntervalPolicy(agents=("controller", "expert")), store)
    # as the confidence fallback (the last agent, no checks) a hosted model is fine
    Relay([controller, hosted], ConfidencePolicy(agents=("controller", "expert")), store)


# --- failures and resume ---------------------------------------------------------------------

def test_unreachable_server_is_one_line_and_resume_completes(tiny_pair, backends, store,
                                                             inner_registry) -> None:
    port = free_port()
    server = BackgroundServer(create_app(inner_registry), port=port).start()
    hosted = ChatBackend(f"http://127.0.0.1:{port}/v1", "relay-expert", max_retries=0,
                         logprobs=False)
    relay = Relay([Agent("controller", backends[0]), Agent("expert", hosted)], CallTokenPolicy(),
                  store, max_tokens=64, retries=1)
    server.stop()
    tid = f"unreachable-{secrets.token_hex(4)}"
    with pytest.raises(BackendError) as info:
        relay.run(tiny.QUESTION, trajectory_id=tid)
    message = str(info.value)
    assert f"cannot connect to the chat server at http://127.0.0.1:{port}/v1" in message
    assert "\n" not in message and f"relaygraph resume {tid}" in message
    assert store.status(tid) == "failed"
    assert [s.author for s in store.read(tid)] == ["controller", "controller"]  # kept
    with BackgroundServer(create_app(inner_registry), port=port):
        result = relay.resume(tid)
    assert result.answer == "7" and result.tokens_by_agent["expert"] == tiny.CALL_N
    assert store.status(tid) == "finished"


def test_wrong_key_is_one_line_without_the_key_and_resume_completes(backends, inner, settings,
                                                                    store) -> None:
    with pytest.raises(ConfigError) as info:
        ChatBackend(inner.url + "/v1", "relay-expert", api_key="sk-wrong-123")
    assert "refused the API key (401)" in str(info.value)
    assert "sk-wrong-123" not in str(info.value) and KEY not in str(info.value)
    hosted = ChatBackend(inner.url + "/v1", "relay-expert", api_key=KEY, logprobs=False)
    relay = Relay([Agent("controller", backends[0]), Agent("expert", hosted)], CallTokenPolicy(),
                  store, max_tokens=64)
    settings.api_key = "sk-rotated"  # the key is rotated on the server mid-way
    tid = f"wrong-key-{secrets.token_hex(4)}"
    try:
        with pytest.raises(ConfigError) as info:
            relay.run(tiny.QUESTION, trajectory_id=tid)
    finally:
        settings.api_key = KEY
    message = str(info.value)
    assert "refused the API key" in message and "\n" not in message and KEY not in message
    assert store.status(tid) == "failed" and len(store.read(tid)) == 2
    result = relay.resume(tid)
    assert result.answer == "7" and store.status(tid) == "finished"


# --- the completions backend says what to use -------------------------------------------------

def test_completions_backend_on_a_server_without_vllm_extensions_says_use_chat(inner) -> None:
    with pytest.raises(ConfigError, match='use backend = "chat"') as info:
        OpenAIBackend(inner.url + "/v1", "relay-expert", api_key=KEY)
    assert "not vLLM" in str(info.value) and "\n" not in str(info.value)


def test_unreachable_at_build_is_a_backend_error() -> None:
    with pytest.raises(ServerUnavailableError, match="cannot connect to the chat server"):
        ChatBackend(f"http://127.0.0.1:{free_port()}/v1", "m", max_retries=0)
    with pytest.raises(ConfigError, match="credentials"):
        ChatBackend("http://user:pw@127.0.0.1:1/v1", "m")


# --- from a config file: relaygraph run and relaygraph serve ------------------------------------

def relay_toml(tmp_path: Path, tiny_pair, url: str, **extra: str) -> Path:
    controller, _ = tiny_pair
    config = tmp_path / "relay.toml"
    lines = "\n".join(f"{k} = {v}" for k, v in extra.items())
    config.write_text(f"""max_tokens = 64
[agents.controller]
model = "{controller}"
dtype = "float32"
price_per_million_input_tokens = 0.1
price_per_million_output_tokens = 0.2
[agents.expert]
backend = "chat"
base_url = "{url}"
model = "relay-expert"
api_key_env = "RG_TEST_CHAT_KEY"
price_per_million_input_tokens = 3.0
price_per_million_output_tokens = 15.0
{lines}
[policy]
type = "call-token"
""")
    return config


def test_cli_run_with_a_chat_expert_shows_its_tokens_and_the_cost(
        inner, tiny_pair, redis_server, store, tmp_path, monkeypatch) -> None:
    from relaygraph.cli import app

    monkeypatch.setenv("RG_TEST_CHAT_KEY", KEY)
    config = relay_toml(tmp_path, tiny_pair, inner.url + "/v1")
    result = CliRunner().invoke(app, ["run", tiny.QUESTION, "-c", str(config), "--json",
                                      "--redis", redis_server.url])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output[result.output.index("{"):])
    assert out["tokens_by_agent"]["expert"] == tiny.CALL_N and out["answer"] == "7"
    inputs, outputs = out["input_tokens_by_agent"], out["tokens_by_agent"]
    want = {"controller": (inputs["controller"] * 0.1 + outputs["controller"] * 0.2) / 1e6,
            "expert": (inputs["expert"] * 3.0 + outputs["expert"] * 15.0) / 1e6}
    assert out["cost_by_agent"] == pytest.approx(want)
    assert out["cost"] == pytest.approx(sum(want.values()))
    assert KEY not in result.output
    shown = CliRunner().invoke(app, ["show", out["trajectory_id"], "--redis", redis_server.url])
    assert shown.exit_code == 0 and "cost 0." in shown.output, shown.output
    # a wrong key: one line, exit 2
    monkeypatch.setenv("RG_TEST_CHAT_KEY", "sk-nope")
    bad = CliRunner().invoke(app, ["run", tiny.QUESTION, "-c", str(config), "--redis",
                                   redis_server.url])
    errors = [line for line in bad.output.splitlines() if line.startswith("error:")]
    assert bad.exit_code == 2 and len(errors) == 1 and "Traceback" not in bad.output, bad.output
    assert "refused the API key" in errors[0] and "sk-nope" not in bad.output
    # a policy that needs log-probs of the hosted agent: one line, before anything runs
    monkeypatch.setenv("RG_TEST_CHAT_KEY", KEY)
    refused = CliRunner().invoke(app, ["run", tiny.QUESTION, "-c", str(config), "--redis",
                                       redis_server.url, "--policy", "confidence", "--set",
                                       'agents=["expert","controller"]'])
    assert refused.exit_code == 2 and "gives none" in refused.output, refused.output


def test_serve_a_relay_whose_expert_is_a_served_relay(inner, tiny_pair, store, tmp_path,
                                                      monkeypatch) -> None:
    monkeypatch.setenv("RG_TEST_CHAT_KEY", KEY)
    outer_config = ServeConfig.load(relay_toml(tmp_path, tiny_pair, inner.url + "/v1"))
    registry = Registry.build(outer_config, store)
    with BackgroundServer(create_app(registry)) as outer:
        client = OpenAI(base_url=outer.url + "/v1", api_key="-", max_retries=0)
        done = client.chat.completions.create(
            model="relay-call-token", messages=[{"role": "user", "content": tiny.QUESTION}])
    usage = done.usage.model_extra["relaygraph"]
    assert usage["tokens_by_agent"]["expert"] == tiny.CALL_N
    assert usage["cost"] == pytest.approx(sum(usage["cost_by_agent"].values())) and usage["cost"] > 0
    assert done.model_extra["relaygraph"]["answer"] == "7"
    assert done.choices[0].message.content == tiny.CONTROLLER_PREFIX + tiny.CALL_TEXT + \
        load_meta()["e3_text"] + tiny.CONTROLLER_SUFFIX


def load_meta() -> dict:
    return tiny.load_relay_meta(tiny.relay_root())


def test_every_example_config_parses(monkeypatch) -> None:
    from relaygraph.config import RelayConfig

    examples = sorted((Path(__file__).parent.parent / "examples").glob("*.toml"))
    assert {p.name for p in examples} >= {"hosted_expert.toml", "ollama_pair.toml"}
    for path in examples:
        cfg = RelayConfig.load(path)
        assert cfg.agents, path



# --- money in traces; serve's stop and logprobs ---------------------------------------------

def test_traces_report_the_cost_the_run_reports(backends, expert, store) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from relaygraph.observability import providers

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    relay = Relay([Agent("controller", backends[0], price=Price(input=1.0, output=4.0)),
                   Agent("expert", expert, price=Price(input=3.0, output=15.0))],
                  CallTokenPolicy(), store, max_tokens=64)
    with providers.using(provider):
        result = relay.run(tiny.QUESTION)
    spans = exporter.get_finished_spans()
    run = next(s for s in spans if s.name == "invoke_workflow relaygraph"  # not the served one's
               and s.attributes["relaygraph.policy"] == "call-token")
    assert run.attributes["relaygraph.cost"] == pytest.approx(result.cost)
    by_agent = dict(zip(run.attributes["relaygraph.cost.agents"],
                        run.attributes["relaygraph.cost.by_agent"], strict=True))
    assert by_agent == pytest.approx(result.cost_by_agent)
    turns = [s for s in spans if s.name.startswith("invoke_agent")
             and s.context.trace_id == run.context.trace_id]
    assert sum(s.attributes["relaygraph.usage.cost"] for s in turns) == pytest.approx(result.cost)


def test_served_stop_sequences_streamed_and_not(inner) -> None:
    client = OpenAI(base_url=inner.url + "/v1", api_key=KEY, max_retries=0)
    ask = [{"role": "user", "content": tiny.QUESTION}]
    done = client.chat.completions.create(model="relay-expert", messages=ask, stop=[" five", "."])
    choice = done.choices[0]
    assert choice.message.content == "Let me think"  # the earliest stop in the merged text
    assert choice.finish_reason == "stop" and choice.model_extra["stop_reason"] == "."
    chunks = list(client.chat.completions.create(model="relay-expert", messages=ask,
                                                 stop=["two plus"], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Let me think. "
    last = [c for c in chunks if c.choices and c.choices[0].finish_reason][0].choices[0]
    assert last.finish_reason == "stop" and last.model_extra["stop_reason"] == "two plus"


def test_served_logprobs_come_from_the_stored_segments(inner, store) -> None:
    client = OpenAI(base_url=inner.url + "/v1", api_key=KEY, max_retries=0)
    done = client.chat.completions.create(
        model="relay-pair", messages=[{"role": "user", "content": tiny.QUESTION}], logprobs=True)
    content = done.choices[0].logprobs.content
    assert "".join(t.token for t in content) == done.choices[0].message.content
    segments = store.read(done.model_extra["relaygraph"]["trajectory_id"])
    stored = [lp for s in segments for lp in s.logprobs or ()]
    assert [t.logprob for t in content] == pytest.approx(stored)
    authors = [t.model_extra["relaygraph_agent"] for t in content]
    assert authors.count("expert") == tiny.CALL_N
