"""Head-only warm-up: the warm-up's supervised loss with only the output rows of the
command's tokens trainable (beyond the paper; sized for a CPU).

The paper's warm-up fine-tunes the whole model on its own responses with commands inserted.
On a 2-core CPU one forward and backward pass of a 0.5B controller over a 400-token
response takes ~20 s, and moving the command's first token from rank ~1000 to the top
takes hundreds of steps. Here the same next-token loss trains only the rows of the output
layer (``lm_head``) for the tokens commands are made of (``<call>``, ``</call>``, the
digits). The hidden states do not depend on those rows, so each response is read once (one
forward pass, no backward) and the loss is a small convex problem over the stored states:
seconds per epoch. Its exact full-softmax form needs, per position, only the hidden state,
the command tokens' logits and the log-sum-exp of all other logits.

The update has rank <= the number of command tokens and is saved as a LoRA adapter on
``lm_head`` (peft's format), merged at load like any adapter; the hidden states, hence
everything the controller writes outside the command tokens' logits, stay the base
model's. ``call_weight`` weighs the positions where a command begins (the decision to
call) against the others: greedy decoding calls only where the first command token
becomes the most likely one, so the weight sets how often the controller calls; the log
reports, on held-out responses, how often the greedy controller would call and how close
to the placed command.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import Field

from relaygraph.train.data import Strict, append_jsonl

Progress = Callable[[str], None]


class HeadSettings(Strict):
    """``[warmup.head]``: train the command tokens' output rows instead of the model."""

    steps: int = Field(300, ge=1)
    """Full-batch optimizer steps (Adam) over the stored hidden states."""
    learning_rate: float = Field(0.02, gt=0)
    """On standardized hidden states."""
    weight_decay: float = Field(1e-4, ge=0)
    """L2 penalty on the update (standardized units)."""
    call_weight: float = Field(20.0, gt=0)
    """Weight of the positions where a command begins, relative to every other position."""
    validation: float = Field(0.2, ge=0, lt=1)
    """Share of the responses held out to report call rates on (the last ones)."""
    rank: int | None = Field(None, ge=1)
    """Rank of the saved update (default: full, the number of command tokens)."""
    on_time: int = Field(8, ge=0)
    """A predicted call counts as on time within this many tokens of the placed one."""


def command_tokens(encode: Callable[[str], list[int]], call_text: Callable[[int], str]) -> list[int]:
    """The ids commands are made of: the tags and every digit a length can use."""
    ids: set[int] = set()
    for n in (1, 23, 45, 67, 89, 100, 1000):
        ids.update(encode(call_text(n)))
    for digit in "0123456789":
        ids.update(encode(digit))
    return sorted(ids)


def read_states(model: Any, rows: Sequence[dict[str, Any]], vocab_rows: Sequence[int],
                progress: Progress, cache: Path | None = None) -> dict[str, Any]:
    """One forward pass per row: for each trained position (``completion_mask`` of the
    next token is 1) the hidden state entering ``lm_head``, the command tokens' logits,
    the log-sum-exp and max of all other logits, the label (index into ``vocab_rows`` or
    -1) and its logit. Rows already in ``cache`` (a folder; one file per row's content)
    are read back."""
    import torch

    rows_ids = torch.tensor(list(vocab_rows))
    others = torch.ones(model.lm_head.weight.shape[0], dtype=torch.bool)
    others[rows_ids] = False
    index = {t: i for i, t in enumerate(vocab_rows)}
    parts: list[dict[str, Any]] = []
    captured: list[Any] = []
    hook = model.lm_head.register_forward_hook(lambda _m, inp, _out: captured.append(inp[0]))
    try:
        for number, row in enumerate(rows):
            ids = row["input_ids"]
            mask = row["completion_mask"]
            key = hashlib.sha256(json.dumps([ids, mask, list(vocab_rows)]).encode()).hexdigest()[:24]
            file = cache / f"{key}.pt" if cache is not None else None
            if file is not None and file.exists():  # the same row read before
                part = torch.load(file)
                part["row"] = torch.full((len(part["label"]),), number)
                parts.append(part)
                continue
            positions = torch.tensor([t for t in range(len(ids) - 1) if mask[t + 1]])
            captured.clear()
            with torch.inference_mode():
                logits = model(input_ids=torch.tensor([ids])).logits[0].float()
            hidden = captured[0][0].float()[positions]
            logits = logits[positions]
            labels = torch.tensor(ids)[positions + 1]
            rest = logits[:, others]
            part = {"hidden": hidden.clone(), "command_logits": logits[:, rows_ids].clone(),
                    "rest_lse": torch.logsumexp(rest, -1), "rest_max": rest.max(-1).values,
                    "label": torch.tensor([index.get(int(t), -1) for t in labels]),
                    "label_logit": logits.gather(1, labels[:, None])[:, 0],
                    "position": positions - positions[0] if len(positions) else positions,
                    "row": torch.full((len(positions),), number)}
            if file is not None:
                file.parent.mkdir(parents=True, exist_ok=True)
                torch.save(part, file)
            parts.append(part)
            if (number + 1) % 10 == 0 or number + 1 == len(rows):
                progress(f"read {number + 1}/{len(rows)} responses (hidden states)")
    finally:
        hook.remove()
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def command_logits(states: dict[str, Any], delta: Any) -> Any:
    """The command tokens' logits at every stored position with ``delta`` added to their
    output rows (``delta`` in the units of ``states["hidden"]``)."""
    return states["command_logits"] + states["hidden"] @ delta.T


