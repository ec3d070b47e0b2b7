"""Local weights through Hugging Face transformers, with a reusable KV cache per conversation.

The model's sampled tokens go through the stop rule shared by every backend
(:func:`relaygraph.agents.decoding.follow`). Each ``cache_key`` (one agent in one
trajectory) keeps its KV cache between calls: the next call prefills only the tokens that
differ from what the cache holds (what other agents wrote since this agent's last turn),
cropping the cache where the view changed. The forward passes of concurrent calls go
through one :class:`~relaygraph.agents.batching.Batcher`, which runs them as one batch.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import OrderedDict
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from relaygraph.agents.backend import (
    Capabilities,
    CommandSyntax,
    Generation,
    Prompt,
    Sampling,
    StopRule,
    TextCallback,
)
from relaygraph.agents.batching import Batcher
from relaygraph.agents.catalog import dense_gguf, resolve
from relaygraph.agents.decoding import (
    ContextTooLongError,
    Sample,
    completes_bad_word,
    follow,
    token_limit,
)
from relaygraph.agents.registry import AgentConfig
from relaygraph.agents.rendering import Renderer, TokenizerBackend, eos_token_ids, tokenizer_fingerprint
from relaygraph.errors import ConfigError, ModelNotFoundError

__all__ = ["ContextTooLongError", "TransformersBackend", "tokenizer_fingerprint"]


class TransformersBackend(TokenizerBackend):
    """A causal LM loaded with transformers (catalog name, local folder, ``.gguf`` or hub id).

    ``dtype`` defaults to bfloat16 (what the paper-scale models want on CPU);
    ``cache_size`` bounds how many conversations keep a KV cache (least recently used
    are dropped; 0 turns reuse off); ``random_weights`` builds the architecture from its
    config with random weights (for benchmarks where only config and tokenizer are at hand).
    """

    capabilities: ClassVar[Capabilities] = Capabilities(constrained=True)

    def __init__(self, model: str, dtype: str = "bfloat16", device: str = "cpu",
                 cache_size: int = 32, random_weights: bool = False) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        self.model_id = model
        location = resolve(model)
        kwargs: dict[str, Any] = {}
        path = Path(location)
        if path.suffix == ".gguf":
            kwargs["gguf_file"] = path.name
            location = str(path.parent)
        try:
            torch_dtype = getattr(torch, dtype)
        except AttributeError:
            raise ConfigError(f"unknown dtype {dtype!r}; use bfloat16, float16 or float32") from None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
            if random_weights:
                config = AutoConfig.from_pretrained(location, **kwargs)
                self.model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
            else:
                dense = dense_gguf() if "gguf_file" in kwargs else {}  # in --dtype, no advice
                self.model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype,
                                                                  **kwargs, **dense)
        except (OSError, ValueError) as exc:  # missing files, a format transformers cannot read
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelNotFoundError(
                f"cannot load model {model!r} ({why}); check the path or hub id, or pull a "
                "catalog model with `relaygraph models pull`"
            ) from None
        self.model.to(device).eval()
        self._attach(self.model, self.tokenizer, device, cache_size)

    @classmethod
    def from_loaded(cls, model: Any, tokenizer: Any, model_id: str = "model",
                    cache_size: int = 32) -> TransformersBackend:
        """A backend on a model already in memory (e.g. the one being trained: rollouts
        decode with its live weights, without a copy)."""
        backend = cls.__new__(cls)
        backend.model_id = model_id
        backend._attach(model, tokenizer, str(next(model.parameters()).device), cache_size)
        return backend

    def _attach(self, model: Any, tokenizer: Any, device: str, cache_size: int) -> None:
        """Everything derived from a loaded model and tokenizer."""
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.renderer = Renderer(tokenizer)
        self.eos_ids = eos_token_ids(tokenizer, model.config, model.generation_config)
        self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 20)
        self.cache_size = cache_size
        """Conversations whose KV cache is kept (least recently used dropped); 0 = no reuse."""
        self._caches: OrderedDict[str, tuple[list[int], Any]] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.batcher = Batcher(model, device)

    # the KV cache of each conversation ------------------------------------------------
    def _take_cache(self, cache_key: str | None, ids: list[int]) -> tuple[Any, int]:
        """A cache holding a prefix of ``ids`` (at least one token left to feed)."""
        from relaygraph.agents.kv_cache import growing_cache

        with self._cache_lock:
            entry = self._caches.pop(cache_key, None) if cache_key else None
        if entry is not None:
            seen, cache = entry
            common = 0
            for a, b in zip(seen, ids, strict=False):  # a common prefix
                if a != b:
                    break
                common += 1
            common = min(common, len(ids) - 1)
            if common > 0 and cache.is_croppable:
                if len(seen) > common:
                    cache.crop(-(len(seen) - common))
                return cache, common
        return growing_cache(self.model.config), 0

    def _keep_cache(self, cache_key: str | None, seen: list[int], cache: Any) -> None:
        if cache_key is None:
            return
        with self._cache_lock:
            self._caches[cache_key] = (seen, cache)
            while len(self._caches) > self.cache_size:
                self._caches.popitem(last=False)

    def drop_cache(self, cache_key: str) -> None:
        with self._cache_lock:
            self._caches.pop(cache_key, None)

    # generation -------------------------------------------------------------------------
    def generate(
        self,
        prompt: Prompt,
        rule: StopRule,
        sampling: Sampling = Sampling(),
        on_text: TextCallback | None = None,
        cache_key: str | None = None,
    ) -> Generation:
        import torch

        start_time = time.perf_counter()
        ids = self.render(prompt)
        limit = token_limit(len(ids), rule, self.max_context, self.model_id)
        generator = None
        if sampling.temperature > 0 and sampling.seed is not None:
            generator = torch.Generator().manual_seed(sampling.seed)
        with self.batcher.session(), torch.inference_mode():
            cache, cached = self._take_cache(cache_key, ids)
            seen = ids[:cached]  # grows to exactly the tokens the cache holds
            samples = self._samples(ids[cached:], cache, seen, sampling, generator, rule)
            out = follow(samples, rule, self.decode, self.eos_ids, limit, on_text)
            samples.close()
            self._keep_cache(cache_key, seen, cache)
        return Generation(
            text=out.text, token_ids=out.token_ids, logprobs=out.logprobs,
            finish_reason=out.finish_reason or "length", prompt_tokens=len(ids),
            prefilled_tokens=len(ids) - cached, seconds=time.perf_counter() - start_time,
            tokenizer=self.tokenizer_id, rejected=out.rejected,
        )

    def _samples(self, feed: list[int], cache: Any, seen: list[int], sampling: Sampling,
                 generator: Any, rule: StopRule) -> Generator[Sample, None, None]:
        """The decode loop: feed, sample, repeat — until the stop rule stops pulling.
        A token the rule refuses (it would write one of ``bad_words``, or break its
        ``command``) is masked and another one sampled."""
        import torch

        bad_words, command = rule.bad_words, rule.command
        start = len(seen) + len(feed)  # where this generation's tokens begin in ``seen``
        # a command's text, whole, is at most this many tokens (ASCII: a character or more each)
        reach = len(command.open) + command.max_digits + len(command.close) if command else 0

        def refused(token: int) -> bool:
            if bad_words and completes_bad_word(seen, token, bad_words, self.decode):
                return True
            return command is not None and not command.allows(
                self.decode([*seen[max(start, len(seen) - reach):], token]))

        while True:
            logits = self.batcher.forward(feed, cache)
            seen += feed
            logp = torch.log_softmax(logits, dim=-1)
            token = _choose(logp, sampling, generator)
            masked = 0
            while refused(token):
                logits[token] = float("-inf")
                masked += 1
                if command is not None and masked == 16:  # inside a command: its few candidates
                    logits = _only(logits, self._command_ids(command))
                if not torch.isfinite(logits).any():
                    break  # nothing left to sample: keep the refused token (parsed as malformed)
                logp = torch.log_softmax(logits, dim=-1)
                token = _choose(logp, sampling, generator)
            yield Sample(token, float(logp[token]), functools.partial(_entropy, logp))
            feed = [token]

    def _command_ids(self, command: CommandSyntax) -> list[int]:
        """Token ids that can continue a command: the ten digits and the tokens of
        ``close``."""
        return sorted({t for piece in (*"0123456789", command.close) for t in self.encode(piece)})

    def prefill_seconds(self, ids: Sequence[int], spans: Sequence[tuple[int, int]]) -> list[float]:
        """Seconds of each prefill of ``ids[start:end]`` onto a KV cache holding
        ``ids[:start]``, each run and timed alone (the bench's floor: the catch-up a relay
        cannot avoid). One prefill of the longest prefix builds the cache, cropped back
        for each span, latest first."""
        import torch

        from relaygraph.agents.kv_cache import growing_cache

        out = [0.0] * len(spans)
        if not spans:
            return out
        order = sorted(range(len(spans)), key=lambda i: spans[i][0], reverse=True)
        with self.batcher.lock, torch.inference_mode():
            cache = growing_cache(self.model.config)
            top = spans[order[0]][0]
            if top:
                self.model(input_ids=torch.tensor([list(ids[:top])], device=self.device),
                           use_cache=True, logits_to_keep=1, **{self.batcher.cache_arg: cache})
            for i in order:
                start, end = spans[i]
                if (extra := cache.get_seq_length() - start) > 0:
                    cache.crop(-extra)
                feed = torch.tensor([list(ids[start:end])], device=self.device)
                began = time.perf_counter()
                logits = self.model(input_ids=feed, use_cache=True, logits_to_keep=1,
                                    **{self.batcher.cache_arg: cache}).logits[0, -1].float()
                int(torch.argmax(logits))  # as a turn's first step does: wait for the result
                out[i] = time.perf_counter() - began
        return out

    def next_token_logprobs(self, prompt: Prompt, candidates: Sequence[str]) -> dict[str, float]:
        """Log-probability of each candidate's first token right after ``prompt``."""
        import torch

        ids = self.render(prompt)
        with self.batcher.lock, torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0, -1]
            logp = torch.log_softmax(logits.float(), dim=-1)
        return {c: float(logp[self.encode(c)[0]]) for c in candidates}


def _entropy(logp: Any) -> float:
    """Entropy of a log-softmax distribution (nats)."""
    return float(-(logp.exp() * logp).nan_to_num().sum())


def _only(logits: Any, ids: Sequence[int]) -> Any:
    """``logits`` with every id but ``ids`` (and those already masked) masked."""
    import torch

    kept = torch.full_like(logits, float("-inf"))
    kept[list(ids)] = logits[list(ids)]
    return kept


def _choose(logp: Any, sampling: Sampling, generator: Any) -> int:
    import torch

    if sampling.temperature <= 0:
        return int(torch.argmax(logp))
    probs = torch.softmax(logp / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < sampling.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


class TransformersConfig(AgentConfig):
    """Local weights run by transformers (the default backend)."""

    backend: Literal["transformers"] = "transformers"
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    device: str = "cpu"
    trusted_fields: ClassVar[frozenset[str]] = frozenset()  # the model is checked by itself

    def key(self) -> tuple[Any, ...]:
        return ("transformers", self.model, self.dtype, self.device)

    def build(self) -> TransformersBackend:
        return TransformersBackend(self.model, dtype=self.dtype, device=self.device)

    def describe(self) -> str:
        return f"{self.model} (transformers, {self.dtype})"
