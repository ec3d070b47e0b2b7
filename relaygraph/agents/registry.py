"""Agent configs, one model per backend kind, in a registry; and a pool that loads each
backend once.

An agent config is flat (what a config file's ``[agents.NAME]`` table holds): the fields
every agent has (``model``, ``system_prompt``, sampling) plus its backend's own. The
``backend`` field picks the class: ``transformers`` (the default), ``openai`` (implied by
``base_url``), ``vllm``, ``chat`` (any chat-completions API), or one added with
:func:`register_backend` or the ``relaygraph.backends`` entry-point group.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from relaygraph.agents.agent import MATH_SYSTEM_PROMPT, Agent
from relaygraph.agents.backend import Backend, Sampling
from relaygraph.errors import ConfigError, NestedError, nested_error
from relaygraph.plugins import Registry
from relaygraph.trajectory.models import Price


class AgentConfig(BaseModel):
    """One agent: its model, the backend that runs it, how it is prompted and sampled.

    Subclasses (one per backend kind) add the backend's fields and implement :meth:`key`
    and :meth:`build`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: str
    model: str
    """Catalog name, local folder, ``.gguf`` file or hub id (or a server's model name)."""
    system_prompt: str | None = MATH_SYSTEM_PROMPT
    chat_template_kwargs: dict[str, Any] = {}
    """Passed to the model's chat template, e.g. ``{enable_thinking = false}`` renders Qwen3
    in non-thinking mode (as the RelayLLM paper ran it)."""
    temperature: float = Field(0.0, ge=0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    price_per_million_input_tokens: float | None = Field(None, ge=0, allow_inf_nan=False)
    """What a million prompt tokens of this agent cost (optional; any currency)."""
    price_per_million_output_tokens: float | None = Field(None, ge=0, allow_inf_nan=False)
    """What a million generated tokens of this agent cost (optional)."""

    trusted_fields: ClassVar[frozenset[str] | None] = None
    """The backend's fields that name endpoints, credential variables, code or files: a
    stored trajectory's config is never trusted with them (``relaygraph resume`` wants them
    from the user's config, or confirmed). None (a plugin that does not say): every field
    the backend adds."""

    def untrusted(self) -> dict[str, Any]:
        """What this config names that a stored trajectory may not: the set
        :attr:`trusted_fields`, and the model unless it is a catalog name (a path or a hub
        id is a place to load from). Empty: the store may rebuild this agent as it is."""
        from relaygraph.agents.catalog import CATALOG

        fields = self.trusted_fields
        if fields is None:
            fields = frozenset(type(self).model_fields) - frozenset(AgentConfig.model_fields)
        named = {f: getattr(self, f) for f in sorted(fields)
                 if getattr(self, f, None) not in (None, "", {}, [], ())}
        if self.model not in CATALOG:
            named = {"model": self.model, **named}
        return named

    def key(self) -> tuple[Any, ...]:
        """Agents whose configs have equal keys share one backend (one copy of the weights,
        one connection pool)."""
        raise NotImplementedError

    def build(self) -> Backend:
        """Load (or connect to) the model this config names."""
        raise NotImplementedError

    @property
    def local_model(self) -> str | None:
        """What must be on this machine (pulled first if it is a catalog model)."""
        return self.model

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_p, self.seed)

    @property
    def price(self) -> Price | None:
        """The agent's price per million tokens, when either price is set."""
        if self.price_per_million_input_tokens is None and self.price_per_million_output_tokens is None:
            return None
        return Price(input=self.price_per_million_input_tokens or 0.0,
                     output=self.price_per_million_output_tokens or 0.0)

    def describe(self) -> str:
        """A few words for progress lines: ``qwen2.5-coder-0.5b (transformers)``."""
        return f"{self.model} ({self.backend})"


C = TypeVar("C", bound=type[AgentConfig])

