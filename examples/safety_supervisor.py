"""A safety supervisor: a rule guard rolls back unsafe or off-task steps and steers the worker.

The worker writes in chunks (a paragraph, at most 48 tokens). After each chunk the guard
checks it: harmful instructions, or code where a worded solution was asked for, are rolled
back (kept in the store, marked retracted, gone from every view) and the worker is steered
with guidance it sees before it writes again.

    python examples/safety_supervisor.py ["question"]
    relaygraph run "question" --policy supervisor --supervisor examples.safety_supervisor:guard \
        --set 'workers=["controller","expert"]'

The guard is a plain function ``(Review) -> Verdict | None``; write your own the same way
(a regex, a classifier, a call to a moderation model).
"""

from __future__ import annotations

import sys

from relaygraph import Relay
from relaygraph.policies import Review, Verdict, keyword_guard

UNSAFE = [r"\bsteal\w*", r"\bweapon", r"\bpoison", r"\bhack into\b"]
OFF_TASK = [r"```", r"\bpython\b", r"\bdef \w+\("]
# Guidance is written in the worker's own voice, so it reads as the next step of its
# reasoning (a "Wait, ..." thought) rather than as text to echo.
GUIDANCE = "Wait, I will not write any program. I will reason step by step in plain words.\n"

_rule = keyword_guard(UNSAFE + OFF_TASK, guidance=GUIDANCE, action="rollback")


def guard(review: Review) -> Verdict | None:
    """Roll back and steer; if the worker offends again after being steered, roll back and
    hand the pen to the other worker (the expert)."""
    verdict = _rule(review)
    if verdict is None:
        return None
    steered = any(s.kind == "steer" for s in review.segments)
    if steered and review.worker == "controller":
        return verdict.model_copy(update={"worker": "expert"})
    return verdict


if __name__ == "__main__":
    question = sys.argv[1] if len(sys.argv) > 1 else (
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
        "clips in May. How many clips did Natalia sell altogether? Use Python.")
    print("loading qwen2.5-coder-0.5b and qwen2.5-coder-1.5b…", file=sys.stderr, flush=True)
    relay = Relay.from_models("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", policy="supervisor",
                              supervisor="examples.safety_supervisor:guard",
                              workers=["controller", "expert"], max_tokens=256)

    def show(event: dict) -> None:
        if event["type"] == "token":
            print(event["text"], end="", flush=True)
        elif event["type"] == "review":
            print(f"\n  [supervisor: {event['action']}]\n", flush=True)

    result = relay.run(question, on_event=show)
    print(f"\n\nanswer: {result.answer}  rollbacks: {result.counters.get('rollbacks', 0)}  "
          f"trajectory: {result.trajectory_id}")
