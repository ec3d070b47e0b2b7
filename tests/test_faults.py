"""Fault injection: a crashed process, a restarted and a lost Redis server — nothing lost,
nothing doubled, and resumed runs identical to uninterrupted greedy runs."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from relaygraph import Agent, CallTokenPolicy, Relay
from relaygraph.agents.transformers_backend import TransformersBackend
from relaygraph.errors import StoreUnavailableError
from relaygraph.graphs.retry import RetryPolicy
from relaygraph.policies import FixedIntervalPolicy
from relaygraph.trajectory import RedisStore, Segment
from tests import tiny_models as tiny
from tests.crashing import Crash
from tests.crashing import crash_after as crash_after_appending
from tests.servers import RedisServer

FIGURES = {"interrupted": 0, "resumed": 0, "lost": 0, "doubled": 0}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> tuple[Path, Path]:
    return tiny.relay_pair()


@pytest.fixture(scope="module")
def pair(dirs) -> list[Agent]:
    return [Agent("controller", TransformersBackend(str(dirs[0]), dtype="float32"), tiny.SYSTEM_PROMPT),
            Agent("expert", TransformersBackend(str(dirs[1]), dtype="float32"), tiny.SYSTEM_PROMPT)]


POLICIES = {
    "call-token": lambda: CallTokenPolicy(),
    "fixed-interval": lambda: FixedIntervalPolicy(interval=1),
}


def crew(pair: list[Agent], policy: str) -> list[Agent]:
    """For fixed-interval both turns use the expert's model, so the relay writes its whole
    trained answer (one token a turn: ~20 steps) instead of stopping early."""
    if policy == "call-token":
        return pair
    return [Agent("controller", pair[1].backend, tiny.SYSTEM_PROMPT), pair[1]]


def same(a: list[Segment], b: list[Segment]) -> bool:
    """Same trajectory: authors, kinds, text and token ids, position by position."""
    return [(s.author, s.kind, s.text, s.token_ids) for s in a] == [
        (s.author, s.kind, s.text, s.token_ids) for s in b]


def count(result: list[Segment], reference: list[Segment]) -> None:
    FIGURES["lost"] += max(0, len(reference) - len(result))
    FIGURES["doubled"] += max(0, len(result) - len(reference))


CRASHING_RUN = textwrap.dedent("""
    import os, sys
    from relaygraph import Agent, Relay, CallTokenPolicy
    from relaygraph.agents.transformers_backend import TransformersBackend
    from relaygraph.policies import FixedIntervalPolicy
    from relaygraph.trajectory import RedisStore
    from tests import tiny_models as tiny

    url, controller, expert, policy, tid, crash_after, in_flight = sys.argv[1:8]
    store = RedisStore.from_url(url)
    appended = 0
    real_append, real_send = store.append, store.send_append

    def append(*args):
        global appended
        real_append(*args)
        appended += 1
        if appended == int(crash_after):
            os._exit(9)  # the process dies right after this append, mid-run

    def send_append(*args):  # the relay's pipelined appends
        global appended
        confirm = real_send(*args)
        appended += 1
        if appended == int(crash_after):
            if in_flight == "0":
                confirm()  # dies right after this append landed
            os._exit(9)  # (or while its reply is still on the way)
        return confirm

    store.append = append
    store.send_append = send_append
    expert_backend = TransformersBackend(expert, dtype="float32")
    first = TransformersBackend(controller, dtype="float32") if policy == "call-token" else expert_backend
    agents = [Agent("controller", first, tiny.SYSTEM_PROMPT),
              Agent("expert", expert_backend, tiny.SYSTEM_PROMPT)]
    policy = CallTokenPolicy() if policy == "call-token" else FixedIntervalPolicy(interval=1)
    Relay(agents, policy, store, max_tokens=40).run(tiny.QUESTION, trajectory_id=tid)
