"""``relaygraph eval`` end to end on the tiny in-process models: sweep (files, derived
routers, call ratios, resuming, a config file), the reasoning relay, recoverability and
guidability; bad input is one ``error:`` line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from relaygraph.cli import app
from relaygraph.eval.chains import written_chain
from relaygraph.eval.checking import check_math
from relaygraph.eval.twins import is_spoiler, steer_tokens
from tests import tiny_models as tiny

runner = CliRunner()
ROWS = [(tiny.QUESTION, "7"), (tiny.NOCALL_QUESTION, "2"), (tiny.MALFORMED_QUESTION, "7")]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": f"...\n#### {a}"}) + "\n"
                            for q, a in ROWS))
    return path


@pytest.fixture
def models(backends) -> tuple[str, str]:
    return backends[0].model_id, backends[1].model_id


def invoke(*args: str) -> dict:
    result = runner.invoke(app, ["eval", *args, "--quiet"])
    assert result.exit_code == 0, result.output
    return result


def load(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_sweep_reports_every_policy_and_resumes(data, models, redis_server, redis_store, tmp_path) -> None:
    out = tmp_path / "sweep"
    args = ["sweep", str(data), "--small", models[0], "--large", models[1], "--dtype", "float32",
            "--max-tokens", "16", "--policies", "fixed-interval", "--p", "0.5", "--out", str(out),
            "--redis", redis_server.url, "--concurrency", "2"]
    first = load(out) if invoke(*args, "--limit", "2") else None
    assert first["computed"] == 3 * 2  # solo-small, solo-large, fixed-interval on 2 problems
    shown = invoke(*args)
    result = load(out)
    assert result["computed"] == 3 and result["complete"]  # only the new problem ran
    assert "perfect-router" in shown.output and "call ratio" in shown.output
    assert load(out)["items"]["solo-small"]["0"] == first["items"]["solo-small"]["0"]

    policies = {p["name"]: p for p in result["policies"]}
    assert list(policies) == ["solo-small", "solo-large", "fixed-interval",
                              "random-router(p=0.5)", "perfect-router"]
    assert [p["derived_from"] for p in policies.values()] == [None, None, None, "solo runs", "solo runs"]
    items = result["items"]
    small, large = items["solo-small"], items["solo-large"]
    for pid in ("0", "1", "2"):
        best = small[pid]["correct"] or large[pid]["correct"]
        assert items["perfect-router"][pid]["correct"] == best
        assert items["perfect-router"][pid]["routed_to"] == ("small" if small[pid]["correct"] else "large")
        picked = items["random-router(p=0.5)"][pid]
        assert picked["trajectory_id"] == (large if picked["routed_to"] == "large" else small)[pid]["trajectory_id"]
        for policy in ("solo-small", "solo-large", "fixed-interval"):
            record = items[policy][pid]
            assert redis_store.exists(record["trajectory_id"])  # `relaygraph show ID` works
            tokens = record["tokens_by_agent"]
            assert record["call_ratio"] == pytest.approx(tokens.get("expert", 0) / sum(tokens.values()))
    for name, p in policies.items():
        rows = list(items[name].values())
        tokens = sum(sum(r["tokens_by_agent"].values()) for r in rows)
        assert p["call_ratio"] == pytest.approx(sum(r["tokens_by_agent"].get("expert", 0) for r in rows) / tokens)
        assert p["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / 3)
        assert p["unparseable"] == sum(not r["parsed"] for r in rows)
    assert policies["solo-small"]["call_ratio"] == 0.0 and policies["solo-large"]["call_ratio"] == 1.0
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"
    table = (out / "table.md").read_text()
    assert "| perfect-router | derived |" in table and "derived from the solo runs" in table


def test_a_sweep_runs_problem_by_problem(data, models, redis_server, tmp_path: Path) -> None:
    """Every policy's item for one problem before the next problem's, so a sweep stopped
    early has the same problems for every policy (and a smaller ``--limit`` reports them)."""
    out = tmp_path / "order"
    shown = invoke("sweep", str(data), "--small", models[0], "--large", models[1], "--dtype",
                   "float32", "--max-tokens", "8", "--limit", "2", "--policies", "fixed-interval",
                   "--out", str(out), "--redis", redis_server.url, "--concurrency", "1")
    assert "Loading weights" not in shown.output  # the pool's line says what loads, not a bar
    keys = [json.loads(line)["key"] for line in (out / "items.jsonl").read_text().splitlines()]
    assert keys == [f"{policy}/{pid}" for pid in ("0", "1")
                    for policy in ("solo-small", "solo-large", "fixed-interval")]


def test_every_default_policy_runs(data, models, redis_server, tmp_path: Path) -> None:
    out = tmp_path / "all"
    invoke("sweep", str(data), "--small", models[0], "--large", models[1], "--dtype", "float32",
           "--max-tokens", "12", "--limit", "1", "--thresholds", "-1", "--out", str(out),
           "--redis", redis_server.url)
    result = load(out)
    assert [p["name"] for p in result["policies"] if not p["derived_from"]] == [
        "solo-small", "solo-large", "confidence", "fixed-interval", "prompted-call", "call-token",
        "supervisor"]
    assert result["complete"] and not result["errors"]


def test_without_out_results_go_to_the_per_user_folder(data, models, redis_server, tmp_path,
                                                       monkeypatch) -> None:
    """Not into the folder the command runs in (a checkout): ``$RELAYGRAPH_HOME/results``."""
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("RELAYGRAPH_HOME", str(home))
    monkeypatch.chdir(work)
    result = invoke("sweep", str(data), "--small", models[0], "--large", models[1], "--dtype",
                    "float32", "--max-tokens", "8", "--limit", "1", "--policies", "none",
                    "--redis", redis_server.url)
    assert load(home / "results" / "eval-sweep")["complete"]
    assert f"results in {home / 'results' / 'eval-sweep'}/" in " ".join(result.output.split())
    assert list(work.iterdir()) == []


def test_sweep_from_a_config_file(data, models, redis_server, tmp_path: Path) -> None:
    config = tmp_path / "sweep.toml"
    config.write_text(f"""
