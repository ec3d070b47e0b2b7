"""Run an experiment's items concurrently, resumably, and optionally split over workers.

An experiment is a list of :class:`Job`\\ s, one per (condition, problem). Results live in a
:class:`Results` store keyed by the job's key, with the job's ``fingerprint`` (what the
result depends on: models, policy, budget, the problem): a stored result is reused only
when its fingerprint matches, so an interrupted experiment never recomputes a finished
item, a larger ``--limit`` computes only the new problems, and a changed setting
recomputes what it affects.

- :class:`FileResults`: ``items.jsonl`` in the output folder (one line per finished item,
  flushed as it finishes; a torn last line is ignored); one process per folder (locked).
- :class:`RedisResults`: several processes or machines split one experiment through one
  Redis: a worker runs an item only after claiming it with ``SET key NX EX lease``;
  results are JSON in a hash; a crashed worker's claims expire after ``lease`` seconds and
  are taken over. Every worker exports the full results once all items are done.

Each item's trajectory id is derived from the run id and the job, so an item interrupted
mid-run resumes its stored trajectory (``relaygraph show ID`` shows it). ``Ctrl-C`` stops
running generations at the next token; their trajectories resume next time.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from relaygraph.agents.wrapping import CancelScope
from relaygraph.errors import Cancelled, ConfigError

Record = dict[str, Any]


@dataclass
class Job:
    """One item: ``run(trajectory_id)`` runs in a worker thread and returns a JSON record;
    ``finish(record)`` runs in the main thread (e.g. grading, which uses signals)."""

    key: str
    group: str
    fingerprint: str
    run: Callable[[str], Record]
    finish: Callable[[Record], Record] | None = None


def fingerprint(*parts: Any) -> str:
    """A short digest of JSON-able parts."""
    blob = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Results(Protocol):
    """Where finished items are kept."""

    run_id: str
    worker: str

    def load(self) -> dict[str, Record]: ...
    def claim(self, key: str, fingerprint: str) -> bool: ...
    def release(self, key: str, fingerprint: str) -> None: ...
    def save(self, key: str, record: Record) -> None: ...
    def close(self) -> None: ...


class FileResults:
    """``items.jsonl`` (+ ``run.json`` with the run id) in ``folder``; one process at a time."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "items.jsonl"
        self._lock = open(self.folder / ".lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise ConfigError(f"another process is writing results to {self.folder}; wait "
                              "for it, or split work between processes with --shared and "
                              "Redis") from None
        manifest = self.folder / "run.json"
        if manifest.exists():
            self.run_id = json.loads(manifest.read_text())["run_id"]
        else:
            self.run_id = f"ev{secrets.token_hex(5)}"
            manifest.write_text(json.dumps({"run_id": self.run_id}) + "\n")
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def load(self) -> dict[str, Record]:
        records: dict[str, Record] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    item = json.loads(line)
                    records[item["key"]] = item
                except (ValueError, KeyError, TypeError):
                    continue  # a line torn by an interruption: that item runs again
        return records

    def claim(self, key: str, fingerprint: str) -> bool:
        return True

    def release(self, key: str, fingerprint: str) -> None:
        pass

    def save(self, key: str, record: Record) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        self._lock.close()


