"""``relaygraph show``: a stored trajectory in the terminal, as JSON or as one HTML page;
without an id, the recent ones."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from relaygraph.cli.common import Namespace, Redis, console, friendly, open_cli_store, say
from relaygraph.errors import ConfigError


@friendly
def show(
    trajectory_id: Annotated[str | None, typer.Argument(metavar="[TRAJECTORY_ID]", help="Id to show; omit to list recent runs.")] = None,
    redis: Redis = None,
    namespace: Namespace = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Watch a running trajectory live.")] = False,
    html: Annotated[Path | None, typer.Option("--html", help="Write one self-contained HTML page of the trajectory to this file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object: what `relaygraph run --json` printed for it (its status, if it has not finished).")] = False,
    limit: Annotated[int, typer.Option(min=1, help="How many recent trajectories to list.")] = 20,
    trust_stored: Annotated[bool, typer.Option("--trust-stored", help="--html: load tokenizers from the local folders the trajectory names (default: catalog models only), for per-token shading.")] = False,
) -> None:
    """Render a stored trajectory coloured by author, with handoff markers (or list recent ones)."""
    from relaygraph.trajectory import check_trajectory_id
    from relaygraph.trajectory.liveness import effective_status, stopped_because

    store = open_cli_store(redis, namespace)
    out = console()
    if trajectory_id is None:
        from relaygraph.viewer.terminal import list_trajectories

        list_trajectories(store, limit, out)
        return
    from relaygraph.viewer.terminal import follow_trajectory, render_trajectory

    tid = check_trajectory_id(trajectory_id)
    if follow and not as_json:
        trajectory = follow_trajectory(store, tid, out)
    else:
        trajectory = store.load(tid)
    status = effective_status(tid, trajectory.status, trajectory.info)
    if as_json:
        from relaygraph.relay import RunResult

        data = RunResult.from_trajectory(trajectory).model_dump(mode="json", by_alias=True)
        data["status"] = status
        import json

        print(json.dumps(data, indent=2, ensure_ascii=False))
    elif not follow and html is None:
        render_trajectory(trajectory, out, status)
    if html is not None:
        from relaygraph.viewer.html import write_html

        try:
            path = write_html(trajectory, html, status=status, trust_stored=trust_stored)
        except OSError as exc:
            raise ConfigError(f"cannot write {html}: {exc.strerror or exc}") from None
        out.print(f"wrote {path} — open it in a browser", soft_wrap=True)
    if status == "interrupted" and trajectory.status == "running" and not as_json:
        say(f"interrupted: the run stopped without finishing ({stopped_because(trajectory.info)}); "
            f"`relaygraph resume {tid}` continues it")
