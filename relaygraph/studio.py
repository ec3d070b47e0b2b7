"""The relay graph that LangGraph Studio and ``langgraph dev`` serve (``langgraph.json`` at
the repository's root points here).

    pip install -e ".[studio]" && relaygraph models pull
    langgraph dev                                        # the offline Qwen pair, prompted-call
    RELAYGRAPH_STUDIO_CONFIG=relay.toml langgraph dev    # any relay config file

``graph`` is an async factory: the server calls it for each request, and the relay (its models,
its store: the config's Redis, else ``$REDIS_URL``, else the embedded server) is built once,
on first use. The server brings the checkpointer, so every Studio thread is a conversation
(a new question on it is a new trajectory that sees the earlier turns) and a supervisor's
``interrupt()`` shows up in Studio as a question to answer. The input form is the question
(or chat ``messages``); the chat view and ``stream_mode="messages"`` show each model's
tokens under its agent's name.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import TYPE_CHECKING

from relaygraph.config import RelayConfig
from relaygraph.relay import Relay

if TYPE_CHECKING:
    from langgraph.graph.state import CompiledStateGraph

CONFIG_ENV = "RELAYGRAPH_STUDIO_CONFIG"
"""A relay config file (.toml, .yaml, .json) to serve instead of the default pair."""

_lock = threading.Lock()
_relay: Relay | None = None


def studio_config() -> RelayConfig:
    """``$RELAYGRAPH_STUDIO_CONFIG``, else the offline pair under ``prompted-call`` (its
    untrained controller is told how to call the expert, so both models write)."""
    path = os.environ.get(CONFIG_ENV)
    return RelayConfig.load(path) if path else RelayConfig.from_options(policy="prompted-call")


def relay() -> Relay:
    """The served relay, built on first use."""
    global _relay
    with _lock:
        if _relay is None:
            _relay = Relay.from_config(studio_config())
        return _relay


async def graph() -> CompiledStateGraph:
    """The graph factory ``langgraph.json`` names (async: the first call loads the models on
    a worker thread, never on the server's event loop)."""
    return (await asyncio.to_thread(relay)).graph
