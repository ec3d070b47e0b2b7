"""``relaygraph`` command line, one module per command group.

Errors a user can fix — relaygraph's own and the command line's (a bad option value, a
missing argument, an unknown option) — print one line (``error: ...``) and exit with
status 2; anything else is a bug and prints ``internal error: ...`` (exit 1) with how to
report it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer

from relaygraph.cli import bench, models, run, serve, show, store, train
from relaygraph.cli import eval as eval_
from relaygraph.cli.common import err, fewer_malloc_arenas

PROG = "relaygraph"

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Several language models on one shared reasoning trajectory.")
app.command()(run.run)
app.command()(run.resume)
app.command()(show.show)
app.command()(serve.serve)
app.command()(bench.bench)
app.add_typer(models.app, name="models")
app.add_typer(store.app, name="store")
app.add_typer(eval_.app, name="eval")
app.add_typer(train.app, name="train")


def version() -> str:
    """``relaygraph X.Y.Z`` (the installed distribution's version)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    from relaygraph import __version__

    try:
        return f"{PROG} {dist_version(PROG)}"
    except PackageNotFoundError:  # run from a source tree that is not installed
        return f"{PROG} {__version__}"


def _print_version(value: bool) -> None:
    if value:
        print(version())
        raise typer.Exit(0)


@app.callback()
def _root(
    show_version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Several language models on one shared reasoning trajectory."""
    fewer_malloc_arenas()  # before any generation thread allocates


def command() -> Any:
    """The click command behind ``app``, with flags shown without a value type in
    ``--help`` (Typer labels them ``<bool>``, as if they took a value)."""
    import typer.main

    root = typer.main.get_command(app)
    _plain_flags(root)
    return root


def _plain_flags(cmd: Any) -> None:
    from typer._click import Context  # typer vendors click; Context is not re-exported

    help_option = cmd.get_help_option(Context(cmd, info_name=PROG))
    for param in [*cmd.params, *([help_option] if help_option is not None else [])]:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    for sub in getattr(cmd, "commands", {}).values():
        _plain_flags(sub)


def main(args: Sequence[str] | None = None) -> None:
    """The ``relaygraph`` entry point."""
    # Before torch loads: OpenMP threads that spin while they wait for work steal the cores
    # a relay's Python steps, the store and other jobs need (a decode step ran 8x slower on
    # a busy 2-core machine); waiting passively costs little on a quiet one. Set it to
    # ACTIVE to have the spinning back.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    debug = bool(os.environ.get("RELAYGRAPH_DEBUG"))
    try:
        code = command().main(args=list(args) if args is not None else None, prog_name=PROG,
                              standalone_mode=False)
    except typer.TyperException as exc:  # the command line's own errors (click's UsageError)
        if type(exc).__name__ == "NoArgsIsHelpError":  # the help is already printed
            sys.exit(0)
        err.print("error:", style="red", end=" ")
        err.print(usage_message(exc))
        sys.exit(2)
    except typer.Abort:
        err.print("aborted")
        sys.exit(1)
    except SystemExit:
        raise
    except Exception as exc:
        if debug:
            raise
        err.print("internal error:", style="red", end=" ")
        err.print(f"{type(exc).__name__}: {exc} — this is a bug in relaygraph; rerun with "
                  "RELAYGRAPH_DEBUG=1 for the traceback and report it")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def usage_message(exc: typer.TyperException) -> str:
    """A command-line error on one line, with where to read the command's options."""
    text = " ".join(exc.format_message().split())
    text = (text[:1].lower() + text[1:]).rstrip(".")
    ctx = getattr(exc, "ctx", None)
    where = f"{ctx.command_path} --help" if ctx is not None else f"{PROG} --help"
    return f"{text} (see `{where}`)"


__all__ = ["app", "command", "main", "version"]
