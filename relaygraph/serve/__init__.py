"""``relaygraph serve``: relays as OpenAI-compatible models (see :mod:`relaygraph.serve.app`)."""

from relaygraph.serve.app import ServeSettings, create_app
from relaygraph.serve.registry import (
    Registry,
    ServeConfig,
    ServedRelay,
    ServedRelayConfig,
    served_relay,
)
from relaygraph.serve.server import BackgroundServer, serve

__all__ = ["BackgroundServer", "Registry", "ServeConfig", "ServeSettings", "ServedRelay",
           "ServedRelayConfig", "create_app", "serve", "served_relay"]
