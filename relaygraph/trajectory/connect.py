"""Redis clients from URLs: one server, a Cluster, or a Sentinel-managed primary.

redis-py parses ``redis://``, ``rediss://`` and ``unix://`` URLs but has no URL form for a
Cluster's seed list or a Sentinel topology. relaygraph uses the ``+`` convention of
Redis-Sentinel-Url, Prefect/docket and LangChain's Redis integration::

    redis://[[user]:password@]host:port[/db]          one server; a Cluster node is detected
    rediss://...                                      the same over TLS
    unix:///path/to/socket                            one server on a Unix socket
    redis+cluster://[[user]:password@]host:port[,host2:port2,...]      a Cluster (seed nodes)
    rediss+cluster://...                              the same over TLS
    redis+sentinel://[[user]:password@]host[:26379][,host2[:port2],...]/service[/db]
    rediss+sentinel://...                             TLS to the Sentinels and the data nodes

The password in the URL is the data nodes'; ``?sentinel_password=...`` (and
``sentinel_username``) authenticate to the Sentinels. Other query options are redis-py's
own (``ssl_ca_certs``, ``socket_timeout``, ...). A ``redis://`` URL that names a node of
a Cluster is answered with a Cluster client (one ``INFO cluster`` at connect time), so an
operator can hand relaygraph any node's address.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlencode

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry
from redis.sentinel import Sentinel

from relaygraph.errors import StoreUnavailableError

Kind = Literal["single", "cluster", "sentinel"]
SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster", "redis+sentinel",
           "rediss+sentinel")
EXAMPLES = ("redis://[:password@]host:6379/0, rediss://..., unix:///path.sock, "
            "redis+cluster://host:7000[,host2:7001], "
            "redis+sentinel://host:26379[,host2:26379]/SERVICE[/db]")
_SECRET_OPTIONS = re.compile(r"(?i)(password|passwd|secret|token|key)$")
SENTINEL_PORT = 26379


def redact_url(url: str) -> str:
    """The URL with every password (in the user part or an option such as
    ``sentinel_password``) replaced by ``***``: safe for logs, spans and errors."""
    if not isinstance(url, str):
        return "<not a url>"
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url if "@" not in url else "<unparseable redis url>"
    end = len(rest)
    for stop in "/?#":
        pos = rest.find(stop, rest.rfind("@") + 1 if "@" in rest else 0)
        if pos != -1:
            end = min(end, pos)
    netloc, tail = rest[:end], rest[end:]
    userinfo, at, hosts = netloc.rpartition("@")
    if at:  # user:password@, or a lone name@ (some services put a token there): both masked
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:***@{hosts}" if colon else f"***@{hosts}"
    path, qmark, query = tail.partition("?")
    if qmark:
        query, hash_, fragment = query.partition("#")
        pairs = [(k, "***" if _SECRET_OPTIONS.search(k) else v)
                 for k, v in parse_qsl(query, keep_blank_values=True)]
        tail = f"{path}?{urlencode(pairs, safe='*/:')}{hash_}{fragment}"
    return f"{scheme}://{netloc}{tail}"


@dataclass
class Target:
    """What a store URL names."""

    kind: Kind
    scheme: str
    nodes: list[tuple[str, int]] = field(default_factory=list)
    """Cluster seed nodes or Sentinels (host, port)."""
    service: str = ""
    """The Sentinel service (master group) name."""
    db: int = 0
    node_url: str = ""
    """A plain redis[s]:// URL with the data nodes' credentials and options (first node)."""
    sentinel_auth: dict[str, str] = field(default_factory=dict)


def _bad(url: str, why: str) -> StoreUnavailableError:
    return StoreUnavailableError(f"invalid Redis URL {redact_url(url)!r}: {why}; expected e.g. "
                                 f"{EXAMPLES}")


def _hosts(url: str, netloc: str, default_port: int) -> list[tuple[str, int]]:
    hosts = []
    for part in netloc.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^:\[\]]+)(?::(\d{1,5}))?", part)
        if not match:
            raise _bad(url, f"cannot read the host {part!r}")
        host, port = match.group(1).strip("[]"), int(match.group(2) or default_port)
        if not 0 < port < 65536:
            raise _bad(url, f"port {port} is out of range")
        hosts.append((host, port))
    return hosts