dataset = "{data}"
max_tokens = 12
random_router_p = [0.25]
perfect_router = false
small = "small"
large = "large"
[agents.small]
model = "{models[0]}"
dtype = "float32"
price_per_million_output_tokens = 1.0
[agents.large]
model = "{models[1]}"
dtype = "float32"
price_per_million_input_tokens = 2.0
price_per_million_output_tokens = 100.0
[[policies]]
type = "fixed-interval"
agents = ["small", "large"]
vary = {{ interval = [4, 8] }}
""")
    out = tmp_path / "out"
    invoke("sweep", "--config", str(config), "--limit", "2", "--out", str(out), "--redis", redis_server.url)
    result = load(out)
    assert [p["name"] for p in result["policies"]] == [
        "solo-small", "solo-large", "fixed-interval(interval=4)", "fixed-interval(interval=8)",
        "random-router(p=0.25)"]
    assert result["dataset"]["problems"] == 2
    four = result["items"]["fixed-interval(interval=4)"]["0"]
    assert set(four["tokens_by_agent"]) == {"small", "large"}
    assert four["call_ratio"] == pytest.approx(four["tokens_by_agent"]["large"] / sum(four["tokens_by_agent"].values()))
    # prices: each item's cost, a column per policy and a curve against cost
    tokens = four["tokens_by_agent"]
    assert four["cost"] > (tokens["small"] * 1.0 + tokens["large"] * 100.0) / 1e6  # + large's input
    small = result["policies"][0]
    assert small["cost_per_problem"] == pytest.approx(
        sum(sum(i["tokens_by_agent"].values()) for i in result["items"]["solo-small"].values()) / 2 / 1e6)
    assert "cost / problem" in (out / "table.md").read_text()
    assert (out / "cost_curve.png").stat().st_size > 1000


def test_sweep_with_samples_reports_avg_at_k(data, models, redis_server, redis_store, tmp_path) -> None:
    """--samples k: every problem runs k times, sampled with seeds 0..k-1; accuracy is the mean
    over all k x problems runs (avg@k), and each run's seed is in its stored config."""
    out = tmp_path / "avg"
    invoke("sweep", str(data), "--small", models[0], "--large", models[1], "--dtype", "float32",
           "--max-tokens", "12", "--policies", "none", "--p", "0.5", "--samples", "3",
           "--temperature", "1.5", "--limit", "2", "--out", str(out), "--redis", redis_server.url)
    result = load(out)
    runs = result["items"]["solo-small"]
    assert sorted(runs) == ["0#0", "0#1", "0#2", "1#0", "1#1", "1#2"]
    small = next(p for p in result["policies"] if p["name"] == "solo-small")
    assert small["n"] == 6
    assert small["accuracy"] == pytest.approx(sum(r["correct"] for r in runs.values()) / 6)
    for pid, record in runs.items():
        config = redis_store.load(record["trajectory_id"]).task.config["relay"]
        agent = next(iter(config["agents"].values()))
        assert (agent["seed"], agent["temperature"]) == (int(pid.split("#")[1]), 1.5)
    texts = {r["_text"] if "_text" in r else r["answer"] for pid, r in runs.items()
             if pid.startswith("0#")}
    assert len(texts) > 1  # sampled at a high temperature, the runs differ
    assert any("avg@3" in note for note in result["notes"])


