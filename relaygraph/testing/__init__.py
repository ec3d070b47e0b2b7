"""Tools for testing relaygraph and what users build on it (not imported by the runtime).

- :mod:`~relaygraph.testing.store_conformance`: the conformance suite every
  :class:`~relaygraph.trajectory.store.TrajectoryStore` implementation passes (pytest);
- :mod:`~relaygraph.testing.otlp_receiver`: a small OTLP receiver (HTTP and gRPC) for
  tests, benchmarks and debugging of traces.
"""
