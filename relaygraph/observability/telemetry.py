"""Set up the OpenTelemetry SDK for relaygraph, the standard way (``OTEL_*`` variables).

>>> from relaygraph.observability import configure
>>> telemetry = configure()            # reads OTEL_TRACES_EXPORTER, OTEL_EXPORTER_OTLP_* ...
>>> relay.run("What is 2 + 5?")       # one trace per run
>>> telemetry.shutdown()               # flushes; bounded even when the collector is down

Variables read (arguments override them):

- ``OTEL_TRACES_EXPORTER`` = ``otlp`` (the default), ``console`` or ``none``;
- ``OTEL_METRICS_EXPORTER`` = ``otlp``, ``console`` or ``none`` (default ``none``: trace
  viewers such as Phoenix or Jaeger refuse metrics; set it for a collector that takes them);
- ``OTEL_EXPORTER_OTLP_ENDPOINT`` (base URL, default ``http://localhost:4318``, or
  ``http://localhost:4317`` for grpc), ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` /
  ``..._METRICS_ENDPOINT`` (full URLs), ``OTEL_EXPORTER_OTLP_PROTOCOL`` (and the
  ``_TRACES_``/``_METRICS_`` variants) = ``http/protobuf`` (default) or ``grpc``,
  ``OTEL_EXPORTER_OTLP_HEADERS`` (e.g. an API key), ``OTEL_EXPORTER_OTLP_TIMEOUT``,
  ``OTEL_EXPORTER_OTLP_COMPRESSION``, ``OTEL_EXPORTER_OTLP_CERTIFICATE`` — handled by the
  OTLP exporters themselves;
- ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES`` (service name default ``relaygraph``);
- ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`` = ``true`` to record prompts and
  generated text in spans (off by default);
- ``OTEL_SDK_DISABLED`` = ``true`` turns everything off.

Spans are exported in the background (batch processor), so a slow or dead collector
never slows a run; the trajectory is in the store either way. ``shutdown`` waits at most
``shutdown_timeout`` seconds, and does not wait at all when nothing listens at the
endpoint. The SDK and exporters are imported only here, only when asked for.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import sys
import threading
from dataclasses import dataclass, field
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

from relaygraph.errors import ConfigError
from relaygraph.observability import providers

EXPORTERS = ("otlp", "console", "none")
PROTOCOLS = ("http/protobuf", "grpc")
_EXPORTER_LOGGERS = ("opentelemetry.exporter", "opentelemetry.sdk._shared_internal",
                     "opentelemetry.sdk.metrics._internal.export")


_MISSING_EXPORTER = ("OTLP export needs the OTLP exporter: pip install 'relaygraph[otlp]' "
                     "(opentelemetry-exporter-otlp)")


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def redact_endpoint(url: str) -> str:
    """``url`` without credentials or query (safe to print)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
    except ValueError:
        return "<unparseable endpoint>"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def tracing_requested() -> bool:
    """Whether the environment asks for traces (an exporter or an OTLP endpoint is set)."""
    if _env("OTEL_SDK_DISABLED") == "true":
        return False
    exporter = _env("OTEL_TRACES_EXPORTER")
    if exporter is not None:
        return exporter.lower() != "none"
    return _env("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") is not None