@pytest.mark.parametrize(("args", "message"), [
    (["sweep"], "give a dataset"),
    (["sweep", "DATA", "--policies", "teleport"], "--policies: unknown"),
    (["sweep", "/nonexistent/x.jsonl"], "cannot read dataset"),
    (["sweep", "DATA", "--limit", "2", "--p", "0.5,x"], "--p takes numbers"),
    (["relay", "DATA", "--models", "only-one"], "--models needs two"),
    (["guidability", "reasoning-gym:no_such_task"], "unknown reasoning-gym task"),
])
def test_bad_input_is_one_error_line(data, redis_server, tmp_path, args, message) -> None:
    args = [str(data) if a == "DATA" else a for a in args]
    result = runner.invoke(app, ["eval", *args, "--out", str(tmp_path / "o"), "--redis", redis_server.url])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error:") and message in result.output
    assert "Traceback" not in result.output


def test_an_interrupted_sweep_says_how_many_problems_every_policy_has(
        data, models, redis_store, tmp_path: Path) -> None:
    """Ctrl-C after the 4th item (three policies): problem 0 is done for all of them and
    problem 1 for one; the sweep says 1, and ``limit = 1`` then reports without running."""
    from relaygraph.eval.runner import FileResults, Progress
    from relaygraph.eval.sweep import SweepConfig, SweepInterrupted, run_sweep

    class CtrlCAfter(Progress):
        def __init__(self, items: int) -> None:
            super().__init__(None)
            self.left = items

        def advance(self, group: str, failed: bool = False) -> None:
            self.left -= 1
            if self.left == 0:
                raise KeyboardInterrupt

    agents = {"controller": {"model": models[0], "dtype": "float32"},
              "expert": {"model": models[1], "dtype": "float32"}}
    cfg = SweepConfig(dataset=str(data), max_tokens=8, agents=agents,
                      policies=[{"type": "fixed-interval"}], random_router_p=[0.5])
    out = tmp_path / "stopped"
    results = FileResults(out)
    with pytest.raises(SweepInterrupted) as stopped:
        run_sweep(cfg, redis_store, results, progress=CtrlCAfter(4))
    results.close()
    assert stopped.value.complete == 1
    results = FileResults(out)
    result = run_sweep(cfg.model_copy(update={"limit": 1}), redis_store, results)
    results.close()
    assert result["computed"] == 0 and result["complete"]


