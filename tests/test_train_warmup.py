"""Warm-up data (paper 3.1): command insertion at random token positions, n = d x 10^k
clipped to what is left, SFT rows with the loss on the assistant turn, a few SFT steps."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from relaygraph.train.commands import call_text, insert_calls, on_char_boundary, sample_call_length
from relaygraph.train.warmup import SftSettings, WarmupSettings, run_warmup
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


def test_interrupted_sampling_keeps_what_finished_and_resumes(tiny_pair, tmp_path: Path) -> None:
    """Responses are saved as they finish: an interrupt loses none that finished, and the
    rerun samples only the rest (each (question, sample) once)."""
    from relaygraph.agents.transformers_backend import TransformersBackend
    from relaygraph.train.data import read_jsonl
    from relaygraph.train.warmup import sample_responses

    controller, _ = tiny_pair
    rows = [{"question": tiny.QUESTION, "answer": "7"}, {"question": tiny.NOCALL_QUESTION, "answer": "2"}]
    settings = WarmupSettings(model=str(controller), data=tmp_path / "unused.jsonl",
                              output_dir=tmp_path, system_prompt=tiny.SYSTEM_PROMPT,
                              samples_per_question=3, max_tokens=16, temperature=1.0,
                              concurrency=2, device="cpu")
    backend = TransformersBackend(str(controller), dtype="float32")
    lines: list[str] = []

    def interrupt_once(line: str) -> None:
        lines.append(line)
        if len(lines) == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sample_responses(backend, rows, settings, set(), interrupt_once)
    saved = list(read_jsonl(tmp_path / "samples.jsonl"))
    assert lines[0] == "sampled 2/6 responses"
    # those in flight when the first batch was saved finished too, and were kept; the rest never started
    assert 2 <= len(saved) <= 4 and lines[-1] == f"sampled {len(saved)}/6 responses"

    done = {(s["index"], s["sample"]) for s in saved}
    rest = sample_responses(backend, rows, settings, done, lines.append)
    assert len(rest) == 6 - len(saved) and lines[-1] == "sampled 6/6 responses"
    keys = [(s["index"], s["sample"]) for s in read_jsonl(tmp_path / "samples.jsonl")]
    assert sorted(keys) == [(i, j) for i in range(2) for j in range(3)]


# disagreement placement (beyond the paper: R2R-style, where the expert disagrees) ------------
def test_call_lengths_snap_up_to_the_grid() -> None:
    from relaygraph.train.commands import snap_call_length

    assert [snap_call_length(n) for n in (1, 9, 10, 11, 23, 99, 101, 950)] == \
        [1, 9, 10, 20, 30, 100, 200, 1000]
    assert snap_call_length(3, low=10) == 10 and snap_call_length(230, high=100) == 100


def test_disagreement_calls_go_where_the_expert_prefers_another_token() -> None:
    from relaygraph.train.disagreement import DisagreementSettings, ExpertScore, disagreement_calls

    ids = list(range(100, 160))                    # 60 response tokens
    own = [-0.1] * 60
    top_id = list(ids)
    top = [-0.1] * 60
    for t, margin in ((5, 3.0), (8, 5.0), (30, 1.0), (40, 2.5), (50, 4.0)):
        top_id[t] = 7                              # the expert would write token 7 there
        own[t] = top[t] - margin
    score = ExpertScore(own, top_id, top)
    line_ends = [t in (20, 45) for t in range(60)]  # lines end after tokens 20 and 45
    settings = DisagreementSettings(min_margin=2.0, min_call_tokens=10, max_call_tokens=100)
    calls = disagreement_calls(ids, score, line_ends, settings, max_calls=3)
    # t=5: to the end of line (16 tokens) -> 20; t=8 is inside that call; t=30 is too weak;
    # t=40: 6 tokens to the line end -> min 10; t=50: 10 tokens left (no line end)
    assert [(c.position, c.n) for c in calls] == [(5, 20), (40, 10), (50, 10)]
    assert [(c.position, c.n) for c in disagreement_calls(ids, score, line_ends, settings, 1)] == [(5, 20)]
    # a score of a prefix (scoring stopped early) places commands in that prefix only: once
    # it holds max_calls of them, they are the full score's
    def prefix(k: int) -> ExpertScore:
        return ExpertScore(own[:k], top_id[:k], top[:k])

    assert [(c.position, c.n) for c in disagreement_calls(ids, prefix(41), line_ends, settings, 2)] == \
        [(5, 20), (40, 10)] == [(c.position, c.n) for c in calls[:2]]
    assert [(c.position, c.n) for c in disagreement_calls(ids, prefix(40), line_ends, settings, 3)] == [(5, 20)]
    # a token where the expert agrees (its top choice is the token) is never a disagreement
    agree = ExpertScore([-5.0] * 60, list(ids), [-0.1] * 60)
    assert disagreement_calls(ids, agree, line_ends, settings, 3) == []
    # a position that may not be split (inside a character) is passed over
    calls = disagreement_calls(ids, score, line_ends, settings, 3, splittable=lambda t: t != 5)
    assert calls[0].position == 8
    # numeric_only: only where the expert's own token is a number (here: its choice at t=40)
    top_id[40] = 9
    numeric = DisagreementSettings(min_margin=2.0, min_call_tokens=10, numeric_only=True)
    calls = disagreement_calls(ids, score, line_ends, numeric, 3, numeric=lambda i: i == 9)
    assert [(c.position, c.n) for c in calls] == [(40, 10)]


def test_called_tokens_are_masked_and_commands_trained() -> None:
    from relaygraph.train.commands import Insertion, called_mask, splice_calls

    encode = lambda s: [0] * len(s)  # noqa: E731  - one id per character
    ids = list(range(1, 11))
    insertions = [Insertion(2, 3), Insertion(7, 5)]
    spliced = splice_calls(ids, insertions, encode)
    mask = called_mask(ids, insertions, encode)
    c3, c5 = len(call_text(3)), len(call_text(5))
    assert spliced == [1, 2] + [0] * c3 + [3, 4, 5, 6, 7] + [0] * c5 + [8, 9, 10]
    assert mask == [1, 1] + [1] * c3 + [0, 0, 0, 1, 1] + [1] * c5 + [0, 0, 0]
    assert len(mask) == len(spliced)


def test_warmup_with_disagreement_placement(tiny_pair, tmp_path: Path) -> None:
    """The tiny controller answers 2 + 5 with a call after "Let me think." where the tiny
    expert would go on with " two ...": graded wrong (gold 8 here), that response gets a
    command at a disagreement; 1 + 1 (graded right) gets none."""
    from relaygraph.agents.backend import Prompt
    from relaygraph.agents.transformers_backend import TransformersBackend

    controller, expert = tiny_pair
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": tiny.QUESTION, "answer": "8"}) + "\n"
                    + json.dumps({"question": tiny.NOCALL_QUESTION, "answer": "2"}) + "\n"
                    + json.dumps({"question": "unused", "answer": "0"}) + "\n")
    settings = WarmupSettings(
        model=str(controller), expert=str(expert), data=data, limit=2,
        output_dir=tmp_path / "warm", system_prompt=tiny.SYSTEM_PROMPT,
        expert_system_prompt=tiny.SYSTEM_PROMPT, max_tokens=40, temperature=0.0,
        placement="disagreement", max_calls=1, mask_called_tokens=True, device="cpu",
        dtype="float32",
        disagreement={"min_margin": 1.0, "min_call_tokens": 2, "max_call_tokens": 4},
        sft=SftSettings(learning_rate=1e-3, max_steps=1, batch_size=2,
                        gradient_accumulation_steps=1, trl={"disable_tqdm": True}))
    run_warmup(settings, progress=lambda _: None)

    rows = [json.loads(x) for x in (tmp_path / "warm" / "warmup.jsonl").read_text().splitlines()]
    assert [r["question"] for r in rows] == [tiny.QUESTION, tiny.NOCALL_QUESTION]  # limit = 2
    wrong, right = rows
    assert (wrong["correct"], right["correct"]) == (False, True)
    assert right["calls"] == [] and set(right["completion_mask"][right["completion_mask"].index(1):]) == {1}
    assert len(wrong["calls"]) == 1
    position, n = wrong["calls"][0]
    assert 2 <= n <= 4
    # the command sits where the expert, reading the controller's response, prefers another token
    scores = [json.loads(x) for x in (tmp_path / "warm" / "expert_scores.jsonl").read_text().splitlines()]
    first = next(s for s in scores if s["index"] == 0)
    sample = next(json.loads(x) for x in (tmp_path / "warm" / "samples.jsonl").read_text().splitlines()
                  if json.loads(x)["index"] == 0)
    ids = sample["response_ids"]
    assert first["top_id"][position] != ids[position]
    assert first["top_logprob"][position] - first["token_logprob"][position] >= 1.0
    assert all(first["top_id"][t] == ids[t] or first["top_logprob"][t] - first["token_logprob"][t] < 1.0
               for t in range(position))
    # the scores are the expert's own teacher-forced log-probs
    backend = TransformersBackend(str(expert), dtype="float32")
    import torch
    prompt = backend.render(Prompt(tiny.QUESTION, tiny.SYSTEM_PROMPT))
    with torch.no_grad():
        logits = backend.model(input_ids=torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1]
    logp = torch.log_softmax(logits.float(), -1)
    assert first["token_logprob"] == pytest.approx([float(logp[t, i]) for t, i in enumerate(ids)], abs=2e-3)
    # only the response graded wrong was scored (a right one gets no command)
    assert [s["index"] for s in scores] == [0]
    # read in chunks on the expert's KV cache: the same numbers; stopped early: a prefix
    from relaygraph.train.disagreement import score_with_expert

    chunked = score_with_expert(backend, prompt, ids, chunk=3)
    assert chunked.token_logprob == pytest.approx(first["token_logprob"], abs=2e-3)
    assert chunked.top_id == first["top_id"]
    prefix = score_with_expert(backend, prompt, ids, lambda got: len(got.token_logprob) >= 5, chunk=3)
    assert len(prefix.token_logprob) == 6 and prefix.top_id == first["top_id"][:6]
    # the n tokens the command hands to the expert carry no loss
    assert wrong["completion_mask"].count(0) == wrong["completion_mask"].index(1) + n
    assert (tmp_path / "warm" / "model" / "config.json").exists()
