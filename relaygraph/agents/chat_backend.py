"""Any chat-completions API as an agent: hosted models (OpenAI, any provider's
OpenAI-compatible endpoint, a LiteLLM proxy), Ollama, llama.cpp's server, SGLang, vLLM's
chat endpoint, or another ``relaygraph serve``.

Built on the official ``openai`` SDK (its retries, timeouts and typed errors). The agent
continues the shared trajectory in one of two ways (``continuation``):

- ``prefill``: the trajectory so far is the start of the assistant's message, which the
  model continues (vLLM/SGLang/relaygraph: ``continue_final_message`` with
  ``add_generation_prompt: false``; llama.cpp and Ollama continue a final assistant
  message by themselves). The model writes exactly the next tokens of the shared text.
- ``instruct``: for servers that cannot prefill (hosted chat APIs), the trajectory is given
  in the user turn with an instruction to continue it (:data:`INSTRUCT`). The model writes
  a new message that is appended as the continuation; it may restate or re-style what
  came before, which a prefilled continuation never does.
- ``auto`` (the default) picks ``prefill`` for servers known to support it (from the
  ``owned_by`` of ``/v1/models``: vllm, sglang, relaygraph, llamacpp, ollama), else
  ``instruct``.

Stop rules: the budget is ``max_tokens``; stop strings are checked on the merged text (and
sent as ``stop`` to servers that report which one matched, so they stop at once); a
per-token ``check`` runs on the streamed ``logprobs``/``top_logprobs`` and a refused token
closes the stream (the server aborts the request). Whether a server streams log-probs is
asked once (a one-token request) unless ``logprobs`` is set in the config; a policy that
needs them on a server that gives none is refused before the run starts.

Tokens: without a local ``tokenizer`` the backend has no token ids (``capabilities``
says so; ``encode``/``decode``/``render`` raise a ConfigError): counts come from the
server's ``usage`` (or the streamed log-probs, one per token), and segments carry text.
With ``tokenizer`` the generated text is encoded with it (the canonical ids of the text,
which a sampling server may have reached by other ids), so policies that cut at token
boundaries work. Relays across tokenizers exchange text, exact at every seam.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field

from relaygraph.agents.backend import (
    Capabilities,
    Generation,
    Prompt,
    Sampling,
    StopRule,
    TextCallback,
)
from relaygraph.agents.decoding import Sample, entropy_from_top, follow
from relaygraph.agents.remote import (
    RemoteConfig,
    ServerResponseError,
    ServerUnavailableError,
    redact_base_url,
    split_url,
)
from relaygraph.errors import ConfigError, RelayGraphError

__all__ = ["INSTRUCT", "ChatBackend", "ChatConfig", "ServerProfile"]

Continuation = Literal["auto", "prefill", "instruct"]

INSTRUCT = (
    "{question}\n\n"
    "Here is the reasoning so far (written together with other models):\n\n"
    "<reasoning>\n{reasoning}\n</reasoning>\n\n"
    "Continue this reasoning from exactly where it stops, as if you had written it. Do not "
    "repeat or restate it and do not start a new answer: write only the text that comes next."
)
"""The user turn of an ``instruct`` continuation (``{question}``, ``{reasoning}``)."""


@dataclass(frozen=True)
class ServerProfile:
    """What relaygraph knows of a kind of server (by the ``owned_by`` of its model card)."""

    name: str
    prefill: bool = False
    """Continues a final assistant message."""
    prefill_flags: bool = False
    """Needs ``continue_final_message``/``add_generation_prompt`` to do so (vLLM style)."""
    stop_reason: bool = False
    """Reports which stop string ended a completion (``stop_reason``/``matched_stop``)."""
    local: bool = False
    """A server one runs oneself (takes ``max_tokens``; hosted APIs get
    ``max_completion_tokens``)."""


PROFILES = {
    "vllm": ServerProfile("vllm", prefill=True, prefill_flags=True, stop_reason=True, local=True),
    "sglang": ServerProfile("sglang", prefill=True, prefill_flags=True, stop_reason=True,
                            local=True),
    "relaygraph": ServerProfile("relaygraph", prefill=True, prefill_flags=True,
                                stop_reason=True, local=True),
    "llamacpp": ServerProfile("llamacpp", prefill=True, local=True),
    "ollama": ServerProfile("ollama", prefill=True, local=True),
    "library": ServerProfile("ollama", prefill=True, local=True),  # Ollama's library models
}
GENERIC = ServerProfile("openai")


@dataclass
class _Stream:
    """What a chat stream reported besides its text."""

    pieces: list[bytes] = field(default_factory=list)
    finish: str | None = None
    stop_reason: Any = None
    usage: Any = None


class ChatBackend:
    """A model behind ``/v1/chat/completions`` (see the module's docstring).

    ``base_url`` is the API's base (``.../v1``, as for the ``openai`` client), ``model`` the
    model's name there, ``api_key`` its key (None: the server takes none), ``tokenizer`` an
    optional local tokenizer (catalog name, folder, ``.gguf`` or hub id) for exact token
    ids, ``logprobs`` whether the server streams log-probs (None: ask it once).
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 continuation: Continuation = "auto", tokenizer: str | None = None,
                 logprobs: bool | None = None, timeout: float = 120.0,
                 connect_timeout: float = 5.0, max_retries: int = 2,
                 top_logprobs: int = 20) -> None:
        import openai

        _, auth = split_url(base_url)  # validates the URL
        if auth is not None:
            raise ConfigError("base_url must not contain credentials; put the API key in an "
                              "environment variable and name it in api_key_env")
        self.base_url = base_url.strip().rstrip("/")
        self.server = redact_base_url(self.base_url)
        self.model_id = model
        self.top_logprobs = top_logprobs
        self._client = openai.OpenAI(
            base_url=self.base_url, api_key=api_key or "unused", max_retries=max_retries,
            timeout=openai.Timeout(timeout, connect=connect_timeout))
        self._chat: Any = self._client.chat.completions  # requests built as dicts
        card = self._model_card()
        owner = str(card.get("owned_by") or "").lower() if card else ""
        self.profile = PROFILES.get(owner, GENERIC)
        self.provider_name = self.profile.name
        self.max_context = int(card.get("max_model_len") or 1 << 20) if card else 1 << 20
        if continuation == "auto":
            continuation = "prefill" if self.profile.prefill else "instruct"
        self.continuation: Literal["prefill", "instruct"] = continuation
        self._logprobs = logprobs
        self._lock = threading.Lock()
        self.tokenizer: Any = None
        self.renderer: Any = None
        if tokenizer:
            from relaygraph.agents.rendering import Renderer, load_tokenizer

            self.tokenizer = load_tokenizer(tokenizer)
            self.renderer = Renderer(self.tokenizer)

    # capabilities ---------------------------------------------------------------------------
    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(token_ids=self.renderer is not None, logprobs=self.logprobs)

    @property
    def logprobs(self) -> bool:
        """Whether the server streams per-token log-probs (asked once, then remembered)."""
        with self._lock:
            if self._logprobs is None:
                self._logprobs = self._probe_logprobs()
            return self._logprobs

    def _probe_logprobs(self) -> bool:
        import openai

        try:
            stream = self._chat.create(
                model=self.model_id, messages=[{"role": "user", "content": "Say OK."}],
                stream=True, logprobs=True, top_logprobs=1, **self._budget(1))
            with stream:
                return any(choice.logprobs is not None and choice.logprobs.content
                           for chunk in stream for choice in chunk.choices)
        except openai.BadRequestError:  # e.g. "logprobs are not supported"
            return False
        except openai.OpenAIError as exc:
            raise self._error(exc) from None

    @property
    def tokenizer_id(self) -> str:
        if self.renderer is not None:
            return str(self.renderer.tokenizer_id)
        return f"chat:{self.server}#{self.model_id}"  # shares ids with nobody

    # the Backend protocol's token part: only with a local tokenizer ---------------------------
    def _renderer(self) -> Any:
        if self.renderer is None:
            raise ConfigError(f"{self.model_id} (chat API at {self.server}) has no local "
                              "tokenizer; set tokenizer = \"...\" in its agent config")
        return self.renderer

    def encode(self, text: str) -> list[int]:
        return list(self._renderer().encode(text))

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self._renderer().decode(token_ids))

    def render(self, prompt: Prompt) -> list[int]:
        """The local tokenizer's rendering of the prompt (for counting; the server renders
        the messages with its own template)."""
        return list(self._renderer().render(prompt))

    def drop_cache(self, cache_key: str) -> None:
        """Nothing is cached here (a server keeps its own prefix cache)."""

    def close(self) -> None:
        self._client.close()

    # messages -------------------------------------------------------------------------------
    def messages(self, prompt: Prompt) -> tuple[list[dict[str, str]], bool]:
        """The chat messages of ``prompt`` and whether the last one is a prefilled
        assistant message."""
        messages = [{"role": "system", "content": prompt.system_prompt}] if prompt.system_prompt else []
        view = "".join(seg.text for seg in prompt.continuation)
        if not view:
            return [*messages, {"role": "user", "content": prompt.question}], False
        if self.continuation == "prefill":
            return [*messages, {"role": "user", "content": prompt.question},
                    {"role": "assistant", "content": view}], True
        return [*messages, {"role": "user",
                            "content": INSTRUCT.format(question=prompt.question, reasoning=view)}], False

    def _budget(self, n: int) -> dict[str, int]:
        return {"max_tokens": n} if self.profile.local else {"max_completion_tokens": n}

    # generation -----------------------------------------------------------------------------
    def generate(self, prompt: Prompt, rule: StopRule, sampling: Sampling = Sampling(),
                 on_text: TextCallback | None = None, cache_key: str | None = None) -> Generation:
        """Continue ``prompt`` (``cache_key`` is unused: the server's prefix cache, if it has
        one, finds the shared prefix by itself)."""
        import openai

        started = time.perf_counter()
        if rule.max_tokens <= 0:
            return Generation("", [], [], "budget", tokenizer=self._tokenizer_tag(),
                              completion_tokens=0)
        messages, prefill = self.messages(prompt)
        by_token = self.logprobs  # stream one log-prob per token: exact counts and checks
        if rule.check is not None and not by_token:
            raise ConfigError(f"{self.model_id} (chat API at {self.server}) gives no log-probs, "
                              "so a per-token check cannot run; use another policy")
        server_stops = bool(rule.stop_strings) and not by_token and self.profile.stop_reason
        request: dict[str, Any] = {
            "model": self.model_id, "messages": messages, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": sampling.temperature,
            "top_p": sampling.top_p, **self._budget(rule.max_tokens)}
        extra: dict[str, Any] = {}
        if sampling.seed is not None:
            request["seed"] = sampling.seed
        if by_token:
            request["logprobs"] = True
            if rule.check is not None:
                request["top_logprobs"] = self.top_logprobs
        if server_stops:
            request["stop"] = list(rule.stop_strings)
        if prefill and self.profile.prefill_flags:
            extra.update(continue_final_message=True, add_generation_prompt=False)
        if self.profile.name == "vllm":
            extra["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
            request.pop("stream_options")
        state = _Stream()
        try:
            stream = self._chat.create(**request, extra_body=extra or None)
        except openai.OpenAIError as exc:
            raise self._error(exc, prefill=prefill) from None
        try:
            decoded = follow(self._samples(stream, state, by_token), rule, state_decode(state),
                             frozenset(), rule.max_tokens, on_text)
            if decoded.finish_reason == "budget":  # the server stops here too: read its usage
                for _ in self._samples(stream, state, by_token):
                    break  # more text than the budget allowed: stop reading
        except openai.OpenAIError as exc:
            raise self._error(exc, prefill=prefill) from None
        finally:
            stream.close()  # a refused token or a stop string: closing aborts the request
        text = decoded.text
        finish = decoded.finish_reason
        if finish is None:
            if state.finish == "length":
                finish = "budget"
            elif state.finish is None:
                raise ServerResponseError(f"the chat server at {self.server} ended the stream "
                                          "without a finish reason")
            elif isinstance(state.stop_reason, str) and state.stop_reason in rule.stop_strings:
                finish = "stop"  # the server matched a stop string and left it out: put it back
                if not text.endswith(state.stop_reason):
                    text += state.stop_reason
                    if on_text is not None:
                        on_text(state.stop_reason)
            else:
                finish = "eos"
        usage = state.usage
        counted = getattr(usage, "completion_tokens", None) if decoded.finish_reason in (
            None, "budget") else None
        n_tokens = int(counted) if counted is not None else len(decoded.token_ids)
        prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        details = getattr(usage, "prompt_tokens_details", None)
        cached = getattr(details, "cached_tokens", None) if details is not None else None
        ids: list[int] = []
        logprobs = list(decoded.logprobs) if by_token else []
        if self.renderer is not None:
            ids = self.encode(text)
            logprobs = logprobs if len(logprobs) == len(ids) else []
        return Generation(
            text=text, token_ids=ids, logprobs=logprobs, finish_reason=finish,
            prompt_tokens=prompt_tokens, prefilled_tokens=prompt_tokens - int(cached or 0),
            seconds=time.perf_counter() - started, tokenizer=self._tokenizer_tag(),
            rejected=decoded.rejected, completion_tokens=n_tokens,
            extra={"cached_tokens": cached, "server_finish_reason": state.finish,
                   "continuation": self.continuation, "usage_reported": usage is not None,
                   "tokens_counted_by": "server" if counted is not None else (
                       "log-probs" if by_token else "stream chunks")})

    def _tokenizer_tag(self) -> str | None:
        return self.tokenizer_id if self.renderer is not None else None

    def _samples(self, stream: Any, state: _Stream, by_token: bool) -> Iterator[Sample]:
        """The streamed tokens (with log-probs) or text pieces as samples; their ids are
        positions in ``state.pieces`` (this backend has no token ids of the model's)."""
        for chunk in stream:
            if chunk.usage is not None:
                state.usage = chunk.usage
            for choice in chunk.choices:
                if choice.index:
                    continue
                entries = choice.logprobs.content if by_token and choice.logprobs else None
                if entries:
                    for entry in entries:
                        piece = bytes(entry.bytes) if entry.bytes is not None else entry.token.encode()
                        tops = [t.logprob for t in entry.top_logprobs or ()]
                        yield self._piece(state, piece, entry.logprob, tops)
                elif choice.delta is not None and choice.delta.content:
                    yield self._piece(state, choice.delta.content.encode(), math.nan, [])
                if choice.finish_reason:
                    extra = choice.model_extra or {}
                    state.finish = choice.finish_reason
                    state.stop_reason = extra.get("stop_reason", extra.get("matched_stop"))

    @staticmethod
    def _piece(state: _Stream, piece: bytes, logprob: float, tops: list[float]) -> Sample:
        state.pieces.append(piece)
        entropy = (lambda: entropy_from_top(tops)) if tops else math.nan
        return Sample(len(state.pieces) - 1, float(logprob), entropy)

    # errors ---------------------------------------------------------------------------------
    def _model_card(self) -> dict[str, Any] | None:
        """The model's card from ``/v1/models`` (None when the server lists no models)."""
        import openai

        try:
            cards = {m.id: m.model_dump() for m in self._client.models.list()}
        except (openai.NotFoundError, openai.UnprocessableEntityError):
            return None
        except openai.OpenAIError as exc:
            raise self._error(exc) from None
        if not cards:
            return None
        if self.model_id not in cards:
            names = sorted(cards)
            listed = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
            raise ConfigError(f"the chat server at {self.server} does not serve "
                              f"{self.model_id!r} (it serves: {listed})")
        return cards[self.model_id]

    def _error(self, exc: Exception, prefill: bool = False) -> RelayGraphError:
        """One line saying what went wrong, never a key or a server's echo of one."""
        import openai

        if isinstance(exc, openai.APITimeoutError):
            return ServerUnavailableError(f"the chat server at {self.server} timed out; is it "
                                          "overloaded or stuck?")
        if isinstance(exc, openai.APIConnectionError):
            return ServerUnavailableError(f"cannot connect to the chat server at {self.server}; "
                                          "start it or fix base_url")
        if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
            return ConfigError(f"the chat server at {self.server} refused the API key "
                               f"({exc.status_code}); check the variable named in api_key_env")
        if isinstance(exc, openai.APIStatusError):
            message = _message(exc)
            if isinstance(exc, openai.NotFoundError):
                return ConfigError(f"the chat server at {self.server} answered 404 for "
                                   f"{self.model_id!r}{': ' + message if message else ''}; check "
                                   "base_url (usually ending in /v1) and model")
            if isinstance(exc, openai.BadRequestError | openai.UnprocessableEntityError):
                hint = ("; this server may not continue an assistant message: set "
                        "continuation = \"instruct\"") if prefill else ""
                return ConfigError(f"the chat server at {self.server} refused the request "
                                   f"({exc.status_code}{': ' + message if message else ''}){hint}")
            return ServerResponseError(f"the chat server at {self.server} answered "
                                       f"{exc.status_code}{': ' + message if message else ''}")
        return ServerResponseError(f"the chat server at {self.server} failed "
                                   f"({type(exc).__name__})")


def state_decode(state: _Stream) -> Any:
    """``decode(ids)`` over a stream's pieces (the ids are positions in it)."""
    return lambda ids: b"".join(state.pieces[i] for i in ids).decode("utf-8", errors="replace")


def _message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    detail = body.get("error", body) if isinstance(body, dict) else body
    message = detail.get("message", "") if isinstance(detail, dict) else (detail or "")
    return " ".join(str(message).split())[:200]


class ChatConfig(RemoteConfig):
    """A model behind any chat-completions API (``backend = "chat"``): ``base_url`` (e.g.
    ``https://api.openai.com/v1``, ``http://localhost:11434/v1``), ``model`` its name
    there, ``api_key_env`` the environment variable holding its key (the key itself never
    goes in a config: configs are stored with each trajectory), ``continuation`` how it
    continues the shared reasoning (``auto`` | ``prefill`` | ``instruct``), ``tokenizer``
    an optional local tokenizer for exact token ids, ``logprobs`` whether its server streams
    log-probs (default: ask it once)."""

    backend: Literal["chat"] = "chat"
    continuation: Continuation = "auto"
    tokenizer: str | None = None
    logprobs: bool | None = None
    timeout: float = Field(120.0, gt=0)
    max_retries: int = Field(2, ge=0)

    @property
    def local_model(self) -> str | None:
        return self.tokenizer

    def key(self) -> tuple[Any, ...]:
        return ("chat", self.base_url, self.model, self.api_key_env, self.continuation,
                self.tokenizer, self.logprobs, self.timeout, self.max_retries)

    def build(self) -> ChatBackend:
        return ChatBackend(self.base_url, self.model, api_key=self.api_key(),
                           continuation=self.continuation, tokenizer=self.tokenizer,
                           logprobs=self.logprobs, timeout=self.timeout,
                           max_retries=self.max_retries)

    def describe(self) -> str:
        return f"{self.model} (chat API at {redact_base_url(self.base_url)})"
