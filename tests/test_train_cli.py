"""``relaygraph train warmup | filter | grpo`` end to end on tiny models, then ``relaygraph
run --policy call-token --controller PATH`` on the trained model (in-process: the stages
import torch and TRL once)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from relaygraph.cli import app
from tests import tiny_models as tiny

runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def test_the_three_stages_then_run_the_trained_controller(tiny_pair, redis_server,
                                                          tmp_path: Path) -> None:
    controller, expert = tiny_pair
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": tiny.QUESTION, "answer": "7"}) + "\n"
                    + json.dumps({"question": tiny.NOCALL_QUESTION, "answer": "2"}) + "\n")
    system = json.dumps(tiny.SYSTEM_PROMPT)  # a TOML basic string is a JSON string
    common = f'system_prompt = {system}\ndevice = "cpu"\nmax_tokens = 48\n'
    (tmp_path / "warmup.toml").write_text(
        f'model = "{controller}"\ndata = "{data}"\noutput_dir = "{tmp_path / "warm"}"\n{common}'
        '[sft]\nlearning_rate = 1e-4\nmax_steps = 1\nbatch_size = 2\n'
        'gradient_accumulation_steps = 1\ntrl = { disable_tqdm = true }\n')
    (tmp_path / "filter.yaml").write_text(
        f'expert: "{expert}"\ndata: "{data}"\noutput: "{tmp_path / "kept.jsonl"}"\nk: 2\n'
        f'temperature: 0.0\ndtype: float32\nsystem_prompt: {system}\ndevice: cpu\n')
    (tmp_path / "grpo.toml").write_text(
        f'controller = "{tmp_path / "warm" / "model"}"\nexpert = "{expert}"\n'
        f'data = "{tmp_path / "kept.jsonl"}"\noutput_dir = "{tmp_path / "grpo"}"\n{common}'
        f'expert_system_prompt = {system}\nnum_generations = 2\nquestions_per_step = 1\n'
        f'max_steps = 1\nredis = "{redis_server.url}"\ntrl = {{ disable_tqdm = true }}\n')

    warm = invoke("train", "warmup", str(tmp_path / "warmup.toml"))
    assert warm.stdout.strip().endswith(str(tmp_path / "warm" / "model"))
    invoke("train", "filter", str(tmp_path / "filter.yaml"))
    kept = [json.loads(line) for line in (tmp_path / "kept.jsonl").read_text().splitlines()]
    # the tiny expert knows 2 + 5 only: 1 + 1 is filtered out
    assert [(r["question"], r["teacher_pass_rate"]) for r in kept] == [(tiny.QUESTION, 1.0)]
    trained = invoke("train", "grpo", str(tmp_path / "grpo.toml"),
                     "--set", "learning_rate=1e-4").stdout.strip().splitlines()[-1]
    assert trained == str(tmp_path / "grpo" / "model")

    run = invoke("run", tiny.QUESTION, "--policy", "call-token", "--controller", trained,
                 "--expert", str(expert), "--dtype", "float32", "--redis", redis_server.url,
                 "--json")
    out = json.loads(run.stdout)
    assert out["policy"] == "call-token" and out["finish_reason"] in ("eos", "budget")
    assert sum(out["tokens_by_agent"].values()) > 0
    # teacher-free: calls are never honoured, the expert writes nothing
    free = json.loads(invoke("run", tiny.QUESTION, "--controller", trained, "--expert", str(expert),
                             "--dtype", "float32", "--redis", redis_server.url, "--json",
                             "--set", "max_calls=0").stdout)
    assert free["tokens_by_agent"].get("expert", 0) == 0 and free["call_ratio"] == 0.0


def test_bad_configs_are_one_line_errors(tmp_path: Path) -> None:
    bad = tmp_path / "grpo.toml"
    bad.write_text('controller = "a"\nexpert = "b"\ndata = "q.jsonl"\noutput_dir = "o"\n'
                   'num_generations = 1\n')
    result = runner.invoke(app, ["train", "grpo", str(bad)])
    assert result.exit_code == 2
    assert "num_generations" in result.output and len(result.output.strip().splitlines()) == 1
    result = runner.invoke(app, ["train", "filter", str(tmp_path / "missing.toml")])
    assert result.exit_code == 2 and "cannot read config" in result.output
    bad.write_text('expert = "b"\ndata = "q.jsonl"\noutput = "o.jsonl"\nk = 3\n')
    result = runner.invoke(app, ["train", "filter", str(bad), "--set", "k.deep=1"])
    assert result.exit_code == 2 and "k is not a table" in result.output
