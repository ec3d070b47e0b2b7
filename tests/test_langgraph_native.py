"""A relay used the way LangGraph apps use graphs: checkpointed threads, a human in the loop
(``interrupt()``), ``stream_mode="messages"`` and LangChain callbacks, async, one trace per
trajectory at a real OTLP receiver.

Real graph, real Redis, tiny overfit models (tests/tiny_models.py): on ``tiny.QUESTION``
the relay pair's controller writes "Let me think.<call>3</call>", the expert 3 tokens, the
controller " so the answer is \\boxed{7}."; on ``tiny.NOCALL_QUESTION`` the controller alone
answers "Simple: \\boxed{2}.". The safety worker's first chunk on ``tiny.SAFETY_QUESTION`` is
unsafe. The talker (built here) answers a follow-up question only when it sees the turn
before it: "And times two?" after "What is 3 + 4?" is 14.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command
from opentelemetry import trace as otel_trace
from typing_extensions import TypedDict

from relaygraph import Agent, CallTokenPolicy, Relay, SoloPolicy
from relaygraph.agents.transformers_backend import TransformersBackend
from relaygraph.errors import ConfigError
from relaygraph.graphs.chat import transcript
from relaygraph.observability import configure
from relaygraph.policies import SupervisorPolicy, human_review, keyword_guard
from relaygraph.trajectory import RedisStore
from relaygraph.trajectory.models import reasoning_text
from tests import tiny_models as tiny

LIMIT = {"recursion_limit": 200}


def thread(name: str | None = None) -> dict[str, Any]:
    return {**LIMIT, "configurable": {"thread_id": name or uuid.uuid4().hex}}


def make_relay(backends, store: RedisStore, **kw: Any) -> Relay:
    c, e = backends
    return Relay([Agent("controller", c, tiny.SYSTEM_PROMPT), Agent("expert", e, tiny.SYSTEM_PROMPT)],
                 CallTokenPolicy(), store, max_tokens=64, **kw)


Q1, A1 = "What is 3 + 4?", "Three plus four is seven. \\boxed{7}"
Q2, A2 = "And times two?", "Seven times two is fourteen. \\boxed{14}"
ALONE = "Times two of what? I cannot tell."
TALK = [(tiny.SYSTEM_PROMPT, Q1, A1),
        (tiny.SYSTEM_PROMPT, transcript([("user", Q1), ("assistant", A1), ("user", Q2)]), A2),
        (tiny.SYSTEM_PROMPT, Q2, ALONE)]


@pytest.fixture(scope="module")
def talker() -> TransformersBackend:
    path = tiny._cached(lambda root: tiny.build_tiny_model(root, TALK), "thread-talker")
    return TransformersBackend(str(path), dtype="float32")


def talk_relay(talker: TransformersBackend, store: RedisStore, **kw: Any) -> Relay:
    return Relay([Agent("talker", talker, tiny.SYSTEM_PROMPT)], SoloPolicy(agent="talker"), store,
                 max_tokens=64, **kw)


@pytest.fixture(scope="module")
def safety_worker() -> TransformersBackend:
    return TransformersBackend(str(tiny.safety_worker()), dtype="float32")


def safety_relay(worker: TransformersBackend, store: RedisStore, **kw: Any) -> Relay:
    """The worker under a guard that asks a human (interrupt()) about a chunk that mentions
    stealing; the guard's guidance is what a rollback brings by default."""
    flag = keyword_guard([r"\bsteal"], guidance=tiny.STEER_TEXT)
    policy = SupervisorPolicy(supervisor=human_review(flag), workers=("worker",), chunk_tokens=32)
    return Relay([Agent("worker", worker, tiny.SYSTEM_PROMPT)], policy, store, **kw)


# --- threads ---------------------------------------------------------------------------------

@pytest.fixture(params=["memory", "sqlite"])
def checkpointer(request, tmp_path):
    if request.param == "memory":
        yield InMemorySaver()
        return
    conn = sqlite3.connect(str(tmp_path / "checkpoints.sqlite"), check_same_thread=False)
    yield SqliteSaver(conn)
    conn.close()