def nll(states: dict[str, Any], delta: Any) -> Any:
    """Per-position next-token loss with ``delta`` added to the command tokens' output rows."""
    import torch

    logits = command_logits(states, delta)
    lse = torch.logsumexp(torch.cat([states["rest_lse"][:, None], logits], 1), 1)
    label = states["label"]
    own = torch.where(label >= 0, logits.gather(1, label.clamp(min=0)[:, None])[:, 0],
                      states["label_logit"])
    return lse - own


def call_rates(states: dict[str, Any], delta: Any, first: int, rows: Sequence[int],
               placed: dict[int, int | None], on_time: int) -> dict[str, float]:
    """How often greedy decoding would begin a command, per response, before the first
    placed command (or anywhere, in responses without one): the share that calls, and of
    responses with a placed command, the share called within ``on_time`` tokens of it."""
    import torch

    logits = command_logits(states, delta)
    top = torch.maximum(states["rest_max"], logits.max(1).values)
    begins = logits[:, first] >= top
    called = on_time_count = with_command = 0
    for row in rows:
        sel = states["row"] == row
        pos = states["position"][sel]
        where = placed.get(row)
        window = pos <= where if where is not None else torch.ones_like(pos, dtype=torch.bool)
        hits = pos[begins[sel] & window]
        called += bool(len(hits))
        if where is not None:
            with_command += 1
            on_time_count += bool(len(hits)) and int(hits[0]) >= where - on_time
    return {"call_share": called / max(1, len(rows)),
            "on_time_share": on_time_count / max(1, with_command)}


def first_command_position(row: dict[str, Any], first: int) -> int | None:
    """Index (in the response, from its first trained position) of the first command."""
    mask = row["completion_mask"]
    ids = row["input_ids"]
    start = next(t for t in range(len(ids)) if mask[t])
    for t in range(start, len(ids)):
        if ids[t] == first:
            return t - start
    return None


def train_command_head(model_name: str, model: Any, rows: Sequence[dict[str, Any]],
                       settings: HeadSettings, output_dir: Path,
                       encode: Callable[[str], list[int]], call_text: Callable[[int], str],
                       progress: Progress) -> Path:
    """Train the command tokens' output rows of ``model`` (loaded from ``model_name``: its
    weights are the merge's base) on ``rows`` (the warm-up's SFT rows); writes ``adapter/``
    (LoRA on ``lm_head``), ``model/`` (merged) and ``log.jsonl``."""
    import torch

    from relaygraph.agents.catalog import resolve
    from relaygraph.agents.lora import CONFIG_FILE, WEIGHTS_FILE, merge_folder

    vocab_rows = command_tokens(encode, call_text)
    first = vocab_rows.index(encode(call_text(1))[0])
    states = read_states(model.eval(), rows, vocab_rows, progress, output_dir / "states")
    hidden_size, vocab = model.lm_head.weight.shape[1], model.lm_head.weight.shape[0]

    held = max(1, int(len(rows) * settings.validation)) if settings.validation else 0
    train_rows = set(range(len(rows) - held))
    in_train = torch.tensor([int(r) in train_rows for r in states["row"]])
    weight = torch.where(states["label"] == first, settings.call_weight, 1.0)
    scale = states["hidden"][in_train].std(0).clamp(min=1e-3)
    states = {**states, "hidden": states["hidden"] / scale}  # standardized once: delta's units
    delta = torch.zeros(len(vocab_rows), hidden_size, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=settings.learning_rate)
    placed = {i: first_command_position(r, vocab_rows[first]) for i, r in enumerate(rows)}
    held_rows = list(range(len(rows) - held, len(rows)))
    log = output_dir / "log.jsonl"
    log.unlink(missing_ok=True)
    train_w, held_w = weight * in_train, weight * ~in_train
    for step in range(1, settings.steps + 1):
        optimizer.zero_grad()
        losses = nll(states, delta)
        loss = (losses * train_w).sum() / train_w.sum() + settings.weight_decay * delta.pow(2).sum()
        loss.backward()
        optimizer.step()
        if step % 25 == 0 or step == settings.steps:
            with torch.no_grad():
                entry: dict[str, Any] = {"step": step, "loss": round(float(loss), 5)}
                if held:
                    entry["val_loss"] = round(float((losses * held_w).sum() / held_w.sum()), 5)
                    entry.update({f"val_{k}": round(v, 4) for k, v in call_rates(
                        states, delta, first, held_rows, placed, settings.on_time).items()})
            append_jsonl(log, [entry])
            progress(" · ".join(f"{k} {v}" for k, v in entry.items()))

    update = (delta.detach() / scale).double()  # per command token, in hidden-state units
    u, s, vt = torch.linalg.svd(update, full_matrices=False)
    rank = min(settings.rank or len(vocab_rows), len(vocab_rows))
    b = torch.zeros(vocab, rank, dtype=torch.float64)
    b[torch.tensor(vocab_rows)] = u[:, :rank] * s[:rank]
    adapter = output_dir / "adapter"
    adapter.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({"base_model.model.lm_head.lora_A.weight": vt[:rank].float().contiguous(),
               "base_model.model.lm_head.lora_B.weight": b.float().contiguous()},
              str(adapter / WEIGHTS_FILE), metadata={"format": "pt"})
    (adapter / CONFIG_FILE).write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": model_name,
        "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "target_modules": ["lm_head"],
        "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False},
        indent=1) + "\n")
    final = output_dir / "model"
    merge_folder(Path(resolve(model_name)), adapter, final)
    progress(f"command head: {len(vocab_rows)} output rows trained, rank {rank} "
             f"(norm {math.sqrt(float(s.pow(2).sum())):.2f}); controller saved to {final}")
    return final
