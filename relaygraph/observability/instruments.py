"""The metric instruments relaygraph records (their names are part of the public interface)."""

from __future__ import annotations

from typing import Any

from opentelemetry import metrics

_SECONDS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24,
            20.48, 40.96, 81.92)
_OVERHEAD = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
             0.5, 1.0, 2.5)
_TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144)
_RATIO = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class Instruments:
    """The metric instruments of one meter (names are part of the public interface).

    - ``relaygraph.handoffs`` (counter): control moving between two different agents,
      by ``relaygraph.handoff.from`` / ``.to`` / ``.reason`` and ``relaygraph.policy``;
    - ``gen_ai.client.token.usage`` (histogram, ``{token}``): tokens per turn by
      ``gen_ai.agent.name`` and ``gen_ai.token.type`` (``input``, ``output``); its sum per
      agent is the tokens that agent read / wrote;
    - ``relaygraph.run.call_ratio`` (histogram, 1): per run, tokens written by agents other
      than the policy's primary / all generated tokens;
    - ``relaygraph.handoff.overhead`` (histogram, s): from the end of one agent's
      generation to the start of the next one's (store appends, graph step, view, tracing);
    - ``gen_ai.server.time_to_first_token`` (histogram, s): from the start of a turn's
      generation to its first streamed text;
    - ``gen_ai.client.operation.duration`` (histogram, s): a turn's generation;
    - ``relaygraph.runs`` (counter): runs by policy and outcome (``ok``/``error``).
    """

    def __init__(self, meter: metrics.Meter) -> None:
        def histogram(name: str, unit: str, description: str, bounds: tuple) -> Any:
            try:
                return meter.create_histogram(name, unit=unit, description=description,
                                              explicit_bucket_boundaries_advisory=list(bounds))
            except TypeError:  # an older API without bucket advice
                return meter.create_histogram(name, unit=unit, description=description)

        self.handoffs = meter.create_counter(
            "relaygraph.handoffs", unit="{handoff}",
            description="Control moving from one agent to another.")
        self.runs = meter.create_counter("relaygraph.runs", unit="{run}",
                                         description="Relay runs by outcome.")
        self.tokens = histogram("gen_ai.client.token.usage", "{token}",
                                "Number of input and output tokens used.", _TOKENS)
        self.call_ratio = histogram(
            "relaygraph.run.call_ratio", "1",
            "Tokens written by agents other than the primary / all generated tokens, per run.",
            _RATIO)
        self.overhead = histogram(
            "relaygraph.handoff.overhead", "s",
            "Time from the end of one agent's generation to the start of the next agent's.",
            _OVERHEAD)
        self.ttft = histogram("gen_ai.server.time_to_first_token", "s",
                              "Time to generate first token for successful responses.", _SECONDS)
        self.duration = histogram("gen_ai.client.operation.duration", "s",
                                  "GenAI operation duration.", _SECONDS)
