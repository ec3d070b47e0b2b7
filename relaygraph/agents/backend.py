"""What every backend does: continue a prompt under a stop rule and report what it wrote.

Plain config objects in, plain result objects out (in the spirit of vLLM's
``SamplingParams``): :class:`StopRule` says when to stop, :class:`Prompt` is what to
continue, :class:`Generation` is what came back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from relaygraph.trajectory.models import FinishReason, Segment


@dataclass(frozen=True)
class TokenStep:
    """One candidate token, offered to :attr:`StopRule.check` before it is kept."""

    token_id: int
    logprob: float
    entropy: float
    position: int
    """Index of this token among the tokens generated in this call (0-based)."""


@dataclass(frozen=True)
class StopRule:
    """When a generation stops.

    - ``max_tokens``: budget of new tokens (finish reason ``budget``);
    - ``stop_strings``: stop once the new text ends with one of these; the stop string is
      kept in the output (finish reason ``stop``; only newly generated text is searched);
    - ``check``: called for every sampled token; returning True stops *before* that
      token, which is discarded (finish reason ``low_confidence``);
    - end of sequence always stops (finish reason ``eos``; the EOS token is not returned);
    - ``bad_words``: strings the model may not write, banned at decode time. The
      transformers backend bans them on the text (a token that would complete one is never
      sampled, however the word is split into tokens); vLLM (in-process or served) applies
      its ``bad_words`` (the word's own tokenizations, with and without a leading space).
    - ``command``: the model writes this command only whole (see :class:`CommandSyntax`);
      backends whose decoding cannot be constrained token by token
      (``Capabilities.constrained`` False: vLLM, servers) are refused before a run.
    """

    max_tokens: int
    stop_strings: tuple[str, ...] = ()
    check: Callable[[TokenStep], bool] | None = None
    bad_words: tuple[str, ...] = ()
    command: CommandSyntax | None = None


@dataclass(frozen=True)
class CommandSyntax:
    """A command a model may write only well-formed: ``open``, 1 to ``max_digits`` ASCII
    digits, ``close`` (RelayLLM's ``<call>n</call>``). Decoding masks any token that would
    write ``close`` outside a command, or anything but digits (then ``close``) after
    ``open``; the decision to write ``open`` stays the model's."""

    open: str
    close: str
    max_digits: int = 4

    def allows(self, text: str) -> bool:
        """Whether ``text`` (a generation so far) can still be, or end, well-formed: no
        ``close`` before the last ``open``, and after it a prefix of digits + ``close``."""
        start = text.rfind(self.open)
        if start < 0:
            return self.close not in text
        if self.close in text[:start]:
            return False
        body = text[start + len(self.open):]
        digits = len(body) - len(body.lstrip("0123456789"))
        rest = body[digits:]
        if digits > self.max_digits:
            return False
        return not rest or (digits > 0 and self.close.startswith(rest))


@dataclass(frozen=True)
class Sampling:
    """Decoding settings: ``temperature == 0`` is greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class Prompt:
    """A task rendered for one agent: its system prompt, the question, and its view of the
    shared reasoning so far, which the model continues as its own assistant message."""

    question: str
    system_prompt: str | None = None
    continuation: Sequence[Segment] = ()
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Passed to the chat template, e.g. ``{"enable_thinking": False}`` for Qwen3's
    non-thinking mode."""


@dataclass
class Generation:
    """What a backend wrote in one call."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    prompt_tokens: int = 0
    """Tokens in the rendered prompt (the agent's whole view)."""
    prefilled_tokens: int = 0
    """Prompt tokens actually run through the model (less than ``prompt_tokens`` when a
    cached prefix was reused)."""
    seconds: float = 0.0
    tokenizer: str | None = None
    rejected: TokenStep | None = None
    """The token a ``StopRule.check`` refused (finish reason ``low_confidence``)."""
    completion_tokens: int | None = None
    """Tokens generated, when ``token_ids`` cannot say (a backend without a local
    tokenizer: ``token_ids`` is empty and this is the server's count)."""
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        """Tokens generated: the ids when known, else the server's count."""
        if self.token_ids or self.completion_tokens is None:
            return len(self.token_ids)
        return self.completion_tokens


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do beyond generating text (the optional part of :class:`Backend`).

    - ``token_ids``: generations carry the model's own token ids, and ``encode``,
      ``decode`` and ``render`` work (a local tokenizer). Without them a backend still
      generates and counts tokens (``Generation.completion_tokens``), but policies that
      cut a generation at a token (call-token's command split) cannot use it.
    - ``logprobs``: generations carry per-token log-probs and a ``StopRule.check`` is
      applied token by token (confidence policies). False when the server gives none.
    - ``constrained``: decoding honours ``StopRule.command`` (a local decode loop: the
      transformers backend).
    """

    token_ids: bool = True
    logprobs: bool = True
    constrained: bool = False


def capabilities(backend: Any) -> Capabilities:
    """A backend's :class:`Capabilities`: its ``capabilities`` attribute, else everything
    (the local backends have both)."""
    found = getattr(backend, "capabilities", None)
    return found if isinstance(found, Capabilities) else Capabilities()


TextCallback = Callable[[str], None]


@runtime_checkable
class Backend(Protocol):
    """A model that continues prompts: local weights (``TransformersBackend``), a vLLM server
    (``OpenAIBackend``), vLLM in-process (``VLLMBackend``) or any chat API (``ChatBackend``).

    ``encode``/``decode``/``render`` need a local tokenizer; a backend without one says so
    in its ``capabilities`` (see :class:`Capabilities`) and raises a ConfigError there."""

    @property
    def model_id(self) -> str:
        """What the user asked for (catalog name, path or hub id), for traces and records."""
        ...

    @property
    def tokenizer_id(self) -> str:
        """Fingerprint of the tokenizer; equal fingerprints mean token ids can be shared."""
        ...

    @property
    def max_context(self) -> int:
        """Most tokens (prompt and generated) the model takes."""
        ...

    def generate(
        self,
        prompt: Prompt,
        rule: StopRule,
        sampling: Sampling = Sampling(),
        on_text: TextCallback | None = None,
        cache_key: str | None = None,
    ) -> Generation:
        """Continue ``prompt`` until ``rule`` stops it, calling ``on_text`` with each new
        piece of text. ``cache_key`` names a conversation whose KV cache may be reused."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids`` in this backend's tokenizer."""
        ...

    def render(self, prompt: Prompt) -> list[int]:
        """Token ids of the chat-templated task followed by the agent's view."""
        ...

    def drop_cache(self, cache_key: str) -> None:
        """Forget a conversation's cached state (a no-op where nothing is cached)."""
        ...

    def close(self) -> None:
        """Release the model (connections, engines); a no-op where there is nothing to free."""
        ...


@runtime_checkable
class ScoringBackend(Backend, Protocol):
    """A backend that can score candidate continuations (for ``score:AGENT`` supervisors
    and process reward models)."""

    def next_token_logprobs(self, prompt: Prompt, candidates: Sequence[str]) -> dict[str, float]:
        """Log-probability of each candidate string as the start of the answer to ``prompt``."""
        ...


def cache_key(trajectory_id: str, turn_of: str, writer: str) -> str:
    """The conversation (KV-cache slot) of agent ``writer`` writing ``turn_of``'s turns of a
    trajectory (a fallback writes in the slot of the agent whose turn it is)."""
    return f"{trajectory_id}/{turn_of}/{writer}"


def provider_name(backend: Any) -> str:
    """``gen_ai.provider.name`` of a backend: its ``provider_name`` attribute, else the class
    name without ``Backend`` (``TransformersBackend`` -> ``transformers``)."""
    name = getattr(backend, "provider_name", None)
    if isinstance(name, str) and name:
        return name
    cls = type(backend).__name__
    return (cls[:-len("Backend")] if cls.endswith("Backend") and len(cls) > 7 else cls).lower()