class _Problems(logging.Handler):
    """Keeps the OTLP exporters' complaints (instead of tracebacks on the user's terminal)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage().splitlines()[0][:300]
        except Exception:  # noqa: BLE001 - telemetry set-up never fails a run
            message = str(record.msg)[:300]
        if message not in self.messages and len(self.messages) < 20:
            self.messages.append(message)


@dataclass
class _Guarded:
    """Wraps an exporter: counts outcomes, never raises, and drops work once shut down."""

    inner: Any
    failure: Any = None
    """The exporter's FAILURE result value."""
    signal: str = "traces"
    endpoint: str | None = None
    ok: int = 0
    failed: int = 0
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def export(self, batch: Any, *args: Any, **kwargs: Any) -> Any:
        result = None
        if not self.closed:
            try:
                result = self.inner.export(batch, *args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - telemetry set-up never fails a run
                logging.getLogger("opentelemetry.exporter").warning(
                    "export failed: %s: %s", type(exc).__name__, exc)
        success = getattr(result, "name", "") == "SUCCESS"
        with self.lock:
            if success:
                self.ok += 1
            else:
                self.failed += 1
        return result if result is not None else self.failure

    def shutdown(self, *args: Any, **kwargs: Any) -> None:
        """Shut the exporter down (this also aborts its retry back-off)."""
        if self.closed:
            return
        self.closed = True
        try:
            self.inner.shutdown(*args, **kwargs)
        except Exception:  # noqa: BLE001 - telemetry set-up never fails a run
            pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        try:
            return bool(self.inner.force_flush(timeout_millis))
        except Exception:  # noqa: BLE001 - telemetry set-up never fails a run
            return False

    def __getattr__(self, name: str) -> Any:  # metric exporters' temporality, aggregation...
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


@dataclass
class Telemetry:
    """What :func:`configure` set up; call :meth:`shutdown` before the process ends."""

    traces: str = "none"
    metrics: str = "none"
    protocol: str | None = None
    endpoint: str | None = None
    """Where traces go (credentials removed), for messages."""
    tracer_provider: Any = None
    meter_provider: Any = None
    capture_content: bool = False
    shutdown_timeout: float = 3.0
    exporters: list[_Guarded] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """One line per problem, e.g. ``traces not exported: nothing listens at ...``."""
    details: list[str] = field(default_factory=list)
    """What the exporters logged when something went wrong (with ``quiet=True``)."""
    _restore: Any = None
    _handler: _Problems | None = None
    _loggers: list[tuple[logging.Logger, bool]] = field(default_factory=list)
    _done: bool = False

    @property
    def enabled(self) -> bool:
        return self.tracer_provider is not None or self.meter_provider is not None

    def shutdown(self, timeout: float | None = None) -> bool:
        """Flush and stop; waits at most ``timeout`` s (default ``shutdown_timeout``) and
        returns whether everything was exported. Spans that could not be sent are dropped
        and said so in :attr:`problems`."""
        if self._done:
            return not self.problems
        self._done = True
        atexit.unregister(self.shutdown)
        if self._restore is not None:
            self._restore()
        timeout = self.shutdown_timeout if timeout is None else timeout
        reachable = self._reachable(min(0.5, timeout))
        done = threading.Event()

        def stop() -> None:
            try:
                if not reachable:  # nobody to send to: drop what is queued right away
                    for exporter in self.exporters:
                        exporter.shutdown()
                if self.tracer_provider is not None:
                    if reachable:
                        self.tracer_provider.force_flush()
                    self.tracer_provider.shutdown()
                if self.meter_provider is not None:  # collects and exports one last time
                    self.meter_provider.shutdown()
            except Exception as exc:  # noqa: BLE001 - telemetry set-up never fails a run
                self.problems.append(f"shutdown failed: {type(exc).__name__}: {exc}")
            finally:
                done.set()

        # The SDK's flush ignores its timeout; a daemon thread bounds the wait instead.
        worker = threading.Thread(target=stop, name="relaygraph-telemetry-shutdown", daemon=True)
        worker.start()
        finished = done.wait(timeout if reachable else min(timeout, 0.5))
        if not finished:
            for exporter in self.exporters:
                exporter.shutdown()
            finished = done.wait(0.1) and reachable
        if not reachable:
            self.problems.insert(0, f"traces not exported: nothing listens at {self.endpoint}; "
                                    "the spans and metrics of this run were dropped")
        elif not finished:
            self.problems.insert(0, f"traces not exported: the collector at {self.endpoint} did "
                                    f"not answer within {timeout:g} s; some spans were dropped")
        else:
            for exporter in self.exporters:
                if exporter.failed:
                    self.problems.append(
                        f"{exporter.signal} not exported: {exporter.failed} export(s) to "
                        f"{exporter.endpoint or exporter.signal + ' exporter'} failed")
        if self._handler is not None:
            if self.problems:
                self.details.extend(self._handler.messages)
            for logger, propagate in self._loggers:
                logger.removeHandler(self._handler)
                logger.propagate = propagate
        return not self.problems

    def _reachable(self, timeout: float) -> bool:
        """Whether something accepts connections at the OTLP endpoint (True if unknown).

        A dead collector is then detected in milliseconds instead of after the exporter's
        retries and back-offs, so shutting down does not wait for it."""
        if self.traces != "otlp" and self.metrics != "otlp":
            return True
        if any(e.ok for e in self.exporters):
            return True
        try:
            parts = urlsplit(self.endpoint or "")
            host = parts.hostname
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            return True
        if not host:
            return True
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return True
        except OSError:
            return False

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _resource(service_name: str | None) -> Any:
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    from relaygraph import __version__

    attrs: dict[str, Any] = {"service.version": __version__}
    if service_name:
        attrs[SERVICE_NAME] = service_name
    resource = Resource.create(attrs)
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "relaygraph"}))
    return resource


