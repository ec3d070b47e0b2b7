"""``relaygraph`` command line: run, show, models, store.

Errors a user can fix print one line (``error: ...``) and exit with status 2.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from relaygraph.errors import ConfigError, RelayGraphError
from relaygraph.eval.cli import app as eval_app
from relaygraph.train.cli import train_app

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Several language models on one shared reasoning trajectory.")
models_app = typer.Typer(no_args_is_help=True, help="Offline model catalog.")
store_app = typer.Typer(no_args_is_help=True, help="The embedded trajectory store.")
app.add_typer(models_app, name="models")
app.add_typer(store_app, name="store")
app.add_typer(eval_app, name="eval")
app.add_typer(train_app, name="train")

err = Console(stderr=True, highlight=False, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])


def friendly(func: F) -> F:
    """Turn user-fixable errors into one line and exit status 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except RelayGraphError as exc:
            err.print(f"[red]error:[/red] {exc}", markup=True)
            raise typer.Exit(2) from None
        except ValueError as exc:  # pydantic validation and argument checks
            message = str(exc).splitlines()
            err.print(f"[red]error:[/red] {message[-1] if len(message) > 2 else ' '.join(message)}")
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _ensure_pulled(*models: str | None) -> None:
    """Check every model argument, then pull the catalog models not yet in the cache."""
    from relaygraph.agents import catalog

    wanted = [m for m in models if m]
    for model in wanted:
        if model not in catalog.CATALOG:
            catalog.resolve(model)  # fails fast on a bad path before any download
    for model in wanted:
        if model in catalog.CATALOG and not catalog.is_pulled(model):
            catalog.pull(model, progress=lambda msg: err.print(f"[dim]{msg}[/dim]"))


