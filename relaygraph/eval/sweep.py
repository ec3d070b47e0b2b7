"""``relaygraph eval sweep``: policies x problems -> accuracy, call ratio, tokens, time.

A sweep runs every policy of a :class:`SweepConfig` over a dataset (greedy decoding, as
RelayLLM's pass@1 evaluation, section 4.2) and summarises each policy (:mod:`.metrics`):
accuracy, unparseable answers, call ratio (large-model tokens / all generated tokens),
tokens and seconds per problem, and per policy family the accuracy-vs-call-ratio curve
with AUC, APGR and the call ratio needed for 50% / 80% of the small-to-large gap.

The small and large models alone (``solo-small``, ``solo-large``) always run: they anchor
the curve. RelayLLM's query-level baselines are **derived from them, not run**: under
greedy decoding a query routed to one model is exactly that model's solo run, so the
random router (large with probability p, decided per question exactly as
:class:`~relaygraph.policies.RandomRouter` does) and the perfect router (large only
where the small model fails alone) are assembled from the solo items.

```toml
dataset = "/work/shared/data/gsm8k_test.jsonl"
limit = 50
max_tokens = 256
random_router_p = [0.1, 0.25, 0.5, 0.75, 0.9]

[agents.controller]          # the small model ("small" names it)
model = "qwen2.5-coder-0.5b"
[agents.expert]              # the large model ("large")
model = "qwen2.5-coder-1.5b"

[[policies]]
type = "confidence"
fallback_tokens = 16
vary = { threshold = [-5.0, -3.0, -1.5] }   # one policy per value

[[policies]]
name = "fixed-32"
type = "fixed-interval"
interval = 32
```
"""

from __future__ import annotations

import copy
import functools
import itertools
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, field_validator, model_validator

from relaygraph.agents.catalog import weights_version
from relaygraph.agents.registry import AgentConfig, parse_agent_configs
from relaygraph.agents.wrapping import CancelScope
from relaygraph.config import RelayConfig, default_agents, read_config_file, validate
from relaygraph.errors import ConfigError
from relaygraph.eval import metrics
from relaygraph.eval.datasets import Problem, load_problems
from relaygraph.eval.jobs import grader
from relaygraph.eval.models import ModelPool
from relaygraph.eval.runner import (
    Job,
    Progress,
    Record,
    Results,
    fingerprint,
    run_jobs,
    stored_result,
)
from relaygraph.policies import RandomRouter
from relaygraph.trajectory.models import active, reasoning_text
from relaygraph.trajectory.store import TrajectoryStore

DERIVED_NOTE = ("random-router and perfect-router are derived from the solo runs, not run: "
                "under greedy decoding a query routed to one model is exactly that model's "
                "solo run")
DEFAULT_POLICIES: list[dict[str, Any]] = [
    {"type": "confidence", "fallback_tokens": 16, "warmup": 4, "min_gap": 8,
     "vary": {"threshold": [-1.5, -1.0, -0.5]}},  # greedy tokens are rarely below -1.5
    {"type": "fixed-interval", "interval": 32},
    {"type": "prompted-call"},
    {"type": "call-token"},
    {"type": "supervisor", "supervisor": "score:expert"},
]
"""The sweep's policies when none are given (besides the solo runs and derived routers)."""


