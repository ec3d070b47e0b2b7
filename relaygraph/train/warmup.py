"""Warm-up (paper section 3.1): teach the small model the ``<call>n</call>`` syntax on its own text.

1. Sample responses from the small model itself (no external corpus: no distribution shift).
2. Insert commands at random *token* positions (not only sentence boundaries), with
   n = d x 10^k (d in 1..9, k in 0..3) clipped to the tokens left after the position.
3. Supervised fine-tuning with TRL's ``SFTTrainer``, loss on the assistant turn only
   (command included), optionally through a LoRA adapter.

How many commands one response gets is drawn uniformly from ``min_calls..max_calls``
(default 0..3, as in the published code; the paper does not say).

``placement = "disagreement"`` (beyond the paper, after R2R's router labels) puts the
commands where the expert disagrees with the small model instead: the expert reads the
small model's own response teacher-forced, and a command goes before a token the expert
would not have written (its own choice ahead by at least ``min_margin`` nats; with
``numeric_only``, a choice that is a number), asking for the tokens to the end of that
line; responses graded correct get none (their disagreements did not matter).
``mask_called_tokens`` keeps the loss off the tokens a command hands to the expert (at
inference the expert writes them).

Output folder: ``samples.jsonl`` (resumable), ``expert_scores.jsonl`` (disagreement
placement, resumable), ``warmup.jsonl`` (the SFT data, readable), ``checkpoints/``
(resumable), ``adapter/`` (with ``[lora]``: the LoRA adapter alone) and ``model/`` (the
warmed-up controller, tokenizer and chat template).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from relaygraph.agents.agent import MATH_SYSTEM_PROMPT
from relaygraph.errors import ConfigError
from relaygraph.train.command_head import HeadSettings, train_command_head
from relaygraph.train.commands import (
    call_text,
    called_mask,
    insert_calls,
    on_char_boundary,
    splice_calls,
)
from relaygraph.train.data import (
    Dtype,
    LoraSettings,
    Strict,
    append_jsonl,
    is_correct,
    load_causal_lm,
    log_callback,
    pick_device,
    read_jsonl,
    read_questions,
    save_model,
    select,
)
from relaygraph.train.disagreement import (
    DisagreementSettings,
    ExpertScore,
    disagreement_calls,
    score_samples,
    token_tests,
)

Progress = Callable[[str], None]


class SftSettings(Strict):
    """The supervised stage (defaults: the published warm-up script)."""

    learning_rate: float = Field(5e-6, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: run the epochs)."""
    batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(8, ge=1)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    """Share of the steps with a rising learning rate."""
    save_steps: int = Field(100, ge=1)
    logging_steps: int = Field(10, ge=1)
    gradient_checkpointing: bool = False
    trl: dict[str, Any] = {}
    """Any other ``trl.SFTConfig`` field, passed as it is (e.g. ``bf16 = true``)."""


