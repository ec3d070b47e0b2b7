"""A served relay as the model of LangChain and LangGraph agents (``langchain-openai``'s
``ChatOpenAI`` pointed at ``relaygraph serve`` on loopback).

The relays are tiny real models: the tiny call-token pair (answer ``7``), and a tiny
"tool agent" trained here, in seconds, on the exact prompts the server writes — the tools
block of :func:`relaygraph.serve.agentic.tools_prompt` in its system prompt, the
transcript a tool result becomes, and a formatting turn — so its final turn emits the
``<tool_call>`` block the server turns into OpenAI tool calls. It relays with itself
(fixed-interval, two agents) so every answer is a real relay run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from relaygraph.serve import BackgroundServer, Registry, ServeConfig, create_app
from relaygraph.serve.agentic import FORMAT_SYSTEM, format_question, tool_call_text, tools_prompt
from relaygraph.serve.schemas import ToolSpec
from relaygraph.trajectory import RedisStore
from tests import tiny_models as tiny

langchain_openai = pytest.importorskip("langchain_openai")
from langchain_core.tools import tool  # noqa: E402 - after the importorskip
from langchain_core.utils.function_calling import convert_to_openai_tool  # noqa: E402

SYSTEM = "You are a helpful assistant."
WEATHER_Q = "What is the weather in Paris?"
WEATHER = "Sunny, 18 C"
WEATHER_A = "It is sunny and 18 C in Paris."
CAPITAL_Q = "Which city is the capital of France?"
CAPITAL_A = "The capital of France is Paris."
CAPITAL_JSON = '{"city": "Paris", "country": "France"}'


@tool
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    calls.append(city)
    return WEATHER


calls: list[str] = []


class Answer(BaseModel):
    answer: int


class Capital(BaseModel):
    city: str
    country: str


def dialogues() -> list[tuple[str, str, str]]:
    """What the tool agent is trained on: the server's own prompts for the test's requests."""
    from relaygraph.serve.requests import chat_question
    from relaygraph.serve.schemas import ChatCompletionRequest

    spec = ToolSpec.model_validate(convert_to_openai_tool(get_weather))
    with_tools = f"{SYSTEM}\n\n{tools_prompt([spec])}"
    call = tool_call_text("get_weather", '{"city": "Paris"}')
    after_tool, _, _ = chat_question(ChatCompletionRequest.model_validate({
        "model": "m", "messages": [
            {"role": "user", "content": WEATHER_Q},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "content": WEATHER, "tool_call_id": "call_1"}]}))
    schema = Capital.model_json_schema()
    return [(with_tools, WEATHER_Q, call), (with_tools, after_tool, WEATHER_A),
            (SYSTEM, CAPITAL_Q, CAPITAL_A),
            (FORMAT_SYSTEM, format_question(CAPITAL_Q, CAPITAL_A, schema), CAPITAL_JSON)]


@pytest.fixture(scope="module")
def tool_agent() -> Path:
    data = dialogues()
    return tiny._cached(lambda root: tiny.build_tiny_model(root, data, steps=3000), "tool-agent")


@pytest.fixture(scope="module")
def server(tiny_pair, tool_agent, redis_server) -> Iterator[BackgroundServer]:
    controller, expert = tiny_pair
    pair = {"controller": {"model": str(controller), "dtype": "float32"},
            "expert": {"model": str(expert), "dtype": "float32"}}
    agent = {"model": str(tool_agent), "dtype": "float32", "system_prompt": SYSTEM}
    config = ServeConfig.parse({"relays": {
        "relay-call-token": {"agents": pair, "max_tokens": 64},
        "relay-tools": {"agents": {"controller": agent, "expert": agent}, "max_tokens": 160,
                        "format_agent": "expert",
                        "policy": {"type": "fixed-interval", "interval": 8}},
    }})
    store = RedisStore.from_url(redis_server.url)
    with BackgroundServer(create_app(Registry.build(config, store))) as s:
        yield s
    store.close()


def chat_model(server: BackgroundServer, model: str):
    return langchain_openai.ChatOpenAI(base_url=server.url + "/v1", api_key="-", model=model,
                                       max_retries=0, temperature=0)


def test_structured_output_from_the_relays_answer(server) -> None:
    structured = chat_model(server, "relay-call-token").with_structured_output(Answer)
    assert structured.invoke(tiny.QUESTION) == Answer(answer=7)


def test_structured_output_through_a_formatting_turn(server) -> None:
    structured = chat_model(server, "relay-tools").with_structured_output(Capital,
                                                                          include_raw=True)
    out = structured.invoke(CAPITAL_Q)
    assert out["parsed"] == Capital(city="Paris", country="France"), out
    usage = out["raw"].response_metadata["token_usage"]
    assert usage["relaygraph"]["format"]["how"] == "formatting turn"


def test_bind_tools_returns_openai_tool_calls(server) -> None:
    message = chat_model(server, "relay-tools").bind_tools([get_weather]).invoke(WEATHER_Q)
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert message.response_metadata["finish_reason"] == "tool_calls"
    assert not message.content  # the text before the call block (none here)


def test_langgraph_react_agent_completes_a_one_tool_task(server) -> None:
    from langgraph.prebuilt import create_react_agent

    calls.clear()
    agent = create_react_agent(chat_model(server, "relay-tools"), [get_weather])
    state = agent.invoke({"messages": [("user", WEATHER_Q)]})
    assert calls == ["Paris"]
    kinds = [type(m).__name__ for m in state["messages"]]
    assert kinds == ["HumanMessage", "AIMessage", "ToolMessage", "AIMessage"]
    assert state["messages"][-1].content == WEATHER_A
