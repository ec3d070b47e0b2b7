"""Relay configuration: plain pydantic models, loadable from TOML, YAML or JSON, validated.

```toml
max_tokens = 512

[agents.controller]
model = "qwen2.5-coder-0.5b"

[agents.expert]
model = "qwen2.5-coder-1.5b"
# or served by vLLM (`vllm serve ... --served-model-name qwen2.5-coder-1.5b`):
# base_url = "http://localhost:8000/v1"      # backend = "openai" is implied
# api_key_env = "VLLM_API_KEY"               # optional: the variable holding the key
# or vLLM in-process: backend = "vllm", engine_args = {gpu_memory_utilization = 0.4}

[policy]
type = "confidence"        # see `relaygraph run --help` for every registered policy
threshold = -2.5
fallback_tokens = 16

[store]                    # optional; `redis = "redis://..."` at the top is the same as url
url = "redis+cluster://10.0.0.5:7000,10.0.0.6:7000"   # else $REDIS_URL, else the embedded server
namespace = "experiment-7" # key prefix: tenants, experiments (default relaygraph)
ttl = "7d"                 # new trajectories expire 7 days after their last activity
```

This module is data only: :meth:`relaygraph.relay.Relay.from_config` builds a relay from a
:class:`RelayConfig`. Agent configs come from the backend registry
(:mod:`relaygraph.agents.registry`), policies from the policy registry
(:mod:`relaygraph.policies.registry`).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from relaygraph.agents.catalog import DEFAULT_CONTROLLER, DEFAULT_EXPERT
from relaygraph.agents.registry import AgentConfig, parse_agent_config, parse_agent_configs
from relaygraph.errors import ConfigError, validation_message
from relaygraph.graphs.retry import RetryPolicy
from relaygraph.policies.base import PolicyConfig
from relaygraph.policies.registry import parse_policy
from relaygraph.trajectory.models import Task
from relaygraph.trajectory.settings import HasStore


def default_agents() -> dict[str, AgentConfig]:
    """The offline pair: the catalog's default controller and expert."""
    return {"controller": parse_agent_config({"model": DEFAULT_CONTROLLER}),
            "expert": parse_agent_config({"model": DEFAULT_EXPERT})}


