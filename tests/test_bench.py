"""``relaygraph bench`` on two untrained tiny models: the measurements mean what they say."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from relaygraph import bench
from relaygraph.agents.transformers_backend import TransformersBackend
from relaygraph.cli import app
from tests import tiny_models as tiny


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[TransformersBackend, TransformersBackend]:
    small, large = (TransformersBackend(str(tiny.build_random_model(
        tmp_path_factory.mktemp(f"random-{seed}"), seed=seed)), dtype="float32") for seed in (1, 2))
    for backend in (small, large):
        backend.eos_ids = frozenset()  # write the whole budget: many handoffs
    return small, large


def test_bench_measures_cache_reuse_overhead_and_throughput(pair, redis_store) -> None:
    small, large = pair
    res = bench.run_bench(small, large, redis_store, question="What is 2 + 5?", tokens=48,
                          interval=4, concurrency=(1, 3), throughput_tokens=8)
    assert res["handoffs"] >= 11
    assert res["same_tokens_naive_vs_reuse"]
    for agent in ("controller", "expert"):
        amp = res["prefill_amplification"][agent]
        # each turn prefills only the other's 4 tokens + its own last token: about 1
        assert 0.95 <= amp["reuse"]["ratio"] <= 1.05, amp
        # naive re-reads the whole view every turn (6 turns of a growing view)
        assert amp["naive"]["ratio"] > 3 * amp["reuse"]["ratio"], amp
        assert amp["naive"]["view"] == amp["reuse"]["view"]
    h = res["handoff_overhead_ms"]
    assert 0 < h["median"] < 1000 and h["bare_langgraph_step_ms"] > 0 and h["spans"] > 10
    assert res["relay_vs_solo"]["ratio"] > 0
    assert [t["concurrency"] for t in res["throughput"]] == [1, 3]
    assert res["throughput"][1]["tokens"] == 3 * 8
    assert set(res["goals_met"]) == set(bench.GOALS)
    assert "prefill amplification, controller" in bench.table(res)
    assert small.cache_size > 0 and large.cache_size > 0  # reuse switched back on


def test_bench_cli_rejects_bad_concurrency(tmp_path) -> None:
    result = CliRunner().invoke(app, ["bench", "--concurrency", "1,x", "--out", str(tmp_path / "b.json")])
    assert result.exit_code == 2 and "--concurrency" in result.output
    assert not (tmp_path / "b.json").exists()


def test_bench_cli_on_architectures_without_weights(redis_server, tmp_path) -> None:
    """--random-weights needs only config and tokenizer files (what a GPU box gets)."""
    small, large = (tiny.build_random_model(tmp_path / f"m{seed}", seed=seed) for seed in (1, 2))
    for folder in (small, large):
        for weights in folder.glob("*.safetensors"):
            weights.unlink()
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, [
        "bench", "--controller", str(small), "--expert", str(large), "--dtype", "float32",
        "--random-weights",
        "--tokens", "24", "--interval", "4", "--concurrency", "2", "--throughput-tokens", "4",
        "--redis", redis_server.url, "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == printed
    assert printed["throughput"][0]["concurrency"] == 2
    assert printed["random_weights"] is True and printed["handoffs"] >= 5


@pytest.mark.parametrize("policy", ["fixed-interval", "confidence"])
def test_relay_with_cache_reuse_equals_relay_without(pair, redis_store, policy) -> None:
    """Token for token (and log-prob for log-prob) the same relay whether each agent reuses
    its KV cache or re-reads its whole view every turn — on untrained models, whose greedy
    choices would flip at the slightest difference."""
    from relaygraph import Agent, Relay
    from relaygraph.policies import ConfidencePolicy, FixedIntervalPolicy

    small, large = pair
    agents = [Agent("controller", small), Agent("expert", large)]
    make = {"fixed-interval": lambda: FixedIntervalPolicy(interval=3),
            "confidence": lambda: ConfidencePolicy(threshold=-3.85, fallback_tokens=3)}[policy]

    def segments(reuse: bool) -> list[tuple[str, list[int], list[float]]]:
        for backend in pair:
            backend.cache_size = 32 if reuse else 0
        result = Relay(agents, make(), redis_store, max_tokens=40).run("What is 2 + 5?")
        return [(s.author, s.token_ids, s.logprobs) for s in redis_store.read(result.trajectory_id)]

    try:
        cached, naive = segments(True), segments(False)
    finally:
        small.cache_size = large.cache_size = 32
    assert len(cached) >= 4 and {a for a, _, _ in cached} == {"controller", "expert"}
    assert [(a, ids) for a, ids, _ in cached] == [(a, ids) for a, ids, _ in naive]
    for (_, _, lp1), (_, _, lp2) in zip(cached, naive):
        assert lp1 == pytest.approx(lp2, abs=1e-4)
