"""A model behind an OpenAI-compatible server (vLLM's ``vllm serve``): raw prompt continuation.

The prompt is rendered locally (the model's chat template + the agent's view, see
:mod:`relaygraph.agents.rendering`) and sent to ``/v1/completions`` as a list of token
ids, so agents sharing a tokenizer exchange ids and nothing is re-tokenized. The reply
streams (SSE) with the sampled token ids (vLLM's ``return_token_ids``) and their log-probs
(top-k when the stop rule has a ``check``, for an entropy estimate); the stop rule is
applied token by token exactly as in the local backends, and a refused token closes the
stream, which makes the server abort the request. Prefix caching is the server's: a turn
re-sends the whole view and the server reuses the KV blocks it already holds.

``prefilled_tokens`` is ``prompt_tokens - cached_tokens`` from the server's usage report,
which vLLM sends when started with ``--enable-prompt-tokens-details``. Without it (or when
the stream was cut because a token was refused, so no usage arrived) the number of cached
tokens is unknown: ``prefilled_tokens`` then counts the whole prompt and
``extra["cached_tokens"]`` is None.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from relaygraph.agents.backend import Generation, Prompt, Sampling, StopRule, TextCallback
from relaygraph.agents.decoding import Sample, engine_finish, entropy_from_top, follow, token_limit
from relaygraph.agents.remote import (
    RemoteConfig,
    ServerResponseError,
    ServerUnavailableError,
    split_url,
)
from relaygraph.agents.rendering import Renderer, TokenizerBackend, generation_eos_ids, load_tokenizer
from relaygraph.errors import BackendError, ConfigError, ModelNotFoundError, RelayGraphError

__all__ = ["OpenAIBackend", "ServerResponseError", "ServerUnavailableError"]


@dataclass
class _Stream:
    """What a completion stream reported besides its tokens."""

    finish: str | None = None
    stop_reason: Any = None
    usage: dict[str, Any] = field(default_factory=dict)
    started: bool = False
    draining: bool = False


class OpenAIBackend(TokenizerBackend):
    """A model served by vLLM (or another server with vLLM's completions extensions).

    ``base_url`` is the server (``http://host:8000`` or ``.../v1``; credentials in the URL
    are sent as basic auth), ``model`` the served model name, ``tokenizer`` what to load
    the tokenizer from (catalog name, folder, ``.gguf`` or hub id; default: ``model``, else
    the server's model path when it exists here), ``api_key`` a bearer token.
    ``top_logprobs`` is how many alternatives the server returns per token when the stop
    rule has a ``check`` (vLLM allows 20 unless started with a larger ``--max-logprobs``).
    """

    def __init__(self, base_url: str, model: str, tokenizer: str | None = None,
                 api_key: str | None = None, timeout: float = 120.0,
                 connect_timeout: float = 5.0, top_logprobs: int = 20) -> None:
        self.server, auth = split_url(base_url)
        self.model_id = model
        self.top_logprobs = top_logprobs
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(
            base_url=self.server, headers=headers, auth=auth,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))
        served = self._model_card()
        self.max_context = int(served.get("max_model_len") or 1 << 20)
        source, self.tokenizer = self._load_tokenizer(tokenizer, served.get("root"))
        self.renderer = Renderer(self.tokenizer)
        self.eos_ids = generation_eos_ids(source, self.tokenizer)

    # server -----------------------------------------------------------------------------
    def _model_card(self) -> dict[str, Any]:
        response = self._request("GET", "/v1/models")
        try:
            cards = {m["id"]: m for m in response.json()["data"]}
        except (ValueError, KeyError, TypeError):
            raise ServerResponseError(f"{self.server}/v1/models did not return a model list; "
                                      "is this an OpenAI-compatible server?") from None
        if self.model_id not in cards:
            raise ConfigError(f"the server at {self.server} does not serve {self.model_id!r} "
                              f"(it serves: {', '.join(sorted(cards)) or 'nothing'})")
        owner = cards[self.model_id].get("owned_by")
        if isinstance(owner, str) and owner and owner.lower() != "vllm":
            raise ConfigError(f"the server at {self.server} is not vLLM (its models are owned by "
                              f"{owner!r}), so it lacks the completions extensions backend "
                              f"\"openai\" needs; use backend = \"chat\" for this agent")
        return cards[self.model_id]

    def _load_tokenizer(self, tokenizer: str | None, root: str | None) -> tuple[str, Any]:
        """``(where it came from, tokenizer)``: ``tokenizer``, else the served name, else
        the server's model path (when the server runs on this machine)."""
        if tokenizer:
            return tokenizer, load_tokenizer(tokenizer)
        for source in (self.model_id, root):
            if source:
                try:
                    return source, load_tokenizer(source)
                except ModelNotFoundError:
                    pass
        raise ConfigError(f"cannot load a tokenizer for the served model {self.model_id!r}; "
                          "pass tokenizer= (a catalog name, folder, .gguf or hub id with the "
                          "server's tokenizer), or use backend = \"chat\", which needs none")

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from None
        if response.status_code != 200:
            raise self._status_error(response)
        return response

    def _transport_error(self, exc: httpx.HTTPError) -> BackendError:
        if isinstance(exc, httpx.TimeoutException):
            return ServerUnavailableError(f"the model server at {self.server} timed out "
                                          f"({type(exc).__name__}); is it overloaded or stuck?")
        if isinstance(exc, httpx.ConnectError):
            return ServerUnavailableError(f"cannot connect to the model server at {self.server}; "
                                          "start it (e.g. `vllm serve MODEL`) or fix base_url")
        return ServerUnavailableError(f"the connection to the model server at {self.server} "
                                      f"failed ({type(exc).__name__})")

    def _status_error(self, response: httpx.Response) -> RelayGraphError:
        try:
            response.read()
            body = response.json()
            detail = body.get("error", body) if isinstance(body, dict) else body
            message = detail.get("message", detail) if isinstance(detail, dict) else detail
        except (ValueError, httpx.HTTPError):
            message = ""
        message = " ".join(str(message).split())[:200]
        code = response.status_code
        if code in (401, 403):
            return ConfigError(f"the model server at {self.server} refused the request ({code}); "
                               "check the API key")
        return ServerResponseError(f"the model server at {self.server} answered {code}"
                                   f"{': ' + message if message else ''}")

    def close(self) -> None:
        self._client.close()

    # generation -------------------------------------------------------------------------
    def generate(
        self,
        prompt: Prompt,
        rule: StopRule,
        sampling: Sampling = Sampling(),
        on_text: TextCallback | None = None,
        cache_key: str | None = None,
    ) -> Generation:
        """Continue ``prompt`` on the server (``cache_key`` is unused: the server's prefix
        cache finds the shared prefix by itself)."""
        start_time = time.perf_counter()
        ids = self.render(prompt)
        limit = token_limit(len(ids), rule, self.max_context, self.model_id)
        body: dict[str, Any] = {
            "model": self.model_id, "prompt": ids, "max_tokens": limit, "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": sampling.temperature, "top_p": sampling.top_p,
            "logprobs": self.top_logprobs if rule.check is not None else 0,
            "stop": list(rule.stop_strings), "include_stop_str_in_output": True,
            "stop_token_ids": sorted(self.eos_ids), "skip_special_tokens": False,
            "return_token_ids": True, "return_tokens_as_token_ids": True,
        }
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if rule.bad_words:
            body["bad_words"] = list(rule.bad_words)  # vLLM's extension
        state = _Stream()
        samples = self._samples(body, state)
        try:
            decoded = follow(samples, rule, self.decode, self.eos_ids, limit, on_text)
            if decoded.finish_reason != "low_confidence" and state.started:
                state.draining = True  # the server stops here too: read its usage report
                with contextlib.suppress(BackendError):
                    for _ in samples:
                        break
        finally:
            samples.close()  # a refused token: closing the stream aborts the request
        finish = decoded.finish_reason or engine_finish(state.finish, state.stop_reason)
        if finish is None:
            raise ServerResponseError(f"the model server at {self.server} ended the completion "
                                      f"without a usable finish reason ({state.finish!r})")
        usage = state.usage
        details = usage.get("prompt_tokens_details") or {}
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        prompt_tokens = int(usage.get("prompt_tokens") or len(ids))
        return Generation(
            text=decoded.text, token_ids=decoded.token_ids, logprobs=decoded.logprobs,
            finish_reason=finish,
            prompt_tokens=prompt_tokens,
            prefilled_tokens=prompt_tokens - int(cached or 0),
            seconds=time.perf_counter() - start_time, tokenizer=self.tokenizer_id,
            rejected=decoded.rejected,
            extra={"cached_tokens": cached, "server_finish_reason": state.finish},
        )

    def _samples(self, body: dict[str, Any], state: _Stream) -> Generator[Sample, None, None]:
        """The server's sampled tokens as they stream in (SSE)."""
        state.started = True
        try:
            with self._client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code == 400:  # e.g. "Invalid value for 'prompt.str'"
                    error = self._status_error(response)
                    raise ConfigError(f"{error}; a server without vLLM's completions extensions "
                                      "(token-id prompts, return_token_ids) cannot run backend "
                                      "\"openai\": use backend = \"chat\" for this agent")
                if response.status_code != 200:
                    raise self._status_error(response)
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    chunk = self._parse(data)
                    if chunk.get("usage"):
                        state.usage = chunk["usage"]
                    for choice in chunk.get("choices") or []:
                        tokens = self._tokens(choice)
                        if tokens and state.draining:
                            return  # more tokens than the rule allowed: stop the request
                        yield from tokens
                        if choice.get("finish_reason"):
                            state.finish = choice["finish_reason"]
                            state.stop_reason = choice.get("stop_reason")
        except httpx.HTTPError as exc:
            if not state.draining:
                raise self._transport_error(exc) from None

    def _parse(self, data: str) -> dict[str, Any]:
        try:
            chunk = json.loads(data)
        except ValueError:
            raise ServerResponseError(f"the model server at {self.server} sent a stream event "
                                      "that is not JSON") from None
        if not isinstance(chunk, dict):
            raise ServerResponseError(f"the model server at {self.server} sent an unexpected "
                                      "stream event")
        if "error" in chunk:
            error = chunk["error"]
            message = error.get("message", error) if isinstance(error, dict) else error
            raise ServerResponseError(f"the model server at {self.server} failed: "
                                      f"{' '.join(str(message).split())[:200]}")
        return chunk

    def _tokens(self, choice: dict[str, Any]) -> list[Sample]:
        logprobs = choice.get("logprobs") or {}
        token_logprobs = logprobs.get("token_logprobs") or []
        tops = logprobs.get("top_logprobs") or []
        token_ids = choice.get("token_ids")
        if token_ids is None:  # no return_token_ids: read "token_id:N" from the log-probs
            token_ids = [_token_id(t) for t in logprobs.get("tokens") or []]
        if len(token_logprobs) != len(token_ids):
            if choice.get("text") or token_ids:
                raise ConfigError(
                    f"the model server at {self.server} did not return token ids with "
                    "log-probs: it lacks vLLM's completions extensions (return_token_ids); "
                    "use backend = \"chat\" for this agent")
            return []
        return [Sample(int(tid), float(lp if lp is not None else float("-inf")),
                       _entropy_of(tops[i] if i < len(tops) else None))
                for i, (tid, lp) in enumerate(zip(token_ids, token_logprobs, strict=True))]

    def next_token_logprobs(self, prompt: Prompt, candidates: Sequence[str]) -> dict[str, float]:
        """Log-probability of each candidate's first token right after ``prompt``."""
        first = {c: self.encode(c)[0] for c in candidates}
        body = {"model": self.model_id, "prompt": self.render(prompt), "max_tokens": 1,
                "temperature": 0.0, "logprobs": len(set(first.values())),
                "logprob_token_ids": sorted(set(first.values())),
                "return_tokens_as_token_ids": True}
        response = self._request("POST", "/v1/completions", json=body)
        try:
            top = response.json()["choices"][0]["logprobs"]["top_logprobs"][0]
            by_id = {_token_id(k): float(v) for k, v in top.items()}
            return {c: by_id[i] for c, i in first.items()}
        except (ValueError, KeyError, IndexError, TypeError):
            raise ServerResponseError(f"the model server at {self.server} did not return the "
                                      "requested log-probs (needs vLLM's logprob_token_ids)") from None


def _token_id(token: str) -> int:
    if not token.startswith("token_id:"):
        raise ServerResponseError("the model server returned tokens as text, not ids; "
                                  "relaygraph needs vLLM's return_tokens_as_token_ids")
    return int(token[len("token_id:"):])


def _entropy_of(top: dict[str, float] | None) -> Any:
    if not top:
        return float("nan")
    return lambda: entropy_from_top(top.values())


class OpenAIServerConfig(RemoteConfig):
    """A model served by vLLM (``vllm serve``) at ``base_url``; ``model`` is the served model
    name, ``tokenizer`` where rendering loads the tokenizer from (default: ``model`` when it
    is a catalog name, else the server's model path). ``api_key_env`` names the environment
    variable holding the server's API key: the key itself never goes in a config (configs
    are stored with each trajectory)."""

    backend: Literal["openai"] = "openai"
    tokenizer: str | None = None

    @property
    def local_model(self) -> str | None:
        from relaygraph.agents.catalog import CATALOG

        return self.tokenizer or (self.model if self.model in CATALOG else None)

    def key(self) -> tuple[Any, ...]:
        return ("openai", self.base_url, self.model, self.tokenizer, self.api_key_env)

    def build(self) -> OpenAIBackend:
        return OpenAIBackend(self.base_url, self.model, tokenizer=self.tokenizer,
                             api_key=self.api_key())
