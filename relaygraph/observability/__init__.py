"""Observability: OpenTelemetry traces and metrics of relays, and trajectory viewers.

- :mod:`~relaygraph.observability.tracing`: spans (``invoke_workflow`` -> ``invoke_agent``
  -> ``chat``) with GenAI semantic-convention and ``relaygraph.handoff.*`` attributes, and
  metrics; API only, a no-op until an SDK is configured.
- :func:`configure`: the SDK from ``OTEL_*`` variables or arguments (OTLP over HTTP or
  gRPC, console, none), with a bounded shutdown.
- :mod:`~relaygraph.observability.render`: a trajectory in the terminal, coloured by author
  with handoff markers (static or following a running trajectory).
- :mod:`~relaygraph.observability.html`: one self-contained HTML page of a trajectory.
- :mod:`~relaygraph.observability.receiver`: a small OTLP receiver (HTTP and gRPC) for
  tests, benchmarks and debugging.
"""

from relaygraph.observability.telemetry import Telemetry, configure, tracing_requested
from relaygraph.observability.tracing import use, using

__all__ = ["Telemetry", "configure", "tracing_requested", "use", "using"]
