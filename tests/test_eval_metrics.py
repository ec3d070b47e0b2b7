"""Cost/quality numbers on hand-made cases: how the call ratio is counted, the curve,
AUC, APGR and the call ratio for 50%/80% of the gap; how a sweep names and validates its
policies and derives the query routers from the solo runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from relaygraph.errors import ConfigError
from relaygraph.eval import metrics
from relaygraph.eval.datasets import Problem
from relaygraph.eval.report import sweep_markdown
from relaygraph.eval.sweep import SweepConfig, assemble, derive_routers, plan
from relaygraph.policies import RandomRouter


def record(correct: bool, tokens: dict[str, int], parsed: bool = True, seconds: float = 1.0) -> dict:
    return {"correct": correct, "parsed": parsed, "tokens_by_agent": tokens, "seconds": seconds}


def test_call_ratio_is_large_model_tokens_over_all_generated_tokens_pooled() -> None:
    rows = [record(True, {"controller": 90, "expert": 10}),
            record(False, {"controller": 0, "expert": 100}, parsed=False),
            record(True, {"controller": 300})]
    s = metrics.summarize(rows, large="expert")
    assert s["call_ratio"] == pytest.approx(110 / 500)              # pooled over problems
    assert s["mean_call_ratio"] == pytest.approx((0.1 + 1.0 + 0.0) / 3)
    assert (s["n"], s["correct"], s["unparseable"], s["tokens"]) == (3, 2, 1, 500)
    assert s["accuracy"] == pytest.approx(2 / 3)
    assert metrics.item_call_ratio({}, "expert") == 0.0
    assert metrics.summarize([], "expert")["accuracy"] is None


def test_the_random_router_line_recovers_half_the_gap() -> None:
    line = metrics.curve([(0.25, 0.4), (0.5, 0.5), (0.75, 0.6)], small=0.3, large=0.7)
    assert line[0] == (0.0, 0.3) and line[-1] == (1.0, 0.7)
    assert metrics.auc(line) == pytest.approx(0.5)
    assert metrics.apgr(line, 0.3, 0.7) == pytest.approx(0.5)
    assert metrics.call_ratio_for_gap(line, 0.3, 0.7, 0.5) == pytest.approx(0.5)
    assert metrics.call_ratio_for_gap(line, 0.3, 0.7, 0.8) == pytest.approx(0.8)


def test_a_policy_at_the_large_models_accuracy_for_free_recovers_all_of_it() -> None:
    summary = metrics.family_summary([(0.0, 0.7)], small=0.3, large=0.7)
    assert summary["apgr"] == pytest.approx(1.0) and summary["auc"] == pytest.approx(0.7)
    assert summary["call_ratio_50"] == 0.0 and summary["call_ratio_80"] == 0.0


def test_gap_thresholds_interpolate_between_measured_points() -> None:
    # one point at 10% calls recovering 60% of the gap
    line = metrics.curve([(0.1, 0.54)], small=0.3, large=0.7)
    assert metrics.call_ratio_for_gap(line, 0.3, 0.7, 0.5) == pytest.approx(0.1 * 0.5 / 0.6)
    # 80% of the gap (0.62) lies on the segment (0.1, 0.54) -> (1, 0.7)
    assert metrics.call_ratio_for_gap(line, 0.3, 0.7, 0.8) == pytest.approx(0.1 + 0.9 * 0.08 / 0.16)
    assert metrics.auc(line) == pytest.approx(0.1 * (0.3 + 0.54) / 2 + 0.9 * (0.54 + 0.7) / 2)
    assert metrics.gap_recovered(0.54, 0.3, 0.7) == pytest.approx(0.6)


def test_a_curve_below_the_small_model_has_negative_apgr() -> None:
    line = metrics.curve([(0.5, 0.1), (0.9, 0.2)], small=0.3, large=0.7)
    assert metrics.apgr(line, 0.3, 0.7) < 0
    # half the gap (0.5) is first reached on the last segment, towards the large model alone
    assert metrics.call_ratio_for_gap(line, 0.3, 0.7, 0.5) == pytest.approx(0.9 + 0.1 * 0.3 / 0.5)


def test_without_a_gap_the_gap_relative_numbers_are_undefined() -> None:
    for small, large in ((0.5, 0.5), (0.6, 0.4)):
        summary = metrics.family_summary([(0.3, 0.5)], small, large)
        assert summary["apgr"] is summary["call_ratio_50"] is summary["call_ratio_80"] is None
        assert summary["auc"] == pytest.approx(metrics.auc(metrics.curve([(0.3, 0.5)], small, large)))
        assert metrics.gap_recovered(0.5, small, large) is None


def test_expected_random_router_weights_calls_by_each_models_length() -> None:
    line = metrics.random_router_expected(0.2, 0.6, small_tokens=100, large_tokens=300, steps=4)
    assert line[0] == (0.0, 0.2) and line[-1] == (1.0, pytest.approx(0.6))
    c, a = line[2]  # p = 0.5: half the queries, 300 / (300 + 100) of the tokens
    assert (c, a) == (pytest.approx(0.75), pytest.approx(0.4))


def test_the_random_router_recovers_half_the_gap_only_for_equally_long_answers() -> None:
    """APGR is over the *token* call ratio: 0.5 for the random router when both models
    write as many tokens, not otherwise (the docstring's claim, pinned)."""
    def router_apgr(small_tokens: float, large_tokens: float) -> float:
        expected = metrics.random_router_expected(0.2, 0.6, small_tokens, large_tokens, steps=200)
        return metrics.apgr(metrics.curve(expected[1:-1], 0.2, 0.6), 0.2, 0.6)

    assert router_apgr(100, 100) == pytest.approx(0.5, abs=1e-3)
    assert router_apgr(100, 300) < 0.45   # a verbose large model: calls cost more tokens
    assert router_apgr(300, 100) > 0.55


@pytest.mark.parametrize(("small_tokens", "large_tokens"), [(100, 300), (300, 100), (120, 120)])
def test_the_matched_random_router_has_the_policys_call_ratio(small_tokens, large_tokens) -> None:
    """random_router_p inverts the expected call ratio (the learned-call benchmark compares a
    trained controller with the random router at its call ratio this way)."""
    for ratio in (0.0, 0.079, 0.35, 0.9):
        p = metrics.random_router_p(small_tokens, large_tokens, ratio)
        spent = p * large_tokens + (1 - p) * small_tokens
        assert p * large_tokens / spent == pytest.approx(ratio)
    assert metrics.random_router_p(small_tokens, large_tokens, 1.0) == 1.0


# ---------------------------------------------------------------------- sweep definitions

def sweep(**fields) -> SweepConfig:
    return SweepConfig.model_validate({"dataset": "x.jsonl", **fields})


def test_the_solo_runs_always_come_first_and_vary_makes_one_policy_per_value() -> None:
    plans = plan(sweep(policies=[
        {"type": "confidence", "fallback_tokens": 8, "vary": {"threshold": [-4.0, -2.0]}},
        {"type": "fixed-interval", "interval": 16}, {"type": "fixed-interval", "interval": 64},
        {"type": "random-router", "p": 0.3}, {"type": "solo"}, {"name": "pc", "type": "prompted-call"}]))
    assert [p.name for p in plans] == [
        "solo-small", "solo-large", "confidence(threshold=-4)", "confidence(threshold=-2)",
        "fixed-interval(interval=16)", "fixed-interval(interval=64)", "pc"]
    assert plans[0].config.agents.keys() == {"controller"}  # what a result depends on, only
    assert plans[2].config.policy.threshold == -4.0 and plans[2].config.policy.fallback_tokens == 8
    prompted = plans[-1].config.agents["controller"].system_prompt
    assert "<call>n</call>" in prompted  # prompted-call explains the tool to the controller


def test_a_sweep_without_agents_runs_call_token_with_its_trained_controller() -> None:
    """As `relaygraph run`: with no [agents] the call-token row's controller is the catalog's
    trained one, while the solo rows (and the routers derived from them) are the plain pair;
    a sweep that names its agents gets exactly those."""
    from relaygraph.agents.catalog import DEFAULT_CONTROLLER, DEFAULT_EXPERT, RELAY_CONTROLLER

    def controllers(config: SweepConfig) -> dict[str, str]:
        out = {}
        for p in plan(config):
            agents = p.config.agents
            out[p.name] = (next(iter(agents.values())) if p.type == "solo" else agents["controller"]).model
        return out

    default = controllers(sweep(policies=[{"type": "call-token"}, {"type": "confidence"}]))
    assert default == {"solo-small": DEFAULT_CONTROLLER, "solo-large": DEFAULT_EXPERT,
                       "call-token": RELAY_CONTROLLER, "confidence": DEFAULT_CONTROLLER}
    named = {"controller": {"model": "./mine"}, "expert": {"model": DEFAULT_EXPERT}}
    assert controllers(sweep(agents=named, policies=[{"type": "call-token"}]))["call-token"] == "./mine"


def test_bad_sweep_definitions_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="threshold"):
        plan(sweep(policies=[{"type": "confidence", "threshold": "high"}]))
    with pytest.raises(ConfigError, match="policies.0: each policy needs a type"):
        plan(sweep(policies=[{"threshold": 1}]))
    with pytest.raises(ConfigError, match="same name"):
        plan(sweep(policies=[{"name": "a", "type": "call-token"}, {"name": "a", "type": "solo"},
                             {"name": "a", "type": "fixed-interval"}]))
    with pytest.raises(ValueError, match="large agent 'big'"):
        sweep(large="big")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sweep(random_router_p=[1.5])


