"""KV caches that grow in place.

transformers' ``DynamicLayer`` appends a step's keys and values with ``torch.cat``: every
decoded token copies the conversation's whole cache. :class:`GrowingLayer` keeps them in
buffers with room to spare and writes each step into the room (a copy of the cache only
when the room runs out, growing by a quarter). The batcher's joint caches are built the
same way, sized for the step, so the model's own append is a write too.
"""

from __future__ import annotations

from typing import Any

from transformers.cache_utils import DynamicCache, DynamicLayer

MIN_ROOM = 64
"""Fewest spare positions a buffer is given when it grows."""


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``keys`` and ``values`` are views into larger buffers."""

    keys: Any
    values: Any

    def __init__(self) -> None:
        super().__init__()
        self._keys: Any = None
        self._values: Any = None

    @classmethod
    def sized(cls, keys: Any, values: Any, length: int) -> GrowingLayer:
        """A layer holding ``keys[..., :length, :]`` (and the values'), with the rest of
        the buffers as room."""
        layer = cls()
        layer.lazy_initialization(keys, values)
        layer._keys, layer._values = keys, values
        layer.keys, layer.values = keys[..., :length, :], values[..., :length, :]
        return layer

    def update(self, key_states: Any, value_states: Any, *args: Any,
               **kwargs: Any) -> tuple[Any, Any]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, add = self.get_seq_length(), key_states.shape[-2]
        if not self._holds(key_states, n, add):
            import torch

            room = n + add + max(MIN_ROOM, (n + add) // 4)
            shape = (*key_states.shape[:-2], room, key_states.shape[-1])
            keys = torch.empty(shape, dtype=key_states.dtype, device=key_states.device)
            values = torch.empty((*shape[:-1], value_states.shape[-1]),
                                 dtype=value_states.dtype, device=value_states.device)
            if n:
                keys[..., :n, :] = self.keys
                values[..., :n, :] = self.values
            self._keys, self._values = keys, values
        self._keys[..., n:n + add, :] = key_states
        self._values[..., n:n + add, :] = value_states
        self.keys, self.values = self._keys[..., :n + add, :], self._values[..., :n + add, :]
        return self.keys, self.values

    def _holds(self, states: Any, n: int, add: int) -> bool:
        """Whether the buffer has room for ``add`` more positions after ``n`` and its start
        still holds the ``n`` cached ones (``crop`` keeps ``keys`` a view of it; ``reset``
        or a batch reindex replace ``keys``)."""
        buffer = self._keys
        return (buffer is not None and n + add <= buffer.shape[-2]
                and buffer.shape[:-2] == states.shape[:-2]
                and (n == 0 or self.keys.data_ptr() == buffer.data_ptr()))


def growing_cache(config: Any) -> DynamicCache:
    """A ``DynamicCache`` for a model of ``config`` whose full-attention layers grow in
    place (sliding-window layers stay as transformers makes them)."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer
                    for layer in cache.layers]
    return cache