class WarmupSettings(Strict):
    """``relaygraph train warmup`` configuration."""

    model: str
    """The small model: catalog name, local folder or hub id."""
    data: Path
    """Question file (JSONL with ``question``; ``answer`` grades responses for
    ``placement = "disagreement"``)."""
    skip: int = Field(0, ge=0)
    limit: int | None = Field(None, ge=1)
    """Use questions ``skip .. skip + limit`` of the file (default: all)."""
    output_dir: Path
    system_prompt: str | None = MATH_SYSTEM_PROMPT
    """The controller's system prompt (the relay renders the same one)."""
    samples_per_question: int = Field(1, ge=1)
    max_tokens: int = Field(512, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    min_calls: int = Field(0, ge=0)
    max_calls: int = Field(3, ge=0)
    """Commands per response: drawn from ``min_calls..max_calls`` (random placement); at
    most ``max_calls`` (disagreement placement)."""
    placement: Literal["random", "disagreement"] = "random"
    """``random``: the paper's random token positions; ``disagreement``: where ``expert``
    disagrees with the small model's response (see the module docstring)."""
    expert: str | None = None
    """The expert whose disagreements place commands (``placement = "disagreement"``)."""
    expert_system_prompt: str | None = MATH_SYSTEM_PROMPT
    disagreement: DisagreementSettings = DisagreementSettings()
    mask_called_tokens: bool = False
    """No loss on the tokens after a command that it hands to the expert."""
    seed: int = 0
    dtype: Dtype = "float32"
    device: str = "auto"
    concurrency: int = Field(8, ge=1)
    """Responses sampled at once (their decode steps run as one batch)."""
    sft: SftSettings = SftSettings()
    lora: LoraSettings | None = None
    head: HeadSettings | None = None
    """Train only the command tokens' output rows on stored hidden states instead of
    fine-tuning (:mod:`relaygraph.train.command_head`; ``sft`` and ``lora`` unused)."""

    @model_validator(mode="after")
    def _calls_range(self) -> WarmupSettings:
        if self.min_calls > self.max_calls:
            raise ValueError("min_calls must be <= max_calls")
        if self.placement == "disagreement" and not self.expert:
            raise ValueError("placement = 'disagreement' needs an expert")
        if self.head is not None and self.lora is not None:
            raise ValueError("[head] trains the command rows of the output layer, [lora] an "
                             "adapter over the model: choose one")
        return self


def sample_responses(backend: Any, rows: Sequence[dict[str, Any]], settings: WarmupSettings,
                     done: set[tuple[int, int]], progress: Progress) -> list[dict[str, Any]]:
    """Sample ``samples_per_question`` responses per question from the small model (those
    in ``done`` are skipped); each sample has its own seed, so a rerun draws the same."""
    from relaygraph.agents.backend import Prompt, Sampling, StopRule

    todo = [(i, j) for i in range(len(rows)) for j in range(settings.samples_per_question)
            if (i, j) not in done]
    rule = StopRule(max_tokens=settings.max_tokens)

    def one(job: tuple[int, int]) -> dict[str, Any]:
        i, j = job
        sampling = Sampling(settings.temperature, settings.top_p,
                            seed=settings.seed * 1_000_003 + i * 1_009 + j)
        gen = backend.generate(Prompt(rows[i]["question"], settings.system_prompt), rule, sampling)
        return {"index": i, "sample": j, "response_ids": gen.token_ids, "text": gen.text,
                "finished": gen.finish_reason == "eos"}

    out: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []  # finished, not yet saved: saved a batch at a time

    def save() -> None:
        nonlocal pending
        if pending:
            append_jsonl(settings.output_dir / "samples.jsonl", pending)
            out.extend(pending)
            pending = []
            progress(f"sampled {len(done) + len(out)}/{len(done) + len(todo)} responses")

    with ThreadPoolExecutor(settings.concurrency) as pool:
        futures = [pool.submit(one, job) for job in todo]
        collected: set[Future[dict[str, Any]]] = set()
        try:
            for future in as_completed(futures):
                collected.add(future)
                pending.append(future.result())
                if len(pending) >= settings.concurrency:
                    save()
        finally:  # an error or an interrupt: nothing new starts, and what finishes is kept
            for future in futures:
                future.cancel()
            for future in futures:
                if future not in collected and not future.cancelled() and future.exception() is None:
                    pending.append(future.result())
            save()
    return out


def build_sft_rows(samples: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]], backend: Any,
                   settings: WarmupSettings,
                   scores: dict[tuple[int, int], ExpertScore] | None = None) -> list[dict[str, Any]]:
    """SFT examples: prompt ids (masked) + response with commands inserted (+ EOS) (trained;
    with ``mask_called_tokens`` the tokens each command hands to the expert are masked).

    Commands go at random positions, or (``placement = "disagreement"``, ``scores`` from
    :func:`score_with_expert`) at the expert's disagreements in responses graded wrong."""
    from relaygraph.agents.backend import Prompt

    rng = random.Random(settings.seed)
    eos = backend.tokenizer.eos_token_id
    line_end, numeric = token_tests(backend.decode)
    out = []
    for sample in sorted(samples, key=lambda s: (s["index"], s["sample"])):
        ids = sample["response_ids"]
        if not ids:
            continue
        row = rows[sample["index"]]
        prompt_ids = backend.render(Prompt(row["question"], settings.system_prompt))
        splittable = on_char_boundary(backend.decode, ids)
        correct = None
        if settings.placement == "disagreement":
            assert scores is not None
            correct = is_correct(sample["text"], row["answer"], complete=sample["finished"])
            insertions = [] if correct and not settings.disagreement.calls_on_correct else \
                disagreement_calls(ids, scores[sample["index"], sample["sample"]],
                                   [line_end(t) for t in ids], settings.disagreement,
                                   settings.max_calls, splittable, numeric)
            new_ids = splice_calls(ids, insertions, backend.encode)
        else:
            count = rng.randint(settings.min_calls, settings.max_calls)
            new_ids, insertions = insert_calls(ids, count, backend.encode, rng, splittable)
        mask = [1] * len(new_ids)
        if settings.mask_called_tokens:
            mask = called_mask(ids, insertions, backend.encode)
        response = new_ids + ([eos] if sample["finished"] else [])
        mask += [1] * (len(response) - len(new_ids))
        out.append({
            "question": row["question"], "text": backend.decode(new_ids),
            "calls": [[ins.position, ins.n] for ins in insertions],
            **({"correct": correct} if correct is not None else {}),
            "input_ids": prompt_ids + response,
            "completion_mask": [0] * len(prompt_ids) + mask,
        })
    return out


