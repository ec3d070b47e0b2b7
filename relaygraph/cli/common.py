"""What every command shares: the error console, one-line errors, model pulls, ``--set``
options, the run's relay config from a file and flags, and tracing set-up."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from relaygraph.errors import ConfigError, RelayGraphError

err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)
"""Diagnostics. No markup is interpreted in anything printed (user input, model text, paths):
colour comes from ``style=`` only."""


def console() -> Console:
    """Standard output, with no markup interpreted."""
    return Console(highlight=False, markup=False)
F = TypeVar("F", bound=Callable[..., Any])

Redis = Annotated[str | None, typer.Option("--redis", help="Store URL: redis://host:6379/0 (a Cluster node is detected), rediss://, unix://, redis+cluster://h1:p1,h2:p2, redis+sentinel://h1:26379,h2:26379/SERVICE (default: $REDIS_URL, else the embedded server).")]
Namespace = Annotated[str | None, typer.Option("--namespace", help="Store namespace, the prefix of every key: tenants, experiments (default relaygraph).")]
Ttl = Annotated[str | None, typer.Option("--ttl", help="New trajectories expire this long after their last activity: 7d, 12h, 30m, 90 (seconds), or none.")]


def open_cli_store(redis: str | None, namespace: str | None = None, ttl: str | None = None,
                   base: Any = None) -> Any:
    """The store named by ``--redis``/``--namespace``/``--ttl`` over ``base`` (a config's
    ``[store]``), else ``$REDIS_URL``, else the embedded server."""
    from relaygraph.trajectory.settings import StoreConfig

    return (base or StoreConfig()).override(redis, namespace, ttl).open(on_retry=store_retrying)


class _RetryReport:
    """A status line on stderr while the store's commands are retried (at most one every
    few seconds): a server that does not answer is never waited for in silence."""

    def __init__(self, every: float = 3.0) -> None:
        self.every = every
        self.last = 0.0

    def __call__(self, error: Exception, attempt: int, retries: int) -> None:
        import time

        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last = now
        say(f"the trajectory store does not answer ({type(error).__name__}); retrying "
            f"(attempt {attempt} of {retries})…")


store_retrying = _RetryReport()
"""``on_retry`` for the stores the CLI opens."""


def friendly(func: F) -> F:
    """relaygraph's own errors (bad input, a broken environment) as one ``error:`` line and
    exit status 2; Ctrl-C as exit 130. Anything else is a bug: it reaches :func:`main`."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except RelayGraphError as exc:
            err.print("error:", style="red", end=" ")
            err.print(str(exc))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]  # functools.wraps keeps the signature


def say(line: str) -> None:
    """A progress line on stderr (dim)."""
    err.print(line, style="dim")


def fewer_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas (as ``MALLOC_ARENA_MAX=2`` would), unless that variable is
    set. glibc gives threads that allocate at once their own arenas (up to 8 per core),
    and with dozens of generation threads each arena keeps freed KV-cache blocks: 32
    threads generating with the 0.5B held 2.8 GB instead of 1.9 GB, at the same speed.
    Returns whether the cap was set (False off glibc)."""
    import ctypes

    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    try:  # the C library the interpreter runs on (find_library would spawn ldconfig)
        return bool(ctypes.CDLL(None).mallopt(-8, arenas))  # -8: M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


@contextmanager
def quiet_loading() -> Iterator[None]:
    """transformers' per-file loading bars off inside (our own line says what loads), as
    they were after."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def ensure_pulled(*models: str | None) -> None:
    """Check every model argument, then pull the catalog models not yet in the cache."""
    from relaygraph.agents import catalog

    wanted = [m for m in models if m]
    for model in wanted:
        if model not in catalog.CATALOG:
            catalog.resolve(model)  # fails fast on a bad path before any download
    for model in wanted:
        if model in catalog.CATALOG and not catalog.is_pulled(model):
            catalog.pull(model, progress=say)


def parse_set_options(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; values are read as JSON when they parse (numbers, lists, ...)."""
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


def floats(text: str | None, what: str) -> list[float] | None:
    """Comma-separated numbers of an option, or None when the option was not given."""
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what} takes numbers separated by commas, got {text!r}") from None


def relay_config(config: Path | None, policy: str | None, controller: str | None,
                 expert: str | None, redis: str | None, max_tokens: int | None,
                 dtype: str | None, options: dict[str, Any],
                 urls: dict[str, str | None] | None = None, namespace: str | None = None,
                 ttl: str | None = None) -> Any:
    """The run's configuration: the config file (if any) with command-line overrides."""
    from relaygraph.config import RelayConfig

    if config is None:
        return RelayConfig.from_options(
            controller, expert, policy or "call-token",
            max_tokens if max_tokens is not None else 512, None, dtype or "bfloat16",
            **{f"{k}_url": v for k, v in (urls or {}).items()}, **options,
        ).with_store(redis, namespace, ttl)
    loaded = RelayConfig.load(config)
    data = loaded.model_dump(mode="json", exclude_unset=True)
    data.setdefault("agents", {n: a.model_dump(mode="json", exclude_unset=True)
                               for n, a in loaded.agents.items()})
    data["policy"] = {"type": policy} if policy else loaded.policy.model_dump(
        mode="json", exclude_unset=True) | {"type": loaded.policy.type}
    data["policy"].update(options)
    for name, model in (("controller", controller), ("expert", expert)):
        if model and name in data["agents"]:
            data["agents"][name]["model"] = model
    for name, url in (urls or {}).items():
        if url and name in data["agents"]:
            data["agents"][name].update(base_url=url, backend="openai")
            data["agents"][name].pop("dtype", None)
    if dtype:
        for agent in data["agents"].values():
            if agent.get("backend", "transformers") in ("transformers", "vllm"):
                agent["dtype"] = dtype
    if max_tokens is not None:
        data["max_tokens"] = max_tokens
    return RelayConfig.parse(data, source=str(config)).with_store(redis, namespace, ttl)


def traced(func: F) -> F:
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
                    err.print("warning:", style="yellow", end=" ")
                    err.print(f"{problem}; the run itself is unaffected")
            if telemetry.traces == "otlp" and tracing.last_trace_id and not any(
                    p.startswith("traces") for p in telemetry.problems):
                say(f"trace {tracing.last_trace_id} sent to {telemetry.endpoint}")

    return wrapper  # type: ignore[return-value]  # functools.wraps keeps the signature
