"""Teacher-free decoding of the shipped controller on the problems whose teacher-free run
ran to the budget in ``benchmarks/results/sweep-relay-first`` (then the ban stopped only
``<call>``'s last token).

    python benchmarks/teacher_free_check.py [N]   # the first N such problems (default 6)

Prints each problem's finish reason, tokens, whether it is right and the answer's tail.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from relaygraph import Relay
from relaygraph.eval.checking import check
from relaygraph.eval.datasets import load_problems

ITEMS = Path(__file__).parent / "results" / "sweep-relay-first" / "items.jsonl"
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k_test.jsonl"


def main(n: int = 6) -> None:
    items = [json.loads(line) for line in ITEMS.open()]
    ran_out = [d["problem"] for d in items
               if d["policy"] == "call-token shipped teacher-free" and d["finish_reason"] == "budget"]
    problems = {p.id: p for p in load_problems(DATA, limit=32, seed=0)}
    chosen = [problems[i] for i in ran_out[:n]]
    relay = Relay.from_models(teacher_free=True)
    start = time.time()
    for p, r in zip(chosen, relay.run_many([p.question for p in chosen], concurrency=n)):
        print(p.id, r.finish_reason, r.tokens_by_agent, check(r.answer, p).correct,
              repr(r.answer[-80:]))
    print(f"{time.time() - start:.0f} s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 6)
