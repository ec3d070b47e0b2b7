"""Running the app: ``serve`` (what ``relaygraph serve`` calls) and ``BackgroundServer``
(uvicorn on a thread, for tests, benchmarks and embedding)."""

from __future__ import annotations

import copy
import errno
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from relaygraph.errors import ConfigError
from relaygraph.serve.app import ServeSettings, create_app
from relaygraph.serve.registry import Registry, ServeConfig

SERVE_TTL = 7 * 86400.0
"""Trajectories a server creates expire a week after their last activity, unless the
config's ``[store] ttl`` or ``--ttl`` says otherwise (``none``: kept until pruned)."""


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000,
          redis: str | None = None, settings: ServeSettings | None = None,
          announce: Callable[[str], None] = print, log_level: str = "info",
          namespace: str | None = None, ttl: str | float | None = None,
          forwarded_allow_ips: str | None = None) -> None:
    """Load every relay's models, then serve until interrupted (Ctrl-C / SIGTERM).
    ``redis``, ``namespace`` and ``ttl`` override the config's ``[store]``.
    ``forwarded_allow_ips``: proxies (comma-separated addresses, ``*``: any) whose
    ``X-Forwarded-For``/``-Proto`` are believed; without it the access log shows the
    connecting address, whatever a client's headers say."""
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    from relaygraph.trajectory.settings import format_duration

    check_listen(host, port)  # before loading anything, and before saying where we serve
    settings = settings or ServeSettings()
    if ttl is None and "ttl" not in config.store.model_fields_set:
        ttl = SERVE_TTL
    store_config = config.store.override(redis, namespace, ttl)
    store = store_config.open()
    announce(f"loading models: {', '.join(config.local_models())}")
    registry = Registry.build(config, store)
    app = create_app(registry, settings)
    log_config = copy.deepcopy(LOGGING_CONFIG)
    log_config["loggers"]["relaygraph.serve"] = {"handlers": ["default"], "level": "INFO",
                                                 "propagate": False}
    auth = "required" if settings.api_key else "none (anyone who can connect may use it)"
    announce(f"serving {', '.join(registry.relays)} at http://{_host(host)}:{port}/v1 · "
             f"store {store.url} ({store.kind}, namespace {store.namespace}, trajectories "
             f"expire after {format_duration(store.ttl)}) · API key {auth} · "
             f"{settings.concurrency} runs at once, "
             f"{settings.max_queue} queued")
    server_config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                   log_config=log_config, timeout_graceful_shutdown=5,
                                   server_header=False, lifespan="on",
                                   proxy_headers=forwarded_allow_ips is not None,
                                   forwarded_allow_ips=forwarded_allow_ips)
    try:
        _server_class()(server_config).run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled: a normal stop
        pass


def check_listen(host: str, port: int) -> None:
    """A :class:`ConfigError` naming the cause when ``host:port`` cannot be listened on (a
    port in use, an address not on this machine, a privileged port)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        raise ConfigError(f"cannot listen on {host!r}: {getattr(exc, 'strerror', None) or exc}; "
                          "give --host an address of this machine (default 127.0.0.1)") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            why = exc.strerror or str(exc)
            fix = ("another program (another relaygraph serve?) listens there: stop it or "
                   "choose another --port" if exc.errno == errno.EADDRINUSE
                   else "choose a port above 1023" if exc.errno == errno.EACCES
                   else "give --host an address of this machine")
            raise ConfigError(f"cannot listen on {_host(host)}:{port} ({why}); {fix}") from None


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _server_class() -> type:
    """uvicorn's server, telling the app's scheduler when shutdown begins: from then on
    new requests get a 503, and a request cut off by the shutdown cancels its run as a
    "server shutdown" (runs that end within the grace period finish normally)."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            state = getattr(self.config.app, "state", None)
            scheduler = getattr(state, "scheduler", None)
            if scheduler is not None:
                scheduler.closing = True
            await super().shutdown(sockets)

    return Server


class BackgroundServer:
    """uvicorn serving ``app`` on a thread (``port=0``: a free port); a context manager.

    >>> with BackgroundServer(create_app(registry)) as server:
    ...     OpenAI(base_url=server.url + "/v1", api_key="-").models.list()
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning", graceful_timeout: float = 2.0) -> None:
        import uvicorn

        self.app = app
        self.host = host
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, log_config=None,
                                lifespan="on", proxy_headers=False,
                                timeout_graceful_shutdown=int(graceful_timeout))
        self._server = _server_class()(config)
        self._thread = threading.Thread(target=self._server.run, name="relaygraph-serve",
                                        daemon=True)
        self.port = port

    @property
    def url(self) -> str:
        return f"http://{_host(self.host)}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.host}:{self.port}")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
