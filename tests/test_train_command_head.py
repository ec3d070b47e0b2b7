"""Head-only warm-up: the command tokens' output rows trained on stored hidden states teach a
model that never calls to write the command where the warm-up placed it, and nothing else
changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from relaygraph.train.command_head import (
    HeadSettings,
    command_tokens,
    nll,
    read_states,
    train_command_head,
)
from relaygraph.train.commands import call_text
from relaygraph.train.warmup import WarmupSettings, run_warmup
from tests import tiny_models as tiny


def greedy(model_dir: Path, question: str, tokens: int = 40) -> str:
    from relaygraph.agents.backend import Prompt, StopRule
    from relaygraph.agents.transformers_backend import TransformersBackend

    backend = TransformersBackend(str(model_dir), dtype="float32")
    return backend.generate(Prompt(question, tiny.SYSTEM_PROMPT), StopRule(max_tokens=tokens)).text


@pytest.fixture(scope="module")
def two_answers() -> Path:
    """A tiny model that never writes a command: 2 + 5 and 1 + 1, each with its own answer."""
    dialogues = [(tiny.SYSTEM_PROMPT, tiny.QUESTION, tiny.EXPERT_ANSWER),
                 (tiny.SYSTEM_PROMPT, tiny.NOCALL_QUESTION, tiny.NOCALL_ANSWER)]
    return tiny._cached(lambda root: tiny.build_tiny_model(
        root, dialogues, corpus_extra=[tiny.CALL_TEXT, "<call>30</call>"]), "two-answers")


def sft_row(model_dir: Path, question: str, answer: str, call_after: str | None, n: int = 3) -> dict:
    """The warm-up's SFT row: the model's own answer, a command after ``call_after``, the
    ``n`` tokens it hands over masked."""
    from relaygraph.agents.backend import Prompt
    from relaygraph.agents.transformers_backend import TransformersBackend
    from relaygraph.train.commands import Insertion, called_mask, splice_calls

    backend = TransformersBackend(str(model_dir), dtype="float32")
    prompt = backend.render(Prompt(question, tiny.SYSTEM_PROMPT))
    ids = backend.encode(answer)
    inserted = [] if call_after is None else [Insertion(len(backend.encode(call_after)), n)]
    response = splice_calls(ids, inserted, backend.encode) + [backend.tokenizer.eos_token_id]
    mask = called_mask(ids, inserted, backend.encode) + [1]
    return {"input_ids": prompt + response, "completion_mask": [0] * len(prompt) + mask}


@pytest.fixture(scope="module")
def warmed(two_answers, tmp_path_factory) -> tuple[Path, Path]:
    """The head trained to call after "Let me think." in the 2 + 5 answer, never in 1 + 1's."""
    from relaygraph.agents.transformers_backend import TransformersBackend

    rows = [sft_row(two_answers, tiny.QUESTION, tiny.EXPERT_ANSWER, "Let me think."),
            sft_row(two_answers, tiny.NOCALL_QUESTION, tiny.NOCALL_ANSWER, None)]
    backend = TransformersBackend(str(two_answers), dtype="float32")
    out = tmp_path_factory.mktemp("head")
    lines: list[str] = []
    final = train_command_head(str(two_answers), backend.model, rows,
                               HeadSettings(steps=200, validation=0.0), out, backend.encode,
                               call_text, lines.append)
    assert final == out / "model" and lines[-1].startswith("command head:")
    return two_answers, final


def test_the_warmed_model_writes_the_command_where_it_was_placed(warmed) -> None:
    base, final = warmed
    assert greedy(base, tiny.QUESTION) == tiny.EXPERT_ANSWER  # never calls before
    after = greedy(final, tiny.QUESTION)
    assert after.startswith("Let me think.<call>3</call>"), after
    # an answer that got no command is written exactly as before
    assert greedy(final, tiny.NOCALL_QUESTION) == greedy(base, tiny.NOCALL_QUESTION) == tiny.NOCALL_ANSWER


def test_only_the_command_rows_of_the_output_layer_change(warmed) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, final = warmed
    before = AutoModelForCausalLM.from_pretrained(base)
    after = AutoModelForCausalLM.from_pretrained(final)
    assert before.config.tie_word_embeddings and not after.config.tie_word_embeddings  # untied
    tok = AutoTokenizer.from_pretrained(base)
    rows = command_tokens(lambda s: tok.encode(s, add_special_tokens=False), call_text)
    b, a = before.state_dict(), after.state_dict()
    assert [k for k in b if not torch.equal(b[k], a[k])] == ["lm_head.weight"]
    assert torch.equal(before.model.embed_tokens.weight, after.model.embed_tokens.weight)
    moved = (a["lm_head.weight"] != b["lm_head.weight"]).any(1).nonzero()[:, 0].tolist()
    assert moved and set(moved) <= set(rows)
    config = json.loads((final.parent / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["lm_head"] and config["r"] <= len(rows)


def test_warmup_runs_the_head_stage(tiny_pair, tmp_path: Path) -> None:
    """``[warmup.head]`` in place of fine-tuning: the same data, then the head (resumable:
    the hidden states are kept per response)."""
    controller, expert = tiny_pair
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": tiny.QUESTION, "answer": "8"}) + "\n")
    settings = WarmupSettings(
        model=str(controller), expert=str(expert), data=data, output_dir=tmp_path / "warm",
        system_prompt=tiny.SYSTEM_PROMPT, expert_system_prompt=tiny.SYSTEM_PROMPT, max_tokens=40,
        temperature=0.0, placement="disagreement", max_calls=1, device="cpu", dtype="float32",
        disagreement={"min_margin": 1.0, "min_call_tokens": 2, "max_call_tokens": 4},
        head=HeadSettings(steps=25, validation=0.0))
    lines: list[str] = []
    final = run_warmup(settings, progress=lines.append)
    assert (final / "config.json").exists() and len(list((tmp_path / "warm" / "states").glob("*.pt"))) == 1
    assert json.loads((tmp_path / "warm" / "log.jsonl").read_text().splitlines()[-1])["step"] == 25
    assert not (tmp_path / "warm" / "checkpoints").exists()  # no fine-tuning ran


def test_the_stored_states_give_the_models_own_loss(tiny_pair) -> None:
    """What the head trains on is exact: at zero update, the per-position loss from the
    stored states is the model's full-softmax cross-entropy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, expert = tiny_pair
    model = AutoModelForCausalLM.from_pretrained(expert).eval()
    tok = AutoTokenizer.from_pretrained(expert)
    ids = tok.encode(tiny.render_prompt(tok, tiny.SYSTEM_PROMPT, tiny.QUESTION)
                     + "Let me think.<call>30</call> two plus", add_special_tokens=False)
    mask = [0] * 20 + [1] * (len(ids) - 24) + [0, 0, 1, 1]
    rows = command_tokens(lambda s: tok.encode(s, add_special_tokens=False), call_text)
    states = read_states(model, [{"input_ids": ids, "completion_mask": mask}], rows, lambda _: None)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    trained = [t for t in range(len(ids) - 1) if mask[t + 1]]
    expected = torch.nn.functional.cross_entropy(logits[trained], torch.tensor(ids)[[t + 1 for t in trained]],
                                                 reduction="none")
    got = nll(states, torch.zeros(len(rows), model.config.hidden_size))
    assert got == pytest.approx(expected.tolist(), abs=1e-4)


def test_head_and_lora_are_exclusive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="choose one"):
        WarmupSettings(model="m", data=tmp_path / "q.jsonl", output_dir=tmp_path, head=HeadSettings(),
                       lora={"r": 4})
