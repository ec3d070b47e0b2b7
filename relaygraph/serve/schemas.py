"""OpenAI-compatible request and response bodies (the subset a relay can honour), and errors.

Requests are validated strictly, as OpenAI does: an unknown top-level argument is a 400
("Unrecognized request argument supplied"), and OpenAI parameters a relay cannot honour
(``n > 1``, penalties, logit bias, audio, ...) are accepted only at their neutral values.
``stop``, ``response_format``, ``tools``/``tool_choice`` and (chat, not streamed)
``logprobs`` are honoured (see :mod:`relaygraph.serve.agentic`), as are vLLM's
``continue_final_message``/``add_generation_prompt`` (the relay continues a final
assistant message). relaygraph's own options ride in one extra field, ``relaygraph`` (what the
``openai`` client sends with ``extra_body={"relaygraph": {...}}``).
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# --- errors ----------------------------------------------------------------------------------

class APIError(Exception):
    """An error answered with OpenAI's body: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def validation_error(exc: ValidationError, prefix: str = "") -> APIError:
    """The first problem of a pydantic error as a 400 naming the parameter."""
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    param = f"{prefix}{loc}" if loc else prefix.rstrip(".") or None
    if first["type"] == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param,
                           "unrecognized_argument")
    return bad_request(f"Invalid value for '{param}': {first['msg']}", param, "invalid_value")


# --- requests --------------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, refusal, ... (checked below)

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None

    def text(self, where: str) -> str:
        """The message's text; non-text parts are a 400."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        pieces = []
        for i, part in enumerate(self.content):
            if part.type != "text" or part.text is None:
                raise bad_request(f"Only text content parts are supported; got '{part.type}'",
                                  f"{where}.content.{i}.type", "unsupported_content")
            pieces.append(part.text)
        return "".join(pieces)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class RelayOptions(_Strict):
    """relaygraph's per-request options (``extra_body={"relaygraph": {...}}``)."""

    policy: dict[str, Any] = Field(default_factory=dict)
    """Overrides of the relay's policy fields, e.g. ``{"max_call_tokens": 64}`` or
    ``{"threshold": -3.0}``; validated like the config file (``type``, ``supervisor`` and
    ``solo_results`` cannot be set per request)."""


# (parameter, neutral values): accepted only at these values
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (None, 1), "logprobs": (None, False, 0), "top_logprobs": (None, 0),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}), "functions": (None, []), "function_call": (None, "none", "auto"),
    "modalities": (None, ["text"]),
    "audio": (None,), "prediction": (None,), "web_search_options": (None,),
    "echo": (None, False), "suffix": (None, ""), "best_of": (None, 1),
}


