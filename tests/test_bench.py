"""``relaygraph bench`` on two untrained tiny models: the measurements mean what they say."""

from __future__ import annotations

import json
import statistics
import threading

import pytest
from typer.testing import CliRunner

from relaygraph import bench
from relaygraph.agents.backend import Generation
from relaygraph.agents.transformers_backend import TransformersBackend
from relaygraph.agents.wrapping import BackendWrapper
from relaygraph.cli import app
from tests import tiny_models as tiny


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[TransformersBackend, TransformersBackend]:
    small, large = (TransformersBackend(str(tiny.build_random_model(
        tmp_path_factory.mktemp(f"random-{seed}"), seed=seed)), dtype="float32") for seed in (1, 2))
    for backend in (small, large):
        backend.eos_ids = frozenset()  # write the whole budget: many handoffs
    return small, large


class Counting(BackendWrapper):
    """Counts what each question had generated, apart for relay turns (with a cache key)
    and solo generations (without)."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.tokens: dict[tuple[str, bool], int] = {}
        self.lock = threading.Lock()

    def generate(self, prompt, rule, sampling=bench.Sampling(), on_text=None, cache_key=None):
        gen = self.inner.generate(prompt, rule, sampling, on_text, cache_key)
        with self.lock:
            key = (prompt.question, cache_key is not None)
            self.tokens[key] = self.tokens.get(key, 0) + gen.n_tokens
        return gen

    @property
    def cache_size(self) -> int:  # the bench turns reuse off for its naive relay
        return self.inner.cache_size

    @cache_size.setter
    def cache_size(self, value: int) -> None:
        self.inner.cache_size = value

    def render(self, prompt):
        return self.inner.render(prompt)

    def prefill_seconds(self, ids, spans):
        return self.inner.prefill_seconds(ids, spans)


def test_bench_measures_reuse_overhead_floor_and_throughput_vs_solo(pair, redis_store) -> None:
    small, large = (Counting(b) for b in pair)
    res = bench.run_bench(small, large, redis_store, question="What is 2 + 5?", tokens=48,
                          interval=(4, 16), concurrency=(1, 3), throughput_tokens=8,
                          questions=["Say hi"], repeat=2)
    assert res["handoffs"] >= 11 and res["intervals"] == [4, 16] and res["repeat"] == 2
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
    assert 0 < h["relay_step_ms"] < 1000  # LangGraph's own share of a turn
    assert 0 < h["cpu_median"] and h["handoffs_measured"] >= 2 * 11
    for every in ("4", "16"):
        entry = res["relay_vs_solo"]["by_interval"][every]
        assert len(entry["relay_s"]["rounds"]) == len(entry["solo_s"]["rounds"]) == 2
        assert entry["relay_s"]["min"] <= entry["relay_s"]["median"]
        assert len(entry["relay_s"]["cpu_s"]) == len(entry["relay_s"]["load"]) == 2
        # the floor is the same solo decoding plus what the catch-ups add, timed alone
        assert entry["floor_s"]["rounds"] == pytest.approx(
            [s + c for s, c in zip(entry["solo_s"]["rounds"], entry["catch_up_s"]["rounds"])])
        per_round = [r / f for r, f in zip(entry["relay_s"]["rounds"], entry["floor_s"]["rounds"])]
        assert entry["relay_vs_floor"]["round_ratios"] == pytest.approx(per_round)
        assert entry["relay_vs_floor"]["ratio"] == pytest.approx(statistics.median(per_round))
    assert res["relay_vs_solo"]["ratio"] == res["relay_vs_solo"]["by_interval"]["4"]["relay_vs_solo"]["ratio"]
    assert res["relay_vs_floor"]["ratio"] == max(
        v["ratio"] for v in res["relay_vs_floor"]["by_interval"].values())
    assert [t["concurrency"] for t in res["throughput"]] == [1, 3]
    three = res["throughput"][1]
    assert three["tokens"] == 3 * 8 == sum(three["mix"].values())
    assert res["throughput_vs_solo"]["concurrency"] == 3
    assert res["throughput_vs_solo"]["ratio"] == three["vs_solo"]["ratio"]
    # the solo side wrote the relay's token mix, model by model: per round, what the relay
    # rounds had each model write for the throughput question (1 + 3 trajectories)
    for backend in (small, large):
        relay_tokens = backend.tokens[("Say hi", True)]
        assert backend.tokens[("Say hi", False)] == relay_tokens > 0
    assert isinstance(res["warnings"], list)
    assert set(res["goals_met"]) == set(bench.GOALS)
    assert "relay / floor, interval 16" in bench.table(res)
    assert pair[0].cache_size > 0 and pair[1].cache_size > 0  # reuse switched back on


def test_rounds_interleave_both_sides_in_alternating_order() -> None:
    order: list[str] = []
    out = bench.interleave([("relay", lambda r: order.append(f"relay{r}") or r),
                            ("solo", lambda r: order.append(f"solo{r}") or 10 + r)], 4)
    assert order == ["relay0", "solo0", "solo1", "relay1", "relay2", "solo2", "solo3", "relay3"]
    assert out == {"relay": [0, 1, 2, 3], "solo": [10, 11, 12, 13]}


def test_a_steady_drift_in_load_errs_both_ways_in_alternating_rounds() -> None:
    """The machine slows by 5% per run while the bench goes on; the true ratio is 1.2. In
    A, B, A, B order every round's B runs later than its A, so every round errs the same
    way; alternating the order makes the rounds err both ways around the true ratio."""
    clock = iter(range(100))

    def run(cost: float) -> bench.Timing:
        return bench.Timing(cost * (1 + 0.05 * next(clock)), 0.0, 1.0)

    rounds = bench.interleave([("relay", lambda r: run(1.2)), ("solo", lambda r: run(1.0))], 4)
    got = bench.compare("drift", rounds["relay"], rounds["solo"], [])
    assert min(got["round_ratios"]) < 1.2 < max(got["round_ratios"])
    assert got["ratio"] == pytest.approx(1.2, rel=0.03)


def test_median_round_ratio_and_a_warning_when_rounds_disagree() -> None:
    def t(*walls: float) -> list[bench.Timing]:
        return [bench.Timing(w, w / 2, 1.0) for w in walls]

    warnings: list[str] = []
    steady = bench.compare("steady", t(11, 10.5, 10), t(10, 9.8, 9.5), warnings)
    assert steady["round_ratios"] == pytest.approx([1.1, 10.5 / 9.8, 10 / 9.5])
    assert steady["ratio"] == pytest.approx(10.5 / 9.8)  # the median of the three
    assert steady["ratio_of_mins"] == pytest.approx(10 / 9.5)
    assert steady["spread"] < bench.SPREAD_WARNING and warnings == []
    # one round caught by a burst of load on each side: the median round is untouched,
    # while the ratio of mins pairs the relay's quiet round with solo's other quiet round
    busy = bench.compare("busy", t(10, 30, 12), t(10, 10, 30), warnings)
    assert busy["ratio"] == pytest.approx(1.0)
    assert busy["ratio_of_mins"] == pytest.approx(1.0)
    # the relay's one quiet round met a busy solo round: the ratio of mins reads 0.34, the
    # median round the 1.03 that two rounds agree on
    lucky = bench.compare("lucky", t(30, 31, 10), t(29, 30, 29), [])
    assert lucky["ratio"] == pytest.approx(31 / 30) and lucky["ratio_of_mins"] < 0.4
    assert len(warnings) == 1 and warnings[0].startswith("busy: rounds disagree by")


def generation(prompt_tokens: int, n: int) -> Generation:
    return Generation(text="", token_ids=[1] * n, logprobs=[0.0] * n, finish_reason="budget",
                      prompt_tokens=prompt_tokens)


def test_catch_up_spans_are_what_the_others_wrote_since_the_agents_last_turn() -> None:
    head = 30
    # controller: writes 8, then (after the expert's 8) 8 more, then 8 more
    controller = [generation(30, 8), generation(46, 8), generation(62, 8)]
    # expert: first sees the controller's 8 tokens, later its next 8
    expert = [generation(38, 8), generation(54, 8)]
    assert bench.catch_ups(controller, head) == [(38, 46), (54, 62)]
    assert bench.catch_ups(expert, head) == [(30, 38), (46, 54)]
    assert bench.floor_seconds(2.0, [0.25, 0.5]) == 2.75
    # a turn's first step feeds its own last token and the others' tokens, in place of the
    # one-token decode step solo decoding would run there
    assert bench.first_steps([(38, 46), (54, 62)]) == ([(37, 46), (53, 62)], [(37, 38), (53, 54)])


def test_prefill_seconds_times_each_span_on_the_right_cache(pair) -> None:
    small, _ = pair
    ids = small.render(bench.Prompt("What is 2 + 5?", None)) + list(range(5, 45))
    spans = [(10, 18), (30, 34), (20, 29)]
    seconds = small.prefill_seconds(ids, spans)
    assert len(seconds) == 3 and all(s > 0 for s in seconds)
    assert small.prefill_seconds(ids, []) == []


def test_bench_cli_rejects_bad_concurrency_and_intervals(tmp_path) -> None:
    for option, value in (("--concurrency", "1,x"), ("--interval", "8,x"), ("--interval", "0")):
        result = CliRunner().invoke(app, ["bench", option, value, "--out", str(tmp_path / "b.json")])
        assert result.exit_code == 2 and option in result.output
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
        "--random-weights", "--tokens", "24", "--interval", "4,12", "--concurrency", "2",
        "--throughput-tokens", "4", "--repeat", "2",
        "--redis", redis_server.url, "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)  # stdout is the JSON alone; progress goes to stderr
    assert "interval 12, round 2/2: relay" in result.stderr
    assert "throughput, 2 concurrent, round 1/2: solo" in result.stderr
    assert json.loads(out.read_text()) == printed
    assert printed["throughput"][0]["concurrency"] == 2
    assert printed["random_weights"] is True and printed["handoffs"] >= 5
    assert set(printed["relay_vs_solo"]["by_interval"]) == {"4", "12"}
    for key in ("prefill_amplification", "handoff_overhead_ms", "relay_vs_solo",
                "relay_vs_floor", "throughput_vs_solo"):
        assert key in printed


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


def test_a_turn_folds_its_catch_up_into_its_first_step(pair, redis_store, monkeypatch) -> None:
    """A turn after the other agent's costs exactly one forward pass per token it writes: the
    first pass prefills what the other wrote (and the agent's own last token) and samples
    the turn's first token."""
    from relaygraph import Agent, Relay
    from relaygraph.policies import FixedIntervalPolicy

    small, large = pair
    feeds: list[tuple[int, int]] = []  # (thread, tokens fed) per forward of the controller
    real = small.batcher.forward

    def forward(feed, cache):
        feeds.append((threading.get_ident(), len(feed)))
        return real(feed, cache)

    monkeypatch.setattr(small.batcher, "forward", forward)
    recorder = bench.Recorder(small)
    Relay([Agent("controller", recorder), Agent("expert", large)], FixedIntervalPolicy(interval=4),
          redis_store, max_tokens=24).run("What is 2 + 5?")
    calls = recorder.take()
    assert [c.generation.n_tokens for c in calls] == [4, 4, 4]
    assert len(feeds) == 12  # one forward per token written, catch-ups included
    assert [n for _, n in feeds[4::4]] == [5, 5]  # the expert's 4 tokens + its own last one
    assert all(n == 1 for i, (_, n) in enumerate(feeds) if i % 4)
    # the relay ran its steps in this thread (no executor hop per step)
    assert {t for t, _ in feeds} == {threading.get_ident()}