def test_two_questions_on_one_thread_are_two_trajectories(talker, redis_store, checkpointer) -> None:
    relay = talk_relay(talker, redis_store, checkpointer=checkpointer)
    cfg = thread()
    first = relay.graph.invoke({"question": Q1}, cfg)
    second = relay.graph.invoke({"question": Q2}, cfg)

    assert first["trajectory_id"] != second["trajectory_id"]
    assert (first["answer"], second["answer"]) == ("7", "14")  # 14: it saw the first turn
    for out, text in ((first, A1), (second, A2)):
        stored = redis_store.load(out["trajectory_id"])
        assert stored.status == "finished" and stored.info["answer"] == out["answer"]
        assert reasoning_text(stored.segments) == text
        assert out["tokens_by_agent"] == {"talker": sum(s.n_tokens for s in stored.segments)}
    # the second run's task: the first turn as a transcript before its question, as serve folds a chat
    task = redis_store.load(second["trajectory_id"]).task
    assert task.question == transcript([("user", Q1), ("assistant", A1), ("user", Q2)])
    assert task.config["asked"] == Q2
    # the thread's messages: each question, then one AIMessage per agent turn
    messages = relay.graph.get_state(cfg).values["messages"]
    assert [(type(m).__name__, m.name, m.content) for m in messages] == [
        ("HumanMessage", None, Q1), ("AIMessage", "talker", A1),
        ("HumanMessage", None, Q2), ("AIMessage", "talker", A2)]
    # without the thread the follow-up has no context
    assert relay.graph.invoke({"question": Q2}, thread())["answer"] == ALONE


def test_a_chat_ui_sends_messages_and_the_same_question_again_is_a_new_trajectory(talker, redis_store) -> None:
    relay = talk_relay(talker, redis_store, checkpointer=InMemorySaver())
    cfg = thread()
    first = relay.graph.invoke({"messages": [HumanMessage(content=Q1)]}, cfg)
    second = relay.graph.invoke({"messages": [{"role": "user", "content": Q2}]}, cfg)
    assert (first["answer"], second["answer"]) == ("7", "14")
    again = relay.graph.invoke({"messages": [HumanMessage(content=Q1)]}, cfg)
    # a question key equal to the thread's last question is a new trajectory too
    fourth = relay.graph.invoke({"question": Q1}, cfg)
    ids = {out["trajectory_id"] for out in (first, second, again, fourth)}
    assert len(ids) == 4
    assert redis_store.load(fourth["trajectory_id"]).task.question.count(f"User: {Q1}") == 3


def test_relay_threads_a_conversation_and_resumes_by_id_from_the_store(talker, redis_store) -> None:
    relay = talk_relay(talker, redis_store, checkpointer=InMemorySaver())
    one = relay.run(Q1, thread_id="conversation")
    two = relay.run(Q2, thread_id="conversation")
    assert (one.answer, two.answer, two.thread_id) == ("7", "14", "conversation")
    assert relay.run(Q2).answer == ALONE  # each run on its own thread by default
    # an explicit id of a stored run continues it (finished: returned as it is)
    again = relay.resume(two.trajectory_id)
    assert (again.trajectory_id, again.answer) == (two.trajectory_id, "14")
    assert len(redis_store.read(two.trajectory_id)) == len(two.segments)  # nothing written twice
    with pytest.raises(ConfigError, match="checkpointer"):
        talk_relay(talker, redis_store).run(Q1, thread_id="t")


def test_a_leftover_id_in_a_parent_graph_state_starts_a_new_trajectory(backends, redis_store) -> None:
    relay = make_relay(backends, redis_store)

    class App(TypedDict, total=False):
        question: str
        trajectory_id: str
        answer: str

    app = StateGraph(App)
    app.add_node("relay", relay.graph)
    app.add_edge(START, "relay")
    app.add_edge("relay", END)
    graph = app.compile(checkpointer=InMemorySaver())
    cfg = thread()
    first = graph.invoke({"question": tiny.QUESTION}, cfg)
    second = graph.invoke({"question": tiny.NOCALL_QUESTION}, cfg)  # the parent keeps trajectory_id
    assert first["trajectory_id"] != second["trajectory_id"]
    assert (first["answer"], second["answer"]) == ("7", "2")


