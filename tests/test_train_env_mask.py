"""TRL really drops env_mask=0 tokens (the expert's, in a relay rollout) from the GRPO loss."""

from __future__ import annotations

from pathlib import Path


def _one_step_changes_the_model(controller: Path, out: Path, mask: int) -> bool:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    model = AutoModelForCausalLM.from_pretrained(controller)
    tokenizer = AutoTokenizer.from_pretrained(controller)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompt = tokenizer("What is 2 + 5?", add_special_tokens=False)["input_ids"]
    completion = tokenizer(" seven", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    def rollout(prompts: list[str], trainer: object) -> dict[str, list]:
        n = len(prompts)
        return {"prompt_ids": [prompt] * n, "completion_ids": [completion] * n,
                "logprobs": [[-1.0] * len(completion)] * n,
                "env_mask": [[mask] * len(completion)] * n}

    def reward(prompts: list, completions: list, **_: object) -> list[float]:
        return [float(i % 2) for i in range(len(prompts))]  # a group of 2: advantages +-1

    args = GRPOConfig(output_dir=str(out), num_generations=2, per_device_train_batch_size=2,
                      max_steps=1, learning_rate=1e-2, weight_decay=0.0, beta=0.0,
                      use_cpu=True, report_to="none", activation_checkpointing=False,
                      max_completion_length=len(completion) + 1, disable_tqdm=True, save_strategy="no")
    trainer = GRPOTrainer(model=model, args=args, train_dataset=Dataset.from_list([{"prompt": "q"}] * 2),
                          processing_class=tokenizer, reward_funcs=[reward], rollout_func=rollout)
    trainer.train()
    after = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    return any(not torch.equal(before[k], after[k]) for k in before)


def test_env_mask_zero_tokens_give_no_gradient(tiny_pair, tmp_path: Path) -> None:
    controller, _ = tiny_pair
    assert _one_step_changes_the_model(controller, tmp_path / "own", mask=1)
    assert not _one_step_changes_the_model(controller, tmp_path / "expert", mask=0)