BACKENDS: Registry[type[AgentConfig]] = Registry(
    "backend",
    key=lambda cls: str(cls.model_fields["backend"].default),
    builtins={
        "transformers": "relaygraph.agents.transformers_backend:TransformersConfig",
        "openai": "relaygraph.agents.openai_backend:OpenAIServerConfig",
        "vllm": "relaygraph.agents.vllm_backend:VLLMConfig",
        "chat": "relaygraph.agents.chat_backend:ChatConfig",
    },
    group="relaygraph.backends",
)


def register_backend(cls: C) -> C:
    """Make an :class:`AgentConfig` subclass usable by its ``backend`` name in configs
    (a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, AgentConfig)):
        raise ConfigError(f"register_backend takes an AgentConfig subclass, not {cls!r}")
    BACKENDS.register(cls)
    return cls


def parse_agent_config(data: Any) -> AgentConfig:
    """The agent config a ``[agents.NAME]`` mapping describes (or the instance given); a
    ValueError naming the bad field otherwise."""
    if isinstance(data, AgentConfig):
        return data
    if not isinstance(data, Mapping):
        raise ValueError("expected a table with at least a model")
    kind = data.get("backend") or ("openai" if data.get("base_url") else "transformers")
    if not isinstance(kind, str):
        raise ValueError("backend: expected a backend name")
    try:
        cls = BACKENDS.get(kind)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    try:
        return cls.model_validate({**data, "backend": kind})
    except ValidationError as exc:
        first = exc.errors()[0]
        field = first["loc"][0] if first["loc"] else None
        if first["type"] == "extra_forbidden" and isinstance(field, str):
            owners = [n for n in BACKENDS.names() if field in BACKENDS.get(n).model_fields]
            if owners:
                raise NestedError((field,), f"is for backend {' or '.join(map(repr, owners))}, "
                                  f"not {kind!r}") from None
        raise nested_error(exc) from None


def parse_agent_configs(agents: Any) -> Any:
    """``{name: config}`` with each config parsed by :func:`parse_agent_config` (for a
    pydantic ``mode="before"`` validator; anything but a mapping is left to pydantic)."""
    if not isinstance(agents, Mapping):
        return agents
    parsed = {}
    for name, data in agents.items():
        try:
            parsed[name] = parse_agent_config(data)
        except NestedError as exc:
            raise NestedError((name, *exc.loc), exc.message) from None
        except ValueError as exc:
            raise NestedError((name,), str(exc)) from None
    return parsed


class BackendPool:
    """Loads each backend once: agents whose configs have equal :meth:`AgentConfig.key`
    share it. ``build`` loads one (default: :meth:`AgentConfig.build`); ``wrap`` is applied
    to each backend as it is loaded (e.g. to make it cancellable); ``say`` hears what is
    being loaded."""

    def __init__(self, wrap: Callable[[Backend], Backend] | None = None,
                 say: Callable[[str], None] | None = None,
                 build: Callable[[AgentConfig], Backend] | None = None) -> None:
        self.wrap = wrap
        self.say = say or (lambda line: None)
        self.build = build or (lambda cfg: cfg.build())
        self.backends: dict[tuple[Any, ...], Backend] = {}
        self._lock = threading.RLock()

    def backend(self, cfg: AgentConfig) -> Backend:
        key = cfg.key()
        with self._lock:
            if key not in self.backends:
                self.say(f"loading {cfg.describe()}")
                built = self.build(cfg)
                self.backends[key] = self.wrap(built) if self.wrap is not None else built
            return self.backends[key]

    def agent(self, name: str, cfg: AgentConfig, seed: int | None = None) -> Agent:
        """Agent ``name`` on the shared backend of ``cfg``; ``seed`` overrides the sampling
        seed (one per sample)."""
        sampling = cfg.sampling if seed is None else Sampling(cfg.temperature, cfg.top_p, seed)
        return Agent(name, self.backend(cfg), cfg.system_prompt, sampling,
                     dict(cfg.chat_template_kwargs), cfg.price)

    def agents(self, configs: Mapping[str, AgentConfig], names: Sequence[str]) -> dict[str, Agent]:
        return {name: self.agent(name, configs[name]) for name in names}

    def close(self) -> None:
        with self._lock:
            for backend in self.backends.values():
                backend.close()
            self.backends.clear()
