"""Relay configuration: plain pydantic models, loadable from TOML or YAML, validated.

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
type = "confidence"        # call-token | prompted-call | solo | confidence | supervisor |
threshold = -2.5           # fixed-interval | random-router | perfect-router | truncate
fallback_tokens = 16
```
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from relaygraph.agents.agent import MATH_SYSTEM_PROMPT
from relaygraph.policies.call_token import PROMPTED_CALL_SYSTEM_PROMPT
from relaygraph.errors import ConfigError

if TYPE_CHECKING:
    from relaygraph.agents.agent import Agent
    from relaygraph.agents.backend import Backend
    from relaygraph.policies.base import Policy
    from relaygraph.relay import Relay
    from relaygraph.trajectory.store import TrajectoryStore


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


BackendKind = Literal["transformers", "openai", "vllm"]


class AgentConfig(_Strict):
    """One agent: its model, the backend that runs it, how it is prompted and sampled.

    ``backend``: ``transformers`` (local weights; the default), ``openai`` (an
    OpenAI-compatible server such as ``vllm serve`` at ``base_url``; ``model`` is the
    served model name; the default when ``base_url`` is set) or ``vllm`` (vLLM in-process,
    ``pip install 'relaygraph[vllm]'``; ``engine_args`` go to vLLM's engine).
    ``tokenizer``: where the server/vLLM backends load the tokenizer for rendering from
    (default: ``model``). ``api_key_env`` names the environment variable holding the
    server's API key (the key itself never goes in a config: configs are stored with
    each trajectory).
    """

    model: str
    backend: BackendKind = "transformers"
    base_url: str | None = None
    api_key_env: str | None = None
    tokenizer: str | None = None
    engine_args: dict[str, Any] = {}
    system_prompt: str | None = MATH_SYSTEM_PROMPT
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _server_means_openai(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("base_url") and "backend" not in data:
            data = {**data, "backend": "openai"}
        return data

    @model_validator(mode="after")
    def _backend_options(self) -> AgentConfig:
        if self.backend == "openai":
            if not self.base_url:
                raise ValueError("backend 'openai' needs base_url (e.g. http://localhost:8000/v1)")
            from relaygraph.agents.openai_backend import split_url

            try:
                _, auth = split_url(self.base_url)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
            if auth is not None:
                raise ValueError("base_url must not contain credentials (configs are stored "
                                 "with each trajectory); put the API key in an environment "
                                 "variable and name it in api_key_env")
        elif self.base_url or self.api_key_env:
            raise ValueError(f"base_url and api_key_env are for backend 'openai', not "
                             f"{self.backend!r}")
        if self.engine_args and self.backend != "vllm":
            raise ValueError(f"engine_args are for backend 'vllm', not {self.backend!r}")
        return self

    @property
    def local_model(self) -> str | None:
        """What must be on this machine (pulled if it is a catalog model): the weights, or
        for a server only the tokenizer (None when it comes from the server's model path)."""
        from relaygraph.agents.catalog import CATALOG

        if self.backend == "openai":
            return self.tokenizer or (self.model if self.model in CATALOG else None)
        return self.model

    def backend_key(self) -> tuple[Any, ...]:
        """Agents whose configs have equal keys share one backend (one copy of the weights,
        one connection pool)."""
        if self.backend == "openai":
            return ("openai", self.base_url, self.model, self.tokenizer, self.api_key_env)
        if self.backend == "vllm":
            return ("vllm", self.model, self.dtype, self.tokenizer,
                    json.dumps(self.engine_args, sort_keys=True, default=str))
        return ("transformers", self.model, self.dtype)

    def build_backend(self) -> Backend:
        """Load (or connect to) the model this config names."""
        if self.backend == "openai":
            import os

            from relaygraph.agents.openai_backend import OpenAIBackend

            api_key = None
            if self.api_key_env:
                api_key = os.environ.get(self.api_key_env)
                if not api_key:
                    raise ConfigError(f"api_key_env names ${self.api_key_env}, which is not set")
            assert self.base_url is not None
            return OpenAIBackend(self.base_url, self.model, tokenizer=self.tokenizer,
                                 api_key=api_key)
        if self.backend == "vllm":
            from relaygraph.agents.vllm_backend import VLLMBackend

            return VLLMBackend(self.model, tokenizer=self.tokenizer,
                               **{"dtype": self.dtype, **self.engine_args})
        from relaygraph.agents.transformers_backend import TransformersBackend

        return TransformersBackend(self.model, dtype=self.dtype)


class CallTokenConfig(_Strict):
    type: Literal["call-token", "prompted-call"] = "call-token"
    controller: str = "controller"
    expert: str = "expert"
    max_call_tokens: int = Field(1024, ge=1)
    max_calls: int = Field(32, ge=0)


class SoloConfig(_Strict):
    type: Literal["solo"]
    agent: str = "controller"


class ConfidenceConfig(_Strict):
    type: Literal["confidence"]
    agents: list[str] = ["controller", "expert"]
    threshold: float = -2.5
    metric: Literal["logprob", "entropy"] = "logprob"
    fallback_tokens: int = Field(16, ge=1)
    fallback_until: Literal["tokens", "confident", "sentence"] = "tokens"
    warmup: int = Field(0, ge=0)
    min_gap: int = Field(0, ge=0)
    max_handoffs: int | None = Field(None, ge=0)


class FixedIntervalConfig(_Strict):
    type: Literal["fixed-interval"]
    agents: list[str] = ["controller", "expert"]
    interval: int = Field(16, ge=1)


class RandomRouterConfig(_Strict):
    type: Literal["random-router"]
    small: str = "controller"
    large: str = "expert"
    p: float = Field(0.5, ge=0, le=1)
    seed: int = 0


class PerfectRouterConfig(_Strict):
    type: Literal["perfect-router"]
    small: str = "controller"
    large: str = "expert"
    solo_results: Path
    """JSON object or JSONL of ``{"question": ..., "correct": bool}``: the small model's solo results."""


class TruncateConfig(_Strict):
    type: Literal["truncate"]
    initiator: str = "controller"
    continuer: str = "expert"
    threshold: float | None = None
    metric: Literal["logprob", "entropy"] = "logprob"
    cut_tokens: int | None = Field(None, ge=0)
    warmup: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _one_cut(self) -> TruncateConfig:
        if (self.threshold is None) == (self.cut_tokens is None):
            raise ValueError("give exactly one of threshold and cut_tokens")
        return self


class SupervisorConfig(_Strict):
    type: Literal["supervisor"]
    workers: list[str] = ["controller"]
    supervisor: str
    """``module:function`` (a rule/classifier), ``judge:AGENT`` (an agent prompted as a judge)
    or ``score:AGENT`` (an agent's log-prob score of " good" vs " bad")."""
    chunk_tokens: int = Field(48, ge=1)
    chunk_stops: list[str] = ["\n\n"]
    score_threshold: float = 0.0


PolicyConfig = Annotated[
    CallTokenConfig | SoloConfig | ConfidenceConfig | FixedIntervalConfig | RandomRouterConfig
    | PerfectRouterConfig | TruncateConfig | SupervisorConfig,
    Field(discriminator="type"),
]
POLICY_TYPES = ("call-token", "prompted-call", "solo", "confidence", "supervisor",
                "fixed-interval", "random-router", "perfect-router", "truncate")


class RelayConfig(_Strict):
    """Agents by name, a policy, and the run's budget."""

    agents: dict[str, AgentConfig] = {
        "controller": AgentConfig(model="qwen2.5-coder-0.5b"),
        "expert": AgentConfig(model="qwen2.5-coder-1.5b"),
    }
    policy: PolicyConfig = CallTokenConfig()
    max_tokens: int = Field(512, ge=1)
    redis: str | None = None
    fallbacks: dict[str, str] = {}
    """Agent -> agent that writes its turn when its backend keeps failing."""

    @model_validator(mode="after")
    def _agents_exist(self) -> RelayConfig:
        missing = sorted(set(_policy_agents(self.policy)) - set(self.agents))
        if missing:
            raise ValueError(f"policy {self.policy.type!r} names agents {missing} that are not "
                             f"in [agents] (have: {sorted(self.agents)})")
        return self

    @classmethod
    def load(cls, path: str | Path) -> RelayConfig:
        """Read a ``.toml``, ``.yaml``/``.yml`` or ``.json`` file; errors name the bad field."""
        return cls.parse(read_config_file(path), source=str(path))

    @classmethod
    def parse(cls, data: Any, source: str = "config") -> RelayConfig:
        return validate(cls, data, source)

    @classmethod
    def from_options(cls, controller: str = "qwen2.5-coder-0.5b",
                     expert: str | None = "qwen2.5-coder-1.5b", policy: str = "call-token",
                     max_tokens: int = 512, redis: str | None = None, dtype: str = "bfloat16",
                     controller_url: str | None = None, expert_url: str | None = None,
                     **options: Any) -> RelayConfig:
        """A two-agent config (``controller``, ``expert``) from command-line style options;
        ``*_url`` serve that agent's model from an OpenAI-compatible server (the model is
        then the served name); ``options`` are the policy's fields (e.g. ``threshold=-2.5``)."""
        if policy not in POLICY_TYPES:
            raise ConfigError(f"unknown policy {policy!r}; choose one of: {', '.join(POLICY_TYPES)}")
        prompt = PROMPTED_CALL_SYSTEM_PROMPT if policy == "prompted-call" else MATH_SYSTEM_PROMPT
        agents = {"controller": {"model": controller, "system_prompt": prompt, "dtype": dtype}}
        if policy not in ("solo", "supervisor") or options.get("workers", ["controller"]) != ["controller"]:
            if not expert:
                raise ConfigError(f"policy {policy!r} needs an expert model (--expert)")
            agents["expert"] = {"model": expert, "dtype": dtype}
        for name, url in (("controller", controller_url), ("expert", expert_url)):
            if url and name in agents:
                agents[name]["base_url"] = url
        return cls.parse({"agents": agents, "policy": {"type": policy, **options},
                          "max_tokens": max_tokens, "redis": redis}, source="options")

    # building -------------------------------------------------------------------------------
    def build_agents(self, names: list[str] | None = None) -> dict[str, Agent]:
        """Load each model once (agents with the same :meth:`AgentConfig.backend_key` share
        one backend: the same weights, or the same server connection)."""
        from relaygraph.agents.agent import Agent
        from relaygraph.agents.backend import Sampling

        loaded: dict[tuple[Any, ...], Backend] = {}
        agents = {}
        for name in names or list(self.agents):
            cfg = self.agents[name]
            key = cfg.backend_key()
            if key not in loaded:
                loaded[key] = cfg.build_backend()
            agents[name] = Agent(name, loaded[key], cfg.system_prompt,
                                 Sampling(cfg.temperature, cfg.top_p, cfg.seed))
        return agents

    def needed_agents(self) -> list[str]:
        wanted = {*_policy_agents(self.policy), *self.fallbacks.values()}
        return [n for n in self.agents if n in wanted]

    def build(self, store: TrajectoryStore | None = None) -> Relay:
        """Load the agents the policy uses and compile the relay."""
        from relaygraph.relay import Relay
        from relaygraph.trajectory import open_store

        agents = self.build_agents(self.needed_agents())
        policy = build_policy(self.policy, agents)
        return Relay(list(agents.values()), policy,
                     store if store is not None else open_store(self.redis), self.max_tokens,
                     config=self, fallbacks=self.fallbacks)


M = TypeVar("M", bound=BaseModel)


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
    except Exception as exc:  # TOML/JSON/YAML/Unicode errors
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"config {path} is not valid {path.suffix[1:].upper()}: {first}") from None
    raise ConfigError(f"config {path}: use a .toml, .yaml or .json file")


