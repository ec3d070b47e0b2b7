"""LoRA adapters merged into base weights without peft: ``W' = W + scale * B @ A``.

An adapter is a folder in peft's format (``adapter_config.json`` and
``adapter_model.safetensors``, as ``PeftModel.save_pretrained`` writes it). Plain LoRA on
linear layers is supported (``scale = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with
``use_rslora``); anything else (DoRA, per-module ranks, extra trained modules) is refused
with a :class:`~relaygraph.errors.ConfigError` rather than merged wrongly.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from relaygraph.errors import ConfigError

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
TIED = {"lm_head.weight": "model.embed_tokens.weight"}
"""An output layer stored only as the input embeddings it is tied to: an adapter on it
unties it (the merged copy gets its own output weights)."""


def adapter_digest(folder: Path) -> str:
    """sha256 over the adapter's config and weights (what a merged copy was made from)."""
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()


def read_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"adapter {folder}: cannot read {CONFIG_FILE} ({exc})") from None
    flags = {"use_dora": bool(config.get("use_dora")),
             "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
             "rank_pattern": bool(config.get("rank_pattern")),
             "alpha_pattern": bool(config.get("alpha_pattern")),
             "modules_to_save": bool(config.get("modules_to_save")),
             "bias": config.get("bias", "none") != "none"}
    unsupported = [key for key, used in flags.items() if used]
    if config.get("peft_type", "LORA") != "LORA" or unsupported:
        raise ConfigError(f"adapter {folder}: only plain LoRA adapters can be merged "
                          f"(unsupported: {', '.join(unsupported) or config.get('peft_type')})")
    return config


def deltas(folder: Path) -> dict[str, Any]:
    """Base weight name -> the float32 update ``scale * B @ A`` the adapter adds to it."""
    import torch
    from safetensors.torch import load_file

    config = read_config(folder)
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    tensors = load_file(str(folder / WEIGHTS_FILE))
    out: dict[str, Any] = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            if ".lora_B." not in key:
                raise ConfigError(f"adapter {folder}: unexpected tensor {key!r} (not a LoRA A/B)")
            continue
        b = tensors.get(key.replace(".lora_A.", ".lora_B."))
        if b is None:
            raise ConfigError(f"adapter {folder}: {key!r} has no matching lora_B")
        module = key.split(".lora_A.")[0].removeprefix(PEFT_PREFIX)
        out[f"{module}.weight"] = scale * (b.to(torch.float32) @ a.to(torch.float32))
    if not out:
        raise ConfigError(f"adapter {folder}: no LoRA weights in {WEIGHTS_FILE}")
    return out


def merge_state(state: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``state`` (a model's weights by name) with the adapter merged in, each weight kept
    in its dtype; a ConfigError if the adapter names a weight the model lacks or has
    another shape."""
    merged = dict(state)
    for name, delta in deltas(folder).items():
        weight = state.get(name, state.get(TIED.get(name, "")))
        if weight is None or tuple(weight.shape) != tuple(delta.shape):
            found = "missing" if weight is None else f"shape {tuple(weight.shape)}"
            raise ConfigError(f"adapter {folder} does not fit this model: {name} is {found}, "
                              f"the adapter's update has shape {tuple(delta.shape)}")
        merged[name] = (weight.float() + delta).to(weight.dtype)
    return merged


def merge_folder(base: Path, folder: Path, out: Path) -> None:
    """Write ``out``: the model folder ``base`` (safetensors weights) with the adapter in
    ``folder`` merged into its weights; config and tokenizer files are copied as they are."""
    import shutil

    from safetensors.torch import load_file, save_file

    weights = sorted(base.glob("*.safetensors"))
    if not weights:
        raise ConfigError(f"model {base}: no safetensors weights to merge an adapter into")
    out.mkdir(parents=True, exist_ok=True)
    for item in base.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and item.name != "relaygraph.json":
            shutil.copy2(item, out / item.name)
    state: dict[str, Any] = {}
    owner: dict[str, str] = {}
    for file in weights:
        for name, tensor in load_file(str(file)).items():
            state[name] = tensor
            owner[name] = file.name
    merged = merge_state(state, folder)
    untied = [name for name in merged if name not in owner]
    for name in untied:  # saved beside the weights it was tied to
        owner[name] = owner[TIED[name]]
    for file in weights:
        part = {n: t.contiguous() for n, t in merged.items() if owner[n] == file.name}
        save_file(part, str(out / file.name), metadata={"format": "pt"})
    index = out / "model.safetensors.index.json"
    if untied and index.is_file():  # sharded: the index names the file of every weight
        listing = json.loads(index.read_text())
        listing.setdefault("weight_map", {}).update({name: owner[name] for name in untied})
        index.write_text(json.dumps(listing, indent=2) + "\n")
    if untied and (out / "config.json").is_file():
        config = json.loads((out / "config.json").read_text())
        config["tie_word_embeddings"] = False
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
