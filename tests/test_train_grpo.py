"""A 2-step GRPO run on a tiny controller/expert pair on CPU: rollouts go through the relay
and the store, the model changes, checkpoints let a longer run resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from relaygraph.train.grpo import TRAIN_NAMESPACE, GrpoSettings, run_grpo
from tests import tiny_models as tiny


def test_two_grpo_steps_then_resume(tiny_pair, redis_server, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from relaygraph.trajectory import RedisStore

    controller, expert = tiny_pair
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": tiny.QUESTION, "answer": "7"}) + "\n"
                    + json.dumps({"question": tiny.NOCALL_QUESTION, "answer": "2"}) + "\n")
    settings = GrpoSettings(
        controller=str(controller), expert=str(expert), data=data, output_dir=tmp_path / "grpo",
        system_prompt=tiny.SYSTEM_PROMPT, expert_system_prompt=tiny.SYSTEM_PROMPT,
        num_generations=4, questions_per_step=2, max_tokens=48, learning_rate=1e-3,
        max_steps=2, save_steps=1, device="cpu", redis=redis_server.url,
        trl={"disable_tqdm": True})
    store = RedisStore.from_url(redis_server.url, namespace=TRAIN_NAMESPACE)
    earlier = set(store.list_ids(limit=10_000))  # other tests share the server
    lines: list[str] = []
    final = run_grpo(settings, progress=lines.append)

    assert [line.split(":")[0] for line in lines if line.startswith("step")] == ["step 1/2", "step 2/2"]
    # each step: 2 questions x 4 relay runs, each a trajectory in the training namespace
    assert len(set(store.list_ids(limit=10_000)) - earlier) == 2 * 2 * 4
    before = AutoModelForCausalLM.from_pretrained(controller).state_dict()
    after = AutoModelForCausalLM.from_pretrained(final).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert {p.name for p in (tmp_path / "grpo" / "checkpoints").iterdir()} >= {"checkpoint-1", "checkpoint-2"}

    # a longer run picks up from the last checkpoint and does only the missing step
    shutil.rmtree(final)
    more: list[str] = []
    run_grpo(settings.model_copy(update={"max_steps": 3}), progress=more.append)
    assert any(line.startswith("resuming from") and line.endswith("checkpoint-2") for line in more)
    assert [line.split(":")[0] for line in more if line.startswith("step")] == ["step 3/3"]
    assert run_grpo(settings, progress=more.append) == final and more[-1].startswith("GRPO already")
