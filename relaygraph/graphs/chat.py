"""The relay as a chat: the ``messages`` of its state, and each agent turn as an LLM run.

- ``messages`` (LangGraph's ``add_messages``): the question as a ``HumanMessage``, then one
  ``AIMessage`` per agent turn (``name`` = the agent, id ``<trajectory id>-<position>``),
  the supervisor's guidance as an ``AIMessage`` named ``supervisor``; a rolled-back turn is
  removed (``RemoveMessage``), as it leaves every view of the trajectory.
- Each generation is reported to the run's LangChain callbacks as a chat-model run
  (:class:`LLMRun`): ``on_chat_model_start``, ``on_llm_new_token`` with an
  ``AIMessageChunk`` per piece of text, ``on_llm_end`` with the message and its usage. So
  ``stream_mode="messages"`` yields every agent's tokens (LangGraph's own handler listens
  to these callbacks), and LangSmith, Langfuse or any ``BaseCallbackHandler`` see one LLM
  run per turn. Without handlers nothing is created.
- A conversation (earlier turns on a thread, or messages a chat UI sends) reaches the
  agents as a transcript before the question, as ``relaygraph serve`` does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from langchain_core.callbacks import CallbackManager
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    AnyMessage,
    BaseMessage,
    HumanMessage,
    RemoveMessage,
    SystemMessage,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, LLMResult

from relaygraph.agents.backend import provider_name
from relaygraph.policies.base import SUPERVISOR
from relaygraph.trajectory.models import Segment, reasoning_text, retracted, step_of

if TYPE_CHECKING:
    from langchain_core.callbacks import CallbackManagerForLLMRun
    from langchain_core.runnables import RunnableConfig

    from relaygraph.agents.agent import Agent
    from relaygraph.agents.backend import Generation, Prompt, StopRule

WRITTEN = ("text", "call")
"""Segment kinds that are an agent's writing (call commands included, as streamed)."""


def message_id(trajectory_id: str, position: int, attempt: int = 0) -> str:
    """The id of the message of the turn whose first segment is at ``position`` (a retried
    generation streams under its own id)."""
    base = f"{trajectory_id}-{position}"
    return base if attempt == 0 else f"{base}-{attempt}"


# --- the conversation ----------------------------------------------------------------------

def transcript(turns: Sequence[tuple[str, str]]) -> str:
    """Turns ``(role, text)`` as ``User: ...`` / ``Assistant: ...`` lines (the question last)."""
    return "\n".join(f"{role.title()}: {text}" for role, text in turns)


def conversation(messages: Sequence[BaseMessage]) -> tuple[str | None, list[tuple[str, str]]]:
    """The question (the last message's text when it is a human message, else None) and
    the turns before it: ``("user", text)`` and ``("assistant", text)``, an assistant turn
    being the agents' messages after a question joined (the supervisor's guidance left out)."""
    turns: list[tuple[str, str]] = []
    for message in messages:
        if isinstance(message, HumanMessage):
            turns.append(("user", message.text))
        elif isinstance(message, AIMessage) and message.name != SUPERVISOR:
            if turns and turns[-1][0] == "assistant":
                turns[-1] = ("assistant", turns[-1][1] + message.text)
            else:
                turns.append(("assistant", message.text))
    if turns and turns[-1][0] == "user" and messages and isinstance(messages[-1], HumanMessage):
        return turns[-1][1], turns[:-1]
    return None, turns


# --- messages of a run's steps -------------------------------------------------------------

def turn_message(mid: str, author: str, segments: Iterable[Segment], **meta: Any) -> AIMessage | None:
    """The ``AIMessage`` of what ``author`` wrote in a step (None if it wrote nothing)."""
    text = "".join(s.text for s in segments if s.author == author and s.kind in WRITTEN)
    if not text:
        return None
    return AIMessage(content=text, name=author, id=mid,
                     response_metadata={"relaygraph": {"agent": author, **meta}})


def steer_messages(trajectory_id: str, start: int, segments: Sequence[Segment]) -> list[AIMessage]:
    """A supervisor's guidance among ``segments`` (appended from ``start`` on) as messages."""
    return [AIMessage(content=s.text, name=SUPERVISOR, id=message_id(trajectory_id, start + i),
                      response_metadata={"relaygraph": {"agent": SUPERVISOR, "kind": "steer"}})
            for i, s in enumerate(segments) if s.kind == "steer" and s.text]