class _Request(_Strict):
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    n: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    user: str | None = None
    logprobs: bool | int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    relaygraph: RelayOptions = Field(default_factory=RelayOptions)

    honoured: ClassVar[frozenset[str]] = frozenset()
    """Parameters of :data:`_NEUTRAL` this endpoint honours after all."""

    def unsupported(self) -> APIError | None:
        """A 400 for the first OpenAI parameter set to a value a relay cannot honour."""
        if isinstance(self.stop, list) and len(self.stop) > 16:
            return bad_request("At most 16 stop sequences are supported", "stop", "invalid_value")
        for name, neutral in _NEUTRAL.items():
            if name in self.honoured:
                continue
            if name in type(self).model_fields and getattr(self, name) not in neutral:
                return bad_request(f"'{name}' is not supported by relaygraph relays "
                                   f"(accepted: {', '.join(map(repr, neutral))})", name,
                                   "unsupported_parameter")
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def stops(self) -> list[str]:
        """The stop sequences (empty strings dropped)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        return [s for s in stops if s]


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolSpec(_Strict):
    type: Literal["function"]
    function: FunctionSpec


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = "response"
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    top_logprobs: int | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: ResponseFormat | None = None
    continue_final_message: bool = False
    """vLLM's extension: the last message is an assistant message the relay continues."""
    add_generation_prompt: bool = True

    honoured: ClassVar[frozenset[str]] = frozenset({"logprobs", "top_logprobs"})

    def unsupported(self) -> APIError | None:
        if error := super().unsupported():
            return error
        if self.logprobs and self.stream:
            return bad_request("'logprobs' are given only without streaming (stream: false): a "
                               "relay's log-probs come from its stored trajectory", "logprobs",
                               "unsupported_parameter")
        if self.top_logprobs:
            return bad_request("'top_logprobs' is not supported: a relay keeps the log-prob of "
                               "each token it wrote, not the alternatives", "top_logprobs",
                               "unsupported_parameter")
        if self.continue_final_message and self.add_generation_prompt:
            return bad_request("continue_final_message needs add_generation_prompt: false",
                               "add_generation_prompt", "invalid_value")
        if self.response_format is not None and self.response_format.type == "json_schema" and (
                self.response_format.json_schema is None
                or self.response_format.json_schema.schema_ is None):
            return bad_request("response_format json_schema needs json_schema.schema",
                               "response_format.json_schema", "invalid_value")
        if isinstance(self.tool_choice, dict):
            name = (self.tool_choice.get("function") or {}).get("name")
            if self.tool_choice.get("type") != "function" or not isinstance(name, str) or \
                    name not in {t.function.name for t in self.tools or ()}:
                return bad_request("tool_choice must be none, auto, required or "
                                   "{type: function, function: {name}} naming one of the tools",
                                   "tool_choice", "invalid_value")
        if self.tool_choice not in (None, "none") and not self.tools:
            return bad_request("tool_choice needs tools", "tool_choice", "invalid_value")
        return None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None

    @property
    def budget(self) -> int | None:
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise bad_request("Give one of 'max_tokens' and 'max_completion_tokens', not both",
                              "max_completion_tokens", "invalid_value")
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Request):
    prompt: str | list[str]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None

    @property
    def budget(self) -> int | None:
        return self.max_tokens

    def question(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise bad_request("A relay answers one prompt per request; send a single string",
                              "prompt", "invalid_value")
        return self.prompt[0]


# --- responses -------------------------------------------------------------------------------

class RelayUsage(BaseModel):
    tokens_by_agent: dict[str, int]
    input_tokens_by_agent: dict[str, int] = {}
    call_ratio: float
    """Tokens written by agents other than the policy's primary / all generated tokens."""
    handoffs: int
    cost: float | None = None
    """What the run cost from the agents' prices (None: no prices configured)."""
    cost_by_agent: dict[str, float] | None = None
    format: dict[str, Any] | None = None
    """A ``response_format`` formatting turn: ``how``, its ``tokens`` (in
    ``completion_tokens`` too) and ``input_tokens``."""


class Usage(BaseModel):
    prompt_tokens: int
    """Tokens of the rendered prompt the relay's primary agent starts from."""
    completion_tokens: int
    """Tokens generated by all agents together."""
    total_tokens: int
    relaygraph: RelayUsage


class RelayInfo(BaseModel):
    """What relaygraph adds to a response (field ``relaygraph``)."""

    trajectory_id: str
    """Open it with ``relaygraph show TRAJECTORY_ID``."""
    policy: str
    answer: str
    """The ``\\boxed{}`` content, else the last line."""
    finish_reason: str
    """The relay's own reason (``eos``, ``budget``, ...) before mapping to OpenAI's."""
    handoffs: int
    handoff_records: list[dict[str, Any]]
    counters: dict[str, int]
    seconds: float


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: str
    logprobs: dict[str, Any] | None = None
    stop_reason: str | None = None
    """The stop sequence that ended the content (as vLLM reports it), if one did."""


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: None = None
    relaygraph: RelayInfo


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str
    logprobs: None = None
    stop_reason: str | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: None = None
    relaygraph: RelayInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "relaygraph"
    relaygraph: dict[str, Any]
    """policy, agents (name -> model), max_tokens, description, system_message."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def openai_finish_reason(relay_reason: str) -> str:
    """OpenAI's ``finish_reason`` for a relay's: budgets are ``length``, the rest ``stop``."""
    return "length" if relay_reason in ("budget", "length") else "stop"