def test_routers_are_assembled_from_the_solo_runs() -> None:
    problems = [Problem(id=str(i), question=f"question {i}?", answer="1") for i in range(40)]
    small = {p.id: {**record(i % 3 == 0, {"controller": 10 + i}), "problem": p.id}
             for i, p in enumerate(problems)}
    large = {p.id: {**record(i % 2 == 0, {"expert": 50}), "problem": p.id}
             for i, p in enumerate(problems)}
    derived = derive_routers(sweep(random_router_p=[0.3], router_seed=4), problems, small, large)
    routed = derived["random-router(p=0.3)"]
    router = RandomRouter(small="controller", large="expert", p=0.3, seed=4)
    for p in problems:  # exactly the query the policy would have routed, and that model's run
        to_large = router.to_large(p.question)
        assert routed[p.id]["routed_to"] == ("large" if to_large else "small")
        assert routed[p.id]["tokens_by_agent"] == (large if to_large else small)[p.id]["tokens_by_agent"]
    assert 0 < sum(r["routed_to"] == "large" for r in routed.values()) < 40
    perfect = derived["perfect-router"]
    assert all((perfect[p.id]["routed_to"] == "large") == (not small[p.id]["correct"]) for p in problems)
    assert [bool(perfect[p.id]["correct"]) for p in problems] == [
        bool(small[p.id]["correct"] or large[p.id]["correct"]) for p in problems]
    assert metrics.summarize(list(perfect.values()), "expert")["call_ratio"] == pytest.approx(
        sum(50 for p in problems if not small[p.id]["correct"])
        / sum((50 if not small[p.id]["correct"] else small[p.id]["tokens_by_agent"]["controller"])
              for p in problems))


