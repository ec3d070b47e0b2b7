"""The relays a server offers, by model name, loaded once and shared by every request.

A serve config names several relays; each is a :class:`~relaygraph.config.RelayConfig`
(agents, policy, max_tokens) plus two serving keys::

    redis = "redis://localhost:6379/0"        # optional (else --redis, $REDIS_URL, embedded)
    # or a [store] table: url, namespace, ttl (see relaygraph.config)

    [relays.relay-call-token]
    description = "0.5B controller, calls the 1.5B expert"
    system_message = "append"                 # append | override | reject
    max_tokens = 512
    [relays.relay-call-token.agents.controller]
    model = "qwen2.5-coder-0.5b"
    [relays.relay-call-token.agents.expert]
    model = "qwen2.5-coder-1.5b"
    [relays.relay-call-token.policy]
    type = "call-token"

A plain relay config (what ``relaygraph run --config`` reads) is served as one relay named
``relay-<policy type>``. Agents with the same model and dtype share one loaded backend
across all relays.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from relaygraph.agents.agent import Agent
from relaygraph.agents.backend import Backend, Prompt, Sampling, capabilities
from relaygraph.agents.registry import AgentConfig, BackendPool
from relaygraph.config import RelayConfig, read_config_file, validate
from relaygraph.errors import ConfigError
from relaygraph.policies.base import PolicyConfig
from relaygraph.policies.registry import trusted_fields
from relaygraph.serve.runner import cancellable
from relaygraph.serve.schemas import APIError, bad_request, validation_error
from relaygraph.trajectory.settings import HasStore

if TYPE_CHECKING:
    from relaygraph.relay import Relay
    from relaygraph.trajectory.store import TrajectoryStore

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}$")
SystemMessage = Literal["append", "override", "reject"]


class ServedRelayConfig(RelayConfig):
    """A relay config with what serving adds."""

    description: str = ""
    system_message: SystemMessage = "append"
    """What a request's system (or developer) message does: ``append`` it to each agent's
    system prompt (the relay's prompt stays first: it may carry a protocol, such as the
    call tool's instructions), ``override`` the agents' system prompts with it, or
    ``reject`` the request with a 400."""
    format_agent: str | None = None
    """The agent that writes the formatting turn of a ``response_format`` request when the
    relay's text is not the object already (default: the policy's last agent, e.g. the
    expert)."""

    @model_validator(mode="after")
    def _format_agent_exists(self) -> ServedRelayConfig:
        if self.format_agent is not None and self.format_agent not in self.agents:
            raise ValueError(f"format_agent {self.format_agent!r} is not in [agents] "
                             f"(have: {sorted(self.agents)})")
        return self

    def needed_agents(self) -> list[str]:
        names = super().needed_agents()
        if self.format_agent is not None and self.format_agent not in names:
            names.append(self.format_agent)
        return names

    @model_validator(mode="before")
    @classmethod
    def _redis_key(cls, data: Any) -> Any:
        if isinstance(data, dict) and ({"redis", "store"} & set(data)):
            raise ValueError("a served relay has no store of its own; set redis (or a [store] "
                             "table) at the top level of the serve config (or pass --redis)")
        return data


class ServeConfig(HasStore):
    """``relaygraph serve --config``: the served relays by name and the one store they share."""

    model_config = ConfigDict(extra="forbid")

    relays: dict[str, ServedRelayConfig] = Field(min_length=1)

    @field_validator("relays")
    @classmethod
    def _names(cls, relays: dict[str, ServedRelayConfig]) -> dict[str, ServedRelayConfig]:
        for name in relays:
            if not _NAME_RE.match(name):
                raise ValueError(f"relay name {name!r}: use 1-64 letters, digits and . _ : / -")
        return relays

    @classmethod
    def parse(cls, data: Any, source: str = "serve config") -> ServeConfig:
        if isinstance(data, dict) and "relays" not in data and (
                {"agents", "policy", "max_tokens"} & set(data)):
            plain = RelayConfig.parse(data, source=source)  # a `relaygraph run` config
            relay = {k: v for k, v in data.items() if k not in ("redis", "store")}
            data = {"relays": {f"relay-{plain.policy.type}": relay},
                    "store": plain.store.model_dump(exclude_unset=True)}
        return validate(cls, data, source)

    @classmethod
    def load(cls, path: str | Path) -> ServeConfig:
        return cls.parse(read_config_file(path), source=str(path))

    @classmethod
    def default(cls, controller: str | None = None, expert: str | None = None) -> ServeConfig:
        """The offline pair as ``relay-call-token`` (its controller, unless given, the
        trained relay controller) and ``relay-prompted-call``."""
        relays = {}
        for policy, text in (("call-token", "the controller calls the expert with "
                              "<call>n</call> (RelayLLM; needs a controller trained to call)"),
                             ("prompted-call", "the same, with the call tool explained in the "
                              "controller's system prompt")):
            relay = RelayConfig.from_options(controller, expert, policy)
            cfg = relay.model_dump(exclude={"store"})
            models = f"{relay.agents['controller'].model} + {relay.agents['expert'].model}"
            relays[f"relay-{policy}"] = {**cfg, "description": f"{models}: {text}"}
        return cls.parse({"relays": relays}, source="default serve config")

    def local_models(self) -> list[str]:
        """Every model that must be on this machine (served models need only their
        tokenizer, if that)."""
        models = [m for cfg in self.relays.values() for name in cfg.needed_agents()
                  if (m := cfg.agents[name].local_model)]
        return list(dict.fromkeys(models))


def _sampling(base: Sampling, temperature: float | None, top_p: float | None,
              seed: int | None) -> Sampling:
    return Sampling(base.temperature if temperature is None else temperature,
                    base.top_p if top_p is None else top_p,
                    base.seed if seed is None else seed)


@dataclasses.dataclass(frozen=True)
class Variant:
    """What a request may change about a relay."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    system: str | None = None
    policy: str = "{}"
    """JSON of the policy overrides (sorted keys)."""
    tools: str | None = None
    """Tool instructions appended to every agent's system prompt."""


