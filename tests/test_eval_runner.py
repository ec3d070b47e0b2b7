"""Experiments are resumable and can be split: finished items are never recomputed after an
interruption, an item interrupted mid-run resumes its stored trajectory, concurrent runs
give the same results, and workers sharing one Redis each run different items."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest

from relaygraph import Agent, Relay
from relaygraph.agents.wrapping import CancellableBackend, CancelScope
from relaygraph.errors import Cancelled, ConfigError
from relaygraph.eval.runner import (
    FileResults,
    Job,
    RedisResults,
    fingerprint,
    run_jobs,
    trajectory_id,
)
from relaygraph.policies import FixedIntervalPolicy, SoloPolicy
from tests import tiny_models as tiny

QUESTIONS = [tiny.QUESTION, tiny.NOCALL_QUESTION, tiny.MALFORMED_QUESTION, "What is 3 + 4?"]


def solo_jobs(relay: Relay, runs: list[str], version: str = "v1") -> list[Job]:
    def job(i: int, question: str) -> Job:
        def run(tid: str) -> dict:
            runs.append(tid)
            result = relay.run(question, trajectory_id=tid)
            return {"answer": result.answer, "tokens": result.tokens_by_agent}

        return Job(f"solo/{i}", "solo", fingerprint(version, question), run)

    return [job(i, q) for i, q in enumerate(QUESTIONS)]


@pytest.fixture
def relay(backends, redis_store) -> Relay:
    return Relay([Agent("controller", backends[0], tiny.SYSTEM_PROMPT)], SoloPolicy(agent="controller"),
                 redis_store, max_tokens=24)


def test_an_interrupted_experiment_does_not_recompute_finished_items(relay, tmp_path: Path) -> None:
    runs: list[str] = []

    def interrupt(record: dict) -> None:
        raise KeyboardInterrupt

    results = FileResults(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_jobs(solo_jobs(relay, runs), results, on_saved=interrupt)
    results.close()
    (finished,) = FileResults(tmp_path).load().values()  # (an item running then is not kept)
    assert runs[0] == finished["trajectory_id"]

    runs.clear()
    again = FileResults(tmp_path)
    outcome = run_jobs(solo_jobs(relay, runs), again)
    again.close()
    assert sorted(outcome.computed) == sorted({"solo/0", "solo/1", "solo/2", "solo/3"} - {finished["key"]})
    assert finished["trajectory_id"] not in runs and len(runs) == 3
    assert outcome.records[finished["key"]] == finished  # kept as it was, not rerun

    # a changed setting (fingerprint) recomputes; a torn last line is just run again
    with (tmp_path / "items.jsonl").open("a") as f:
        f.write('{"key": "solo/0", "fingerp')
    runs.clear()
    third = FileResults(tmp_path)
    assert len(run_jobs(solo_jobs(relay, runs, version="v2"), third).computed) == 4
    third.close()


def test_one_process_per_results_folder(tmp_path: Path) -> None:
    first = FileResults(tmp_path)
    with pytest.raises(ConfigError, match="another process is writing results"):
        FileResults(tmp_path)
    first.close()
    FileResults(tmp_path).close()


def test_an_item_interrupted_mid_run_resumes_its_trajectory(backends, redis_store, tmp_path: Path) -> None:
    flag = CancelScope()
    agents = [Agent("controller", CancellableBackend(backends[0], lambda: flag), tiny.SYSTEM_PROMPT),
              Agent("expert", CancellableBackend(backends[1], lambda: flag), tiny.SYSTEM_PROMPT)]
    relay = Relay(agents, FixedIntervalPolicy(interval=4), redis_store, max_tokens=24)
    tokens: list[str] = []

    def trip(event: dict) -> None:  # Ctrl-C during the second turn, on the first attempt
        tokens.append(event.get("text", ""))
        if len(tokens) == 6 and len(trips) == 0:
            trips.append(1)
            flag.cancel()

    trips: list[int] = []
    job = Job("fixed/0", "fixed", "f1",
              lambda tid: {"answer": relay.run(tiny.QUESTION, trajectory_id=tid, on_event=trip).answer})
    results = FileResults(tmp_path)
    outcome = run_jobs([job], results)
    assert outcome.records == {} and outcome.errors == {}  # interrupted: not saved, not failed
    tid = trajectory_id(results.run_id, job)
    partial = redis_store.read(tid)
    assert 0 < len(partial) and all(s.meta.get("step") for s in partial[-1:])

    flag = CancelScope()  # the backends read the current scope
    outcome = run_jobs([job], results)
    results.close()
    assert outcome.records["fixed/0"]["trajectory_id"] == tid
    resumed = redis_store.read(tid)
    assert resumed[:len(partial)] == partial  # the finished steps were kept, not rewritten
    reference = Relay([Agent("controller", backends[0], tiny.SYSTEM_PROMPT),
                       Agent("expert", backends[1], tiny.SYSTEM_PROMPT)],
                      FixedIntervalPolicy(interval=4), redis_store, max_tokens=24).run(tiny.QUESTION)
    assert [s.text for s in resumed] == [s.text for s in reference.segments]


def test_interruptible_backends_stop_at_the_next_token(backends) -> None:
    from relaygraph.agents.backend import Prompt, StopRule

    flag = CancelScope()
    backend = CancellableBackend(backends[0], lambda: flag)
    assert backend.generate(Prompt(tiny.QUESTION, tiny.SYSTEM_PROMPT), StopRule(max_tokens=3)).token_ids
    flag.cancel()
    with pytest.raises(Cancelled):
        backend.generate(Prompt(tiny.QUESTION, tiny.SYSTEM_PROMPT), StopRule(max_tokens=3))


def test_concurrent_items_give_the_same_results(relay, tmp_path: Path) -> None:
    runs: list[str] = []
    one, many = FileResults(tmp_path / "one"), FileResults(tmp_path / "many")
    serial = run_jobs(solo_jobs(relay, runs), one, concurrency=1).records
    parallel = run_jobs(solo_jobs(relay, runs), many, concurrency=4).records
    one.close(), many.close()
    strip = lambda r: {k: r[k] for k in ("answer", "tokens", "key")}  # noqa: E731
    assert {k: strip(v) for k, v in serial.items()} == {k: strip(v) for k, v in parallel.items()}
    assert len(parallel) == len(QUESTIONS)


def test_a_job_finished_while_another_worker_claims_it_is_not_run_again(redis_store) -> None:
    """The interleaving that once ran an item twice: worker A finishes (saves its result,
    drops its claim) right after worker B's first look at Redis. B must not win the job,
    whichever it looks at first (result, then claim: it did; claim, then result: it must not)."""
    name = f"t{uuid.uuid4().hex[:10]}"
    a, b = RedisResults(redis_store.client, name), RedisResults(redis_store.client, name)
    assert a.claim("solo/0", "f1")

    class Interleaved:  # B's client: A finishes right after B's first command
        def __init__(self, client) -> None:
            self.client, self.first = client, True

        def _then_a_finishes(self, reply):
            if self.first:
                self.first = False
                a.save("solo/0", {"fingerprint": "f1", "answer": "7"})
            return reply

        def hget(self, *args):
            return self._then_a_finishes(self.client.hget(*args))

        def set(self, *args, **kwargs):
            return self._then_a_finishes(self.client.set(*args, **kwargs))

        def __getattr__(self, attr):
            return getattr(self.client, attr)

    b.client = Interleaved(redis_store.client)
    if b.claim("solo/0", "f1"):  # B read before A's save: it must not hold a claim now
        pytest.fail("a job another worker finished meanwhile was claimed again")
    b.client = redis_store.client
    assert not b.claim("solo/0", "f1")  # finished: nobody claims it any more
    assert a.load()["solo/0"]["answer"] == "7"


@pytest.mark.parametrize("shared_on", ["redis_store", "cluster_store"])
def test_workers_sharing_redis_split_the_items(relay, redis_store, shared_on, request) -> None:
    """On one server and on a 3-node cluster (claims and results share one hash tag)."""
    client = request.getfixturevalue(shared_on).client
    name = f"t{uuid.uuid4().hex[:10]}"
    runs: list[str] = []
    outcomes: dict[str, object] = {}
    workers = [RedisResults(client, name), RedisResults(client, name)]

    def work(i: int) -> None:
        outcomes[i] = run_jobs(solo_jobs(relay, runs), workers[i], concurrency=2, poll=0.05)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a, b = outcomes[0], outcomes[1]
    assert not set(a.computed) & set(b.computed)              # nothing ran twice
    assert set(a.computed) | set(b.computed) == {f"solo/{i}" for i in range(len(QUESTIONS))}
    assert len(runs) == len(QUESTIONS)
    assert a.records == b.records and len(a.records) == len(QUESTIONS)  # both export everything
    for key in a.computed:
        assert a.records[key]["worker"] == workers[0].worker
    with pytest.raises(ConfigError, match="--shared name"):
        RedisResults(redis_store.client, "bad name!")


def test_progress_in_a_log_is_a_line_per_finished_item(relay, tmp_path: Path) -> None:
    """Not on a terminal (a log file, CI) the progress is plain lines, not a live bar that
    stays silent until the end."""
    import io

    from rich.console import Console

    from relaygraph.eval.runner import Progress

    log = io.StringIO()
    results = FileResults(tmp_path)
    jobs = solo_jobs(relay, [])
    run_jobs(jobs[:1], results)  # one item done before: reused
    run_jobs(jobs, results, progress=Progress(Console(file=log, width=200)))
    lines = log.getvalue().splitlines()
    assert lines[0] == f"{len(jobs) - 1} item(s) to run in 1 group(s), 1 reused"
    assert [line.split(" (")[0] for line in lines[1:]] == [
        f"solo: {i}/{len(jobs)}" for i in range(2, len(jobs) + 1)]