def test_a_sweep_item_leaves_no_kv_cache_behind(data, models, redis_store, tmp_path) -> None:
    """A finished item's caches are dropped, so they never crowd out the caches of the runs
    still going (each backend keeps a bounded number)."""
    from relaygraph.agents.wrapping import unwrap
    from relaygraph.eval.models import ModelPool
    from relaygraph.eval.runner import FileResults
    from relaygraph.eval.sweep import SweepConfig, run_sweep

    agents = {"controller": {"model": models[0], "dtype": "float32"},
              "expert": {"model": models[1], "dtype": "float32"}}
    cfg = SweepConfig(dataset=str(data), limit=2, max_tokens=12, agents=agents,
                      policies=[{"type": "fixed-interval", "interval": 4}], random_router_p=[])
    pool, results = ModelPool(), FileResults(tmp_path / "caches")
    try:
        result = run_sweep(cfg, redis_store, results, concurrency=2, pool=pool)
    finally:
        results.close()
    assert result["computed"] == 6
    assert max(r["handoffs"] for r in result["items"]["fixed-interval"].values()) >= 1
    backends = [unwrap(b) for b in pool.backends.values()]
    assert len(backends) == 2 and all(not b._caches for b in backends)


def test_the_cli_says_which_limit_reports_an_interrupted_sweep(data, models, redis_server,
                                                               monkeypatch, tmp_path) -> None:
    from relaygraph.eval import sweep as sweep_module

    def stopped(*args, **kwargs):
        raise sweep_module.SweepInterrupted(2)

    monkeypatch.setattr(sweep_module, "run_sweep", stopped)
    result = runner.invoke(app, ["eval", "sweep", str(data), "--small", models[0], "--large",
                                 models[1], "--out", str(tmp_path / "o"), "--redis",
                                 redis_server.url])
    assert result.exit_code == 130
    assert "rerun the same command to continue" in result.output
    assert "--limit 2 reports them" in " ".join(result.output.split())


def test_the_sweep_help_states_the_configs_defaults() -> None:
    """The defaults in ``eval sweep --help`` are the ones a sweep uses."""
    import typing

    from relaygraph.cli.eval import sweep
    from relaygraph.eval.sweep import DEFAULT_POLICIES, SweepConfig

    def help_of(name: str) -> str:
        annotation = typing.get_type_hints(sweep, include_extras=True)[name]
        return next(m.help for m in annotation.__metadata__ if hasattr(m, "help"))

    (confidence,) = [e for e in DEFAULT_POLICIES if e["type"] == "confidence"]
    assert f"(default {','.join(map(str, confidence['vary']['threshold']))})" in help_of("thresholds")
    defaults = SweepConfig(dataset="x")
    assert f"(default {','.join(map(str, defaults.random_router_p))})" in help_of("p")
    assert f"(default {defaults.max_tokens})" in help_of("max_tokens")
    types = ", ".join(e["type"] for e in DEFAULT_POLICIES)
    assert f"Default: {types}." in help_of("policies")


def test_bad_sweep_config_names_the_field(tmp_path: Path) -> None:
    config = tmp_path / "s.toml"
    config.write_text('dataset = "x.jsonl"\nmax_tokens = -3\n')
    result = runner.invoke(app, ["eval", "sweep", "--config", str(config)])
    assert result.exit_code == 2 and "max_tokens" in result.output


