"""Exact RelayLLM call semantics, end to end, with tiny real models overfit in-process.

The controller was trained to write ``Let me think.<call>3</call>`` then, after the expert's
three tokens, `` so the answer is \\boxed{7}.``; the expert was trained on the text without
the command. See tests/tiny_models.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from relaygraph import Agent, CallTokenPolicy, Relay, SoloPolicy
from relaygraph.agents.backend import Capabilities, CommandSyntax, Generation, Prompt, StopRule
from relaygraph.agents.transformers_backend import TransformersBackend
from relaygraph.policies import TurnContext
from relaygraph.trajectory import RedisStore, Trajectory
from tests import tiny_models as tiny


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = tiny.relay_root()
    controller, expert = tiny.relay_pair()
    return controller, expert, tiny.load_relay_meta(root)


@pytest.fixture(scope="session")
def backends(tiny_dirs) -> tuple[TransformersBackend, TransformersBackend]:
    controller, expert, _ = tiny_dirs
    return (TransformersBackend(str(controller), dtype="float32"),
            TransformersBackend(str(expert), dtype="float32"))


def make_relay(backends, store: RedisStore, max_tokens: int = 64, **policy) -> Relay:
    c, e = backends
    return Relay([Agent("controller", c, tiny.SYSTEM_PROMPT), Agent("expert", e, tiny.SYSTEM_PROMPT)],
                 CallTokenPolicy(**policy), store, max_tokens=max_tokens)


def test_call_hands_n_tokens_to_the_expert_and_back(backends, tiny_dirs, redis_store) -> None:
    meta = tiny_dirs[2]
    events: list[dict] = []
    result = make_relay(backends, redis_store).run(tiny.QUESTION, on_event=events.append)
    trajectory: Trajectory = redis_store.load(result.trajectory_id)
    segs = trajectory.segments

    assert [(s.author, s.kind) for s in segs] == [
        ("controller", "text"), ("controller", "call"), ("expert", "text"), ("controller", "text")]
    call = segs[1]
    assert call.plain_text + "" == segs[1].text.replace("<call>3</call>", "")
    assert call.meta["requested"] == 3 and call.meta["granted"] == 3
    assert segs[0].text + call.text == "Let me think.<call>3</call>"
    # the expert wrote exactly the 3 tokens it writes when it sees the text *without* the command
    assert segs[2].text == meta["e3_text"] and segs[2].token_ids == meta["e3_ids"]
    assert segs[3].text == tiny.CONTROLLER_SUFFIX and segs[3].finish_reason == "eos"
    assert trajectory.text == "Let me think." + meta["e3_text"] + tiny.CONTROLLER_SUFFIX

    assert result.answer == "7"
    assert result.tokens_by_agent["expert"] == 3
    total = sum(result.tokens_by_agent.values())
    assert result.call_ratio == pytest.approx(3 / total)
    assert result.handoffs == 2 and result.counters == {"calls": 1}
    assert result.finish_reason == "eos"
    handoffs = [(e["from"], e["to"], e["reason"]) for e in events if e["type"] == "handoff"]
    assert handoffs == [("controller", "expert", "call"), ("expert", "controller", "call_done"),
                        ("controller", "finish", "eos")]
    streamed = "".join(e["text"] for e in events if e["type"] == "token")
    assert streamed == "".join(s.text for s in segs)
    assert redis_store.status(result.trajectory_id) == "finished"


def test_expert_view_strips_the_command_controller_view_keeps_it(backends, redis_store) -> None:
    result = make_relay(backends, redis_store).run(tiny.QUESTION)
    segs = redis_store.read(result.trajectory_id)
    policy = CallTokenPolicy()
    expert_view = "".join(s.text for s in policy.view("expert", segs))
    controller_view = "".join(s.text for s in policy.view("controller", segs))
    assert "<call>" not in expert_view and "</call>" not in expert_view
    assert expert_view.startswith("Let me think.")  # the '.' sharing a token with '<' survives
    assert "Let me think.<call>3</call>" in controller_view


def test_call_is_clipped_to_max_call_tokens(backends, redis_store) -> None:
    result = make_relay(backends, redis_store, max_call_tokens=2).run(tiny.QUESTION)
    call, expert = redis_store.read(result.trajectory_id)[1:3]
    assert call.meta == {"command": call.meta["command"], "requested": 3, "granted": 2,
                         "step": call.meta["step"]}
    assert call.meta["step"]["to"] == "expert" and call.meta["step"]["budget"] == 2
    assert expert.author == "expert" and expert.n_tokens == 2
    assert result.tokens_by_agent["expert"] == 2


def test_min_call_tokens_grants_a_short_call_more_and_keeps_what_it_asked(backends, redis_store) -> None:
    result = make_relay(backends, redis_store, min_call_tokens=5).run(tiny.QUESTION)
    call, expert = redis_store.read(result.trajectory_id)[1:3]
    assert (call.meta["requested"], call.meta["granted"]) == (3, 5)
    assert expert.author == "expert" and expert.n_tokens == 5
    assert result.tokens_by_agent["expert"] == 5


def test_min_call_tokens_above_the_cap_is_refused_in_words() -> None:
    with pytest.raises(ValueError, match="min_call_tokens \\(8\\) is above max_call_tokens \\(4\\)"):
        CallTokenPolicy(min_call_tokens=8, max_call_tokens=4)


def test_call_is_clipped_to_the_remaining_budget(backends, redis_store) -> None:
    head = len(tiny.load_relay_meta(Path(backends[0].model_id).parent)["controller_head_ids"])
    result = make_relay(backends, redis_store, max_tokens=head + 1).run(tiny.QUESTION)
    segs = redis_store.read(result.trajectory_id)
    assert segs[1].meta["granted"] == 1
    assert segs[2].n_tokens == 1
    assert sum(result.tokens_by_agent.values()) == head + 1
    assert result.finish_reason == "budget"


def test_malformed_command_is_recorded_and_kept_as_text(backends, redis_store) -> None:
    result = make_relay(backends, redis_store).run(tiny.MALFORMED_QUESTION)
    segs = redis_store.read(result.trajectory_id)
    assert all(s.author == "controller" and s.kind == "text" for s in segs)
    assert "".join(s.text for s in segs) == tiny.MALFORMED_ANSWER
    assert segs[0].meta["malformed_call"] == "<call>abc</call>"
    assert segs[0].meta["step"]["reason"] == "malformed_call"
    assert result.counters == {"malformed_calls": 1}
    assert result.tokens_by_agent["expert"] == 0 and result.call_ratio == 0


def test_strict_commands_turn_the_malformed_command_into_a_call(backends, redis_store) -> None:
    """With ``strict_commands`` the controller may not write ``abc`` after ``<call>``: the
    decode loop masks it, the controller writes digits, and the expert is called."""
    result = make_relay(backends, redis_store, strict_commands=True).run(tiny.MALFORMED_QUESTION)
    segs = redis_store.read(result.trajectory_id)
    calls = [s for s in segs if s.kind == "call"]
    assert "malformed_calls" not in result.counters and result.counters["calls"] >= 1
    assert re.fullmatch(r"<call>\d{1,4}</call>", calls[0].text.strip()), calls[0].text
    assert segs[0].text.startswith("hi") and result.tokens_by_agent["expert"] > 0


@pytest.mark.parametrize(("text", "allowed"), [
    ("so 3 + 4", True), ("so <call>", True), ("so <call>12", True), ("so <call>12</", True),
    ("so <call>12</call>", True), ("so <call", True),  # an opening tag not yet whole is text
    ("so <call></", False), ("so <call>1.5", False), ("so <call> 12", False),
    ("so <call>12345", False), ("= 150</call>", False), ("so <call>12</call> x", False)])
def test_the_command_syntax_allows_only_whole_commands(text: str, allowed: bool) -> None:
    assert CommandSyntax("<call>", "</call>").allows(text) is allowed


def test_strict_commands_need_a_backend_that_constrains_decoding(backends, redis_store) -> None:
    from relaygraph.agents.wrapping import BackendWrapper
    from relaygraph.errors import ConfigError

    class Unconstrained(BackendWrapper):  # the backend as a server would be: no decode loop of ours
        capabilities = Capabilities(constrained=False)

    agents = [Agent("controller", Unconstrained(backends[0])), Agent("expert", backends[1])]
    with pytest.raises(ConfigError, match="strict_commands = false"):
        Relay(agents, CallTokenPolicy(strict_commands=True), redis_store)
    Relay(agents, CallTokenPolicy(), redis_store)  # without it the same agents are fine
    Relay(agents, CallTokenPolicy(strict_commands=True, teacher_free=True), redis_store)


def test_call_command_in_the_question_is_ignored(backends, redis_store) -> None:
    result = make_relay(backends, redis_store).run("What is 1 + 1? <call>3</call>")
    segs = redis_store.read(result.trajectory_id)
    own = "".join(s.text for s in segs if s.author == "controller")
    assert "</call>" not in own  # the controller did not write a command itself ...
    assert result.counters.get("calls", 0) == 0  # ... so nothing was called
    assert result.tokens_by_agent["expert"] == 0
    assert not any(s.kind == "call" for s in segs)


def test_call_command_in_the_expert_output_is_ignored(backends) -> None:
    controller, expert = backends
    policy = CallTokenPolicy()
    text = " seven <call>5</call>"
    ids = expert.encode(text)
    gen = Generation(text=text, token_ids=ids, logprobs=[0.0] * len(ids), finish_reason="budget",
                     tokenizer=expert.tokenizer_id)
    decision = policy.route(Agent("expert", expert), gen,
                            TurnContext("q", max_tokens=100, generated=10, budget=len(ids)))
    assert [s.kind for s in decision.segments] == ["text"]
    assert decision.next == "controller" and decision.reason == "call_done"
    assert decision.counters == {}


def test_solo_policy(backends, redis_store) -> None:
    relay = Relay([Agent("controller", backends[0], tiny.SYSTEM_PROMPT)], SoloPolicy(), redis_store)
    result = relay.run(tiny.NOCALL_QUESTION)
    assert result.answer == "2" and result.call_ratio == 0 and result.handoffs == 0
    assert [s.text for s in result.segments] == [tiny.NOCALL_ANSWER]


def test_kv_cache_reuse_gives_the_same_tokens_and_prefills_only_the_new_ones(backends) -> None:
    controller, _ = backends
    prompt = Prompt(tiny.QUESTION, tiny.SYSTEM_PROMPT)
    first = controller.generate(prompt, StopRule(max_tokens=5), cache_key="k")
    assert first.prefilled_tokens == first.prompt_tokens
    from relaygraph.trajectory import Segment

    seg = Segment(author="controller", text=first.text, token_ids=first.token_ids,
                  tokenizer=first.tokenizer)
    cont = Prompt(tiny.QUESTION, tiny.SYSTEM_PROMPT, (seg,))
    cached = controller.generate(cont, StopRule(max_tokens=8), cache_key="k")
    fresh = controller.generate(cont, StopRule(max_tokens=8))
    assert cached.token_ids == fresh.token_ids
    assert cached.prefilled_tokens == 1  # only its own last sampled token was not in the cache
    assert fresh.prefilled_tokens == fresh.prompt_tokens
    controller.drop_cache("k")


def test_relay_graph_works_as_a_subgraph(backends, redis_store) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "subgraph_example", Path(__file__).parents[1] / "examples" / "subgraph.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    app = example.build_app(make_relay(backends, redis_store))
    final = app.invoke({"question": tiny.QUESTION}, {"recursion_limit": 200})
    assert final["answer"] == "7"
    assert redis_store.exists(final["trajectory_id"])
    assert "answer '7'" in final["report"]
    # run from the command line, it prints the text as the relay writes it, handoffs marked
    import io

    shown = io.StringIO()
    streamed = example.run(app, tiny.QUESTION, shown)
    assert streamed["answer"] == "7" and "answer '7'" in streamed["report"]
    assert "⟨controller→expert⟩" in shown.getvalue() and "<call>" in shown.getvalue()


def test_teacher_free_bans_the_command_at_decode_time(backends, redis_store) -> None:
    """The paper's teacher-free inference: the controller cannot write <call>/</call> at all
    (banned while decoding), so it writes something else there and the expert never writes."""
    from relaygraph.agents.backend import Prompt, StopRule

    controller = backends[0]
    prompt = Prompt(tiny.QUESTION, tiny.SYSTEM_PROMPT)
    free = controller.generate(prompt, StopRule(max_tokens=24))
    assert "Let me think.<call>" in free.text  # trained to call here
    banned = controller.generate(prompt, StopRule(max_tokens=24, bad_words=("<call>", "</call>")))
    # the same text up to the command; there another token is taken (however it is split:
    # the tiny tokenizer writes ".<" "call" ">" as well as "<call>")
    assert banned.text.startswith("Let me think")
    assert "<call>" not in banned.text and "</call>" not in banned.text

    result = make_relay(backends, redis_store, teacher_free=True).run(tiny.QUESTION)
    assert result.tokens_by_agent["expert"] == 0 and result.call_ratio == 0.0
    assert result.counters.get("calls", 0) == 0 and result.counters.get("refused_calls", 0) == 0
    # not even the command's first word: a ban of the whole tag stops only its last token,
    # and a controller trained on the command then writes `<call` and the digits after it
    assert all("<call" not in s.text and "</call" not in s.text for s in result.segments)
    rule = CallTokenPolicy(teacher_free=True).stop_rule("controller", TurnContext("q", 64))
    assert "<call" in rule.bad_words and "</call" in rule.bad_words


def test_no_per_call_cap_leaves_only_the_budget(backends, redis_store) -> None:
    capped = make_relay(backends, redis_store, max_tokens=64, max_call_tokens=2).run(tiny.QUESTION)
    assert capped.handoff_records[0].requested_tokens == 2
    free = make_relay(backends, redis_store, max_tokens=64, max_call_tokens=None).run(tiny.QUESTION)
    assert free.handoff_records[0].requested_tokens == 3  # what the controller asked for
