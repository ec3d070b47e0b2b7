"""Local weights through Hugging Face transformers: one decode loop with a reusable KV cache.

The loop generates token by token under a :class:`~relaygraph.agents.backend.StopRule`;
the forward passes of concurrent calls go through one :class:`~relaygraph.agents.batching.Batcher`,
which runs their decode steps as one batch.
Each ``cache_key`` (one agent in one trajectory) keeps its KV cache between calls: the
next call prefills only the tokens that differ from what the cache holds (what other
agents wrote since this agent's last turn), cropping the cache where the view changed.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from relaygraph.agents.backend import (
    Generation,
    Prompt,
    Sampling,
    StopRule,
    TextCallback,
    TokenStep,
)
from relaygraph.agents.batching import Batcher
from relaygraph.agents.catalog import resolve
from relaygraph.errors import ConfigError, ModelNotFoundError, RelayGraphError


class ContextTooLongError(RelayGraphError):
    """The prompt plus the token budget does not fit the model's context window."""


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    raw = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


class TransformersBackend:
    """A causal LM loaded with transformers (catalog name, local folder, ``.gguf`` or hub id).

    ``dtype`` defaults to bfloat16 (what the paper-scale models want on CPU);
    ``cache_size`` bounds how many conversations keep a KV cache (least recently used
    are dropped).
    """

    def __init__(self, model: str, dtype: str = "bfloat16", device: str = "cpu",
                 cache_size: int = 32) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

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
            self.model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype, **kwargs)
        except OSError as exc:
            raise ModelNotFoundError(
                f"cannot load model {model!r} ({str(exc).splitlines()[0]}); check the path or "
                "hub id, or pull a catalog model with `relaygraph models pull`"
            ) from None
        self.model.to(device).eval()
        self.device = device
        self.tokenizer_id = _tokenizer_fingerprint(self.tokenizer)
        self.eos_ids = self._eos_ids()
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 20)
        self._caches: OrderedDict[str, tuple[list[int], Any]] = OrderedDict()
        self.cache_size = cache_size
        """Conversations whose KV cache is kept (least recently used dropped); 0 = no reuse."""
        self._cache_lock = threading.Lock()
        self.batcher = Batcher(self.model, device)

    def _eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        for source in (self.model.config, self.model.generation_config):
            value = getattr(source, "eos_token_id", None) if source is not None else None
            ids.update(value if isinstance(value, list) else [value] if value is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(ids)

    # rendering --------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=False)

    def render(self, prompt: Prompt) -> list[int]:
        """Token ids of the chat-templated task followed by the agent's view.

        Segments carrying token ids of this tokenizer are used as they are; other text is
        encoded (consecutive foreign segments together, so no seam appears between them).
        """
        messages = [{"role": "user", "content": prompt.question}]
        if prompt.system_prompt:
            messages.insert(0, {"role": "system", "content": prompt.system_prompt})
        if self.tokenizer.chat_template:
            head = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True)
        else:
            head = "".join(f"{m['role'].title()}: {m['content']}\n" for m in messages) + "Assistant: "
        ids = self.encode(head)
        pending: list[str] = []
        for seg in prompt.continuation:
            if seg.token_ids is not None and seg.tokenizer == self.tokenizer_id:
                if pending:
                    ids += self.encode("".join(pending))
                    pending = []
                ids += seg.token_ids
            else:
                pending.append(seg.text)
        if pending:
            ids += self.encode("".join(pending))
        return ids

    # generation -------------------------------------------------------------------------
    def _take_cache(self, cache_key: str | None, ids: list[int]) -> tuple[Any, int]:
        """A cache holding a prefix of ``ids`` (at least one token left to feed)."""
        from transformers import DynamicCache

        with self._cache_lock:
            entry = self._caches.pop(cache_key, None) if cache_key else None
        if entry is not None:
            seen, cache = entry
            common = 0
            for a, b in zip(seen, ids):
                if a != b:
                    break
                common += 1
            common = min(common, len(ids) - 1)
            if common > 0 and cache.is_croppable:
                if len(seen) > common:
                    cache.crop(-(len(seen) - common))
                return cache, common
        return DynamicCache(config=self.model.config), 0

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
        if len(ids) >= self.max_context:
            raise ContextTooLongError(
                f"the prompt ({len(ids)} tokens) does not fit {self.model_id}'s context of "
                f"{self.max_context} tokens; shorten the question"
            )
        limit = min(rule.max_tokens, self.max_context - len(ids))
        generator = None
        if sampling.temperature > 0 and sampling.seed is not None:
            generator = torch.Generator().manual_seed(sampling.seed)
        with self.batcher.session(), torch.inference_mode():
            cache, cached = self._take_cache(cache_key, ids)
            seen = ids[:cached]  # exactly the tokens the cache holds
            feed = ids[cached:]
            out_ids: list[int] = []
            logprobs: list[float] = []
            text, emitted = "", 0
            rejected = None
            finish = "budget" if limit == rule.max_tokens else "length"
            while len(out_ids) < limit:
                logits = self.batcher.forward(feed, cache)
                seen += feed
                logp = torch.log_softmax(logits, dim=-1)
                token = _choose(logp, sampling, generator)
                if token in self.eos_ids:
                    finish = "eos"
                    break
                if rule.check is not None:
                    entropy = float(-(logp.exp() * logp).nan_to_num().sum())
                    step = TokenStep(token, float(logp[token]), entropy, len(out_ids))
                    if rule.check(step):
                        finish, rejected = "low_confidence", step
                        break
                out_ids.append(token)
                logprobs.append(float(logp[token]))
                previous = len(text)
                text = self.decode(out_ids)
                if on_text is not None and not text.endswith("\ufffd") and len(text) > emitted:
                    on_text(text[emitted:])
                    emitted = len(text)
                if _hit_stop(text, previous, rule.stop_strings):
                    finish = "stop"
                    break
                feed = [token]
            self._keep_cache(cache_key, seen, cache)
        if on_text is not None and len(text) > emitted:
            on_text(text[emitted:])
        return Generation(
            text=text, token_ids=out_ids, logprobs=logprobs, finish_reason=finish,  # type: ignore[arg-type]
            prompt_tokens=len(ids), prefilled_tokens=len(ids) - cached,
            seconds=time.perf_counter() - start_time, tokenizer=self.tokenizer_id,
            rejected=rejected,
        )


    def next_token_logprobs(self, prompt: Prompt, candidates: Sequence[str]) -> dict[str, float]:
        """Log-probability of each candidate's first token right after ``prompt``."""
        import torch

        ids = self.render(prompt)
        with self.batcher.lock, torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0, -1]
            logp = torch.log_softmax(logits.float(), dim=-1)
        return {c: float(logp[self.encode(c)[0]]) for c in candidates}


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


def _hit_stop(text: str, previous: int, stop_strings: tuple[str, ...]) -> bool:
    """True when a stop string ends inside the text added since ``previous``."""
    for stop in stop_strings:
        if stop in text[max(0, previous - len(stop) + 1):]:
            return True
    return False
