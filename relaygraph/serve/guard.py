"""Who may drive the server from a browser: the ``Host`` and ``Origin`` checks.

A local server without an API key is open to every page the operator's browser loads: a
page can POST to ``http://127.0.0.1:8000`` (a "simple" cross-origin request needs no
preflight), and a DNS-rebinding page reaches it under its own name. So every request must
name this server in ``Host`` — the address the connection came in on (and ``localhost``
on a loopback address), or a name in ``allowed_hosts`` — and a request that carries an
``Origin`` (browsers send one on cross-origin requests and on POSTs) must come from that
same origin. Clients that are not browsers (the ``openai`` SDK, curl) send no ``Origin``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from relaygraph.serve.schemas import APIError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _hostname(netloc: str) -> str | None:
    """The host part of a ``Host`` header or an origin's netloc (lower case, no brackets)."""
    try:
        return urlsplit(f"//{netloc}").hostname
    except ValueError:
        return None


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


class HostGuard:
    """ASGI middleware: refuse (403) requests for another host or from another origin."""

    def __init__(self, app: Any, allowed_hosts: Sequence[str] = ()) -> None:
        self.app = app
        self.allowed_hosts = {h.strip().lower().strip("[]") for h in allowed_hosts if h.strip()}

    def allowed(self, local: str | None) -> set[str]:
        names = set(self.allowed_hosts)
        if local:
            names.add(local.lower())
            if _is_loopback(local):
                names.update(LOOPBACK_NAMES)
        return names

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        server = scope.get("server")
        allowed = self.allowed(server[0] if server else None)
        host_header = headers.get("host", "")
        host = _hostname(host_header)
        error = None
        if "*" not in self.allowed_hosts and (host is None or host not in allowed):
            error = APIError(403, f"This server does not answer for the host {host_header[:100]!r}; "
                             "use its address, or start it with --allowed-host NAME",
                             "invalid_request_error", code="host_not_allowed")
        origin = headers.get("origin")
        if error is None and origin is not None:
            parts = urlsplit(origin) if origin != "null" else None
            same = parts is not None and parts.netloc.lower() == host_header.lower()
            listed = parts is not None and parts.hostname in self.allowed_hosts
            if not (same or listed):
                error = APIError(403, "Cross-origin requests are refused (the request's Origin "
                                 "is not this server); call the API from a program, not from "
                                 "a web page", "invalid_request_error", code="origin_not_allowed")
        if error is None:
            await self.app(scope, receive, send)
            return
        response = JSONResponse(error.body(), status_code=error.status)
        await response(scope, receive, send)
