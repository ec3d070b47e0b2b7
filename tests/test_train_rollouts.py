"""GRPO rollouts are real relay runs; the expert's tokens stay in the completion but are
masked from the loss (env_mask 0), the controller's, its call command included, are not."""

from __future__ import annotations

from pathlib import Path

import pytest

from relaygraph import Agent
from relaygraph.agents.backend import Prompt
from relaygraph.agents.transformers_backend import TransformersBackend
from relaygraph.policies import CallTokenPolicy
from relaygraph.relay import RunResult
from relaygraph.train.grpo import RelayRollouts, to_rollout
from relaygraph.trajectory import Segment
from tests import tiny_models as tiny


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = tiny.relay_root()
    controller, expert = tiny.relay_pair()
    return controller, expert, tiny.load_relay_meta(root)


@pytest.fixture(scope="module")
def policy_backend(tiny_dirs) -> TransformersBackend:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    controller = tiny_dirs[0]
    model = AutoModelForCausalLM.from_pretrained(controller).eval()
    return TransformersBackend.from_loaded(model, AutoTokenizer.from_pretrained(controller), "policy")


def rollouts(tiny_dirs, store, **options) -> RelayRollouts:
    expert = Agent("expert", TransformersBackend(str(tiny_dirs[1]), dtype="float32"),
                   tiny.SYSTEM_PROMPT)
    return RelayRollouts(expert, store, max_tokens=64, temperature=0.0, top_p=1.0,
                         system_prompt=tiny.SYSTEM_PROMPT, **options)


def test_expert_tokens_are_masked_controller_tokens_and_command_are_not(
        tiny_dirs, policy_backend, redis_store) -> None:
    meta = tiny_dirs[2]
    call, plain, malformed = rollouts(tiny_dirs, redis_store).run(
        policy_backend, [tiny.QUESTION, tiny.NOCALL_QUESTION, tiny.MALFORMED_QUESTION])
    head, e3, tail = meta["controller_head_ids"], meta["e3_ids"], meta["controller_tail_ids"]
    decode = policy_backend.tokenizer.decode

    assert call.prompt_ids == meta["prompt_ids"]
    assert call.completion_ids == head + e3 + tail  # tail ends with the controller's EOS
    assert call.env_mask == [1] * len(head) + [0] * len(e3) + [1] * len(tail)
    own = [t for t, m in zip(call.completion_ids, call.env_mask) if m]
    assert "<call>3</call>" in decode(own) and decode(e3) == meta["e3_text"]
    assert decode([t for t, m in zip(call.completion_ids, call.env_mask) if not m]) == meta["e3_text"]
    assert call.call_ratio == pytest.approx(3 / (len(head) + 3 + len(tail) - 1))
    assert [lp is None for lp in call.logprobs] == [m == 0 for m in call.env_mask[:-1]] + [True]
    assert call.answer == "7"
    # what the trainer scores is exactly what the controller saw
    segments = redis_store.read(call.trajectory_id)
    view = CallTokenPolicy().view("controller", segments)
    seen = policy_backend.render(Prompt(tiny.QUESTION, tiny.SYSTEM_PROMPT, tuple(view)))
    assert seen == call.prompt_ids + call.completion_ids[:-1]

    for run in (plain, malformed):
        assert set(run.env_mask) == {1} and run.call_ratio == 0.0
        assert run.completion_ids[-1] == policy_backend.tokenizer.eos_token_id
    assert "<call>abc</call>" in decode(malformed.completion_ids)


def test_refused_calls_leave_everything_to_the_controller(tiny_dirs, policy_backend,
                                                           redis_store) -> None:
    (run,) = rollouts(tiny_dirs, redis_store, max_calls=0).run(policy_backend, [tiny.QUESTION])
    assert set(run.env_mask) == {1} and run.call_ratio == 0.0


def test_the_tokenizers_must_match(tiny_dirs, redis_store, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from relaygraph.errors import ConfigError

    other = tiny.build_random_model(tmp_path / "other")
    backend = TransformersBackend.from_loaded(AutoModelForCausalLM.from_pretrained(other),
                            AutoTokenizer.from_pretrained(other))
    with pytest.raises(ConfigError, match="share a tokenizer"):
        rollouts(tiny_dirs, redis_store).run(backend, [tiny.QUESTION])


def _result(segments: list[Segment], finish: str) -> RunResult:
    return RunResult(trajectory_id="t", policy="call-token", answer="", finish_reason=finish,
                     segments=[], tokens_by_agent={}, call_ratio=0.0, handoffs=0,
                     handoff_records=[], counters={}, seconds=0.0)


def test_the_eos_belongs_to_whoever_ended_the_run() -> None:
    step = {"author": "controller", "to": "expert"}
    head = Segment(author="controller", text="ab", token_ids=[5, 6], logprobs=[-0.1, -0.2])
    call = Segment(author="controller", kind="call", text="<call>9</call>", token_ids=[7],
                   logprobs=[-0.3], finish_reason="call", meta={"step": step})
    answer = Segment(author="expert", text="cd", token_ids=[8, 9], logprobs=[-1.0, -1.0],
                     finish_reason="eos")
    ended_by_expert = to_rollout(_result([head, call, answer], "eos"), [head, call, answer],
                                 [1, 2], eos_id=0)
    assert ended_by_expert.completion_ids == [5, 6, 7, 8, 9, 0]
    assert ended_by_expert.env_mask == [1, 1, 1, 0, 0, 0]
    assert ended_by_expert.logprobs == [-0.1, -0.2, -0.3, None, None, None]
    assert ended_by_expert.call_ratio == pytest.approx(2 / 5) and ended_by_expert.finished
    # an expert that stopped at once wrote no segment: its EOS follows the call
    at_once = to_rollout(_result([head, call], "eos"), [head, call], [1, 2], eos_id=0)
    assert at_once.env_mask == [1, 1, 1, 0] and at_once.call_ratio == 0.0
    # a controller that stopped at once: just its EOS
    empty = to_rollout(_result([], "eos"), [], [1, 2], eos_id=0)
    assert empty.completion_ids == [0] and empty.env_mask == [1] and empty.call_ratio == 0.0
    # out of budget: no EOS
    cut = to_rollout(_result([head, call, answer], "budget"), [head, call, answer], [1, 2], 0)
    assert cut.completion_ids == [5, 6, 7, 8, 9] and cut.env_mask == [1, 1, 1, 0, 0]
    assert not cut.finished
