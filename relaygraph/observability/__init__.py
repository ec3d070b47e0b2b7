"""Observability at run time: OpenTelemetry traces and metrics of relays.

- :mod:`~relaygraph.observability.tracing`: spans (``invoke_workflow`` -> ``invoke_agent``
  -> ``chat``) with GenAI semantic-convention and ``relaygraph.handoff.*`` attributes, and
  metrics; API only, a no-op until an SDK is configured.
- :func:`configure`: the SDK from ``OTEL_*`` variables or arguments (OTLP over HTTP or
  gRPC, console, none), with a bounded shutdown.

Viewers of stored trajectories live in :mod:`relaygraph.viewer`; an OTLP receiver for
tests in :mod:`relaygraph.testing.otlp_receiver`.
"""

from relaygraph.observability.providers import use, using
from relaygraph.observability.telemetry import Telemetry, configure, tracing_requested

__all__ = ["Telemetry", "configure", "tracing_requested", "use", "using"]
