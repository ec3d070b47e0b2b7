"""``relaygraph eval``: policy sweeps, the reasoning-relay experiment, the twin tests.

Every command writes ``results.json`` and ``table.md`` to ``--out`` (sweeps also
``curve.png``), prints the table, and is resumable: rerunning the same command reuses
every finished item (``--out`` keeps them; with ``--shared NAME`` they live in Redis and
several processes or machines split the work).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.markdown import Markdown

from relaygraph.agents.catalog import DEFAULT_CONTROLLER as SMALL
from relaygraph.agents.catalog import DEFAULT_EXPERT as LARGE
from relaygraph.cli.common import (
    Namespace,
    Redis,
    Ttl,
    console,
    ensure_pulled,
    err,
    floats,
    friendly,
    say,
)
from relaygraph.errors import ConfigError

app = typer.Typer(no_args_is_help=True, help="Evaluate policies and model pairs on a dataset.")
F = TypeVar("F", bound=Callable[..., Any])

Dataset = Annotated[str, typer.Argument(help="JSONL/JSON/CSV file (question + answer; GSM8K '#### N' answers work), reasoning-gym:TASK, or hf:NAME[:CONFIG][@SPLIT].")]
Limit = Annotated[int | None, typer.Option(min=1, help="Use this many problems (default: all).")]
Seed = Annotated[int | None, typer.Option(help="Pick the --limit problems with this seed (default: the first ones).")]
MaxTokens = Annotated[int, typer.Option(min=1, help="Budget of generated tokens per run.")]
Out = Annotated[Path | None, typer.Option(help="Output folder: results.json, table.md (and curve.png), items.jsonl for resuming (default: eval-COMMAND in the per-user results folder, ~/.local/share/relaygraph/results).")]
Concurrency = Annotated[int, typer.Option(min=1, help="Problems run at once (threads; one model batches concurrent requests).")]
Shared = Annotated[str | None, typer.Option(help="Split this experiment with other workers: results and claims live in Redis under this name.")]
Lease = Annotated[float, typer.Option(min=1, help="--shared: seconds before a crashed worker's claimed item is taken over.")]
Dtype = Annotated[str, typer.Option(help="bfloat16 | float16 | float32")]
QField = Annotated[str | None, typer.Option(help="Dataset field holding the question (default: found by name).")]
AField = Annotated[str | None, typer.Option(help="Dataset field holding the answer (default: found by name).")]


def _out(out: Path | None, command: str) -> Path:
    """``--out``, else ``eval-COMMAND`` in the per-user results folder (never the folder
    the command runs in)."""
    from relaygraph.dirs import results_dir

    return out if out is not None else results_dir() / f"eval-{command}"


def _cuts(text: str, what: str) -> list[float]:
    return [] if text.strip().lower() == "none" else floats(text, what) or []


def _command(func: F) -> F:
    """A subcommand with the CLI's one-line errors."""
    return app.command()(friendly(func))


@contextmanager
def _session(out: Path, redis: str | None, shared: str | None, lease: float,
             models: list[str], namespace: str | None = None,
             ttl: str | None = None) -> Iterator[tuple[Any, Any, Any]]:
    """(store, results, pool) for one experiment; Ctrl-C keeps what finished."""
    from relaygraph.cli.common import open_cli_store, quiet_loading
    from relaygraph.eval.models import ModelPool
    from relaygraph.eval.runner import FileResults, RedisResults

    store = open_cli_store(redis, namespace, ttl)
    results = (RedisResults(store.client, shared, lease, namespace=f"{store.namespace}:eval")
               if shared else FileResults(out))
    ensure_pulled(*models)
    pool = ModelPool(say=lambda line: say(f"{line}…"))
    try:
        with quiet_loading():  # models load in the workers; the pool says which
            yield store, results, pool
    except KeyboardInterrupt as exc:
        pool.flag.cancel("interrupted")
        where = f"Redis ({shared})" if shared else str(out)
        err.print(f"interrupted: finished items are kept in {where}; rerun the same command "
                  "to continue")
        if complete := getattr(exc, "complete", 0):
            err.print(f"the first {complete} problem(s) are done for every policy: the same "
                      f"command with --limit {complete} reports them without running anything")
        raise typer.Exit(130) from None
    finally:
        results.close()