def removals(trajectory_id: str, segments: Sequence[Segment],
             messages: Sequence[BaseMessage]) -> list[RemoveMessage]:
    """``RemoveMessage``s for the messages of turns that ``segments`` roll back."""
    gone = {message_id(trajectory_id, p) for p in retracted(segments)}
    return [RemoveMessage(id=m.id) for m in messages
            if m.id and (m.id in gone or m.id.rsplit("-", 1)[0] in gone)]


def messages_of(trajectory_id: str, question: str, segments: Sequence[Segment]) -> list[AnyMessage]:
    """The chat view of a stored run (for a run resumed from the store on a new thread):
    the question, then one message per step and author, without rolled-back turns."""
    out: list[AnyMessage] = [HumanMessage(content=question, id=f"{trajectory_id}-question")]
    gone = retracted(segments)
    start = 0
    for position, seg in enumerate(segments):
        if step_of(seg) is None and position < len(segments) - 1:
            continue
        step = segments[start:position + 1]
        authors = dict.fromkeys(s.author for s in step if s.kind in WRITTEN)
        for author in authors:
            first = start + next(i for i, s in enumerate(step) if s.author == author)
            if first not in gone:
                if (message := turn_message(message_id(trajectory_id, first), author, step)):
                    out.append(message)
        out.extend(steer_messages(trajectory_id, start, step))
        start = position + 1
    return out


# --- generations as LangChain LLM runs -----------------------------------------------------

class LLMRun:
    """One generation reported to the run's LangChain callbacks as a chat-model run."""

    def __init__(self, manager: CallbackManagerForLLMRun, mid: str, agent: str) -> None:
        self.manager = manager
        self.mid = mid
        self.agent = agent

    @classmethod
    def start(cls, config: RunnableConfig, agent: Agent, prompt: Prompt, rule: StopRule,
              mid: str, position: int) -> LLMRun | None:
        """Start the run under the node's callbacks (None when nobody listens)."""
        callbacks = config.get("callbacks")
        if not callbacks:
            return None
        backend = agent.backend
        sampling = agent.sampling
        manager = CallbackManager.configure(
            inheritable_callbacks=callbacks, inheritable_tags=config.get("tags"),
            inheritable_metadata=config.get("metadata"),
            local_metadata={"ls_provider": provider_name(backend), "ls_model_name": backend.model_id,
                            "ls_model_type": "chat", "ls_temperature": sampling.temperature,
                            "ls_max_tokens": rule.max_tokens, "relaygraph_agent": agent.name,
                            "relaygraph_position": position})
        if not manager.handlers:
            return None
        inputs: list[BaseMessage] = []
        if prompt.system_prompt:
            inputs.append(SystemMessage(content=prompt.system_prompt))
        inputs.append(HumanMessage(content=prompt.question))
        if (so_far := reasoning_text(list(prompt.continuation))):
            inputs.append(AIMessage(content=so_far))
        params = {"model": backend.model_id, "temperature": sampling.temperature,
                  "top_p": sampling.top_p, "max_tokens": rule.max_tokens,
                  "stop": list(rule.stop_strings), "_type": provider_name(backend)}
        serialized = {"lc": 1, "type": "not_implemented", "name": agent.name,
                      "id": ["relaygraph", type(backend).__name__]}
        run = manager.on_chat_model_start(serialized, [inputs], invocation_params=params,
                                          name=agent.name, batch_size=1)[0]
        return cls(run, mid, agent.name)

    def token(self, text: str) -> None:
        chunk = ChatGenerationChunk(message=AIMessageChunk(content=text, name=self.agent,
                                                           id=self.mid))
        self.manager.on_llm_new_token(text, chunk=chunk)

    def end(self, generation: Generation) -> None:
        n_in, n_out = generation.prompt_tokens, len(generation.token_ids)
        message = AIMessage(
            content=generation.text, name=self.agent, id=self.mid,
            usage_metadata={"input_tokens": n_in, "output_tokens": n_out,
                            "total_tokens": n_in + n_out,
                            "input_token_details": {
                                "cache_read": max(0, n_in - generation.prefilled_tokens)}},
            response_metadata={"finish_reason": str(generation.finish_reason),
                               "model_name": self.manager.metadata.get("ls_model_name")})
        self.manager.on_llm_end(LLMResult(
            generations=[[ChatGeneration(message=message)]],
            llm_output={"token_usage": {"prompt_tokens": n_in, "completion_tokens": n_out,
                                        "total_tokens": n_in + n_out}}))

    def error(self, exc: BaseException) -> None:
        self.manager.on_llm_error(exc)
