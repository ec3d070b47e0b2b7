"""Input that cannot run is refused before anything runs or is stored (issue 16, item 9):
supervisor references resolved and type-checked when the relay is built, NaN refused, ids
anchored at the end, a question too long for a model's context window, all one error line
and no trajectory written. The CLI as a subprocess, a real Redis server, the tiny pair."""

from __future__ import annotations

import pytest

from relaygraph import Relay
from relaygraph.config import RelayConfig
from relaygraph.errors import ConfigError, RelayGraphError
from relaygraph.trajectory import RedisStore
from relaygraph.trajectory.models import check_trajectory_id
from tests import tiny_models as tiny
from tests.test_cli import cli


@pytest.mark.parametrize("args, message", [
    (["run", "q", "--policy", "supervisor", "--supervisor", "os:system"],
     "supervisor 'os:system' is not a function defined in 'os'"),
    (["run", "q", "--policy", "supervisor", "--supervisor", "builtins:exec"],
     "is not a function defined in 'builtins'"),
    (["run", "q", "--policy", "confidence", "--threshold", "nan"], "threshold"),
    (["run", "q", "--policy", "random-router", "--p", "inf"], "p"),
    (["run", "2 + 5 = ? " * 400], "does not fit"),
    (["show", "abc\n"], "invalid trajectory id"),
])
def test_input_that_cannot_run_is_one_line_exit_2_and_writes_nothing(args, message, tiny_pair, redis_server) -> None:
    if args[0] == "run":
        args += ["--controller", str(tiny_pair[0]), "--expert", str(tiny_pair[1])]
    store = RedisStore.from_url(redis_server.url)
    before = store.list_ids(10_000)
    proc = cli(*args, "--redis", redis_server.url)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    if "supervisor" in args:  # refused before a model loads
        assert "Loading" not in proc.stderr
    assert store.list_ids(10_000) == before


def _policy(supervisor: str):
    return RelayConfig.parse({"policy": {"type": "supervisor", "supervisor": supervisor,
                                         "chunk_tokens": 2}}).policy


def test_supervisor_references_are_type_checked_when_built() -> None:
    for spec, message in [("os:system", "not a function defined in 'os'"),
                          ("os.path:join", "not a function defined in 'os.path'"),  # posixpath's
                          ("builtins:print", "not a function defined"),
                          ("tests.test_upfront_validation:two_arguments", "must take one argument"),
                          ("tests.test_upfront_validation:bad_factory", "must return a callable")]:
        with pytest.raises(ConfigError, match=message):
            _policy(spec).build({})
    assert _policy("tests.test_upfront_validation:factory").build({}).supervisor is one_argument


def test_ids_ending_in_a_newline_are_refused() -> None:
    for bad in ("abc\n", "abc\r\n", "\nabc"):
        with pytest.raises(ValueError):
            check_trajectory_id(bad)


def test_a_supervisor_returning_something_else_is_a_clean_error(backends, redis_store) -> None:
    from relaygraph import Agent

    agents = [Agent("controller", backends[0], tiny.SYSTEM_PROMPT),
              Agent("expert", backends[1], tiny.SYSTEM_PROMPT)]
    policy = _policy("tests.test_upfront_validation:returns_a_number").build({})
    with pytest.raises(RelayGraphError, match="returned int; a supervisor returns a Verdict"):
        Relay(agents, policy, redis_store, max_tokens=16).run(tiny.QUESTION)


def test_a_question_longer_than_the_context_stores_nothing(backends, redis_store) -> None:
    from relaygraph import Agent, CallTokenPolicy
    from relaygraph.agents.decoding import ContextTooLongError

    agents = [Agent("controller", backends[0], tiny.SYSTEM_PROMPT),
              Agent("expert", backends[1], tiny.SYSTEM_PROMPT)]
    before = redis_store.list_ids(10_000)
    with pytest.raises(ContextTooLongError, match="does not fit"):
        Relay(agents, CallTokenPolicy(), redis_store, max_tokens=16).run("2 + 5 = ? " * 400)
    assert redis_store.list_ids(10_000) == before


def one_argument(review):  # a supervisor: continue
    return None


def two_arguments(review, other):
    return None


def factory():
    return one_argument


def bad_factory():
    return 42


def returns_a_number(review):
    return 1
