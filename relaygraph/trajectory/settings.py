"""Where trajectories are stored: the ``[store]`` table of a config, and durations."""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from relaygraph.errors import ConfigError
from relaygraph.trajectory.connect import OnRetry, parse_target, redact_url
from relaygraph.trajectory.models import check_namespace

if TYPE_CHECKING:
    from relaygraph.trajectory.redis_store import RedisStore

DEFAULT_NAMESPACE = "relaygraph"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", re.IGNORECASE)


def parse_duration(value: Any, what: str = "duration") -> float | None:
    """Seconds from ``90``, ``"90s"``, ``"30m"``, ``"12h"``, ``"7d"``, ``"2w"``; ``0``,
    ``"0"``, ``"none"`` and ``None`` mean no limit (None)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a duration such as 7d, 12h, 30m or 90 (seconds)")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        if text in ("none", "off", "never", ""):
            return None
        match = _DURATION.fullmatch(text)
        if not match:
            raise ConfigError(f"{what}: {value!r} is not a duration; use e.g. 7d, 12h, 30m, "
                              "90s or 90 (seconds), or none")
        seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if seconds < 0 or seconds != seconds:
        raise ConfigError(f"{what}: must be >= 0, got {value!r}")
    return seconds or None


def format_duration(seconds: float | None) -> str:
    """``7d``, ``12h``, ``90s``... (``none`` for no limit)."""
    if not seconds:
        return "none"
    for unit in ("w", "d", "h", "m"):
        if seconds % _UNITS[unit] == 0:
            return f"{int(seconds // _UNITS[unit])}{unit}"
    return f"{seconds:g}s"


class StoreConfig(BaseModel):
    """The trajectory store: ``url`` (else ``$REDIS_URL``, else the embedded server), the
    key ``namespace`` (tenants, experiments) and the ``ttl`` of new trajectories (seconds
    after their last activity; none: kept until pruned)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str | None = None
    namespace: str = DEFAULT_NAMESPACE
    ttl: float | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, url: str | None) -> str | None:
        if url:
            try:
                parse_target(url)
            except Exception as exc:  # noqa: BLE001 - StoreUnavailableError, as a field error
                raise ValueError(str(exc)) from None
        return url or None

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, namespace: str) -> str:
        try:
            return check_namespace(namespace)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("ttl", mode="before")
    @classmethod
    def _ttl(cls, ttl: Any) -> float | None:
        try:
            return parse_duration(ttl, "ttl")
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    def __repr_args__(self) -> Any:  # the URL's password never reaches a repr or a log
        for name, value in super().__repr_args__():
            yield name, (redact_url(value) if name == "url" and value else value)

    def override(self, url: str | None = None, namespace: str | None = None,
                 ttl: Any = None) -> StoreConfig:
        """This config with the options that were given (command-line flags)."""
        data = self.model_dump(exclude_unset=True)
        if url:
            data["url"] = url
        if namespace is not None:
            data["namespace"] = namespace
        if ttl is not None:
            data["ttl"] = ttl
        try:
            return StoreConfig.model_validate(data)
        except ValidationError as exc:
            message = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
            raise ConfigError(f"store: {message}") from None

    def open(self, retries: int = 8, on_retry: OnRetry | None = None) -> RedisStore:
        return open_store(self.url, self.namespace, retries, self.ttl, on_retry)


class HasStore(BaseModel):
    """A config that names where its trajectories go: a ``[store]`` table, or ``redis =
    "url"`` at the top (the older spelling, read as ``store.url``)."""

    store: StoreConfig = StoreConfig()
    """Where trajectories go (``redis = "url"`` is read as ``store.url``)."""

    @model_validator(mode="before")
    @classmethod
    def _redis_key(cls, data: Any) -> Any:
        return fold_redis_key(data)

    @property
    def redis(self) -> str | None:
        """The store's URL (None: ``$REDIS_URL``, else the embedded server)."""
        return self.store.url


def fold_redis_key(data: Any) -> Any:
    """A config's ``redis = "url"`` (the older spelling) as ``store.url``."""
    if not isinstance(data, dict) or "redis" not in data:
        return data
    data = dict(data)
    url = data.pop("redis")
    if url is None:
        return data
    store = data.get("store")
    if isinstance(store, StoreConfig):
        store = store.model_dump(exclude_unset=True)
    store = dict(store or {})
    if store.get("url") and store["url"] != url:
        raise ValueError("redis and store.url both name a store; keep one (store.url)")
    data["store"] = {**store, "url": url}
    return data


def open_store(url: str | None = None, namespace: str = "relaygraph", retries: int = 8,
               ttl: float | None = None, on_retry: OnRetry | None = None) -> RedisStore:
    """Connect to ``url``, else ``$REDIS_URL``, else the per-user embedded Valkey server.

    ``url`` may name one server (``redis://``, ``rediss://``, ``unix://``; a Cluster node is
    detected), a Cluster (``redis+cluster://h1:p1,h2:p2``) or a Sentinel service
    (``redis+sentinel://h1:26379,h2:26379/SERVICE``). ``namespace`` prefixes every key;
    ``ttl`` (seconds) makes new trajectories expire that long after their last activity;
    ``on_retry(error, attempt, retries)`` hears of each retried command (a status line).
    """
    url = url or os.environ.get("REDIS_URL")
    if not url:
        from relaygraph.trajectory.embedded import embedded_url

        url = embedded_url()
    from relaygraph.trajectory.redis_store import RedisStore

    return RedisStore.from_url(url, namespace, retries=retries, ttl=ttl, on_retry=on_retry)
