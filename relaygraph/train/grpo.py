"""GRPO with collaborative rollouts (paper section 3.2), on TRL's ``GRPOTrainer``.

Each rollout is a real relay run (``Relay.run``, the call-token policy, the trajectory
store): the model being trained is the controller, a frozen expert answers its calls. The
completion the trainer scores is the whole shared response, expert tokens included (the
controller conditioned on them), with ``env_mask`` = 0 on the expert's tokens so only the
controller's own tokens, its ``<call>n</call>`` commands included, carry the loss.

Differences from the published code, on purpose:
- the call ratio counts the tokens the expert actually *served* (a call for 100 tokens the
  expert ends after 12 costs 12), not the requested ``n``;
- expert tokens are masked from the loss (the published code trains on them as if the
  controller had written them);
- the difficulty-aware scenario is decided per group of one question's samples, as the
  paper defines it (the published reward function decides it over the whole batch);
- a response the budget cut off counts as wrong: otherwise text padded after the answer
  dilutes the call ratio.

The controller and the expert must share a tokenizer (same family): token ids pass between
them unchanged, so the ids the trainer scores are exactly the ones the controller saw.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from relaygraph.agents.agent import MATH_SYSTEM_PROMPT, Agent
from relaygraph.agents.backend import Prompt, Sampling
from relaygraph.agents.transformers_backend import TransformersBackend
from relaygraph.errors import ConfigError
from relaygraph.policies.call_token import CallTokenPolicy
from relaygraph.relay import Relay, RunResult
from relaygraph.train import rewards
from relaygraph.train.data import (
    Dtype,
    LoraSettings,
    Strict,
    is_correct,
    load_adapter,
    load_causal_lm,
    log_callback,
    pick_device,
    read_questions,
    save_model,
    select,
)
from relaygraph.trajectory.models import Segment, active, reasoning_text

Progress = Callable[[str], None]
CONTROLLER, EXPERT = "controller", "expert"
TRAIN_NAMESPACE = "relaygraph-train"
"""Store namespace of training rollouts (kept apart from `relaygraph show`'s runs)."""


PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"max_tokens": 512, "max_call_tokens": 1024, "max_calls": 32},
    "paper": {"max_tokens": 8192, "max_call_tokens": None, "max_calls": 2},
}
"""Lengths and turn limits per preset (any field set explicitly wins):

- ``paper``: RelayLLM's appendix E — responses up to 8192 tokens, no per-call cap but the
  remaining budget, and the published training rollouts' 3 small-model turns (2 calls);
- ``cpu`` (the default): sized for training on a few CPU cores — 512-token responses, calls
  of at most 1024 tokens, no practical limit on calls.

Both use the paper's optimisation settings (group size 8, 32 questions a step, AdamW at a
constant learning rate of 1e-6 with weight decay 0.01, KL coefficient 0.01, sampling at
temperature 1.0)."""