@functools.cache
def _connection_options() -> frozenset[str]:
    """The query options redis-py accepts: its connection pool's, connections' and Cluster
    client's arguments (anything else reaches a connection as an unexpected keyword, at
    the first command: an internal error instead of a message)."""
    import inspect

    from redis.connection import (
        AbstractConnection,
        Connection,
        ConnectionPool,
        SSLConnection,
        UnixDomainSocketConnection,
    )

    names = {"sentinel_username", "sentinel_password", "service_name"}
    for cls in (ConnectionPool, AbstractConnection, Connection, SSLConnection,
                UnixDomainSocketConnection, RedisCluster):
        names.update(p.name for p in inspect.signature(cls.__init__).parameters.values()
                     if p.kind is p.POSITIONAL_OR_KEYWORD or p.kind is p.KEYWORD_ONLY)
    return frozenset(names - {"self"})


def _check_options(url: str, query: str) -> None:
    unknown = sorted({k for k, _ in parse_qsl(query, keep_blank_values=True)}
                     - _connection_options())
    if unknown:
        raise _bad(url, f"unknown option {', '.join(map(repr, unknown))} (options are redis-py's connection "
                        "arguments, in lower case: password, ssl_ca_certs, socket_timeout, ...)")


def parse_target(url: str) -> Target:
    """Read a store URL (see the module docstring); a :class:`StoreUnavailableError` naming
    the problem (with the password masked) if it is not one."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        raise _bad(url, f"unknown scheme {scheme + '://' if sep else '(none)'}")
    _check_options(url, rest.partition("?")[2].partition("#")[0])
    if scheme in ("redis", "rediss", "unix"):
        return Target("single", scheme, node_url=url)
    tls = scheme.startswith("rediss")
    before_query, _, query = rest.partition("?")
    netloc, _, path = before_query.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    options = dict(parse_qsl(query, keep_blank_values=True))
    sentinel_auth: dict[str, str] = {k: options.pop(k) for k in ("sentinel_username",
                                                                  "sentinel_password")
                                     if k in options}
    kind: Kind = "cluster" if scheme.endswith("+cluster") else "sentinel"
    if not hostlist:
        raise _bad(url, "no host given")
    nodes = _hosts(url, hostlist, SENTINEL_PORT if kind == "sentinel" else 6379)
    segments = [unquote(s) for s in path.split("/") if s]
    service, db = "", 0
    if kind == "sentinel":
        service = options.pop("service_name", "") or (segments.pop(0) if segments else "")
        if not service:
            raise _bad(url, "name the Sentinel service (the master group) after the hosts, "
                            "e.g. /mymaster")
    db_text = options.pop("db", "") or (segments.pop(0) if segments else "0")
    if segments or not db_text.isdigit():
        raise _bad(url, "the path must be [/SERVICE]/DB with a numeric DB")
    db = int(db_text)
    if kind == "cluster" and db != 0:
        raise _bad(url, "a Cluster has only database 0")
    host, port = nodes[0]
    shown = f"[{host}]" if ":" in host else host
    data_scheme = "rediss" if tls else "redis"
    node_url = (f"{data_scheme}://{userinfo}{at}{quote(shown, safe='[]:')}:{port}/{db}"
                + (f"?{urlencode(options)}" if options else ""))
    return Target(kind, scheme, nodes, service, db, node_url, sentinel_auth)


T = TypeVar("T")
OnRetry = Callable[[Exception, int, int], None]
"""Told of each failed attempt that will be retried: (error, attempt, retries)."""


class ReportingRetry(Retry):
    """redis-py's retry that tells ``on_retry`` of each failed attempt it retries (so a
    command line can say that it is waiting for the server)."""

    def __init__(self, *args: Any, on_retry: OnRetry | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_retry = on_retry

    def call_with_retry(self, do: Callable[[], T], fail: Callable[..., Any],
                        is_retryable: Callable[[Exception], bool] | None = None,
                        with_failure_count: bool = False) -> T:
        def failed(error: Exception, failures: int) -> None:
            if with_failure_count:
                fail(error, failures)
            else:
                fail(error)
            if self.on_retry is not None and failures <= self._retries:
                try:
                    self.on_retry(error, failures, self._retries)
                except Exception:  # noqa: BLE001 - a report never breaks a command
                    pass

        def retryable(error: Exception) -> bool:
            # AuthenticationError is a ConnectionError to redis-py, but a refused password
            # does not get better with time: reported at once
            if isinstance(error, redis.AuthenticationError):
                return False
            return is_retryable(error) if is_retryable is not None else True

        return super().call_with_retry(do, failed, retryable, with_failure_count=True)


def default_retry(retries: int, on_retry: OnRetry | None = None) -> Retry:
    """Exponential backoff 0.1 s doubling to 2 s: about 9 s for 8 retries (none for refused
    credentials)."""
    return ReportingRetry(ExponentialBackoff(cap=2.0, base=0.1), retries,
                          (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError),
                          on_retry=on_retry)


def connect(url: str, retries: int = 8, on_retry: OnRetry | None = None,
            **kwargs: Any) -> tuple[Any, Kind]:
    """A redis-py client for ``url`` and what it is connected to. Commands that hit a
    dropped connection (a restart, a Sentinel failover, a Cluster resharding) are retried
    ``retries`` times with backoff, each retry told to ``on_retry``. Nothing is sent except
    ``INFO cluster`` for a plain ``redis[s]://`` URL (to tell a Cluster node from a lone
    server)."""
    target = parse_target(url)
    retry = default_retry(retries, on_retry)
    try:
        if target.kind == "cluster":
            seeds = [ClusterNode(h, p) for h, p in target.nodes[1:]]
            return RedisCluster(url=target.node_url, startup_nodes=seeds, retry=retry,
                                **kwargs), "cluster"
        if target.kind == "sentinel":
            return _sentinel_client(target, retry, kwargs), "sentinel"
        client = redis.Redis.from_url(url, retry=retry, **kwargs)
    except redis.AuthenticationError:
        raise StoreUnavailableError(refused(url)) from None
    except (redis.RedisError, RedisClusterException) as exc:
        raise StoreUnavailableError(unreachable(url, exc)) from None
    except (ValueError, TypeError) as exc:
        raise _bad(url, str(exc)) from None
    if target.scheme == "unix" or not _is_cluster_node(client, url):
        return client, "single"
    client.close()
    try:
        return RedisCluster(url=url, retry=retry, **kwargs), "cluster"
    except (redis.RedisError, RedisClusterException) as exc:
        raise StoreUnavailableError(unreachable(url, exc)) from None


def unreachable(url: str, exc: Exception) -> str:
    return (f"cannot reach Redis at {redact_url(url) or 'the given client'} "
            f"({type(exc).__name__}); start the server, fix --redis/REDIS_URL, or omit them "
            "to use the embedded server")


def refused(url: str) -> str:
    return (f"Redis at {redact_url(url) or 'the given client'} refused the credentials; "
            "check the password in the URL")


def _is_cluster_node(client: redis.Redis, url: str) -> bool:
    try:
        info = client.info("cluster")
    except redis.AuthenticationError:
        raise StoreUnavailableError(refused(url)) from None
    except redis.ResponseError:  # INFO not allowed to this user: a managed single server
        return False
    except redis.RedisError as exc:
        raise StoreUnavailableError(unreachable(url, exc)) from None
    return bool(info.get("cluster_enabled"))


def _sentinel_client(target: Target, retry: Retry, kwargs: dict[str, Any]) -> redis.Redis:
    from redis.connection import parse_url

    options = parse_url(target.node_url)
    for key in ("host", "port", "connection_class"):
        options.pop(key, None)
    tls = target.scheme.startswith("rediss")
    sentinel_kwargs: dict[str, Any] = {
        k: v for k, v in options.items() if k.startswith(("socket_", "ssl_"))}
    if tls:
        options["ssl"] = sentinel_kwargs["ssl"] = True
    if "sentinel_username" in target.sentinel_auth:
        sentinel_kwargs["username"] = target.sentinel_auth["sentinel_username"]
    if "sentinel_password" in target.sentinel_auth:
        sentinel_kwargs["password"] = target.sentinel_auth["sentinel_password"]
    sentinel_kwargs.setdefault("socket_timeout", 2.0)
    sentinel_kwargs.setdefault("socket_connect_timeout", 2.0)
    # one try per Sentinel: discovery moves on to the next one, and the data connection's
    # own retry (with backoff) repeats the whole discovery
    sentinel_kwargs.setdefault("retry", Retry(NoBackoff(), 0))
    manager = Sentinel(target.nodes, sentinel_kwargs=sentinel_kwargs, **options, **kwargs)
    _check_sentinel_auth(manager)
    return manager.master_for(target.service, retry=retry)


def _check_sentinel_auth(manager: Sentinel) -> None:
    """Refused Sentinel credentials, said at once: redis-py's master discovery takes them
    for an unreachable Sentinel and reports, after every retry, that no master was found."""
    refusals = 0
    for sentinel in manager.sentinels:
        try:
            sentinel.ping()
        except redis.AuthenticationError:
            refusals += 1
        except redis.RedisError:
            pass
    if refusals and refusals == len(manager.sentinels):
        raise redis.AuthenticationError("the Sentinels refused the credentials")


def describe(client: Any, kind: Kind) -> str:
    """A few words on the topology: ``cluster of 3 primaries``, ``sentinel service X``."""
    if kind == "cluster":
        return f"cluster of {len(client.get_primaries())} primaries"
    if kind == "sentinel":
        pool = client.connection_pool
        return f"sentinel service {getattr(pool, 'service_name', '?')}"
    return "single server"