def validate(model: type[M], data: Any, source: str) -> M:
    """``model`` validated from ``data``; the first problem as a one-line ConfigError."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) if str(p).isprintable() else repr(p)
                         for p in first["loc"]) or "(top level)"
        message = " ".join(str(first["msg"]).split())
        raise ConfigError(f"{source}: {where}: {message} "
                          f"({exc.error_count()} problem(s) in all)") from None


def _policy_agents(policy: Any) -> list[str]:
    match policy:
        case CallTokenConfig():
            return [policy.controller, policy.expert]
        case SoloConfig():
            return [policy.agent]
        case ConfidenceConfig() | FixedIntervalConfig():
            return list(policy.agents)
        case RandomRouterConfig() | PerfectRouterConfig():
            return [policy.small, policy.large]
        case TruncateConfig():
            return [policy.initiator, policy.continuer]
        case SupervisorConfig():
            kind, _, agent = policy.supervisor.partition(":")
            return [*policy.workers, *([agent] if kind in ("judge", "score") else [])]
    raise ConfigError(f"unknown policy config {policy!r}")


def build_policy(cfg: Any, agents: dict[str, Agent]) -> Policy:
    """The policy object a config describes (``agents`` is needed by model supervisors)."""
    from relaygraph import policies as p

    match cfg:
        case CallTokenConfig():
            return p.CallTokenPolicy(cfg.controller, cfg.expert, cfg.max_call_tokens,
                                     cfg.max_calls, name=cfg.type)
        case SoloConfig():
            return p.SoloPolicy(cfg.agent)
        case ConfidenceConfig():
            return p.ConfidencePolicy(cfg.agents, cfg.threshold, cfg.metric, cfg.fallback_tokens,
                                      cfg.fallback_until, cfg.warmup, cfg.min_gap, cfg.max_handoffs)
        case FixedIntervalConfig():
            return p.FixedIntervalPolicy(cfg.agents, cfg.interval)
        case RandomRouterConfig():
            return p.QueryRouter.random(cfg.small, cfg.large, cfg.p, cfg.seed)
        case PerfectRouterConfig():
            return p.QueryRouter.perfect(load_solo_results(cfg.solo_results), cfg.small, cfg.large)
        case TruncateConfig():
            return p.TruncatePolicy(cfg.initiator, cfg.continuer, cfg.threshold, cfg.metric,
                                    cfg.cut_tokens, cfg.warmup)
        case SupervisorConfig():
            kind, _, agent = cfg.supervisor.partition(":")
            if kind == "judge":
                supervisor: Any = p.JudgeSupervisor(agents[agent])
            elif kind == "score":
                supervisor = p.ScoreSupervisor(agents[agent], cfg.score_threshold)
            else:
                supervisor = p.load_supervisor(cfg.supervisor)
            return p.SupervisorPolicy(supervisor, cfg.workers, cfg.chunk_tokens,
                                      tuple(cfg.chunk_stops))
    raise ConfigError(f"unknown policy config {cfg!r}")


def load_solo_results(path: Path) -> dict[str, bool]:
    """``{"question": bool}`` from a JSON object or JSONL rows with question and correct."""
    try:
        text = Path(path).read_text()
        if text.lstrip().startswith("{") and "\n{" not in text.strip():
            data = json.loads(text)
            return {str(k): bool(v) for k, v in data.items()}
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        return {r["question"]: bool(r["correct"]) for r in rows}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"solo results {path}: expected JSON {{question: bool}} or JSONL rows "
                          f"with question and correct ({exc})") from None
