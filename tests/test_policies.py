"""Each policy's exact behaviour on hand-made cases, with tiny real models."""

from __future__ import annotations

import pytest

from relaygraph import Agent, Relay
from relaygraph.agents.backend import Prompt, StopRule
from relaygraph.agents.transformers_backend import TransformersBackend
from relaygraph.errors import ConfigError
from relaygraph.policies import (
    ConfidencePolicy,
    FixedIntervalPolicy,
    PerfectRouter,
    RandomRouter,
    ScoreSupervisor,
    SupervisorPolicy,
    TruncatePolicy,
    TurnContext,
    Verdict,
    keyword_guard,
    parse_verdict,
)
from relaygraph.trajectory import Segment
from relaygraph.trajectory.models import active, reasoning_text
from tests import tiny_models as tiny


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[TransformersBackend, TransformersBackend]:
    c, e = tiny.relay_pair()
    return TransformersBackend(str(c), dtype="float32"), TransformersBackend(str(e), dtype="float32")


def agents(pair) -> list[Agent]:
    return [Agent("controller", pair[0], tiny.SYSTEM_PROMPT), Agent("expert", pair[1], tiny.SYSTEM_PROMPT)]


def solo_tokens(backend: TransformersBackend, question: str, view=()) -> tuple[list[int], list[float]]:
    gen = backend.generate(Prompt(question, tiny.SYSTEM_PROMPT, tuple(view)), StopRule(max_tokens=60))
    return gen.token_ids, gen.logprobs


# --- confidence ---------------------------------------------------------------------------

def test_confidence_hands_off_at_the_least_confident_token(pair, redis_store) -> None:
    ids, lps = solo_tokens(pair[0], tiny.NOCALL_QUESTION)
    j = min(range(len(lps)), key=lps.__getitem__)  # the only token below the threshold
    threshold = lps[j] + 1e-4
    assert sorted(lps)[1] > threshold, "the hand-made case needs a unique least-confident token"
    policy = ConfidencePolicy(threshold=threshold, fallback_tokens=2)
    result = Relay(agents(pair), policy, redis_store).run(tiny.NOCALL_QUESTION)
    segs = redis_store.read(result.trajectory_id)

    assert segs[0].author == "controller" and segs[0].token_ids == ids[:j]  # token j discarded
    assert segs[0].finish_reason == "low_confidence"
    expected, _ = solo_tokens(pair[1], tiny.NOCALL_QUESTION, [segs[0]])
    assert segs[1].author == "expert" and segs[1].token_ids == expected[:2]
    assert segs[2].author == "controller"
    first = result.handoff_records[0]
    assert (first.from_, first.to, first.reason) == ("controller", "expert", "low_confidence")
    assert first.confidence == pytest.approx(lps[j], abs=1e-5) and first.requested_tokens == 2
    assert result.handoff_records[1].reason == "fallback_done"
    assert result.tokens_by_agent["expert"] == 2
    assert result.counters["fallbacks"] >= 1


def test_confidence_warmup_and_max_handoffs_suppress_the_check(pair, redis_store) -> None:
    _, lps = solo_tokens(pair[0], tiny.NOCALL_QUESTION)
    j = min(range(len(lps)), key=lps.__getitem__)
    for policy in (ConfidencePolicy(threshold=lps[j] + 1e-4, warmup=j + 1),
                   ConfidencePolicy(threshold=lps[j] + 1e-4, max_handoffs=0),
                   ConfidencePolicy(threshold=lps[j] + 1e-4, min_gap=j + 1)):
        result = Relay(agents(pair), policy, redis_store).run(tiny.NOCALL_QUESTION)
        assert result.tokens_by_agent["expert"] == 0, policy
        assert result.answer == "2"