class RelayConfig(HasStore):
    """Agents by name, a policy, the run's budget and where its trajectory goes."""

    model_config = ConfigDict(extra="forbid")

    agents: dict[str, SerializeAsAny[AgentConfig]] = Field(default_factory=default_agents)
    policy: SerializeAsAny[PolicyConfig] = Field(default_factory=lambda: parse_policy({}))
    max_tokens: int = Field(512, ge=1)
    fallbacks: dict[str, str] = {}
    """Agent -> agent that writes its turn when its backend keeps failing."""
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    """How a failing generation is retried before the fallback takes the turn (attempts,
    back-off); recorded with each trajectory, so a resumed run retries the same way."""

    @field_validator("agents", mode="before")
    @classmethod
    def _agent_configs(cls, agents: Any) -> Any:
        return parse_agent_configs(agents)

    @field_validator("policy", mode="before")
    @classmethod
    def _policy_config(cls, policy: Any) -> Any:
        return parse_policy(policy)

    @model_validator(mode="after")
    def _agents_exist(self) -> RelayConfig:
        if "agents" not in self.model_fields_set:  # the default pair, as the policy wants it
            for name in self.agents:
                if model := self.policy.default_model(name):
                    self.agents[name] = parse_agent_config({"model": model})
        missing = sorted({*self.policy.required_agents(), *self.fallbacks,
                          *self.fallbacks.values()} - set(self.agents))
        if missing:
            raise ValueError(f"policy {self.policy.type!r} names agents {missing} that are not "
                             f"in [agents] (have: {sorted(self.agents)})")
        for role, prompt in self.policy.system_prompts.items():
            name = getattr(self.policy, role)
            agent = self.agents[name]
            if "system_prompt" not in agent.model_fields_set:
                self.agents[name] = agent.model_copy(update={"system_prompt": prompt})
        return self

    @classmethod
    def load(cls, path: str | Path) -> RelayConfig:
        """Read a ``.toml``, ``.yaml``/``.yml`` or ``.json`` file; errors name the bad field."""
        return cls.parse(read_config_file(path), source=str(path))

    @classmethod
    def parse(cls, data: Any, source: str = "config") -> RelayConfig:
        return validate(cls, data, source)

    @classmethod
    def from_options(cls, controller: str | None = None, expert: str | None = None,
                     policy: str = "call-token", max_tokens: int = 512,
                     redis: str | None = None, dtype: str = "bfloat16",
                     controller_url: str | None = None, expert_url: str | None = None,
                     **options: Any) -> RelayConfig:
        """A two-agent config (``controller``, ``expert``; unless given, the policy's own
        default model (:attr:`PolicyConfig.default_models`), else the catalog's default
        pair) from command-line style options; ``*_url`` serve that agent's model from an
        OpenAI-compatible server (the model is then the served name); ``options`` are the
        policy's fields (e.g. ``threshold=-2.5``)."""
        try:
            policy_cfg = parse_policy({"type": policy, **options})
        except ValueError as exc:
            raise ConfigError(f"options: {exc}") from None
        needed = policy_cfg.required_agents()
        models = {"controller": controller or policy_cfg.default_model("controller")
                  or DEFAULT_CONTROLLER,
                  "expert": expert or policy_cfg.default_model("expert") or DEFAULT_EXPERT}
        urls = {"controller": controller_url, "expert": expert_url}
        agents: dict[str, dict[str, Any]] = {}
        for name in ("controller", "expert"):
            if name not in needed:
                continue
            if urls[name]:
                agents[name] = {"model": models[name], "base_url": urls[name]}
            else:
                agents[name] = {"model": models[name], "dtype": dtype}
        return cls.parse({"agents": agents, "policy": policy_cfg, "max_tokens": max_tokens,
                          "redis": redis}, source="options")

    def with_store(self, url: str | None = None, namespace: str | None = None,
                   ttl: Any = None) -> RelayConfig:
        """This config with command-line store options (those given) applied."""
        return self.model_copy(update={"store": self.store.override(url, namespace, ttl)})

    def needed_agents(self) -> list[str]:
        """The agents a run loads: the policy's and the fallbacks'."""
        wanted = {*self.policy.required_agents(), *self.fallbacks.values()}
        return [n for n in self.agents if n in wanted]

    def untrusted(self) -> dict[str, Any]:
        """What this config names that a stored trajectory is not trusted to name, by
        dotted field (``agents.expert.base_url``): endpoints, credential variable names,
        code references and file paths — every agent's :meth:`AgentConfig.untrusted` and
        the policy's :meth:`PolicyConfig.untrusted`. Empty: the store may rebuild it."""
        named = {f"agents.{name}.{field}": value for name in self.needed_agents()
                 for field, value in self.agents[name].untrusted().items()}
        named.update({f"policy.{field}": value
                      for field, value in self.policy.untrusted().items()})
        return named

    @classmethod
    def for_resume(cls, task: Task, trajectory_id: str,
                   config: RelayConfig | str | Path | None = None,
                   trust_stored: bool = False) -> RelayConfig:
        """The config to resume a stored trajectory with (the trust model).

        ``config`` (the user's own, e.g. the file the run started from) is used as given,
        once its agents are checked against those the trajectory recorded. Without it, the
        config stored with the trajectory is rebuilt only if it names nothing a store is
        not trusted with (:meth:`untrusted`: catalog models only; no endpoints, credential
        variables, code or files), or if ``trust_stored`` confirms it; otherwise a
        ConfigError lists what it names and how to resume."""
        stored_data = task.config.get("relay")
        source = f"trajectory {trajectory_id}"
        if isinstance(task.config.get("serve"), dict):
            raise ConfigError(f"{source} was run by relaygraph serve: rebuild its relay with "
                              "relaygraph.serve.served_relay(id, store, config) (`relaygraph "
                              "resume ID --config serve.toml`)")
        if config is not None:
            chosen = config if isinstance(config, RelayConfig) else cls.load(config)
            ran = sorted(task.agents)
            if ran and sorted(chosen.policy.agent_names()) != ran:
                raise ConfigError(
                    f"{source} ran with agents {ran} (policy {task.policy}); the config given "
                    f"has {sorted(chosen.policy.agent_names())} (policy {chosen.policy.type}): "
                    "resume it with the config it ran with")
            return chosen
        if stored_data is None:
            raise ConfigError(f"{source} was not started from a config (a Relay built in "
                              f"Python): resume it with `relaygraph resume {trajectory_id} "
                              "--config relay.toml` naming its agents, or in Python with "
                              "Relay.resume(id)")
        stored = cls.parse(stored_data, source=f"the config stored with {source}")
        named = stored.untrusted()
        if named and not trust_stored:
            listed = ", ".join(f"{field} = {shown(value)}" for field, value in named.items())
            raise ConfigError(
                f"the config stored with {source} names what a store is not trusted to name "
                f"(endpoints, credential variables, code, files, models outside the catalog): "
                f"{listed}; resume it with your own config: `relaygraph resume {trajectory_id} "
                f"--config relay.toml` (Relay.from_trajectory(id, store, config)), or, if you "
                f"trust whoever can write to this store with them, add --trust-stored")
        return stored


M = TypeVar("M", bound=BaseModel)


def shown(value: Any, limit: int = 80) -> str:
    """A stored value for a message: its repr (control characters escaped), cut short."""
    text = repr(str(value) if isinstance(value, Path) else value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def read_config_file(path: str | Path) -> Any:
    """The data in a ``.toml``, ``.yaml``/``.yml`` or ``.json`` file, or a one-line ConfigError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        if path.suffix == ".toml":
            return tomllib.loads(raw.decode())
        if path.suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(raw) or {}
        if path.suffix == ".json":
            return json.loads(raw)
    except ImportError:
        raise ConfigError("YAML configs need PyYAML: pip install pyyaml") from None
    except Exception as exc:  # noqa: BLE001 - TOML/JSON/YAML/Unicode errors, as one line
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"config {path} is not valid {path.suffix[1:].upper()}: {first}") from None
    raise ConfigError(f"config {path}: use a .toml, .yaml or .json file")


def validate(model: type[M], data: Any, source: str) -> M:
    """``model`` validated from ``data``; the first problem as a one-line ConfigError."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {validation_message(exc)} "
                          f"({exc.error_count()} problem(s) in all)") from None
