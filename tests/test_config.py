"""Relay config files: validated with clear errors, built into working relays."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from relaygraph.agents.registry import BackendPool
from relaygraph.config import RelayConfig
from relaygraph.errors import ConfigError
from relaygraph.policies import (
    ConfidencePolicy,
    FixedIntervalPolicy,
    PerfectRouter,
    PromptedCallPolicy,
    RandomRouter,
    SupervisorPolicy,
    TruncatePolicy,
    TurnContext,
)
from relaygraph.relay import Relay
from tests import tiny_models as tiny


def test_defaults_are_call_token_with_the_trained_controller_and_the_offline_expert() -> None:
    from relaygraph.agents.catalog import RELAY_CONTROLLER

    cfg = RelayConfig()
    assert cfg.agents["controller"].model == RELAY_CONTROLLER == "qwen2.5-coder-0.5b-relay"
    assert cfg.agents["expert"].model == "qwen2.5-coder-1.5b"
    assert cfg.policy.type == "call-token" and cfg.max_tokens == 512
    # the command line's defaults are the same; other policies keep the plain 0.5B
    assert RelayConfig.from_options().agents["controller"].model == RELAY_CONTROLLER
    assert RelayConfig.from_options(policy="confidence").agents["controller"].model == "qwen2.5-coder-0.5b"
    assert RelayConfig.from_options(controller="./mine").agents["controller"].model == "./mine"


def test_a_policy_can_name_its_own_default_models(monkeypatch) -> None:
    """``PolicyConfig.default_models``: the models a policy's roles get when the user names
    none (on the command line, in a config file without [agents], in serve's defaults)."""
    from relaygraph.policies.call_token import CallTokenPolicy
    from relaygraph.serve.registry import ServeConfig

    monkeypatch.setattr(CallTokenPolicy, "default_models", {"controller": "trained-0.5b"})
    plain, expert = "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"

    def models(cfg):
        return cfg.agents["controller"].model, cfg.agents["expert"].model

    assert models(RelayConfig.from_options()) == ("trained-0.5b", expert)
    assert models(RelayConfig.from_options(policy="call-token", teacher_free=True)) == ("trained-0.5b", expert)
    for policy in ("prompted-call", "confidence", "fixed-interval"):
        assert models(RelayConfig.from_options(policy=policy)) == (plain, expert), policy
    assert models(RelayConfig.from_options(controller="./mine")) == ("./mine", expert)
    assert models(RelayConfig.parse({"policy": {"type": "call-token"}})) == ("trained-0.5b", expert)
    assert models(RelayConfig.parse({"policy": {"type": "confidence"}})) == (plain, expert)
    given = {"agents": {"controller": {"model": plain}, "expert": {"model": expert}}}
    assert models(RelayConfig.parse({**given, "policy": {"type": "call-token"}})) == (plain, expert)
    served = ServeConfig.default()
    assert models(served.relays["relay-call-token"]) == ("trained-0.5b", expert)
    assert models(served.relays["relay-prompted-call"]) == (plain, expert)
    assert served.relays["relay-call-token"].description.startswith(f"trained-0.5b + {expert}")


def test_toml_config_builds_each_policy(tmp_path: Path) -> None:
    solo = tmp_path / "solo.json"
    solo.write_text(json.dumps({"q1": True, "q2": False}))
    cases = {
        'type = "confidence"\nthreshold = -1.5\nmetric = "entropy"\nfallback_until = "sentence"':
            ConfidencePolicy,
        'type = "fixed-interval"\ninterval = 4': FixedIntervalPolicy,
        'type = "random-router"\np = 0.25': RandomRouter,
        f'type = "perfect-router"\nsolo_results = "{solo}"': PerfectRouter,
        'type = "truncate"\ncut_tokens = 12': TruncatePolicy,
        'type = "prompted-call"\nmax_call_tokens = 50': PromptedCallPolicy,
        'type = "supervisor"\nsupervisor = "tests.test_config:no_op_supervisor"\nchunk_tokens = 8':
            SupervisorPolicy,
    }
    for body, kind in cases.items():
        path = tmp_path / "relay.toml"
        path.write_text(f'max_tokens = 99\n[agents.controller]\nmodel = "a"\n'
                        f'[agents.expert]\nmodel = "b"\n[policy]\n{body}\n')
        cfg = RelayConfig.load(path)
        assert cfg.max_tokens == 99
        policy = cfg.policy.build({})
        assert isinstance(policy, kind), body
    assert isinstance(policy, SupervisorPolicy) and policy.chunk_tokens == 8  # made it through
    assert callable(policy.supervisor)  # module:function resolved when built
    perfect = RelayConfig.parse({"policy": {"type": "perfect-router",
                                            "solo_results": str(solo)}}).policy.build({})
    assert perfect.first_turn(TurnContext("q2", max_tokens=5))[0] == "expert"


def no_op_supervisor(review):  # used by the config above through module:function
    return None


def test_yaml_and_json_configs(tmp_path: Path) -> None:
    yaml_file = tmp_path / "relay.yaml"
    yaml_file.write_text("policy:\n  type: fixed-interval\n  interval: 3\n")
    assert RelayConfig.load(yaml_file).policy.interval == 3
    json_file = tmp_path / "relay.json"
    json_file.write_text('{"policy": {"type": "solo"}}')
    assert RelayConfig.load(json_file).policy.type == "solo"


@pytest.mark.parametrize("body, message", [
    ('[policy]\ntype = "confidence"\nthreshold = "high"', "policy.threshold"),
    ('[policy]\ntype = "teleport"', "unknown policy 'teleport'; choose one of: call-token"),
    ('[policy]\ntype = "fixed-interval"\nagents = ["controller", "ghost"]', "ghost"),
    ('[policy]\ntype = "truncate"', "exactly one of threshold and cut_tokens"),
    ('max_tokens = 0', "max_tokens"),
    ('[agents.controller]\nmodell = "typo"', "agents.controller"),
    ('max_tokens = [', "not valid TOML"),
    ('[retry]\nmax_attempts = 0', "retry.max_attempts"),
    ('[retry]\nbackof = 2', "retry.backof"),
])
def test_bad_configs_say_what_is_wrong(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(body + "\n")
    with pytest.raises(ConfigError, match=None) as info:
        RelayConfig.load(path)
    assert message in str(info.value), str(info.value)


def test_options_build_a_runnable_relay(tmp_path_factory, redis_store) -> None:
    controller, expert = tiny.relay_pair()
    cfg = RelayConfig.from_options(str(controller), str(expert), "fixed-interval", max_tokens=10,
                                   dtype="float32", interval=3)
    relay = Relay.from_config(cfg, redis_store)
    result = relay.run(tiny.QUESTION)
    assert [s.author for s in result.segments][:2] == ["controller", "expert"]
    assert all(s.n_tokens <= 3 for s in result.segments)
    # one backend per (model, dtype): agents sharing a model share its weights
    same_cfg = RelayConfig.from_options(str(controller), str(controller), "fixed-interval",
                                        dtype="float32")
    same = BackendPool().agents(same_cfg.agents, same_cfg.needed_agents())
    assert same["controller"].backend is same["expert"].backend


def test_retries_are_a_value_in_the_config_recorded_with_each_trajectory(tmp_path, redis_store) -> None:
    controller, _ = tiny.relay_pair()
    path = tmp_path / "relay.toml"
    path.write_text(f'[agents.controller]\nmodel = "{controller}"\ndtype = "float32"\n'
                    '[policy]\ntype = "solo"\n[retry]\nmax_attempts = 5\ninitial_interval = 0.25\n')
    cfg = RelayConfig.load(path)
    assert (cfg.retry.max_attempts, cfg.retry.initial_interval, cfg.retry.backoff_factor) == (5, 0.25, 2.0)
    assert [cfg.retry.interval(n) for n in range(3)] == [0.25, 0.5, 1.0]
    relay = Relay.from_config(cfg, redis_store)
    assert relay.retry == cfg.retry
    task = redis_store.load(relay.run(tiny.NOCALL_QUESTION).trajectory_id).task
    # what `relaygraph resume` rebuilds the relay from, and what the resumed graph retries with
    assert RelayConfig.parse(task.config["relay"]).retry == cfg.retry
    assert task.config["retry"] == cfg.retry.model_dump()
