"""Concurrent generations on one model: batched decode steps give the same tokens as
running the generations one after another, and leave reusable per-conversation caches."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from relaygraph.agents.backend import Prompt, StopRule
from relaygraph.agents.transformers_backend import TransformersBackend
from relaygraph.trajectory.models import Segment
from tests import tiny_models as tiny

QUESTIONS = tiny.RANDOM_TEXTS[:6]


@pytest.fixture(scope="module")
def random_backend(tmp_path_factory: pytest.TempPathFactory) -> TransformersBackend:
    """An untrained (random) tiny Qwen2: its greedy choices hinge on small logit margins,
    so any numerical difference between batched and single steps would show."""
    out = tiny.build_random_model(tmp_path_factory.mktemp("random-qwen"), seed=3)
    return TransformersBackend(str(out), dtype="float32")


def _prompt(question: str, continuation: tuple[Segment, ...] = ()) -> Prompt:
    return Prompt(question, tiny.SYSTEM_PROMPT, continuation)


def _ignore_eos(backend: TransformersBackend) -> None:
    backend.eos_ids = frozenset()  # random models emit EOS early; we want long generations


def test_concurrent_generations_equal_sequential_ones(random_backend) -> None:
    _ignore_eos(random_backend)
    rule = StopRule(max_tokens=24)
    alone = [random_backend.generate(_prompt(q), rule) for q in QUESTIONS]
    before = random_backend.batcher.batches
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        together = list(pool.map(lambda q: random_backend.generate(_prompt(q), rule), QUESTIONS))
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    assert len({tuple(g.token_ids) for g in alone}) > 2  # the prompts matter
    for a, b in zip(alone, together):
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-4)
    batches = random_backend.batcher.batches - before
    assert batches > 0, "no decode step ran batched"
    assert random_backend.batcher.batched_rows / random_backend.batcher.batches > 2


def test_caches_left_by_batched_steps_are_reused_exactly(random_backend) -> None:
    """Second turns reuse each conversation's cache (prefilling only the new segment) and
    write the same tokens as a cold backend computing the whole view from scratch."""
    _ignore_eos(random_backend)
    rule = StopRule(max_tokens=12)

    def two_turns(question: str, key: str | None) -> tuple[list[int], int]:
        first = random_backend.generate(_prompt(question), rule, cache_key=key)
        view = (Segment(author="a", kind="text", text=first.text, token_ids=first.token_ids,
                        tokenizer=first.tokenizer),
                Segment(author="b", kind="text", text=" then more"))
        second = random_backend.generate(_prompt(question, view), rule, cache_key=key)
        return second.token_ids, second.prefilled_tokens

    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        cached = list(pool.map(lambda q: two_turns(q, f"conv-{q}"), QUESTIONS))
    cold = [two_turns(q, None) for q in QUESTIONS]
    assert [ids for ids, _ in cached] == [ids for ids, _ in cold]
    new_tokens = len(random_backend.encode(" then more")) + 1  # + the last sampled token
    assert all(prefilled == new_tokens for _, prefilled in cached)
    assert all(prefilled > 3 * new_tokens for _, prefilled in cold)


def test_an_error_reaches_the_caller_and_the_backend_keeps_working(random_backend) -> None:
    def boom(step) -> bool:
        raise RuntimeError("check failed")

    with pytest.raises(RuntimeError, match="check failed"):
        random_backend.generate(_prompt("x"), StopRule(max_tokens=4, check=boom))
    assert len(random_backend.generate(_prompt("x"), StopRule(max_tokens=4)).token_ids) == 4


def test_run_many_equals_one_by_one_and_keeps_errors_in_place(backends, redis_store) -> None:
    from relaygraph import Agent, CallTokenPolicy, Relay
    from relaygraph.errors import ConfigError

    relay = Relay([Agent("controller", backends[0], tiny.SYSTEM_PROMPT),
                   Agent("expert", backends[1], tiny.SYSTEM_PROMPT)], CallTokenPolicy(), redis_store)
    questions = [tiny.QUESTION, tiny.NOCALL_QUESTION, tiny.QUESTION, tiny.NOCALL_QUESTION]
    one_by_one = [relay.run(q) for q in questions]
    together = relay.run_many(questions, concurrency=4)
    assert [r.answer for r in together] == [r.answer for r in one_by_one]
    assert [r.tokens_by_agent for r in together] == [r.tokens_by_agent for r in one_by_one]
    assert len({r.trajectory_id for r in together}) == 4
    mixed = relay.run_many([tiny.QUESTION, " "], return_exceptions=True)
    assert mixed[0].answer == one_by_one[0].answer and isinstance(mixed[1], ConfigError)
    with pytest.raises(ConfigError, match="empty"):
        relay.run_many([" ", tiny.QUESTION])


def test_a_relay_run_warns_about_nothing(backends, redis_store) -> None:
    """No deprecation warnings from our own calls (e.g. transformers' ``past_key_values``,
    removed in 5.40): the current cache argument is used."""
    import warnings

    from relaygraph import Agent, Relay
    from relaygraph.policies import FixedIntervalPolicy

    relay = Relay([Agent("controller", backends[0], tiny.SYSTEM_PROMPT),
                   Agent("expert", backends[1], tiny.SYSTEM_PROMPT)],
                  FixedIntervalPolicy(interval=3), redis_store, max_tokens=12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        relay.run_many([tiny.QUESTION, tiny.NOCALL_QUESTION], concurrency=2)  # batched steps too
    noisy = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert noisy == [], [str(w.message) for w in noisy]
