"""The README's examples work when copied: every ``relaygraph`` command line in a fenced
``bash`` block parses against the real command line (commands, options, value types), the
ones that need no model pair run, every TOML config parses with the class that reads it,
every Python block compiles, and paths it names inside the repository exist."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest

from relaygraph.cli import command
from relaygraph.config import RelayConfig
from relaygraph.serve.registry import ServeConfig
from tests.test_cli import cli

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
BLOCKS = [(lang, body) for lang, body in FENCE.findall(README)]


def commands() -> list[tuple[str, ...]]:
    """Each ``relaygraph ...`` invocation in the README's bash blocks (environment
    assignments and trailing comments dropped; ``&&`` chains split)."""
    found = []
    for lang, body in BLOCKS:
        if lang != "bash":
            continue
        for line in body.splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                while words and re.match(r"^[A-Z_]+=", words[0]):
                    words = words[1:]
                if words[:1] == ["relaygraph"]:
                    found.append(tuple(words))
    return found


def parse(args: list[str]) -> Any:
    """Parse ``args`` as ``relaygraph`` would (every group down to the command, every
    option converted to its type), without running anything; the command's context."""
    cmd = command()
    ctx = cmd.make_context("relaygraph", list(args))
    while hasattr(cmd, "resolve_command"):
        rest = [*ctx._protected_args, *ctx.args]
        name, cmd, rest = cmd.resolve_command(ctx, rest)
        ctx = cmd.make_context(name, rest, parent=ctx)
    return ctx


COMMANDS = commands()
LINES = [" ".join(words) for words in COMMANDS]


def synopsis(words: tuple[str, ...]) -> bool:
    return "|" in words or any(w.startswith("[") or w.endswith("]") for w in words)


def test_the_readme_has_the_commands_this_test_checks() -> None:
    assert len(COMMANDS) >= 30
    first = next(c for c in LINES if c.startswith("relaygraph run"))
    assert "--policy confidence" in first  # the set-up's first run relays on the offline pair


@pytest.mark.parametrize("words", [c for c in COMMANDS if not synopsis(c)
                                   and c != ("relaygraph", "--version")], ids=" ".join)
def test_each_readme_command_parses(words: tuple[str, ...]) -> None:
    ctx = parse(list(words[1:]))
    assert ctx.command.callback is not None  # a command, not a group waiting for one
    for value in ctx.params.values():  # files the README names in the repository exist
        if isinstance(value, Path) and str(value).startswith(("examples/", "relaygraph/")):
            assert (ROOT / value).exists(), value


@pytest.mark.parametrize("line", [c for c in COMMANDS if synopsis(c)], ids=" ".join)
def test_each_readme_synopsis_parses_in_its_full_form(line: tuple[str, ...]) -> None:
    """``show ID [--follow] [--html F]``: the form with the optional parts, and each choice
    of ``list | pull [NAME...]``."""
    words = [w.strip("[]") for w in line[1:] if not w.rstrip("]").endswith("...")]
    if "|" in words:  # `models list | pull`: each is a command of the group
        at = words.index("|")
        group = command()
        for name in words[:at - 1]:
            group = group.commands[name]
        for choice in " ".join(words[at - 1:]).split(" | "):
            assert choice.split()[0] in group.commands, choice
    else:
        parse(words)


def test_the_readme_commands_that_need_no_model_run(redis_server) -> None:
    env = {"REDIS_URL": redis_server.url}
    for line in ("relaygraph --version", "relaygraph show", "relaygraph models list",
                 "relaygraph store status"):
        assert any(c.startswith(line) for c in LINES), line
        proc = cli(*shlex.split(line)[1:], env=env)
        assert proc.returncode == 0, (line, proc.stderr)
        assert "error" not in proc.stderr.lower(), (line, proc.stderr)
    listed = cli("show", "--redis", redis_server.url)
    assert listed.stdout.strip(), listed.stderr


def configs() -> list[tuple[int, dict[str, Any]]]:
    return [(i, tomllib.loads(body)) for i, (lang, body) in enumerate(BLOCKS) if lang == "toml"]


@pytest.mark.parametrize("index, data", configs())
def test_each_readme_config_parses(index: int, data: dict[str, Any]) -> None:
    """Serve configs (``[relays.*]``) as :class:`ServeConfig`; relay configs and their
    fragments (``[agents.expert]``, ``[store]``) as :class:`RelayConfig`, a fragment with the
    catalog controller beside it."""
    if "relays" in data:
        config = ServeConfig.parse(data, f"README block {index}")
        assert config.relays
        assert "redis" not in data, "a copied serve.toml must not need a Redis on localhost"
        return
    agents = {"controller": {"model": "qwen2.5-coder-0.5b"}, **data.get("agents", {})}
    if "expert" not in agents:
        agents["expert"] = {"model": "qwen2.5-coder-1.5b"}
    config = RelayConfig.parse({**data, "agents": agents}, f"README block {index}")
    assert set(config.agents) >= {"controller", "expert"}
    assert json.dumps(config.model_dump(mode="json"))  # data only


def test_each_readme_python_block_compiles() -> None:
    blocks = [body for lang, body in BLOCKS if lang == "python"]
    assert blocks
    for body in blocks:
        compile(body, "README.md", "exec")


def test_the_readme_names_no_paths_outside_the_repository() -> None:
    assert "/work/" not in README