def _progress(quiet: bool) -> Any:
    from relaygraph.eval.runner import Progress

    return Progress(None if quiet else err)


def _show(markdown: str, out: Path, extra: str = "") -> None:
    out_console = console()
    if out_console.is_terminal:
        out_console.print(Markdown(markdown))
    else:  # piped: the Markdown itself
        print(markdown)
    err.print(f"results in {out}/ (results.json, table.md{extra})")


def _report(result: dict[str, Any], dataset: str, out: Path,
            markdown_of: Callable[[dict[str, Any]], str]) -> None:
    """Write an experiment's results.json and table.md to ``out`` and show the table."""
    from relaygraph.eval.report import write_outputs

    result["dataset"] = dataset
    markdown = markdown_of(result)
    write_outputs(result, out, markdown)
    _show(markdown, out)


@_command
def sweep(
    dataset: Annotated[str | None, typer.Argument(help="Dataset (see `eval relay --help`); may come from --config instead.")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Sweep config (.toml, .yaml, .json); options below override it.")] = None,
    small: Annotated[str | None, typer.Option(help=f"Small model (default {SMALL}).")] = None,
    large: Annotated[str | None, typer.Option(help=f"Large model (default {LARGE}).")] = None,
    policies: Annotated[str | None, typer.Option(help="Policy types to run besides the solo runs, comma-separated: any registered policy type ('none': only solo runs and derived routers). Default: confidence, fixed-interval, prompted-call, call-token, supervisor.")] = None,
    thresholds: Annotated[str | None, typer.Option(help="confidence thresholds, comma-separated (default -1.5,-1.0,-0.5).")] = None,
    p: Annotated[str | None, typer.Option("--p", help="random-router p values, comma-separated (default 0.1,0.25,0.5,0.75,0.9).")] = None,
    limit: Limit = None, seed: Seed = None,
    max_tokens: Annotated[int | None, typer.Option(min=1, help="Budget of generated tokens per run (default 256).")] = None,
    out: Out = None, concurrency: Concurrency = 1,
    redis: Redis = None, namespace: Namespace = None, ttl: Ttl = None, shared: Shared = None, lease: Lease = 1800.0,
    dtype: Annotated[str | None, typer.Option(help="bfloat16 | float16 | float32 for both models.")] = None,
    samples: Annotated[int | None, typer.Option(min=1, help="Runs per problem: 1 is greedy pass@1 (default); k > 1 samples every agent (seeds 0..k-1) and reports avg@k.")] = None,
    temperature: Annotated[float | None, typer.Option(min=0.0, help="Sampling temperature when --samples > 1 (default 0.6).")] = None,
    question_field: QField = None, answer_field: AField = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Policies x problems: accuracy, call ratio, tokens, time; the cost curve with AUC and APGR."""
    out = _out(out, "sweep")
    from relaygraph.config import validate
    from relaygraph.eval.report import write_sweep
    from relaygraph.eval.sweep import DEFAULT_POLICIES, SweepConfig, plan, run_sweep
    from relaygraph.policies.registry import policy_types

    overrides = {"dataset": dataset, "limit": limit, "seed": seed, "max_tokens": max_tokens,
                 "question_field": question_field, "answer_field": answer_field,
                 "random_router_p": floats(p, "--p"), "samples": samples,
                 "temperature": temperature}
    if config is not None:
        cfg = SweepConfig.load(config, **overrides)
    elif dataset is None:
        raise ConfigError("give a dataset (e.g. /path/gsm8k_test.jsonl) or --config FILE")
    else:
        cfg = validate(SweepConfig, {k: v for k, v in overrides.items() if v is not None}, "options")
    data = cfg.model_dump(mode="json", exclude_unset=True)  # unset fields keep their defaults
    data["agents"] = {n: a.model_dump(mode="json", exclude_unset=True)
                      for n, a in cfg.agents.items()}
    data["policies"] = [dict(e) for e in cfg.policies]
    for role, model in ((cfg.small, small), (cfg.large, large)):
        if model:
            data["agents"][role]["model"] = model
    if dtype:
        for agent in data["agents"].values():
            if agent.get("backend", "transformers") in ("transformers", "vllm"):
                agent["dtype"] = dtype
    if policies is not None:
        wanted = [x.strip() for x in policies.split(",") if x.strip() and x.strip() != "none"]
        known = policy_types()
        if unknown := [w for w in wanted if w not in known]:
            raise ConfigError(f"--policies: unknown {unknown}; choose from {', '.join(known)}")
        source = data["policies"] if config is not None else DEFAULT_POLICIES
        chosen = [e for e in source if e.get("type") in wanted]
        data["policies"] = chosen + [{"type": w} for w in wanted
                                     if w not in {e.get("type") for e in chosen}]
    if thresholds is not None:
        values = floats(thresholds, "--thresholds")
        for entry in data["policies"]:
            if entry.get("type") == "confidence":
                entry.pop("threshold", None)
                entry["vary"] = {**entry.get("vary", {}), "threshold": values}
    cfg = validate(SweepConfig, data, str(config or "options"))
    plan(cfg)  # a bad policy fails here, before any model is pulled or loaded
    models = [a.local_model for a in cfg.agents.values() if a.local_model]
    with _session(out, redis, shared, lease, models, namespace, ttl) as (store, results, pool):
        result = run_sweep(cfg, store, results, concurrency, pool, _progress(quiet), pool.flag)
    markdown = write_sweep(result, out)
    _show(markdown, out, ", curve.png")


@_command
def relay(
    dataset: Dataset,
    models: Annotated[str, typer.Option(help="Models taking part, comma-separated; every ordered pair is an (initiator, continuer).")] = f"{SMALL},{LARGE}",
    budgets: Annotated[str, typer.Option(help="Surprisal budgets in nats: cut where the chain's accumulated surprisal first exceeds one (lower cuts earlier; the article's rule). 'none' for no such cuts.")] = "5,15,40",
    thresholds: Annotated[str, typer.Option(help="Per-token log-prob thresholds: cut before the first token below one (closer to 0 cuts earlier). 'none' for no such cuts.")] = "-0.5,-1.5,-3",
    fractions: Annotated[str, typer.Option(help="Cuts at these shares of the initiator's chain, for comparison.")] = "0.2,0.4,0.6,0.8",
    warmup: Annotated[int, typer.Option(min=0, help="Tokens before threshold cuts are allowed.")] = 0,
    self_pairs: Annotated[bool, typer.Option(help="Also let a model continue its own chain.")] = False,
    prm: Annotated[str | None, typer.Option(help="Model used as a step judge (process reward model) to score every chain's steps.")] = None,
    limit: Limit = None, seed: Seed = None, max_tokens: MaxTokens = 256,
    out: Out = None, concurrency: Concurrency = 1,
    redis: Redis = None, namespace: Namespace = None, ttl: Ttl = None, shared: Shared = None, lease: Lease = 1800.0, dtype: Dtype = "bfloat16",
    question_field: QField = None, answer_field: AField = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Reasoning relay: cut each model's solution (log-prob threshold, fraction), another finishes it."""
    out = _out(out, "relay")
    from relaygraph.eval.datasets import load_problems
    from relaygraph.eval.models import agent_config, label
    from relaygraph.eval.relay_experiment import JudgePRM, relay_markdown, run_relay_experiment

    names = [m.strip() for m in models.split(",") if m.strip()]
    configs = {label(m): agent_config(m, dtype) for m in names}
    if len(configs) != len(names) or len(configs) < (1 if self_pairs else 2):
        raise ConfigError("--models needs two or more distinct models (or one with --self-pairs)")
    problems = load_problems(dataset, limit, seed, question_field, answer_field)
    with _session(out, redis, shared, lease, names + ([prm] if prm else []), namespace, ttl) as (store, results, pool):
        judge = JudgePRM(pool.backend_for(prm, dtype)) if prm else None
        result = run_relay_experiment(
            configs, problems, store, results, pool, max_tokens,
            _cuts(thresholds, "--thresholds"), _cuts(fractions, "--fractions"), warmup,
            _cuts(budgets, "--budgets"), self_pairs, judge, concurrency, _progress(quiet),
            pool.flag)
    _report(result, dataset, out, relay_markdown)


@_command
def recoverability(
    dataset: Dataset,
    model: Annotated[str, typer.Option(help="The model tested.")] = SMALL,
    positions: Annotated[str, typer.Option(help="Insertion points m as shares of the model's own trajectory (snapped to sentence ends).")] = "0,0.2,0.4,0.6,0.8",
    steer_fraction: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of the other problem's trajectory inserted.")] = 0.2,
    restatement: Annotated[bool, typer.Option(help="Also run the variant that keeps the initial restatement before the distractor.")] = True,
    distractor_seed: Annotated[int, typer.Option(help="Seed picking each problem's distractor problem.")] = 0,
    limit: Limit = None, seed: Seed = None, max_tokens: MaxTokens = 256,
    out: Out = None, concurrency: Concurrency = 1,
    redis: Redis = None, namespace: Namespace = None, ttl: Ttl = None, shared: Shared = None, lease: Lease = 1800.0, dtype: Dtype = "bfloat16",
    question_field: QField = None, answer_field: AField = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Twin test: does the model recover from its own reasoning on another problem inserted?"""
    out = _out(out, "recoverability")
    from relaygraph.eval.datasets import load_problems
    from relaygraph.eval.models import agent_config
    from relaygraph.eval.twins import recoverability_markdown, run_recoverability

    problems = load_problems(dataset, limit, seed, question_field, answer_field)
    with _session(out, redis, shared, lease, [model], namespace, ttl) as (store, results, pool):
        result = run_recoverability(
            agent_config(model, dtype), problems, store, results, pool, max_tokens,
            floats(positions, "--positions") or [], steer_fraction, restatement, distractor_seed,
            concurrency, _progress(quiet), pool.flag)
    _report(result, dataset, out, recoverability_markdown)


@_command
def guidability(
    dataset: Dataset,
    model: Annotated[str, typer.Option(help="The model tested.")] = SMALL,
    steer_model: Annotated[str, typer.Option(help="The stronger model whose correct trajectory steers.")] = LARGE,
    samples: Annotated[int, typer.Option(min=1, help="Samples of the model per problem (k).")] = 8,
    temperature: Annotated[float, typer.Option(min=0.0, help="Sampling temperature for the k samples.")] = 0.7,
    max_solved: Annotated[int, typer.Option(min=0, help="A problem qualifies if at most this many of the k samples are right.")] = 1,
    fractions: Annotated[str, typer.Option(help="Shares of the steer trajectory given (m = 0).")] = "0.2,0.4,0.6,0.8",
    limit: Limit = None, seed: Seed = None, max_tokens: MaxTokens = 256,
    out: Out = None, concurrency: Concurrency = 1,
    redis: Redis = None, namespace: Namespace = None, ttl: Ttl = None, shared: Shared = None, lease: Lease = 1800.0, dtype: Dtype = "bfloat16",
    question_field: QField = None, answer_field: AField = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Twin test: does a stronger model's partial solution help where the model fails alone?"""
    out = _out(out, "guidability")
    from relaygraph.eval.datasets import load_problems
    from relaygraph.eval.models import agent_config
    from relaygraph.eval.twins import guidability_markdown, run_guidability

    problems = load_problems(dataset, limit, seed, question_field, answer_field)
    with _session(out, redis, shared, lease, [model, steer_model], namespace, ttl) as (store, results, pool):
        result = run_guidability(
            agent_config(model, dtype), agent_config(steer_model, dtype), problems, store, results,
            pool, max_tokens, samples, temperature, max_solved, floats(fractions, "--fractions") or [],
            concurrency, _progress(quiet), pool.flag)
    _report(result, dataset, out, guidability_markdown)