def test_a_sweep_reports_where_the_large_model_wrote_and_what_a_policy_won_or_lost() -> None:
    """Two policies can share a call ratio and differ in how many problems they call on;
    accuracy can hide answers won and lost against the small model alone."""
    problems = [Problem(id=str(i), question=f"question {i}?", answer="1") for i in range(6)]
    config = sweep(policies=[{"name": "few", "type": "call-token"}], random_router_p=[])
    small = {p.id: {**record(i < 3, {"controller": 100}), "problem": p.id}
             for i, p in enumerate(problems)}
    large = {p.id: {**record(True, {"expert": 100}), "problem": p.id} for p in problems}
    # right on problems 0, 3, 4; the expert wrote on 3 and 4 only; problem 5 is not run yet
    few = {p.id: {**record(i in (0, 3, 4), {"controller": 90, "expert": 10 if i in (3, 4) else 0}),
                  "problem": p.id} for i, p in enumerate(problems[:5])}
    items = {"solo-small": small, "solo-large": large, "few": few}
    result = assemble(config, problems, plan(config), items, {}, {})
    by_name = {p["name"]: p for p in result["policies"]}
    assert by_name["few"]["large_wrote_on"] == 2 and by_name["few"]["n"] == 5
    assert by_name["few"]["vs_small"] == {"won": 2, "lost": 2}  # won 3, 4; lost 1, 2
    assert by_name["solo-large"]["vs_small"] == {"won": 3, "lost": 0}
    assert "vs_small" not in by_name["solo-small"] and by_name["solo-small"]["large_wrote_on"] == 0
    table = sweep_markdown(result)
    assert "| few | run | 5 | 60.0% |" in table and "| +2 / -2 |" in table and "| 2/5 |" in table
    # a report limited to the first 3 problems counts only those
    limited = assemble(config, problems[:3], plan(config), items, {}, {})
    assert {p["name"]: p for p in limited["policies"]}["few"]["vs_small"] == {"won": 0, "lost": 2}


def test_the_benchmark_sweep_config_is_valid() -> None:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "sweep_gsm8k.toml"
    config = SweepConfig.load(path, dataset="gsm8k_test.jsonl")
    names = [p.name for p in plan(config)]
    assert names[:2] == ["solo-small", "solo-large"] and len(names) == len(set(names)) > 4
    assert config.limit >= 50


def test_wilson_interval() -> None:
    # reference values (Wilson 1927; e.g. statsmodels proportion_confint(method="wilson"))
    assert metrics.wilson(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert metrics.wilson(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    assert metrics.wilson(90, 300) == pytest.approx((0.25094, 0.35412), abs=1e-5)
    assert metrics.wilson(10, 10)[1] == pytest.approx(1.0)
    lo, hi = metrics.wilson(30, 100)
    assert lo < 0.30 < hi and hi - lo < metrics.wilson(3, 10)[1] - metrics.wilson(3, 10)[0]
    with pytest.raises(ValueError):
        metrics.wilson(0, 0)
    summary = metrics.summarize([{"correct": c, "parsed": True, "tokens_by_agent": {"a": 1},
                                  "seconds": 1.0} for c in (True, False, False, False)], "b")
    assert summary["ci95"] == pytest.approx(list(metrics.wilson(1, 4)))


def test_random_router_at_a_call_ratio_lies_on_the_expected_line() -> None:
    line = metrics.random_router_expected(0.2, 0.5, 300.0, 250.0, steps=10)
    for ratio, accuracy in line:
        assert metrics.random_router_at(ratio, 0.2, 0.5, 300.0, 250.0) == pytest.approx(accuracy)
