"""``relaygraph train pipeline CONFIG``: warm-up, teacher-pass filter and GRPO in one run.

One config file holds the three stages (``[warmup]``, ``[filter]``, ``[grpo]``, each the
stage's own settings) plus what they share, and wires their paths: the warm-up writes
``OUTPUT_DIR/warmup``, the filter ``OUTPUT_DIR/filtered.jsonl``, GRPO ``OUTPUT_DIR/grpo``
and trains the controller the warm-up made (the warm-up's LoRA adapter further, when the
warm-up trained one). Each stage resumes from its checkpoints and a finished stage is
skipped, so running the same command again continues an interrupted run. At the end
``OUTPUT_DIR/training.json`` sums the run up: the settings, the warm-up data, the filter's
pass rates and the per-step logs of both trainings (loss; reward, accuracy, call ratio).
``stop_after = "warmup"`` (or ``"filter"``) ends the run early; the card says which
stages ran.

```toml
output_dir = "runs/relay"
model = "qwen2.5-coder-0.5b"          # the small model (controller)
expert = "qwen2.5-coder-1.5b"
data = "gsm8k_train.jsonl"

[warmup]                               # relaygraph.train.warmup.WarmupSettings
limit = 192
placement = "disagreement"
[warmup.lora]
r = 8

[filter]                               # relaygraph.train.filtering.FilterSettings
skip = 192
limit = 128
k = 2

[grpo]                                 # relaygraph.train.grpo.GrpoSettings
num_generations = 4
questions_per_step = 4
max_steps = 16
```
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import model_validator

from relaygraph.train.data import Strict, read_jsonl, read_log
from relaygraph.train.filtering import FilterSettings
from relaygraph.train.grpo import GrpoSettings
from relaygraph.train.warmup import WarmupSettings

Progress = Callable[[str], None]


class PipelineSettings(Strict):
    """``relaygraph train pipeline`` configuration: the three stages, wired together."""

    output_dir: Path
    model: str
    """The small model the controller is trained from."""
    expert: str
    data: Path
    """Question file every stage reads (each picks its share with ``skip``/``limit``)."""
    warmup: WarmupSettings
    filter: FilterSettings
    grpo: GrpoSettings
    stop_after: Literal["warmup", "filter", "grpo"] = "grpo"
    """The last stage to run (``warmup``: ship the warm-up's controller when GRPO does not
    fit the time budget; the training card says which stages ran)."""

    def runs(self, stage: str) -> bool:
        order = ("warmup", "filter", "grpo")
        return order.index(stage) <= order.index(self.stop_after)

    @model_validator(mode="before")
    @classmethod
    def _wire(cls, data: Any) -> Any:
        """Fill each stage's paths and models from the shared fields (a stage's own value
        wins)."""
        if not isinstance(data, dict) or "output_dir" not in data:
            return data
        out = Path(data["output_dir"])
        shared = {k: data[k] for k in ("data",) if k in data}
        warmup = dict(data.get("warmup") or {})
        warmup = {"output_dir": out / "warmup", "model": data.get("model"),
                  **({"expert": data["expert"]} if "expert" in data else {}), **shared, **warmup}
        filter_ = {"output": out / "filtered.jsonl", "expert": data.get("expert"), **shared,
                   **dict(data.get("filter") or {})}
        warm_out = Path(warmup["output_dir"])
        start = ({"controller": data.get("model"), "adapter": warm_out / "adapter"}
                 if warmup.get("lora") else {"controller": str(warm_out / "model")})
        grpo = {"output_dir": out / "grpo", "expert": data.get("expert"),
                "data": filter_["output"], **start, **dict(data.get("grpo") or {})}
        return {**data, "warmup": warmup, "filter": filter_, "grpo": grpo}


def run_pipeline(settings: PipelineSettings, progress: Progress = print) -> Path:
    """Run (or continue) the stages up to ``stop_after``; returns the last trained model
    folder (GRPO's, or the warm-up's). The trained LoRA adapter, when there is one, is
    exported with its training card to ``OUTPUT_DIR/adapter``."""
    from relaygraph.train.filtering import run_filter
    from relaygraph.train.grpo import run_grpo
    from relaygraph.train.warmup import run_warmup

    settings.output_dir.mkdir(parents=True, exist_ok=True)
    (settings.output_dir / "pipeline.json").write_text(
        settings.model_dump_json(indent=1) + "\n")
    count = ("warmup", "filter", "grpo").index(settings.stop_after) + 1
    progress(f"stage 1/{count}: warm-up")
    final = run_warmup(settings.warmup, progress)
    trained = settings.warmup.output_dir / "adapter"
    if settings.runs("filter"):
        progress(f"stage 2/{count}: teacher-pass filter")
        run_filter(settings.filter, progress)
    if settings.runs("grpo"):
        progress(f"stage 3/{count}: GRPO")
        final = run_grpo(settings.grpo, progress)
        trained = settings.grpo.output_dir / "adapter"
    summary = summarize(settings)
    (settings.output_dir / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    plotted = plot_training(summary, settings.output_dir / "training.png")
    progress(f"summary in {settings.output_dir / 'training.json'}"
             + (" and training.png" if plotted else ""))
    if (trained / "adapter_config.json").is_file():
        export_adapter(trained, settings.output_dir / "adapter", summary)
        progress(f"adapter to ship (bfloat16, with its training card): {settings.output_dir / 'adapter'}")
    return final


def plot_training(summary: dict[str, Any], path: Path) -> bool:
    """The per-step curves: warm-up loss; GRPO reward, accuracy and call ratio. False when
    matplotlib is missing (``pip install "relaygraph[eval]"``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (warm, grpo) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    losses = [(e["step"], e["loss"]) for e in summary["warmup"]["log"] if e.get("loss") is not None]
    if losses:
        warm.plot(*zip(*losses, strict=True), marker=".", color="tab:blue")
    calls = [(e["step"], e["val_call_share"]) for e in summary["warmup"]["log"]
             if e.get("val_call_share") is not None]
    if calls:  # the head-only warm-up reports how often it would call on held-out responses
        warm.plot(*zip(*calls, strict=True), marker=".", color="tab:red",
                  label="held-out responses that call")
        warm.legend(fontsize=8)
    head = summary["settings"]["warmup"].get("head")
    warm.set(title="warm-up (command head)" if head else "warm-up SFT", xlabel="optimizer step",
             ylabel="loss")
    log = summary["grpo"]["log"]
    for key, colour in (("reward", "tab:green"), ("accuracy", "tab:blue"),
                        ("call_ratio", "tab:red")):
        points = [(e["step"], e[key]) for e in log if e.get(key) is not None]
        if points:
            grpo.plot(*zip(*points, strict=True), marker="o", color=colour, label=key)
    grpo.set(title="GRPO (means over the step's rollouts)" if log else "GRPO: not run",
             xlabel="optimizer step")
    if log:
        grpo.legend(fontsize=8)
    for ax in (warm, grpo):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def export_adapter(source: Path, target: Path, card: dict[str, Any]) -> Path:
    """The trained adapter as shipped in a package: its weights in bfloat16 (half the size;
    merged into bfloat16 weights anyway), its config, and ``training.json`` (``card``)."""
    import torch
    from safetensors.torch import load_file, save_file

    from relaygraph.agents.lora import CONFIG_FILE, WEIGHTS_FILE

    target.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(source / WEIGHTS_FILE))
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()},
              str(target / WEIGHTS_FILE), metadata={"format": "pt"})
    (target / CONFIG_FILE).write_text((source / CONFIG_FILE).read_text())
    (target / "training.json").write_text(json.dumps(card, indent=1) + "\n")
    return target


