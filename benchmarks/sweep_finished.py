"""A sweep's tables over the problems on which every run policy finished.

For a sweep stopped before it finished (here: at a session's deadline), this writes the
sweep's own ``results.json``, ``table.md`` and ``curve.png`` (relaygraph.eval's assemble and
report functions, unchanged) over the problems every policy completed, and says so in the
table. The shipped controller's table in the README came from

    python benchmarks/sweep_finished.py benchmarks/sweep_relay.toml \
        benchmarks/results/sweep-relay300 benchmarks/results/sweep-relay
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from relaygraph.eval import sweep as S
from relaygraph.eval.datasets import load_problems
from relaygraph.eval.report import write_sweep

DATASET = "/work/shared/data/gsm8k_test.jsonl"


def main(config: Path, items_dir: Path, out: Path, dataset: str = DATASET) -> str:
    sweep = S.SweepConfig.load(config, dataset=dataset)
    plans = S.plan(sweep)
    items: dict[str, dict[str, Any]] = {p.name: {} for p in plans}
    for line in (items_dir / "items.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["policy"] in items:
            items[record["policy"]][record["problem"]] = record
    problems = [p for p in load_problems(sweep.dataset, sweep.limit, sweep.seed)
                if all(p.id in items[plan.name] for plan in plans)]
    items = {name: {p.id: done[p.id] for p in problems} for name, done in items.items()}
    derived = S.derive_routers(sweep, problems, items["solo-small"], items["solo-large"])
    result = S.assemble(sweep, problems, plans, items, derived, {})
    result["finished_subset"] = (f"{len(problems)} of the {sweep.limit} problems: those on which "
                                 "every run policy finished before the sweep was stopped")
    out.mkdir(parents=True, exist_ok=True)
    markdown = write_sweep(result, out)
    note = f"*{result['finished_subset']}.*\n\n"
    (out / "table.md").write_text(note + (out / "table.md").read_text())
    return note + markdown


if __name__ == "__main__":
    print(main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])))
