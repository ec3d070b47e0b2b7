"""Models for experiments: each backend (local weights, a vLLM server) loaded once and
shared by every policy, relay and condition of an experiment, and made interruptible
(see :mod:`.runner`)."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from relaygraph.agents.agent import MATH_SYSTEM_PROMPT, Agent
from relaygraph.agents.backend import Sampling
from relaygraph.eval.runner import StopFlag, interruptible

if TYPE_CHECKING:
    from relaygraph.config import AgentConfig, RelayConfig
    from relaygraph.relay import Relay
    from relaygraph.trajectory.store import TrajectoryStore


class ModelPool:
    """Loads each backend once; ``say`` hears what is being loaded."""

    def __init__(self, flag: StopFlag | None = None,
                 say: Callable[[str], None] | None = None) -> None:
        self.flag = flag or StopFlag()
        self.say = say or (lambda line: None)
        self._loaded: dict[tuple[Any, ...], Any] = {}
        self._relays: dict[tuple[Any, ...], Relay] = {}
        self._lock = threading.RLock()

    def backend_for(self, cfg: AgentConfig) -> Any:
        """The backend an agent config names (local weights, a vLLM server, ...), shared by
        every config with the same :meth:`~relaygraph.config.AgentConfig.backend_key`."""
        key = cfg.backend_key()
        with self._lock:
            if key not in self._loaded:
                self.say(f"loading {cfg.model} ({cfg.backend}, {cfg.dtype})")
                self._loaded[key] = interruptible(cfg.build_backend(), self.flag)
            return self._loaded[key]

    def backend(self, model: str, dtype: str = "bfloat16") -> Any:
        """Local weights of ``model`` (transformers)."""
        return self.backend_for(agent_config(model, dtype))

    def agent(self, name: str, cfg: AgentConfig, seed: int | None = None) -> Agent:
        """An agent named ``name`` on the shared backend of ``cfg``; ``seed`` overrides
        the sampling seed (one per sample)."""
        return Agent(name, self.backend_for(cfg), cfg.system_prompt,
                     Sampling(cfg.temperature, cfg.top_p, cfg.seed if seed is None else seed))

    def solo(self, name: str, cfg: AgentConfig, store: TrajectoryStore, max_tokens: int,
             seed: int | None = None) -> Relay:
        """One model alone as agent ``name`` (built once per setting; runs may give it a
        prefix to continue)."""
        from relaygraph.policies import SoloPolicy
        from relaygraph.relay import Relay

        key = (name, cfg.model_dump_json(), id(store), max_tokens, seed)
        with self._lock:
            if key not in self._relays:
                agent = self.agent(name, cfg, seed)
                self._relays[key] = Relay([agent], SoloPolicy(name), store, max_tokens)
            return self._relays[key]

    def relay(self, config: RelayConfig, store: TrajectoryStore) -> Relay:
        """The relay a config describes, on shared backends."""
        from relaygraph.config import build_policy
        from relaygraph.relay import Relay

        agents = {name: self.agent(name, config.agents[name]) for name in config.needed_agents()}
        return Relay(list(agents.values()), build_policy(config.policy, agents), store,
                     config.max_tokens, config=config, fallbacks=config.fallbacks)


def label(model: str) -> str:
    """A short agent name for a model (its catalog name or folder name)."""
    tail = model.rstrip("/").rsplit("/", 1)[-1] or "model"
    return re.sub(r"[^A-Za-z0-9._-]", "_", tail)[:48]


def agent_config(model: str, dtype: str = "bfloat16", temperature: float = 0.0,
                 system_prompt: str | None = MATH_SYSTEM_PROMPT) -> AgentConfig:
    from relaygraph.config import AgentConfig

    return AgentConfig(model=model, dtype=dtype, temperature=temperature,  # type: ignore[arg-type]
                       system_prompt=system_prompt)