def run_warmup(settings: WarmupSettings, progress: Progress = print) -> Path:
    """Sample, insert, fine-tune; returns the folder of the warmed-up model (resumable)."""
    import json

    from relaygraph.agents.transformers_backend import TransformersBackend

    final = settings.output_dir / "model"
    if (final / "config.json").exists():
        progress(f"warm-up already finished: {final}")
        return final
    rows = select(read_questions(settings.data), settings.skip, settings.limit)
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(settings.device)
    backend = TransformersBackend(settings.model, dtype=settings.dtype, device=device)
    samples = [s for s in read_jsonl(settings.output_dir / "samples.jsonl") if s["index"] < len(rows)]
    done = {(s["index"], s["sample"]) for s in samples}
    samples += sample_responses(backend, rows, settings, done, progress)
    scores = None
    if settings.placement == "disagreement":
        scores = score_samples(settings, rows, samples, device, backend.tokenizer_id, progress)
    sft_rows = build_sft_rows(samples, rows, backend, settings, scores)
    (settings.output_dir / "warmup.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sft_rows))
    calls = sum(len(r["calls"]) for r in sft_rows)
    progress(f"warm-up data: {len(sft_rows)} responses, {calls} commands inserted")
    if settings.head is not None:  # on the model already loaded for sampling
        return train_command_head(settings.model, backend.model, sft_rows, settings.head,
                                  settings.output_dir, backend.encode, call_text, progress)
    del backend
    return finetune(settings, sft_rows, progress)


def finetune(settings: WarmupSettings, sft_rows: list[dict[str, Any]], progress: Progress) -> Path:
    """Fine-tune (resuming from the last checkpoint) and save the model to ``model/``."""
    from transformers.trainer_utils import get_last_checkpoint

    trainer = sft_trainer(settings, sft_rows)
    checkpoints = settings.output_dir / "checkpoints"
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.exists() else None
    if last:
        progress(f"resuming from {last}")
    trainer.train(resume_from_checkpoint=last)
    final = save_model(trainer.accelerator.unwrap_model(trainer.model), trainer.processing_class,
                       settings.output_dir / "model", adapter=settings.output_dir / "adapter")
    progress(f"warmed-up controller saved to {final}")
    return final


def sft_trainer(settings: WarmupSettings, sft_rows: list[dict[str, Any]]) -> Any:
    """TRL's ``SFTTrainer`` on pre-tokenized rows: loss where ``completion_mask`` is 1."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = load_causal_lm(settings.model, settings.dtype, settings.device)
    sft = settings.sft
    device = pick_device(settings.device)
    options: dict[str, Any] = {
        "output_dir": str(settings.output_dir / "checkpoints"), "completion_only_loss": True,
        "max_length": None, "learning_rate": sft.learning_rate, "num_train_epochs": sft.epochs,
        "max_steps": sft.max_steps, "per_device_train_batch_size": sft.batch_size,
        "gradient_accumulation_steps": sft.gradient_accumulation_steps,
        "warmup_steps": sft.warmup_ratio, "save_steps": sft.save_steps,
        "logging_steps": sft.logging_steps, "activation_checkpointing": sft.gradient_checkpointing,
        "seed": settings.seed, "report_to": "none",
        "use_cpu": device == "cpu", "bf16": device != "cpu",  # autocast on accelerators only
    } | sft.trl
    try:
        args = SFTConfig(**options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"sft settings: {exc}") from None
    dataset = Dataset.from_list([{"input_ids": r["input_ids"], "completion_mask": r["completion_mask"]}
                                 for r in sft_rows])
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                      peft_config=settings.lora.peft_config() if settings.lora else None,
                      callbacks=[log_callback(settings.output_dir / "log.jsonl")])