def _otlp_endpoint(protocol: str, endpoint: str | None, signal: str) -> str:
    """The full URL an OTLP exporter of ``signal`` (traces/metrics) will use."""
    if protocol == "grpc":
        return endpoint or _env(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT",
                                "OTEL_EXPORTER_OTLP_ENDPOINT") or "http://localhost:4317"
    if endpoint:
        return endpoint.rstrip("/") + f"/v1/{signal}"
    full = _env(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
    if full:
        return full
    base = _env("OTEL_EXPORTER_OTLP_ENDPOINT") or "http://localhost:4318"
    return base.rstrip("/") + f"/v1/{signal}"


def _timeout() -> float | None:
    """The exporter's per-export timeout: the user's, else 5 s (the SDK default is 10 s)."""
    if _env("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"):
        return None  # the exporter reads it
    return 5.0


def _otlp_options(protocol: str, url: str) -> dict[str, Any]:
    """Keyword arguments shared by the OTLP span and metric exporters."""
    options: dict[str, Any] = {"endpoint": url}
    if (timeout := _timeout()) is not None:
        options["timeout"] = timeout
    if protocol == "grpc" and url.startswith("http://"):
        options["insecure"] = True
    return options


def _span_exporter(kind: str, protocol: str, endpoint: str | None, out: IO[str]) -> Any:
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(out=out)
    url = _otlp_endpoint(protocol, endpoint, "traces")
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcSpanExporter,
            )

            return GrpcSpanExporter(**_otlp_options(protocol, url))
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise ConfigError(_MISSING_EXPORTER) from None
    return OTLPSpanExporter(**_otlp_options(protocol, url))


def _metric_exporter(kind: str, protocol: str, endpoint: str | None, out: IO[str]) -> Any:
    if kind == "console":
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        return ConsoleMetricExporter(out=out)
    url = _otlp_endpoint(protocol, endpoint, "metrics")
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter as GrpcMetricExporter,
            )

            return GrpcMetricExporter(**_otlp_options(protocol, url))
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    except ImportError:
        raise ConfigError(_MISSING_EXPORTER) from None
    return OTLPMetricExporter(**_otlp_options(protocol, url))


def _choice(value: str, allowed: tuple[str, ...], what: str) -> str:
    value = value.strip().lower()
    if "," in value:  # "otlp,console": the first one we support
        value = next((v for v in value.split(",") if v.strip() in allowed), value).strip()
    if value not in allowed:
        raise ConfigError(f"unknown {what} {value!r}; choose one of: {', '.join(allowed)}")
    return value


