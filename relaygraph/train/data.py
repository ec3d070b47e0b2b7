"""What the training stages share: question files, answer checks, model loading and saving.

A question file is JSONL, one object a line with ``question`` and ``answer`` (the gold
answer: a number, a string, or a GSM8K solution ending in ``#### N``); other fields are kept.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from relaygraph.errors import ConfigError
from relaygraph.eval.answers import gsm8k_gold

Dtype = Literal["float32", "bfloat16", "float16"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraSettings(Strict):
    """A LoRA adapter instead of full fine-tuning (merged into the saved model at the end)."""

    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"

    def peft_config(self) -> Any:
        try:
            from peft import LoraConfig
        except ImportError:
            raise ConfigError("LoRA needs peft: pip install 'relaygraph[train]'") from None
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.target_modules, task_type="CAUSAL_LM")


def read_questions(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a question file; a one-line ConfigError names the first bad line."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read questions {path}: {exc.strerror}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"{path}:{number}: not JSON ({exc})") from None
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) \
                or not row["question"].strip() or "answer" not in row:
            raise ConfigError(f"{path}:{number}: expected an object with a non-empty 'question' "
                              "and an 'answer'")
        row["answer"] = str(row["answer"])
        rows.append(row)
    if not rows:
        raise ConfigError(f"{path}: no questions")
    return rows


def select(rows: list[dict[str, Any]], skip: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
    """Rows ``skip .. skip + limit`` (a stage's share of a question file); a ConfigError
    when none are left."""
    chosen = rows[skip:None if limit is None else skip + limit]
    if not chosen:
        raise ConfigError(f"no questions left after skipping {skip} of {len(rows)}")
    return chosen


def is_correct(text: str, gold: str, complete: bool = True) -> bool:
    """Whether the reasoning ``text`` answers ``gold`` — graded exactly as evaluation grades
    (:func:`relaygraph.eval.checking.check_math`: math-verify on the last ``\\boxed{}``, else
    the last number of a complete text), so the training signal and the reported accuracy
    never disagree. ``gold`` may be a GSM8K solution ending in ``#### N``."""
    from relaygraph.eval.checking import check_math

    return check_math(text, gsm8k_gold(gold), complete).correct


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a JSONL progress file (a torn last line from a crash is skipped)."""
    if not path.exists():
        return
    for line in path.read_text().splitlines():
        try:
            yield json.loads(line)
        except ValueError:
            continue


def append_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def log_callback(path: Path) -> Any:
    """A transformers ``TrainerCallback`` that appends every log entry (with its step and
    the wall time) to the JSONL file ``path``: the stage's training log, kept across
    resumed runs (a step logged twice keeps its last entry: :func:`read_log`)."""
    import time

    from transformers import TrainerCallback

    class LogFile(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
            append_jsonl(path, [{"step": state.global_step, "time": round(time.time(), 1),
                                 **(logs or {})}])

    return LogFile()


def read_log(path: Path) -> list[dict[str, Any]]:
    """A stage's training log (:func:`log_callback`), one entry per step and kind, last
    entry wins."""
    entries: dict[tuple[int, bool], dict[str, Any]] = {}
    for row in read_jsonl(path):
        entries[row.get("step", 0), "train_runtime" in row] = row
    return [entries[k] for k in sorted(entries)]


def pick_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_causal_lm(model: str, dtype: Dtype, device: str) -> tuple[Any, Any]:
    """(model, tokenizer) for a catalog name, local folder or hub id, ready to train."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from relaygraph.agents.catalog import resolve

    location = resolve(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        lm = AutoModelForCausalLM.from_pretrained(location, dtype=getattr(torch, dtype))
    except OSError as exc:
        raise ConfigError(f"cannot load model {model!r}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return lm.to(pick_device(device)), tokenizer


def save_model(model: Any, tokenizer: Any, path: Path, adapter: Path | None = None) -> Path:
    """Save a plain transformers folder (a LoRA adapter is merged in) with the tokenizer and
    its chat template, so ``relaygraph run --controller PATH`` loads it as it is. With a
    LoRA adapter and ``adapter`` given, the adapter alone is saved there first (peft's
    format: ``adapter_config.json`` + ``adapter_model.safetensors``)."""
    try:
        from peft import PeftModel
    except ImportError:  # peft is optional
        PeftModel = ()
    if isinstance(model, PeftModel):
        if adapter is not None:
            model.save_pretrained(adapter, selected_adapters=["default"])
        model = model.merge_and_unload(adapter_names=["default"])
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)  # with its chat template: the relay renders prompts with it
    return path


def load_adapter(model: Any, adapter: Path) -> Any:
    """``model`` with the peft LoRA adapter in folder ``adapter`` applied, trainable."""
    try:
        from peft import PeftModel
    except ImportError:
        raise ConfigError("training an adapter needs peft: pip install 'relaygraph[train]'") from None
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"adapter {adapter}: no adapter_config.json (expected a folder saved "
                          "by a stage with [lora], e.g. the warm-up's adapter/)")
    return PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
