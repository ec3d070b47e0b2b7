"""Run :class:`~relaygraph.agents.vllm_backend.VLLMBackend` inside the vllm venv (its own
torch/transformers), for ``tests/test_openai_backend.py``.

Reads a JSON spec on stdin — ``{"model", "engine_args", "cases": [{"question",
"system_prompt", "continuation", "max_tokens", "stop", "refuse_at"}], "concurrent": n}`` —
and prints one JSON line: ``{"load_seconds", "results": [...], "concurrent": [...]}``.
Each case runs twice in a row (the second shows the engine's prefix cache); ``concurrent``
runs the first case that many times at once from threads.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def main() -> None:
    from relaygraph.agents.backend import Prompt, StopRule
    from relaygraph.agents.vllm_backend import VLLMBackend
    from relaygraph.trajectory.models import Segment

    spec = json.loads(sys.stdin.read())
    start = time.perf_counter()
    backend = VLLMBackend(spec["model"], **spec.get("engine_args", {}))
    load_seconds = time.perf_counter() - start

    def run(case: dict[str, Any]) -> dict[str, Any]:
        prompt = Prompt(case["question"], case.get("system_prompt"),
                        tuple(Segment.model_validate(s) for s in case.get("continuation", [])))
        refuse_at = case.get("refuse_at")
        rule = StopRule(case["max_tokens"], tuple(case.get("stop", ())),
                        None if refuse_at is None else (lambda step: step.position == refuse_at))
        pieces: list[str] = []
        g = backend.generate(prompt, rule, on_text=pieces.append)
        return {"token_ids": g.token_ids, "text": g.text, "logprobs": g.logprobs,
                "finish_reason": g.finish_reason, "prompt_tokens": g.prompt_tokens,
                "prefilled_tokens": g.prefilled_tokens, "cached_tokens": g.extra["cached_tokens"],
                "rejected": None if g.rejected is None else g.rejected.token_id,
                "pieces": pieces, "seconds": g.seconds, "tokenizer": g.tokenizer}

    results = [[run(case), run(case)] for case in spec["cases"]]
    concurrent = []
    if spec.get("concurrent"):
        with ThreadPoolExecutor(spec["concurrent"]) as pool:
            concurrent = list(pool.map(run, [spec["cases"][0]] * spec["concurrent"]))
    backend.close()
    print(json.dumps({"load_seconds": load_seconds, "results": results,
                      "concurrent": concurrent, "tokenizer_id": backend.tokenizer_id}))


if __name__ == "__main__":  # vLLM starts worker processes: the guard is required
    main()
