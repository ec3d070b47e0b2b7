"""Models for experiments: each backend (local weights, a vLLM server) loaded once and
shared by every policy, relay and condition of an experiment, and cancellable (Ctrl-C stops
every generation at its next piece of text; see :mod:`.runner`)."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from relaygraph.agents.agent import MATH_SYSTEM_PROMPT
from relaygraph.agents.backend import Backend
from relaygraph.agents.registry import AgentConfig, BackendPool, parse_agent_config
from relaygraph.agents.wrapping import CancellableBackend, CancelScope

if TYPE_CHECKING:
    from relaygraph.config import RelayConfig
    from relaygraph.relay import Relay
    from relaygraph.trajectory.store import TrajectoryStore


class ModelPool(BackendPool):
    """Loads each backend once, cancellable through ``flag``; ``say`` hears what is loaded."""

    def __init__(self, flag: CancelScope | None = None,
                 say: Callable[[str], None] | None = None) -> None:
        self.flag = flag or CancelScope()
        super().__init__(wrap=lambda b: CancellableBackend(b, lambda: self.flag), say=say)
        self._relays: dict[tuple[Any, ...], Relay] = {}
        self._relay_lock = threading.RLock()

    def backend_for(self, model: str, dtype: str = "bfloat16") -> Backend:
        """Local weights of ``model`` (transformers)."""
        return self.backend(agent_config(model, dtype))

    def solo(self, name: str, cfg: AgentConfig, store: TrajectoryStore, max_tokens: int,
             seed: int | None = None) -> Relay:
        """One model alone as agent ``name`` (built once per setting; runs may give it a
        prefix to continue)."""
        from relaygraph.policies import SoloPolicy
        from relaygraph.relay import Relay

        key = (name, cfg.model_dump_json(), id(store), max_tokens, seed)
        with self._relay_lock:
            if key not in self._relays:
                agent = self.agent(name, cfg, seed)
                self._relays[key] = Relay([agent], SoloPolicy(agent=name), store, max_tokens)
            return self._relays[key]

    def relay(self, config: RelayConfig, store: TrajectoryStore) -> Relay:
        """The relay a config describes, on shared backends."""
        from relaygraph.relay import Relay

        return Relay.from_config(config, store, pool=self)


def label(model: str) -> str:
    """A short agent name for a model (its catalog name or folder name)."""
    tail = model.rstrip("/").rsplit("/", 1)[-1] or "model"
    return re.sub(r"[^A-Za-z0-9._-]", "_", tail)[:48]


def agent_config(model: str, dtype: str = "bfloat16", temperature: float = 0.0,
                 system_prompt: str | None = MATH_SYSTEM_PROMPT) -> AgentConfig:
    """A local-weights agent config of ``model``."""
    return parse_agent_config({"model": model, "dtype": dtype, "temperature": temperature,
                               "system_prompt": system_prompt})


__all__ = ["ModelPool", "agent_config", "label"]