""")


@pytest.mark.parametrize("policy, crash_after, in_flight", [
    ("call-token", 1, False),      # after the controller's text, before its call segment: mid-step
    ("call-token", 2, False),      # after a whole step
    ("call-token", 3, False),      # after the expert's turn
    ("fixed-interval", 5, False),
    ("fixed-interval", 11, False),
    ("fixed-interval", 7, True),   # a pipelined append sent, its reply not yet read
])
def test_process_crash_then_resume_is_identical(policy, crash_after, in_flight, pair, dirs,
                                                redis_server) -> None:
    store = RedisStore.from_url(redis_server.url)
    reference = Relay(crew(pair, policy), POLICIES[policy](), store, max_tokens=40).run(tiny.QUESTION)
    ref_segments = store.read(reference.trajectory_id)
    assert len(ref_segments) > crash_after

    tid = f"crash-{policy}-{crash_after}-{time.time_ns()}"
    proc = subprocess.run([sys.executable, "-c", CRASHING_RUN, redis_server.url, str(dirs[0]),
                           str(dirs[1]), policy, tid, str(crash_after), str(int(in_flight))],
                          capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parents[1])
    assert proc.returncode == 9, proc.stderr
    # an append in flight when the process died may have landed or not
    assert store.length(tid) in ((crash_after - 1, crash_after) if in_flight else (crash_after,))
    assert store.status(tid) == "running"
    FIGURES["interrupted"] += 1

    resumed = Relay(crew(pair, policy), POLICIES[policy](), store, max_tokens=40).resume(tid)
    FIGURES["resumed"] += 1
    segments = store.read(tid)
    count(segments, ref_segments)
    assert same(segments, ref_segments)
    assert resumed.answer == reference.answer
    assert resumed.tokens_by_agent == reference.tokens_by_agent
    assert resumed.counters == reference.counters and resumed.handoffs == reference.handoffs
    assert store.status(tid) == "finished"


def test_redis_restart_mid_run_is_ridden_out(pair, tmp_path) -> None:
    """The server is killed after the 4th handoff and back 0.5 s later: the run goes on."""
    server = RedisServer(tmp_path, persistent=True).start()
    try:
        store = RedisStore.from_url(server.url)
        relay = Relay(crew(pair, "fixed-interval"), FixedIntervalPolicy(interval=1), store,
                      max_tokens=40)
        reference = store.read(relay.run(tiny.QUESTION).trajectory_id)
        handoffs = []

        def restart() -> None:
            time.sleep(0.5)
            server.start()

        restarter = threading.Thread(target=restart)

        def on_event(event: dict) -> None:
            if event["type"] == "handoff":
                handoffs.append(event)
                if len(handoffs) == 4:
                    server.stop()  # SIGKILL, mid-run
                    restarter.start()

        result = relay.run(tiny.QUESTION, on_event=on_event)
        restarter.join()
        assert len(handoffs) > 4
        FIGURES["interrupted"] += 1
        segments = store.read(result.trajectory_id)
        count(segments, reference)
        assert same(segments, reference)
        assert store.status(result.trajectory_id) == "finished"
    finally:
        server.stop()


def test_redis_down_too_long_fails_cleanly_then_resumes(pair, tmp_path) -> None:
    server = RedisServer(tmp_path, persistent=True).start()
    try:
        store = RedisStore.from_url(server.url, retries=1)
        relay = Relay(crew(pair, "fixed-interval"), FixedIntervalPolicy(interval=1), store,
                      max_tokens=40)
        reference = store.read(relay.run(tiny.QUESTION).trajectory_id)
        tid = f"down-{time.time_ns()}"
        killed = {"done": False}

        def on_event(event: dict) -> None:
            if event["type"] == "handoff" and not killed["done"]:
                killed["done"] = True
                server.stop()

        with pytest.raises(StoreUnavailableError, match=f"relaygraph resume {tid}"):
            relay.run(tiny.QUESTION, trajectory_id=tid, on_event=on_event)
        FIGURES["interrupted"] += 1
        server.start()
        resumed = relay.resume(tid)
        FIGURES["resumed"] += 1
        segments = store.read(tid)
        count(segments, reference)
        assert same(segments, reference)
        assert resumed.finish_reason and store.status(tid) == "finished"
    finally:
        server.stop()


def test_resume_of_a_finished_run_changes_nothing(pair, redis_store) -> None:
    relay = Relay(pair, CallTokenPolicy(), redis_store, max_tokens=40)
    first = relay.run(tiny.QUESTION)
    again = relay.resume(first.trajectory_id)
    assert same(redis_store.read(first.trajectory_id), redis_store.read(again.trajectory_id))
    assert again.answer == first.answer == "7"
    assert again.tokens_by_agent == first.tokens_by_agent


def test_figures_report() -> None:
    """Runs last in this module: prints the fault-injection figures for the closing note."""
    print(f"\nfault injection: {FIGURES}")
    assert FIGURES["lost"] == 0 and FIGURES["doubled"] == 0


def test_cli_resume_rebuilds_the_relay_from_the_stored_config_once_confirmed(dirs, redis_server) -> None:
    from relaygraph.config import RelayConfig
    from tests.test_cli import cli

    store = RedisStore.from_url(redis_server.url)
    cfg = RelayConfig.from_options(str(dirs[0]), str(dirs[1]), "call-token", max_tokens=40,
                                   dtype="float32")
    reference = store.read(Relay.from_config(cfg, store).run(tiny.QUESTION).trajectory_id)
    crashing = crash_after_appending(RedisStore.from_url(redis_server.url), 1)
    tid = f"cli-resume-{time.time_ns()}"
    with pytest.raises(Crash):
        Relay.from_config(cfg, crashing).run(tiny.QUESTION, trajectory_id=tid)
    assert store.length(tid) == 2
    proc = cli("resume", tid, "--redis", redis_server.url, "--trust-stored", "--json")  # local model paths: confirmed
    assert proc.returncode == 0, proc.stderr
    assert same(store.read(tid), reference)
    assert '"answer": "7"' in proc.stdout
    missing = cli("resume", "no-such-run", "--redis", redis_server.url)
    assert missing.returncode == 2 and "no trajectory" in missing.stderr


class FaultInjector:
    """Wraps a real backend and injects faults into its first calls (raises, or returns an
    empty completion) — fault injection around the real model, not a stand-in for it."""

    def __init__(self, backend: TransformersBackend, failures: int, empty: bool = False) -> None:
        self.backend, self.failures, self.empty, self.calls = backend, failures, empty, 0
        self.model_id, self.tokenizer_id = backend.model_id, backend.tokenizer_id

    def decode(self, ids):
        return self.backend.decode(ids)

    def generate(self, prompt, rule, sampling=None, on_text=None, cache_key=None):
        self.calls += 1
        if self.calls <= self.failures:
            if self.empty:
                from relaygraph.agents.backend import Generation

                return Generation(text="", token_ids=[], logprobs=[], finish_reason="budget")
            raise ConnectionError("inference server went away")
        return self.backend.generate(prompt, rule, sampling, on_text=on_text, cache_key=cache_key)


QUICK = RetryPolicy(max_attempts=3, initial_interval=0.01)  # three tries, short back-off


@pytest.mark.parametrize("empty", [False, True])
def test_a_flaky_backend_is_retried(empty, pair, redis_store) -> None:
    reference = redis_store.read(Relay(pair, CallTokenPolicy(), redis_store).run(tiny.QUESTION).trajectory_id)
    flaky = [pair[0], Agent("expert", FaultInjector(pair[1].backend, failures=2, empty=empty),
                            tiny.SYSTEM_PROMPT)]
    events: list[dict] = []
    result = Relay(flaky, CallTokenPolicy(), redis_store, retry=QUICK).run(tiny.QUESTION,
                                                                          on_event=events.append)
    assert same(redis_store.read(result.trajectory_id), reference)
    retries = [e for e in events if e["type"] == "retry"]
    assert len(retries) == 2 and retries[0]["agent"] == "expert"
    assert ("empty completion" if empty else "went away") in retries[0]["error"]


def test_a_dead_backend_fails_cleanly_keeps_the_trajectory_and_resumes(pair, redis_store) -> None:
    from relaygraph.errors import BackendError

    reference = redis_store.read(Relay(pair, CallTokenPolicy(), redis_store).run(tiny.QUESTION).trajectory_id)
    dead = [pair[0], Agent("expert", FaultInjector(pair[1].backend, failures=99), tiny.SYSTEM_PROMPT)]
    tid = f"dead-{time.time_ns()}"
    with pytest.raises(BackendError, match=f"failed 3 times.*went away.*relaygraph resume {tid}"):
        Relay(dead, CallTokenPolicy(), redis_store, retry=QUICK).run(tiny.QUESTION, trajectory_id=tid)
    trajectory = redis_store.load(tid)
    assert trajectory.status == "failed"
    assert trajectory.task.config["retry"] == QUICK.model_dump()  # recorded: resume retries the same way
    assert redis_store.client.hget(f"relaygraph:{{{tid}}}:meta", "error").decode().startswith("BackendError")
    assert [s.kind for s in trajectory.segments] == ["text", "call"]  # the controller's part is kept
    Relay(pair, CallTokenPolicy(), redis_store).resume(tid)  # the expert is back
    assert same(redis_store.read(tid), reference)


def test_a_dead_expert_falls_back_to_the_controller_where_configured(pair, redis_store) -> None:
    dead = [pair[0], Agent("expert", FaultInjector(pair[1].backend, failures=99), tiny.SYSTEM_PROMPT)]
    events: list[dict] = []
    relay = Relay(dead, CallTokenPolicy(), redis_store, fallbacks={"expert": "controller"},
                  retry=RetryPolicy(max_attempts=2, initial_interval=0.01))
    result = relay.run(tiny.QUESTION, on_event=events.append)
    segs = redis_store.read(result.trajectory_id)
    from relaygraph.agents.backend import Prompt, StopRule

    assert [(s.author, s.kind) for s in segs][:2] == [("controller", "text"), ("controller", "call")]
    # the controller's model wrote the expert's turn: the expert's view, the call's budget
    expected = pair[0].backend.generate(
        Prompt(tiny.QUESTION, tiny.SYSTEM_PROMPT, tuple(CallTokenPolicy().view("expert", segs[:2]))),
        StopRule(max_tokens=3))
    stand_in = [s for s in segs if s.meta.get("fallback_for") == "expert"]
    assert [t for s in stand_in for t in s.token_ids] == expected.token_ids
    assert all(s.author == "controller" for s in stand_in)
    assert [e["to"] for e in events if e["type"] == "fallback"] == ["controller"]
    assert result.counters["fallback_turns"] == 1
    assert result.tokens_by_agent["expert"] == 0
    assert redis_store.status(result.trajectory_id) == "finished"
    with pytest.raises(Exception, match="unknown agents"):
        Relay(dead, CallTokenPolicy(), redis_store, fallbacks={"expert": "ghost"})


def test_crash_between_the_two_appends_of_a_call_step_resumes_with_other_numerics(pair, dirs, redis_server) -> None:
    """The controller's call step is two appends (its head text, then the ``call`` segment);
    the process dies between them. The resuming process runs the same models in bf16 (other
    numerics: another GPU, another dtype, a prefill from scratch): it regenerates the same
    tokens with other log-probs, and its re-append of the stored head is taken as that head."""
    store = RedisStore.from_url(redis_server.url)
    reference = store.read(Relay(pair, CallTokenPolicy(), store, max_tokens=40).run(tiny.QUESTION).trajectory_id)
    assert [s.kind for s in reference[:2]] == ["text", "call"]
    crashing = crash_after_appending(RedisStore.from_url(redis_server.url), 0)
    tid = f"mid-call-step-{time.time_ns()}"
    with pytest.raises(Crash):
        Relay(pair, CallTokenPolicy(), crashing, max_tokens=40).run(tiny.QUESTION, trajectory_id=tid)
    head = store.read(tid)
    assert [s.kind for s in head] == ["text"] and store.status(tid) == "running"

    resuming = RedisStore.from_url(redis_server.url)
    attempts: list[tuple[int, Segment]] = []
    real_resume_append = resuming.append

    def recorded(tid_: str, seq: int, seg: Segment) -> None:
        attempts.append((seq, seg))
        real_resume_append(tid_, seq, seg)

    real_resume_send = resuming.send_append

    def recorded_send(tid_: str, seq: int, seg: Segment) -> Callable[[], None]:
        attempts.append((seq, seg))
        return real_resume_send(tid_, seq, seg)

    resuming.append = recorded  # type: ignore[method-assign]
    resuming.send_append = recorded_send  # type: ignore[method-assign]
    bf16 = [Agent(a.name, TransformersBackend(str(d), dtype="bfloat16"), tiny.SYSTEM_PROMPT)
            for a, d in zip(pair, dirs)]
    resumed = Relay(bf16, CallTokenPolicy(), resuming, max_tokens=40).resume(tid)

    again = [seg for seq, seg in attempts if seq == 0]
    assert again, "the resumed step re-appended its head"
    assert again[0].content() == head[0].content() and again[0].logprobs != head[0].logprobs
    segments = store.read(tid)
    assert segments[0] == head[0]  # the stored head stays, log-probs and all
    assert same(segments, reference) and resumed.answer == "7"
    assert store.status(tid) == "finished"