# --- a human in the loop ---------------------------------------------------------------------

def test_interrupt_pauses_and_command_resume_continues_the_same_trajectory(safety_worker, redis_store) -> None:
    relay = safety_relay(safety_worker, redis_store, checkpointer=InMemorySaver())
    cfg = thread("safety")
    paused = relay.graph.invoke({"question": tiny.SAFETY_QUESTION}, cfg)
    tid = paused["trajectory_id"]
    (asked,) = paused["__interrupt__"]
    assert asked.value["chunk"] == tiny.UNSAFE_CHUNK and "steal" in asked.value["flag"]
    stored = redis_store.load(tid)
    assert stored.status == "interrupted" and stored.info["thread_id"] == "safety"
    assert [s.text for s in stored.segments] == [tiny.UNSAFE_CHUNK]  # the chunk, not yet judged

    done = relay.graph.invoke(Command(resume="rollback"), cfg)  # the guard's guidance comes with it
    assert done["trajectory_id"] == tid and done["answer"] == tiny.SAFE_END
    segs = redis_store.read(tid)
    assert [(s.author, s.kind) for s in segs[:5]] == [
        ("worker", "text"), ("supervisor", "retract"), ("supervisor", "steer"),
        ("worker", "text"), ("worker", "text")]
    assert segs[2].text == tiny.STEER_TEXT and done["counters"] == {"rollbacks": 1}
    assert redis_store.load(tid).status == "finished"
    # the rolled-back chunk left the chat view as it left every view; the guidance is in it
    names = [(m.name, m.content) for m in done["messages"] if isinstance(m, AIMessage)]
    assert ("worker", tiny.UNSAFE_CHUNK) not in names
    assert names == [("supervisor", tiny.STEER_TEXT), ("worker", tiny.SAFE_CHUNK), ("worker", tiny.SAFE_END)]


def test_relay_run_returns_interrupted_and_resume_answers(safety_worker, redis_store) -> None:
    relay = safety_relay(safety_worker, redis_store, checkpointer=InMemorySaver())
    paused = relay.run(tiny.SAFETY_QUESTION)
    assert paused.status == "interrupted" and paused.answer == ""
    assert paused.interrupt["chunk"] == tiny.UNSAFE_CHUNK
    with pytest.raises(ConfigError, match="waits for a human's answer"):
        relay.resume(paused.trajectory_id)
    asked_again = relay.resume(paused.trajectory_id, "maybe?")  # unreadable: asked again
    assert asked_again.status == "interrupted" and "expected" in asked_again.interrupt["error"]
    done = relay.resume(paused.trajectory_id, {"action": "rollback"})
    assert (done.status, done.answer, done.trajectory_id) == ("finished", tiny.SAFE_END, paused.trajectory_id)

    # the human lets the chunk stand: it stays, and is the answer's start
    kept = relay.resume(relay.run(tiny.SAFETY_QUESTION).trajectory_id, "continue")
    assert kept.status == "finished" and kept.segments[0].text == tiny.UNSAFE_CHUNK
    assert kept.counters.get("rollbacks", 0) == 0


def test_resume_without_the_thread_asks_again_from_the_store(safety_worker, redis_store) -> None:
    paused = safety_relay(safety_worker, redis_store, checkpointer=InMemorySaver()).run(tiny.SAFETY_QUESTION)
    # another process: a new relay, a new checkpointer; the store is the source of truth
    other = safety_relay(safety_worker, redis_store, checkpointer=InMemorySaver())
    done = other.resume(paused.trajectory_id, "rollback")
    assert (done.status, done.answer) == ("finished", tiny.SAFE_END)
    assert [s.text for s in redis_store.read(paused.trajectory_id)].count(tiny.UNSAFE_CHUNK) == 1
    # the new thread's chat view was rebuilt from the store, then the rollback removed the chunk
    messages = other.graph.get_state({"configurable": {"thread_id": done.thread_id}}).values["messages"]
    assert [(m.name, m.content) for m in messages] == [
        (None, tiny.SAFETY_QUESTION), ("supervisor", tiny.STEER_TEXT), ("worker", tiny.SAFE_CHUNK),
        ("worker", tiny.SAFE_END)]