def test_confidence_entropy_metric_and_recovery(pair, redis_store) -> None:
    seen = []
    pair[0].generate(Prompt(tiny.NOCALL_QUESTION, tiny.SYSTEM_PROMPT),
                     StopRule(max_tokens=60, check=lambda s: seen.append(s) or False))
    j = max(range(len(seen)), key=lambda i: seen[i].entropy)
    policy = ConfidencePolicy(threshold=seen[j].entropy - 1e-4, metric="entropy",
                              fallback_tokens=5, fallback_until="confident")
    result = Relay(agents(pair), policy, redis_store).run(tiny.NOCALL_QUESTION)
    segs = redis_store.read(result.trajectory_id)
    assert len(segs[0].token_ids) == j
    assert result.handoff_records[0].confidence == pytest.approx(seen[j].entropy, abs=1e-4)
    # the expert stops before its first token that is confident again (at most 5 tokens)
    assert 1 <= segs[1].n_tokens <= 5
    if segs[1].n_tokens < 5:
        assert result.handoff_records[1].reason == "recovered"


def test_confidence_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="two or more distinct agents"):
        ConfidencePolicy(agents=("a",))
    with pytest.raises(ValueError, match="metric"):
        ConfidencePolicy(metric="vibes")  # type: ignore[arg-type]


# --- baselines ------------------------------------------------------------------------------

def test_random_router_is_reproducible_and_follows_p() -> None:
    router = RandomRouter(p=0.3, seed=7)
    questions = [f"question {i}" for i in range(2000)]
    picks = [router.first_turn(TurnContext(q, max_tokens=10))[0] for q in questions]
    assert picks == [router.first_turn(TurnContext(q, max_tokens=10))[0] for q in questions]
    assert 0.26 < picks.count("expert") / len(picks) < 0.34
    assert RandomRouter(p=0.0).first_turn(TurnContext("q", max_tokens=1))[0] == "controller"
    assert RandomRouter(p=1.0).first_turn(TurnContext("q", max_tokens=1))[0] == "expert"


def test_query_routers_end_to_end(pair, redis_store) -> None:
    to_expert = Relay(agents(pair), RandomRouter(p=1.0), redis_store).run(tiny.QUESTION)
    assert to_expert.tokens_by_agent["controller"] == 0 and to_expert.call_ratio == 1.0
    assert to_expert.answer == "7"  # the expert's own answer
    oracle = PerfectRouter(solo_results={tiny.NOCALL_QUESTION: True, tiny.QUESTION: False})
    assert Relay(agents(pair), oracle, redis_store).run(tiny.NOCALL_QUESTION).call_ratio == 0.0
    assert Relay(agents(pair), oracle, redis_store).run(tiny.QUESTION).call_ratio == 1.0
    with pytest.raises(ConfigError, match="no solo result"):
        Relay(agents(pair), oracle, redis_store).run("unknown question")


def test_fixed_interval_round_robin_over_three_agents_across_tokenizers(pair, redis_store) -> None:
    """Two tiny models and SmolLM2 (another tokenizer) take turns, 2 tokens each."""
    from relaygraph.agents import catalog

    catalog.pull("smollm2-135m")
    smol = TransformersBackend("smollm2-135m", dtype="float32")
    crew = agents(pair) + [Agent("smol", smol, tiny.SYSTEM_PROMPT)]
    policy = FixedIntervalPolicy(agents=("controller", "expert", "smol"), interval=2)
    result = Relay(crew, policy, redis_store, max_tokens=12).run(tiny.QUESTION)
    segs = redis_store.read(result.trajectory_id)
    authors = [s.author for s in segs]
    assert authors[:3] == ["controller", "expert", "smol"]
    assert all(s.n_tokens <= 2 for s in segs)
    assert sum(result.tokens_by_agent.values()) <= 12
    assert result.tokens_by_agent["smol"] > 0
    assert segs[2].tokenizer == smol.tokenizer_id != segs[0].tokenizer


