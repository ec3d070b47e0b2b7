"""A policy defined outside the package: registered here, then used by `relaygraph run --config`,
`relaygraph eval sweep` and (as an installed plugin) through the entry-point group — with no
edit inside relaygraph/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

from typer.testing import CliRunner

from relaygraph.cli import app
from relaygraph.types import PolicyConfig
from tests import tiny_models as tiny

runner = CliRunner()

POLICY_SOURCE = '''
from typing import Literal

from relaygraph.types import (Agent, Decision, Generation, PolicyConfig, StopRule, TurnContext,
                              register_policy, segment)


@register_policy
class SentenceTurns(PolicyConfig):
    """Agents take turns sentence by sentence."""

    type: Literal["sentence-turns"] = "sentence-turns"
    agents: tuple[str, ...] = ("controller", "expert")
    max_sentence_tokens: int = 64

    def agent_names(self) -> list[str]:
        return list(self.agents)

    def stop_rule(self, agent: str, ctx: TurnContext) -> StopRule:
        return StopRule(max_tokens=min(self.max_sentence_tokens, ctx.remaining),
                        stop_strings=(". ", ".\\n"))

    def route(self, agent: Agent, generation: Generation, ctx: TurnContext) -> Decision:
        seg = segment(agent, generation, finish_reason=generation.finish_reason)
        if generation.finish_reason == "eos":
            return Decision([seg], None, reason="eos")
        nxt = self.agents[(self.agents.index(agent.name) + 1) % len(self.agents)]
        return Decision([seg], nxt, budget=ctx.remaining - len(generation.token_ids),
                        reason="sentence")
'''


# the README's example, run as written (registered when this module is imported)
_example = sys.modules.setdefault("sentence_turns_example",
                                  types.ModuleType("sentence_turns_example"))
exec(compile(POLICY_SOURCE, "README.md example", "exec", dont_inherit=True), _example.__dict__)
SentenceTurns = _example.SentenceTurns
assert issubclass(SentenceTurns, PolicyConfig)


def _agents_toml(tiny_pair: tuple[Path, Path]) -> str:
    controller, expert = tiny_pair
    return (f'[agents.controller]\nmodel = "{controller}"\ndtype = "float32"\n'
            f'system_prompt = "{tiny.SYSTEM_PROMPT}"\n'
            f'[agents.expert]\nmodel = "{expert}"\ndtype = "float32"\n'
            f'system_prompt = "{tiny.SYSTEM_PROMPT}"\n')


def test_run_config_uses_a_policy_registered_outside_the_package(tiny_pair, redis_server,
                                                                  tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text("max_tokens = 40\n" + _agents_toml(tiny_pair)
                      + '[policy]\ntype = "sentence-turns"\nagents = ["expert", "controller"]\n'
                      'max_sentence_tokens = 30\n')
    result = runner.invoke(app, ["run", tiny.QUESTION, "--config", str(config), "--json",
                                 "--redis", redis_server.url])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["policy"] == "sentence-turns"
    # the expert's first sentence ("Let me think. ", up to the token that completes the stop
    # string) hands over to the controller
    assert out["segments"][0]["author"] == "expert"
    assert out["segments"][0]["text"].startswith("Let me think. ")
    assert out["segments"][1]["author"] == "controller"
    assert out["handoff_records"][0]["reason"] == "sentence"
    assert out["handoffs"] == len(out["handoff_records"]) >= 1
    bad = runner.invoke(app, ["run", "q", "--config", str(config), "--set", "colour=red",
                              "--redis", redis_server.url])
    assert bad.exit_code == 2
    assert "policy 'sentence-turns' has no option 'colour'" in bad.output


def test_sweep_runs_a_policy_registered_outside_the_package(tiny_pair, redis_server,
                                                            tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"question": tiny.QUESTION, "answer": "#### 7"}) + "\n")
    config = tmp_path / "sweep.toml"
    config.write_text(f'dataset = "{data}"\nmax_tokens = 24\nrandom_router_p = [0.5]\n'
                      'perfect_router = false\n' + _agents_toml(tiny_pair)
                      + '[[policies]]\ntype = "sentence-turns"\nagents = ["expert", "controller"]\n'
                      'vary = { max_sentence_tokens = [8, 30] }\n')
    out = tmp_path / "out"
    result = runner.invoke(app, ["eval", "sweep", "--config", str(config), "--out", str(out),
                                 "--redis", redis_server.url, "--quiet"])
    assert result.exit_code == 0, result.output
    names = [p["name"] for p in json.loads((out / "results.json").read_text())["policies"]]
    assert "sentence-turns(max_sentence_tokens=8)" in names
    assert "sentence-turns(max_sentence_tokens=30)" in names
    picked = runner.invoke(app, ["eval", "sweep", str(data), "--policies", "sentence-turns",
                                 "--small", str(tiny_pair[0]), "--large", str(tiny_pair[1]),
                                 "--dtype", "float32", "--max-tokens", "16", "--p", "0.5",
                                 "--out", str(tmp_path / "picked"), "--redis", redis_server.url,
                                 "--quiet"])
    assert picked.exit_code == 0, picked.output
    results = json.loads((tmp_path / "picked" / "results.json").read_text())
    assert "sentence-turns" in [p["name"] for p in results["policies"]]


def test_an_installed_plugin_registers_through_the_entry_point_group(tiny_pair, redis_server,
                                                                    tmp_path: Path) -> None:
    """A package installed beside relaygraph (a dist-info with an entry point) adds its
    policy in a fresh process, without importing it explicitly anywhere."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sentence_plugin.py").write_text(POLICY_SOURCE.replace(
        '"sentence-turns"', '"sentence-turns-plugin"'))
    info = site / "sentence_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sentence-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[relaygraph.policies]\nsentence-turns-plugin = sentence_plugin:SentenceTurns\n")
    config = tmp_path / "relay.toml"
    config.write_text("max_tokens = 30\n" + _agents_toml(tiny_pair)
                      + '[policy]\ntype = "sentence-turns-plugin"\nagents = ["expert", "controller"]\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(Path.cwd())])}
    proc = subprocess.run([sys.executable, "-m", "relaygraph.cli", "run", tiny.QUESTION,
                           "--config", str(config), "--json", "--redis", redis_server.url],
                          capture_output=True, text=True, env=env, timeout=300,
                          cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["policy"] == "sentence-turns-plugin" and out["handoffs"] >= 1
    help_text = subprocess.run([sys.executable, "-m", "relaygraph.cli", "run", "--help"],
                               capture_output=True, text=True, env=env, timeout=120,
                               cwd=Path(__file__).parents[1]).stdout
    assert "sentence-turns-plugin" in " ".join(help_text.split())


def test_the_readme_example_is_the_policy_tested_here() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert textwrap.dedent(POLICY_SOURCE).strip() in readme


def test_a_bug_is_an_internal_error_not_a_user_error(tiny_pair, redis_server,
                                                      tmp_path: Path) -> None:
    """Only relaygraph's own errors are one `error:` line with exit 2; a ValueError raised by
    code (here a plugin policy with a bug) says `internal error:` and exits 1."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "buggy_plugin.py").write_text(POLICY_SOURCE.replace(
        '"sentence-turns"', '"buggy-turns"').replace(
        "        seg = segment(", "        raise ValueError('boom')\n        seg = segment("))
    info = site / "buggy_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: buggy-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[relaygraph.policies]\nbuggy-turns = buggy_plugin:SentenceTurns\n")
    config = tmp_path / "relay.toml"
    config.write_text("max_tokens = 30\n" + _agents_toml(tiny_pair) + '[policy]\ntype = "buggy-turns"\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(Path.cwd())])}
    env.pop("RELAYGRAPH_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "relaygraph.cli", "run", tiny.QUESTION,
                           "--config", str(config), "--redis", redis_server.url],
                          capture_output=True, text=True, env=env, timeout=300,
                          cwd=Path(__file__).parents[1])
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("internal error: ValueError: boom")
    assert "report it" in lines[-1] and "Traceback" not in proc.stderr