def test_relay_experiment_cuts_and_hands_over(data, models, redis_server, redis_store, tmp_path) -> None:
    out = tmp_path / "relay"
    invoke("relay", str(data), "--models", ",".join(models), "--dtype", "float32", "--max-tokens", "16",
           "--thresholds", "-0.5", "--fractions", "0.5", "--budgets", "1", "--out", str(out),
           "--redis", redis_server.url)
    result = load(out)
    names = list(result["models"])
    assert [r["model"] for r in result["solo"]] == names
    solos = {(r["model"], r["problem"]): r for r in result["items"]["solo"]}
    hybrids = result["items"]["hybrids"]
    assert len(hybrids) == 2 * 3 * 3  # (initiator, continuer) pairs x cuts x problems
    for h in hybrids:
        source = solos[h["initiator"], h["problem"]]
        chain = written_chain(redis_store, source["trajectory_id"], h["initiator"])
        if h["cut"] == "50%":
            assert h["cut_tokens"] == round(0.5 * len(chain)) and not h["uncut"]
            segments = redis_store.read(h["trajectory_id"])
            if h["cut_tokens"]:
                assert segments[0].meta.get("given") and segments[0].author == h["initiator"]
                assert segments[0].token_ids == chain.token_ids[:h["cut_tokens"]]
            assert {s.author for s in segments if not s.meta.get("given")} <= {h["continuer"]}
        elif h["cut"] == "surprisal>1":  # where the accumulated surprisal first exceeds 1
            total = [-sum(chain.logprobs[:i + 1]) for i in range(len(chain))]
            expected = next((i for i, t in enumerate(total) if t > 1), None)
            assert (None if h["uncut"] else h["cut_tokens"]) == expected
        elif h["uncut"]:  # no token below the threshold: the initiator's own chain
            assert all(lp >= -0.5 for lp in chain.logprobs)
            assert h["correct"] == source["correct"]
        else:
            assert chain.logprobs[h["cut_tokens"]] < -0.5
    for row in result["hybrids"]:
        mine = [h for h in hybrids if (h["initiator"], h["continuer"], h["cut"]) ==
                (row["initiator"], row["continuer"], row["cut"])]
        assert row["n"] == 3 and row["accuracy"] == pytest.approx(sum(h["correct"] for h in mine) / 3)
    assert "hybrid accuracy" in (out / "table.md").read_text()


def test_recoverability_inserts_another_problems_start_into_solved_problems(
        data, models, redis_server, redis_store, tmp_path) -> None:
    out = tmp_path / "rec"
    invoke("recoverability", str(data), "--model", models[0], "--dtype", "float32", "--max-tokens", "16",
           "--positions", "0,0.5", "--out", str(out), "--redis", redis_server.url)
    result = load(out)
    solo = {r["problem"]: r for r in result["items"]["solo"]}
    assert result["qualifying"] == [pid for pid in ("0", "1", "2") if solo[pid]["correct"]]
    assert result["qualifying"]  # the controller was trained to solve two of them
    name = next(iter(solo.values()))["model"]
    runs = result["items"]["continuations"]
    assert {r["problem"] for r in runs} == set(result["qualifying"])
    for r in runs:
        assert r["distractor"] != r["problem"]
        own = written_chain(redis_store, solo[r["problem"]]["trajectory_id"], name)
        other = written_chain(redis_store, solo[r["distractor"]]["trajectory_id"], name)
        assert r["steer_tokens"] == steer_tokens(len(other), 0.2)
        given = [s for s in redis_store.read(r["trajectory_id"]) if s.meta.get("given")]
        if r["m_tokens"]:
            assert given[0].token_ids == own.token_ids[:r["m_tokens"]]
        else:
            assert r["condition"] == "m=0"
        assert given[-1].author == "steer" and given[-1].token_ids == other.token_ids[:r["steer_tokens"]]
        written = "".join(s.text for s in redis_store.read(r["trajectory_id"]) if not s.meta.get("given"))
        complete = r["finish_reason"] not in ("budget", "length")
        assert r["predicted"] == check_math(written, r["gold"], complete).predicted  # a_off: its own part
    rows = {row["condition"]: row for row in result["conditions"]}
    assert rows["m=0"]["n"] == rows["m=0.5"]["n"] == len(result["qualifying"])


