"""A bounded load test of ``relaygraph serve`` on loopback, with the tiny test models.

    python benchmarks/serve_load.py                      # 200 requests, 16 at a time
    python benchmarks/serve_load.py --requests 50 --concurrency 8 --server-concurrency 2

Starts ``relaygraph serve`` as a subprocess on 127.0.0.1 (a free port, an API key, the
embedded store in a temporary RELAYGRAPH_HOME) serving the tiny overfit relay pair of
tests/tiny_models.py as ``relay-call-token`` ("What is 2 + 5?" -> 7 with one 3-token call),
fires ``--requests`` chat completions through the real ``openai`` async client with at
most ``--concurrency`` in flight (half streamed), then stops the server. It stops by
itself: every request has a timeout and the whole load a deadline (``--deadline``).

Writes benchmarks/results/serve_load.json: throughput, latency p50/p90/p99, time to first
token of the streamed half, errors (expected 0) and the machine's load. Exit status 1 if
any request failed or answered wrongly.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results" / "serve_load.json"
QUESTION = "What is 2 + 5?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def tiny_pair() -> tuple[Path, Path]:
    import fcntl

    from tests import tiny_models as tiny

    root = Path(os.environ.get("RELAYGRAPH_TEST_CACHE")
                or Path(tempfile.gettempdir()) / f"relaygraph-test-cache-{getpass.getuser()}")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return tiny.build_relay_pair(root / "relay-pair")


async def one(client, i: int, stream: bool) -> dict:
    started = time.perf_counter()
    row: dict = {"i": i, "stream": stream}
    try:
        messages = [{"role": "user", "content": QUESTION}]
        if stream:
            first = None
            answer = None
            response = await client.chat.completions.create(
                model="relay-call-token", messages=messages, stream=True,
                stream_options={"include_usage": True})
            tokens = 0
            async for chunk in response:
                if chunk.choices and chunk.choices[0].delta.content and first is None:
                    first = time.perf_counter() - started
                if chunk.choices and chunk.choices[0].finish_reason:
                    answer = chunk.model_extra["relaygraph"]["answer"]
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            row.update(ttft=first, answer=answer, tokens=tokens)
        else:
            done = await client.chat.completions.create(model="relay-call-token",
                                                        messages=messages)
            row.update(answer=done.model_extra["relaygraph"]["answer"],
                       tokens=done.usage.completion_tokens)
        row["ok"] = row["answer"] == "7"
        if not row["ok"]:
            row["error"] = f"wrong answer {row['answer']!r}"
    except Exception as exc:  # noqa: BLE001 - every failure is counted
        row.update(ok=False, error=f"{type(exc).__name__}: {getattr(exc, 'status_code', '')}"
                   f" {str(exc)[:200]}")
    row["latency"] = time.perf_counter() - started
    return row


async def load(url: str, key: str, requests: int, concurrency: int, stream_share: float,
               timeout: float, deadline: float) -> tuple[list[dict], float]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=timeout)
    for _ in range(2):  # warm-up, not counted
        await one(client, -1, False)
    gate = asyncio.Semaphore(concurrency)
    every = round(1 / stream_share) if stream_share > 0 else 0

    async def gated(i: int) -> dict:
        async with gate:
            return await one(client, i, bool(every) and i % every == 0)

    started = time.perf_counter()
    rows = await asyncio.wait_for(asyncio.gather(*(gated(i) for i in range(requests))), deadline)
    elapsed = time.perf_counter() - started
    await client.close()
    return rows, elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16, help="client requests in flight")
    ap.add_argument("--server-concurrency", type=int, default=4, help="serve --concurrency")
    ap.add_argument("--max-queue", type=int, default=64, help="serve --max-queue")
    ap.add_argument("--stream-share", type=float, default=0.5)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    ap.add_argument("--deadline", type=float, default=900.0, help="seconds for the whole load")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if not 1 <= args.requests <= 10_000 or not 1 <= args.concurrency <= 256:
        ap.error("keep it bounded: 1-10000 requests, 1-256 in flight")

    controller, expert = tiny_pair()
    work = Path(tempfile.mkdtemp(prefix="rg-load-", dir="/tmp"))  # short: a Unix socket lives here
    config = work / "serve.toml"
    config.write_text(
        '[relays.relay-call-token]\nmax_tokens = 64\n'
        f'[relays.relay-call-token.agents.controller]\nmodel = "{controller}"\ndtype = "float32"\n'
        f'[relays.relay-call-token.agents.expert]\nmodel = "{expert}"\ndtype = "float32"\n')
    key = "sk-load-" + secrets.token_hex(8)
    port = free_port()
    env = {**os.environ, "RELAYGRAPH_API_KEY": key, "RELAYGRAPH_HOME": str(work / "home"),
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("REDIS_URL", None)
    command = [sys.executable, "-m", "relaygraph.cli", "serve", "--config", str(config),
               "--host", "127.0.0.1", "--port", str(port),
               "--concurrency", str(args.server_concurrency), "--max-queue", str(args.max_queue)]
    log_path = work / "server.log"
    load_before = os.getloadavg()
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        ready = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                raise SystemExit(f"server exited:\n{log_path.read_text()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > ready:
                raise SystemExit("server did not come up in 180 s")
            time.sleep(0.2)
        rows, elapsed = asyncio.run(load(url, key, args.requests, args.concurrency,
                                         args.stream_share, args.timeout, args.deadline))
        health = httpx.get(url + "/health", timeout=5).json()
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        subprocess.run([sys.executable, "-m", "relaygraph.cli", "store", "stop"], env=env,
                       capture_output=True, cwd=ROOT)
    load_after = os.getloadavg()
    log_text = log_path.read_text()
    shutil.rmtree(work, ignore_errors=True)

    latencies = [r["latency"] for r in rows if r["ok"]]
    ttfts = [r["ttft"] for r in rows if r["ok"] and r.get("ttft") is not None]
    errors = [r for r in rows if not r["ok"]]
    tokens = sum(r.get("tokens") or 0 for r in rows if r["ok"])
    kinds: dict[str, int] = {}
    for r in errors:
        kinds[r["error"].split(":")[0]] = kinds.get(r["error"].split(":")[0], 0) + 1
    ms = lambda v: None if v is None else round(v * 1000, 1)  # noqa: E731
    result = {
        "what": "relaygraph serve under load: tiny overfit relay pair (call-token, one 3-token "
                "call per answer), openai AsyncOpenAI client, loopback only",
        "command": " ".join(["python benchmarks/serve_load.py", *sys.argv[1:]]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {"requests": args.requests, "client_concurrency": args.concurrency,
                     "server_concurrency": args.server_concurrency, "max_queue": args.max_queue,
                     "streamed_share": args.stream_share, "store": "embedded valkey (unix socket)",
                     "api_key": True},
        "requests": len(rows),
        "errors": len(errors),
        "error_kinds": kinds,
        "wrong_or_failed_examples": [r["error"] for r in errors[:5]],
        "seconds": round(elapsed, 3),
        "throughput_rps": round(len(rows) / elapsed, 2),
        "completion_tokens_per_s": round(tokens / elapsed, 1),
        "completion_tokens": tokens,
        "latency_ms": {"p50": ms(percentile(latencies, 50)), "p90": ms(percentile(latencies, 90)),
                       "p99": ms(percentile(latencies, 99)), "max": ms(max(latencies, default=None)),
                       "mean": ms(statistics.fmean(latencies) if latencies else None)},
        "ttft_ms_streamed": {"n": len(ttfts), "p50": ms(percentile(ttfts, 50)),
                             "p99": ms(percentile(ttfts, 99))},
        "server_after": {k: health[k] for k in ("running", "queued")},
        "server_log": {"lines": log_text.count("\n"),
                       "api_key_in_log": key in log_text,
                       "errors_logged": log_text.count("internal error") + log_text.count("Traceback")},
        "machine": {"cpus": os.cpu_count(), "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in load_after],
                    "python": platform.python_version(), "platform": platform.platform()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("requests", "errors", "seconds", "throughput_rps",
                                             "latency_ms", "ttft_ms_streamed")}, indent=1))
    print(f"wrote {args.out}")
    return 1 if errors or result["server_log"]["api_key_in_log"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
