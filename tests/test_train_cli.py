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


def test_the_pipeline_runs_the_three_stages_on_one_adapter_and_resumes(tiny_pair, redis_server,
                                                                      tmp_path: Path) -> None:
    """``relaygraph train pipeline``: warm-up (LoRA, disagreement placement) -> filter ->
    GRPO training the warm-up's adapter further -> one adapter to ship, with its card; run
    again, finished stages are skipped."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from relaygraph.agents.lora import merge_folder

    controller, expert = tiny_pair
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": tiny.QUESTION, "answer": "7"}) + "\n"
                    + json.dumps({"question": tiny.NOCALL_QUESTION, "answer": "2"}) + "\n")
    system = json.dumps(tiny.SYSTEM_PROMPT)
    out = tmp_path / "run"
    (tmp_path / "pipeline.toml").write_text(
        f'output_dir = "{out}"\nmodel = "{controller}"\nexpert = "{expert}"\ndata = "{data}"\n'
        f'[warmup]\nsystem_prompt = {system}\nexpert_system_prompt = {system}\nmax_tokens = 40\n'
        'temperature = 0.0\nplacement = "disagreement"\nmax_calls = 1\ndevice = "cpu"\n'
        'dtype = "float32"\n[warmup.sft]\nlearning_rate = 1e-3\nmax_steps = 2\nbatch_size = 2\n'
        'logging_steps = 1\n'
        'gradient_accumulation_steps = 1\ntrl = { disable_tqdm = true }\n'
        '[warmup.lora]\nr = 2\nalpha = 4\n'
        f'[filter]\nk = 2\ntemperature = 0.0\ndtype = "float32"\nsystem_prompt = {system}\n'
        'device = "cpu"\nmax_tokens = 40\n'
        f'[grpo]\nsystem_prompt = {system}\nexpert_system_prompt = {system}\nmax_tokens = 40\n'
        'num_generations = 2\nquestions_per_step = 1\nmax_steps = 1\nlearning_rate = 1e-2\n'
        f'device = "cpu"\nredis = "{redis_server.url}"\ntrl = {{ disable_tqdm = true }}\n')

    result = invoke("train", "pipeline", str(tmp_path / "pipeline.toml"))
    assert result.stdout.strip().endswith(str(out / "grpo" / "model"))
    warm = json.loads((out / "warmup" / "adapter" / "adapter_config.json").read_text())
    trained = json.loads((out / "grpo" / "adapter" / "adapter_config.json").read_text())
    assert warm["r"] == trained["r"] == 2  # GRPO trained the warm-up's adapter, not a new one
    before = load_file(out / "warmup" / "adapter" / "adapter_model.safetensors")
    after = load_file(out / "grpo" / "adapter" / "adapter_model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)

    card = json.loads((out / "training.json").read_text())
    assert [e["step"] for e in card["grpo"]["log"]] == [1]
    assert {"reward", "accuracy", "call_ratio"} <= set(card["grpo"]["log"][0])
    assert card["warmup"]["log"] and card["filter"]["scored"] == 2 and card["filter"]["kept"] == 1
    assert "disagreement-placement warm-up" in card["summary"] and "LoRA r=2" in card["summary"]
    shipped = out / "adapter"
    assert json.loads((shipped / "training.json").read_text()) == card
    assert {t.dtype for t in load_file(shipped / "adapter_model.safetensors").values()} == {torch.bfloat16}
    # the shipped adapter merged into the base (no peft) is the trained controller
    merge_folder(controller, shipped, tmp_path / "merged")
    ids = torch.tensor([[3, 7, 11, 19]])
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(input_ids=ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(out / "grpo" / "model")(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=2e-2, rtol=2e-2)

    again = invoke("train", "pipeline", str(tmp_path / "pipeline.toml"))
    assert "warm-up already finished" in again.output and "GRPO already finished" in again.output


def test_the_pipeline_can_stop_after_the_warmup_and_ships_its_adapter(tiny_pair, tmp_path: Path) -> None:
    """``stop_after = "warmup"``: no filter, no GRPO; the warm-up's adapter is exported with a
    card that says the later stages did not run."""
    import torch
    from safetensors.torch import load_file

    controller, expert = tiny_pair
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": tiny.QUESTION, "answer": "7"}) + "\n")
    system = json.dumps(tiny.SYSTEM_PROMPT)
    out = tmp_path / "run"
    (tmp_path / "pipeline.toml").write_text(
        f'output_dir = "{out}"\nmodel = "{controller}"\nexpert = "{expert}"\ndata = "{data}"\n'
        'stop_after = "warmup"\n'
        f'[warmup]\nsystem_prompt = {system}\nmax_tokens = 40\ntemperature = 0.0\n'
        'device = "cpu"\ndtype = "float32"\n[warmup.sft]\nlearning_rate = 1e-3\nmax_steps = 1\n'
        'batch_size = 1\nlogging_steps = 1\ntrl = { disable_tqdm = true }\n'
        '[warmup.lora]\nr = 2\nalpha = 4\n[filter]\n[grpo]\n')
    result = invoke("train", "pipeline", str(tmp_path / "pipeline.toml"))
    assert result.stdout.strip().endswith(str(out / "warmup" / "model"))
    assert "stage 1/1: warm-up" in result.output and "GRPO" not in result.output
    assert not (out / "filtered.jsonl").exists() and not (out / "grpo").exists()
    card = json.loads((out / "training.json").read_text())
    assert card["stages"] == ["warmup"] and card["grpo"]["log"] == []
    assert "teacher-pass filter: not run; GRPO: not run; LoRA r=2" in card["summary"]
    assert "warm-up: 1 SFT steps on " in card["summary"]
    warm = load_file(out / "warmup" / "adapter" / "adapter_model.safetensors")
    shipped = load_file(out / "adapter" / "adapter_model.safetensors")
    assert warm.keys() == shipped.keys()
    for key, value in warm.items():
        torch.testing.assert_close(shipped[key].float(), value.float(), atol=1e-2, rtol=1e-2)
