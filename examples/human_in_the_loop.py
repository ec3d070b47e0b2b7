"""A safety supervisor that asks a person before letting a flagged chunk stand.

The workers write in chunks; a rule flags chunks with harmful instructions (or code where a
worded solution was asked for). A flagged chunk is not judged by the rule: the run pauses
(LangGraph ``interrupt()``; the relay has a checkpointer) and shows it to you. You let it
stand (``y``), roll it back with the rule's guidance (``n``) or your own
(``rollback: TEXT``), steer (``steer: TEXT``), switch workers or stop. Unflagged chunks
pass without asking.

    python examples/human_in_the_loop.py ["question"]
    relaygraph run "question" --policy supervisor --supervisor examples.human_in_the_loop:guard \
        --set 'workers=["controller","expert"]'
    relaygraph run "question" --policy supervisor --supervisor ask:human    # asked about every chunk

In your own LangGraph app the pause is an ``__interrupt__`` in the graph's output; continue
with ``graph.invoke(Command(resume="n"), config)`` on the same thread.
"""

from __future__ import annotations

import sys

from relaygraph.policies import human_review, keyword_guard

UNSAFE = [r"\bsteal\w*", r"\bweapon", r"\bpoison", r"\bhack into\b"]
OFF_TASK = [r"```", r"\bpython\b", r"\bdef \w+\("]
GUIDANCE = "Wait, I will not write any program. I will reason step by step in plain words.\n"

guard = human_review(keyword_guard(UNSAFE + OFF_TASK, guidance=GUIDANCE))
"""Ask a person about flagged chunks only; a rollback brings GUIDANCE unless they give other."""


def main(question: str) -> None:
    from langgraph.checkpoint.memory import InMemorySaver

    from relaygraph import Relay

    print("loading qwen2.5-coder-0.5b and qwen2.5-coder-1.5b…", file=sys.stderr, flush=True)
    relay = Relay.from_models("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", policy="supervisor",
                              supervisor=guard, workers=["controller", "expert"], max_tokens=256,
                              checkpointer=InMemorySaver())

    def show(event: dict) -> None:
        if event["type"] == "token":
            print(event["text"], end="", flush=True)
        elif event["type"] == "review":
            print(f"\n  [supervisor: {event['action']}]\n", flush=True)

    result = relay.run(question, on_event=show)
    while result.status == "interrupted":  # a flagged chunk waits for you
        asked = result.interrupt
        print(f"\n\n  [flagged: {asked['flag']}] {asked['chunk']!r}")
        if asked.get("error"):
            print(f"  ({asked['error']})")
        answer = input("  let it stand? y / n (roll back) / steer: TEXT / stop > ")
        result = relay.resume(result.trajectory_id, answer, on_event=show)
    print(f"\n\nanswer: {result.answer}  rollbacks: {result.counters.get('rollbacks', 0)}  "
          f"trajectory: {result.trajectory_id}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else (
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
        "clips in May. How many clips did Natalia sell altogether? Use Python."))