class RedisResults:
    """A shared experiment ``name`` in Redis: claims with ``SET NX EX``, results in a hash."""

    def __init__(self, client: Any, name: str, lease: float = 1800.0,
                 namespace: str = "relaygraph:eval") -> None:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", name):
            raise ConfigError(f"--shared name {name!r}: use 1-40 letters, digits, '-' or '_'")
        self.client = client
        self.prefix = f"{namespace}:{{{name}}}"
        self.lease = max(1, int(lease))
        self.run_id = f"ev-{name}"
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"

    def load(self) -> dict[str, Record]:
        raw = self.client.hgetall(f"{self.prefix}:results")
        return {k.decode() if isinstance(k, bytes) else k: json.loads(v) for k, v in raw.items()}

    def _claim_key(self, key: str, fingerprint: str) -> str:
        return f"{self.prefix}:claim:{_digest(key, fingerprint, 24)}"

    def claim(self, key: str, fingerprint: str) -> bool:
        # Claim first, then look for a result: a finishing worker writes its result before
        # it drops its claim, so a claim won here either sees that result or came first
        # (checking the result first would let a job finished in between run twice).
        if not self.client.set(self._claim_key(key, fingerprint), self.worker, nx=True,
                               ex=self.lease):
            return False
        done = self.client.hget(f"{self.prefix}:results", key)
        if done is not None and json.loads(done).get("fingerprint") == fingerprint:
            self.release(key, fingerprint)  # another worker finished it meanwhile
            return False
        return True

    def release(self, key: str, fingerprint: str) -> None:
        self.client.delete(self._claim_key(key, fingerprint))

    def save(self, key: str, record: Record) -> None:
        self.client.hset(f"{self.prefix}:results", key, json.dumps(record, ensure_ascii=False))
        self.release(key, record["fingerprint"])

    def close(self) -> None:
        pass


def trajectory_id(run_id: str, job: Job) -> str:
    """The item's trajectory id: stable for (run, key, fingerprint), so reruns resume it."""
    return f"{run_id}-{_digest(job.key, job.fingerprint, 20)}"


def _digest(key: str, fingerprint: str, size: int) -> str:
    return hashlib.sha256(f"{key}\0{fingerprint}".encode()).hexdigest()[:size]


@dataclass
class Outcome:
    """What :func:`run_jobs` did."""

    records: dict[str, Record]
    """Every job's record (finished now or before), by key."""
    computed: list[str]
    """Keys this call ran."""
    errors: dict[str, str]
    """Keys whose run failed (not saved: they run again next time), with the error."""
    seconds: float


def run_jobs(jobs: Sequence[Job], results: Results, concurrency: int = 1,
             flag: CancelScope | None = None, progress: Any = None, poll: float = 2.0,
             on_saved: Callable[[Record], None] | None = None) -> Outcome:
    """Run the jobs that have no matching stored result, ``concurrency`` at a time.

    ``progress``: a :class:`Progress` (or None). With a shared store, jobs claimed by
    other workers are waited for (polling every ``poll`` s) until they finish or their
    claims expire and this worker takes them over.
    """
    if concurrency < 1:
        raise ConfigError(f"--concurrency must be >= 1, got {concurrency}")
    if len({j.key for j in jobs}) != len(jobs):
        raise ValueError("job keys must be unique")
    started = time.perf_counter()
    flag = flag or CancelScope()
    progress = progress or Progress(None)
    stored = results.load()
    fresh = {j.key: record for j in jobs if (record := stored_result(stored, j)) is not None}
    progress.start(jobs, set(fresh))
    pending = [j for j in jobs if j.key not in fresh]
    computed: list[str] = []
    errors: dict[str, str] = {}

    def attempt(job: Job) -> Record | None:
        if flag.cancelled or not results.claim(job.key, job.fingerprint):
            return None
        tid = trajectory_id(results.run_id, job)
        began = time.perf_counter()
        try:
            record = job.run(tid)
        except BaseException:
            results.release(job.key, job.fingerprint)
            raise
        return {**record, "key": job.key, "group": job.group, "fingerprint": job.fingerprint,
                "trajectory_id": record.get("trajectory_id", tid), "worker": results.worker,
                "seconds": record.get("seconds", time.perf_counter() - began)}

    futures: dict[Future, Job] = {}
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="eval") as pool:
        try:
            while pending and not flag.cancelled:
                futures = {pool.submit(attempt, j): j for j in pending}
                skipped: list[Job] = []
                remaining = set(futures)
                while remaining:
                    finished, remaining = wait(remaining, return_when=FIRST_COMPLETED)
                    for future in finished:
                        job = futures[future]
                        try:
                            record = future.result()
                        except Cancelled:
                            continue
                        except Exception as exc:  # noqa: BLE001 - an item failing is recorded, not fatal
                            errors[job.key] = f"{type(exc).__name__}: {exc}"[:500]
                            progress.advance(job.group, failed=True)
                            continue
                        if record is None:
                            skipped.append(job)
                            continue
                        if job.finish is not None:
                            record = job.finish(record)
                        results.save(job.key, record)
                        fresh[job.key] = record
                        computed.append(job.key)
                        progress.advance(job.group)
                        if on_saved is not None:
                            on_saved(record)
                pending = _still_open(skipped, results, fresh, progress)
                if pending and not flag.cancelled:  # held by other workers: wait (or expiry)
                    progress.waiting(len(pending))
                    time.sleep(poll)
        except KeyboardInterrupt:
            flag.cancel("interrupted")
            for future in futures:
                future.cancel()
            raise
        finally:
            progress.stop()
    return Outcome(fresh, computed, errors, time.perf_counter() - started)


