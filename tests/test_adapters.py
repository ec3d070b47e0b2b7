"""LoRA adapters merged without peft (relaygraph.agents.lora) and catalog entries that are
a base model plus a shipped adapter (pulled = the base with the adapter merged in), on the
tiny controller; the real shipped adapter under -m slow."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from relaygraph.agents import catalog
from relaygraph.agents.lora import adapter_digest, merge_folder, merge_state
from relaygraph.errors import ConfigError, ModelNotFoundError


def _adapter(base: Path, out: Path, seed: int = 0, **lora) -> Path:
    """A peft LoRA adapter on ``base`` with random (non-zero) A and B, saved to ``out``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    options = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"} | lora
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **options))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    peft_model.save_pretrained(out)
    return out


def _peft_merged(base: Path, adapter: Path):
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()


@pytest.mark.parametrize("lora", [{}, {"use_rslora": True, "r": 2, "lora_alpha": 3},
                                  {"target_modules": ["q_proj", "v_proj"]}])
def test_merging_without_peft_equals_peft_merge(tiny_pair, tmp_path: Path, lora) -> None:
    controller, _ = tiny_pair
    adapter = _adapter(controller, tmp_path / "adapter", **lora)
    base = AutoModelForCausalLM.from_pretrained(controller, dtype=torch.float32)
    ours = merge_state(base.state_dict(), adapter)
    theirs = _peft_merged(controller, adapter).state_dict()
    changed = [k for k in theirs if not torch.equal(theirs[k], base.state_dict()[k])]
    assert changed, "the adapter should change some weights"
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, atol=1e-6, rtol=1e-5)


