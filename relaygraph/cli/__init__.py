"""``relaygraph`` command line, one module per command group.

Errors a user can fix print one line (``error: ...``) and exit with status 2; anything
else is a bug and prints ``internal error: ...`` (exit 1) with how to report it.
"""

from __future__ import annotations

import os
import sys

import typer

from relaygraph.cli import bench, models, run, serve, show, store, train
from relaygraph.cli import eval as eval_
from relaygraph.cli.common import err

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


def main() -> None:
    """The ``relaygraph`` entry point."""
    if os.environ.get("RELAYGRAPH_DEBUG"):
        app()
        return
    try:
        app()
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - a bug, not a user error: one line, exit 1
        err.print("internal error:", style="red", end=" ")
        err.print(f"{type(exc).__name__}: {exc} — this is a bug in relaygraph; rerun with "
                  "RELAYGRAPH_DEBUG=1 for the traceback and report it")
        sys.exit(1)


__all__ = ["app", "main"]