class StoredVariant(BaseModel):
    """A served trajectory's recorded request changes (:class:`Variant`), validated as they
    are read back from the store: data only (policy overrides are checked again against
    the policy, and its trusted fields refused, by :meth:`ServedRelay.variant`)."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    system: str | None = None
    policy: dict[str, Any] | None = None
    tools: str | None = None


class ServedRelay:
    """One named relay: its config, its agents (on shared backends), and its variants."""

    def __init__(self, name: str, config: ServedRelayConfig, agents: dict[str, Agent],
                 store: TrajectoryStore, cache_size: int = 64) -> None:
        from relaygraph.relay import Relay

        self.name = name
        self.config = config
        self.agents = agents
        self.store = store
        self.created = int(time.time())
        policy = config.policy.build(agents)
        self.relay = Relay(list(agents.values()), policy, store, config.max_tokens,
                           record=self.record({}))
        self._variants: OrderedDict[Variant, Relay] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def format_agent(self, relay: Relay) -> Agent | None:
        """The agent (with the request's sampling) that writes formatting turns."""
        name = self.config.format_agent or relay.policy.agent_names()[-1]
        by_name = {a.name: a for a in relay.agents}
        return by_name.get(name) or self.agents.get(name)

    def record(self, variant: dict[str, Any]) -> dict[str, Any]:
        """What a trajectory records of the relay that ran it, so any replica serving the
        same relay can resume it: the relay's name and the request's changes (validated
        again, as a request's would be, when they are read back); and the relay's config,
        so ``relaygraph resume`` can rebuild it under the store's trust model
        (:func:`served_relay`)."""
        return {"serve": {"model": self.name, "variant": variant,
                          "relay": self._recorded}}

    @functools.cached_property
    def _recorded(self) -> dict[str, Any]:
        return self.config.model_dump(mode="json", exclude={"store"})

    def describe(self) -> dict[str, Any]:
        return {"policy": self.config.policy.type, "description": self.config.description,
                "agents": {n: a.backend.model_id for n, a in self.agents.items()},
                "max_tokens": self.config.max_tokens,
                "system_message": self.config.system_message}

    def variant(self, max_tokens: int | None = None, temperature: float | None = None,
                top_p: float | None = None, seed: int | None = None, system: str | None = None,
                policy: dict[str, Any] | None = None, tools: str | None = None) -> Relay:
        """The relay with a request's changes (built once per distinct change, cached);
        bad values are a 400 naming the parameter."""
        if max_tokens is not None and max_tokens > self.config.max_tokens:
            raise bad_request(f"max_tokens is {max_tokens}, but {self.name} generates at most "
                              f"{self.config.max_tokens} tokens", "max_tokens", "invalid_value")
        if system is not None and self.config.system_message == "reject":
            raise bad_request(f"{self.name} takes no system message (its system_message "
                              "setting is 'reject'); send the question as a user message",
                              "messages", "unsupported_system_message")
        try:
            key = Variant(max_tokens, temperature, top_p, seed, system,
                          json.dumps(policy or {}, sort_keys=True), tools)
        except (TypeError, ValueError):
            raise bad_request("relaygraph.policy must be a JSON object of policy fields",
                              "relaygraph.policy", "invalid_value") from None
        if key == Variant():
            return self.relay
        with self._lock:
            if key in self._variants:
                self._variants.move_to_end(key)
                return self._variants[key]
        relay = self._build(key, policy or {})
        with self._lock:
            self._variants[key] = relay
            while len(self._variants) > self._cache_size:
                self._variants.popitem(last=False)
        return relay

    def _build(self, key: Variant, overrides: dict[str, Any]) -> Relay:
        from relaygraph.relay import Relay

        policy_cfg = self._policy_config(overrides)
        names = list(dict.fromkeys(policy_cfg.required_agents()))
        if missing := [n for n in names if n not in self.agents]:
            raise bad_request(f"the policy would need agents {missing}, but {self.name} serves "
                              f"{sorted(self.agents)}", "relaygraph.policy", "invalid_value")
        agents = {}
        for n in names:
            base = self.agents[n]
            prompt = base.system_prompt
            if key.system is not None:
                prompt = (key.system if self.config.system_message == "override" or not prompt
                          else f"{prompt}\n\n{key.system}")
            if key.tools is not None:
                prompt = f"{prompt}\n\n{key.tools}" if prompt else key.tools
            agents[n] = dataclasses.replace(
                base, system_prompt=prompt,
                sampling=_sampling(base.sampling, key.temperature, key.top_p, key.seed))
        try:
            policy = policy_cfg.build(agents)
        except ConfigError as exc:
            raise bad_request(f"relaygraph.policy: {exc}", "relaygraph.policy",
                              "invalid_value") from None
        variant = {k: v for k, v in dataclasses.asdict(key).items()
                   if k != "policy" and v is not None}
        if overrides:
            variant["policy"] = overrides
        return Relay(list(agents.values()), policy, self.store,
                     key.max_tokens or self.config.max_tokens, record=self.record(variant))

    def _policy_config(self, overrides: dict[str, Any]) -> PolicyConfig:
        if not overrides:
            return self.config.policy
        for field in sorted(trusted_fields()):
            if field in overrides:
                raise bad_request(f"relaygraph.policy.{field} cannot be set per request; "
                                  "serve another relay for that", f"relaygraph.policy.{field}",
                                  "invalid_value")
        cls = type(self.config.policy)
        try:
            return cls.model_validate({**self.config.policy.model_dump(exclude_unset=True),
                                       **overrides})
        except ValidationError as exc:
            raise validation_error(exc, "relaygraph.policy.") from None

    def prompt_tokens(self, relay: Relay, question: str) -> tuple[int, int | None]:
        """Tokens of the primary agent's rendered prompt, and the least room any agent has
        left in its context window (None when a backend cannot say)."""
        counted = 0
        room: int | None = None
        for agent in relay.agents:
            if not capabilities(agent.backend).token_ids:  # a chat API renders its own prompt
                continue
            n = len(agent.backend.render(Prompt(question, agent.system_prompt)))
            if agent.name == relay.policy.primary:
                counted = n
            limit = getattr(agent.backend, "max_context", None)
            if isinstance(limit, int):
                room = limit - n if room is None else min(room, limit - n)
        return counted, room


class Registry:
    """The served relays by model name, and the backends they share."""

    def __init__(self, relays: dict[str, ServedRelay], backends: dict[tuple[Any, ...], Any],
                 store: TrajectoryStore | None = None):
        self.relays = relays
        self.backends = backends
        self.store = store if store is not None else next(
            (r.store for r in relays.values()), None)

    @classmethod
    def build(cls, config: ServeConfig, store: TrajectoryStore,
              backend_factory: Callable[[AgentConfig], Backend] | None = None) -> Registry:
        """Load every model once (agents with equal :meth:`AgentConfig.key` share it;
        ``backend_factory(config)`` replaces :meth:`AgentConfig.build`) and build each relay
        on the shared, cancellable backends."""
        pool = BackendPool(wrap=cancellable, build=backend_factory)
        relays = {}
        for name, cfg in config.relays.items():
            agents = pool.agents(cfg.agents, cfg.needed_agents())
            relays[name] = ServedRelay(name, cfg, agents, store)
        return cls(relays, pool.backends, store)

    def for_trajectory(self, config: dict[str, Any], trajectory_id: str) -> Relay:
        """The relay (and request variant) that ran a served trajectory, from what it
        recorded (:meth:`ServedRelay.record`): a 400 if it was not served or records a
        request this server would refuse, a 404 if this server does not serve that relay."""
        served = config.get("serve")
        if not isinstance(served, dict) or not isinstance(served.get("model"), str):
            raise bad_request(f"trajectory {trajectory_id} was not run by relaygraph serve; "
                              f"resume it with `relaygraph resume {trajectory_id}`", None,
                              "not_served")
        entry = self.get(served["model"])
        try:
            variant = StoredVariant.model_validate(served.get("variant") or {})
        except ValidationError:
            raise bad_request(f"trajectory {trajectory_id} records a request this server "
                              "cannot repeat", None, "invalid_value") from None
        return entry.variant(**variant.model_dump(exclude_none=True))

    def get(self, model: str) -> ServedRelay:
        relay = self.relays.get(model)
        if relay is None:
            raise APIError(404, f"The model `{model}` does not exist; this server offers: "
                           f"{', '.join(self.relays)} (GET /v1/models)", "invalid_request_error",
                           "model", "model_not_found")
        return relay



def served_relay(trajectory_id: str, store: TrajectoryStore,
                 config: ServeConfig | RelayConfig | str | Path | None = None,
                 trust_stored: bool = False,
                 backend_factory: Callable[[AgentConfig], Backend] | None = None) -> Relay:
    """The relay (with its request's changes) that ran a trajectory of ``relaygraph
    serve``, rebuilt to resume it (``.resume(trajectory_id)``), under the store's trust
    model (:meth:`RelayConfig.for_resume`): ``config`` is your serve config (the relay of
    the recorded name is loaded, nothing else) or that relay's own config; without it the
    relay config the server recorded is used only if it names catalog models and no
    endpoint, credential variable, code or file — or if ``trust_stored`` confirms it."""
    task = store.load(trajectory_id).task
    served = task.config.get("serve")
    if not isinstance(served, dict) or not isinstance(served.get("model"), str):
        raise ConfigError(f"trajectory {trajectory_id} was not run by relaygraph serve; "
                          "Relay.from_trajectory(id, store) rebuilds its relay")
    name = served["model"]
    if config is not None and not isinstance(config, (ServeConfig, RelayConfig)):
        config = ServeConfig.load(config)
    given: ServedRelayConfig | None = None
    if isinstance(config, ServeConfig):
        if name not in config.relays:
            raise ConfigError(f"trajectory {trajectory_id} was served by relay {name!r}; the "
                              f"serve config given has {sorted(config.relays)}")
        given = config.relays[name]
    elif isinstance(config, ServedRelayConfig):
        given = config
    elif isinstance(config, RelayConfig):
        given = validate(ServedRelayConfig, config.model_dump(mode="json", exclude={"store"}),
                         f"relay {name}")
    recorded = {"relay": served["relay"]} if isinstance(served.get("relay"), dict) else {}
    relay_config = ServedRelayConfig.for_resume(task.model_copy(update={"config": recorded}),
                                                trajectory_id, given, trust_stored)
    assert isinstance(relay_config, ServedRelayConfig)
    registry = Registry.build(ServeConfig(relays={name: relay_config}), store, backend_factory)
    try:
        return registry.for_trajectory(task.config, trajectory_id)
    except APIError as exc:
        raise ConfigError(f"trajectory {trajectory_id}: {exc.message}") from None
