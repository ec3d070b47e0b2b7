"""``relaygraph serve``: relays as OpenAI-compatible models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from relaygraph.cli.common import Namespace, Redis, ensure_pulled, err, friendly, traced
from relaygraph.errors import ConfigError


@friendly
@traced
def serve(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Serve config (.toml, .yaml, .json): \\[relays.NAME] tables, each a relay config; a plain relay config is served as relay-<policy>. Default: the offline pair as relay-call-token and relay-prompted-call.")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    redis: Redis = None,
    namespace: Namespace = None,
    ttl: Annotated[str | None, typer.Option("--ttl", help="Trajectories expire this long after their last activity: 7d, 12h, 30m, 90 (seconds), or none (default: the config's store.ttl, else 7d).")] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="RELAYGRAPH_API_KEY", show_default=False, help="Require 'Authorization: Bearer KEY' on /v1 routes (prefer the RELAYGRAPH_API_KEY variable: arguments show in ps).")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Relay runs at once (worker threads).")] = 4,
    max_queue: Annotated[int, typer.Option(min=0, help="Requests that may wait for a worker; more get a 429.")] = 64,
    queue_timeout: Annotated[float, typer.Option(min=0.0, help="Seconds a request may wait for a worker before a 503 (0: no limit).")] = 60.0,
    max_request_bytes: Annotated[int, typer.Option(min=1, help="Largest request body; larger get a 413.")] = 1 << 20,
    allowed_host: Annotated[list[str] | None, typer.Option("--allowed-host", help="A name clients may use for this server besides its address (the Host header; pages there may call it). Repeat for more; '*' for any (behind a proxy that checks Host).")] = None,
    forwarded_allow_ips: Annotated[str | None, typer.Option("--forwarded-allow-ips", help="Proxies whose X-Forwarded-For/-Proto headers are believed (comma-separated addresses, '*': any). Default: none, the access log shows the connecting address.")] = None,
    trace: Annotated[str | None, typer.Option("--trace", help="OpenTelemetry traces to: console | otlp | none | an OTLP URL (default: the OTEL_* variables). One trace per request.")] = None,
    trace_content: Annotated[bool, typer.Option("--trace-content", help="Record questions and generated text in spans (off by default).")] = False,
) -> None:
    """Serve relays as OpenAI-compatible models (/v1/chat/completions, /v1/completions, /v1/models)."""
    try:
        from relaygraph.serve import ServeConfig, ServeSettings
        from relaygraph.serve import serve as run_server
    except ImportError as exc:
        raise ConfigError(f"serving needs the serve extra ({exc.name} is missing): "
                          "pip install 'relaygraph[serve]'") from None

    from relaygraph.serve.server import check_listen

    check_listen(host, port)  # a busy port fails before any model is pulled or loaded
    cfg = ServeConfig.load(config) if config is not None else ServeConfig.default()
    ensure_pulled(*cfg.local_models())
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        err.print("warning:", style="yellow", end=" ")
        err.print(f"listening on {host} without an API key; set "
                  "RELAYGRAPH_API_KEY to require one")
    settings = ServeSettings(api_key=api_key or None, concurrency=concurrency,
                             max_queue=max_queue, queue_timeout=queue_timeout,
                             max_request_bytes=max_request_bytes,
                             allowed_hosts=tuple(allowed_host or ()))
    run_server(cfg, host, port, redis, settings, announce=err.print, namespace=namespace,
               ttl=ttl, forwarded_allow_ips=forwarded_allow_ips)