def _set_option(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; values are read as JSON when they parse (numbers, lists, ...)."""
    import json

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            options[key.replace("-", "_")] = json.loads(value)
        except ValueError:
            options[key.replace("-", "_")] = value
    return options


def _relay_config(config: Path | None, policy: str | None, controller: str | None,
                  expert: str | None, redis: str | None, max_tokens: int | None,
                  dtype: str | None, options: dict[str, Any],
                  urls: dict[str, str | None] | None = None) -> Any:
    """The run's configuration: the config file (if any) with command-line overrides."""
    from relaygraph.config import RelayConfig

    if config is None:
        return RelayConfig.from_options(
            controller or "qwen2.5-coder-0.5b", expert or "qwen2.5-coder-1.5b",
            policy or "call-token", max_tokens if max_tokens is not None else 512, redis,
            dtype or "bfloat16", **{f"{k}_url": v for k, v in (urls or {}).items()}, **options)
    data = RelayConfig.load(config).model_dump(mode="json")
    if policy:
        data["policy"] = {"type": policy}
    data["policy"].update(options)
    for name, model in (("controller", controller), ("expert", expert)):
        if model and name in data["agents"]:
            data["agents"][name]["model"] = model
    for name, url in (urls or {}).items():
        if url and name in data["agents"]:
            data["agents"][name].update(base_url=url, backend="openai")
    for agent in data["agents"].values():
        agent["dtype"] = dtype or agent["dtype"]
    data["max_tokens"] = max_tokens if max_tokens is not None else data["max_tokens"]
    data["redis"] = redis or data["redis"]
    return RelayConfig.parse(data, source=str(config))


def _traced(func: F) -> F:
    """Set up OpenTelemetry for the command when ``--trace`` or the ``OTEL_*`` variables ask
    for it, and shut it down afterwards (bounded: a dead collector costs no waiting)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from relaygraph.observability.telemetry import configure, tracing_requested

        target, content = kwargs.get("trace"), kwargs.get("trace_content")
        if target is None and not tracing_requested():
            if content:
                raise ConfigError("--trace-content needs --trace (or OTEL_TRACES_EXPORTER / "
                                  "OTEL_EXPORTER_OTLP_ENDPOINT)")
            return func(*args, **kwargs)
        endpoint = None
        if target is not None and "://" in target:
            endpoint = target.split("/v1/traces")[0].rstrip("/")
            target = "otlp"
        telemetry = configure(target, endpoint=endpoint, capture_content=content or None,
                              quiet=not os.environ.get("RELAYGRAPH_DEBUG"))
        try:
            return func(*args, **kwargs)
        finally:
            from relaygraph.observability import tracing

            if not telemetry.shutdown():
                for problem in telemetry.problems:
                    err.print(f"[yellow]warning:[/yellow] {problem}; the run itself is unaffected")
            if telemetry.traces == "otlp" and tracing.last_trace_id and not any(
                    p.startswith("traces") for p in telemetry.problems):
                err.print(f"[dim]trace {tracing.last_trace_id} sent to {telemetry.endpoint}[/dim]")

    return wrapper  # type: ignore[return-value]


@app.command()
@friendly
@_traced
def run(
    question: Annotated[str, typer.Argument(help="The question to answer.")],
    policy: Annotated[str | None, typer.Option(help="call-token | prompted-call | solo | confidence | supervisor | fixed-interval | random-router | perfect-router | truncate (default call-token)")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Relay config file (.toml, .yaml, .json); options below override it.")] = None,
    controller: Annotated[str | None, typer.Option(help="Controller model: catalog name, folder, .gguf or hub id (default qwen2.5-coder-0.5b).")] = None,
    expert: Annotated[str | None, typer.Option(help="Expert model (default qwen2.5-coder-1.5b).")] = None,
    controller_url: Annotated[str | None, typer.Option(help="Use the controller model served at this OpenAI-compatible URL (e.g. vllm serve: http://localhost:8000/v1); --controller is then the served model name.")] = None,
    expert_url: Annotated[str | None, typer.Option(help="The same for the expert.")] = None,
    redis: Annotated[str | None, typer.Option("--redis", help="Redis URL (default: $REDIS_URL, else the embedded server).")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Budget of generated tokens, all models together (default 512).")] = None,
    dtype: Annotated[str | None, typer.Option(help="bfloat16 | float16 | float32")] = None,
    max_call_tokens: Annotated[int | None, typer.Option(help="call-token: most tokens one call may ask for.")] = None,
    threshold: Annotated[float | None, typer.Option(help="confidence/truncate: log-prob (or entropy) threshold.")] = None,
    fallback_tokens: Annotated[int | None, typer.Option(help="confidence: tokens the fallback writes.")] = None,
    interval: Annotated[int | None, typer.Option(help="fixed-interval: tokens per turn.")] = None,
    p: Annotated[float | None, typer.Option("--p", help="random-router: share of queries sent to the expert.")] = None,
    supervisor: Annotated[str | None, typer.Option(help="supervisor: module:function, judge:AGENT or score:AGENT.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Any policy field as KEY=VALUE (repeatable).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of streaming text.")] = False,
    trace: Annotated[str | None, typer.Option("--trace", help="OpenTelemetry traces to: console | otlp | none | an OTLP URL such as http://localhost:6006 (default: the OTEL_* variables).")] = None,
    trace_content: Annotated[bool, typer.Option("--trace-content", help="Record the question and generated text in spans (off by default).")] = False,
) -> None:
    """Answer QUESTION with a relay; tokens stream coloured by the model that wrote them."""
    if not question.strip():
        raise ConfigError("the question is empty; pass the text of a question in quotes")
    flags = {"max_call_tokens": max_call_tokens, "threshold": threshold,
             "fallback_tokens": fallback_tokens, "interval": interval, "p": p,
             "supervisor": supervisor}
    options = {k: v for k, v in flags.items() if v is not None} | _set_option(set_ or [])
    cfg = _relay_config(config, policy, controller, expert, redis, max_tokens, dtype, options,
                        {"controller": controller_url, "expert": expert_url})
    from relaygraph.trajectory import open_store

    store = open_store(cfg.redis)
    _ensure_pulled(*(cfg.agents[name].local_model for name in cfg.needed_agents()))
    with err.status("loading models…"):
        relay = cfg.build(store)
    out = Console(highlight=False)
    if as_json:
        result = relay.run(question)
        print(result.model_dump_json(indent=2, by_alias=True))
        return
    from relaygraph.viewer.terminal import LivePrinter, Styles

    styles = Styles([a.name for a in relay.agents])
    out.print(styles.legend())
    result = relay.run(question, on_event=LivePrinter(out, styles))
    out.print()
    out.rule()
    tokens = ", ".join(f"{k} {v}" for k, v in result.tokens_by_agent.items())
    total = sum(result.tokens_by_agent.values())
    out.print(f"[bold]answer:[/bold] {result.answer or '(none)'}")
    out.print(f"call ratio {result.call_ratio:.1%} · tokens {tokens} · handoffs {result.handoffs} "
              f"· {result.finish_reason} · {result.seconds:.1f}s ({total / result.seconds:.1f} tok/s)")
    out.print(f"[dim]trajectory {result.trajectory_id} — `relaygraph show {result.trajectory_id}`[/dim]")


@app.command()
@friendly
def resume(
    trajectory_id: Annotated[str, typer.Argument(help="Id of the interrupted run.")],
    redis: Annotated[str | None, typer.Option("--redis", help="Redis URL (default: $REDIS_URL, else the embedded server).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Continue an interrupted run from its last completed step (same models and policy)."""
    from relaygraph.config import RelayConfig
    from relaygraph.trajectory import check_trajectory_id, open_store

    store = open_store(redis)
    task = store.load(check_trajectory_id(trajectory_id)).task
    if "relay" not in task.config:
        raise ConfigError(f"trajectory {trajectory_id} was not started from a config (a Relay "
                          "built in Python); resume it in Python with Relay.resume(id)")
    cfg = RelayConfig.parse(task.config["relay"], source=f"trajectory {trajectory_id}")
    _ensure_pulled(*(cfg.agents[name].local_model for name in cfg.needed_agents()))
    with err.status("loading models…"):
        relay = cfg.build(store)
    result = relay.resume(trajectory_id)
    if as_json:
        print(result.model_dump_json(indent=2, by_alias=True))
    else:
        Console(highlight=False).print(f"answer: {result.answer or '(none)'} · status "
                                       f"{store.status(trajectory_id)} · {len(result.segments)} segments")


@app.command()
@friendly
def show(
    trajectory_id: Annotated[str | None, typer.Argument(help="Id to show; omit to list recent runs.")] = None,
    redis: Annotated[str | None, typer.Option("--redis", help="Redis URL.")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Watch a running trajectory live.")] = False,
    html: Annotated[Path | None, typer.Option("--html", help="Write one self-contained HTML page of the trajectory to this file.")] = None,
    limit: Annotated[int, typer.Option(help="How many recent ids to list.")] = 20,
) -> None:
    """Render a stored trajectory coloured by author, with handoff markers (or list recent ones)."""
    from relaygraph.trajectory import check_trajectory_id, open_store

    store = open_store(redis)
    out = Console(highlight=False)
    if trajectory_id is None:
        for tid in store.list_ids(limit):
            out.print(tid)
        return
    from relaygraph.viewer.terminal import follow_trajectory, render_trajectory

    tid = check_trajectory_id(trajectory_id)
    if follow:
        trajectory = follow_trajectory(store, tid, out)
    else:
        trajectory = store.load(tid)
        if html is None:
            render_trajectory(trajectory, out)
    if html is not None:
        from relaygraph.viewer.html import write_html

        try:
            path = write_html(trajectory, html)
        except OSError as exc:
            raise ConfigError(f"cannot write {html}: {exc.strerror or exc}") from None
        out.print(f"wrote {path} — open it in a browser", soft_wrap=True)


@models_app.command("pull")
@friendly
def models_pull(
    names: Annotated[list[str] | None, typer.Argument(help="Catalog names (default: the default pair).")] = None,
) -> None:
    """Install, join, verify (sha256) and convert catalog models into the local cache."""
    from relaygraph.agents import catalog

    for name in names or [catalog.DEFAULT_CONTROLLER, catalog.DEFAULT_EXPERT]:
        catalog.pull(name, progress=lambda msg: err.print(msg))


@models_app.command("list")
@friendly
def models_list() -> None:
    """List catalog models and whether they are pulled."""
    from relaygraph.agents import catalog

    for name, spec in catalog.CATALOG.items():
        state = "pulled" if catalog.is_pulled(name) else "not pulled"
        print(f"{name:22} {state:11} {spec.description}")


@store_app.command("status")
@friendly
def store_status() -> None:
    """Say whether the embedded server runs, where, and what it holds."""
    from relaygraph.trajectory import embedded

    pid = embedded.server_pid()
    print(f"data directory: {embedded.store_dir()}")
    print(f"server: {'running, pid ' + str(pid) if pid else 'not running'}")


@store_app.command("stop")
@friendly
def store_stop() -> None:
    """Stop the embedded server (its data stays on disk)."""
    from relaygraph.trajectory import embedded

    print("stopped" if embedded.stop_server() else "not running")


@app.command()
@friendly
@_traced
def serve(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Serve config (.toml, .yaml, .json): \\[relays.NAME] tables, each a relay config; a plain relay config is served as relay-<policy>. Default: the offline pair as relay-call-token and relay-prompted-call.")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    redis: Annotated[str | None, typer.Option("--redis", help="Redis URL (default: the config's redis, $REDIS_URL, else the embedded server).")] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="RELAYGRAPH_API_KEY", show_default=False, help="Require 'Authorization: Bearer KEY' on /v1 routes (prefer the RELAYGRAPH_API_KEY variable: arguments show in ps).")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Relay runs at once (worker threads).")] = 4,
    max_queue: Annotated[int, typer.Option(min=0, help="Requests that may wait for a worker; more get a 429.")] = 64,
    queue_timeout: Annotated[float, typer.Option(min=0.0, help="Seconds a request may wait for a worker before a 503 (0: no limit).")] = 60.0,
    max_request_bytes: Annotated[int, typer.Option(min=1, help="Largest request body; larger get a 413.")] = 1 << 20,
    trace: Annotated[str | None, typer.Option("--trace", help="OpenTelemetry traces to: console | otlp | none | an OTLP URL (default: the OTEL_* variables). One trace per request.")] = None,
    trace_content: Annotated[bool, typer.Option("--trace-content", help="Record questions and generated text in spans (off by default).")] = False,
) -> None:
    """Serve relays as OpenAI-compatible models (/v1/chat/completions, /v1/completions, /v1/models)."""
    from relaygraph.serve import ServeConfig, ServeSettings, serve as run_server

    cfg = ServeConfig.load(config) if config is not None else ServeConfig.default()
    _ensure_pulled(*(model for model, _ in cfg.backend_keys()))
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        err.print(f"[yellow]warning:[/yellow] listening on {host} without an API key; set "
                  "RELAYGRAPH_API_KEY to require one")
    settings = ServeSettings(api_key=api_key or None, concurrency=concurrency,
                             max_queue=max_queue, queue_timeout=queue_timeout,
                             max_request_bytes=max_request_bytes)
    run_server(cfg, host, port, redis, settings, announce=lambda line: err.print(line, markup=False))


@app.command()
@friendly
def bench(
    controller: Annotated[str, typer.Option(help="Small model (catalog name, folder, .gguf or hub id).")] = "qwen2.5-coder-0.5b",
    expert: Annotated[str, typer.Option(help="Large model.")] = "qwen2.5-coder-1.5b",
    dtype: Annotated[str, typer.Option(help="bfloat16 | float16 | float32.")] = "bfloat16",
    device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N.")] = "cpu",
    random_weights: Annotated[bool, typer.Option("--random-weights", help="Build both architectures from their configs with random weights (only config and tokenizer files are needed; timings only — the text is noise).")] = False,
    tokens: Annotated[int, typer.Option(min=16, help="Tokens of the measured relay.")] = 256,
    interval: Annotated[int, typer.Option(min=1, help="Tokens per turn (tokens / interval handoffs at most).")] = 8,
    concurrency: Annotated[str, typer.Option(help="Concurrent trajectories for the throughput runs, comma-separated.")] = "1,8,32",
    throughput_tokens: Annotated[int, typer.Option(min=1, help="Tokens per trajectory in the throughput runs.")] = 64,
    questions: Annotated[Path | None, typer.Option(help="JSONL with a 'question' field for the throughput runs (default: one built-in question).")] = None,
    redis: Annotated[str | None, typer.Option("--redis", help="Redis URL (default: $REDIS_URL, else the embedded server).")] = None,
    out: Annotated[Path, typer.Option(help="Where to write the JSON results.")] = Path("benchmarks/results/bench.json"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON instead of a table.")] = False,
) -> None:
    """Measure what relaying costs on a model pair: prefill amplification with and without KV
    reuse, handoff overhead, relay vs solo wall time, throughput at several concurrencies."""
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
    pool: list[str] = []
    if questions is not None:
        try:
            pool = [json.loads(line)["question"] for line in questions.read_text().splitlines() if line.strip()]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"--questions {questions}: expected JSONL rows with a 'question' field ({exc})") from None
    from relaygraph.agents.transformers_backend import TransformersBackend

    config = RelayConfig.from_options(controller, expert, "fixed-interval", tokens, redis, dtype,
                                      interval=interval)
    _ensure_pulled(controller, expert)
    store = open_store(config.redis)
    small, large = (TransformersBackend(m, dtype, device, random_weights=random_weights)
                    for m in (controller, expert))
    if random_weights:  # random models rarely emit EOS: every run writes its whole budget
        small.eos_ids = large.eos_ids = frozenset()
    say = (lambda line: None) if as_json else (lambda line: err.print(f"[dim]{line}…[/dim]"))
    results = bench_mod.run_bench(small, large, store,
                                  tokens=tokens, interval=interval, concurrency=levels,
                                  throughput_tokens=throughput_tokens, questions=pool, progress=say)
    results.update(device=device, dtype=dtype, random_weights=random_weights)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    if as_json:
        print(json.dumps(results))
    else:
        print(bench_mod.table(results))
        err.print(f"results written to {out}")


def main() -> None:
    if os.environ.get("RELAYGRAPH_DEBUG"):
        app()
        return
    try:
        app()
    except SystemExit:
        raise
    except Exception as exc:  # a bug, not a user error: keep it to one line unless asked
        err.print(f"[red]internal error:[/red] {type(exc).__name__}: {exc} "
                  "(set RELAYGRAPH_DEBUG=1 for the traceback)")
        sys.exit(1)


if __name__ == "__main__":
    main()