def stored_result(stored: dict[str, Record], job: Job) -> Record | None:
    """The stored result of ``job``, if one was computed for what it is now (its
    fingerprint); else None."""
    record = stored.get(job.key)
    return record if record is not None and record.get("fingerprint") == job.fingerprint else None


def _still_open(skipped: list[Job], results: Results, fresh: dict[str, Record],
                progress: Progress) -> list[Job]:
    """Of the jobs other workers held, those still without a result (others' results are
    taken in)."""
    if not skipped:
        return []
    stored = results.load()
    still = []
    for job in skipped:
        record = stored_result(stored, job)
        if record is not None:
            fresh[job.key] = record
            progress.advance(job.group)
        else:
            still.append(job)
    return still


class Progress:
    """A rich progress bar per group on a terminal; a plain line per finished item when the
    console is not one (a log file, CI), so long runs are never silent; nothing without a
    console."""

    def __init__(self, console: Any, label: str = "") -> None:
        self.console, self.label = console, label
        self._bar: Any = None
        self._tasks: dict[str, Any] = {}
        self._failed: dict[str, int] = {}
        self._said_waiting = False
        self._lines: dict[str, list[int]] | None = None  # group -> [done, total] (plain lines)
        self._started = 0.0

    def start(self, jobs: Sequence[Job], done: set[str]) -> None:
        if self.console is None:
            return
        groups: dict[str, list[Job]] = {}
        for job in jobs:
            groups.setdefault(job.group, []).append(job)
        if not self.console.is_terminal:
            self._started = time.monotonic()
            self._lines = {g: [sum(j.key in done for j in m), len(m)] for g, m in groups.items()}
            reused = sum(d for d, _ in self._lines.values())
            self.console.print(f"{self.label}{len(jobs) - reused} item(s) to run in "
                               f"{len(groups)} group(s){f', {reused} reused' if reused else ''}",
                               highlight=False)
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bar

        self._bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("[red]{task.fields[failed]}"), TimeElapsedColumn(),
                        console=self.console)
        for group, members in groups.items():
            self._tasks[group] = self._bar.add_task(
                f"{self.label}{group}", total=len(members), failed="",
                completed=sum(j.key in done for j in members))
        self._bar.start()

    def advance(self, group: str, failed: bool = False) -> None:
        if failed:
            self._failed[group] = self._failed.get(group, 0) + 1
        if self._lines is not None:
            count = self._lines[group]
            count[0] += not failed
            errors = f", {self._failed[group]} failed" if self._failed.get(group) else ""
            elapsed = int(time.monotonic() - self._started)
            self.console.print(f"{self.label}{group}: {count[0]}/{count[1]}{errors} "
                               f"({elapsed // 60}m{elapsed % 60:02d}s)", highlight=False)
        if self._bar is None:
            return
        if failed:
            self._bar.update(self._tasks[group], failed=f"{self._failed[group]} failed")
        else:
            self._bar.advance(self._tasks[group])

    def waiting(self, count: int) -> None:
        if self.console is not None and not self._said_waiting:
            self._said_waiting = True
            self.console.print(f"waiting for {count} item(s) other workers are running "
                               "(or for their claims to expire)", markup=False, highlight=False)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
