"""Where a sweep's policies hand tokens to the expert: per policy, the position of the first
expert token (tokens into the solution) and the quartiles of every expert turn's relative
position. Reads a sweep's items and their trajectories from the default store.

    python benchmarks/call_positions.py benchmarks/results/sweep-relay-64/items.jsonl \\
        "call-token shipped" "confidence(threshold=-0.5)"
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from relaygraph.cli.common import open_cli_store
from relaygraph.trajectory.models import Segment


def expert_positions(segments: list[Segment]) -> tuple[int | None, list[float]]:
    """Tokens before the first expert token (None: the expert never wrote), and each expert
    turn's start as a fraction of the solution (commands not counted)."""
    total = sum(s.n_tokens for s in segments if s.kind != "call") or 1
    position, first, starts = 0, None, []
    for seg in segments:
        if seg.author == "expert" and seg.n_tokens:
            starts.append(position / total)
            first = position if first is None else first
        if seg.kind != "call":
            position += seg.n_tokens
    return first, starts


def main(items: Path, policies: list[str]) -> None:
    store = open_cli_store(None)
    rows = [json.loads(line) for line in items.read_text().splitlines()]
    for policy in policies:
        firsts, starts = [], []
        for row in (r for r in rows if r["policy"] == policy):
            first, turns = expert_positions(store.load(row["trajectory_id"]).segments)
            firsts += [] if first is None else [first]
            starts += turns
        quartiles = [round(q, 2) for q in statistics.quantiles(starts, n=4)]
        print(f"{policy}: the expert wrote on {len(firsts)} problems; first expert token at "
              f"a median {statistics.median(firsts)} tokens; expert turns' relative positions, "
              f"quartiles {quartiles}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