def test_guidability_flags_spoilers(data, models, redis_server, redis_store, tmp_path) -> None:
    out = tmp_path / "guid"
    # the expert never learned "What is 1 + 1?"; the controller answers it ("Simple: \boxed{2}.")
    invoke("guidability", str(data), "--model", models[1], "--steer-model", models[0],
           "--samples", "2", "--fractions", "0.2,0.9", "--dtype", "float32", "--max-tokens", "16",
           "--out", str(out), "--redis", redis_server.url)
    result = load(out)
    samples: dict[str, list] = {}
    steer = {}
    for r in result["items"]["solo"]:
        (samples.setdefault(r["problem"], []).append(r) if r["phase"] == "sample" else steer.__setitem__(r["problem"], r))
    assert result["hard"] == [pid for pid in ("0", "1", "2") if sum(s["correct"] for s in samples[pid]) <= 1]
    assert result["qualifying"] == [pid for pid in result["hard"] if steer[pid]["correct"]]
    runs = result["items"]["continuations"]
    assert len(runs) == 2 * len(result["qualifying"])
    for r in runs:
        (segment,) = [s for s in redis_store.read(r["trajectory_id"]) if s.meta.get("given")]
        assert segment.author == "steer" and r["spoiler"] == is_spoiler(segment.text, r["gold"])
    for row in result["conditions"]:
        mine = [r for r in runs if r["fraction"] == row["fraction"]]
        clean = [r for r in mine if not r["spoiler"]]
        assert row["spoilers"] == len(mine) - len(clean)
        assert row["without_spoilers"]["n"] == len(clean)
        assert row["without_spoilers"]["correct"] == sum(r["correct"] for r in clean)


def test_a_sweep_item_is_reused_when_only_storage_or_retries_change() -> None:
    """Where results are stored (store, TTL) and how failures are retried do not change a
    result: a rerun with other values reuses finished items; a setting that changes the
    result (the budget) reruns them."""
    from relaygraph.config import RelayConfig
    from relaygraph.eval.datasets import Problem
    from relaygraph.eval.sweep import PolicyPlan, _jobs

    problem = Problem(id="0", question=tiny.QUESTION, answer="7")

    def spec(**update) -> str:
        config = RelayConfig().model_copy(update=update)
        [job] = _jobs(PolicyPlan(name="p", type="call-token", config=config), [problem],
                      None, None, "expert")  # type: ignore[arg-type]  # not run here
        return job.fingerprint

    from relaygraph.graphs.retry import RetryPolicy
    from relaygraph.trajectory.settings import StoreConfig

    base = spec()
    assert spec(store=StoreConfig(ttl=3600, namespace="elsewhere")) == base
    assert spec(retry=RetryPolicy(max_attempts=7)) == base
    assert spec(max_tokens=99) != base


def test_a_retrained_catalog_adapter_reruns_the_items_that_use_it() -> None:
    """A catalog adapter entry keeps its name across releases: its sha256 is part of what
    an item is a function of, for the policies that run it (and only those)."""
    from relaygraph.agents.catalog import RELAY_CONTROLLER, weights_version
    from relaygraph.config import RelayConfig
    from relaygraph.eval.datasets import Problem
    from relaygraph.eval.runner import fingerprint
    from relaygraph.eval.sweep import PolicyPlan, _jobs

    problem = Problem(id="0", question=tiny.QUESTION, answer="7")
    config = RelayConfig.model_validate({"agents": {
        "controller": {"model": "qwen2.5-coder-0.5b"}, "expert": {"model": "qwen2.5-coder-1.5b"},
        "relay": {"model": RELAY_CONTROLLER}}, "policy": {"type": "call-token", "controller": "relay"}})
    solo = config.model_copy(update={"policy": RelayConfig.model_validate(
        {"policy": {"type": "solo", "agent": "controller"}}).policy})

    def job(config: RelayConfig):
        [one] = _jobs(PolicyPlan(name="p", type=config.policy.type, config=config), [problem],
                      None, None, "expert")  # type: ignore[arg-type]  # not run here
        return one.fingerprint

    version = weights_version(RELAY_CONTROLLER)
    assert version and len(version) == 64 and weights_version("qwen2.5-coder-0.5b") is None
    spec = config.model_dump(mode="json", exclude={"redis", "store", "retry"})
    assert job(config) == fingerprint({**spec, "weights": {"relay": version}}, problem.digest)
    solo_spec = solo.model_dump(mode="json", exclude={"redis", "store", "retry"})
    assert job(solo) == fingerprint(solo_spec, problem.digest)  # does not run the adapter