class SweepConfig(BaseModel):
    """What a sweep runs; loadable from TOML/YAML/JSON (:meth:`load`)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str
    """A JSONL/JSON/CSV file, ``reasoning-gym:TASK`` or ``hf:NAME[:CONFIG][@SPLIT]``."""
    limit: int | None = Field(None, ge=1)
    seed: int | None = None
    """Subset seed (None: the first ``limit`` problems)."""
    question_field: str | None = None
    answer_field: str | None = None
    max_tokens: int = Field(256, ge=1)
    agents: dict[str, SerializeAsAny[AgentConfig]] = Field(default_factory=default_agents)
    small: str = "controller"
    large: str = "expert"
    policies: list[dict[str, Any]] = Field(default_factory=lambda: copy.deepcopy(DEFAULT_POLICIES))
    """Policy configs (as in a relay config's ``[policy]``) plus optional ``name`` and
    ``vary`` (field -> list of values: one policy per combination)."""
    random_router_p: list[float] = [0.1, 0.25, 0.5, 0.75, 0.9]
    router_seed: int = 0
    perfect_router: bool = True
    samples: int = Field(1, ge=1)
    """k: runs per problem. 1 is greedy pass@1 (RelayLLM's main tables); k > 1 samples every
    agent at ``temperature`` with seeds 0..k-1 and reports avg@k (the mean accuracy over the
    k runs, as the paper does for AIME with k = 32)."""
    temperature: float = Field(0.6, gt=0, allow_inf_nan=False)
    """Sampling temperature of every agent when ``samples > 1``."""

    @field_validator("agents", mode="before")
    @classmethod
    def _agent_configs(cls, agents: Any) -> Any:
        return parse_agent_configs(agents)

    @model_validator(mode="after")
    def _pair(self) -> SweepConfig:
        for role in ("small", "large"):
            if getattr(self, role) not in self.agents:
                raise ValueError(f"{role} agent {getattr(self, role)!r} is not in [agents] "
                                 f"(have: {sorted(self.agents)})")
        if self.small == self.large:
            raise ValueError("small and large must be different agents")
        if any(not 0 <= p <= 1 for p in self.random_router_p):
            raise ValueError("random_router_p values must be in [0, 1]")
        return self

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> SweepConfig:
        data = read_config_file(path)
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a table of sweep settings")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return validate(cls, data, str(path))


class PolicyPlan(BaseModel):
    """One policy of a sweep: its display name and the relay config it runs."""

    name: str
    type: str
    config: RelayConfig


def plan(sweep: SweepConfig) -> list[PolicyPlan]:
    """The sweep's policies: solo small and large first, then the configured ones (random
    and perfect routers are derived, so they only add their p values)."""
    solo = [_plan(sweep, "solo-small", {"type": "solo", "agent": sweep.small}),
            _plan(sweep, "solo-large", {"type": "solo", "agent": sweep.large})]
    entries: list[tuple[str | None, dict[str, Any]]] = []
    for i, entry in enumerate(sweep.policies):
        if not isinstance(entry, dict) or "type" not in entry:
            raise ConfigError(f"policies.{i}: each policy needs a type")
        entry = dict(entry)
        name, vary = entry.pop("name", None), entry.pop("vary", {}) or {}
        if not isinstance(vary, dict) or not all(isinstance(v, list) and v for v in vary.values()):
            raise ConfigError(f"policies.{i}.vary: expected field = [values, ...]")
        for values in itertools.product(*vary.values()):
            combo = dict(zip(vary, values, strict=True))
            label = f"{name}({_args(combo)})" if name and combo else name
            entries.append((label, {**entry, **combo}))
    # solo runs always run; the routers are derived from them (see derive_routers)
    plans = [(label, fields) for label, fields in entries
             if fields["type"] not in ("solo", "random-router", "perfect-router")]
    named = _names(plans)
    out = solo + [_plan(sweep, name, fields) for name, fields in named]
    if len({p.name for p in out}) != len(out):
        raise ConfigError("two policies have the same name; give them distinct names")
    return out


def _plan(sweep: SweepConfig, name: str, fields: dict[str, Any]) -> PolicyPlan:
    # unset agent fields stay unset, so a policy's own defaults (e.g. the prompted call-token
    # policy's system prompt) apply; with no [agents] the policy's default models apply too
    # (the call-token controller is the trained one, as `relaygraph run` uses)
    data: dict[str, Any] = {"policy": fields, "max_tokens": sweep.max_tokens}
    if "agents" in sweep.model_fields_set:
        data["agents"] = {n: a.model_dump(exclude_unset=True) for n, a in sweep.agents.items()}
    config = validate(RelayConfig, data, f"policy {name}")
    agents = {n: config.agents[n] for n in config.needed_agents()}
    return PolicyPlan(name=name, type=fields["type"],
                      config=config.model_copy(update={"agents": agents}))


def _args(fields: dict[str, Any]) -> str:
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())


def _names(entries: list[tuple[str | None, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """Unnamed policies are named by type, plus the fields that tell apart those of a type."""
    out = []
    for label, fields in entries:
        if label is None:
            same = [f for lab, f in entries if lab is None and f["type"] == fields["type"]]
            differ = {k: v for k, v in fields.items()
                      if k != "type" and any(f.get(k) != v for f in same)}
            label = f"{fields['type']}({_args(differ)})" if differ else fields["type"]
        out.append((label, fields))
    return out


def run_sweep(sweep: SweepConfig, store: TrajectoryStore, results: Results,
              concurrency: int = 1, pool: ModelPool | None = None,
              progress: Progress | None = None, flag: CancelScope | None = None) -> dict[str, Any]:
    """Run the sweep (finished items are reused) and return the full results object."""
    started = time.perf_counter()
    problems = with_samples(load_problems(sweep.dataset, sweep.limit, sweep.seed,
                                          sweep.question_field, sweep.answer_field), sweep.samples)
    plans = plan(sweep)
    flag = flag or CancelScope()
    pool = pool or ModelPool(flag)
    # Problem-major: every policy's item for problem 1, then problem 2, ... so a sweep that
    # is stopped early leaves the same problems done for every policy (rerun with a smaller
    # ``limit`` to report them).
    per_plan = [_jobs(p, problems, pool, store, sweep.large, sweep.temperature) for p in plans]
    rows = list(zip(*per_plan, strict=True))
    try:
        outcome = run_jobs([job for row in rows for job in row], results, concurrency,
                           flag=flag, progress=progress)
    except KeyboardInterrupt:
        raise SweepInterrupted(_complete_runs(rows, results) // sweep.samples) from None
    items: dict[str, dict[str, Record]] = {p.name: {} for p in plans}
    for record in outcome.records.values():
        items[record["policy"]][record["problem"]] = record
    derived = derive_routers(sweep, problems, items["solo-small"], items["solo-large"])
    result = assemble(sweep, problems, plans, items, derived, outcome.errors)
    result.update(concurrency=concurrency, wall_seconds=time.perf_counter() - started,
                  computed=len(outcome.computed))
    return result


class SweepInterrupted(KeyboardInterrupt):
    """A sweep stopped by Ctrl-C; ``complete``: how many of its first problems are done for
    every policy (a sweep with that ``limit`` reports them without running anything)."""

    def __init__(self, complete: int) -> None:
        super().__init__(complete)
        self.complete = complete


def _complete_runs(rows: list[tuple[Job, ...]], results: Results) -> int:
    """Leading rows (one run of one problem: a job per policy) all of whose items are
    stored."""
    stored = results.load()
    done = 0
    for row in rows:
        if any(stored_result(stored, job) is None for job in row):
            break
        done += 1
    return done


def with_samples(problems: list[Problem], samples: int) -> list[Problem]:
    """The runs of a sweep: each problem once, or ``samples`` times as ``ID#0`` .. ``ID#k-1``
    (``meta["sample"]`` is the sampling seed); accuracy over them is avg@k."""
    if samples == 1:
        return problems
    return [p.model_copy(update={"id": f"{p.id}#{i}", "meta": {**p.meta, "sample": i}})
            for p in problems for i in range(samples)]


def sampled(config: RelayConfig, sample: int | None, temperature: float) -> RelayConfig:
    """``config`` with every agent sampling at ``temperature`` with seed ``sample`` (None:
    the config as it is, greedy)."""
    if sample is None:
        return config
    agents = {n: a.model_copy(update={"temperature": temperature, "seed": sample})
              for n, a in config.agents.items()}
    return config.model_copy(update={"agents": agents})


def _jobs(plan_: PolicyPlan, problems: list[Problem], pool: ModelPool,
          store: TrajectoryStore, large: str, temperature: float = 0.6) -> list[Job]:
    relays: dict[int | None, Any] = {}
    lock = threading.Lock()

    def relay(sample: int | None) -> Any:  # built on first use: a finished sweep loads no model
        with lock:
            if sample not in relays:
                relays[sample] = pool.relay(sampled(plan_.config, sample, temperature), store)
            return relays[sample]

    specs: dict[int | None, dict[str, Any]] = {}

    def spec_of(sample: int | None) -> dict[str, Any]:
        """What a result is a function of: not where it is stored nor how failures retry;
        a catalog adapter's version (retrained under the same name) when one is used."""
        if sample not in specs:
            config = sampled(plan_.config, sample, temperature)
            spec = config.model_dump(mode="json", exclude={"store", "retry"})
            used = set(config.policy.agent_names())
            versions = {n: v for n, a in config.agents.items()
                        if n in used and (v := weights_version(str(getattr(a, "model", ""))))}
            specs[sample] = {**spec, "weights": versions} if versions else spec
        return specs[sample]

    jobs = []
    for problem in problems:
        sample = problem.meta.get("sample")
        spec = spec_of(sample)

        def run(tid: str, problem: Problem = problem, sample: int | None = sample) -> Record:
            resumed, runs = store.exists(tid), relay(sample)
            try:
                result = runs.run(problem.question, trajectory_id=tid)
            finally:  # one run per item: its caches would only crowd out live runs' caches
                runs.forget(tid)
            return {"policy": plan_.name, "problem": problem.id, "answer": result.answer,
                    "_text": reasoning_text(active(store.read(tid))),
                    "tokens_by_agent": result.tokens_by_agent,
                    "call_ratio": metrics.item_call_ratio(result.tokens_by_agent, large),
                    "cost": result.cost,
                    "handoffs": result.handoffs, "finish_reason": result.finish_reason,
                    "counters": result.counters, "seconds": result.seconds,
                    "trajectory_id": result.trajectory_id, "resumed": resumed}

        jobs.append(Job(f"{plan_.name}/{problem.id}", plan_.name,
                        fingerprint(spec, problem.digest), run, grader(problem)))
    return jobs


def _routed_large(router: RandomRouter, problem: Problem) -> bool:
    return router.to_large(problem.question)


def _small_failed(small: dict[str, Record], problem: Problem) -> bool:
    return not small[problem.id]["correct"]


def derive_routers(sweep: SweepConfig, problems: list[Problem], small: dict[str, Record],
                   large: dict[str, Record]) -> dict[str, dict[str, Record]]:
    """Random routers (each p) and the perfect router, assembled from the solo items."""
    both = [p for p in problems if p.id in small and p.id in large]
    routers: dict[str, Callable[[Problem], bool]] = {}
    listed = [e for e in sweep.policies if isinstance(e, dict)]
    p_values = [*sweep.random_router_p,
                *(float(e.get("p", 0.5)) for e in listed if e.get("type") == "random-router")]
    for p_value in dict.fromkeys(p_values):
        router = RandomRouter(small=sweep.small, large=sweep.large, p=p_value,
                              seed=sweep.router_seed)
        routers[router.name] = functools.partial(_routed_large, router)
    if sweep.perfect_router or any(e.get("type") == "perfect-router" for e in listed):
        routers["perfect-router"] = functools.partial(_small_failed, small)
    derived: dict[str, dict[str, Record]] = {}
    for name, to_large in routers.items():
        rows = {}
        for prob in both:
            pick = to_large(prob)
            source = large[prob.id] if pick else small[prob.id]
            rows[prob.id] = {**source, "policy": name, "key": f"{name}/{prob.id}", "group": name,
                             "routed_to": "large" if pick else "small",
                             "derived_from": "solo-large" if pick else "solo-small"}
        derived[name] = rows
    return derived


def assemble(sweep: SweepConfig, problems: list[Problem], plans: list[PolicyPlan],
             items: dict[str, dict[str, Record]], derived: dict[str, dict[str, Record]],
             errors: dict[str, str]) -> dict[str, Any]:
    """The results object: per-policy summaries, family curves, items, notes."""
    policies: list[dict[str, Any]] = []
    for plan_ in plans:
        policies.append({"name": plan_.name, "type": plan_.type, "derived_from": None,
                         **_summary(items[plan_.name], problems, sweep.large)})
    for name, rows in derived.items():
        kind = "perfect-router" if name == "perfect-router" else "random-router"
        policies.append({"name": name, "type": kind, "derived_from": "solo runs",
                         **_summary(rows, problems, sweep.large)})
    by_name = {p["name"]: p for p in policies}
    every = {**items, **derived}
    ids = [p.id for p in problems]
    for p in policies:
        if p["name"] != "solo-small":
            p["vs_small"] = versus(every[p["name"]], every["solo-small"], ids)
    acc_small = by_name["solo-small"]["accuracy"]
    acc_large = by_name["solo-large"]["accuracy"]
    families: dict[str, Any] = {}
    if acc_small is not None and acc_large is not None:
        small_t = by_name["solo-small"]["tokens_per_problem"] or 0.0
        large_t = by_name["solo-large"]["tokens_per_problem"] or 0.0
        for p in policies:
            p["gap_recovered"] = (metrics.gap_recovered(p["accuracy"], acc_small, acc_large)
                                  if p["accuracy"] is not None else None)
            p["random_router_same_ratio"] = (
                metrics.random_router_at(p["call_ratio"], acc_small, acc_large, small_t, large_t)
                if p["type"] != "solo" and p["n"] else None)
        for kind in dict.fromkeys(p["type"] for p in policies if p["type"] != "solo"):
            points = [(p["call_ratio"], p["accuracy"]) for p in policies
                      if p["type"] == kind and p["accuracy"] is not None]
            families[kind] = {"policies": [p["name"] for p in policies if p["type"] == kind],
                              **metrics.family_summary(points, acc_small, acc_large)}
        expected = metrics.random_router_expected(acc_small, acc_large, small_t, large_t)
        families["random-router (expected)"] = {
            "policies": [], **metrics.family_summary(expected[1:-1], acc_small, acc_large)}
    decoding = ("decoding is greedy (pass@1)" if sweep.samples == 1 else
                f"every problem is run {sweep.samples} times, sampled at temperature "
                f"{sweep.temperature:g} with seeds 0..{sweep.samples - 1}: accuracy is avg@"
                f"{sweep.samples}; routers are derived per run")
    notes = [DERIVED_NOTE,
             f"call ratio = {sweep.large} tokens / all generated tokens, pooled over problems",
             f"{decoding}; a supervisor's scoring passes are not generated tokens"]
    if acc_small is not None and acc_large is not None and acc_large <= acc_small:
        notes.append("the large model is not more accurate than the small one here: "
                     "gap-relative numbers (APGR, call ratio for 50%/80%) are n/a")
    if errors:
        notes.append(f"{len(errors)} item(s) failed and are left out (they run again "
                     "next time): " + "; ".join(f"{k}: {v}" for k, v in list(errors.items())[:3]))
    complete = all(len(items[p.name]) == len(problems) for p in plans)
    return {
        "kind": "sweep", "complete": complete,
        "config": sweep.model_dump(mode="json"),
        "dataset": {"source": sweep.dataset, "problems": len(problems),
                    "ids": [p.id for p in problems]},
        "models": {"small": sweep.agents[sweep.small].model,
                   "large": sweep.agents[sweep.large].model},
        "policies": policies, "families": families, "notes": notes, "errors": errors,
        "items": {**items, **derived},
    }


def versus(rows: dict[str, Record], baseline: dict[str, Record],
           ids: Iterable[str]) -> dict[str, int]:
    """Of the problems ``ids``, those ``rows`` got right and ``baseline`` wrong (``won``),
    and the other way round (``lost``); problems either has not run are left out."""
    both = [k for k in ids if k in rows and k in baseline]
    return {"won": sum(bool(rows[k]["correct"]) and not baseline[k]["correct"] for k in both),
            "lost": sum(not rows[k]["correct"] and bool(baseline[k]["correct"]) for k in both)}


def _summary(rows: dict[str, Record], problems: list[Problem], large: str) -> dict[str, Any]:
    records = [rows[p.id] for p in problems if p.id in rows]
    return metrics.summarize(records, large)