def configure(
    traces: str | None = None,
    metrics: str | None = None,
    *,
    endpoint: str | None = None,
    protocol: str | None = None,
    service_name: str | None = None,
    capture_content: bool | None = None,
    span_processors: tuple[Any, ...] = (),
    metric_readers: tuple[Any, ...] = (),
    shutdown_timeout: float = 3.0,
    metric_interval_s: float = 30.0,
    quiet: bool = False,
    out: IO[str] | None = None,
    install: bool = True,
    set_global: bool = False,
) -> Telemetry:
    """Build tracer and meter providers from the arguments, else the ``OTEL_*`` variables.

    ``traces`` / ``metrics``: ``otlp``, ``console`` or ``none``. ``endpoint``: the OTLP
    base URL (``http://host:4318``; for grpc ``http://host:4317``). ``span_processors`` and
    ``metric_readers`` are added as they are (e.g. an in-memory exporter in tests).
    ``quiet`` keeps the exporters' log messages off the terminal and reports them in
    :attr:`Telemetry.problems` at shutdown. ``install`` makes relaygraph use these providers
    (:func:`relaygraph.observability.providers.use`); ``set_global`` also makes them the
    process-wide OpenTelemetry providers (possible once per process).
    """
    disabled = _env("OTEL_SDK_DISABLED") == "true"
    traces = _choice(traces or _env("OTEL_TRACES_EXPORTER") or "otlp", EXPORTERS, "traces exporter")
    # Trace viewers (Phoenix, Jaeger) take no metrics: metrics are sent only when asked for.
    metrics = _choice(metrics or _env("OTEL_METRICS_EXPORTER") or "none", EXPORTERS,
                      "metrics exporter")
    protocol = _choice(protocol or _env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                                        "OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf",
                       PROTOCOLS + ("http",), "OTLP protocol")
    protocol = "http/protobuf" if protocol == "http" else protocol
    if endpoint is not None and not urlsplit(endpoint).scheme.startswith("http"):
        raise ConfigError(f"the OTLP endpoint must be an http:// or https:// URL, not "
                          f"{redact_endpoint(endpoint)!r}")
    if capture_content is None:
        capture_content = providers.capture_content_from_env()
    telemetry = Telemetry(traces="none" if disabled else traces,
                          metrics="none" if disabled else metrics,
                          protocol=protocol, capture_content=capture_content,
                          shutdown_timeout=shutdown_timeout)
    if disabled or (traces == "none" and metrics == "none" and not span_processors
                    and not metric_readers):
        return telemetry
    out = out or sys.stderr  # console output never mixes with a run's stdout (e.g. --json)
    if quiet:
        telemetry._handler = _Problems()
        for name in _EXPORTER_LOGGERS:
            logger = logging.getLogger(name)
            telemetry._loggers.append((logger, logger.propagate))
            logger.addHandler(telemetry._handler)
            logger.propagate = False
    resource = _resource(service_name)
    if traces != "none" or span_processors:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        for processor in span_processors:
            provider.add_span_processor(processor)
        if traces != "none":
            from opentelemetry.sdk.trace.export import SpanExportResult

            exporter = _Guarded(_span_exporter(traces, protocol, endpoint, out),
                                SpanExportResult.FAILURE, "traces")
            telemetry.exporters.append(exporter)
            provider.add_span_processor(BatchSpanProcessor(exporter))  # type: ignore[arg-type]  # _Guarded wraps a SpanExporter
            if traces == "otlp":
                exporter.endpoint = telemetry.endpoint = redact_endpoint(
                    _otlp_endpoint(protocol, endpoint, "traces"))
        telemetry.tracer_provider = provider
    if metrics != "none" or metric_readers:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        readers = list(metric_readers)
        if metrics != "none":
            from opentelemetry.sdk.metrics.export import MetricExportResult

            exporter = _Guarded(_metric_exporter(metrics, protocol, endpoint, out),
                                MetricExportResult.FAILURE, "metrics")
            telemetry.exporters.append(exporter)
            readers.append(PeriodicExportingMetricReader(
                exporter, export_interval_millis=metric_interval_s * 1000))  # type: ignore[arg-type]  # _Guarded wraps a MetricExporter
            if metrics == "otlp":
                exporter.endpoint = redact_endpoint(_otlp_endpoint(protocol, endpoint, "metrics"))
                telemetry.endpoint = telemetry.endpoint or exporter.endpoint
        telemetry.meter_provider = MeterProvider(resource=resource, metric_readers=readers,
                                                 shutdown_on_exit=False)
    if set_global:
        from opentelemetry import metrics as otel_metrics
        from opentelemetry import trace as otel_trace

        if telemetry.tracer_provider is not None:
            otel_trace.set_tracer_provider(telemetry.tracer_provider)
        if telemetry.meter_provider is not None:
            otel_metrics.set_meter_provider(telemetry.meter_provider)
    if install:
        telemetry._restore = providers.use(telemetry.tracer_provider, telemetry.meter_provider,
                                         capture_content)
    atexit.register(telemetry.shutdown)  # a forgotten shutdown still flushes (bounded)
    return telemetry
