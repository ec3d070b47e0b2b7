"""A small, real OTLP receiver: decodes what exporters send, keeps it in memory.

For tests, benchmarks and quick looks ("does my setup send anything?"):

>>> with OtlpReceiver() as rx:                        # OTLP/HTTP on 127.0.0.1, a free port
...     configure(endpoint=rx.url)                     # http://127.0.0.1:PORT
...     ...
...     spans = rx.wait_for_spans(3)

:class:`GrpcOtlpReceiver` is the same over gRPC (``configure(protocol="grpc", ...)``).
Spans come back as :class:`ReceivedSpan` (ids in hex, attributes as Python values, the
resource's attributes alongside). Needs ``opentelemetry-proto`` (installed with the OTLP
exporter, ``pip install 'relaygraph[otlp]'``).
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def any_value(value: Any) -> Any:
    """An OTLP ``AnyValue`` as a Python value."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind)


def attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in kvs}


@dataclass
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    """Empty for a root span."""
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    status_code: int
    resource: dict[str, Any]
    scope: str


@dataclass
class ReceivedPoint:
    metric: str
    unit: str
    attributes: dict[str, Any]
    value: float | None = None
    """Sum or gauge value; None for histograms."""
    count: int | None = None
    """Histogram count."""
    sum: float | None = None
    """Histogram sum."""
    resource: dict[str, Any] = field(default_factory=dict)


def decode_traces(body: bytes) -> list[ReceivedSpan]:
    """Spans of a serialized ``ExportTraceServiceRequest``."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    return _spans(request)


def _spans(request: Any) -> list[ReceivedSpan]:
    out = []
    for rs in request.resource_spans:
        resource = attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(ReceivedSpan(
                    name=s.name, trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                    parent_span_id=s.parent_span_id.hex(), kind=s.kind,
                    start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano,
                    attributes=attributes(s.attributes),
                    events=[(e.name, attributes(e.attributes)) for e in s.events],
                    status_code=s.status.code, resource=resource, scope=ss.scope.name))
    return out


def decode_metrics(body: bytes) -> list[ReceivedPoint]:
    """Data points of a serialized ``ExportMetricsServiceRequest``."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceRequest,
    )

    request = ExportMetricsServiceRequest()
    request.ParseFromString(body)
    return _points(request)


def _points(request: Any) -> list[ReceivedPoint]:
    out = []
    for rm in request.resource_metrics:
        resource = attributes(rm.resource.attributes)
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                data = getattr(m, kind)
                for p in data.data_points:
                    point = ReceivedPoint(m.name, m.unit, attributes(p.attributes),
                                          resource=resource)
                    if kind in ("histogram", "exponential_histogram"):
                        point.count, point.sum = p.count, p.sum
                    else:
                        point.value = p.as_double if p.WhichOneof("value") == "as_double" \
                            else p.as_int
                    out.append(point)
    return out


class _Store:
    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.points: list[ReceivedPoint] = []
        self.requests = 0
        self.cond = threading.Condition()

    def add(self, spans: Sequence[ReceivedSpan] = (), points: Sequence[ReceivedPoint] = ()) -> None:
        with self.cond:
            self.spans.extend(spans)
            self.points.extend(points)
            self.requests += 1
            self.cond.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)


class _ReceiverBase:
    def __init__(self) -> None:
        self._store = _Store()

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._store.cond:
            return list(self._store.spans)

    @property
    def points(self) -> list[ReceivedPoint]:
        with self._store.cond:
            return list(self._store.points)

    @property
    def requests(self) -> int:
        return self._store.requests

    def wait_for_spans(self, n: int, timeout: float = 10.0) -> list[ReceivedSpan]:
        """At least ``n`` spans (or what arrived before ``timeout`` s)."""
        self._store.wait(lambda: len(self._store.spans) >= n, timeout)
        return self.spans

    def wait_for_metric(self, name: str, timeout: float = 10.0) -> list[ReceivedPoint]:
        self._store.wait(lambda: any(p.metric == name for p in self._store.points), timeout)
        return [p for p in self.points if p.metric == name]

    def clear(self) -> None:
        with self._store.cond:
            self._store.spans.clear()
            self._store.points.clear()

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    def stop(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class OtlpReceiver(_ReceiverBase):
    """OTLP/HTTP (protobuf) on ``host``:``port`` (0: a free port): ``/v1/traces`` and
    ``/v1/metrics``. ``url`` is the base URL to give an exporter. ``delay`` s before each
    answer simulates a slow collector; ``signals=("traces",)`` answers 404 to metrics, as
    trace-only viewers (Phoenix, Jaeger) do."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, delay: float = 0.0,
                 signals: tuple[str, ...] = ("traces", "metrics")) -> None:
        super().__init__()
        store = self._store
        self.delay = delay
        self.signals = signals
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                encoding = (self.headers.get("Content-Encoding") or "").lower()
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                if receiver.delay:
                    time.sleep(receiver.delay)
                try:
                    path = self.path.rstrip("/")
                    if path.endswith("/v1/traces") and "traces" in receiver.signals:
                        store.add(spans=decode_traces(body))
                        reply = _empty("trace")
                    elif path.endswith("/v1/metrics") and "metrics" in receiver.signals:
                        store.add(points=decode_metrics(body))
                        reply = _empty("metrics")
                    else:
                        self.send_error(404)
                        return
                except Exception:  # noqa: BLE001 - a malformed body is the sender's problem
                    self.send_error(400)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        address = self._server.server_address
        self.host, self.port = str(address[0]), int(address[1])
        self.url = f"http://{self.host}:{self.port}"
        self._thread: threading.Thread | None = None

    def start(self) -> OtlpReceiver:
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        name="otlp-receiver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _empty(signal: str) -> bytes:
    if signal == "trace":
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceResponse,
        )

        return ExportTraceServiceResponse().SerializeToString()
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceResponse,
    )

    return ExportMetricsServiceResponse().SerializeToString()


class GrpcOtlpReceiver(_ReceiverBase):
    """OTLP/gRPC (TraceService and MetricsService) on ``host``:``port`` (0: a free port);
    ``url`` (``http://host:port``) is the endpoint to give an exporter."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__()
        from concurrent import futures

        import grpc
        from opentelemetry.proto.collector.metrics.v1 import (
            metrics_service_pb2,
            metrics_service_pb2_grpc,
        )
        from opentelemetry.proto.collector.trace.v1 import (
            trace_service_pb2,
            trace_service_pb2_grpc,
        )

        store = self._store

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                store.add(spans=_spans(request))
                return trace_service_pb2.ExportTraceServiceResponse()

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                store.add(points=_points(request))
                return metrics_service_pb2.ExportMetricsServiceResponse()

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), self._server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), self._server)
        self.host = host
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        self.url = f"http://{host}:{self.port}"

    def start(self) -> GrpcOtlpReceiver:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None)
