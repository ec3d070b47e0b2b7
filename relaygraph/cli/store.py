"""``relaygraph store status | stop``: the embedded trajectory store."""

from __future__ import annotations

import typer

from relaygraph.cli.common import friendly

app = typer.Typer(no_args_is_help=True, help="The embedded trajectory store.")


@app.command("status")
@friendly
def store_status() -> None:
    """Say whether the embedded server runs, where, and what it holds."""
    from relaygraph.trajectory import embedded

    pid = embedded.server_pid()
    print(f"data directory: {embedded.store_dir()}")
    print(f"server: {'running, pid ' + str(pid) if pid else 'not running'}")


@app.command("stop")
@friendly
def store_stop() -> None:
    """Stop the embedded server (its data stays on disk)."""
    from relaygraph.trajectory import embedded

    print("stopped" if embedded.stop_server() else "not running")
