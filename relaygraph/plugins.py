"""Registries of pluggable parts (policies, backends), in the manner of vLLM's ``ModelRegistry``.

A registry maps a name (a policy's ``type``, a backend's ``backend``) to a class. Built-in
entries are named as ``"module:attribute"`` and imported on first use, so listing names
imports nothing heavy; :meth:`Registry.register` adds a class at run time; installed
packages add theirs through an entry-point group (``relaygraph.policies``,
``relaygraph.backends``) whose entries are read the first time a name is not found::

    [project.entry-points."relaygraph.policies"]
    my-policy = "my_package.policy:MyPolicy"
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from relaygraph.errors import ConfigError

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Names -> classes; ``key`` reads a class's name (e.g. the default of its ``type``)."""

    def __init__(self, what: str, key: Callable[[T], str], builtins: dict[str, str],
                 group: str) -> None:
        self.what = what
        self.group = group
        self._key = key
        self._lazy = dict(builtins)
        self._order = list(builtins)
        self._classes: dict[str, T] = {}
        self._plugins_read = False
        self._lock = threading.RLock()

    def register(self, cls: T) -> T:
        """Add ``cls`` under its name (usable as a class decorator); a name already taken by
        another class is an error."""
        name = self._key(cls)
        with self._lock:
            known = self._classes.get(name)
            if known is not None and known is not cls:
                raise ConfigError(f"{self.what} {name!r} is already registered "
                                  f"({known.__module__}.{known.__qualname__})")
            self._lazy.pop(name, None)
            self._classes[name] = cls
            if name not in self._order:
                self._order.append(name)
        return cls

    def get(self, name: str) -> T:
        """The class registered as ``name``; a ConfigError listing the known names if none."""
        with self._lock:
            if name in self._classes:
                return self._classes[name]
            if name not in self._lazy:
                self._read_plugins()
            if name in self._lazy:
                module, _, attr = self._lazy[name].partition(":")
                cls = getattr(importlib.import_module(module), attr)  # may register itself
                self._lazy.pop(name, None)
                self._classes.setdefault(name, cls)
                return self._classes[name]
        raise ConfigError(f"unknown {self.what} {name!r}; choose one of: {', '.join(self.names())}")

    def names(self) -> list[str]:
        """Every registered name: built-ins first, in registration order."""
        with self._lock:
            self._read_plugins()
            return list(self._order)

    def classes(self) -> list[T]:
        return [self.get(name) for name in self.names()]

    def _read_plugins(self) -> None:
        if self._plugins_read:
            return
        self._plugins_read = True
        for ep in entry_points(group=self.group):
            if ep.name not in self._classes and ep.name not in self._lazy:
                self._lazy[ep.name] = ep.value
                self._order.append(ep.name)
