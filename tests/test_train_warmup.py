"""Warm-up data (paper 3.1): command insertion at random token positions, n = d x 10^k
clipped to what is left, SFT rows with the loss on the assistant turn, a few SFT steps."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from relaygraph.train.warmup import (
    SftSettings,
    WarmupSettings,
    call_text,
    insert_calls,
    on_char_boundary,
    run_warmup,
    sample_call_length,
)
from tests import tiny_models as tiny

TEXT = "Let me think. two plus five is seven. The answer is \\boxed{7}."


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tokenizer([TEXT, "<call>12</call> é ü"])


def test_call_lengths_are_d_times_ten_to_the_k_uniformly() -> None:
    rng = random.Random(0)
    draws = [sample_call_length(rng) for _ in range(36_000)]
    assert set(draws) == {d * 10**k for d in range(1, 10) for k in range(4)}
    by_k = Counter(len(str(n)) - 1 for n in draws)
    by_d = Counter(int(str(n)[0]) for n in draws)
    assert all(abs(by_k[k] / len(draws) - 1 / 4) < 0.015 for k in range(4))
    assert all(abs(by_d[d] / len(draws) - 1 / 9) < 0.01 for d in range(1, 10))


def test_commands_go_at_any_token_position_and_ask_for_what_is_left(tokenizer) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    encode = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    rng = random.Random(1)
    seen: Counter[int] = Counter()
    clipped = 0
    for _ in range(2000):
        out, insertions = insert_calls(ids, 3, encode, rng)
        positions = [i.position for i in insertions]
        assert positions == sorted(set(positions)) and len(positions) == 3
        expected = list(ids)
        for ins in reversed(insertions):
            left = len(ids) - ins.position
            assert 1 <= ins.n <= left
            clipped += ins.n == left
            expected[ins.position:ins.position] = encode(call_text(ins.n))
        assert out == expected
        # the text is the response with the commands spliced in at those token boundaries
        text = TEXT
        for ins in reversed(insertions):
            cut = len(tokenizer.decode(ids[:ins.position]))
            text = text[:cut] + call_text(ins.n) + text[cut:]
        assert tokenizer.decode(out) == text
        seen.update(positions)
    assert set(seen) == set(range(len(ids)))  # every position, mid-sentence ones included
    # n_sample >= 10 exceeds what is left near the end: clipping happens, but not always
    assert 0.2 < clipped / 6000 < 0.9


def test_clipping_on_a_short_response() -> None:
    rng = random.Random(2)
    for _ in range(500):
        _, (ins,) = insert_calls([5, 6, 7], 1, lambda s: [0], rng)
        assert ins.n <= 3 - ins.position
        if ins.position == 2:
            assert ins.n == 1
    assert insert_calls([], 2, lambda s: [0], rng) == ([], [])
    assert insert_calls([5], 3, lambda s: [0], rng)[1][0].n == 1  # fewer positions than calls


def test_no_command_inside_a_multibyte_character(tokenizer) -> None:
    ids = tokenizer.encode("ab 😀 cd", add_special_tokens=False)
    decode = tokenizer.decode
    inside = [t for t in range(len(ids)) if decode(ids[:t]).endswith("\ufffd")]
    assert inside, "the emoji should span several byte tokens"
    rng = random.Random(3)
    ok = on_char_boundary(decode, ids)
    for _ in range(300):
        out, insertions = insert_calls(ids, 2, lambda s: tokenizer.encode(s, add_special_tokens=False),
                                       rng, ok)
        assert not {i.position for i in insertions} & set(inside)
        assert "😀" in decode(out)


def test_warmup_samples_inserts_and_fine_tunes(tiny_pair, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from relaygraph.agents.backend import Prompt
    from relaygraph.agents.transformers_backend import TransformersBackend
    from relaygraph.train.warmup import sft_trainer

    controller, _ = tiny_pair
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": tiny.QUESTION, "answer": "7"}) + "\n"
                    + json.dumps({"question": tiny.NOCALL_QUESTION, "answer": "2"}) + "\n")
    settings = WarmupSettings(
        model=str(controller), data=data, output_dir=tmp_path / "warm", system_prompt=tiny.SYSTEM_PROMPT,
        samples_per_question=2, max_tokens=32, temperature=1.0, min_calls=1, max_calls=2,
        device="cpu", sft=SftSettings(learning_rate=1e-3, max_steps=3, batch_size=2,
                                      gradient_accumulation_steps=1, trl={"disable_tqdm": True}))
    lines: list[str] = []
    final = run_warmup(settings, progress=lines.append)

    samples = [json.loads(x) for x in (tmp_path / "warm" / "samples.jsonl").read_text().splitlines()]
    assert sorted((s["index"], s["sample"]) for s in samples) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    rows = [json.loads(x) for x in (tmp_path / "warm" / "warmup.jsonl").read_text().splitlines()]
    backend = TransformersBackend(str(controller), dtype="float32")
    eos = backend.tokenizer.eos_token_id
    for row, sample in zip(rows, sorted(samples, key=lambda s: (s["index"], s["sample"]))):
        prompt = backend.render(Prompt(row["question"], tiny.SYSTEM_PROMPT))
        n_prompt = row["completion_mask"].index(1)
        assert row["input_ids"][:n_prompt] == prompt  # exactly the relay's rendering
        assert set(row["completion_mask"][n_prompt:]) == {1}
        assert 1 <= len(row["calls"]) <= 2 and row["text"].count("</call>") >= len(row["calls"])
        response = row["input_ids"][n_prompt:]
        assert (response[-1] == eos) == sample["finished"]
        # removing the commands gives back the sampled response
        plain = row["text"]
        for _, n in row["calls"]:
            plain = plain.replace(call_text(n), "", 1)
        assert plain == sample["text"]

    # labels: -100 on the prompt, the ids on the assistant turn (command and EOS included)
    trainer = sft_trainer(settings, rows)
    example = trainer.train_dataset[0]
    n_prompt = rows[0]["completion_mask"].index(1)
    assert example["labels"][:n_prompt] == [-100] * n_prompt
    assert example["labels"][n_prompt:] == rows[0]["input_ids"][n_prompt:]

    # trained a few steps, saved as a plain model with its tokenizer and chat template
    assert final == tmp_path / "warm" / "model" and (tmp_path / "warm" / "checkpoints").is_dir()
    before = AutoModelForCausalLM.from_pretrained(controller).state_dict()
    after = AutoModelForCausalLM.from_pretrained(final).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert TransformersBackend(str(final), dtype="float32").tokenizer.chat_template
    assert any("4 responses" in line for line in lines)
    # resumable: a finished stage is not redone
    again: list[str] = []
    assert run_warmup(settings, progress=again.append) == final
    assert again == [f"warm-up already finished: {final}"]
