"""``relaygraph bench``: what relaying costs on a model pair."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from relaygraph.agents.catalog import DEFAULT_CONTROLLER, DEFAULT_EXPERT
from relaygraph.cli.common import ensure_pulled, err, friendly
from relaygraph.errors import ConfigError


@friendly
def bench(
    controller: Annotated[str, typer.Option(help="Small model (catalog name, folder, .gguf or hub id).")] = DEFAULT_CONTROLLER,
    expert: Annotated[str, typer.Option(help="Large model.")] = DEFAULT_EXPERT,
    dtype: Annotated[str, typer.Option(help="bfloat16 | float16 | float32.")] = "bfloat16",
    device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N.")] = "cpu",
    random_weights: Annotated[bool, typer.Option("--random-weights", help="Build both architectures from their configs with random weights (only config and tokenizer files are needed; timings only — the text is noise).")] = False,
    tokens: Annotated[int, typer.Option(min=16, help="Tokens of the measured relay.")] = 256,
    interval: Annotated[str, typer.Option(help="Tokens per turn, comma-separated: the first is the stress rate (amplification, handoff overhead, throughput), each gets relay vs solo and vs floor.")] = "8,64",
    repeat: Annotated[int, typer.Option(min=1, help="Interleaved rounds per ratio (relay, solo, relay, solo, ...).")] = 3,
    concurrency: Annotated[str, typer.Option(help="Concurrent trajectories for the throughput runs, comma-separated.")] = "1,8,32",
    throughput_tokens: Annotated[int, typer.Option(min=1, help="Tokens per trajectory in the throughput runs.")] = 64,
    questions: Annotated[Path | None, typer.Option(help="JSONL with a 'question' field for the throughput runs (default: one built-in question).")] = None,
    redis: Annotated[str | None, typer.Option("--redis", help="Redis URL (default: $REDIS_URL, else the embedded server).")] = None,
    out: Annotated[Path | None, typer.Option(help="Where to write the JSON results (default: bench.json in the per-user results folder, ~/.local/share/relaygraph/results).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON instead of a table.")] = False,
) -> None:
    """Measure what relaying costs on a model pair: prefill amplification with and without KV
    reuse, handoff overhead, relay vs solo and vs its floor (solo + catch-up prefills), and
    throughput vs solo at several concurrencies — every ratio from interleaved rounds."""
    import json

    from relaygraph import bench as bench_mod
    from relaygraph.config import RelayConfig
    from relaygraph.trajectory import open_store

    try:
        levels = [int(c) for c in concurrency.split(",") if c.strip()]
    except ValueError:
        raise ConfigError(f"--concurrency takes numbers separated by commas, got {concurrency!r}") from None
    if not levels or min(levels) < 1:
        raise ConfigError("--concurrency needs at least one number >= 1")
    try:
        intervals = [int(i) for i in interval.split(",") if i.strip()]
    except ValueError:
        raise ConfigError(f"--interval takes numbers separated by commas, got {interval!r}") from None
    if not intervals or min(intervals) < 1:
        raise ConfigError("--interval needs at least one number >= 1")
    pool: list[str] = []
    if questions is not None:
        try:
            pool = [json.loads(line)["question"] for line in questions.read_text().splitlines() if line.strip()]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"--questions {questions}: expected JSONL rows with a 'question' field ({exc})") from None
    from relaygraph.agents.transformers_backend import TransformersBackend

    config = RelayConfig.from_options(controller, expert, "fixed-interval", tokens, redis, dtype,
                                      interval=intervals[0])
    ensure_pulled(controller, expert)
    store = open_store(config.redis)
    small, large = (TransformersBackend(m, dtype, device, random_weights=random_weights)
                    for m in (controller, expert))
    if random_weights:  # random models rarely emit EOS: every run writes its whole budget
        small.eos_ids = large.eos_ids = frozenset()
    def say(line: str) -> None:  # on stderr, so --json keeps stdout one JSON object
        err.print(f"{line}…", style="dim")

    results = bench_mod.run_bench(small, large, store,
                                  tokens=tokens, interval=intervals, concurrency=levels,
                                  throughput_tokens=throughput_tokens, questions=pool,
                                  repeat=repeat, progress=say)
    results.update(device=device, dtype=dtype, random_weights=random_weights)
    if out is None:
        from relaygraph.dirs import results_dir

        out = results_dir() / "bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    if as_json:
        print(json.dumps(results))
        for warning in results["warnings"]:  # the table lists them itself
            err.print(f"warning: {warning}", style="yellow")
    else:
        print(bench_mod.table(results))
        err.print(f"results written to {out}")
