"""``relaygraph train warmup | filter | grpo | pipeline CONFIG``: the training stages.

Each stage reads a config file (.toml, .yaml or .json; ``--set KEY=VALUE`` overrides a
field, dotted for nested ones such as ``sft.learning_rate=1e-5``), keeps checkpoints in its
output folder and resumes from them when run again. Nothing heavy is imported until a
stage runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from relaygraph.cli.common import friendly, parse_set_options, say

app = typer.Typer(no_args_is_help=True,
                  help="Train the learned call token (RelayLLM): warmup, filter, grpo, or all three.")

ConfigArg = Annotated[Path, typer.Argument(help="Stage config (.toml, .yaml, .json).")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="Override a config field as KEY=VALUE, dotted for nested fields (repeatable).")]


def load_settings(model: type, config: Path, sets: list[str] | None) -> Any:
    """``model`` validated from the config file with ``--set`` overrides applied."""
    import importlib.util

    from relaygraph.config import read_config_file, validate
    from relaygraph.errors import ConfigError

    if missing := [m for m in ("trl", "datasets") if importlib.util.find_spec(m) is None]:
        raise ConfigError(f"training needs {', '.join(missing)}: pip install 'relaygraph[train]'")
    data = read_config_file(config)
    if not isinstance(data, dict):
        raise ConfigError(f"config {config}: expected a table of settings at the top level")
    for dotted, value in parse_set_options(sets or []).items():
        *parents, key = dotted.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {dotted}: {part} is not a table")
        node[key] = value
    return validate(model, data, str(config))


@app.command()
@friendly
def warmup(config: ConfigArg, set_: SetOpt = None) -> None:
    """Own responses + <call>n</call> at random token positions, SFT -> OUTPUT_DIR/model."""
    from relaygraph.train.warmup import WarmupSettings, run_warmup

    print(run_warmup(load_settings(WarmupSettings, config, set_), progress=say))


@app.command("filter")
@friendly
def filter_(config: ConfigArg, set_: SetOpt = None) -> None:
    """Keep the questions the expert solves in >= min_pass_rate of k samples -> OUTPUT."""
    from relaygraph.train.filtering import FilterSettings, run_filter

    print(run_filter(load_settings(FilterSettings, config, set_), progress=say))


@app.command()
@friendly
def grpo(config: ConfigArg, set_: SetOpt = None) -> None:
    """GRPO on relay rollouts (expert tokens masked), RelayLLM's reward -> OUTPUT_DIR/model."""
    from relaygraph.train.grpo import GrpoSettings, run_grpo

    print(run_grpo(load_settings(GrpoSettings, config, set_), progress=say))


@app.command()
@friendly
def pipeline(config: ConfigArg, set_: SetOpt = None) -> None:
    """warmup -> filter -> grpo from one config, each stage resumed or skipped when done."""
    from relaygraph.train.pipeline import PipelineSettings, run_pipeline

    print(run_pipeline(load_settings(PipelineSettings, config, set_), progress=say))