def test_truncate_by_threshold_then_continuer_finishes(pair, redis_store) -> None:
    ids, lps = solo_tokens(pair[0], tiny.NOCALL_QUESTION)
    j = min(range(len(lps)), key=lps.__getitem__)
    policy = TruncatePolicy(threshold=lps[j] + 1e-4)
    result = Relay(agents(pair), policy, redis_store).run(tiny.NOCALL_QUESTION)
    segs = redis_store.read(result.trajectory_id)
    assert segs[0].token_ids == ids[:j]
    assert [s.author for s in segs] == ["controller", "expert"]
    assert segs[1].finish_reason in ("eos", "budget")
    assert result.handoff_records[0].reason == "truncate"


def test_truncate_by_a_surprisal_budget_agrees_with_the_eval_cut(pair, redis_store) -> None:
    """rule="surprisal": cut where the accumulated surprisal first exceeds the budget — the
    same position the reasoning-relay experiment computes from a stored chain."""
    from relaygraph.eval.relay_experiment import surprisal_cut

    ids, lps = solo_tokens(pair[0], tiny.NOCALL_QUESTION)
    total = -sum(lps)
    assert total > 0.05, "the hand-made case needs some surprisal"
    budget = total / 2
    k = surprisal_cut(lps, budget)
    assert k is not None and 0 < k < len(ids)
    policy = TruncatePolicy(threshold=budget, rule="surprisal")
    result = Relay(agents(pair), policy, redis_store).run(tiny.NOCALL_QUESTION)
    segs = redis_store.read(result.trajectory_id)
    assert segs[0].token_ids == ids[:k] and segs[1].author == "expert"
    with pytest.raises(ValueError, match="budget in nats"):
        TruncatePolicy(threshold=-1.0, rule="surprisal")


def test_truncate_by_token_count(pair, redis_store) -> None:
    result = Relay(agents(pair), TruncatePolicy(cut_tokens=3), redis_store).run(tiny.QUESTION)
    segs = redis_store.read(result.trajectory_id)
    assert segs[0].author == "controller" and segs[0].n_tokens == 3
    assert segs[1].author == "expert"
    with pytest.raises(ValueError, match="exactly one of threshold and cut_tokens"):
        TruncatePolicy()


# --- supervisor -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def safety_worker(tmp_path_factory) -> TransformersBackend:
    return TransformersBackend(str(tiny.safety_worker()),
                               dtype="float32")


def test_safety_guard_rolls_back_the_unsafe_step_and_steers(safety_worker, redis_store) -> None:
    guard = keyword_guard([r"\bsteal"], guidance=tiny.STEER_TEXT)
    policy = SupervisorPolicy(supervisor=guard, workers=("worker",), chunk_tokens=32)
    events: list[dict] = []
    relay = Relay([Agent("worker", safety_worker, tiny.SYSTEM_PROMPT)], policy, redis_store)
    result = relay.run(tiny.SAFETY_QUESTION, on_event=events.append)
    stored = redis_store.read(result.trajectory_id)
    # the final review appends nothing but its record (an empty mark): the run's end
    assert stored[-1].kind == "mark" and stored[-1].meta["step"]["reason"] == "eos"
    segs = stored[:-1]

    assert [(s.author, s.kind) for s in segs] == [
        ("worker", "text"), ("supervisor", "retract"), ("supervisor", "steer"),
        ("worker", "text"), ("worker", "text")]
    assert segs[0].text == tiny.UNSAFE_CHUNK  # kept in the store ...
    assert segs[1].meta["retracts"] == [0] and "steal" in segs[1].meta["reason"]
    assert segs[2].text == tiny.STEER_TEXT
    assert segs[3].text == tiny.SAFE_CHUNK and segs[4].text == tiny.SAFE_END  # the recovery
    visible = active(segs)  # ... but in no view
    assert tiny.UNSAFE_CHUNK not in [s.text for s in visible]
    assert "steal" not in reasoning_text(visible)
    assert result.counters == {"rollbacks": 1}
    assert result.answer == tiny.SAFE_END  # the final line of what is shown, not the retracted step
    assert result.tokens_by_agent["worker"] == sum(s.n_tokens for s in segs)  # cost still counted
    assert [e["action"] for e in events if e["type"] == "review"] == ["rollback", "eos"]


