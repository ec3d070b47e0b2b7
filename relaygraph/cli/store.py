"""``relaygraph store status | prune | delete | stop``: the trajectory store."""

from __future__ import annotations

from typing import Annotated

import typer

from relaygraph.cli.common import Namespace, Redis, friendly, open_cli_store
from relaygraph.errors import ConfigError, TrajectoryNotFoundError

app = typer.Typer(no_args_is_help=True, help="The trajectory store: what it holds, retention, "
                  "the embedded server.")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@app.command("status")
@friendly
def store_status(
    redis: Redis = None,
    namespace: Namespace = None,
    sample: Annotated[int, typer.Option(min=1, help="Measure this many of the newest trajectories.")] = 100,
) -> None:
    """Where the store is, what a namespace holds and what a trajectory costs in memory (the
    embedded server is not started just to answer)."""
    import os

    from relaygraph.trajectory import embedded
    from relaygraph.trajectory.connect import describe

    pid = embedded.server_pid()
    print(f"embedded data directory: {embedded.store_dir()}")
    print(f"embedded server: {'running, pid ' + str(pid) if pid else 'not running'}")
    if not (redis or os.environ.get("REDIS_URL") or pid):
        return
    store = open_cli_store(redis, namespace)
    report = store.memory(sample)
    print(f"store: {store.url} ({describe(store.client, store.kind)}), namespace {store.namespace}")
    print(f"trajectories: {report['trajectories']}")
    if report["sampled"]:
        per = report["bytes_per_trajectory"]
        print(f"memory per trajectory: {_size(per)} (mean of the newest {report['sampled']}, "
              f"{report['segments_per_trajectory']:.1f} segments each) · per 1,000: "
              f"{_size(per * 1000)}")
    print(f"index: {_size(report['index_bytes'])} · server memory in use: "
          f"{_size(report['used_memory'])}")


@app.command("prune")
@friendly
def store_prune(
    older_than: Annotated[str, typer.Option("--older-than", help="Delete trajectories created longer ago than this: 7d, 12h, 30m, 90 (seconds).")],
    status: Annotated[list[str] | None, typer.Option("--status", help="Only trajectories with this status: finished, failed, cancelled, running (repeatable; default any). Running ones a live server holds are always kept.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be deleted; delete nothing.")] = False,
    redis: Redis = None,
    namespace: Namespace = None,
) -> None:
    """Delete old trajectories (keys and index entries) of one namespace, and drop index
    entries of trajectories that have expired. Nothing else is touched."""
    from relaygraph.trajectory.settings import parse_duration

    age = parse_duration(older_than, "--older-than")
    if age is None:
        raise ConfigError("--older-than needs a positive duration, e.g. 7d")
    wanted = [s.strip() for item in status or [] for s in item.split(",") if s.strip()]
    store = open_cli_store(redis, namespace)
    report = store.prune(age, wanted, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    line = f"{verb} {len(report.deleted)} trajectories from {store.namespace}"
    if report.expired:
        line += f"; {'would drop' if dry_run else 'dropped'} {report.expired} index entries of expired ones"
    if report.held:
        line += f"; kept {len(report.held)} running on a live server"
    print(line)


@app.command("delete")
@friendly
def store_delete(
    trajectory_ids: Annotated[list[str], typer.Argument(help="Ids to delete.")],
    force: Annotated[bool, typer.Option("--force", help="Delete even a trajectory a live server is running.")] = False,
    redis: Redis = None,
    namespace: Namespace = None,
) -> None:
    """Delete trajectories (their keys and index entries)."""
    from relaygraph.trajectory import check_trajectory_id

    store = open_cli_store(redis, namespace)
    ids = [check_trajectory_id(t) for t in trajectory_ids]
    missing = [t for t in ids if not store.exists(t)]
    held = [t for t in ids if t not in missing and store.held(t)]
    if held and not force:
        raise ConfigError(f"{', '.join(held)} {'is' if len(held) == 1 else 'are'} running on a "
                          "live server; cancel first (POST /v1/trajectories/ID/cancel) or pass "
                          "--force")
    deleted = [t for t in ids if t not in missing and store.delete(t)]
    if deleted:
        print(f"deleted {len(deleted)}: {', '.join(deleted)}")
    if missing:
        raise TrajectoryNotFoundError(f"no trajectory {', '.join(missing)} in {store.url} "
                                      f"(namespace {store.namespace}); nothing deleted for it")


@app.command("stop")
@friendly
def store_stop() -> None:
    """Stop the embedded server (its data stays on disk)."""
    from relaygraph.trajectory import embedded

    print("stopped" if embedded.stop_server() else "not running")
