"""Which OpenTelemetry providers relaygraph records to, and whether content is captured.

Only the OpenTelemetry *API* is used: without a configured SDK everything is a no-op.
:func:`use` (or :func:`relaygraph.observability.configure`) installs providers for
relaygraph; otherwise spans and metrics go to the global providers, if the application
set them. Tracing never fails a run: problems are logged once (:func:`warn_once`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics, trace

from relaygraph.observability.instruments import Instruments

SCOPE = "relaygraph"
CAPTURE_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
_log = logging.getLogger(__name__)

# The API's proxies: they follow the global providers once an application sets them.
tracer = trace.get_tracer(SCOPE)


@dataclass
class Installed:
    tracer: Any
    instruments: Instruments
    capture_content: bool | None


GLOBAL = Installed(tracer, Instruments(metrics.get_meter(SCOPE)), None)
_installed: Installed = GLOBAL
_warned: set[str] = set()


def use(tracer_provider: Any = None, meter_provider: Any = None,
        capture_content: bool | None = None) -> Callable[[], None]:
    """Send relaygraph's spans and metrics to these providers (None: the global ones).

    Returns a function that restores what was installed before. The global OpenTelemetry
    providers are left alone (they can be set only once per process), so tests and
    applications can install and swap their own.
    """
    global _installed
    before = _installed
    tr = tracer_provider.get_tracer(SCOPE) if tracer_provider is not None else tracer
    meter = (meter_provider.get_meter(SCOPE) if meter_provider is not None
             else metrics.get_meter(SCOPE))
    _installed = Installed(tr, Instruments(meter) if meter_provider is not None
                            else GLOBAL.instruments, capture_content)

    def restore() -> None:
        global _installed
        _installed = before

    return restore


@contextmanager
def using(tracer_provider: Any = None, meter_provider: Any = None,
          capture_content: bool | None = None) -> Iterator[None]:
    """:func:`use` as a context manager."""
    restore = use(tracer_provider, meter_provider, capture_content)
    try:
        yield
    finally:
        restore()


def capture_content_from_env() -> bool:
    """``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT``, the standard GenAI opt-in."""
    value = os.environ.get(CAPTURE_ENV, "").strip().lower()
    return value in ("1", "true", "yes", "on", "span_only", "span_and_event", "event_only")


def capture_content(installed: Installed | None = None) -> bool:
    """Whether message content goes into spans: as installed (:func:`use`), else the
    environment's opt-in."""
    installed = installed or _installed
    if installed.capture_content is not None:
        return installed.capture_content
    return capture_content_from_env()


def warn_once(what: str, exc: BaseException) -> None:
    if what not in _warned:
        _warned.add(what)
        _log.warning("relaygraph tracing: %s failed (%s: %s); the run goes on", what,
                     type(exc).__name__, exc)


def installed() -> Installed:
    """The providers relaygraph records to now."""
    return _installed
