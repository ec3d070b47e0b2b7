"""Backends that wrap another backend: one base that forwards everything, and the one way
a generation is cancelled (a served request that went away, Ctrl-C in an experiment)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from relaygraph.agents.backend import (
    Backend,
    Capabilities,
    Generation,
    Prompt,
    Sampling,
    ScoringBackend,
    StopRule,
    TextCallback,
    capabilities,
    provider_name,
)
from relaygraph.errors import Cancelled, ConfigError


class BackendWrapper:
    """Forwards every :class:`Backend` call to ``inner``; subclasses intercept ``generate``."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    @property
    def tokenizer_id(self) -> str:
        return self.inner.tokenizer_id

    @property
    def max_context(self) -> int:
        return self.inner.max_context

    @property
    def provider_name(self) -> str:
        """The wrapped backend's provider (for traces)."""
        return provider_name(self.inner)

    @property
    def capabilities(self) -> Capabilities:
        return capabilities(self.inner)

    def generate(self, prompt: Prompt, rule: StopRule, sampling: Sampling = Sampling(),
                 on_text: TextCallback | None = None, cache_key: str | None = None) -> Generation:
        return self.inner.generate(prompt, rule, sampling, on_text, cache_key)

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.inner.decode(token_ids)

    def render(self, prompt: Prompt) -> list[int]:
        return self.inner.render(prompt)

    def drop_cache(self, cache_key: str) -> None:
        self.inner.drop_cache(cache_key)

    def close(self) -> None:
        self.inner.close()

    def next_token_logprobs(self, prompt: Prompt, candidates: Sequence[str]) -> dict[str, float]:
        if not isinstance(self.inner, ScoringBackend):
            raise ConfigError(f"{self.model_id}: this backend cannot score tokens")
        return self.inner.next_token_logprobs(prompt, candidates)


class CancelScope:
    """A cancellation flag (with its reason) that generations check at every piece of text,
    and the KV-cache keys they used (so a server can drop them after the run)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""
        self.cache_keys: set[tuple[Backend, str]] = set()

    def cancel(self, reason: str = "cancelled") -> None:
        if not self._event.is_set():
            self.reason = reason
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """Raise :class:`~relaygraph.errors.Cancelled` once cancelled."""
        if self._event.is_set():
            raise Cancelled(self.reason)


class CancellableBackend(BackendWrapper):
    """Generations that stop with :class:`~relaygraph.errors.Cancelled` (not retried) once the
    current scope is cancelled: checked before a generation starts and at each new piece of
    text. ``scope()`` returns the scope of the calling run (None: not cancellable)."""

    def __init__(self, inner: Backend, scope: Callable[[], CancelScope | None]) -> None:
        super().__init__(inner)
        self.scope = scope

    def generate(self, prompt: Prompt, rule: StopRule, sampling: Sampling = Sampling(),
                 on_text: TextCallback | None = None, cache_key: str | None = None) -> Generation:
        scope = self.scope()
        if scope is None:
            return self.inner.generate(prompt, rule, sampling, on_text, cache_key)
        scope.check()
        if cache_key is not None:
            scope.cache_keys.add((self.inner, cache_key))

        def checked(text: str) -> None:
            scope.check()
            if on_text is not None:
                on_text(text)

        generation = self.inner.generate(prompt, rule, sampling, checked, cache_key)
        scope.check()
        return generation


def unwrap(backend: Any) -> Any:
    """The innermost backend under any wrappers."""
    while isinstance(backend, BackendWrapper):
        backend = backend.inner
    return backend
