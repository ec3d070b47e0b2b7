"""The real transformers backend, slowed down: every token waits ``delay`` seconds (and is
counted), so a run is still going when a test disconnects, fills a queue, or acts on it
from another process.

``SlowTransformersConfig`` is the ``slow-transformers`` backend for config files. A test
that starts ``relaygraph serve`` in a subprocess registers it the way any installed plugin
is registered — an entry point in the ``relaygraph.backends`` group — with
:func:`plugin_path`: a folder holding that entry point, to put on ``PYTHONPATH``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Literal

from relaygraph.agents.backend import Sampling
from relaygraph.agents.transformers_backend import TransformersBackend, TransformersConfig


class SlowBackend:
    """A real backend that sleeps ``delay`` seconds per token (and counts its tokens)."""

    def __init__(self, inner: TransformersBackend, delay: float) -> None:
        self.inner = inner
        self.delay = delay
        self.checked = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def generate(self, prompt, rule, sampling=Sampling(), on_text=None, cache_key=None):
        inner_check = rule.check

        def check(step):
            self.checked += 1
            time.sleep(self.delay)
            return inner_check(step) if inner_check is not None else False

        return self.inner.generate(prompt, dataclasses.replace(rule, check=check), sampling,
                                   on_text, cache_key)


class SlowTransformersConfig(TransformersConfig):
    """``backend = "slow-transformers"``: local weights, ``delay`` seconds per token."""

    backend: Literal["slow-transformers"] = "slow-transformers"  # type: ignore[assignment]
    delay: float = 0.2

    def key(self) -> tuple[Any, ...]:
        return ("slow-transformers", self.model, self.dtype, self.delay)

    def build(self) -> Any:
        return SlowBackend(TransformersBackend(self.model, dtype=self.dtype), self.delay)


def plugin_path(folder: Path) -> Path:
    """A folder with a distribution whose ``relaygraph.backends`` entry point is the slow
    backend (what ``pip install`` of a plugin package would leave in site-packages)."""
    info = folder / "relaygraph_test_slow-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: relaygraph-test-slow\nVersion: 0\n")
    (info / "entry_points.txt").write_text(
        "[relaygraph.backends]\nslow-transformers = tests.slow_backend:SlowTransformersConfig\n")
    return folder