def test_the_example_asks_a_person_only_about_a_flagged_chunk(safety_worker, redis_store) -> None:
    from examples.human_in_the_loop import guard

    policy = SupervisorPolicy(supervisor=guard, workers=("worker",), chunk_tokens=32)
    relay = Relay([Agent("worker", safety_worker, tiny.SYSTEM_PROMPT)], policy, redis_store,
                  checkpointer=InMemorySaver())
    paused = relay.run(tiny.SAFETY_QUESTION)
    assert paused.interrupt["chunk"] == tiny.UNSAFE_CHUNK and "steal" in paused.interrupt["flag"]
    stood = relay.resume(paused.trajectory_id, "y")  # the person lets it stand: no more questions
    assert stood.status == "finished" and stood.counters == {}
    assert [s.text for s in stood.segments if s.kind == "text"] == [tiny.UNSAFE_CHUNK, tiny.SAFE_END]
    steered = relay.resume(relay.run(tiny.SAFETY_QUESTION).trajectory_id,
                           f"rollback: {tiny.STEER_TEXT.strip()}")
    assert (steered.answer, steered.counters) == (tiny.SAFE_END, {"rollbacks": 1})


def test_interrupt_without_a_checkpointer_is_an_error_that_names_the_fix(safety_worker, redis_store) -> None:
    relay = safety_relay(safety_worker, redis_store)
    with pytest.raises(ConfigError, match=r"checkpointer=InMemorySaver\(\)") as info:
        relay.run(tiny.SAFETY_QUESTION)
    tid = str(info.value).split("trajectory ")[1].split()[0]
    assert redis_store.load(tid).status == "failed"
    with pytest.raises(ConfigError, match="checkpointer"):
        relay.graph.invoke({"question": tiny.SAFETY_QUESTION}, LIMIT)


def test_the_graph_schemas_show_the_question_not_the_internals(backends, redis_store) -> None:
    graph = make_relay(backends, redis_store).graph
    inputs = graph.get_input_jsonschema()["properties"]  # Python 3.11: typing_extensions.TypedDict
    assert inputs["question"]["type"] == "string"
    assert set(inputs) == {"question", "trajectory_id", "prefix", "messages"}
    assert "answer" in graph.get_output_jsonschema()["properties"]


# --- streaming to chat UIs and callbacks -------------------------------------------------------

def test_messages_stream_yields_token_chunks_of_both_agents(backends, redis_store) -> None:
    relay = make_relay(backends, redis_store)
    chunks: list[tuple[Any, dict]] = []
    custom: list[dict] = []
    final: dict = {}
    for mode, part in relay.graph.stream({"question": tiny.QUESTION}, LIMIT,
                                         stream_mode=["messages", "custom", "values"]):
        if mode == "messages":
            chunks.append(part)
        elif mode == "custom":
            custom.append(part)
        else:
            final = part
    tokens = [(c, meta) for c, meta in chunks if type(c).__name__ == "AIMessageChunk"]
    assert {c.name for c, _ in tokens} == {"controller", "expert"}
    assert all(meta["langgraph_node"] == c.name for c, meta in tokens)
    assert all(meta["ls_model_name"] == relay.agents[["controller", "expert"].index(c.name)].backend.model_id
               for c, meta in tokens)
    # the chunks of each turn add up to its message in the state, and to the custom events
    turns = [m for m in final["messages"] if isinstance(m, AIMessage)]
    assert [m.name for m in turns] == ["controller", "expert", "controller"]
    for message in turns:
        assert "".join(c.content for c, _ in tokens if c.id == message.id) == message.content
    assert "".join(c.content for c, _ in tokens) == "".join(e["text"] for e in custom if e["type"] == "token")
    assert any(e["type"] == "handoff" for e in custom)  # the custom events stay


class Recorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.started: list[dict] = []
        self.tokens: list[tuple[str, str]] = []
        self.usage: list[tuple[str, dict]] = []

    def on_chat_model_start(self, serialized, messages, *, run_id, metadata=None, **kw) -> None:
        self.started.append({"run_id": run_id, **(metadata or {})})

    def on_llm_new_token(self, token, *, chunk=None, run_id, **kw) -> None:
        self.tokens.append((chunk.message.name, token))

    def on_llm_end(self, response, *, run_id, **kw) -> None:
        message = response.generations[0][0].message
        self.usage.append((message.name, message.usage_metadata))


def test_a_langchain_callback_handler_sees_every_turn_as_an_llm_run(backends, redis_store) -> None:
    relay = make_relay(backends, redis_store)
    handler = Recorder()
    result = relay.run(tiny.QUESTION, config={"callbacks": [handler]})
    assert [m["relaygraph_agent"] for m in handler.started] == ["controller", "expert", "controller"]
    assert {name for name, _ in handler.tokens} == {"controller", "expert"}
    assert "".join(t for _, t in handler.tokens) == "".join(s.text for s in result.segments)
    out: dict[str, int] = {}
    for name, usage in handler.usage:
        out[name] = out.get(name, 0) + usage["output_tokens"]
        assert usage["input_tokens"] > 0
    assert out == result.tokens_by_agent
    # the same through the graph, and nothing is reported when nobody listens
    other = Recorder()
    relay.graph.invoke({"question": tiny.NOCALL_QUESTION}, {**LIMIT, "callbacks": [other]})
    assert [n for n, _ in other.usage] == ["controller"]


# --- async -----------------------------------------------------------------------------------

def test_arun_and_astream_under_gather(backends, redis_store) -> None:
    relay = make_relay(backends, redis_store)
    reference = relay.run(tiny.QUESTION)

    async def stream(question: str) -> list[dict]:
        return [event async for event in relay.astream(question)]

    async def main():
        return await asyncio.gather(relay.arun(tiny.QUESTION), relay.arun(tiny.NOCALL_QUESTION),
                                    stream(tiny.QUESTION), relay.arun_many([tiny.QUESTION] * 2))

    one, two, events, many = asyncio.run(main())
    assert (one.answer, two.answer) == ("7", "2")
    assert [s.text for s in one.segments] == [s.text for s in reference.segments]
    assert len({one.trajectory_id, two.trajectory_id, *(r.trajectory_id for r in many)}) == 4
    assert [r.answer for r in many] == ["7", "7"]
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "result" and "token" in kinds and kinds.count("handoff") == 3
    assert {e["agent"] for e in events if e["type"] == "token"} == {"controller", "expert"}
    assert "".join(e["text"] for e in events if e["type"] == "token") == \
        "".join(s.text for s in events[-1]["result"].segments)


# --- one trace per trajectory ----------------------------------------------------------------

@pytest.fixture
def receiver():
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    from relaygraph.testing.otlp_receiver import OtlpReceiver

    with OtlpReceiver() as rx:
        yield rx


def traces(spans) -> dict[str, list]:
    by: dict[str, list] = {}
    for s in spans:
        by.setdefault(s.trace_id, []).append(s)
    return by


def test_graph_invoke_gives_one_trace_per_trajectory(backends, redis_store, receiver) -> None:
    relay = make_relay(backends, redis_store)
    telemetry = configure("otlp", "none", endpoint=receiver.url, quiet=True)
    try:
        outs = [relay.graph.invoke({"question": tiny.QUESTION}, LIMIT),
                asyncio.run(relay.graph.ainvoke({"question": tiny.NOCALL_QUESTION}, LIMIT))]
    finally:
        assert telemetry.shutdown(), telemetry.problems
    by_trace = traces(receiver.spans)
    assert len(by_trace) == 2
    for out in outs:
        (spans,) = [t for t in by_trace.values()
                    if any(s.attributes.get("relaygraph.trajectory.id") == out["trajectory_id"] for s in t)]
        (root,) = [s for s in spans if not s.parent_span_id]
        assert root.name == "invoke_workflow relaygraph"
        assert root.attributes["relaygraph.handoffs"] == out["handoffs"]
        assert root.attributes["relaygraph.run.outcome"] == "ok"
        turns = [s for s in spans if s.parent_span_id == root.span_id]
        assert [s.name.split()[0] for s in turns] == ["invoke_agent"] * len(turns) and turns
        assert all(s.attributes["relaygraph.trajectory.id"] == out["trajectory_id"] for s in spans
                   if "relaygraph.trajectory.id" in s.attributes)