def test_supervisor_steer_switch_and_stop(pair, redis_store) -> None:
    verdicts = iter([Verdict(action="steer", guidance=" (hint)"), Verdict(action="switch"),
                     Verdict(action="stop")])
    policy = SupervisorPolicy(supervisor=lambda review: next(verdicts), workers=("controller", "expert"),
                              chunk_tokens=3)
    result = Relay(agents(pair), policy, redis_store).run(tiny.QUESTION)
    stored = redis_store.read(result.trajectory_id)
    # reviews that append nothing store their record on an empty mark: the switch, the stop
    marks = [s.meta["step"]["reason"] for s in stored if s.kind == "mark"]
    assert marks == ["switch", "stop"]
    segs = [s for s in stored if s.kind != "mark"]
    assert [(s.author, s.kind) for s in segs] == [
        ("controller", "text"), ("supervisor", "steer"), ("controller", "text"), ("expert", "text")]
    assert segs[1].text == " (hint)"
    assert result.finish_reason == "stop"
    assert result.counters == {"steers": 1, "switches": 1, "stops": 1}
    assert [(h.from_, h.to) for h in result.handoff_records] == [("controller", "expert")]


def test_score_supervisor_uses_the_models_score(pair, redis_store) -> None:
    scorer = ScoreSupervisor(Agent("judge", pair[1]), threshold=1e9)  # every step fails
    policy = SupervisorPolicy(supervisor=scorer, workers=("controller",), chunk_tokens=4)
    result = Relay(agents(pair), policy, redis_store, max_tokens=8).run(tiny.QUESTION)
    segs = redis_store.read(result.trajectory_id)
    assert segs[1].kind == "retract" and "score" in segs[1].meta["reason"]
    assert result.counters["rollbacks"] >= 1
    passing = ScoreSupervisor(Agent("judge", pair[1]), threshold=-1e9)
    review_result = Relay(agents(pair), SupervisorPolicy(supervisor=passing, chunk_tokens=4), redis_store,
                          max_tokens=8).run(tiny.QUESTION)
    assert "rollbacks" not in review_result.counters


@pytest.mark.parametrize("text, action, guidance", [
    ('{"action": "rollback", "guidance": "Be lawful.", "reason": "unsafe"}', "rollback", "Be lawful."),
    ('Sure! ```json\n{"action": "STEER", "guidance": "check units"}\n```', "steer", "check units"),
    ('{"action": "explode"} then {"action": "stop"}', "stop", None),
    ("I think we should continue.", "continue", None),
    ("ROLLBACK this", "rollback", None),
    ("", "continue", None),
    ('{"action": 3}', "continue", None),
    ('{"action": "steer", "guidance": ', "steer", None),
])
def test_judge_output_is_parsed_robustly(text, action, guidance) -> None:
    verdict = parse_verdict(text)
    assert verdict.action == action and verdict.guidance == guidance


def test_retraction_views() -> None:
    segs = [Segment(author="w", text="a"), Segment(author="w", text="bad"),
            Segment(author="supervisor", kind="retract", text="", meta={"retracts": [1]}),
            Segment(author="w", text="c")]
    assert [s.text for s in active(segs)] == ["a", "c"]
    assert reasoning_text(active(segs)) == "ac"


def test_sweeping_the_threshold_traces_a_cost_curve(pair, redis_store) -> None:
    """Raising the log-prob threshold hands more tokens to the fallback: 0 -> some -> all."""
    _, lps = solo_tokens(pair[0], tiny.NOCALL_QUESTION)
    ratios = []
    for threshold in (-100.0, min(lps) + 1e-4, 0.0):
        policy = ConfidencePolicy(threshold=threshold, fallback_tokens=2)
        ratios.append(Relay(agents(pair), policy, redis_store, max_tokens=24)
                      .run(tiny.NOCALL_QUESTION).call_ratio)
    assert ratios[0] == 0.0 < ratios[1] < ratios[2] == 1.0, ratios
