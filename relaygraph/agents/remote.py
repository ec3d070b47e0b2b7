"""What the backends of remote servers share: their URLs (validated, shown without
credentials), their errors, and the config fields of a server (``base_url``,
``api_key_env``)."""

from __future__ import annotations

import os
from typing import ClassVar
from urllib.parse import urlsplit, urlunsplit

from pydantic import model_validator

from relaygraph.agents.registry import AgentConfig
from relaygraph.errors import BackendError, ConfigError


class ServerUnavailableError(BackendError):
    """The model server cannot be reached (refused, unknown host, timed out)."""


class ServerResponseError(BackendError):
    """The model server answered with an error or something that is not a completion."""


def split_url(base_url: str) -> tuple[str, tuple[str, str] | None]:
    """``(url without credentials, (user, password) or None)``; a ConfigError for a URL
    that is not http(s). The returned URL ends without ``/v1`` and is safe to show."""
    parts = urlsplit(base_url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"base_url {redact_base_url(base_url)!r} is not an http(s) URL; give the "
                          "server's address, e.g. http://localhost:8000/v1")
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        raise ConfigError(f"base_url {redact_base_url(base_url)!r} has an invalid port") from None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[:-3]
    auth = (parts.username or "", parts.password or "") if parts.username or parts.password else None
    return urlunsplit((parts.scheme, host + port, path, "", "")), auth


def redact_base_url(url: str) -> str:
    """``url`` without user, password or query (for messages)."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        return "<invalid URL>"


class RemoteConfig(AgentConfig):
    """The fields every server's agent config has: ``base_url`` (never with credentials:
    configs are stored with each trajectory) and ``api_key_env``, the environment variable
    holding the key."""

    base_url: str
    api_key_env: str | None = None
    trusted_fields: ClassVar[frozenset[str]] = frozenset({"base_url", "api_key_env", "tokenizer"})
    """Where requests go, which variable's value they carry, where a tokenizer loads from."""

    @model_validator(mode="after")
    def _no_credentials(self) -> RemoteConfig:
        try:
            _, auth = split_url(self.base_url)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        if auth is not None:
            raise ValueError("base_url must not contain credentials (configs are stored "
                             "with each trajectory); put the API key in an environment "
                             "variable and name it in api_key_env")
        return self

    def api_key(self) -> str | None:
        """The key from the variable ``api_key_env`` names (None when it names none)."""
        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ConfigError(f"api_key_env names ${self.api_key_env}, which is not set")
        return key

    def describe(self) -> str:
        return f"{self.model} (served at {redact_base_url(self.base_url)})"
