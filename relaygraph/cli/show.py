"""``relaygraph show``: a stored trajectory in the terminal or as one HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from relaygraph.cli.common import Namespace, Redis, console, friendly, open_cli_store
from relaygraph.errors import ConfigError


@friendly
def show(
    trajectory_id: Annotated[str | None, typer.Argument(help="Id to show; omit to list recent runs.")] = None,
    redis: Redis = None,
    namespace: Namespace = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Watch a running trajectory live.")] = False,
    html: Annotated[Path | None, typer.Option("--html", help="Write one self-contained HTML page of the trajectory to this file.")] = None,
    limit: Annotated[int, typer.Option(help="How many recent ids to list.")] = 20,
    trust_stored: Annotated[bool, typer.Option("--trust-stored", help="--html: load tokenizers from the local folders the trajectory names (default: catalog models only), for per-token shading.")] = False,
) -> None:
    """Render a stored trajectory coloured by author, with handoff markers (or list recent ones)."""
    from relaygraph.trajectory import check_trajectory_id

    store = open_cli_store(redis, namespace)
    out = console()
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
            path = write_html(trajectory, html, trust_stored=trust_stored)
        except OSError as exc:
            raise ConfigError(f"cannot write {html}: {exc.strerror or exc}") from None
        out.print(f"wrote {path} — open it in a browser", soft_wrap=True)