def test_a_subgraph_run_joins_the_callers_span_and_a_resumed_run_its_trace(
        backends, safety_worker, redis_store, receiver) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    from relaygraph.observability import using

    provider = TracerProvider()  # the application's own provider, exporting to the receiver
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver.url + "/v1/traces")))

    class App(TypedDict, total=False):
        question: str
        answer: str

    app = StateGraph(App)
    app.add_node("relay", make_relay(backends, redis_store).graph)
    app.add_edge(START, "relay")
    app.add_edge("relay", END)
    with using(provider):
        with provider.get_tracer("app").start_as_current_span("my app") as outer:
            assert app.compile().invoke({"question": tiny.QUESTION}, LIMIT)["answer"] == "7"
        relay = safety_relay(safety_worker, redis_store, checkpointer=InMemorySaver())
        paused = relay.run(tiny.SAFETY_QUESTION)
        assert relay.resume(paused.trajectory_id, "rollback").status == "finished"
    provider.shutdown()
    by_trace = traces(receiver.spans)
    assert len(by_trace) == 2  # the app's trace, and the paused-and-resumed trajectory's
    app_trace = next(t for t in by_trace.values() if any(s.name == "my app" for s in t))
    safety_trace = next(t for t in by_trace.values() if t is not app_trace)
    (workflow,) = [s for s in app_trace if s.name == "invoke_workflow relaygraph"]
    assert workflow.parent_span_id == format(outer.get_span_context().span_id, "016x")
    roots = [s for s in safety_trace if s.name == "invoke_workflow relaygraph"]
    assert len(roots) == 2  # the run, and its continuation once the human answered
    first, resumed = sorted(roots, key=lambda s: s.start_ns)
    assert first.attributes["relaygraph.run.outcome"] == "interrupted" and not first.parent_span_id
    assert resumed.parent_span_id == first.span_id and resumed.attributes["relaygraph.run.resumed"]
    assert resumed.attributes["relaygraph.run.outcome"] == "ok"
    assert otel_trace.get_current_span() is otel_trace.INVALID_SPAN  # nothing left attached


# --- the person at the terminal ----------------------------------------------------------------

def cli(*args: str, stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relaygraph.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])


def test_cli_supervisor_ask_human_asks_at_the_terminal(redis_server) -> None:
    worker = str(tiny.safety_worker())
    run = ("run", tiny.SAFETY_QUESTION, "--controller", worker, "--dtype", "float32",
           "--policy", "supervisor", "--supervisor", "ask:human", "--set", "chunk_tokens=32",
           "--redis", redis_server.url, "--json")
    rollback = f"rollback: {tiny.STEER_TEXT.strip()}"
    proc = cli(*run, stdin=f"what?\n{rollback}\ny\n\n")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert (out["status"], out["answer"], out["counters"]) == ("finished", tiny.SAFE_END, {"rollbacks": 1})
    assert [s["text"] for s in out["segments"]][:4] == [tiny.UNSAFE_CHUNK, "", tiny.STEER_TEXT, tiny.SAFE_CHUNK]
    assert proc.stderr.count("the supervisor asks you about controller's latest chunk") == 4
    assert "expected continue | rollback" in proc.stderr  # "what?" was asked again
    assert "steal a wheel" in proc.stderr  # the person saw the chunk

    # no more input: the run waits, and `resume --answer` continues it in another process
    proc = cli(*run, stdin="")
    assert proc.returncode == 2 and "relaygraph resume" in proc.stderr and "--answer" in proc.stderr
    tid = proc.stderr.split("trajectory ")[1].split()[0]
    assert RedisStore.from_url(redis_server.url).load(tid).status == "interrupted"
    proc = cli("resume", tid, "--answer", rollback, "--redis", redis_server.url, "--trust-stored", "--json", stdin="\n\n")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["answer"] == tiny.SAFE_END
