"""A run can start from given reasoning (``Relay.run(prefix=...)``): what the relay and
twin experiments hand a continuer. The tiny controller was trained on
``Let me think.<call>3</call>`` + E3 + `` so the answer is \\boxed{7}.``, so given the
first part it writes exactly the rest."""

from __future__ import annotations

import pytest

from relaygraph import Agent, Relay, SoloPolicy
from relaygraph.agents.wrapping import CancellableBackend, CancelScope
from relaygraph.errors import Cancelled
from relaygraph.trajectory import Segment
from tests import tiny_models as tiny


@pytest.fixture(scope="module")
def meta(backends, tmp_path_factory):
    return tiny.load_relay_meta(tiny.relay_root())


def given_head(backends, meta) -> Segment:
    controller = backends[0]
    ids = meta["controller_head_ids"] + meta["e3_ids"]
    return Segment(author="expert", text=controller.decode(ids), token_ids=ids,
                   tokenizer=controller.tokenizer_id)


def solo(backend, store) -> Relay:
    return Relay([Agent("controller", backend, tiny.SYSTEM_PROMPT)], SoloPolicy(agent="controller"),
                 store, max_tokens=32)


def test_the_first_turn_continues_the_given_prefix(backends, meta, redis_store) -> None:
    head = given_head(backends, meta)
    result = solo(backends[0], redis_store).run(tiny.QUESTION, prefix=[head])
    segments = redis_store.read(result.trajectory_id)
    assert segments[0].meta == {"given": True} and segments[0].author == "expert"
    assert segments[0].token_ids == head.token_ids
    assert [s.author for s in segments[1:]] == ["controller"]
    assert segments[1].text == tiny.CONTROLLER_SUFFIX
    # given tokens are neither generated nor anyone's: only the continuation counts
    assert result.tokens_by_agent == {"controller": len(meta["controller_tail_ids"]) - 1}
    assert result.answer == "7"


def test_no_prefix_is_the_plain_run(backends, redis_store) -> None:
    result = solo(backends[0], redis_store).run(tiny.QUESTION)
    segments = redis_store.read(result.trajectory_id)
    assert not any(s.meta.get("given") for s in segments)


def test_a_run_interrupted_before_its_first_step_resumes_after_the_prefix(
        backends, meta, redis_store) -> None:
    head = given_head(backends, meta)
    flag = CancelScope()
    flag.cancel()
    stopped = solo(CancellableBackend(backends[0], lambda: flag), redis_store)
    tid = "prefix-resume-" + str(id(flag))
    with pytest.raises(Cancelled):
        stopped.run(tiny.QUESTION, trajectory_id=tid, prefix=[head])
    assert [s.meta for s in redis_store.read(tid)] == [{"given": True}]  # no step completed
    resumed = solo(backends[0], redis_store).run(tiny.QUESTION, trajectory_id=tid)  # prefix not passed
    segments = redis_store.read(tid)
    assert [s.author for s in segments] == ["expert", "controller"]
    assert segments[1].text == tiny.CONTROLLER_SUFFIX and resumed.answer == "7"
