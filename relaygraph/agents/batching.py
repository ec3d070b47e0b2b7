"""Forward passes shared by concurrent generations: decode steps of one model run batched.

Each generation keeps its own KV cache (so a trajectory's cache survives between turns);
a decode step of several generations copies their caches, left-padded, into one batch
(:mod:`relaygraph.agents.kv_cache`: the only copy of a cache a step makes), runs the model
once, and appends each row's new key/value back to its own cache. On a CPU a
batch of 8 costs about as much as one sequence (memory-bound decoding), so concurrent
trajectories come almost for free.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass
class _Request:
    feed: list[int]
    cache: Any
    logits: Any = None
    error: BaseException | None = None
    done: bool = False


class Batcher:
    """Runs one model's forward passes for every thread generating with it.

    A thread inside :meth:`session` calls :meth:`forward` once per step; the first caller
    to find the model idle waits (at most ``wait_s``) for the other active sessions to
    submit their step, then runs them together: decode steps of conversations with a cache
    as one batch, short prefills (what other agents wrote since a turn) as another padded
    batch; long or first prefills one by one.
    """

    def __init__(self, model: Any, device: str, wait_s: float = 0.01, max_batch: int = 64,
                 max_feed: int = 32) -> None:
        self.model = model
        self.device = device
        self.wait_s = wait_s
        self.max_batch = max_batch
        self.max_feed = max_feed
        """Steps feeding more new tokens than this (long prefills) run on their own."""
        self.lock = threading.Lock()
        """Held while the model runs; take it to use the model outside :meth:`forward`."""
        self.cache_arg = cache_argument(model)
        self._cv = threading.Condition()
        self._pending: list[_Request] = []
        self._active = 0
        self._busy = False
        self.batches = 0
        self.batched_rows = 0

    @contextmanager
    def session(self) -> Iterator[None]:
        """Marks a thread as generating, so a step waits for it before running."""
        with self._cv:
            self._active += 1
        try:
            yield
        finally:
            with self._cv:
                self._active -= 1
                self._cv.notify_all()

    def forward(self, feed: list[int], cache: Any) -> Any:
        """Float logits of the next token after ``feed``; ``cache`` is extended in place."""
        request = _Request(list(feed), cache)
        with self._cv:
            self._pending.append(request)
            self._cv.notify_all()
            deadline = time.monotonic() + self.wait_s
            while not request.done:
                if self._busy or not self._pending:
                    self._cv.wait()
                    continue
                left = deadline - time.monotonic()
                if len(self._pending) < self._active and left > 0:
                    self._cv.wait(left)
                    continue
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                self._busy = True
                self._cv.release()
                try:
                    self._run(batch)
                finally:
                    self._cv.acquire()
                    self._busy = False
                    self._cv.notify_all()
        if request.error is not None:
            raise request.error
        return request.logits

    # the model ----------------------------------------------------------------------------
    def _run(self, batch: list[_Request]) -> None:
        import torch

        with self.lock, torch.inference_mode():
            joint = [r for r in batch if len(r.feed) <= self.max_feed and _paddable(r.cache)]
            singles = [r for r in batch if r not in joint]
            groups = []
            for group in split_by_width(joint):
                if len(group) == 1:
                    singles += group
                else:
                    groups.append(group)
            for request in singles:
                self._guard([request], self._single, request)
            for group in groups:
                self._guard(group, self._batched, group)

    def _guard(self, requests: list[_Request], fn: Any, arg: Any) -> None:
        try:
            fn(arg)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting threads, raised there
            for r in requests:
                r.error = exc
        for r in requests:
            r.done = True

    def _single(self, request: _Request) -> None:
        import torch

        out = self.model(input_ids=torch.tensor([request.feed], device=self.device),
                         use_cache=True, logits_to_keep=1, **{self.cache_arg: request.cache})
        request.logits = out.logits[0, -1].float()

    def _batched(self, requests: list[_Request]) -> None:
        """One forward for several conversations: row i is its cache, left-padded to the
        longest, then its new tokens, left-padded to the most new tokens (pads masked)."""
        import torch
        from transformers import DynamicCache

        from relaygraph.agents.kv_cache import GrowingLayer

        lengths = [r.cache.get_seq_length() for r in requests]
        longest, width = max(lengths), max(len(r.feed) for r in requests)
        rows = len(requests)
        joint = DynamicCache()
        joint.layers = []
        for index in range(len(requests[0].cache.layers)):
            # one copy of each row's cache into buffers sized for the step: the model
            # writes its new keys and values into the room after ``longest``
            first = requests[0].cache.layers[index]
            keys = first.keys.new_empty((rows, first.keys.shape[1], longest + width,
                                         first.keys.shape[3]))
            values = first.values.new_empty((rows, first.values.shape[1], longest + width,
                                             first.values.shape[3]))
            for row, (r, n) in enumerate(zip(requests, lengths, strict=True)):
                layer = r.cache.layers[index]
                keys[row, :, :longest - n].zero_()  # pads: masked, but never garbage (NaN)
                values[row, :, :longest - n].zero_()
                keys[row, :, longest - n:longest] = layer.keys[0]
                values[row, :, longest - n:longest] = layer.values[0]
            joint.layers.append(GrowingLayer.sized(keys, values, longest))
        mask = torch.zeros(rows, longest + width, dtype=torch.long, device=self.device)
        ids = torch.zeros(rows, width, dtype=torch.long, device=self.device)
        positions = torch.zeros(rows, width, dtype=torch.long, device=self.device)
        for row, (r, n) in enumerate(zip(requests, lengths, strict=True)):
            f = len(r.feed)
            mask[row, longest - n:longest] = 1
            mask[row, longest + width - f:] = 1
            ids[row, width - f:] = torch.tensor(r.feed, device=self.device)
            positions[row, :] = n  # pads: any position, they are masked
            positions[row, width - f:] = torch.arange(n, n + f, device=self.device)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         use_cache=True, logits_to_keep=1, **{self.cache_arg: joint})
        for row, r in enumerate(requests):
            f = len(r.feed)
            for index, layer in enumerate(joint.layers):
                r.cache.layers[index].update(layer.keys[row:row + 1, :, -f:],
                                             layer.values[row:row + 1, :, -f:])
            r.logits = out.logits[row, -1].float()
        self.batches += 1
        self.batched_rows += rows


def split_by_width(requests: list[_Request]) -> list[list[_Request]]:
    """Decode steps (one new token) apart from catch-up prefills (several): in one padded
    batch every row would be as wide as the widest, so a few turns starting with a catch-up
    of 9 tokens would make 32 decode rows cost a 288-token forward instead of 32 + 36."""
    decode = [r for r in requests if len(r.feed) == 1]
    prefill = [r for r in requests if len(r.feed) > 1]
    return [group for group in (decode, prefill) if group]


def cache_argument(model: Any) -> str:
    """The name the model's ``forward`` takes its KV cache by: ``cache`` in current
    transformers, ``past_key_values`` before (deprecated, removed in 5.40)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _paddable(cache: Any) -> bool:
    """A cache whose layers are plain, non-empty dynamic layers (no sliding window) of
    one sequence."""
    from transformers.cache_utils import DynamicLayer

    from relaygraph.agents.kv_cache import GrowingLayer

    layers = getattr(cache, "layers", None)
    if not layers:
        return False
    return all(
        type(layer) in (DynamicLayer, GrowingLayer) and layer.is_initialized
        and layer.keys.numel() > 0 and layer.keys.shape[0] == 1
        for layer in layers
    )