def summarize(settings: PipelineSettings) -> dict[str, Any]:
    """The run in numbers: settings, warm-up data, filter pass rates, per-step logs."""
    warm_rows = list(read_jsonl(settings.warmup.output_dir / "warmup.jsonl"))
    graded = [r for r in warm_rows if "correct" in r]
    progress_log = settings.filter.output.with_name(settings.filter.output.name + ".progress.jsonl")
    rates = [r["solved"] / r["k"] for r in read_jsonl(progress_log)]
    kept = list(read_jsonl(settings.filter.output))
    grpo_log = read_log(settings.grpo.output_dir / "log.jsonl")
    steps = [e for e in grpo_log if "reward" in e]
    warm, grpo = settings.warmup, settings.grpo
    warm_log = read_log(settings.warmup.output_dir / "log.jsonl")
    sft_steps = max((e["step"] for e in warm_log if "loss" in e), default=0)
    lora = warm.lora or grpo.lora
    trained = (f"head-only warm-up ({sft_steps} full-batch steps on the output rows of the "
               "command tokens, over the hidden states of" if warm.head else
               f"{warm.placement}-placement warm-up: {sft_steps} SFT steps on")
    summary = (
        f"{trained} {len(warm_rows)} of the base model's own "
        f"responses to {warm.data.name} questions with <call>n</call> inserted "
        f"({sum(len(r['calls']) for r in warm_rows)} commands"
        + (f", at {warm.expert}'s disagreements in responses graded wrong" if graded else "")
        + "); teacher-pass filter: "
        + (f"{len(kept)} of {len(rates)} questions kept ({settings.filter.k} samples of "
           f"{settings.filter.expert})" if settings.runs("filter") else "not run")
        + "; GRPO: "
        + (f"{len(steps)} steps x {grpo.questions_per_step} questions x "
           f"{grpo.num_generations} relay rollouts with {grpo.expert} (difficulty-aware "
           "reward, the expert's tokens masked from the loss)" if settings.runs("grpo")
           else "not run")
        + (f"; LoRA r={lora.r}" if lora else ""))
    keys = {"reward": "reward", "accuracy": "rewards/accuracy/mean",
            "call_ratio": "rewards/call_ratio/mean", "reward_std": "reward_std",
            "completion_length": "completions/mean_length", "step_seconds": "step_time"}
    return {
        "summary": summary,
        "stages": [s for s in ("warmup", "filter", "grpo") if settings.runs(s)],
        "settings": json.loads(settings.model_dump_json()),
        "warmup": {
            "responses": len(warm_rows),
            "with_commands": sum(bool(r["calls"]) for r in warm_rows),
            "commands": sum(len(r["calls"]) for r in warm_rows),
            "graded_correct": sum(bool(r["correct"]) for r in graded) if graded else None,
            "log": [{k: v for k, v in e.items() if k != "time"} for e in warm_log if "loss" in e],
        },
        "filter": {"scored": len(rates), "kept": len(kept), "k": settings.filter.k,
                   "pass_rate_histogram": {f"{x:g}": sum(r == x for r in rates)
                                           for x in sorted(set(rates))}},
        "grpo": {"log": [{"step": e["step"], **{k: e.get(v) for k, v in keys.items()}}
                         for e in steps]},
    }