def test_a_merged_folder_is_a_plain_model_with_the_adapters_outputs(tiny_pair, tmp_path: Path) -> None:
    controller, _ = tiny_pair
    adapter = _adapter(controller, tmp_path / "adapter")
    merge_folder(controller, adapter, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    reference = _peft_merged(controller, adapter)
    ids = torch.tensor([[1, 5, 9, 12, 30]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, reference(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-4)
    assert (tmp_path / "merged" / "tokenizer_config.json").exists()


def test_adapters_that_cannot_be_merged_are_refused(tiny_pair, tmp_path: Path) -> None:
    controller, expert = tiny_pair
    adapter = _adapter(controller, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(controller, dtype=torch.float32).state_dict()
    for key, value in (("use_dora", True), ("rank_pattern", {"q_proj": 2}), ("peft_type", "IA3")):
        (adapter / "adapter_config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ConfigError, match="only plain LoRA"):
            merge_state(base, adapter)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    # a model the adapter was not trained on: a one-line error naming the weight
    state = {k: v[..., :-1] if k.endswith("q_proj.weight") else v for k, v in base.items()}
    with pytest.raises(ConfigError, match="does not fit this model: .*q_proj.weight"):
        merge_state(state, adapter)


@pytest.fixture
def relay_entry(tiny_pair, tmp_path: Path, monkeypatch):
    """A catalog with a pulled tiny base and an adapter entry on it (in a temporary cache)."""
    controller, _ = tiny_pair
    monkeypatch.setenv("RELAYGRAPH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(catalog, "ADAPTERS_DIR", tmp_path / "adapters")
    base = catalog.converted_dir("tiny-base")
    shutil.copytree(controller, base)
    (base / "relaygraph.json").write_text("{}")
    _adapter(controller, tmp_path / "adapters" / "tiny-relay")
    (tmp_path / "adapters" / "tiny-relay" / "training.json").write_text(
        json.dumps({"summary": "warm-up 3 steps, GRPO 2 steps"}))
    entry = catalog.AdapterModel(name="tiny-relay", base="tiny-base", adapter="tiny-relay",
                                 description="tiny base + adapter")
    spec = catalog.CatalogModel("tiny-base", (), "x.gguf", 0, "", "tiny base")
    monkeypatch.setitem(catalog.CATALOG, "tiny-base", spec)
    monkeypatch.setitem(catalog.CATALOG, "tiny-relay", entry)
    catalog._adapter_digest.cache_clear()
    yield entry
    catalog._adapter_digest.cache_clear()


def test_an_adapter_entry_pulls_as_the_merged_base(relay_entry, tiny_pair) -> None:
    controller, _ = tiny_pair
    base_marker = catalog.converted_dir("tiny-base") / "relaygraph.json"
    base_marker.unlink()  # the base not pulled: nothing to merge into
    with pytest.raises(ModelNotFoundError, match="relaygraph models pull tiny-relay"):
        catalog.resolve("tiny-relay")
    base_marker.write_text("{}")
    said: list[str] = []
    folder = catalog.pull("tiny-relay", progress=said.append)
    assert catalog.is_pulled("tiny-relay") and catalog.resolve("tiny-relay") == str(folder)
    assert any("merging the tiny-relay adapter into tiny-base" in line for line in said)
    assert not any("already pulled" in line for line in said)  # the base, pulled, goes unsaid
    marker = json.loads((folder / "relaygraph.json").read_text())
    assert marker["adapter_sha256"] == adapter_digest(relay_entry.folder)
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    expected = _peft_merged(controller, relay_entry.folder).state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, atol=1e-6, rtol=1e-5)
    assert relay_entry.training == "warm-up 3 steps, GRPO 2 steps"
    # pulling again is a no-op; a new adapter (a package upgrade) is merged again
    assert catalog.pull("tiny-relay", progress=said.append) == folder and "already pulled" in said[-1]
    _adapter(controller, relay_entry.folder, seed=1)
    catalog._adapter_digest.cache_clear()
    assert not catalog.is_pulled("tiny-relay")
    assert catalog.resolve("tiny-relay") == str(folder)  # the base is pulled: merged at first use
    assert catalog.is_pulled("tiny-relay")
    again = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    assert any(not torch.equal(again[k], merged[k]) for k in merged)


def test_the_shipped_relay_adapter_is_in_the_catalog() -> None:
    from typer.testing import CliRunner

    from relaygraph.cli import app

    spec = catalog.CATALOG[catalog.RELAY_CONTROLLER]
    assert isinstance(spec, catalog.AdapterModel) and spec.base == catalog.DEFAULT_CONTROLLER
    config = json.loads((spec.folder / "adapter_config.json").read_text())
    size = (spec.folder / "adapter_model.safetensors").stat().st_size
    assert config["peft_type"] == "LORA" and size < 12_000_000  # a few MB, shipped in the package
    card = json.loads((spec.folder / "training.json").read_text())
    assert {"summary", "warmup", "filter", "grpo"} <= set(card)
    listed = CliRunner().invoke(app, ["models", "list"])
    assert listed.exit_code == 0
    line = next(i for i, x in enumerate(listed.output.splitlines()) if x.startswith(catalog.RELAY_CONTROLLER))
    assert listed.output.splitlines()[line + 1].strip() == f"trained: {spec.training}"


def test_the_example_training_config_is_how_the_shipped_adapter_was_trained() -> None:
    """`relaygraph train pipeline examples/train/relay-qwen.toml` reproduces the shipped
    adapter: the warm-up settings on its card (placement, disagreement, head, data share)
    are the example's, outside the output paths."""
    from relaygraph.config import read_config_file
    from relaygraph.train.pipeline import PipelineSettings

    root = Path(__file__).resolve().parents[1]
    example = PipelineSettings.model_validate(read_config_file(root / "examples" / "train" / "relay-qwen.toml"))
    card = json.loads((catalog.CATALOG[catalog.RELAY_CONTROLLER].folder / "training.json").read_text())
    assert card["stages"] == ["warmup"] and example.stop_after == "warmup"
    ours = example.model_dump(mode="json")["warmup"]
    for key in ("model", "expert", "skip", "limit", "max_tokens", "temperature", "placement", "max_calls",
                "mask_called_tokens", "disagreement", "head", "system_prompt", "seed"):
        assert ours[key] == card["settings"]["warmup"][key], key


@pytest.mark.slow
def test_the_shipped_controller_calls_the_expert(redis_server) -> None:
    """The shipped controller by its catalog name (pulled = merged) writes `<call>n</call>` on
    a GSM8K test question under call-token, and the expert writes the tokens it asked for.
    (How often it calls over the test problems, and what that scores, is measured by the
    sweep in the README.)"""
    from typer.testing import CliRunner

    from relaygraph.cli import app

    question = ("Alex is getting ready to attend an event that she has hosted and wants to make "
                "sure that she has enough seats for everyone. She invites 100 people via email "
                "and each invited person says that they will also invite 2 of their friends. She "
                "then calls 10 of her friends to invite them too and 8 of them say they will be "
                "bringing their spouses. How many seats will Alex need?")
    result = CliRunner().invoke(app, ["run", question, "--json", "--redis", redis_server.url,
                                      "--max-tokens", "128", "--controller", catalog.RELAY_CONTROLLER])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["policy"] == "call-token"
    assert out["tokens_by_agent"]["controller"] > 0 and out["tokens_by_agent"].get("expert", 0) > 0, out
    calls = [s for s in out["segments"] if s["kind"] == "call"]
    assert calls and calls[0]["author"] == "controller" and out["handoffs"] >= 1
