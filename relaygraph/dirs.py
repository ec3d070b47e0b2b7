"""Where relaygraph keeps per-user files (XDG layout, overridable by environment)."""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """Per-user data (the embedded store's files): ``$RELAYGRAPH_HOME`` or XDG data home."""
    if home := os.environ.get("RELAYGRAPH_HOME"):
        return Path(home).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "relaygraph"


def cache_dir() -> Path:
    """Per-user cache (pulled and converted model weights): ``$RELAYGRAPH_CACHE`` or XDG cache."""
    if cache := os.environ.get("RELAYGRAPH_CACHE"):
        return Path(cache).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "relaygraph"


def results_dir() -> Path:
    """Per-user results of ``relaygraph bench`` and ``relaygraph eval`` (when no ``--out`` is
    given): ``data_dir()/results``, never the folder the command happens to run in."""
    return data_dir() / "results"