class GrpoSettings(Strict):
    """``relaygraph train grpo`` configuration: the paper's optimisation settings, lengths
    from ``preset`` (see :data:`PRESETS`)."""

    preset: Literal["cpu", "paper"] = "cpu"
    controller: str
    """The warmed-up small model (``relaygraph train warmup``'s ``model/`` folder), or the
    base model that ``adapter`` was trained on."""
    adapter: Path | None = None
    """A LoRA adapter (peft folder, e.g. the warm-up's ``adapter/``) applied to
    ``controller`` and trained further, instead of a new one from ``[lora]``: the result
    stays one adapter of the same rank."""
    expert: str
    data: Path
    """Question file, e.g. the output of ``relaygraph train filter``."""
    skip: int = Field(0, ge=0)
    limit: int | None = Field(None, ge=1)
    """Use questions ``skip .. skip + limit`` of the file (default: all)."""
    output_dir: Path
    system_prompt: str | None = MATH_SYSTEM_PROMPT
    expert_system_prompt: str | None = MATH_SYSTEM_PROMPT
    reward: Literal["difficulty-aware", "simple"] = "difficulty-aware"
    num_generations: int = Field(8, ge=2)
    questions_per_step: int = Field(32, ge=1)
    """Questions per optimizer step (each sampled ``num_generations`` times)."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Split a step's completions into this many forward/backward passes (memory); the
    rollouts of the whole step still run together."""
    max_tokens: int = Field(512, ge=1)
    """Budget of one rollout's response, controller and expert tokens together."""
    max_call_tokens: int | None = Field(1024, ge=1)
    """Most tokens one call may ask for (None: only the remaining budget limits it)."""
    max_calls: int = Field(32, ge=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    expert_temperature: float = Field(0.0, ge=0)
    learning_rate: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    beta: float = Field(0.01, ge=0)
    """KL coefficient against the starting model."""
    epochs: float = Field(1.0, gt=0)
    max_steps: int = -1
    save_steps: int = Field(50, ge=1)
    logging_steps: int = Field(1, ge=1)
    seed: int = 0
    dtype: Dtype = "float32"
    expert_dtype: Dtype | None = None
    """Default: ``dtype``."""
    device: str = "auto"
    redis: str | None = None
    """Store for the rollouts' trajectories (default: $REDIS_URL, else the embedded server)."""
    lora: LoraSettings | None = None
    trl: dict[str, Any] = {}
    """Any other ``trl.GRPOConfig`` field, passed as it is (e.g. ``bf16 = true``)."""

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        if isinstance(data, dict):
            preset = PRESETS.get(str(data.get("preset", "cpu")), {})
            data = {**preset, **data}
        return data

    @model_validator(mode="after")
    def _passes(self) -> GrpoSettings:
        if self.adapter is not None and self.lora is not None:
            raise ValueError("give either adapter (train an existing LoRA adapter further) or "
                             "[lora] (a new one), not both")
        if (self.questions_per_step * self.num_generations) % self.gradient_accumulation_steps:
            raise ValueError("gradient_accumulation_steps must divide questions_per_step x "
                             "num_generations")
        return self


@dataclass
class Rollout:
    """One relay run as the trainer sees it."""

    prompt_ids: list[int]
    completion_ids: list[int]
    env_mask: list[int]
    """1 on the controller's tokens (commands included), 0 on the expert's."""
    logprobs: list[float | None]
    """The controller's sampling log-probs; None where the expert wrote (or for EOS)."""
    call_ratio: float
    """Expert tokens served / response tokens."""
    answer: str
    text: str
    """The reasoning as the graders read it (what is shown: commands and rollbacks out)."""
    trajectory_id: str
    finished: bool
    """The run ended with EOS (not cut off by the budget)."""


def to_rollout(result: RunResult, segments: Sequence[Segment], prompt_ids: list[int],
               eos_id: int, controller: str = CONTROLLER) -> Rollout:
    """The trainer's view of a finished run: token ids in trajectory order, masked by author.

    The EOS that ended the run is appended (owned by the agent that wrote it), so the
    trainer sees terminated completions as terminated.
    """
    segments = active(segments)
    ids: list[int] = []
    mask: list[int] = []
    logps: list[float | None] = []
    for seg in segments:
        if seg.token_ids is None:
            raise ConfigError(f"trajectory {result.trajectory_id}: a segment without token ids")
        own = seg.author == controller
        ids += seg.token_ids
        mask += [int(own)] * len(seg.token_ids)
        logps += list(seg.logprobs) if own and seg.logprobs else [None] * len(seg.token_ids)
    served = len(ids) - sum(mask)
    ratio = served / len(ids) if ids else 0.0
    if result.finish_reason == "eos":
        last = segments[-1] if segments else None
        # an agent that stopped at once left no segment: the controller at the start, the
        # expert right after a call
        author = (controller if last is None else last.author if last.finish_reason == "eos"
                  else last.meta.get("step", {}).get("to"))
        ids.append(eos_id)
        mask.append(int(author == controller))
        logps.append(None)
    return Rollout(prompt_ids, ids, mask, logps, ratio, result.answer,
                   reasoning_text(active(segments)), result.trajectory_id,
                   result.finish_reason == "eos")


class RelayRollouts:
    """TRL ``rollout_func``: one real relay run per prompt (TRL repeats each prompt
    ``num_generations`` times itself), run concurrently so decode steps batch."""

    def __init__(self, expert: Agent, store: Any, max_tokens: int, temperature: float,
                 top_p: float, system_prompt: str | None, max_call_tokens: int | None = 1024,
                 max_calls: int = 32) -> None:
        self.expert = expert
        self.store = store
        self.max_tokens = max_tokens
        self.sampling = Sampling(temperature, top_p)
        self.system_prompt = system_prompt
        self.policy = CallTokenPolicy(controller=CONTROLLER, expert=expert.name,
                                      max_call_tokens=max_call_tokens, max_calls=max_calls)

    def __call__(self, prompts: list[str], trainer: Any) -> dict[str, list[Any]]:
        from trl.models import unwrap_model_for_generation

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TRL asks for transformers' old names
            with unwrap_model_for_generation(
                    trainer.model_wrapped, trainer.accelerator,
                    gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs) as model:
                training = model.training
                model.eval()  # no dropout; with checkpointing off the KV cache is used
                try:
                    rollouts = self.run(TransformersBackend.from_loaded(
                        model, trainer.processing_class, "policy", cache_size=256), prompts)
                finally:
                    model.train(training)
        return {
            "prompt_ids": [r.prompt_ids for r in rollouts],
            "completion_ids": [r.completion_ids for r in rollouts],
            "logprobs": [r.logprobs for r in rollouts],
            "env_mask": [r.env_mask for r in rollouts],
            "call_ratio": [r.call_ratio for r in rollouts],
            "relay_text": [r.text for r in rollouts],
            "finished": [r.finished for r in rollouts],
            "trajectory_id": [r.trajectory_id for r in rollouts],
        }

    def run(self, backend: TransformersBackend, questions: Sequence[str]) -> list[Rollout]:
        """Relay runs of ``questions`` with ``backend`` as the controller."""
        if backend.tokenizer_id != getattr(self.expert.backend, "tokenizer_id", None):
            raise ConfigError("the controller and the expert must share a tokenizer for GRPO "
                              "(token ids pass between them unchanged)")
        controller = Agent(CONTROLLER, backend, self.system_prompt, self.sampling)
        relay = Relay([controller, self.expert], self.policy, self.store, self.max_tokens)
        results = relay.run_many(questions, concurrency=max(1, len(questions)))
        eos = backend.tokenizer.eos_token_id
        return [to_rollout(r, self.store.read(r.trajectory_id),
                           backend.render(Prompt(q, self.system_prompt)), eos)
                for q, r in zip(questions, results, strict=True)]


# rewards ------------------------------------------------------------------------------------
class GroupReward:
    """A TRL reward function: RelayLLM's reward from the relay's answer and call ratio.

    Groups are the ``num_generations`` consecutive completions of one prompt (TRL's
    layout); with several processes the group's samples are gathered first. A response the
    budget cut off counts as wrong even if an answer is in it: otherwise text padded after
    the answer dilutes the call ratio (a controller learned exactly that in the miniature).
    """

    def __init__(self, kind: Literal["difficulty-aware", "simple"], num_generations: int) -> None:
        self.kind = kind
        self.num_generations = num_generations
        self.__name__ = kind.replace("-", "_")

    def __call__(self, prompts: list[Any], completions: list[Any], answer: list[str],
                 relay_text: list[str], call_ratio: list[float], finished: list[bool],
                 **_: Any) -> list[float]:
        correct = graded(answer, relay_text, finished)
        if self.kind == "simple":
            return [rewards.simple(c, r) for c, r in zip(correct, call_ratio, strict=True)]
        all_correct, all_ratios, offset = _gather(correct, list(call_ratio))
        g = self.num_generations
        if len(all_correct) % g:
            raise ValueError(f"{len(all_correct)} completions do not split into groups of {g}")
        out: list[float] = []
        for start in range(0, len(all_correct), g):
            out += rewards.difficulty_aware(all_correct[start:start + g], all_ratios[start:start + g])
        return out[offset:offset + len(correct)]


def graded(answer: list[str], relay_text: list[str], finished: list[bool]) -> list[bool]:
    """Right answer (graded as evaluation grades) in a finished response."""
    return [done and is_correct(text, gold)
            for gold, text, done in zip(answer, relay_text, finished, strict=True)]


def accuracy(prompts: list[Any], completions: list[Any], answer: list[str],
             relay_text: list[str], finished: list[bool], **_: Any) -> list[float]:
    """Logged with weight 0: is the relay's answer right (and finished)."""
    return [float(c) for c in graded(answer, relay_text, finished)]


def call_ratio_metric(prompts: list[Any], completions: list[Any], call_ratio: list[float],
                      **_: Any) -> list[float]:
    """Logged with weight 0: the call ratio."""
    return list(call_ratio)


call_ratio_metric.__name__ = "call_ratio"


def _gather(correct: list[bool], ratios: list[float]) -> tuple[list[bool], list[float], int]:
    from accelerate.state import PartialState

    state = PartialState()
    if state.num_processes == 1:
        return correct, ratios, 0
    from accelerate.utils import gather_object

    return (gather_object(correct), gather_object(ratios),
            state.process_index * len(correct))


# the stage --------------------------------------------------------------------------------
def run_grpo(settings: GrpoSettings, progress: Progress = print) -> Path:
    """Train the controller; returns the folder of the trained model (resumable)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_utils import get_last_checkpoint
    from trl import GRPOConfig, GRPOTrainer

    from relaygraph.trajectory import open_store

    final = settings.output_dir / "model"
    if (final / "config.json").exists():
        progress(f"GRPO already finished: {final}")
        return final
    rows = select(read_questions(settings.data), settings.skip, settings.limit)
    device = pick_device(settings.device)
    model, tokenizer = load_causal_lm(settings.controller, settings.dtype, device)
    if settings.adapter is not None:
        model = load_adapter(model, settings.adapter)
    expert = Agent(EXPERT, TransformersBackend(settings.expert, settings.expert_dtype or settings.dtype,
                                               device), settings.expert_system_prompt,
                   Sampling(settings.expert_temperature))
    rollouts = RelayRollouts(expert, open_store(settings.redis, namespace=TRAIN_NAMESPACE),
                             settings.max_tokens, settings.temperature, settings.top_p,
                             settings.system_prompt, settings.max_call_tokens, settings.max_calls)
    checkpoints = settings.output_dir / "checkpoints"
    completions = settings.questions_per_step * settings.num_generations
    options: dict[str, Any] = {
        "output_dir": str(checkpoints), "num_generations": settings.num_generations,
        "per_device_train_batch_size": completions // settings.gradient_accumulation_steps,
        "gradient_accumulation_steps": settings.gradient_accumulation_steps,
        "learning_rate": settings.learning_rate,
        "lr_scheduler_type": "constant", "weight_decay": settings.weight_decay,
        "beta": settings.beta, "temperature": settings.temperature, "top_p": settings.top_p,
        "max_completion_length": settings.max_tokens + 1, "num_train_epochs": settings.epochs,
        "max_steps": settings.max_steps, "save_steps": settings.save_steps,
        "logging_steps": settings.logging_steps, "seed": settings.seed, "report_to": "none",
        "activation_checkpointing": False, "reward_weights": [1.0, 0.0, 0.0],
        "use_cpu": device == "cpu", "bf16": device != "cpu",  # autocast on accelerators only
    } | settings.trl
    try:
        args = GRPOConfig(**options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"GRPO settings: {exc}") from None
    dataset = Dataset.from_list([{"prompt": r["question"], "answer": r["answer"]} for r in rows])

    class Report(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
            logs = logs or {}
            if "reward" in logs:
                progress(f"step {state.global_step}/{state.max_steps}: reward {logs['reward']:.3f}"
                         f" · accuracy {logs.get('rewards/accuracy/mean', float('nan')):.2f}"
                         f" · call ratio {logs.get('rewards/call_ratio/mean', float('nan')):.3f}")

    trainer = GRPOTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
        reward_funcs=[GroupReward(settings.reward, settings.num_generations), accuracy,
                      call_ratio_metric],
        rollout_func=rollouts, peft_config=settings.lora.peft_config() if settings.lora else None,
        callbacks=[Report(), log_callback(settings.output_dir / "log.jsonl")])
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.exists() else None
    if last:
        progress(f"resuming from {last}")
    trainer.train(resume_from_checkpoint=last)
    path = save_model(trainer.accelerator.unwrap_model(trainer.model), tokenizer, final,
                      adapter=settings.output_dir / "adapter")
    progress(f"trained controller saved to {path}: relaygraph run --policy call-token "
             f"--controller {path} --expert {settings.expert}")
    return path
