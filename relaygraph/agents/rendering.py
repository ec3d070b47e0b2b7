"""Prompts as token ids, identically for every backend of the same tokenizer.

A prompt is the task rendered with the model's own chat template (system prompt, question,
generation prompt) followed by the agent's view of the shared reasoning, which the model
continues as its own assistant message. Segments whose token ids belong to this tokenizer
(equal :func:`tokenizer_fingerprint`) are used as they are, so agents sharing a tokenizer
exchange ids with nothing re-tokenized; other text is encoded.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from relaygraph.agents.backend import Prompt
from relaygraph.errors import ModelNotFoundError


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of the tokenizer's vocabulary and rules: equal fingerprints mean two
    models can share token ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    raw = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def load_tokenizer(model: str) -> Any:
    """The tokenizer of a catalog name, local folder, ``.gguf`` file or hub id."""
    from transformers import AutoTokenizer

    location, kwargs = _location(model)
    try:
        return AutoTokenizer.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"cannot load the tokenizer of {model!r} ({str(exc).splitlines()[0]}); give a "
            "catalog name, a local folder, a .gguf file or a hub id"
        ) from None


def _location(model: str) -> tuple[str, dict[str, Any]]:
    from relaygraph.agents.catalog import resolve

    path = Path(resolve(model))
    if path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    return str(path), {}


def eos_token_ids(tokenizer: Any, *configs: Any) -> frozenset[int]:
    """End-of-sequence ids: the tokenizer's plus those of model/generation configs."""
    ids: set[int] = set()
    for source in configs:
        value = getattr(source, "eos_token_id", None) if source is not None else None
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def generation_eos_ids(model: str, tokenizer: Any) -> frozenset[int]:
    """EOS ids for ``model`` without loading its weights (its model and generation configs,
    when present, plus the tokenizer's) — what a server stops on by default."""
    from transformers import AutoConfig, GenerationConfig

    location, kwargs = _location(model)
    configs = []
    for kind in (AutoConfig, GenerationConfig):
        try:
            configs.append(kind.from_pretrained(location, **kwargs))
        except (OSError, ValueError):
            pass
    return eos_token_ids(tokenizer, *configs)


class Renderer:
    """Renders prompts into token ids of one tokenizer (shared by all backends)."""

    HEADS = 256
    """Rendered task heads kept (a relay renders the same head every turn)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.tokenizer_id = tokenizer_fingerprint(tokenizer)
        self._heads: dict[tuple[Any, ...], list[int]] = {}
        self._lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=False)

    def head(self, prompt: Prompt) -> str:
        """The chat-templated task up to the start of the assistant's message."""
        messages = [{"role": "user", "content": prompt.question}]
        if prompt.system_prompt:
            messages.insert(0, {"role": "system", "content": prompt.system_prompt})
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True,
                                                      **prompt.template_kwargs)
        return "".join(f"{m['role'].title()}: {m['content']}\n" for m in messages) + "Assistant: "

    def _head_ids(self, prompt: Prompt) -> list[int]:
        """The head's token ids, rendered once per task (the chat template is the costly
        part of a turn's rendering); tasks with unhashable template options are not kept."""
        try:
            key = (prompt.question, prompt.system_prompt,
                   tuple(sorted(prompt.template_kwargs.items())))
            hash(key)
        except TypeError:
            return self.encode(self.head(prompt))
        ids = self._heads.get(key)
        if ids is None:
            ids = self.encode(self.head(prompt))
            with self._lock:
                if len(self._heads) >= self.HEADS:
                    self._heads.pop(next(iter(self._heads)))
                self._heads[key] = ids
        return ids

    def render(self, prompt: Prompt) -> list[int]:
        """Token ids of the chat-templated task followed by the agent's view.

        Segments carrying token ids of this tokenizer are used as they are; other text is
        encoded (consecutive foreign segments together, so no seam appears between them).
        """
        ids = list(self._head_ids(prompt))
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



class TokenizerBackend:
    """What every backend with a local tokenizer shares: rendering through its
    :class:`Renderer` (``self.renderer``), and no-op ``drop_cache``/``close``."""

    renderer: Renderer
    tokenizer: Any
    model_id: str
    max_context: int

    @property
    def tokenizer_id(self) -> str:
        return self.renderer.tokenizer_id

    def encode(self, text: str) -> list[int]:
        return self.renderer.encode(text)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.renderer.decode(token_ids)

    def render(self, prompt: Prompt) -> list[int]:
        """Token ids of the chat-templated task followed by the agent's view."""
        return self.renderer.render(prompt)

    def drop_cache(self, cache_key: str) -> None:
        """Nothing is cached here (servers and engines keep their own prefix caches)."""

    def close(self) -> None:
        """Nothing to release."""
